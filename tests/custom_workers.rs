//! Custom workers in another language, against a stack of real binaries: the Python examples in
//! `examples/python/` connect as the `custom-worker` user of `nats/auth.conf` to a nats-server
//! running it, beside the gateway and the dispatcher started from their `examples/dev` configs
//! (as `scripts/dev up` starts them).
//!
//! - `custom_worker.py` runs the custom action kind `invoice` of `examples/python/observers.toml`
//!   against this test's invoicing endpoint: one order's first POST answers 503 (NAKed with the
//!   retry policy's delay, then retried and succeeded), another's answers 422 (dead-lettered with
//!   the Herald-* headers). Its outcomes and dead letter are read back from the streams and from
//!   `herald dlq list`, as a built-in kind's would be.
//! - `events_subscriber.py` follows `herald.events.Order.>` on a durable consumer, is killed
//!   (SIGKILL) and restarted, and must have written every Order event exactly once, in order.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::Process;
use futures::StreamExt;
use herald_shared::config::StreamsConfig;
use herald_shared::messages::decode;
use herald_shared::{ActionOutcome, ActionRequest, EntityEvent, OutcomeStatus, headers, streams};
use herald_test_support::{
    NatsServer, Postgres, eventually_async, free_port, herald_binary, service_password,
    workspace_root,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);
