//! What reaches a receiver, and what happens when it refuses: signing, templates, the four
//! built-in kinds, retry timing, Retry-After and the DLQ.

mod common;

use std::time::Duration;

use base64::Engine;
use common::{App, Reply, Sink, action, header, retry};
use herald_shared::headers;
use herald_shared::messages::{JobRequest, OutcomeStatus};
use herald_shared::subjects::JOBS_STREAM;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

/// Standard Webhooks verification as the spec text describes it, written without the worker's
/// code: key = base64-decode(secret minus `whsec_`), content = `{id}.{timestamp}.{body}`,
/// signature = `v1,` + base64(HMAC-SHA256(key, content)).
fn verify(secret: &str, id: &str, timestamp: &str, body: &[u8], signature: &str) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(&secret["whsec_".len()..])
        .expect("secret is base64");
    let mut content = format!("{id}.{timestamp}.").into_bytes();
    content.extend_from_slice(body);
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("key");
    mac.update(&content);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    signature
        .split(' ')
        .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
}

#[tokio::test]
async fn a_webhook_is_signed_verifiably_and_carries_the_event_by_default() {
    let mut app = App::start().await;
    let sink = Sink::start(|_| Reply::status(200)).await;
    app.spawn_worker(app.settings());
    let request = action(
        "webhook",
        "orders",
        json!({"url": sink.url("/hook")}),
        retry(3, 50),
    );
    app.publish(&request).await;

    let got = sink.wait_for(1).await.remove(0);
    assert_eq!(
        got.header("webhook-id").as_deref(),
        Some(request.id.as_str())
    );
    let timestamp = got.header("webhook-timestamp").expect("timestamp");
    let age = chrono::Utc::now().timestamp() - timestamp.parse::<i64>().expect("unix seconds");
    assert!(
        (0..60).contains(&age),
        "timestamp {timestamp} is {age}s old"
    );
    let signature = got.header("webhook-signature").expect("signed");
    assert!(
        verify(
            common::SECRET,
            &request.id,
            &timestamp,
            &got.body,
            &signature
        ),
        "signature {signature} does not verify"
    );
    assert!(!verify(
        common::SECRET,
        &request.id,
        &timestamp,
        b"tampered",
        &signature
    ));
    let body: serde_json::Value = serde_json::from_slice(&got.body).expect("JSON body");
    assert_eq!(
        body,
        serde_json::to_value(&request.event).expect("event JSON")
    );

    let outcomes = app
        .wait_outcomes(&request.id, "a success outcome", |o| !o.is_empty())
        .await;
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].status, OutcomeStatus::Succeeded);
    assert_eq!(
        (outcomes[0].attempt, outcomes[0].http_status),
        (1, Some(200))
    );
}

#[tokio::test]
async fn a_webhook_uses_its_method_header_and_body_templates() {
    let mut app = App::start().await;
    let sink = Sink::start(|_| Reply::status(204)).await;
    app.spawn_worker(app.settings());
    let config = json!({
        "url": sink.url("/put"),
        "method": "put",
        "headers": {"x-order": "{{key}}"},
        "body": "{\"status\": \"{{data.status}}\"}"
    });
    let request = action("webhook", "unsigned_observer", config, retry(3, 50));
    app.publish(&request).await;
    let got = sink.wait_for(1).await.remove(0);
    assert_eq!(got.header("x-order").as_deref(), Some("42"));
    assert_eq!(&got.body[..], br#"{"status": "shipped"}"#);
    assert_eq!(
        got.header("webhook-signature"),
        None,
        "no secret, no signature"
    );
}

#[tokio::test]
async fn a_permanent_4xx_goes_straight_to_the_dlq_with_status_and_snippet() {
    let mut app = App::start().await;
    let sink = Sink::start(|_| Reply::status(404).body("no such hook here")).await;
    app.spawn_worker(app.settings());
    let request = action(
        "webhook",
        "orders",
        json!({"url": sink.url("/gone")}),
        retry(5, 50),
    );
    app.publish(&request).await;

    let letter = herald_test_support::eventually_async("a dead letter", common::WAIT, || async {
        app.dead_letters().await.pop()
    })
    .await;
    assert_eq!(
        header(&letter, headers::HTTP_STATUS).as_deref(),
        Some("404")
    );
    assert_eq!(header(&letter, headers::ATTEMPTS).as_deref(), Some("1"));
    assert!(header(&letter, headers::RESPONSE_SNIPPET).is_some_and(|s| s.contains("no such hook")));
    assert!(header(&letter, headers::ERROR).is_some_and(|e| e.contains("404")));
    assert_eq!(
        header(&letter, headers::ORIGINAL_SUBJECT).as_deref(),
        Some("herald.actions.webhook.orders")
    );
    assert_eq!(
        sink.received().len(),
        1,
        "a permanent failure is not retried"
    );
    let outcomes = app.outcomes(&request.id).await;
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].status, OutcomeStatus::DeadLettered);
    assert_eq!(outcomes[0].http_status, Some(404));
}

