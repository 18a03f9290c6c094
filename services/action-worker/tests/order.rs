//! Ordered observers' lines: an action runs only once the previous action of its line is
//! settled (succeeded or dead-lettered), whatever order the actions arrive in, and a line whose
//! predecessor never settles goes on after the patience. Real NATS, Redis and HTTP.

mod common;

use std::time::{Duration, Instant};

use common::{App, Reply, Sink, action, retry};
use herald_shared::messages::{ActionOrder, ActionRequest, OutcomeStatus};
use serde_json::json;

/// An action of the `orders` observer for order 42, at `sequence` in its line after `after`.
fn in_line(sink: &Sink, sequence: u64, after: Option<u64>) -> ActionRequest {
    let mut request = action(
        "webhook",
        "orders",
        json!({"url": sink.url("/hook")}),
        retry(2, 50),
    );
    request.order = Some(ActionOrder { sequence, after });
    request
}

fn arrival_order(sink: &Sink) -> Vec<String> {
    let mut seen = Vec::new();
    for received in sink.received() {
        let id = received.header("webhook-id").expect("webhook-id");
        if !seen.contains(&id) {
            seen.push(id);
        }
    }
    seen
}

#[tokio::test]
async fn a_line_runs_in_its_order_whatever_order_its_actions_arrive_in() {
    let mut app = App::start().await;
    let sink = Sink::start(|_| Reply::status(204)).await;
    let mut settings = app.settings();
    settings.concurrency = 4;
    app.spawn_worker(settings);

    let line = [
        in_line(&sink, 10, None),
        in_line(&sink, 11, Some(10)),
        in_line(&sink, 12, Some(11)),
    ];
    // The last two first: both must wait, however many slots are free.
    app.publish(&line[2]).await;
    app.publish(&line[1]).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        sink.received().is_empty(),
        "nothing of the line ran before its first action: {:?}",
        arrival_order(&sink)
    );
    app.publish(&line[0]).await;

    sink.wait_for(3).await;
    let expected: Vec<String> = line.iter().map(|r| r.id.clone()).collect();
    assert_eq!(arrival_order(&sink), expected, "the line's order");
    // Waiting spent no attempt: each succeeded at its first.
    for request in &line {
        let outcomes = app
            .wait_outcomes(&request.id, "a success", |o| {
                o.iter().any(|o| o.status == OutcomeStatus::Succeeded)
            })
            .await;
        let attempts: Vec<u32> = outcomes.iter().map(|o| o.attempt).collect();
        assert_eq!(attempts, [1], "{}: {outcomes:?}", request.id);
    }
}

#[tokio::test]
async fn a_dead_lettered_action_lets_its_line_go_on() {
    let mut app = App::start().await;
    // The first request to arrive is refused for good (410), every later one accepted.
    let sink = Sink::start(|n| Reply::status(if n == 0 { 410 } else { 204 })).await;
    app.spawn_worker(app.settings());

    let first = in_line(&sink, 20, None);
    let second = in_line(&sink, 21, Some(20));
    app.publish(&second).await;
    app.publish(&first).await;

    app.wait_outcomes(&first.id, "the first dead-lettered", |o| {
        o.iter().any(|o| o.status == OutcomeStatus::DeadLettered)
    })
    .await;
    app.wait_outcomes(&second.id, "the second succeeded", |o| {
        o.iter().any(|o| o.status == OutcomeStatus::Succeeded)
    })
    .await;
    assert_eq!(arrival_order(&sink), [first.id.clone(), second.id.clone()]);
}

#[tokio::test]
async fn a_line_whose_predecessor_never_settles_goes_on_after_the_patience() {
    let mut app = App::start().await;
    let sink = Sink::start(|_| Reply::status(204)).await;
    let patience = Duration::from_secs(2);
    let mut settings = app.settings();
    settings.order_patience = patience;
    app.spawn_worker(settings);

    // Its predecessor, at 30, is never published (its event was dead-lettered, say).
    let orphan = in_line(&sink, 31, Some(30));
    let published = Instant::now();
    app.publish(&orphan).await;
    let received = sink.wait_for(1).await.remove(0);
    assert_eq!(received.header("webhook-id"), Some(orphan.id.clone()));
    let waited = received.at.duration_since(published);
    assert!(
        waited >= patience,
        "ran out of line after {waited:?}, before the patience of {patience:?}"
    );
    let outcomes = app
        .wait_outcomes(&orphan.id, "a success", |o| {
            o.iter().any(|o| o.status == OutcomeStatus::Succeeded)
        })
        .await;
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    assert_eq!(outcomes[0].attempt, 1, "waiting spent no attempt");

    // The line moved on past it: its successor waits for nothing.
    let next = in_line(&sink, 32, Some(31));
    app.publish(&next).await;
    sink.wait_for(2).await;
    assert_eq!(arrival_order(&sink), [orphan.id.clone(), next.id.clone()]);
}

#[tokio::test]
async fn unordered_actions_and_other_lines_do_not_wait_for_a_stuck_line() {
    let mut app = App::start().await;
    let sink = Sink::start(|_| Reply::status(204)).await;
    app.spawn_worker(app.settings());

    // A line stuck behind a predecessor that never comes (patience is ten minutes here).
    let stuck = in_line(&sink, 40, Some(39));
    app.publish(&stuck).await;
    // Another key's line, and an action of no line.
    let mut other_key = in_line(&sink, 41, None);
    other_key.event.key = "43".into();
    let unordered = action(
        "webhook",
        "orders",
        json!({"url": sink.url("/hook")}),
        retry(2, 50),
    );
    app.publish(&other_key).await;
    app.publish(&unordered).await;

    sink.wait_for(2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut arrived = arrival_order(&sink);
    arrived.sort();
    let mut expected = vec![other_key.id.clone(), unordered.id.clone()];
    expected.sort();
    assert_eq!(arrived, expected, "only the stuck line waits");
}
