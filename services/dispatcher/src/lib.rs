//! The dispatcher: reads entity events from HERALD_EVENTS, matches them against the observers
//! file and publishes one ActionRequest per matching observer action to HERALD_ACTIONS, acking
//! an event only once all its requests are stored.
//!
//! `run` is the whole service: it waits for the leader lease (replicas are active/standby, see
//! `lease`), dispatches while it holds it, and on shutdown finishes what is in flight, saves the
//! checkpoint and hands the lease over.

pub mod backfill;
pub mod checkpoint;
pub mod condition;
pub mod dispatch;
pub mod lease;
pub mod observers;
pub mod settings;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_nats::jetstream;
use herald_shared::streams::{self, StreamSpec};
use tokio_util::sync::CancellationToken;

pub use dispatch::Dispatcher;
pub use observers::{ObserverSet, Observers};
pub use settings::DispatcherSettings;

/// The streams the dispatcher reads from or writes to.
pub const STREAMS: [StreamSpec; 3] = [streams::EVENTS, streams::ACTIONS, streams::DLQ];

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Lease(#[from] lease::LeaseError),
}

/// What a run did, reported when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Events taken from the stream (redeliveries included).
    pub events: u64,
}

/// Runs the dispatcher until `shutdown`.
pub async fn run(
    js: jetstream::Context,
    settings: DispatcherSettings,
    observers: Arc<Observers>,
    shutdown: CancellationToken,
) -> Result<Summary, RunError> {
    let dispatcher = Arc::new(Dispatcher::new(js, settings, observers));
    let settings = &dispatcher.settings;
    // Each turn holds the lease once: until shutdown (then it is released at once for a
    // standby) or until it is lost (then this replica stands by again).
    while let Some(lease) = lease::acquire(
        &dispatcher.js,
        &settings.name,
        settings.lease_ttl,
        &shutdown,
    )
    .await?
    {
        let stop = shutdown.child_token();
        let holder = tokio::spawn(lease.hold(stop.clone()));
        while !stop.is_cancelled() {
            if let Err(e) = dispatcher.consume(&stop).await {
                tracing::warn!(error = %e, "dispatch interrupted; binding to the consumer again");
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(settings.retry_delay) => {}
                }
            }
        }
        match holder.await {
            Ok(lease) if shutdown.is_cancelled() => {
                lease.release().await;
                break;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "lease holder ended abnormally"),
        }
        if shutdown.is_cancelled() {
            break;
        }
    }
    Ok(Summary {
        events: dispatcher.events.load(Ordering::Relaxed),
    })
}

/// Reloads the observers file on every SIGHUP until `shutdown`. A bad file is logged, problem by
/// problem, and the set in force stays.
pub fn reload_on_hangup(
    observers: Arc<Observers>,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                received = hangups.recv() => if received.is_none() { return },
            }
            match observers.reload() {
                Ok(count) => tracing::info!(observers = count, "observers file reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "observers file refused; keeping the current observers")
                }
            }
        }
    }))
}
