//! `herald audit search` and `herald audit trail` against a running auditor (started in
//! process, indexing into an osmem-server), as tables and as JSON.

mod common;

use std::time::Duration;

use chrono::Utc;
use herald_auditor::{Auditor, AuditorSettings};
use herald_shared::{
    ActionOutcome, EntityEvent, Op, OutcomeStatus, SCHEMA_VERSION, headers, subjects,
};
use herald_test_support::{NatsServer, OpenSearchServer, eventually_async};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "cli-audit-test-token-0123";

async fn publish(js: &async_nats::jetstream::Context, subject: String, body: Vec<u8>, id: &str) {
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::MSG_ID, id);
    js.publish_with_headers(subject, h, body.into())
        .await
        .expect("publish")
        .await
        .expect("stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_and_trail_show_what_the_auditor_recorded() {
    let nats = NatsServer::start();
    let osmem = OpenSearchServer::start();
    let js = nats.jetstream().await;
    herald_shared::streams::ensure_all(&js, &Default::default())
        .await
        .expect("streams");
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let auditor = Auditor::start(
        js.clone(),
        AuditorSettings {
            cluster_url: osmem.url(),
            api_token: TOKEN.into(),
            bulk_max_wait: Duration::from_millis(20),
            ..AuditorSettings::default()
        },
        shutdown,
    )
    .await
    .expect("auditor");
    let api = format!("http://{}", auditor.api_address);

    let event = EntityEvent {
        id: uuid::Uuid::now_v7(),
        entity: "Order".into(),
        op: Op::Update,
        key: "1042".into(),
        data: Some(json!({"id": 1042, "status": "shipped"})),
        before: Some(json!({"id": 1042, "status": "paid"})),
        changed: Some(vec!["status".into()]),
        at: Utc::now(),
        actor: Some("ada".into()),
        tx: 1,
        schema_version: SCHEMA_VERSION,
    };
    publish(
        &js,
        subjects::event("Order", Op::Update).expect("subject"),
        serde_json::to_vec(&event).expect("encode"),
        &event.id.to_string(),
    )
    .await;
    let outcome = ActionOutcome {
        action_id: format!("{}:notify:0", event.id),
        event_id: event.id,
        kind: "webhook".into(),
        observer: "notify".into(),
        attempt: 1,
        status: OutcomeStatus::Succeeded,
        latency_ms: 12,
        error: None,
        http_status: Some(204),
        at: Utc::now(),
        schema_version: SCHEMA_VERSION,
    };
    publish(
        &js,
        subjects::outcome("webhook", "notify").expect("subject"),
        serde_json::to_vec(&outcome).expect("encode"),
        &outcome.msg_id(),
    )
    .await;

    let audit = |args: &[&str]| {
        let mut all = vec!["audit", "--audit-url", &api, "--token", TOKEN];
        all.extend_from_slice(args);
        all.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let event_id = event.id.to_string();
    let trail_args = audit(&["trail", &event_id]);
    let trail = eventually_async("the trail in the table", Duration::from_secs(30), || {
        let args = trail_args.clone();
        let url = nats.url();
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let output = common::run(&url, &refs).await;
            let text = String::from_utf8_lossy(&output.stdout).into_owned();
            let both = text.contains("Order 1042") && text.contains("webhook notify attempt 1");
            (output.status.success() && both).then_some(text)
        }
    })
    .await;
    let lines: Vec<&str> = trail.lines().collect();
    assert!(lines[0].starts_with("AT"), "{trail}");
    assert!(
        lines[1].contains("Order 1042 update (status) by ada"),
        "{trail}"
    );
    assert!(
        lines[2].contains("webhook notify attempt 1: succeeded (HTTP 204, 12 ms)"),
        "{trail}"
    );

    let search_args = audit(&["search", "--entity", "Order", "--json"]);
    let refs: Vec<&str> = search_args.iter().map(String::as_str).collect();
    let json_line = common::succeed(&nats.url(), &refs).await;
    let answer: Value = serde_json::from_str(json_line.trim()).expect("one JSON object");
    assert_eq!(answer["hits"][0]["id"], event_id);
    assert_eq!(answer["next_cursor"], Value::Null);

    let bad = audit(&["search", "--size", "9000"]);
    let refs: Vec<&str> = bad.iter().map(String::as_str).collect();
    let stderr = common::fail(&nats.url(), &refs).await;
    assert!(stderr.contains("the auditor answered 400"), "{stderr}");
    assert!(stderr.contains("`size`"), "{stderr}");

    let wrong = [
        "audit",
        "--audit-url",
        &api,
        "--token",
        "wrong",
        "trail",
        &event_id,
    ];
    let stderr = common::fail(&nats.url(), &wrong).await;
    assert!(stderr.contains("401"), "{stderr}");
}
