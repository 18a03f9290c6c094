//! The promise when the rest of the system misbehaves: an outcome that cannot be published never
//! makes an action run again, a receiver's `Retry-After` cannot park an action for a day, no
//! retry is scheduled past the stream's retention, replicas running different kinds keep their
//! own consumers, and a dead letter dates its first failure.

mod common;

use std::time::Duration;

use async_nats::jetstream::stream::DiscardPolicy;
use common::*;
use herald_shared::config::StreamsConfig;
use herald_shared::dlq::DeadLetterInfo;
use herald_shared::messages::OutcomeStatus;
use herald_shared::streams;
use herald_shared::subjects::ACTIONS_STREAM;
use herald_test_support::eventually_async;
use serde_json::json;

#[tokio::test]
async fn an_outcome_that_cannot_be_published_after_a_success_never_reruns_the_action() {
    let mut app = App::start().await;
    // The outcomes stream refuses a second message on a subject for now: the success's outcome
    // cannot be stored (a transient refusal, like a full stream).
    let mut limited = streams::stream_config(&streams::OUTCOMES, &StreamsConfig::default());
    limited.max_messages_per_subject = 1;
    limited.discard = DiscardPolicy::New;
    limited.discard_new_per_subject = true;
    app.jetstream
        .update_stream(limited)
        .await
        .expect("limit outcomes");
    app.jetstream
        .publish("herald.outcomes.webhook.orders", "{}".into())
        .await
        .expect("publish")
        .await
        .expect("stored");

    let sink = Sink::start(|_| Reply::status(200)).await;
    app.spawn_worker(app.settings());
    let request = action(
        "webhook",
        "orders",
        json!({"url": sink.url("/once")}),
        retry(5, 50),
    );
    app.publish(&request).await;
    sink.wait_for(1).await;

    // Redelivered again and again (each time the outcome is refused), past the 1 s lease.
    let stream = app
        .jetstream
        .get_stream(ACTIONS_STREAM)
        .await
        .expect("stream");
    eventually_async(
        "three deliveries, the last past the lease",
        WAIT,
        || async {
            let info = stream.consumer_info("action-worker").await.ok()?;
            (info.delivered.consumer_sequence >= 3).then_some(())
        },
    )
    .await;
    assert_eq!(sink.received().len(), 1, "the action ran again");

    let open = streams::stream_config(&streams::OUTCOMES, &StreamsConfig::default());
    app.jetstream
        .update_stream(open)
        .await
        .expect("lift the limit");
    let outcomes = app
        .wait_outcomes(&request.id, "the success's outcome", |o| {
            o.iter().any(|o| o.status == OutcomeStatus::Succeeded)
        })
        .await;
    let succeeded: Vec<_> = outcomes
        .iter()
        .filter(|o| o.status == OutcomeStatus::Succeeded)
        .collect();
    assert_eq!(succeeded.len(), 1, "{outcomes:?}");
    assert_eq!(succeeded[0].attempt, 1);
    assert_eq!(succeeded[0].http_status, Some(200));
    assert_eq!(sink.received().len(), 1, "executed once");
}

#[tokio::test]
async fn a_day_long_retry_after_is_cut_to_the_ceiling() {
    let mut app = App::start().await;
    let sink = Sink::start(|n| {
        if n == 0 {
            Reply::status(429).header("retry-after", "86400")
        } else {
            Reply::status(200)
        }
    })
    .await;
    let mut settings = app.settings();
    settings.retry_after_ceiling = Duration::from_secs(1);
    app.spawn_worker(settings);
    let request = action(
        "webhook",
        "orders",
        json!({"url": sink.url("/limited")}),
        retry(3, 50),
    );
    app.publish(&request).await;
    let received = sink.wait_for(2).await;
    assert!(received[1].at - received[0].at >= Duration::from_millis(900));
    app.wait_outcomes(&request.id, "success", |o| {
        o.iter().any(|o| o.status == OutcomeStatus::Succeeded)
    })
    .await;
}

#[tokio::test]
async fn a_retry_that_would_outlive_the_stream_retention_is_dead_lettered_instead() {
    let mut app = App::start().await;
    let mut short = streams::stream_config(&streams::ACTIONS, &StreamsConfig::default());
    short.max_age = Duration::from_secs(20);
    short.duplicate_window = Duration::from_secs(10);
    app.jetstream
        .update_stream(short)
        .await
        .expect("short retention");
    let sink = Sink::start(|_| Reply::status(503)).await;
    app.spawn_worker(app.settings());
    // The first retry would come 60 s later: the stream deletes the action after 20 s.
    let request = action(
        "webhook",
        "orders",
        json!({"url": sink.url("/down")}),
        retry(5, 60_000),
    );
    app.publish(&request).await;
    let outcomes = app
        .wait_outcomes(&request.id, "dead-lettered", |o| {
            o.iter().any(|o| o.status == OutcomeStatus::DeadLettered)
        })
        .await;
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    let letters = app.dead_letters().await;
    let info = DeadLetterInfo::from_headers(&letters[0].headers).expect("dead letter");
    assert!(info.error.contains("retention"), "{}", info.error);
    assert_eq!(sink.received().len(), 1);
}

