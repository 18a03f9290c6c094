//! A flight-streamer started in-process against a real nats-server (with the repo's users: the
//! streamer connects as `flight-streamer`, events are published as `gateway`) and a real
//! PostgreSQL holding the example shop, plus the helpers the tests share: events made from
//! PostgreSQL's own `to_jsonb` of a row (exactly what the gateway's capture trigger sends) and
//! a Flight client that reads every message with its `app_metadata`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use arrow::record_batch::RecordBatch;
use arrow_flight::decode::{DecodedPayload, FlightDataDecoder};
use arrow_flight::{FlightClient, Ticket};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use herald_flight_streamer::{FlightSettings, Running};
use herald_shared::config::{NatsConfig, StreamsConfig};
use herald_shared::nats::Nats;
use herald_shared::{EntityEvent, Op, SCHEMA_VERSION, streams, subjects};
use herald_test_support::{NatsServer, Postgres, service_password, workspace_root};
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "test-flight-token-0123456789";

pub struct Stack {
    pub nats: NatsServer,
    pub postgres: Postgres,
    pub pool: PgPool,
    pub publisher: async_nats::jetstream::Context,
    pub flight: Option<Running>,
    pub address: std::net::SocketAddr,
    shutdown: CancellationToken,
}

pub fn shop_schema() -> PathBuf {
    workspace_root().join("examples/shop/gateway-schema.toml")
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A stack whose settings `adjust` changes (batch sizes, keep-alive, limits).
    pub async fn start_with(adjust: impl FnOnce(&mut FlightSettings)) -> Self {
        Self::start_with_sql("", adjust).await
    }

    /// As `start_with`, running `sql` after the shop schema (extra tables for a schema file
    /// named in `adjust`).
    pub async fn start_with_sql(sql: &str, adjust: impl FnOnce(&mut FlightSettings)) -> Self {
        let nats = NatsServer::start_with_service_users();
        let postgres = Postgres::start();
        let pool = postgres.with_shop_schema().await;
        if !sql.is_empty() {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(&pool)
                .await
                .expect("extra tables");
        }
        let config = NatsConfig {
            url: nats.url(),
            user: Some("flight-streamer".into()),
            password: Some(service_password("flight-streamer")),
            ..Default::default()
        };
        let connection = herald_shared::nats::connect(&config, "flight-streamer")
            .await
            .expect("connect as flight-streamer");
        streams::ensure(
            &connection.jetstream,
            &StreamsConfig::default(),
            &[streams::EVENTS],
        )
        .await
        .expect("provision HERALD_EVENTS");
        let publisher = async_nats::ConnectOptions::new()
            .user_and_password("gateway".into(), service_password("gateway"))
            .connect(nats.url())
            .await
            .expect("connect as gateway");
        let mut settings = FlightSettings {
            listen: "127.0.0.1:0".parse().expect("address"),
            database_url: postgres.url(),
            schema_file: shop_schema(),
            token: TOKEN.into(),
            ..Default::default()
        };
        adjust(&mut settings);
        let shutdown = CancellationToken::new();
        let flight = herald_flight_streamer::start(
            settings,
            &Nats::new(connection.client.clone(), &config),
            pool.clone(),
            shutdown.clone(),
        )
        .await
        .expect("the flight-streamer starts");
        Self {
            address: flight.address,
            nats,
            postgres,
            pool,
            publisher: async_nats::jetstream::new(publisher),
            flight: Some(flight),
            shutdown,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// A client without credentials.
    pub async fn anonymous(&self) -> FlightClient {
        let channel = tonic::transport::Channel::from_shared(self.url())
            .expect("url")
            .connect()
            .await
            .expect("connect to Flight");
        FlightClient::new(channel)
    }

    /// A client sending the bearer token.
    pub async fn client(&self) -> FlightClient {
        let mut client = self.anonymous().await;
        client
            .add_header("authorization", &format!("Bearer {TOKEN}"))
            .expect("header");
        client
    }

    /// Publishes `event` as the gateway does; returns its stream sequence.
    pub async fn publish(&self, event: &EntityEvent) -> u64 {
        let subject = subjects::event(&event.entity, event.op).expect("subject");
        let body = serde_json::to_vec(event).expect("serialise");
        self.publisher
            .publish(subject, body.into())
            .await
            .expect("publish")
            .await
            .expect("stored")
            .sequence
    }

    /// Inserts an order and returns the insert event (not yet published), its row as PostgreSQL
    /// renders it.
    pub async fn new_order(&self, total: &str, status: &str, at: DateTime<Utc>) -> EntityEvent {
        let customer: i64 = sqlx::query_scalar(
            "INSERT INTO customers (email, name) VALUES (gen_random_uuid()::text, 'c') RETURNING id",
        )
        .fetch_one(&self.pool)
        .await
        .expect("customer");
        let row: Value = sqlx::query_scalar(
            "INSERT INTO orders (customer_id, status, total) VALUES ($1, $2, $3::numeric) \
             RETURNING to_jsonb(orders.*)",
        )
        .bind(customer)
        .bind(status)
        .bind(total)
        .fetch_one(&self.pool)
        .await
        .expect("order");
        event("Order", Op::Insert, None, Some(row), at)
    }

    /// Stops the flight-streamer (as `main` does on a signal).
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(flight) = self.flight.take() {
            flight.wait().await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn event(
    entity: &str,
    op: Op,
    before: Option<Value>,
    data: Option<Value>,
    at: DateTime<Utc>,
) -> EntityEvent {
    let row = data.as_ref().or(before.as_ref());
    let key = row
        .and_then(|r| r.get("id"))
        .map(|id| id.to_string())
        .unwrap_or_default();
    let changed = (op == Op::Update).then(|| {
        let (Some(Value::Object(b)), Some(Value::Object(d))) = (&before, &data) else {
            return Vec::new();
        };
        d.iter()
            .filter(|(k, v)| b.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .collect()
    });
    EntityEvent {
        id: uuid::Uuid::now_v7(),
        entity: entity.into(),
        op,
        key,
        data,
        before,
        changed,
        at,
        actor: Some("tester".into()),
        tx: 1,
        schema_version: SCHEMA_VERSION,
    }
}

/// One message of a DoGet answer after the schema: a batch and its `app_metadata`.
pub struct Message {
    pub batch: RecordBatch,
    pub cursor: Option<u64>,
}

/// The DoGet stream, message by message.
pub struct Reader {
    pub decoder: FlightDataDecoder,
}

impl Reader {
    pub async fn open(client: &mut FlightClient, ticket: impl Into<bytes::Bytes>) -> Self {
        Self::try_open(client, ticket).await.expect("DoGet")
    }

    pub async fn try_open(
        client: &mut FlightClient,
        ticket: impl Into<bytes::Bytes>,
    ) -> Result<Self, arrow_flight::error::FlightError> {
        let stream = client.do_get(Ticket::new(ticket.into())).await?;
        Ok(Self {
            decoder: stream.into_inner(),
        })
    }

    /// The next record batch; None when the stream ended.
    pub async fn next(&mut self) -> Result<Option<Message>, arrow_flight::error::FlightError> {
        while let Some(data) = self.decoder.next().await {
            let data = data?;
            let cursor = std::str::from_utf8(&data.inner.app_metadata)
                .ok()
                .and_then(|t| t.parse().ok());
            if let DecodedPayload::RecordBatch(batch) = data.payload {
                return Ok(Some(Message { batch, cursor }));
            }
        }
        Ok(None)
    }

    /// Every batch until the stream ends.
    pub async fn all(mut self) -> Vec<Message> {
        let mut out = Vec::new();
        while let Some(message) = self.next().await.expect("a batch") {
            out.push(message);
        }
        out
    }

    /// The next non-empty batch, within `timeout`.
    pub async fn next_rows(&mut self, timeout: Duration) -> Message {
        tokio::time::timeout(timeout, async {
            loop {
                let message = self
                    .next()
                    .await
                    .expect("a batch")
                    .expect("the stream goes on");
                if message.batch.num_rows() > 0 {
                    return message;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no rows within {timeout:?}"))
    }
}

/// The `seq` column of every batch, in order.
pub fn sequences(messages: &[Message]) -> Vec<u64> {
    messages
        .iter()
        .flat_map(|m| {
            let seq = m
                .batch
                .column_by_name("seq")
                .expect("a seq column")
                .as_any()
                .downcast_ref::<arrow::array::UInt64Array>()
                .expect("uint64");
            seq.values().to_vec()
        })
        .collect()
}

pub fn rows(messages: &[Message]) -> usize {
    messages.iter().map(|m| m.batch.num_rows()).sum()
}

/// The gRPC code of a Flight error (None for a client-side error).
pub fn code(error: &arrow_flight::error::FlightError) -> Option<tonic::Code> {
    match error {
        arrow_flight::error::FlightError::Tonic(status) => Some(status.code()),
        _ => None,
    }
}
