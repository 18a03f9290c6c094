//! Starts real PostgreSQL and NATS servers and the gateway in-process against them, with a small
//! shop schema (customers and their orders) declared as entities.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream;
use herald_gateway::GatewaySettings;
use herald_gateway::relay::RelaySettings;
use herald_shared::EntityEvent;
use herald_shared::config::{NatsConfig, StreamsConfig};
use herald_shared::nats::Nats;
use herald_shared::streams;
use herald_test_support::{NatsServer, Postgres};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub const JWT_SECRET: &str = "a-test-secret-that-is-long-enough-for-hs256";
pub const API_KEY: &str = "test-api-key-0123456789";
pub const API_KEY_ACTOR: &str = "batch-importer";
/// The headers of a request made with the API key.
pub const KEYED: &[(&str, &str)] = &[("x-api-key", API_KEY)];

pub const DDL: &str = "
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, email text);
CREATE TABLE orders (
    id serial PRIMARY KEY,
    customer_id int REFERENCES customers(id),
    status text NOT NULL DEFAULT 'new',
    total numeric(10,2),
    note text,
    meta jsonb
);
CREATE TABLE counters (id int PRIMARY KEY, n int NOT NULL);
";

pub const SCHEMA: &str = r#"
[entities.Customer]
table = "customers"
key = "id"
fields = { id = "Int", name = "String", email = "String" }

[entities.Customer.relations.orders]
entity = "Order"
kind = "many"
from = "id"
to = "customer_id"

[entities.Order]
table = "orders"
key = "id"
fields = { id = "Int", customer_id = "Int", status = "String", total = "Float", note = "String", meta = "JSON" }

[entities.Order.relations.customer]
entity = "Customer"
kind = "one"
from = "customer_id"
to = "id"

[entities.Counter]
table = "counters"
key = "id"
fields = { id = "Int", n = "Int" }
"#;

pub struct World {
    pub pg: Postgres,
    pub nats_server: NatsServer,
    pub nats: Nats,
    pub db: PgPool,
    pub dir: tempfile::TempDir,
}

impl World {
    /// Servers, the shop tables and the streams; no gateway yet.
    pub async fn start() -> Self {
        Self::start_with_nats(NatsServer::start()).await
    }

    pub async fn start_with_nats(nats_server: NatsServer) -> Self {
        // Spans need the OpenTelemetry layer to get ids that `traceparent` can carry; each test is
        // its own process under nextest, so this runs once per process (a repeat is harmless).
        let _ = herald_shared::telemetry::init(
            "gateway-test",
            &herald_shared::config::TelemetryConfig {
                log_level: "warn".into(),
                ..Default::default()
            },
        )
        .map(std::mem::forget);
        let pg = Postgres::start();
        let db = PgPool::connect(&pg.url())
            .await
            .expect("connect to test PostgreSQL");
        sqlx::raw_sql(DDL)
            .execute(&db)
            .await
            .expect("create the shop tables");
        let nats = herald_shared::nats::connect(
            &NatsConfig {
                url: nats_server.url(),
                ..Default::default()
            },
            "gateway-test",
        )
        .await
        .expect("connect to test NATS");
        streams::ensure(
            &nats.jetstream,
            &StreamsConfig::default(),
            &[streams::EVENTS, streams::DLQ],
        )
        .await
        .expect("provision streams");
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("schema.toml"), SCHEMA).expect("write schema file");
        Self {
            pg,
            nats_server,
            nats,
            db,
            dir,
        }
    }

    pub fn schema_path(&self) -> PathBuf {
        self.dir.path().join("schema.toml")
    }

    pub fn settings(&self) -> GatewaySettings {
        let mut settings = GatewaySettings {
            database_url: self.pg.url(),
            schema_file: self.schema_path(),
            listen: "127.0.0.1:0".parse().expect("address"),
            relay: RelaySettings {
                poll_interval: Duration::from_millis(200),
                ..Default::default()
            },
            ..Default::default()
        };
        settings.auth.jwt_hs256_secret = Some(JWT_SECRET.into());
        settings
            .auth
            .api_keys
            .insert(API_KEY.into(), API_KEY_ACTOR.into());
        settings
    }

    pub async fn gateway(&self) -> Gateway {
        self.gateway_with(self.settings()).await
    }

    pub async fn gateway_with(&self, settings: GatewaySettings) -> Gateway {
        let shutdown = CancellationToken::new();
        let running = herald_gateway::start(&settings, &self.nats, shutdown.clone())
            .await
            .expect("gateway starts");
        Gateway {
            url: format!("http://{}/graphql", running.address),
            shutdown,
            running: Some(running),
            http: reqwest::Client::new(),
        }
    }

    /// Every event stored in HERALD_EVENTS, in stream order, with its Msg-Id and subject.
    pub async fn events(&self) -> Vec<Stored> {
        stored(&self.nats.jetstream, herald_shared::subjects::EVENTS_STREAM).await
    }

    pub async fn dead_letters(&self) -> Vec<Stored> {
        stored(&self.nats.jetstream, herald_shared::subjects::DLQ_STREAM).await
    }

    /// Waits until the events stream holds `n` messages.
    pub async fn wait_for_events(&self, n: usize) -> Vec<Stored> {
        herald_test_support::eventually_async(
            &format!("{n} events in HERALD_EVENTS"),
            Duration::from_secs(20),
            || async {
                let events = self.events().await;
                (events.len() >= n).then_some(events)
            },
        )
        .await
    }
}

