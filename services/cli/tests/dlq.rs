//! `herald dlq`: dead letters can be seen, replayed exactly once, and purged per source.

mod common;

use common::*;
use herald_shared::headers::{ERROR, MSG_ID, ORIGINAL_SUBJECT, REPLAYED_FROM, TRACEPARENT};
use herald_shared::subjects::{ACTIONS_STREAM, DLQ_STREAM, DlqSource, EVENTS_STREAM};
use herald_test_support::NatsServer;

#[tokio::test]
async fn dead_letters_are_listed_with_their_reason_without_being_consumed() {
    let nats = NatsServer::start();
    let js = provisioned(&nats).await;
    dead_letter(
        &js,
        DlqSource::Actions,
        "herald.actions.webhook.order_created",
        "e1:order_created:0",
        "receiver answered 410 Gone",
        r#"{"id":"e1:order_created:0"}"#,
        None,
    )
    .await;
    dead_letter(
        &js,
        DlqSource::Events,
        "herald.events.Order.insert",
        "e2",
        "malformed JSON at line 1",
        "{not json",
        None,
    )
    .await;

    let rows = json_lines(&succeed(&nats.url(), &["dlq", "list", "--json"]).await);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["seq"], 1);
    assert_eq!(rows[0]["source"], "actions");
    assert_eq!(
        rows[0]["original_subject"],
        "herald.actions.webhook.order_created"
    );
    assert_eq!(rows[0]["original_msg_id"], "e1:order_created:0");
    assert_eq!(rows[0]["error"], "receiver answered 410 Gone");
    assert_eq!(rows[0]["attempts"], 5);
    assert!(rows[0]["first_failed_at"].is_string(), "{:?}", rows[0]);
    assert_eq!(rows[1]["source"], "events");
    assert_eq!(rows[1]["error"], "malformed JSON at line 1");

    let table = succeed(&nats.url(), &["dlq", "list"]).await;
    assert!(table.contains("receiver answered 410 Gone"), "{table}");
    assert!(table.contains("herald.events.Order.insert"), "{table}");

    let only_events = json_lines(
        &succeed(
            &nats.url(),
            &["dlq", "list", "--source", "events", "--json"],
        )
        .await,
    );
    assert_eq!(only_events.len(), 1);
    assert_eq!(only_events[0]["seq"], 2);

    let first_only =
        json_lines(&succeed(&nats.url(), &["dlq", "list", "--limit", "1", "--json"]).await);
    assert_eq!(first_only.len(), 1);
    let from_two =
        json_lines(&succeed(&nats.url(), &["dlq", "list", "--from", "2", "--json"]).await);
    assert_eq!(from_two.len(), 1);
    assert_eq!(from_two[0]["seq"], 2);

    // Listing took nothing away and left no consumer behind.
    assert_eq!(messages_in(&js, DLQ_STREAM).await, 2);
    let info = js
        .get_stream(DLQ_STREAM)
        .await
        .expect("DLQ")
        .get_info()
        .await
        .expect("info");
    assert_eq!(info.state.consumer_count, 0);
}

#[tokio::test]
async fn a_replay_republishes_to_the_original_subject_and_removes_the_dead_letter() {
    let nats = NatsServer::start();
    let js = provisioned(&nats).await;
    let subject = "herald.actions.webhook.order_created";
    let body = r#"{"id":"e1:order_created:0"}"#;
    let original = publish_original(&js, subject, "e1:order_created:0", body).await;
    dead_letter(
        &js,
        DlqSource::Actions,
        subject,
        "e1:order_created:0",
        "receiver answered 410 Gone",
        body,
        Some(&original),
    )
    .await;

    let out = succeed(&nats.url(), &["dlq", "replay", "1"]).await;
    assert!(out.contains("DLQ 1"), "{out}");

    // The replay is a new message in the original stream: the original's Msg-Id, still inside
    // the duplicate window, did not swallow it.
    assert_eq!(messages_in(&js, ACTIONS_STREAM).await, 2);
    let replay = stored(&js, ACTIONS_STREAM, 2).await;
    assert_eq!(replay.subject.as_str(), subject);
    assert_eq!(replay.payload.as_ref(), body.as_bytes());
    assert_eq!(
        header(&replay, MSG_ID).as_deref(),
        Some("e1:order_created:0:replay:1")
    );
    assert_eq!(header(&replay, REPLAYED_FROM).as_deref(), Some("1"));
    assert_eq!(
        header(&replay, TRACEPARENT),
        original.get(TRACEPARENT).map(|v| v.as_str().to_owned())
    );
    assert_eq!(header(&replay, ERROR), None);
    assert_eq!(header(&replay, ORIGINAL_SUBJECT), None);

    assert_eq!(messages_in(&js, DLQ_STREAM).await, 0);
    let again = fail(&nats.url(), &["dlq", "replay", "1"]).await;
    assert!(
        again.contains("no dead letter with DLQ sequence 1"),
        "{again}"
    );
    assert_eq!(messages_in(&js, ACTIONS_STREAM).await, 2);
}

