//! Herald's action worker: runs the actions observers emit (`herald.actions.<kind>.<observer>`)
//! exactly once in effect — deduplicated through Redis leases, retried with backoff on transient
//! failures, held back by per-host circuit breakers, guarded against SSRF — and reports every
//! attempt on `herald.outcomes.<kind>.<observer>`; what cannot succeed goes to
//! `herald.dlq.actions` with its reason.
//!
//! Where each guarantee lives: `worker.rs` (consumer, ordering of outcome → done → ack, attempt
//! counting, pausing while Redis is down), `dedup.rs` (leases), `breaker.rs`, `ssrf.rs`,
//! `error.rs` + `http.rs` (classification, `Retry-After`), `pace.rs` (per-destination share of
//! slots), and one file per kind, each documenting its typed `config`. Acks, NAKs, outcomes and
//! dead letters are settled by the shared `herald_shared::consume::Settler`.
//!
//! Metrics: `herald_actions_executed_total{kind}`, `herald_actions_succeeded_total{kind}`,
//! `herald_actions_failed_total{kind,class}` (class = transient | permanent),
//! `herald_actions_dedup_hits_total{kind}`, `herald_action_duration_seconds{kind}` (histogram),
//! `herald_action_breaker_state{host}` (0 closed, 1 half-open, 2 open),
//! `herald_actions_in_flight`, plus the shared `herald_dead_letters_total{source}`,
//! `herald_settled_total{service,disposition}` and `herald_publications_dropped_total`.

pub mod breaker;
pub mod ca;
pub mod dedup;
pub mod email;
pub mod error;
pub mod http;
pub mod job;
pub mod kind;
pub mod pace;
pub mod settings;
pub mod slack;
pub mod ssrf;
pub mod template;
pub mod webhook;
pub mod worker;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

pub use settings::Settings;

use crate::dedup::Dedup;
use crate::kind::Registry;
use crate::ssrf::SsrfGuard;
use crate::worker::{Worker, WorkerError};

/// The streams this service touches, for `herald_shared::service::connect`.
pub const STREAMS: [herald_shared::streams::StreamSpec; 4] = [
    herald_shared::streams::ACTIONS,
    herald_shared::streams::OUTCOMES,
    herald_shared::streams::JOBS,
    herald_shared::streams::DLQ,
];

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("Redis: {0}")]
    Redis(#[from] dedup::DedupError),
    #[error("SSRF allow list: {0}")]
    Ssrf(#[from] ssrf::BadAllowEntry),
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    #[error("SMTP transport: {0}")]
    Smtp(#[from] lettre::transport::smtp::Error),
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

/// The built-in kinds, configured from the settings.
pub fn registry(settings: &Settings, jetstream: &jetstream::Context) -> Result<Registry, RunError> {
    let roots = ca::ExtraRoots::from_setting(settings.ca_file.as_deref())?;
    let http = http::Http::new(SsrfGuard::new(&settings.ssrf_allow)?, roots.as_ref())?;
    Ok(Registry::default()
        .with(webhook::Webhook::new(
            http.clone(),
            settings.webhook_secrets.clone(),
        ))
        .with(slack::Slack::new(http))
        .with(email::Email::new(settings.smtp.clone(), roots.as_ref())?)
        .with(job::Job::new(jetstream.clone())))
}

/// The Redis dedup client the worker uses; also what `/ready` pings.
pub fn dedup(settings: &Settings) -> Result<Dedup, RunError> {
    Ok(Dedup::new(
        &settings.redis_url,
        settings.dedup.clone(),
        &settings.worker_name(),
    )?)
}

/// Runs the worker until `shutdown`, then lets the actions in flight finish.
pub async fn run(
    jetstream: jetstream::Context,
    settings: Settings,
    dedup: Dedup,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let registry = registry(&settings, &jetstream)?;
    Worker::new(jetstream, registry, dedup, settings, shutdown)
        .run()
        .await?;
    Ok(())
}
