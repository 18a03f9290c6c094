//! A fault-injecting double of the cluster's bulk endpoint, for what no real server does on
//! demand: it stands in front of a real osmem-server, forwards every request to it, and on
//! `_bulk` can answer chosen items itself (429, or a 400 mapping error, inside a 200 bulk),
//! answer a whole bulk with a status (503), or stall a bulk past the client's timeout before
//! forwarding it. It counts how often each document id was sent, so a test can tell "retried"
//! from "never retried".

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// What the next bulk request meets, whole.
#[derive(Debug, Clone)]
pub enum BulkFault {
    /// Answered with this status and an error body; nothing is forwarded.
    Status(u16),
    /// Held this long, then forwarded (the client may have given up by then).
    Stall(Duration),
}

#[derive(Debug, Clone)]
struct ItemFault {
    id: String,
    status: u16,
    error_type: &'static str,
    reason: String,
    /// How many more times; `None` for always.
    remaining: Option<usize>,
}

#[derive(Default)]
struct Plan {
    items: Vec<ItemFault>,
    bulks: VecDeque<BulkFault>,
    sent: HashMap<String, usize>,
    bulk_requests: usize,
}

#[derive(Clone)]
pub struct FaultyCluster {
    pub url: String,
    plan: Arc<Mutex<Plan>>,
}

struct Shared {
    upstream: String,
    http: reqwest::Client,
    plan: Arc<Mutex<Plan>>,
}

impl FaultyCluster {
    /// Starts the double in front of `upstream`.
    pub async fn start(upstream: String) -> Self {
        let plan = Arc::new(Mutex::new(Plan::default()));
        let shared = Arc::new(Shared {
            upstream,
            http: reqwest::Client::new(),
            plan: Arc::clone(&plan),
        });
        let app = Router::new().fallback(forward).with_state(shared);
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind the fault double");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{address}"),
            plan,
        }
    }

    fn plan(&self) -> std::sync::MutexGuard<'_, Plan> {
        self.plan.lock().expect("plan lock")
    }

    /// The item with `_id` `id` is answered 429 the next `times` times it is sent.
    pub fn too_many_requests(&self, id: &str, times: usize) {
        self.plan().items.push(ItemFault {
            id: id.to_owned(),
            status: 429,
            error_type: "es_rejected_execution_exception",
            reason: "rejected execution: queue capacity reached".into(),
            remaining: Some(times),
        });
    }

    /// The item with `_id` `id` is refused with a mapping error, every time.
    pub fn mapping_error(&self, id: &str) {
        self.plan().items.push(ItemFault {
            id: id.to_owned(),
            status: 400,
            error_type: "mapper_parsing_exception",
            reason: "failed to parse field [data] of type [flat_object]".into(),
            remaining: None,
        });
    }

    /// The next bulk request meets `fault`.
    pub fn next_bulk(&self, fault: BulkFault) {
        self.plan().bulks.push_back(fault);
    }

    /// How many times a document with this id was sent in a bulk.
    pub fn sent(&self, id: &str) -> usize {
        self.plan().sent.get(id).copied().unwrap_or(0)
    }

    pub fn bulk_requests(&self) -> usize {
        self.plan().bulk_requests
    }
}

async fn forward(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    if method == Method::POST && uri.path() == "/_bulk" {
        return bulk(&shared, body).await;
    }
    pass(&shared, method, &uri, body, "application/json").await
}

async fn pass(
    shared: &Shared,
    method: Method,
    uri: &Uri,
    body: Bytes,
    content_type: &str,
) -> Response {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let sent = shared
        .http
        .request(method, format!("{}{path}", shared.upstream))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await;
    match sent {
        Ok(answer) => {
            let status =
                StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let bytes = answer.bytes().await.unwrap_or_default();
            (status, [("content-type", "application/json")], bytes).into_response()
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

async fn bulk(shared: &Shared, body: Bytes) -> Response {
    let text = String::from_utf8_lossy(&body).into_owned();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let actions: Vec<Value> = lines
        .iter()
        .step_by(2)
        .map(|line| serde_json::from_str(line).unwrap_or(Value::Null))
        .collect();
    let fault = {
        let mut plan = shared.plan.lock().expect("plan lock");
        plan.bulk_requests += 1;
        for action in &actions {
            let id = action["create"]["_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            *plan.sent.entry(id).or_default() += 1;
        }
        plan.bulks.pop_front()
    };
    match fault {
        Some(BulkFault::Status(status)) => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let error = json!({"error": {"type": "injected", "reason": "injected by the fault double"}, "status": status});
            return (code, axum::Json(error)).into_response();
        }
        Some(BulkFault::Stall(delay)) => tokio::time::sleep(delay).await,
        None => {}
    }
    // Each item: its own answer (a fault), or its place among the forwarded items.
    let mut answers: Vec<Option<Value>> = Vec::new();
    let mut forwarded = String::new();
    {
        let mut plan = shared.plan.lock().expect("plan lock");
        for (pair, action) in lines.chunks(2).zip(&actions) {
            let id = action["create"]["_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let index = action["create"]["_index"].clone();
            let fault = plan
                .items
                .iter_mut()
                .find(|f| f.id == id && f.remaining != Some(0));
            match fault {
                Some(f) => {
                    if let Some(n) = f.remaining.as_mut() {
                        *n -= 1;
                    }
                    answers.push(Some(json!({"create": {
                        "_index": index, "_id": id, "status": f.status,
                        "error": {"type": f.error_type, "reason": f.reason},
                    }})));
                }
                None => {
                    answers.push(None);
                    for line in pair {
                        forwarded.push_str(line);
                        forwarded.push('\n');
                    }
                }
            }
        }
    }
    let mut upstream_items = Vec::new().into_iter();
    if !forwarded.is_empty() {
        let answer = shared
            .http
            .post(format!("{}/_bulk", shared.upstream))
            .header("content-type", "application/x-ndjson")
            .body(forwarded)
            .send()
            .await;
        let Ok(answer) = answer else {
            return StatusCode::BAD_GATEWAY.into_response();
        };
        if !answer.status().is_success() {
            let status =
                StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            return (status, answer.bytes().await.unwrap_or_default()).into_response();
        }
        let value: Value = answer.json().await.unwrap_or(Value::Null);
        upstream_items = value["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter();
    }
    let items: Vec<Value> = answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| upstream_items.next().unwrap_or(Value::Null)))
        .collect();
    let errors = items
        .iter()
        .any(|i| i["create"]["status"].as_u64().is_some_and(|s| s >= 300));
    axum::Json(json!({"took": 1, "errors": errors, "items": items})).into_response()
}