/// The API key of examples/dev/gateway.toml.
const DEV_API_KEY: &str = "dev-shop-api-key-0123456789";
/// Where examples/python/observers.toml sends invoices; the test swaps in its own endpoint.
const EXAMPLE_INVOICING: &str = "http://127.0.0.1:9901";
const OBSERVER: &str = "order_invoiced";
const INVOICE_SUBJECT: &str = "herald.actions.invoice.order_invoiced";
/// Order totals the invoicing endpoint answers 503 to once, and 422 to always.
const FLAKY_TOTAL: f64 = 120.0;
const REFUSED_TOTAL: f64 = 999.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_worker_runs_a_custom_kind_with_retries_outcomes_and_a_dead_letter() {
    let invoicing = Invoicing::start().await;
    let stack = Stack::start(true, &invoicing.url()).await;
    let _worker = Process::python(&stack.dir, "custom_worker.py", &stack.nats_url, &[]);

    let customer = stack.create_customer("ivy@shop.test").await;
    let flaky = stack.create_order(&customer, FLAKY_TOTAL).await;
    let refused = stack.create_order(&customer, REFUSED_TOTAL).await;
    let events = stack.order_inserts(&[&flaky, &refused]).await;
    let action = |key: &str| ActionRequest::action_id(events[key].id, OBSERVER, 0);

    // The flaky one: 503 (retrying), then 200 (succeeded), same idempotency key, the retry
    // after the policy's 200 ms.
    let outcomes = eventually_async("the flaky invoice to succeed", WAIT, || async {
        let outcomes = stack.outcomes(&action(&flaky)).await;
        outcomes
            .iter()
            .any(|o| o.status == OutcomeStatus::Succeeded)
            .then_some(outcomes)
    })
    .await;
    let seen: Vec<(u32, OutcomeStatus, Option<u16>)> = outcomes
        .iter()
        .map(|o| (o.attempt, o.status, o.http_status))
        .collect();
    assert_eq!(
        seen,
        [
            (1, OutcomeStatus::Retrying, Some(503)),
            (2, OutcomeStatus::Succeeded, Some(200))
        ]
    );
    let calls = invoicing.calls(&action(&flaky));
    assert_eq!(calls.len(), 2, "one POST per attempt");
    assert!(
        calls[1] - calls[0] >= Duration::from_millis(200),
        "the retry waited the policy's initial delay: {:?}",
        calls[1] - calls[0]
    );

    // The refused one: dead-lettered on its first attempt, with its reason and the Herald-*
    // headers, the body the ActionRequest unchanged.
    let dead = eventually_async("the refused invoice in the DLQ", WAIT, || async {
        stack
            .stored(streams::DLQ.name, "herald.dlq.actions")
            .await
            .into_iter()
            .find(|m| header(m, headers::ORIGINAL_MSG_ID).as_deref() == Some(&action(&refused)))
    })
    .await;
    let request: ActionRequest = decode(&dead.payload).expect("the body is the ActionRequest");
    assert_eq!(request.id, action(&refused));
    assert_eq!(
        header(&dead, headers::ORIGINAL_SUBJECT).as_deref(),
        Some(INVOICE_SUBJECT)
    );
    assert_eq!(header(&dead, headers::ATTEMPTS).as_deref(), Some("1"));
    assert_eq!(header(&dead, headers::HTTP_STATUS).as_deref(), Some("422"));
    assert_eq!(
        header(&dead, "Nats-Msg-Id"),
        Some(format!("{}:dlq", action(&refused)))
    );
    let error = header(&dead, headers::ERROR).expect("Herald-Error");
    assert!(error.contains("422"), "{error}");
    for stamp in [headers::FIRST_FAILED_AT, headers::DEAD_LETTERED_AT] {
        let value = header(&dead, stamp).unwrap_or_else(|| panic!("{stamp}"));
        chrono::DateTime::parse_from_rfc3339(&value)
            .unwrap_or_else(|e| panic!("{stamp} {value}: {e}"));
    }
    assert!(
        header(&dead, headers::TRACEPARENT).is_some(),
        "the trace goes on"
    );
    let refused_outcomes = stack.outcomes(&action(&refused)).await;
    assert_eq!(
        refused_outcomes
            .iter()
            .map(|o| o.status)
            .collect::<Vec<_>>(),
        [OutcomeStatus::DeadLettered]
    );

    // The operator sees it like any other dead letter.
    let listed = stack.herald(&["dlq", "list", "--source", "actions", "--json"]);
    let row: Value = listed
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|row| row["original_msg_id"] == action(&refused).as_str())
        .unwrap_or_else(|| panic!("herald dlq list shows the dead letter:\n{listed}"));
    assert_eq!(row["original_subject"], INVOICE_SUBJECT);
    assert_eq!(row["attempts"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_subscriber_resumes_after_a_kill_without_missing_or_repeating() {
    let stack = Stack::start(false, EXAMPLE_INVOICING).await;
    let out = stack.dir.path().join("orders.jsonl");
    let args = [out.display().to_string()];
    let mut subscriber =
        Process::python(&stack.dir, "events_subscriber.py", &stack.nats_url, &args);

    let customer = stack.create_customer("otto@shop.test").await;
    let mut keys = vec![
        stack.create_order(&customer, 10.0).await,
        stack.create_order(&customer, 20.0).await,
    ];
    written(&out, 2).await;

    subscriber.kill();
    keys.push(stack.create_order(&customer, 30.0).await);
    keys.push(stack.create_order(&customer, 40.0).await);
    let _subscriber = Process::python(&stack.dir, "events_subscriber.py", &stack.nats_url, &args);
    keys.push(stack.create_order(&customer, 50.0).await);

    let lines = written(&out, keys.len()).await;
    let stored: Vec<EntityEvent> = stack
        .stored(streams::EVENTS.name, "herald.events.Order.>")
        .await
        .iter()
        .map(|m| decode(&m.payload).expect("an EntityEvent"))
        .collect();
    let ids = |events: &[EntityEvent]| events.iter().map(|e| e.id).collect::<Vec<_>>();
    assert_eq!(
        ids(&lines),
        ids(&stored),
        "every Order event once, in the stream's order"
    );
    assert_eq!(
        lines.iter().map(|e| e.key.clone()).collect::<Vec<_>>(),
        keys
    );
}

/// Waits until the subscriber's file holds `count` events, then returns them (failing on more).
async fn written(path: &Path, count: usize) -> Vec<EntityEvent> {
    let events = eventually_async(
        &format!("{count} events in {}", path.display()),
        WAIT,
        || async {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let events: Vec<EntityEvent> = text
                .lines()
                .map(|l| serde_json::from_str(l).expect("one EntityEvent per line"))
                .collect();
            (events.len() >= count).then_some(events)
        },
    )
    .await;
    assert_eq!(events.len(), count, "no event written twice");
    events
}

fn header(message: &jetstream::Message, name: &str) -> Option<String> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str().to_owned())
}

