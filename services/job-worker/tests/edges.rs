//! The job worker's edges: a dead job replayed from the DLQ runs again (once, however often the
//! replay repeats), a status entry that can never be published is set aside instead of blocking
//! every later one, and a job id that could not travel in a header is refused at intake.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use common::{Events, Servers, TestHandler, WAIT, Worker, job, policy, settings, submit};
use futures::FutureExt;
use herald_job_worker::{HandlerError, Registry};
use herald_shared::subjects::{self, DLQ_STREAM, DlqSource};
use herald_shared::{JobState, headers};
use herald_test_support::eventually_async;
use serde_json::json;

/// Every dead letter for jobs, without consuming anything.
async fn dead_letters(js: &jetstream::Context) -> Vec<jetstream::message::StreamMessage> {
    let stream = js.get_stream(DLQ_STREAM).await.expect("dlq stream");
    let mut out = Vec::new();
    let mut next = 1;
    while let Ok(message) = stream
        .direct_get_next_for_subject(DlqSource::Jobs.subject(), Some(next))
        .await
    {
        next = message.sequence + 1;
        out.push(message);
    }
    out
}

/// Publishes a dead letter back to its subject the way `herald dlq replay` does.
async fn replay(
    js: &jetstream::Context,
    letter: &jetstream::message::StreamMessage,
) -> jetstream::publish::PublishAck {
    let original = letter
        .headers
        .get(headers::ORIGINAL_MSG_ID)
        .expect("original msg id")
        .as_str()
        .to_owned();
    let subject = letter
        .headers
        .get(headers::ORIGINAL_SUBJECT)
        .expect("original subject")
        .as_str()
        .to_owned();
    let mut replayed = HeaderMap::new();
    replayed.insert(
        headers::MSG_ID,
        format!("{original}:replay:{}", letter.sequence).as_str(),
    );
    replayed.insert(headers::REPLAYED_FROM, letter.sequence.to_string().as_str());
    js.send_publish(
        subject,
        PublishMessage::build()
            .payload(letter.payload.clone())
            .headers(replayed),
    )
    .await
    .expect("publish the replay")
    .await
    .expect("replay stored")
}

#[tokio::test]
async fn a_dead_job_replayed_from_the_dlq_runs_again_as_a_new_attempt_series() {
    let servers = Servers::start().await;
    let events = Events::record(&servers.jetstream).await;
    let healed = Arc::new(AtomicBool::new(false));
    let flag = healed.clone();
    let handler = TestHandler::new(move |_, _| {
        let ok = flag.load(Ordering::SeqCst);
        async move {
            if ok {
                Ok(json!("fixed"))
            } else {
                Err(HandlerError::Permanent("broken".into()))
            }
        }
        .boxed()
    });
    let worker = Worker::start(
        &servers,
        settings(&servers.redis.url()),
        Registry::new().register("test", handler.clone()),
    )
    .await;
    let mut dying = job("d1", "default", "test", json!({}));
    dying.retry = policy(1);
    submit(&servers.jetstream, &dying).await;
    events.wait_for("d1", JobState::Dead).await;
    let letter = eventually_async("the dead letter", WAIT, || async {
        dead_letters(&servers.jetstream).await.into_iter().next()
    })
    .await;

    healed.store(true, Ordering::SeqCst);
    replay(&servers.jetstream, &letter).await;
    events.wait_for("d1", JobState::Succeeded).await;

    // The same entry replayed again after JetStream's duplicate window (a CLI that crashed
    // before deleting it, days later) is stored by JetStream, and absorbed by the job worker.
    let js = &servers.jetstream;
    let mut stream = js
        .get_stream(subjects::JOBS_STREAM)
        .await
        .expect("jobs stream");
    let mut config = stream.info().await.expect("info").config.clone();
    config.duplicate_window = std::time::Duration::from_millis(100);
    js.update_stream(config).await.expect("shrink the window");
    let probe = || async {
        let mut id = HeaderMap::new();
        id.insert(headers::MSG_ID, "window-probe");
        js.send_publish(
            subjects::job_submit("probe").expect("subject"),
            PublishMessage::build()
                .payload(Bytes::from_static(b"not a job"))
                .headers(id),
        )
        .await
        .expect("publish a probe")
        .await
        .expect("probe answered")
    };
    probe().await;
    eventually_async("the duplicate window passed", WAIT, || async {
        (!probe().await.duplicate).then_some(())
    })
    .await;
    let again = replay(js, &letter).await;
    assert!(!again.duplicate, "JetStream no longer remembers the replay");
    let intake = settings(&servers.redis.url()).consumer;
    eventually_async("intake handled the repeat", WAIT, || async {
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer(&intake).await.ok()?;
        let info = consumer.info().await.ok()?;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    })
    .await;
    assert_eq!(handler.runs("d1"), 2, "one dead run, one replayed run");
    assert_eq!(
        events.states("d1"),
        [
            (JobState::Pending, 0),
            (JobState::Running, 1),
            (JobState::Dead, 1),
            (JobState::Pending, 1),
            (JobState::Running, 2),
            (JobState::Succeeded, 2),
        ]
    );
    worker.stop().await;
}

