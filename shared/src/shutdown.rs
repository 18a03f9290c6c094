//! Graceful shutdown. SIGTERM or SIGINT cancels one token; every loop of a service watches it,
//! stops pulling new work, finishes (and acks) what it holds, and returns.

use tokio_util::sync::CancellationToken;

/// A token cancelled by the first SIGTERM or SIGINT.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; draining");
        cancel.cancel();
    });
    token
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers, Ctrl-C is still worth honouring.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
