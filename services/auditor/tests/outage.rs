//! The promise under failure: a cluster outage of 30 s loses nothing and acks nothing while it
//! lasts (`/ready` says so), and indexing resumes by itself; an auditor killed with SIGKILL in
//! the middle of a bulk loses nothing and duplicates nothing once it runs again.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::faulty::{BulkFault, FaultyCluster};
use common::{Backend, Stack, TOKEN, event};
use herald_auditor::Kind;
use herald_shared::Op;
use herald_test_support::{OpenSearchServer, eventually_async};
use serde_json::{Value, json};

const OUTAGE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_outage_of_thirty_seconds_loses_nothing() {
    let mut stack = Stack::start(Backend::Osmem).await;
    let before = event("Order", Op::Insert, "0", json!({"id": 0}));
    stack.publish_event(&before).await;
    stack.search_until(&[("type", "event")], 1).await;
    eventually_async("ready", common::WAIT, || async {
        stack.not_ready().await.is_empty().then_some(())
    })
    .await;

    stack.osmem.as_mut().expect("osmem").kill();
    let during: Vec<_> = (1..=20)
        .map(|k| event("Order", Op::Update, &k.to_string(), json!({"id": k})))
        .collect();
    for e in &during {
        stack.publish_event(e).await;
    }
    let failing = eventually_async("/ready to name the cluster", common::WAIT, || async {
        let failures = stack.not_ready().await;
        failures
            .iter()
            .any(|f| f.starts_with("cluster:"))
            .then_some(failures)
    })
    .await;
    assert!(!failing.is_empty());
    // Throughout the outage, every message published during it is still unacked.
    let started = Instant::now();
    while started.elapsed() < OUTAGE {
        assert_eq!(
            stack.backlog(Kind::Event).await,
            20,
            "acked while the cluster was down"
        );
        assert!(
            !stack.not_ready().await.is_empty(),
            "ready while the cluster was down"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // It comes back empty (in memory), as a rebuilt cluster would: the templates are installed
    // again and every message of the outage is indexed, once.
    stack.osmem.as_mut().expect("osmem").restart();
    stack
        .search_until(&[("type", "event"), ("size", "100")], 20)
        .await;
    stack.settled().await;
    assert_eq!(stack.count(Kind::Event).await, 20);
    eventually_async("ready again", common::WAIT, || async {
        stack.not_ready().await.is_empty().then_some(())
    })
    .await;
    let mapping: Value = stack
        .http
        .get(format!("{}/herald-events-*/_mapping", stack.storage_url()))
        .send()
        .await
        .expect("mapping")
        .json()
        .await
        .expect("json");
    let strict = mapping
        .as_object()
        .expect("indices")
        .values()
        .all(|m| m["mappings"]["dynamic"] == "strict");
    assert!(strict, "templates were not installed again: {mapping}");
}

struct Binary {
    child: Child,
}

impl Binary {
    fn start(config: &std::path::Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_herald-auditor"))
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start herald-auditor");
        Self { child }
    }

    /// SIGKILL: no drain, no acks, no goodbye.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auditor_killed_mid_bulk_loses_and_duplicates_nothing() {
    let osmem = OpenSearchServer::start();
    let faults = FaultyCluster::start(osmem.url()).await;
    // The in-process auditor is stopped at once: the binary does the work here.
    let mut stack = Stack::start_on(Some(osmem), faults.url.clone(), "herald".into(), |_| {}).await;
    stack.stop_auditor().await;
    // The first bulks are held long enough to be killed in flight, then stored anyway: the
    // killed auditor never acks them, so they come back and meet their own documents.
    for _ in 0..3 {
        faults.next_bulk(BulkFault::Stall(Duration::from_secs(3)));
    }
    let events: Vec<_> = (0..300)
        .map(|k| event("Order", Op::Insert, &k.to_string(), json!({"id": k})))
        .collect();
    for e in &events {
        stack.publish_event(e).await;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("auditor.toml");
    std::fs::write(
        &config,
        format!(
            "[nats]\nurl = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[telemetry]\nlog_level = \"warn\"\n\
             [service]\ncluster_url = \"{}\"\napi_token = \"{TOKEN}\"\nrequest_timeout = \"5s\"\n\
             ack_wait = \"6s\"\nretry_max_delay = \"500ms\"\nbulk_max_docs = 50\n",
            stack.nats.url(),
            faults.url
        ),
    )
    .expect("config");

    let mut first = Binary::start(&config);
    eventually_async("a bulk in flight", common::WAIT, || async {
        (faults.bulk_requests() >= 1).then_some(())
    })
    .await;
    first.kill();
    let _second = Binary::start(&config);

    eventually_async(
        "all 300 events indexed",
        Duration::from_secs(60),
        || async { (stack.count(Kind::Event).await == 300).then_some(()) },
    )
    .await;
    stack.settled().await;
    assert_eq!(stack.count(Kind::Event).await, 300);
    let resent = events
        .iter()
        .filter(|e| faults.sent(&e.id.to_string()) > 1)
        .count();
    assert!(resent > 0, "the kill interrupted no bulk");
}