#[tokio::test]
async fn server_errors_are_retried_on_the_policy_then_dead_lettered_with_the_attempts() {
    let mut app = App::start().await;
    let sink = Sink::start(|_| Reply::status(503).body("down")).await;
    app.spawn_worker(app.settings());
    let request = action(
        "webhook",
        "orders",
        json!({"url": sink.url("/down")}),
        retry(3, 200),
    );
    app.publish(&request).await;

    let outcomes = app
        .wait_outcomes(&request.id, "three outcomes", |o| o.len() >= 3)
        .await;
    let mut seen: Vec<_> = outcomes.iter().map(|o| (o.attempt, o.status)).collect();
    seen.sort_by_key(|(a, _)| *a);
    assert_eq!(
        seen,
        [
            (1, OutcomeStatus::Retrying),
            (2, OutcomeStatus::Retrying),
            (3, OutcomeStatus::DeadLettered)
        ]
    );
    let letter = herald_test_support::eventually_async("a dead letter", common::WAIT, || async {
        app.dead_letters().await.pop()
    })
    .await;
    assert_eq!(header(&letter, headers::ATTEMPTS).as_deref(), Some("3"));
    assert_eq!(
        header(&letter, headers::HTTP_STATUS).as_deref(),
        Some("503")
    );
    let received = sink.received();
    assert_eq!(received.len(), 3);
    // Exponential, no jitter: at least 200ms, then at least 400ms between attempts.
    assert!(received[1].at - received[0].at >= Duration::from_millis(200));
    assert!(received[2].at - received[1].at >= Duration::from_millis(400));
}

#[tokio::test]
async fn retry_after_is_honoured_when_longer_than_the_backoff() {
    let mut app = App::start().await;
    let sink = Sink::start(|n| {
        if n == 0 {
            Reply::status(429).header("retry-after", "2")
        } else {
            Reply::status(200)
        }
    })
    .await;
    app.spawn_worker(app.settings());
    let request = action(
        "webhook",
        "orders",
        json!({"url": sink.url("/limited")}),
        retry(3, 50),
    );
    app.publish(&request).await;

    let received = sink.wait_for(2).await;
    assert!(
        received[1].at - received[0].at >= Duration::from_millis(1900),
        "retried after {:?}, Retry-After asked for 2s",
        received[1].at - received[0].at
    );
    let outcomes = app
        .wait_outcomes(&request.id, "success", |o| {
            o.iter().any(|o| o.status == OutcomeStatus::Succeeded)
        })
        .await;
    assert!(
        outcomes
            .iter()
            .any(|o| o.attempt == 1 && o.http_status == Some(429))
    );
    assert!(
        outcomes
            .iter()
            .any(|o| o.attempt == 2 && o.status == OutcomeStatus::Succeeded)
    );
}

#[tokio::test]
async fn a_slack_message_is_rendered_from_its_template() {
    let mut app = App::start().await;
    let sink = Sink::start(|_| Reply::status(200).body("ok")).await;
    app.spawn_worker(app.settings());
    let config = json!({"webhook_url": sink.url("/services/T/B/X"), "text": "{{entity}} {{key}} is {{data.status}}"});
    let request = action("slack", "shipping", config, retry(3, 50));
    app.publish(&request).await;
    let got = sink.wait_for(1).await.remove(0);
    let body: serde_json::Value = serde_json::from_slice(&got.body).expect("JSON");
    assert_eq!(body, json!({"text": "Order 42 is shipped"}));
}

