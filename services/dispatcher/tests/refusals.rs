//! What JetStream or an observer refuses never stops a lane, never goes unrecorded, and never
//! lets the checkpoint or a later event of the same key overtake it.

mod common;

use async_nats::jetstream::stream::DiscardPolicy;
use common::*;
use herald_dispatcher::checkpoint;
use herald_shared::config::StreamsConfig;
use herald_shared::dlq::DeadLetterInfo;
use herald_shared::subjects::{ACTIONS_STREAM, DLQ_STREAM, EVENTS_STREAM};
use herald_shared::{Op, streams};
use herald_test_support::{NatsServer, eventually_async};
use serde_json::json;

fn one_lane(name: &str, observers: &std::path::Path) -> herald_dispatcher::DispatcherSettings {
    herald_dispatcher::DispatcherSettings {
        lanes: 1,
        batch: 1,
        ..settings(name, observers)
    }
}

async fn dead_letter_reasons(js: &async_nats::jetstream::Context, at_least: usize) -> Vec<String> {
    eventually_async(&format!("{at_least} dead letter(s)"), WAIT, || async {
        let letters = dead_letters(js).await;
        (letters.len() >= at_least).then(|| {
            letters
                .iter()
                .map(|(_, h, _)| {
                    DeadLetterInfo::from_headers(h.as_ref().expect("headers"))
                        .expect("dead letter")
                        .error
                })
                .collect()
        })
    })
    .await
}

const ANY_ORDER: &str = r#"
[[observer]]
name = "order_any"
entity = "Order"
ops = ["insert", "update"]

[[observer.action]]
kind = "webhook"
url = "https://example.test/hook"
note = "a setting that travels in every request, and makes it a little larger than its event: padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding padding"
"#;

#[tokio::test]
async fn an_action_request_over_max_payload_is_dead_lettered_and_the_lane_goes_on() {
    let nats = NatsServer::start_with("max_payload: 65536");
    let js = jetstream(&nats).await;
    let file = write_file(ANY_ORDER);
    let app = App::spawn(&js, one_lane("dispatcher", file.path())).await;

    // The event fits; the request (the event plus the observer's settings) does not.
    let big = event(
        "Order",
        Op::Insert,
        "1",
        json!({"blob": "x".repeat(64_900)}),
    );
    publish_event(&js, &big).await;
    let next = event("Order", Op::Update, "1", json!({"status": "paid"}));
    publish_event(&js, &next).await;

    wait_for_actions(&js, 1).await;
    wait_until_drained(&js, "dispatcher").await;
    let ids: Vec<String> = actions(&js).await.into_iter().map(|r| r.id).collect();
    assert_eq!(ids, [format!("{}:order_any:0", next.id)]);
    let reasons = dead_letter_reasons(&js, 1).await;
    assert!(
        reasons[0].contains(&format!("{}:order_any:0", big.id)) && reasons[0].contains("too large"),
        "{reasons:?}"
    );
    app.stop().await;
}

const CONDITIONAL: &str = r#"
[[observer]]
name = "big_orders"
entity = "Order"
ops = ["insert"]
condition = 'data.total >= 100'

[[observer.action]]
kind = "webhook"
url = "https://example.test/big"

[[observer]]
name = "order_any"
entity = "Order"
ops = ["insert"]

[[observer.action]]
kind = "job"
queue = "default"
"#;

#[tokio::test]
async fn a_condition_failing_at_run_time_leaves_a_dead_letter_naming_the_observer() {
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    let file = write_file(CONDITIONAL);
    let app = App::spawn(&js, settings("dispatcher", file.path())).await;
    let no_total = event("Order", Op::Insert, "1", json!({"status": "new"}));
    publish_event(&js, &no_total).await;

    wait_for_actions(&js, 1).await;
    let reasons = dead_letter_reasons(&js, 1).await;
    assert!(
        reasons[0].contains("big_orders") && reasons[0].contains("condition failed"),
        "{reasons:?}"
    );
    let letters = dead_letters(&js).await;
    let body: herald_shared::EntityEvent =
        serde_json::from_slice(&letters[0].2).expect("the event itself, replayable");
    assert_eq!(body.id, no_total.id);
    let ids: Vec<String> = actions(&js).await.into_iter().map(|r| r.id).collect();
    assert_eq!(
        ids,
        [format!("{}:order_any:0", no_total.id)],
        "the other observer ran"
    );
    wait_until_drained(&js, "dispatcher").await;
    app.stop().await;
}

#[tokio::test]
async fn the_checkpoint_never_passes_an_event_whose_dead_letter_was_not_stored() {
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    js.delete_stream(DLQ_STREAM).await.expect("DLQ gone");
    let file = write_file(ANY_ORDER);
    let app = App::spawn(&js, settings("dispatcher", file.path())).await;

    publish_raw(&js, "herald.events.Order.insert", b"{not json").await;
    let good = event("Order", Op::Insert, "2", json!({}));
    publish_event(&js, &good).await;
    wait_for_actions(&js, 1).await;
    // The good event (sequence 2) is done, the poison one (1) is not: the checkpoint stays at 0.
    eventually_async("the checkpoint to be saved", WAIT, || async {
        checkpoint::show(&js, "dispatcher").await.ok().flatten()
    })
    .await;
    // A bounded look at a value that must not change: five checkpoint saves.
    for _ in 0..5 {
        let saved = checkpoint::show(&js, "dispatcher")
            .await
            .expect("show")
            .expect("saved");
        assert_eq!(
            saved.sequence, 0,
            "moved past an event whose dead letter is not stored"
        );
        tokio::time::sleep(settings("x", file.path()).checkpoint_interval).await;
    }

    streams::ensure(&js, &StreamsConfig::default(), &[streams::DLQ])
        .await
        .expect("DLQ back");
    let reasons = dead_letter_reasons(&js, 1).await;
    assert!(reasons[0].contains("malformed JSON"), "{reasons:?}");
    eventually_async("the checkpoint to pass both events", WAIT, || async {
        let saved = checkpoint::show(&js, "dispatcher").await.ok().flatten()?;
        (saved.sequence == 2).then_some(())
    })
    .await;
    app.stop().await;
}

