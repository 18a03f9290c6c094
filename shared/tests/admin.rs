//! The admin server every service runs: live, ready only while its checks pass, and metrics.

use herald_shared::admin::{self, Readiness};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn health_ready_and_metrics_answer() {
    let shutdown = CancellationToken::new();
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = ready.clone();
    let readiness = Readiness::new().check("database", move || {
        let up = flag.load(std::sync::atomic::Ordering::SeqCst);
        async move {
            if up {
                Ok(())
            } else {
                Err("refused".to_owned())
            }
        }
    });
    let (address, server) = admin::serve(([127, 0, 0, 1], 0).into(), readiness, shutdown.clone())
        .await
        .expect("admin server");
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("http://{address}{path}")).send();

    assert_eq!(get("/health").await.expect("health").status(), 200);
    let not_ready = get("/ready").await.expect("ready");
    assert_eq!(not_ready.status(), 503);
    assert!(
        not_ready
            .text()
            .await
            .expect("body")
            .contains("database: refused")
    );

    ready.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(get("/ready").await.expect("ready").status(), 200);

    metrics::counter!("herald_admin_test_total").increment(3);
    let page = get("/metrics")
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(page.contains("herald_admin_test_total 3"), "{page}");

    shutdown.cancel();
    server.await.expect("admin server stops on shutdown");
}