#[tokio::test]
async fn a_replay_interrupted_before_the_dead_letter_is_removed_is_absorbed_when_run_again() {
    // `clumsy` can do everything but delete a stored message: its replay stops exactly between
    // "republished" and "removed from the DLQ", as a crash there would.
    let nats = NatsServer::start_with(
        r#"authorization {
            users = [
                { user: admin, password: admin }
                { user: clumsy, password: clumsy, permissions: {
                    publish: { allow: [">"], deny: ["$JS.API.STREAM.MSG.DELETE.>"] }
                    subscribe: { allow: [">"] }
                } }
            ]
        }"#,
    );
    let admin = async_nats::ConnectOptions::new()
        .user_and_password("admin".into(), "admin".into())
        .connect(nats.url())
        .await
        .expect("connect as admin");
    let js = async_nats::jetstream::new(admin);
    herald_shared::streams::ensure_all(&js, &herald_shared::config::StreamsConfig::default())
        .await
        .expect("provision");
    let subject = "herald.events.Order.insert";
    let original = publish_original(&js, subject, "e7", "{}").await;
    dead_letter(
        &js,
        DlqSource::Events,
        subject,
        "e7",
        "bad row",
        "{}",
        Some(&original),
    )
    .await;

    let interrupted = command(
        &nats.url(),
        &[
            "--user",
            "clumsy",
            "--password",
            "clumsy",
            "dlq",
            "replay",
            "1",
        ],
    )
    .env("HERALD_NATS__REQUEST_TIMEOUT", "1s")
    .output()
    .await
    .expect("run herald");
    assert!(!interrupted.status.success());
    let stderr = String::from_utf8_lossy(&interrupted.stderr);
    assert!(stderr.contains("could not be removed"), "{stderr}");
    assert_eq!(messages_in(&js, EVENTS_STREAM).await, 2);
    assert_eq!(messages_in(&js, DLQ_STREAM).await, 1);

    let out = succeed(
        &nats.url(),
        &[
            "--user",
            "admin",
            "--password",
            "admin",
            "dlq",
            "replay",
            "1",
        ],
    )
    .await;
    assert!(out.contains("already replayed"), "{out}");
    assert_eq!(
        messages_in(&js, EVENTS_STREAM).await,
        2,
        "the second replay was stored again"
    );
    assert_eq!(messages_in(&js, DLQ_STREAM).await, 0);
}

#[tokio::test]
async fn replay_all_replays_every_dead_letter_of_one_source_only() {
    let nats = NatsServer::start();
    let js = provisioned(&nats).await;
    for (i, msg_id) in ["a1", "a2"].into_iter().enumerate() {
        dead_letter(
            &js,
            DlqSource::Actions,
            &format!("herald.actions.slack.obs{i}"),
            msg_id,
            "slack answered 500",
            "{}",
            None,
        )
        .await;
    }
    dead_letter(
        &js,
        DlqSource::Jobs,
        "herald.jobs.submit.default",
        "j1",
        "no handler",
        "{}",
        None,
    )
    .await;

    let (out, err) = succeed_with_stderr(
        &nats.url(),
        &["dlq", "replay", "--all", "--source", "actions"],
    )
    .await;
    assert_eq!(out.lines().count(), 2, "{out}");
    assert_eq!(err, "", "not a terminal: no progress bar");
    assert_eq!(messages_in(&js, ACTIONS_STREAM).await, 2);
    let left = json_lines(&succeed(&nats.url(), &["dlq", "list", "--json"]).await);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["source"], "jobs");
}