#[tokio::test]
async fn an_unpublishable_status_entry_is_set_aside_and_later_events_flow() {
    let servers = Servers::start().await;
    let events = Events::record(&servers.jetstream).await;
    let settings = settings(&servers.redis.url());
    let client = redis::Client::open(servers.redis.url()).expect("redis url");
    let mut redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let huge = format!("\"{}\"", "x".repeat(2 * 1024 * 1024));
    let now = chrono::Utc::now().timestamp_millis().to_string();
    for (id, result) in [("bad\nid", "1"), ("huge", huge.as_str())] {
        let _: String = redis::cmd("XADD")
            .arg(format!("{}:outbox", settings.key_prefix))
            .arg("*")
            .arg(&[
                ("kind", "status"),
                ("job", id),
                ("queue", "default"),
                ("type", "test"),
                ("state", "succeeded"),
                ("attempt", "1"),
                ("at", now.as_str()),
                ("traceparent", "00-bad\r\n"),
                ("result", result),
            ])
            .query_async(&mut redis)
            .await
            .expect("write a poison outbox entry");
    }
    let handler = TestHandler::new(|_, _| async { Ok(json!("ok")) }.boxed());
    let worker = Worker::start(
        &servers,
        settings.clone(),
        Registry::new().register("test", handler),
    )
    .await;
    submit(
        &servers.jetstream,
        &job("fine", "default", "test", json!({})),
    )
    .await;
    events.wait_for("fine", JobState::Succeeded).await;

    let parked: Vec<(String, Vec<(String, String)>)> =
        eventually_async("both poison entries parked", WAIT, || async {
            let reply: redis::streams::StreamRangeReply = redis::AsyncCommands::xrange_all(
                &mut redis.clone(),
                format!("{}:outbox:parked", settings.key_prefix),
            )
            .await
            .ok()?;
            let rows: Vec<_> = reply
                .ids
                .into_iter()
                .map(|e| {
                    let fields = e
                        .map
                        .into_iter()
                        .filter_map(|(k, v)| Some((k, redis::from_redis_value::<String>(v).ok()?)))
                        .collect();
                    (e.id, fields)
                })
                .collect();
            (rows.len() == 2).then_some(rows)
        })
        .await;
    let reasons: Vec<&str> = parked
        .iter()
        .flat_map(|(_, f)| {
            f.iter()
                .filter(|(k, _)| k == "reason")
                .map(|(_, v)| v.as_str())
        })
        .collect();
    assert!(reasons[0].contains("header"), "{reasons:?}");
    assert!(reasons[1].contains("payload"), "{reasons:?}");
    let notices = dead_letters(&servers.jetstream).await;
    assert_eq!(notices.len(), 2, "one DLQ notice per parked entry");
    assert!(events.of("huge").is_empty() && events.of("bad\nid").is_empty());
    worker.stop().await;
}

