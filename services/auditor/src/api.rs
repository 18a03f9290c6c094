//! The search API, over HTTP with a bearer token:
//!
//! - `GET /v1/search?q=&entity=&op=&key=&actor=&observer=&kind=&status=&type=&event_id=&queue=
//!   &since=&until=&size=&cursor=`: documents of every kind, newest first, a page at a time;
//!   `next_cursor` (null on the last page) fetches the next.
//! - `GET /v1/trail/{event_id}`: the event, then everything that carries its id (every outcome
//!   attempt, every job state change, every dead letter), oldest first.
//!
//! Bad parameters get a 400 naming them. The cluster's own error text stays in the logs: a
//! caller sees only that the index is unavailable (503), or that `q` does not parse (400).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cluster::{Cluster, ClusterError};
use crate::document::all_patterns;
use crate::query::{Cursor, ParamError, Search, trail_body};

/// The most documents one trail returns; past it, `truncated` is true.
pub const TRAIL_LIMIT: usize = 10_000;
const TRAIL_PAGE: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(#[from] ParamError),
    #[error(
        "`q` is not a valid query string (Lucene syntax: words, \"phrases\", field:value, AND, OR, NOT)"
    )]
    BadQuery,
    #[error("`{0}` is not an event id (a UUID)")]
    BadEventId(String),
    #[error("a bearer token is required (Authorization: Bearer <token>)")]
    Unauthorized,
    #[error("no audit record of event {0}")]
    NotFound(String),
    #[error("the audit index is unavailable; try again shortly")]
    Unavailable,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) | ApiError::BadQuery | ApiError::BadEventId(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        };
        let mut response = (status, axum::Json(json!({"error": self.to_string()}))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

struct Api {
    cluster: Arc<Cluster>,
    token: String,
}

/// Binds the API and serves until `shutdown`; returns the bound address and the server task.
pub async fn serve(
    listen: SocketAddr,
    cluster: Arc<Cluster>,
    token: String,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let api = Arc::new(Api { cluster, token });
    let app = Router::new()
        .route("/v1/search", get(search))
        .route("/v1/trail/{event_id}", get(trail))
        .layer(middleware::from_fn_with_state(Arc::clone(&api), authorize))
        .with_state(api);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let address = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "search API failed");
        }
    });
    tracing::info!(%address, "search API listening");
    Ok((address, task))
}

async fn authorize(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(token) if same(token.as_bytes(), api.token.as_bytes()) => next.run(request).await,
        _ => ApiError::Unauthorized.into_response(),
    }
}

/// Compares in time that does not depend on where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn cluster_error(e: ClusterError) -> ApiError {
    match e {
        ClusterError::Status { status: 400, .. } => {
            tracing::info!(error = %e, "a search the cluster refused");
            ApiError::BadQuery
        }
        e => {
            tracing::warn!(error = %e, "search failed");
            ApiError::Unavailable
        }
    }
}

async fn search(
    State(api): State<Arc<Api>>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<axum::Json<Value>, ApiError> {
    let search = Search::parse(&pairs)?;
    let answer = api
        .cluster
        .search(&all_patterns(api.cluster.prefix()), search.body())
        .await
        .map_err(cluster_error)?;
    let raw = hits(&answer);
    let next_cursor = match raw.last() {
        Some(last) if raw.len() == search.size => Cursor::after(last).map(|c| c.encode()),
        _ => None,
    };
    let documents: Vec<Value> = raw.iter().map(source).collect();
    Ok(axum::Json(
        json!({"hits": documents, "next_cursor": next_cursor}),
    ))
}

async fn trail(
    State(api): State<Arc<Api>>,
    Path(event_id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let id = uuid::Uuid::parse_str(&event_id)
        .map_err(|_| ApiError::BadEventId(event_id.clone()))?
        .to_string();
    let indices = all_patterns(api.cluster.prefix());
    let mut event = Value::Null;
    let mut items = Vec::new();
    let mut after = None;
    let mut truncated = false;
    loop {
        let answer = api
            .cluster
            .search(&indices, trail_body(&id, TRAIL_PAGE, after.as_ref()))
            .await
            .map_err(cluster_error)?;
        let page = hits(&answer);
        for hit in &page {
            let document = source(hit);
            if document["type"] == "event" && event.is_null() {
                event = document;
            } else {
                items.push(document);
            }
        }
        if page.len() < TRAIL_PAGE {
            break;
        }
        if items.len() >= TRAIL_LIMIT {
            truncated = true;
            break;
        }
        after = page.last().and_then(Cursor::after);
        if after.is_none() {
            break;
        }
    }
    if event.is_null() && items.is_empty() {
        return Err(ApiError::NotFound(id));
    }
    Ok(axum::Json(json!({
        "event_id": id,
        "event": event,
        "items": items,
        "truncated": truncated,
    })))
}

fn hits(answer: &Value) -> Vec<Value> {
    answer
        .pointer("/hits/hits")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// A hit as callers see it: the stored document, without the derived full-text field.
fn source(hit: &Value) -> Value {
    let mut document = hit.get("_source").cloned().unwrap_or(Value::Null);
    if let Some(map) = document.as_object_mut() {
        map.remove("text");
    }
    document
}
