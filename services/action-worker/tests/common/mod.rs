//! The one test harness of the action worker: real NATS and Redis from herald_test_support, the
//! worker started in-process from its lib (or as a child process for crash tests), an HTTP sink
//! that records what it receives and answers as the test says, and readers for the outcome and
//! DLQ streams.
// Each test binary uses a different part of the harness.
#![allow(dead_code)]

pub mod smtp;
pub mod tls;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{
    self,
    message::{PublishMessage, StreamMessage},
};
use axum::body::Bytes;
use axum::http::{HeaderMap as HttpHeaders, StatusCode};
use chrono::Utc;
use herald_action_worker::Settings;
use herald_shared::messages::{ActionOutcome, ActionRequest, EntityEvent, Op};
use herald_shared::subjects::{self, DLQ_STREAM, OUTCOMES_STREAM};
use herald_shared::{RetryPolicy, SCHEMA_VERSION, headers};
use herald_test_support::{NatsServer, RedisServer};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const WAIT: Duration = Duration::from_secs(20);

pub struct App {
    pub nats: NatsServer,
    pub redis: RedisServer,
    pub jetstream: jetstream::Context,
    workers: Vec<(CancellationToken, JoinHandle<()>)>,
}

/// Settings for tests: loopback allowed, short leases and timers.
pub fn settings(redis_url: &str) -> Settings {
    let mut s = Settings {
        redis_url: redis_url.to_owned(),
        ssrf_allow: vec!["127.0.0.1".into()],
        concurrency: 8,
        ack_wait: Duration::from_secs(3),
        redis_retry: Duration::from_millis(100),
        ..Settings::default()
    };
    s.dedup.lease = Duration::from_secs(1);
    s.dedup.timeout = Duration::from_millis(300);
    s.webhook_secrets.insert("orders".into(), SECRET.into());
    s
}

impl App {
    pub async fn start() -> Self {
        let nats = NatsServer::start();
        let redis = RedisServer::start();
        let jetstream = nats.jetstream().await;
        herald_shared::streams::ensure_all(&jetstream, &Default::default())
            .await
            .expect("provision streams");
        Self {
            nats,
            redis,
            jetstream,
            workers: Vec::new(),
        }
    }

    pub fn settings(&self) -> Settings {
        settings(&self.redis.url())
    }

    /// Starts one in-process worker replica.
    pub fn spawn_worker(&mut self, settings: Settings) {
        let token = CancellationToken::new();
        let jetstream = self.jetstream.clone();
        let dedup = herald_action_worker::dedup(&settings).expect("dedup client");
        let shutdown = token.clone();
        let task = tokio::spawn(async move {
            herald_action_worker::run(jetstream, settings, dedup, shutdown)
                .await
                .expect("worker runs");
        });
        self.workers.push((token, task));
    }

    pub async fn publish(&self, request: &ActionRequest) {
        self.publish_with_id(request, Some(&request.id)).await;
    }

    /// Publishes with the given Msg-Id (`None`: no JetStream dedup, a true second delivery).
    pub async fn publish_with_id(&self, request: &ActionRequest, msg_id: Option<&str>) {
        let subject = subjects::action(&request.kind, &request.observer).expect("subject");
        let mut h = HeaderMap::new();
        if let Some(id) = msg_id {
            h.insert(headers::MSG_ID, id);
        }
        let body = serde_json::to_vec(request).expect("serialise");
        self.jetstream
            .send_publish(
                subject,
                PublishMessage::build().payload(body.into()).headers(h),
            )
            .await
            .expect("publish")
            .await
            .expect("stored");
    }

    pub async fn outcomes(&self, action_id: &str) -> Vec<ActionOutcome> {
        all_messages(&self.jetstream, OUTCOMES_STREAM)
            .await
            .into_iter()
            .filter_map(|m| serde_json::from_slice::<ActionOutcome>(&m.payload).ok())
            .filter(|o| o.action_id == action_id)
            .collect()
    }

    pub async fn dead_letters(&self) -> Vec<StreamMessage> {
        all_messages(&self.jetstream, DLQ_STREAM).await
    }

    /// Waits until the action has an outcome with `status`-like `done` predicate.
    pub async fn wait_outcomes(
        &self,
        action_id: &str,
        what: &str,
        done: impl Fn(&[ActionOutcome]) -> bool,
    ) -> Vec<ActionOutcome> {
        herald_test_support::eventually_async(what, WAIT, || async {
            let found = self.outcomes(action_id).await;
            done(&found).then_some(found)
        })
        .await
    }
}