const TWO_SUBJECTS: &str = r#"
[[observer]]
name = "first"
entity = "Order"
ops = ["insert"]

[[observer.action]]
kind = "webhook"
url = "https://example.test/first"

[[observer]]
name = "second"
entity = "Order"
ops = ["update"]

[[observer.action]]
kind = "webhook"
url = "https://example.test/second"
"#;

#[tokio::test]
async fn a_lane_stopped_while_refused_never_acks_a_later_event_of_the_same_key() {
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    // The actions stream refuses a second message on a subject for now (a transient refusal,
    // like a full stream): the first event's action cannot be stored, the second's could.
    let mut config = streams::stream_config(&streams::ACTIONS, &StreamsConfig::default());
    config.max_messages_per_subject = 1;
    config.discard = DiscardPolicy::New;
    config.discard_new_per_subject = true;
    // The server takes discard-new only on a stream that never had message schedules.
    config.allow_message_schedules = false;
    config.allow_rollup = false;
    js.delete_stream(ACTIONS_STREAM)
        .await
        .expect("drop the provisioned actions stream");
    js.create_stream(config).await.expect("limit actions");
    publish_raw(&js, "herald.actions.webhook.first", b"{}").await;

    let file = write_file(TWO_SUBJECTS);
    // One lane; the update reaches it while it retries the insert, in a batch of its own.
    let lane = herald_dispatcher::DispatcherSettings {
        batch: 2,
        ..one_lane("dispatcher", file.path())
    };
    let app = App::spawn(&js, lane).await;
    let events = js.get_stream(EVENTS_STREAM).await.expect("events");
    let delivered = |n: usize| {
        let events = &events;
        async move {
            eventually_async(
                &format!("{n} event(s) delivered to the lane"),
                WAIT,
                || async {
                    let info = events.consumer_info("dispatcher").await.ok()?;
                    (info.num_ack_pending == n).then_some(())
                },
            )
            .await
        }
    };
    let insert = event("Order", Op::Insert, "1", json!({}));
    publish_event(&js, &insert).await;
    delivered(1).await;
    let update = event("Order", Op::Update, "1", json!({}));
    publish_event(&js, &update).await;
    delivered(2).await;
    app.stop().await;

    assert_eq!(
        action_count(&js).await,
        1,
        "the update's action was published after the insert's was refused"
    );
    let info = events.consumer_info("dispatcher").await.expect("consumer");
    assert_eq!(info.ack_floor.stream_sequence, 0, "nothing acked");
    let mut actions_stream = js.get_stream(ACTIONS_STREAM).await.expect("actions");
    assert_eq!(actions_stream.info().await.expect("info").state.messages, 1);
}

/// `Herald-First-Failed-At` names the first failure even when the dispatcher that saw it was
/// restarted before the event could be dead-lettered: the time is kept in the
/// `herald_first_failures` bucket, and removed once the dead letter is stored.
#[tokio::test]
async fn the_first_failure_time_survives_a_dispatcher_restart() {
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    js.delete_stream(DLQ_STREAM).await.expect("DLQ gone");
    let file = write_file(ANY_ORDER);
    let app = App::spawn(&js, settings("dispatcher", file.path())).await;
    publish_raw(&js, "herald.events.Order.insert", b"{not json").await;

    let kv =
        herald_shared::consume::first_failures_bucket(&js, herald_shared::subjects::EVENTS_STREAM)
            .await
            .expect("first-failure bucket");
    let key = "dispatcher.dispatcher.1";
    let stored = eventually_async("the first failure stored", WAIT, || async {
        let value = kv.get(key).await.ok()??;
        let text = String::from_utf8(value.to_vec()).ok()?;
        chrono::DateTime::parse_from_rfc3339(&text).ok()
    })
    .await;
    // More failed deliveries, then a restart well after the first failure.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    app.stop().await;
    let restarted_at = chrono::Utc::now();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let app = App::spawn(&js, settings("dispatcher", file.path())).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    streams::ensure(&js, &StreamsConfig::default(), &[streams::DLQ])
        .await
        .expect("DLQ back");

    let letter = eventually_async("the dead letter", WAIT, || async {
        let letters = dead_letters(&js).await;
        let (_, headers, _) = letters.first()?;
        DeadLetterInfo::from_headers(headers.as_ref()?)
    })
    .await;
    assert!(letter.error.contains("malformed JSON"), "{}", letter.error);
    let first_failed_at = letter.first_failed_at.expect("Herald-First-Failed-At");
    assert!(
        first_failed_at < restarted_at,
        "first failed at {first_failed_at} although the restart was at {restarted_at}"
    );
    assert_eq!(
        first_failed_at.timestamp_millis(),
        stored.timestamp_millis(),
        "the stored first failure"
    );
    eventually_async("the first-failure time removed", WAIT, || async {
        kv.get(key).await.ok()?.is_none().then_some(())
    })
    .await;
    app.stop().await;
}