#[tokio::test]
async fn a_job_id_that_cannot_travel_in_a_header_is_dead_lettered_at_intake() {
    let servers = Servers::start().await;
    let handler = TestHandler::new(|_, _| async { Ok(json!("ok")) }.boxed());
    let worker = Worker::start(
        &servers,
        settings(&servers.redis.url()),
        Registry::new().register("test", handler.clone()),
    )
    .await;
    let bad = job("line\nbreak", "default", "test", json!({}));
    let mut submission = HeaderMap::new();
    submission.insert(headers::MSG_ID, "submission-1");
    servers
        .jetstream
        .send_publish(
            subjects::job_submit("default").expect("subject"),
            PublishMessage::build()
                .payload(Bytes::from(serde_json::to_vec(&bad).expect("json")))
                .headers(submission),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    let letter = eventually_async("the refused submission", WAIT, || async {
        dead_letters(&servers.jetstream).await.into_iter().next()
    })
    .await;
    let error = letter
        .headers
        .get(headers::ERROR)
        .expect("reason")
        .to_string();
    assert!(error.contains("job id"), "{error}");
    assert_eq!(handler.runs("line\nbreak"), 0);
    worker.stop().await;
}

/// A status event larger than the jobs stream's maximum message size (JetStream error 10054, a
/// refusal no retry can change) is set aside at its first refusal, not after `MAX_REFUSALS`
/// tries, and the events behind it flow.
#[tokio::test]
async fn a_status_too_large_for_the_stream_is_set_aside_at_once() {
    let servers = Servers::start().await;
    let events = Events::record(&servers.jetstream).await;
    let settings = settings(&servers.redis.url());
    let handler = TestHandler::new(|job, _| {
        async move {
            if job.id == "big" {
                Ok(json!("x".repeat(8192)))
            } else {
                Ok(json!("ok"))
            }
        }
        .boxed()
    });
    let worker = Worker::start(
        &servers,
        settings.clone(),
        Registry::new().register("test", handler),
    )
    .await;
    let mut stream = servers
        .jetstream
        .get_stream(subjects::JOBS_STREAM)
        .await
        .expect("jobs stream");
    let config = jetstream::stream::Config {
        max_message_size: 4096,
        ..stream.info().await.expect("stream info").config.clone()
    };
    servers
        .jetstream
        .update_stream(config)
        .await
        .expect("limit the jobs stream");
    submit(
        &servers.jetstream,
        &job("big", "default", "test", json!({})),
    )
    .await;
    submit(
        &servers.jetstream,
        &job("fine", "default", "test", json!({})),
    )
    .await;
    events.wait_for("fine", JobState::Succeeded).await;
    events.wait_for("big", JobState::Running).await;

    let client = redis::Client::open(servers.redis.url()).expect("redis url");
    let redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let reason: String = eventually_async("the big status parked", WAIT, || async {
        let reply: redis::streams::StreamRangeReply = redis::AsyncCommands::xrange_all(
            &mut redis.clone(),
            format!("{}:outbox:parked", settings.key_prefix),
        )
        .await
        .ok()?;
        reply
            .ids
            .into_iter()
            .find_map(|e| redis::from_redis_value::<String>(e.map.get("reason")?.clone()).ok())
    })
    .await;
    assert!(reason.contains("too large"), "{reason}");
    assert!(
        !reason.contains("refused"),
        "set aside at once, not after repeated refusals: {reason}"
    );
    assert!(
        !events
            .of("big")
            .iter()
            .any(|s| s.state == JobState::Succeeded),
        "the oversize status was never stored"
    );
    worker.stop().await;
}
