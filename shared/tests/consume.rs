//! The one settling mechanism against a real nats-server: dispositions become acks, NAKs with
//! delay and dead letters in the promised order; publish failures that can never heal are not
//! retried in place; a body too large to sit beside the dead-letter headers is kept whole in the
//! bodies bucket; the first failure, not the dead-lettering, dates a dead letter.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use chrono::Utc;
use futures::StreamExt;
use herald_shared::config::{NatsConfig, StreamsConfig};
use herald_shared::consume::{self, Disposition, Publication, Settled, Settler};
use herald_shared::dlq::{self, DeadLetterInfo};
use herald_shared::publish::{self, PublishFailure};
use herald_shared::subjects::{DLQ_STREAM, DlqSource, EVENTS_STREAM, OUTCOMES_STREAM};
use herald_shared::{headers, streams};
use herald_test_support::{NatsServer, service_password};

const WAIT: Duration = Duration::from_secs(10);

async fn provisioned(nats: &NatsServer) -> jetstream::Context {
    let js = nats.jetstream().await;
    streams::ensure_all(&js, &StreamsConfig::default())
        .await
        .expect("streams");
    js
}

async fn publish_event(js: &jetstream::Context, msg_id: &str, body: Vec<u8>) {
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::MSG_ID, msg_id);
    js.publish_with_headers("herald.events.Order.insert", h, body.into())
        .await
        .expect("publish")
        .await
        .expect("stored");
}

async fn messages(js: &jetstream::Context) -> pull::Stream {
    js.get_stream(EVENTS_STREAM)
        .await
        .expect("stream")
        .create_consumer(pull::Config {
            durable_name: Some("settle-test".into()),
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            ..Default::default()
        })
        .await
        .expect("consumer")
        .messages()
        .await
        .expect("messages")
}

async fn next(messages: &mut pull::Stream) -> jetstream::Message {
    tokio::time::timeout(WAIT, messages.next())
        .await
        .expect("a delivery in time")
        .expect("a message")
        .expect("message ok")
}

async fn stored(js: &jetstream::Context, stream: &str) -> u64 {
    let mut stream = js.get_stream(stream).await.expect("stream");
    stream.info().await.expect("info").state.messages
}