impl Drop for App {
    fn drop(&mut self) {
        for (token, task) in &self.workers {
            token.cancel();
            task.abort();
        }
    }
}

pub async fn all_messages(js: &jetstream::Context, stream: &str) -> Vec<StreamMessage> {
    let mut stream = js.get_stream(stream).await.expect("stream");
    let last = stream.info().await.expect("info").state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        if let Ok(m) = stream.get_raw_message(seq).await {
            out.push(m);
        }
    }
    out
}

pub fn header(m: &StreamMessage, name: &str) -> Option<String> {
    m.headers.get(name).map(|v| v.as_str().to_owned())
}

pub fn event() -> EntityEvent {
    EntityEvent {
        id: Uuid::now_v7(),
        entity: "Order".into(),
        op: Op::Update,
        key: "42".into(),
        data: Some(serde_json::json!({"id": 42, "status": "shipped", "email": "ada@example.com"})),
        before: Some(serde_json::json!({"id": 42, "status": "paid"})),
        changed: Some(vec!["status".into()]),
        at: Utc::now(),
        actor: Some("user-1".into()),
        tx: 7,
        schema_version: SCHEMA_VERSION,
    }
}

pub fn retry(max_attempts: u32, initial_delay_ms: u64) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_delay_ms,
        max_delay_ms: initial_delay_ms * 8,
        multiplier: 2.0,
        jitter: false,
    }
}

pub fn action(
    kind: &str,
    observer: &str,
    config: serde_json::Value,
    retry: RetryPolicy,
) -> ActionRequest {
    let event = event();
    ActionRequest {
        id: ActionRequest::action_id(event.id, observer, 0),
        kind: kind.into(),
        observer: observer.into(),
        action_index: 0,
        config,
        retry,
        timeout_ms: 5_000,
        event,
        created_at: Utc::now(),
        schema_version: SCHEMA_VERSION,
        order: None,
    }
}

/// One request the sink received.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HttpHeaders,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

/// How the sink answers one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
    /// Never answer (a receiver that hangs).
    pub hang: bool,
    /// Answer only after this long (a slow receiver).
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: String::new(),
            hang: false,
            delay: Duration::ZERO,
        }
    }

    pub fn body(mut self, body: &str) -> Self {
        self.body = body.into();
        self
    }

    pub fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn hang() -> Self {
        Self {
            hang: true,
            ..Self::status(200)
        }
    }
}

type Responder = Arc<dyn Fn(usize) -> Reply + Send + Sync>;

/// A local HTTP receiver on 127.0.0.1:0 that records every request and answers the `n`th
/// (0-based) with `respond(n)`.
#[derive(Clone)]
pub struct Sink {
    pub address: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    stop: CancellationToken,
}

impl Sink {
    pub async fn start(respond: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind sink");
        Self::serve(listener, respond)
    }

    /// A sink on a given address (a receiver coming back where it was).
    pub async fn start_on(
        address: SocketAddr,
        respond: impl Fn(usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .expect("bind sink on its old address");
        Self::serve(listener, respond)
    }

    fn serve(
        listener: tokio::net::TcpListener,
        respond: impl Fn(usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let respond: Responder = Arc::new(respond);
        let state = (received.clone(), respond);
        let app = axum::Router::new()
            .fallback(
                |axum::extract::State((received, respond)): axum::extract::State<(
                    Arc<Mutex<Vec<Received>>>,
                    Responder,
                )>,
                 headers: HttpHeaders,
                 body: Bytes| async move {
                    let n = {
                        let mut all = received.lock().expect("sink lock");
                        all.push(Received {
                            headers,
                            body,
                            at: Instant::now(),
                        });
                        all.len() - 1
                    };
                    let reply = respond(n);
                    if reply.hang {
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep(reply.delay).await;
                    let mut response =
                        axum::response::Response::new(axum::body::Body::from(reply.body));
                    *response.status_mut() = StatusCode::from_u16(reply.status).expect("status");
                    for (name, value) in reply.headers {
                        response
                            .headers_mut()
                            .insert(name, value.parse().expect("header value"));
                    }
                    response
                },
            )
            .with_state(state);
        let address = listener.local_addr().expect("sink address");
        let stop = CancellationToken::new();
        let stopped = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await;
        });
        Self {
            address,
            received,
            stop,
        }
    }

    /// Stops listening and closes idle connections: from now on, connecting is refused.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("sink lock").clone()
    }

    pub async fn wait_for(&self, count: usize) -> Vec<Received> {
        herald_test_support::eventually(&format!("{count} request(s) at the sink"), WAIT, || {
            let all = self.received();
            (all.len() >= count).then_some(all)
        })
        .await
    }
}
