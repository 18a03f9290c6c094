//! Supervision of the gateway's background tasks: a task that panics or returns before shutdown
//! is logged, marks itself not alive (so `/ready` fails while it is down) and is started again
//! after a pause. Without this a dead relay left every later change in the outbox while the
//! gateway still answered GraphQL and reported ready.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Whether a supervised task is running, shared with the readiness check.
#[derive(Debug, Default)]
pub struct TaskHealth {
    alive: AtomicBool,
    restarts: AtomicU64,
}

impl TaskHealth {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// How many times the task died and was started again.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::SeqCst)
    }
}

/// Runs `make()` until `shutdown`, starting it again `pause` after each death.
pub fn spawn<F, Fut>(
    name: &'static str,
    health: Arc<TaskHealth>,
    pause: Duration,
    shutdown: CancellationToken,
    make: F,
) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            health.alive.store(true, Ordering::SeqCst);
            let ended = tokio::spawn(make()).await;
            if shutdown.is_cancelled() {
                return;
            }
            health.alive.store(false, Ordering::SeqCst);
            health.restarts.fetch_add(1, Ordering::SeqCst);
            metrics::counter!("herald_gateway_task_restarts_total", "task" => name).increment(1);
            match ended {
                Err(e) => tracing::error!(task = name, error = %e, "task died; restarting"),
                Ok(()) => tracing::error!(task = name, "task ended before shutdown; restarting"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[tokio::test]
    async fn a_task_that_panics_is_reported_dead_then_restarted() {
        let health = TaskHealth::new();
        let runs = Arc::new(AtomicU32::new(0));
        let shutdown = CancellationToken::new();
        let task = {
            let runs = runs.clone();
            let stop = shutdown.clone();
            spawn(
                "test",
                health.clone(),
                Duration::from_secs(2),
                shutdown.clone(),
                move || {
                    let first = runs.fetch_add(1, Ordering::SeqCst) == 0;
                    let stop = stop.clone();
                    async move {
                        assert!(!first, "a poison value");
                        stop.cancelled().await;
                    }
                },
            )
        };
        until(|| runs.load(Ordering::SeqCst) == 1 && health.restarts() == 1).await;
        assert!(!health.is_alive(), "a dead task must not count as alive");
        until(|| runs.load(Ordering::SeqCst) == 2 && health.is_alive()).await;
        assert_eq!(health.restarts(), 1);
        shutdown.cancel();
        task.await.expect("supervisor stops");
    }

    async fn until(done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not reached"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
