//! The dispatcher: reads entity events from HERALD_EVENTS, matches them against the observers
//! file and publishes one ActionRequest per matching observer action to HERALD_ACTIONS, acking
//! an event only once all its requests are stored.
//!
//! `run` is the whole service: HERALD_EVENTS is split into partitions by key, and the
//! processes sharing a name share the partitions, each served by one process at a time through
//! a lease (`partition`, `lease`). On shutdown a process finishes what is in flight, saves its
//! partitions' checkpoints and hands their leases over.

pub mod backfill;
pub mod checkpoint;
pub mod condition;
pub mod dispatch;
pub mod lease;
pub mod observers;
pub mod order;
pub mod partition;
pub mod settings;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_nats::jetstream;
use herald_shared::retry;
use herald_shared::streams::{self, StreamSpec};
use herald_shared::subjects::EVENTS_STREAM;
use tokio_util::sync::CancellationToken;

pub use dispatch::Dispatcher;
pub use observers::{ObserverSet, Observers};
pub use settings::DispatcherSettings;

/// The streams the dispatcher reads from or writes to.
pub const STREAMS: [StreamSpec; 3] = [streams::EVENTS, streams::ACTIONS, streams::DLQ];

/// What a run did, reported when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Events taken from the stream (redeliveries included).
    pub events: u64,
}

/// Runs the dispatcher until `shutdown`, reporting partitions whose dispatch died to `health`
/// (`/ready`). The partition count and the replicas of the lease and
/// checkpoint buckets come from HERALD_EVENTS itself, so they never disagree with the stream.
pub async fn run(
    js: jetstream::Context,
    settings: DispatcherSettings,
    observers: Arc<Observers>,
    health: Arc<partition::Health>,
    shutdown: CancellationToken,
) -> Summary {
    let config = retry::until_ok("the events stream", &shutdown, || async {
        let mut stream = js
            .get_stream(EVENTS_STREAM)
            .await
            .map_err(|e| e.to_string())?;
        let info = stream.info().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(info.config.clone())
    })
    .await;
    let Some(config) = config else {
        return Summary { events: 0 };
    };
    let count = streams::event_partitions(&config);
    let dispatcher = Arc::new(Dispatcher::new(js, settings, observers));
    partition::serve(Arc::clone(&dispatcher), count, health, shutdown).await;
    Summary {
        events: dispatcher.events.load(Ordering::Relaxed),
    }
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