#[tokio::test]
async fn a_dlq_entry_that_is_not_a_dead_letter_is_refused_and_kept() {
    let nats = NatsServer::start();
    let js = provisioned(&nats).await;
    js.publish("herald.dlq.actions", "hand-written".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let err = fail(&nats.url(), &["dlq", "replay", "1"]).await;
    assert!(err.contains("not a Herald dead letter"), "{err}");
    assert_eq!(messages_in(&js, DLQ_STREAM).await, 1);
}

#[tokio::test]
async fn purge_needs_confirmation_and_empties_one_source_only() {
    let nats = NatsServer::start();
    let js = provisioned(&nats).await;
    dead_letter(
        &js,
        DlqSource::Actions,
        "herald.actions.webhook.o",
        "a1",
        "410",
        "{}",
        None,
    )
    .await;
    dead_letter(
        &js,
        DlqSource::Actions,
        "herald.actions.webhook.o",
        "a2",
        "410",
        "{}",
        None,
    )
    .await;
    dead_letter(
        &js,
        DlqSource::Events,
        "herald.events.Order.insert",
        "e1",
        "bad",
        "{}",
        None,
    )
    .await;

    let refused = fail(&nats.url(), &["dlq", "purge", "--source", "actions"]).await;
    assert!(refused.contains("--yes"), "{refused}");
    assert_eq!(messages_in(&js, DLQ_STREAM).await, 3);

    let out = succeed(
        &nats.url(),
        &["dlq", "purge", "--source", "actions", "--yes"],
    )
    .await;
    assert!(out.contains("purged 2"), "{out}");
    let left = json_lines(&succeed(&nats.url(), &["dlq", "list", "--json"]).await);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["source"], "events");
}