#[tokio::test]
async fn replicas_running_different_kinds_keep_their_own_consumers() {
    let mut app = App::start().await;
    let sink = Sink::start(|_| Reply::status(200)).await;
    let mut webhooks = app.settings();
    webhooks.kinds = vec!["webhook".into()];
    app.spawn_worker(webhooks);
    let stream = app
        .jetstream
        .get_stream(ACTIONS_STREAM)
        .await
        .expect("stream");
    eventually_async("the webhook consumer", WAIT, || async {
        stream.consumer_info("action-worker_webhook").await.ok()
    })
    .await;
    let mut chat = app.settings();
    chat.kinds = vec!["slack".into()];
    app.spawn_worker(chat);
    let slack = eventually_async("the slack consumer", WAIT, || async {
        stream.consumer_info("action-worker_slack").await.ok()
    })
    .await;
    assert_eq!(slack.config.filter_subjects, ["herald.actions.slack.>"]);
    let webhook = stream
        .consumer_info("action-worker_webhook")
        .await
        .expect("still there");
    assert_eq!(webhook.config.filter_subjects, ["herald.actions.webhook.>"]);

    let request = action(
        "webhook",
        "orders",
        json!({"url": sink.url("/hook")}),
        retry(3, 50),
    );
    app.publish(&request).await;
    sink.wait_for(1).await;
}

#[tokio::test]
async fn a_dead_letter_dates_the_first_failure_not_the_dead_lettering() {
    let mut app = App::start().await;
    let sink = Sink::start(|_| Reply::status(500)).await;
    app.spawn_worker(app.settings());
    let request = action(
        "webhook",
        "orders",
        json!({"url": sink.url("/down")}),
        retry(3, 400),
    );
    app.publish(&request).await;
    app.wait_outcomes(&request.id, "dead-lettered", |o| {
        o.iter().any(|o| o.status == OutcomeStatus::DeadLettered)
    })
    .await;
    let received = sink.received();
    assert_eq!(received.len(), 3);
    let letters = app.dead_letters().await;
    let info = DeadLetterInfo::from_headers(&letters[0].headers).expect("dead letter");
    let first = info.first_failed_at.expect("first failure");
    let dead = info.dead_lettered_at.expect("dead-lettering");
    // 400 ms then 800 ms between the three attempts.
    assert!(
        dead - first >= chrono::Duration::milliseconds(1100),
        "first failure {first}, dead-lettered {dead}"
    );
}

/// A burst to one receiver that answers, more than its share of places: the actions over the
/// share wait their turn (without a worker slot) instead of each being put back as a scheduled
/// copy and coming again later, which capped one destination at a few hundred actions a second.
#[tokio::test]
async fn a_burst_to_one_receiver_waits_for_its_places_instead_of_being_put_back() {
    let mut app = App::start().await;
    let sink = Sink::start(|_| Reply::status(200).after(Duration::from_millis(20))).await;
    let mut settings = app.settings();
    settings.concurrency = 16;
    settings.per_destination_concurrency = 2;
    app.spawn_worker(settings);
    // Its two places and a queue of four times that: all of the burst fits.
    let burst = 10;
    let mut ids = Vec::new();
    for _ in 0..burst {
        let request = action(
            "webhook",
            "orders",
            json!({"url": sink.url("/paced")}),
            retry(3, 50),
        );
        ids.push(request.id.clone());
        app.publish(&request).await;
    }
    sink.wait_for(burst).await;
    for id in &ids {
        app.wait_outcomes(id, "succeeded", |o| {
            o.iter().any(|o| o.status == OutcomeStatus::Succeeded)
        })
        .await;
    }
    let outcomes: Vec<_> = futures::future::join_all(ids.iter().map(|id| app.outcomes(id)))
        .await
        .into_iter()
        .flatten()
        .collect();
    assert!(
        outcomes
            .iter()
            .all(|o| o.attempt == 1 && o.status == OutcomeStatus::Succeeded),
        "{outcomes:?}"
    );
    // A put-back would have stored a scheduled copy, and the server the copy when due (it then
    // deletes the schedule): every one of them takes a sequence.
    let mut stream = app
        .jetstream
        .get_stream(ACTIONS_STREAM)
        .await
        .expect("HERALD_ACTIONS");
    let stored = stream
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence;
    assert_eq!(stored, burst as u64, "actions were put back");
    assert_eq!(sink.received().len(), burst);
}

#[tokio::test]
async fn a_hanging_receiver_holds_its_share_of_slots_never_all_of_them() {
    let mut app = App::start().await;
    let slow = Sink::start(|_| Reply::hang()).await;
    let fast = Sink::start(|_| Reply::status(200)).await;
    let mut settings = app.settings();
    settings.concurrency = 4;
    settings.per_destination_concurrency = 2;
    app.spawn_worker(settings);
    // As many hanging actions as there are slots: unpaced, they would take every one.
    for _ in 0..4 {
        let request = action(
            "webhook",
            "orders",
            json!({"url": slow.url("/slow")}),
            retry(3, 50),
        );
        app.publish(&request).await;
    }
    slow.wait_for(2).await;
    for _ in 0..5 {
        let request = action(
            "webhook",
            "orders",
            json!({"url": fast.url("/fast")}),
            retry(3, 50),
        );
        app.publish(&request).await;
    }
    fast.wait_for(5).await;
    assert_eq!(
        slow.received().len(),
        2,
        "the hanging receiver got only its share"
    );
}
