//! The periodic pass over every queue: jobs whose lease expired go back to pending (their worker
//! died or stalled), retries whose delay is over are promoted to pending, and queue depth per
//! state is measured. Each pass over a queue is one Lua script (queue.rs), so several instances
//! reaping at once cannot move a job twice.

use std::sync::Arc;
use std::time::Duration;

use herald_shared::JobState;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::pool::Pool;
use crate::queue::Queue;

/// Jobs moved per queue per pass; the rest wait for the next pass.
const PER_PASS: usize = 1000;

pub async fn run(
    queue: Queue,
    pool: Pool,
    outbox: Arc<Notify>,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        let queues = match queue.queues().await {
            Ok(queues) => queues,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list job queues");
                continue;
            }
        };
        for name in queues {
            match queue.tick(&name, PER_PASS).await {
                Ok(tick) => {
                    if tick.reaped > 0 {
                        tracing::warn!(queue = %name, reaped = tick.reaped, dead = tick.dead,
                            "re-queued jobs whose lease expired");
                    }
                    if tick.reaped + tick.promoted > 0 {
                        outbox.notify_one();
                    }
                    for (state, depth) in &tick.depth {
                        metrics::gauge!("herald_jobs_queue_depth",
                            "queue" => name.clone(), "state" => state.as_str())
                        .set(*depth as f64);
                    }
                    let pending = tick
                        .depth
                        .iter()
                        .any(|(state, depth)| *state == JobState::Pending && *depth > 0);
                    if pending {
                        pool.wake(&name);
                    }
                }
                Err(e) => tracing::warn!(queue = %name, error = %e, "queue maintenance failed"),
            }
        }
    }
}
