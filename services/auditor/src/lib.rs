//! The auditor: Herald's compliance record. Every entity event, action outcome, job state change
//! and dead letter is indexed into Elasticsearch or OpenSearch, and a search API answers "what
//! happened to order 1042 last Tuesday?" with the event, every attempt at every action it
//! caused, the jobs it started and whatever was dead-lettered, in one query.
//!
//! # Layout
//! - `indexer`: one task per kind (`document::Kind`), each on its own durable pull consumer:
//!   `<prefix>-events` on `herald.events.>`, `-outcomes` on `herald.outcomes.>`, `-jobs` on
//!   `herald.jobs.status.>`, `-dlq` on `herald.dlq.>`. Messages go to the cluster in bulks
//!   (`bulk`), every item's answer is judged (`classify`) and turned into an ack, a delayed
//!   NAK or a dead letter by the shared `herald_shared::consume::Settler`, a whole bulk at a time
//!   (`Settler::settle_all`).
//! - `kinds::*`: how each kind of message becomes a document; `document`: the fields they share
//!   and the monthly index names; `cluster`: the client, the distribution (Elasticsearch or
//!   OpenSearch) and the strict index templates.
//! - `health`: a watchdog pinging the cluster, re-installing templates after an outage, and
//!   the `/ready` checks; `retention`: deletes monthly indices past their age.
//! - `api` and `query`: `GET /v1/search` and `GET /v1/trail/{event_id}`, bearer-token only.
//!
//! # Metrics
//! `herald_auditor_indexed_total{kind}`, `_duplicates_total{kind}`, `_failed_items_total{kind}`,
//! `_refused_total{kind}`, `_lag{kind}`, `_bulk_seconds{kind}` (kind = the document kind), and,
//! counted from what is stored, so every worker's messages show, custom workers' included:
//! `herald_auditor_outcomes_total{kind,status}` (action kind) and
//! `herald_auditor_dead_letters_total{source,kind,by}` (`by` = `Herald-Dead-Lettered-By`).

pub mod api;
pub mod bulk;
pub mod classify;
pub mod cluster;
pub mod document;
pub mod health;
pub mod indexer;
pub mod kinds;
pub mod query;
pub mod retention;
pub mod settings;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use herald_shared::admin::Readiness;
use herald_shared::streams::{self, StreamSpec};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use cluster::{Cluster, ClusterError, Flavor};
pub use document::Kind;
pub use settings::AuditorSettings;

/// The streams the auditor reads from (and, for refused documents, dead-letters to).
pub const STREAMS: [StreamSpec; 4] = [
    streams::EVENTS,
    streams::OUTCOMES,
    streams::JOBS,
    streams::DLQ,
];

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("cannot bind the search API: {0}")]
    Api(#[from] std::io::Error),
}

/// A running auditor: its tasks, the search API's address and its readiness checks.
pub struct Auditor {
    pub api_address: SocketAddr,
    pub cluster: Arc<Cluster>,
    /// `cluster` and `indexers`; the binary adds `nats`.
    pub readiness: Readiness,
    tasks: JoinSet<()>,
}

impl Auditor {
    /// Starts the indexers, the watchdog, retention and the search API; they run until
    /// `shutdown`. The cluster need not be up: indexing waits for it.
    pub async fn start(
        js: jetstream::Context,
        settings: AuditorSettings,
        shutdown: CancellationToken,
    ) -> Result<Self, StartError> {
        let settings = Arc::new(settings);
        let cluster = Arc::new(Cluster::new(&settings)?);
        let health = Arc::new(health::Health::default());
        let mut tasks = JoinSet::new();
        {
            let (health, cluster, stop) =
                (Arc::clone(&health), Arc::clone(&cluster), shutdown.clone());
            tasks.spawn(async move { health.watch(&cluster, stop).await });
        }
        for kind in Kind::ALL {
            let indexer = indexer::Indexer::new(
                kind,
                js.clone(),
                Arc::clone(&cluster),
                Arc::clone(&settings),
                Arc::clone(&health),
            );
            tasks.spawn(indexer.run(shutdown.clone()));
        }
        tasks.spawn(report_lag(
            js,
            settings.consumer_prefix.clone(),
            shutdown.clone(),
        ));
        if !settings.retention.is_zero() {
            let (cluster, retention, stop) =
                (Arc::clone(&cluster), settings.retention, shutdown.clone());
            tasks.spawn(async move { retention::enforce(&cluster, retention, stop).await });
        }
        let (api_address, api) = api::serve(
            settings.api_listen,
            Arc::clone(&cluster),
            settings.api_token.clone(),
            shutdown.clone(),
        )
        .await?;
        tasks.spawn(async move {
            if let Err(e) = api.await {
                tracing::error!(error = %e, "search API task ended abnormally");
            }
        });
        Ok(Self {
            api_address,
            cluster,
            readiness: health.readiness(Readiness::new()),
            tasks,
        })
    }

    /// Waits for every task to finish (after shutdown, once in-flight bulks are settled).
    pub async fn wait(mut self) {
        while let Some(done) = self.tasks.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "an auditor task ended abnormally");
            }
        }
    }
}

/// How far each indexer is behind its stream: messages not yet delivered plus delivered but
/// not yet acked, every two seconds.
async fn report_lag(js: jetstream::Context, prefix: String, stop: CancellationToken) {
    loop {
        for kind in Kind::ALL {
            let (spec, _) = indexer::source(kind);
            let name = indexer::consumer_name(&prefix, kind);
            if let Ok(stream) = js.get_stream(spec.name).await
                && let Ok(info) = stream.consumer_info(&name).await
            {
                let lag = info.num_pending + info.num_ack_pending as u64;
                metrics::gauge!("herald_auditor_lag", "kind" => kind.as_str()).set(lag as f64);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
