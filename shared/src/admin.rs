//! The admin HTTP server every service runs: `/health` (the process is alive), `/ready` (it can
//! reach its dependencies; 503 naming the ones it cannot) and `/metrics` (Prometheus text, every
//! metric named `herald_*`).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use futures::future::BoxFuture;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::nats::Nats;

type Check = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// Named readiness checks; `/ready` is 200 only when all pass.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Vec<(&'static str, Check)>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn check<F, Fut>(mut self, name: &'static str, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.checks.push((
            name,
            Arc::new(move || Box::pin(check()) as BoxFuture<'static, _>),
        ));
        self
    }

    /// Ready while the NATS connection is up.
    pub fn nats(self, nats: &Nats) -> Self {
        let nats = nats.clone();
        self.check("nats", move || {
            let connected = nats.is_connected();
            async move {
                if connected {
                    Ok(())
                } else {
                    Err("not connected".to_owned())
                }
            }
        })
    }

    /// Every failing check as `name: reason`.
    pub async fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        for (name, check) in &self.checks {
            if let Err(reason) = check().await {
                failures.push(format!("{name}: {reason}"));
            }
        }
        failures
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        // Real histograms (not the exporter's default summaries) so latencies aggregate across
        // replicas in Prometheus.
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .map(|builder| builder.build_recorder())
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        // Another recorder may already be global (a test process running several services);
        // metrics then go there and this handle renders an empty page, which is harmless.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Binds the admin server and serves until `shutdown`. Returns the bound address (useful with
/// port 0) and the server task.
pub async fn serve(
    listen: SocketAddr,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    metrics_handle();
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .with_state(Arc::new(readiness));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let address = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    tracing::info!(%address, "admin server listening");
    Ok((address, task))
}

async fn ready(State(readiness): State<Arc<Readiness>>) -> impl IntoResponse {
    let failures = readiness.failures().await;
    if failures.is_empty() {
        (StatusCode::OK, "ready".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, failures.join("\n"))
    }
}

async fn render_metrics() -> impl IntoResponse {
    let handle = metrics_handle();
    handle.run_upkeep();
    (
        [("content-type", "text/plain; version=0.0.4")],
        handle.render(),
    )
}