/// nats-server with the repo's users, PostgreSQL with the shop, and the gateway (and, for
/// actions, the dispatcher on examples/python/observers.toml) from their dev configs.
struct Stack {
    js: jetstream::Context,
    nats_url: String,
    graphql_url: String,
    http: reqwest::Client,
    dir: tempfile::TempDir,
    _services: Vec<Process>,
    _postgres: Postgres,
    _nats: NatsServer,
}

impl Stack {
    async fn start(with_dispatcher: bool, invoicing: &str) -> Self {
        let nats = NatsServer::start_with_service_users();
        let postgres = Postgres::start();
        let dir = tempfile::Builder::new()
            .prefix("herald-custom-workers-")
            .tempdir()
            .expect("a temp dir");
        postgres.with_shop_schema().await.close().await;

        // The operator's connection: provisions every stream (the action worker, which would
        // provision the outcomes stream, is not part of this stack) and reads them back.
        let operator = async_nats::ConnectOptions::new()
            .user_and_password("cli".into(), service_password("cli"))
            .connect(nats.url())
            .await
            .expect("connect as cli");
        let js = jetstream::new(operator);
        streams::ensure_all(&js, &StreamsConfig::default())
            .await
            .expect("provision the streams");

        let graphql = free_port();
        let mut services = vec![Process::service(
            &dir,
            "gateway",
            &[
                ("HERALD_SERVICE__DATABASE_URL", postgres.url()),
                ("HERALD_SERVICE__LISTEN", format!("127.0.0.1:{graphql}")),
            ],
            &nats,
        )];
        if with_dispatcher {
            let example =
                std::fs::read_to_string(workspace_root().join("examples/python/observers.toml"))
                    .expect("examples/python/observers.toml");
            assert!(example.contains(EXAMPLE_INVOICING));
            let observers = dir.path().join("observers.toml");
            std::fs::write(&observers, example.replace(EXAMPLE_INVOICING, invoicing))
                .expect("write the observers");
            services.push(Process::service(
                &dir,
                "dispatcher",
                &[("HERALD_SERVICE__OBSERVERS", observers.display().to_string())],
                &nats,
            ));
        }
        let http = reqwest::Client::new();
        for service in &mut services {
            service.wait_ready(&http).await;
        }
        Self {
            js,
            nats_url: nats.url(),
            graphql_url: format!("http://127.0.0.1:{graphql}/graphql"),
            http,
            dir,
            _services: services,
            _postgres: postgres,
            _nats: nats,
        }
    }

    async fn graphql(&self, query: &str) -> Value {
        let response: Value = self
            .http
            .post(&self.graphql_url)
            .header("x-api-key", DEV_API_KEY)
            .json(&json!({ "query": query }))
            .send()
            .await
            .expect("the gateway answers")
            .json()
            .await
            .expect("GraphQL JSON");
        assert!(response.get("errors").is_none(), "{query}: {response}");
        response["data"].clone()
    }

    async fn create_customer(&self, email: &str) -> String {
        let query = format!(
            r#"mutation {{ createCustomer(input: {{email: "{email}", name: "C"}}) {{ id }} }}"#
        );
        self.graphql(&query).await["createCustomer"]["id"]
            .as_str()
            .expect("the gateway answers ids as strings")
            .to_owned()
    }

