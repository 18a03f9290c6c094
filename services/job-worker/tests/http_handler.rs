//! The built-in `http` handler against a local receiver: 2xx succeeds with the answer as result,
//! 5xx/408/429 are worth a retry, other 4xx and bad payloads are permanent, and the job id goes
//! along as `Idempotency-Key`.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use chrono::Utc;
use herald_job_worker::handler::http::HttpHandler;
use herald_job_worker::{HandlerError, JobHandler};
use herald_shared::{JobRequest, RetryPolicy, SCHEMA_VERSION, headers};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

async fn receiver(keys: Arc<Mutex<Vec<String>>>) -> String {
    let app = Router::new().route(
        "/status/{code}",
        post(move |Path(code): Path<u16>, request_headers: HeaderMap| {
            let keys = keys.clone();
            async move {
                if let Some(key) = request_headers.get(headers::IDEMPOTENCY_KEY) {
                    keys.lock()
                        .expect("keys lock")
                        .push(key.to_str().unwrap_or_default().to_owned());
                }
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT);
                (status, axum::Json(json!({ "answered": code })))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind receiver");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}")
}

fn job(payload: Value) -> JobRequest {
    JobRequest {
        id: "job-7".into(),
        queue: "default".into(),
        job_type: "http".into(),
        payload,
        priority: 0,
        retry: RetryPolicy::default(),
        timeout_ms: 5_000,
        action_id: None,
        submitted_at: Utc::now(),
        schema_version: SCHEMA_VERSION,
    }
}

#[tokio::test]
async fn the_http_handler_classifies_answers_and_sends_the_job_id_as_idempotency_key() {
    let keys = Arc::new(Mutex::new(Vec::new()));
    let base = receiver(keys.clone()).await;
    let handler = HttpHandler::new();
    let run = |code: u16| {
        let request = job(json!({ "url": format!("{base}/status/{code}"), "body": {"a": 1} }));
        let handler = &handler;
        async move { handler.run(&request, CancellationToken::new()).await }
    };

    assert_eq!(
        run(200).await,
        Ok(json!({ "status": 200, "body": { "answered": 200 } }))
    );
    for transient in [500, 503, 408, 429] {
        assert!(
            matches!(run(transient).await, Err(HandlerError::Transient(_))),
            "{transient} should be retried"
        );
    }
    for permanent in [400, 404, 410] {
        assert!(
            matches!(run(permanent).await, Err(HandlerError::Permanent(_))),
            "{permanent} should be permanent"
        );
    }
    assert!(keys.lock().expect("keys lock").iter().all(|k| k == "job-7"));
    assert_eq!(keys.lock().expect("keys lock").len(), 8);

    let bad = job(json!({ "nope": true }));
    assert!(matches!(
        handler.run(&bad, CancellationToken::new()).await,
        Err(HandlerError::Permanent(_))
    ));
    let unreachable = job(json!({ "url": "http://127.0.0.1:9/x" }));
    assert!(matches!(
        handler.run(&unreachable, CancellationToken::new()).await,
        Err(HandlerError::Transient(_))
    ));
}