#[tokio::test]
async fn a_job_action_submits_one_job_request_keyed_by_the_action_id() {
    let mut app = App::start().await;
    app.spawn_worker(app.settings());
    let config = json!({"queue": "reports", "job_type": "http", "priority": 3});
    let request = action("job", "reporting", config, retry(3, 50));
    app.publish(&request).await;
    app.wait_outcomes(&request.id, "success", |o| {
        o.iter().any(|o| o.status == OutcomeStatus::Succeeded)
    })
    .await;
    let jobs = common::all_messages(&app.jetstream, JOBS_STREAM).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].subject.as_str(), "herald.jobs.submit.reports");
    assert_eq!(
        header(&jobs[0], headers::MSG_ID).as_deref(),
        Some(request.id.as_str())
    );
    let job: JobRequest = herald_shared::messages::decode(&jobs[0].payload).expect("a JobRequest");
    assert_eq!(job.id, request.id);
    assert_eq!(job.action_id.as_deref(), Some(request.id.as_str()));
    assert_eq!((job.priority, job.job_type.as_str()), (3, "http"));
    assert_eq!(
        job.payload,
        serde_json::to_value(&request.event).expect("event")
    );
}

#[tokio::test]
async fn an_undecodable_action_is_dead_lettered_not_retried() {
    let mut app = App::start().await;
    app.spawn_worker(app.settings());
    app.jetstream
        .publish("herald.actions.webhook.broken", "{not json".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let letter = herald_test_support::eventually_async("a dead letter", common::WAIT, || async {
        app.dead_letters().await.pop()
    })
    .await;
    assert!(header(&letter, headers::ERROR).is_some_and(|e| e.contains("undecodable")));
    assert_eq!(&letter.payload[..], b"{not json");
}

#[tokio::test]
async fn a_bad_action_config_is_dead_lettered_with_the_reason() {
    let mut app = App::start().await;
    app.spawn_worker(app.settings());
    let request = action(
        "webhook",
        "orders",
        json!({"uri": "http://127.0.0.1:1/"}),
        retry(3, 50),
    );
    app.publish(&request).await;
    let letter = herald_test_support::eventually_async("a dead letter", common::WAIT, || async {
        app.dead_letters().await.pop()
    })
    .await;
    let error = header(&letter, headers::ERROR).expect("error");
    assert!(
        error.contains("invalid webhook action config") && error.contains("uri"),
        "{error}"
    );
}

#[tokio::test]
async fn an_action_whose_subject_contradicts_its_body_is_dead_lettered() {
    let mut app = App::start().await;
    let sink = Sink::start(|_| Reply::status(200)).await;
    app.spawn_worker(app.settings());
    let request = action(
        "webhook",
        "orders",
        json!({"url": sink.url("/x")}),
        retry(3, 50),
    );
    let body = serde_json::to_vec(&request).expect("serialise");
    app.jetstream
        .publish("herald.actions.slack.orders", body.into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let letter = herald_test_support::eventually_async("a dead letter", common::WAIT, || async {
        app.dead_letters().await.pop()
    })
    .await;
    let error = header(&letter, headers::ERROR).expect("error");
    assert!(error.contains("herald.actions.slack.orders"), "{error}");
    assert!(sink.received().is_empty());
}

#[tokio::test]
async fn a_dead_lettered_action_runs_again_when_replayed() {
    let mut app = App::start().await;
    let sink = Sink::start(|n| {
        if n == 0 {
            Reply::status(410)
        } else {
            Reply::status(200)
        }
    })
    .await;
    app.spawn_worker(app.settings());
    let request = action(
        "webhook",
        "orders",
        json!({"url": sink.url("/replay")}),
        retry(3, 50),
    );
    app.publish(&request).await;
    app.wait_outcomes(&request.id, "dead-lettered", |o| {
        o.iter().any(|o| o.status == OutcomeStatus::DeadLettered)
    })
    .await;

    // What the CLI's replay does: the same request again, under a new Msg-Id.
    app.publish_with_id(&request, Some(&format!("{}:replay", request.id)))
        .await;
    app.wait_outcomes(&request.id, "a success after the replay", |o| {
        o.iter().any(|o| o.status == OutcomeStatus::Succeeded)
    })
    .await;
    assert_eq!(
        sink.received().len(),
        2,
        "the replay ran; it was not taken for a duplicate"
    );
}
