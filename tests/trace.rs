//! One trace across every hop. This test is the OTLP (gRPC) collector: each service, started
//! from its `examples/dev` config as `scripts/dev up` starts it, exports its spans here through
//! `OTEL_EXPORTER_OTLP_ENDPOINT`. One GraphQL mutation (an order over 500, which the shop's
//! observers turn into a webhook and a job) must give one trace id holding the spans of the
//! gateway's request, the relay's publish, the dispatcher, the action worker and the job worker,
//! each a descendant of the one before, linked by the `traceparent` the messages carry.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Process;
use herald_test_support::{NatsServer, Postgres, RedisServer, free_port};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(45);
/// The API key of examples/dev/gateway.toml.
const DEV_API_KEY: &str = "dev-shop-api-key-0123456789";

/// The hops of one mutation, in order: (service name, span name).
const HOPS: [(&str, &str); 6] = [
    ("herald-gateway", "graphql"),
    ("herald-gateway", "relay.publish"),
    ("herald-dispatcher", "dispatch"),
    ("herald-action-worker", "action"),
    ("herald-job-worker", "job intake"),
    ("herald-job-worker", "job"),
];

#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
    attributes: HashMap<String, String>,
}

/// The in-test OTLP collector: keeps every span exported to it.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("spans");
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| text(&r.attributes).remove("service.name"))
                .unwrap_or_default();
            for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Span {
                    service: service.clone(),
                    attributes: text(&span.attributes),
                    name: span.name,
                    trace: span.trace_id,
                    id: span.span_id,
                    parent: span.parent_span_id,
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// String attributes by key.
fn text(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes
        .iter()
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some((kv.key.clone(), s.clone())),
            _ => None,
        })
        .collect()
}

impl Collector {
    fn start() -> (Self, SocketAddr) {
        let collector = Self::default();
        let address = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve(address)
                .await
        });
        (collector, address)
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().expect("spans").clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mutation_is_one_trace_from_the_gateway_to_the_job_worker() {
    let (collector, address) = Collector::start();
    let nats = NatsServer::start_with_service_users();
    let postgres = Postgres::start();
    let redis = RedisServer::start();
    let dir = tempfile::Builder::new()
        .prefix("herald-trace-")
        .tempdir()
        .expect("a temp dir");
    let pool = postgres.with_shop_schema().await;
    let customer: i64 = sqlx::query_scalar(
        "insert into customers (email, name) values ('tess@shop.test', 'Tess') returning id",
    )
    .fetch_one(&pool)
    .await
    .expect("a customer");
    pool.close().await;

    let endpoint = format!("http://{address}");
    let otlp = |mut env: Vec<(&'static str, String)>| {
        env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()));
        // Export every 200 ms rather than every 5 s.
        env.push(("OTEL_BSP_SCHEDULE_DELAY", "200".into()));
        env
    };
    let graphql = free_port();
    let mut services = vec![
        Process::service(
            &dir,
            "gateway",
            &otlp(vec![
                ("HERALD_SERVICE__DATABASE_URL", postgres.url()),
                ("HERALD_SERVICE__LISTEN", format!("127.0.0.1:{graphql}")),
            ]),
            &nats,
        ),
        Process::service(&dir, "dispatcher", &otlp(vec![]), &nats),
        Process::service(
            &dir,
            "action-worker",
            &otlp(vec![("HERALD_SERVICE__REDIS_URL", redis.url())]),
            &nats,
        ),
        Process::service(
            &dir,
            "job-worker",
            &otlp(vec![("HERALD_SERVICE__REDIS_URL", redis.url())]),
            &nats,
        ),
    ];
    let http = reqwest::Client::new();
    for service in &mut services {
        service.wait_ready(&http).await;
    }

    let response: Value = http
        .post(format!("http://127.0.0.1:{graphql}/graphql"))
        .header("x-api-key", DEV_API_KEY)
        .json(&json!({ "query": format!(
            "mutation {{ createOrder(input: {{customer_id: {customer}, total: 900.0}}) {{ id }} }}"
        ) }))
        .send()
        .await
        .expect("the gateway answers")
        .json()
        .await
        .expect("GraphQL JSON");
    assert!(response.get("errors").is_none(), "{response}");

    let found = || {
        let spans = collector.spans();
        let dispatch = spans.iter().find(|s| {
            s.name == "dispatch" && s.attributes.get("entity").map(String::as_str) == Some("Order")
        })?;
        let trace: Vec<&Span> = spans.iter().filter(|s| s.trace == dispatch.trace).collect();
        chain(&trace)
    };
    let deadline = Instant::now() + WAIT;
    let chain = loop {
        if let Some(chain) = found() {
            break chain;
        }
        if Instant::now() > deadline {
            let seen: Vec<String> = collector
                .spans()
                .iter()
                .map(|s| {
                    format!(
                        "{}/{} trace {} id {} parent {} {:?}",
                        s.service,
                        s.name,
                        hex(&s.trace),
                        hex(&s.id),
                        hex(&s.parent),
                        s.attributes
                    )
                })
                .collect();
            panic!(
                "no trace holds every hop in order; spans received:\n{}",
                seen.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "one trace: {}",
        chain
            .iter()
            .map(|s| format!("{}/{}", s.service, s.name))
            .collect::<Vec<_>>()
            .join(" → ")
    );
}

/// The hops' spans in one trace, each a descendant of the one before: some last hop's
/// ancestry, read from the root down, holds every hop in order. `None` while a hop is missing
/// (not exported yet) or on another branch.
fn chain(trace: &[&Span]) -> Option<Vec<Span>> {
    let by_id: HashMap<&[u8], &Span> = trace.iter().map(|s| (s.id.as_slice(), *s)).collect();
    let (last_service, last_name) = HOPS[HOPS.len() - 1];
    trace
        .iter()
        .filter(|s| s.service == last_service && s.name == last_name)
        .find_map(|leaf| {
            let mut path = vec![*leaf];
            while let Some(parent) = by_id.get(path[path.len() - 1].parent.as_slice()) {
                path.push(parent);
            }
            path.reverse();
            let mut hops = HOPS.iter().peekable();
            let mut found = Vec::new();
            for span in path {
                if let Some((service, name)) = hops.peek()
                    && span.service == *service
                    && span.name == *name
                {
                    found.push(span.clone());
                    hops.next();
                }
            }
            hops.peek().is_none().then_some(found)
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