#[tokio::test]
async fn dispositions_become_acks_naks_and_dead_letters_after_their_publications() {
    let nats = NatsServer::start();
    let js = provisioned(&nats).await;
    let settler = Settler::new(
        js.clone(),
        DlqSource::Events,
        "settle-test",
        Duration::from_millis(100),
    );
    publish_event(&js, "e-ack", b"{\"n\":1}".to_vec()).await;
    publish_event(&js, "e-fail", b"{\"n\":2}".to_vec()).await;
    let mut messages = messages(&js).await;

    let first = next(&mut messages).await;
    let outcome = Publication::json(
        "herald.outcomes.webhook.o",
        "e-ack:1",
        &serde_json::json!({"ok": true}),
    )
    .expect("json");
    assert_eq!(
        settler
            .settle(&first, Disposition::ack().publishing_first(outcome))
            .await,
        Settled::Acked
    );
    assert_eq!(
        stored(&js, OUTCOMES_STREAM).await,
        1,
        "the publication came first"
    );

    let failing = next(&mut messages).await;
    let first_failure = Utc::now();
    assert_eq!(
        settler
            .settle(&failing, Disposition::retry(Duration::from_millis(300)))
            .await,
        Settled::Retrying
    );
    let again = next(&mut messages).await;
    assert_eq!(
        again.info().expect("info").delivered,
        2,
        "redelivered after the NAK delay"
    );
    assert!(Utc::now() - first_failure >= chrono::Duration::milliseconds(250));
    assert_eq!(
        settler
            .settle(
                &again,
                Disposition::dead_letter("still failing").header(headers::HTTP_STATUS, "503")
            )
            .await,
        Settled::DeadLettered
    );
    let dlq = js.get_stream(DLQ_STREAM).await.expect("dlq");
    let letter = dlq.direct_get(1).await.expect("the dead letter");
    let info = DeadLetterInfo::from_headers(&letter.headers).expect("dead letter headers");
    assert_eq!(info.error, "still failing");
    assert_eq!(info.attempts, 2);
    assert_eq!(letter.payload.as_ref(), b"{\"n\":2}");
    let first_failed_at = info.first_failed_at.expect("first failure");
    let dead_lettered_at = info.dead_lettered_at.expect("dead-lettering time");
    assert!(
        (first_failed_at - first_failure).num_milliseconds().abs() < 200,
        "first failure {first_failed_at} is not the first retry at {first_failure}"
    );
    assert!(dead_lettered_at - first_failed_at >= chrono::Duration::milliseconds(250));
    assert_eq!(
        letter.headers.get(headers::HTTP_STATUS).map(|v| v.as_str()),
        Some("503")
    );

    // Terminated: nothing comes back.
    assert!(
        tokio::time::timeout(Duration::from_millis(800), messages.next())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_publication_that_can_never_be_stored_is_not_retried_in_place() {
    let nats = NatsServer::start();
    let js = provisioned(&nats).await;
    let settler = Settler::new(
        js.clone(),
        DlqSource::Events,
        "settle-test",
        Duration::from_secs(30),
    );
    publish_event(&js, "e-1", b"{}".to_vec()).await;
    let mut messages = messages(&js).await;
    let message = next(&mut messages).await;
    let nowhere = Publication::json("no.stream.here", "x", &1).expect("json");
    let too_large = Publication::new(
        "herald.outcomes.webhook.o",
        async_nats::HeaderMap::new(),
        vec![b'x'; 2 * 1024 * 1024].into(),
    );
    assert_eq!(
        settler
            .settle(
                &message,
                Disposition::ack()
                    .publishing_first(nowhere)
                    .publishing_first(too_large)
            )
            .await,
        Settled::Acked,
        "permanent failures are dropped with a log, the message is settled"
    );
    let stream = js.get_stream(EVENTS_STREAM).await.expect("stream");
    let info = stream.consumer_info("settle-test").await.expect("consumer");
    assert_eq!(info.num_ack_pending, 0);
}

#[tokio::test]
async fn publish_failures_are_classified_against_a_real_server() {
    let nats = NatsServer::start_with_service_users();
    let config = NatsConfig {
        url: nats.url(),
        user: Some("dispatcher".into()),
        password: Some(service_password("dispatcher")),
        request_timeout: Duration::from_secs(1),
    };
    let connection = herald_shared::nats::connect(&config, "classify-test")
        .await
        .expect("connect");
    streams::ensure(
        &connection.jetstream,
        &StreamsConfig::default(),
        &[streams::EVENTS, streams::ACTIONS, streams::DLQ],
    )
    .await
    .expect("the dispatcher provisions its streams, the bodies bucket with them");
    let js = &connection.jetstream;
    let denied = publish::publish(
        js,
        "herald.jobs.submit.default",
        Default::default(),
        "{}".into(),
    )
    .await
    .expect_err("the dispatcher may not submit jobs");
    assert_eq!(
        denied,
        PublishFailure::PermissionDenied("herald.jobs.submit.default".into())
    );
    let big = vec![b'x'; 2 * 1024 * 1024];
    let too_large = publish::publish(
        js,
        "herald.actions.webhook.o",
        Default::default(),
        big.into(),
    )
    .await
    .expect_err("over max_payload");
    assert!(
        matches!(too_large, PublishFailure::TooLarge(_)),
        "{too_large:?}"
    );
    assert!(too_large.is_permanent());
    publish::publish(
        js,
        "herald.actions.webhook.o",
        Default::default(),
        "{}".into(),
    )
    .await
    .expect("a permitted, fitting publish is stored");
}

#[tokio::test]
async fn a_body_too_large_for_the_dead_letter_headers_is_kept_whole_in_the_bodies_bucket() {
    let nats = NatsServer::start_with("max_payload: 65536");
    let js = provisioned(&nats).await;
    // Fits on its own, not with the dead-letter headers beside it.
    let body: Vec<u8> = (0..65_400u32).map(|i| b'a' + (i % 26) as u8).collect();
    publish_event(&js, "e-big", body.clone()).await;
    let settler = Settler::new(
        js.clone(),
        DlqSource::Events,
        "settle-test",
        Duration::from_millis(100),
    );
    let mut messages = messages(&js).await;
    let message = next(&mut messages).await;
    assert_eq!(
        settler
            .settle(&message, Disposition::dead_letter("too big to dispatch"))
            .await,
        Settled::DeadLettered
    );
    let dlq = js.get_stream(DLQ_STREAM).await.expect("dlq");
    let letter = dlq.direct_get(1).await.expect("the dead letter");
    let info = DeadLetterInfo::from_headers(&letter.headers).expect("dead letter headers");
    assert!(letter.payload.is_empty(), "the body travels apart");
    let object = info
        .body_object
        .expect("Herald-Body-Object names the stored body");
    assert_eq!(object, "e-big:dlq");
    let restored = dlq::load_body(&js, &object).await.expect("stored body");
    assert_eq!(restored.as_ref(), body.as_slice());

    // Dead-lettering the same message again (a crash before TERM) is absorbed, body and all.
    let letter_again =
        dlq::DeadLetter::for_message(DlqSource::Events, &message, "again", 1, Utc::now());
    dlq::publish(
        &js,
        &letter_again,
        message.payload.clone(),
        message.headers.as_ref(),
        "t",
    )
    .await
    .expect("repeat absorbed");
    assert_eq!(stored(&js, DLQ_STREAM).await, 1);

    dlq::delete_body(&js, &object).await.expect("deleted");
    assert!(dlq::load_body(&js, &object).await.is_err());
    dlq::delete_body(&js, &object)
        .await
        .expect("deleting twice is fine");
}

#[tokio::test]
async fn settle_all_settles_a_whole_bulk_in_order_each_as_settle_would() {
    let nats = NatsServer::start();
    let js = provisioned(&nats).await;
    let settler = Settler::new(
        js.clone(),
        DlqSource::Events,
        "settle-test",
        Duration::from_millis(100),
    );
    for n in 0..200 {
        publish_event(
            &js,
            &format!("e-{n}"),
            format!("{{\"n\":{n}}}").into_bytes(),
        )
        .await;
    }
    let mut messages = messages(&js).await;
    let mut bulk = Vec::new();
    for _ in 0..200 {
        bulk.push(next(&mut messages).await);
    }
    // Every 50th is refused for good, every 10th (not 50th) comes again later, the rest are done.
    let disposition = |n: usize| {
        if n.is_multiple_of(50) {
            Disposition::dead_letter(format!("refused {n}"))
        } else if n.is_multiple_of(10) {
            Disposition::retry(Duration::from_millis(200))
        } else {
            Disposition::ack()
        }
    };
    let settled = settler
        .settle_all(
            bulk.iter()
                .enumerate()
                .map(|(n, m)| (m, disposition(n)))
                .collect(),
        )
        .await;
    assert_eq!(settled.len(), 200);
    for (n, s) in settled.iter().enumerate() {
        let expected = if n % 50 == 0 {
            Settled::DeadLettered
        } else if n % 10 == 0 {
            Settled::Retrying
        } else {
            Settled::Acked
        };
        assert_eq!(*s, expected, "message {n}");
    }
    assert_eq!(
        stored(&js, DLQ_STREAM).await,
        4,
        "one dead letter per refusal"
    );
    let mut again = Vec::new();
    for _ in 0..16 {
        let m = next(&mut messages).await;
        assert_eq!(m.info().expect("info").delivered, 2);
        again.push(m);
    }
    let mut redelivered: Vec<String> = again
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    redelivered.sort();
    let mut expected: Vec<String> = (0..200)
        .filter(|n| n % 10 == 0 && n % 50 != 0)
        .map(|n| format!("{{\"n\":{n}}}"))
        .collect();
    expected.sort();
    assert_eq!(redelivered, expected, "exactly the retried ones come again");
    settler
        .settle_all(again.iter().map(|m| (m, Disposition::ack())).collect())
        .await;
    let stream = js.get_stream(EVENTS_STREAM).await.expect("stream");
    let info = stream.consumer_info("settle-test").await.expect("consumer");
    assert_eq!(info.num_ack_pending, 0, "everything settled");
    assert!(
        tokio::time::timeout(Duration::from_millis(800), messages.next())
            .await
            .is_err(),
        "nothing else comes back"
    );
}

#[tokio::test]
async fn a_dlq_consumer_terminates_a_dead_letter_it_gives_up_on_without_a_new_one() {
    let nats = NatsServer::start();
    let js = provisioned(&nats).await;
    let letter = dlq::DeadLetter {
        source: DlqSource::Events,
        original_subject: "herald.events.Order.insert".into(),
        original_msg_id: "e-1".into(),
        error: "boom".into(),
        attempts: 1,
        first_failed_at: Utc::now(),
    };
    dlq::publish(&js, &letter, "{}".into(), None, "settle-test")
        .await
        .expect("dead letter stored");
    let mut messages = js
        .get_stream(DLQ_STREAM)
        .await
        .expect("stream")
        .create_consumer(pull::Config {
            durable_name: Some("dlq-reader".into()),
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            ..Default::default()
        })
        .await
        .expect("consumer")
        .messages()
        .await
        .expect("messages");
    let settler = Settler::for_dlq_consumer(js.clone(), "settle-test", Duration::from_millis(100));
    let message = next(&mut messages).await;
    assert_eq!(
        settler
            .settle(&message, Disposition::dead_letter("cannot index it"))
            .await,
        Settled::DeadLettered
    );
    assert_eq!(
        stored(&js, DLQ_STREAM).await,
        1,
        "no dead letter of a dead letter"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(800), messages.next())
            .await
            .is_err(),
        "terminated: it does not come back"
    );
    let stream = js.get_stream(DLQ_STREAM).await.expect("stream");
    let info = stream.consumer_info("dlq-reader").await.expect("consumer");
    assert_eq!(info.num_ack_pending, 0);
}

/// A message that failed (its first-failure time stored) and is then settled at what a
/// re-created consumer counts as its first delivery, by a new settler (a restarted dispatcher),
/// has its key removed from the bucket: a settler that recalls the stored keys first knows it.
#[tokio::test]
async fn a_first_failure_key_is_removed_when_a_recreated_consumer_settles_its_message() {
    let nats = NatsServer::start();
    let js = provisioned(&nats).await;
    let before = Settler::new(
        js.clone(),
        DlqSource::Events,
        "settle-test",
        Duration::from_millis(100),
    )
    .remembering_first_failures("test.leak");
    publish_event(&js, "e-leak", b"{}".to_vec()).await;
    let mut first = messages(&js).await;
    let message = next(&mut first).await;
    let sequence = message.info().expect("info").stream_sequence;
    assert_eq!(
        before
            .settle(&message, Disposition::retry(Duration::from_secs(30)))
            .await,
        Settled::Retrying
    );
    let bucket = consume::first_failures_bucket(&js, EVENTS_STREAM)
        .await
        .expect("bucket");
    let key = format!("test.leak.{sequence}");
    assert!(
        bucket.get(&key).await.expect("read").is_some(),
        "the first failure is stored"
    );

    // The consumer is re-created (as the dispatcher does at its ack floor) and a new settler
    // takes over: the message comes again as a first delivery.
    drop(first);
    js.get_stream(EVENTS_STREAM)
        .await
        .expect("stream")
        .delete_consumer("settle-test")
        .await
        .expect("delete consumer");
    let after = Settler::new(
        js.clone(),
        DlqSource::Events,
        "settle-test",
        Duration::from_millis(100),
    )
    .remembering_first_failures("test.leak");
    after.recall_first_failures().await;
    let mut again = messages(&js).await;
    let message = next(&mut again).await;
    assert_eq!(message.info().expect("info").delivered, 1);
    assert_eq!(message.info().expect("info").stream_sequence, sequence);
    assert_eq!(
        after.settle(&message, Disposition::ack()).await,
        Settled::Acked
    );
    assert!(
        bucket.get(&key).await.expect("read").is_none(),
        "the key of a settled message is removed, not left to expire"
    );
}