    async fn create_order(&self, customer: &str, total: f64) -> String {
        let query = format!(
            "mutation {{ createOrder(input: {{customer_id: {customer}, total: {total:.1}}}) {{ id }} }}"
        );
        self.graphql(&query).await["createOrder"]["id"]
            .as_str()
            .expect("the gateway answers ids as strings")
            .to_owned()
    }

    /// The insert events of the given order keys, by key.
    async fn order_inserts(&self, keys: &[&str]) -> BTreeMap<String, EntityEvent> {
        eventually_async("the orders' events", WAIT, || async {
            let found: BTreeMap<String, EntityEvent> = self
                .stored(streams::EVENTS.name, "herald.events.Order.insert.>")
                .await
                .iter()
                .map(|m| decode::<EntityEvent>(&m.payload).expect("an EntityEvent"))
                .filter(|e| keys.contains(&e.key.as_str()))
                .map(|e| (e.key.clone(), e))
                .collect();
            (found.len() == keys.len()).then_some(found)
        })
        .await
    }

    /// The outcomes of one action, in the order they were stored.
    async fn outcomes(&self, action: &str) -> Vec<ActionOutcome> {
        self.stored(streams::OUTCOMES.name, "herald.outcomes.invoice.>")
            .await
            .iter()
            .map(|m| decode::<ActionOutcome>(&m.payload).expect("an ActionOutcome"))
            .filter(|o| o.action_id == action)
            .collect()
    }

    /// Everything stored on `subject` now, read by a throwaway consumer.
    async fn stored(&self, stream: &str, subject: &str) -> Vec<jetstream::Message> {
        let stream = self.js.get_stream(stream).await.expect("the stream");
        let reader = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: subject.into(),
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(10),
                ..Default::default()
            })
            .await
            .expect("a reader");
        let mut batch = reader
            .fetch()
            .max_messages(10_000)
            .expires(Duration::from_millis(300))
            .messages()
            .await
            .expect("fetch");
        let mut messages = Vec::new();
        while let Some(Ok(message)) = batch.next().await {
            messages.push(message);
        }
        messages
    }

    /// Runs the `herald` CLI as the operator; its standard output.
    fn herald(&self, args: &[&str]) -> String {
        let output = Command::new(herald_binary("herald"))
            .args(args)
            .env("HERALD_NATS__URL", &self.nats_url)
            .env("HERALD_NATS__USER", "cli")
            .env("HERALD_NATS__PASSWORD", service_password("cli"))
            .output()
            .expect("run herald");
        assert!(
            output.status.success(),
            "herald {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// When each action's POSTs arrived, by idempotency key.
type Calls = Arc<Mutex<BTreeMap<String, Vec<Instant>>>>;

/// The invoicing service the custom kind calls: 503 to the first POST for an order of
/// `FLAKY_TOTAL`, 422 to every one for `REFUSED_TOTAL`, 200 otherwise. Records when each
/// action's POSTs arrived, by idempotency key.
struct Invoicing {
    port: u16,
    calls: Calls,
}

impl Invoicing {
    async fn start() -> Self {
        let calls: Calls = Arc::default();
        let app = axum::Router::new()
            .route("/invoices", axum::routing::post(invoice))
            .with_state(calls.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the invoicing endpoint");
        let port = listener.local_addr().expect("its address").port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { port, calls }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn calls(&self, action: &str) -> Vec<Instant> {
        self.calls
            .lock()
            .expect("calls")
            .get(action)
            .cloned()
            .unwrap_or_default()
    }
}

async fn invoice(
    State(calls): State<Calls>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> StatusCode {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let attempt = {
        let mut calls = calls.lock().expect("calls");
        let seen = calls.entry(key).or_default();
        seen.push(Instant::now());
        seen.len()
    };
    match body["amount"].as_f64() {
        Some(FLAKY_TOTAL) if attempt == 1 => StatusCode::SERVICE_UNAVAILABLE,
        Some(REFUSED_TOTAL) => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::OK,
    }
}