pub struct Stored {
    pub subject: String,
    pub headers: async_nats::HeaderMap,
    pub payload: bytes::Bytes,
}

impl Stored {
    pub fn event(&self) -> EntityEvent {
        herald_shared::messages::decode(&self.payload).expect("a valid EntityEvent")
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| v.as_str().to_owned())
    }
}

async fn stored(js: &jetstream::Context, stream: &str) -> Vec<Stored> {
    // Right after a nats-server restart the client may still be reconnecting: a request that
    // times out then is asked again, for a while, before the test gives up.
    let mut tries = 0;
    let (stream, state) = loop {
        let answer = match js.get_stream(stream).await {
            Ok(mut handle) => match handle.info().await.map(|info| info.state.clone()) {
                Ok(state) => Ok((handle, state)),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        match answer {
            Ok(found) => break found,
            Err(e) if tries < 20 => {
                tries += 1;
                tracing::debug!(error = %e, "stream not readable yet");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("stream {stream} not readable: {e}"),
        }
    };
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if state.messages == 0 {
            break;
        }
        if let Ok(message) = stream.get_raw_message(seq).await {
            out.push(Stored {
                subject: message.subject.to_string(),
                headers: message.headers,
                payload: message.payload,
            });
        }
    }
    out
}

pub struct Gateway {
    pub url: String,
    pub shutdown: CancellationToken,
    running: Option<herald_gateway::Running>,
    pub http: reqwest::Client,
}

impl Gateway {
    /// POSTs a GraphQL request with optional extra headers; returns (status, body).
    pub async fn post(
        &self,
        query: &str,
        variables: serde_json::Value,
        headers: &[(&str, &str)],
    ) -> (u16, serde_json::Value) {
        let mut request = self
            .http
            .post(&self.url)
            .json(&serde_json::json!({ "query": query, "variables": variables }));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("gateway answers");
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(serde_json::Value::Null);
        (status, body)
    }

    /// POSTs `body` as it is, with the API key; returns (status, body).
    pub async fn post_body(&self, body: serde_json::Value) -> (u16, serde_json::Value) {
        let response = self
            .http
            .post(&self.url)
            .header("x-api-key", API_KEY)
            .json(&body)
            .send()
            .await
            .expect("gateway answers");
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    /// A query as the API key's caller (anonymous callers reach only what the schema file
    /// grants the `anonymous` role); panics on GraphQL errors.
    pub async fn query(&self, query: &str) -> serde_json::Value {
        let (status, body) = self.post(query, serde_json::json!({}), KEYED).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.get("errors").is_none(), "unexpected errors: {body}");
        body["data"].clone()
    }

    /// What `/ready` would report as failing, empty when ready.
    pub async fn not_ready(&self, nats: &Nats) -> Vec<String> {
        match &self.running {
            Some(running) => running.readiness(nats).failures().await,
            None => vec!["stopped".into()],
        }
    }

    /// Requests answered from a compiled plan rather than by the engine.
    pub fn plan_hits(&self) -> u64 {
        self.running.as_ref().map_or(0, |r| r.plan_hits())
    }

    /// The pool GraphQL serves from (the relay has its own).
    pub fn graphql_pool(&self) -> &PgPool {
        &self.running.as_ref().expect("running").pool
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            running.wait().await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An HS256 token for `sub`.
pub fn token(sub: &str) -> String {
    let claims = serde_json::json!({ "sub": sub, "exp": chrono::Utc::now().timestamp() + 600 });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign a token")
}