#[tokio::test]
async fn a_dead_letter_is_shown_in_full_with_its_body_and_headers() {
    let nats = NatsServer::start();
    let js = provisioned(&nats).await;
    let subject = "herald.actions.email.welcome";
    let original =
        publish_original(&js, subject, "e3:welcome:0", r#"{"to":"a@example.com"}"#).await;
    dead_letter(
        &js,
        DlqSource::Actions,
        subject,
        "e3:welcome:0",
        "SMTP 550 mailbox unavailable",
        r#"{"to":"a@example.com"}"#,
        Some(&original),
    )
    .await;

    let shown: serde_json::Value =
        serde_json::from_str(&succeed(&nats.url(), &["dlq", "show", "1"]).await).expect("JSON");
    assert_eq!(shown["seq"], 1);
    assert_eq!(shown["original_subject"], subject);
    assert_eq!(shown["error"], "SMTP 550 mailbox unavailable");
    assert_eq!(shown["data"]["to"], "a@example.com");
    assert_eq!(
        shown["headers"][TRACEPARENT].as_str(),
        original.get(TRACEPARENT).map(|v| v.as_str())
    );

    let missing = fail(&nats.url(), &["dlq", "show", "2"]).await;
    assert!(
        missing.contains("no dead letter with DLQ sequence 2"),
        "{missing}"
    );
}

#[tokio::test]
async fn a_dead_letter_whose_body_was_stored_apart_replays_the_original_body() {
    let nats = NatsServer::start_with("max_payload: 65536");
    let js = provisioned(&nats).await;
    let subject = "herald.actions.webhook.big";
    // Fits alone, not beside the dead-letter headers: the body goes to the bodies bucket.
    let body: &'static str =
        Box::leak(format!("{{\"pad\":\"{}\"}}", "p".repeat(65_300)).into_boxed_str());
    let original = publish_original(&js, subject, "e9:big:0", body).await;
    dead_letter(
        &js,
        DlqSource::Actions,
        subject,
        "e9:big:0",
        "too big",
        body,
        Some(&original),
    )
    .await;
    let letter = stored(&js, DLQ_STREAM, 1).await;
    assert!(letter.payload.is_empty());
    assert_eq!(
        header(&letter, herald_shared::headers::BODY_OBJECT).as_deref(),
        Some("e9:big:0:dlq")
    );

    succeed(&nats.url(), &["dlq", "replay", "1"]).await;
    let replay = stored(&js, ACTIONS_STREAM, 2).await;
    assert_eq!(
        replay.payload.as_ref(),
        body.as_bytes(),
        "the original body, not a notice"
    );
    assert_eq!(header(&replay, herald_shared::headers::BODY_OBJECT), None);
    assert!(
        herald_shared::dlq::load_body(&js, "e9:big:0:dlq")
            .await
            .is_err(),
        "the stored body goes with its dead letter"
    );
}

#[tokio::test]
async fn purging_removes_the_bodies_stored_apart_too() {
    let nats = NatsServer::start_with("max_payload: 65536");
    let js = provisioned(&nats).await;
    let body: &'static str =
        Box::leak(format!("{{\"pad\":\"{}\"}}", "p".repeat(65_300)).into_boxed_str());
    dead_letter(
        &js,
        DlqSource::Jobs,
        "herald.jobs.submit.q",
        "j1",
        "too big",
        body,
        None,
    )
    .await;
    assert!(herald_shared::dlq::load_body(&js, "j1:dlq").await.is_ok());
    let out = succeed(&nats.url(), &["dlq", "purge", "--yes"]).await;
    assert!(
        out.contains("purged 1") && out.contains("1 stored bodies removed"),
        "{out}"
    );
    assert!(herald_shared::dlq::load_body(&js, "j1:dlq").await.is_err());
}

#[tokio::test]
async fn on_a_terminal_replay_all_shows_a_progress_bar_with_the_tally() {
    let nats = NatsServer::start();
    let js = provisioned(&nats).await;
    for (i, msg_id) in ["a1", "a2", "a3"].into_iter().enumerate() {
        dead_letter(
            &js,
            DlqSource::Actions,
            &format!("herald.actions.slack.obs{i}"),
            msg_id,
            "slack answered 500",
            "{}",
            None,
        )
        .await;
    }
    dead_letter(
        &js,
        DlqSource::Jobs,
        "herald.jobs.submit.default",
        "j1",
        "no handler",
        "{}",
        None,
    )
    .await;

    let shown = on_a_terminal(
        &nats.url(),
        &["dlq", "replay", "--all", "--source", "actions"],
    )
    .await;
    assert!(shown.contains("4/4 DLQ entries scanned"), "{shown:?}");
    assert!(shown.contains("3 replayed, 0 failed"), "{shown:?}");
    assert_eq!(messages_in(&js, ACTIONS_STREAM).await, 3);
}

/// An event dead-lettered while HERALD_EVENTS had 4 partitions, replayed after the change to 2
/// (drain, then repartition): it lands in the partition its key has now, beside the key's new
/// events, not in its old partition 2 or 3, which no consumer reads any more.
#[tokio::test]
async fn an_event_replayed_after_repartitioning_lands_in_its_keys_current_partition() {
    use herald_shared::config::StreamsConfig;
    use herald_shared::subjects::{event_to_republish, keyed_event};
    use herald_shared::{Op, streams};

    let nats = NatsServer::start();
    let js = nats.jetstream().await;
    let partitioned = |event_partitions| StreamsConfig {
        event_partitions,
        ..StreamsConfig::default()
    };
    streams::ensure_all(&js, &partitioned(4))
        .await
        .expect("provision the streams");
    // Keys until one falls in partition 2 or 3 of 4 (the stream computes it).
    let mut found = None;
    for n in 0..64 {
        let key = n.to_string();
        let subject = keyed_event("Order", Op::Insert, &key).expect("valid");
        let ack = js
            .publish(subject, "{}".into())
            .await
            .expect("publish")
            .await
            .expect("stored");
        let stored = stored(&js, EVENTS_STREAM, ack.sequence).await;
        let partition = stored.subject.rsplit('.').next().unwrap_or_default();
        if ["2", "3"].contains(&partition) {
            found = Some((key, stored.subject.to_string()));
            break;
        }
    }
    let (key, old_subject) = found.expect("some key of 64 in partition 2 or 3");
    dead_letter(
        &js,
        DlqSource::Events,
        &old_subject,
        "e-old",
        "observer order_created: condition failed",
        r#"{"id":"e-old"}"#,
        None,
    )
    .await;

    streams::ensure_all(&js, &partitioned(2))
        .await
        .expect("repartition the streams");
    let keyed = keyed_event("Order", Op::Insert, &key).expect("valid");
    let ack = js
        .publish(keyed.clone(), "{}".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let current = stored(&js, EVENTS_STREAM, ack.sequence).await.subject;

    let dry = succeed(&nats.url(), &["dlq", "replay", "--all", "--dry-run"]).await;
    assert!(dry.contains(&format!("to {keyed} (")), "{dry}");
    let out = succeed(&nats.url(), &["dlq", "replay", "1"]).await;
    let replayed = stored(&js, EVENTS_STREAM, ack.sequence + 1).await;
    assert_eq!(
        replayed.subject, current,
        "the replay is stored as the key's new events are: {out}"
    );
    assert_ne!(replayed.subject.as_str(), old_subject);
    assert_eq!(event_to_republish(&old_subject), keyed);
}
