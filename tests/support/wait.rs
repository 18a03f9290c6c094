//! Polling with a deadline: tests wait for an effect, never for a fixed time.

use std::future::Future;
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(25);

/// Polls `probe` until it returns `Some`, panicking with `what` after `timeout`.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    eventually_async(what, timeout, || std::future::ready(probe())).await
}

/// Like `eventually`, for an async probe.
pub async fn eventually_async<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}
