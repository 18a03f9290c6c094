//! The job worker: takes job submissions from `herald.jobs.submit.<queue>`, keeps them in a Redis
//! queue that survives worker and Redis crashes (queue.rs explains how), runs them through
//! registered handlers with retries and backoff, publishes every state transition on
//! `herald.jobs.status.<queue>`, dead-letters what cannot succeed to `herald.dlq.jobs`, and
//! answers management requests on `herald.control.jobs.*`.
//!
//! Status events of one job, with their attempt numbers (Msg-Id `<job id>:<state>:<attempt>`):
//! `pending 0`, `running 1`, then `succeeded 1`, or `failed 1` → `pending 1` (retry due) →
//! `running 2` → ..., ending in `succeeded`, `dead` or `cancelled`. A job re-queued because its
//! worker died or shut down shows `pending n` right after `running n`. The attempt counts runs
//! started, so every event of a job has its own Msg-Id.
//!
//! `run` wires the parts together; tests start it in-process with their own handlers.

pub mod control;
pub mod handler;
pub mod intake;
pub mod outbox;
pub mod pool;
pub mod queue;
pub mod reaper;
pub mod settings;

use std::sync::Arc;

use herald_shared::nats::Nats;
use pool::Pool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use handler::{HandlerError, JobHandler, Registry};
pub use queue::{Queue, QueueError};
pub use settings::Settings;

/// The service name in logs, connection names and `Herald-Dead-Lettered-By`.
pub const SERVICE: &str = "job-worker";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Intake(#[from] intake::IntakeError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
}

/// Runs until `shutdown`, then stops taking submissions, drains the pool (finishing or releasing
/// running jobs) and publishes the last status events.
pub async fn run(
    settings: Settings,
    nats: Nats,
    queue: Queue,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let consumer = intake::consumer(&nats.jetstream, &settings.consumer).await?;
    let outbox_wake = Arc::new(Notify::new());
    let pool = Pool::new(
        queue.clone(),
        registry,
        settings.clone(),
        outbox_wake.clone(),
    );

    let outbox_stop = CancellationToken::new();
    let outbox = outbox::spawn(
        outbox::Outbox::new(
            queue.clone(),
            nats.jetstream.clone(),
            outbox_wake.clone(),
            settings.poll,
        ),
        outbox_stop.clone(),
    );
    let reaper = tokio::spawn(reaper::run(
        queue.clone(),
        pool.clone(),
        outbox_wake,
        settings.tick,
        shutdown.clone(),
    ));
    let control = tokio::spawn(control::run(
        nats.client.clone(),
        queue.clone(),
        shutdown.clone(),
    ));
    let intake = intake::Intake {
        jetstream: nats.jetstream.clone(),
        queue: queue.clone(),
        pool: pool.clone(),
    };
    // Jobs already in Redis (stored before a restart) start without waiting for a tick.
    if let Ok(queues) = queue.queues().await {
        for name in queues {
            pool.wake(&name);
        }
    }
    let intake_result = intake.run(consumer, shutdown.clone()).await;
    shutdown.cancel();

    pool.drain().await;
    outbox_stop.cancel();
    for (name, task) in [("outbox", outbox), ("reaper", reaper)] {
        if let Err(e) = task.await {
            tracing::error!(task = name, error = %e, "task panicked");
        }
    }
    match control.await {
        Ok(result) => result?,
        Err(e) => tracing::error!(error = %e, "control task panicked"),
    }
    intake_result?;
    Ok(())
}
