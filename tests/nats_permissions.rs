//! `nats/auth.conf` against a real nats-server: each service user can do its own job (provision
//! the streams it touches, publish its own subjects, consume what it reads) and is refused
//! everything else; only the `cli` admin user may delete or purge a stream.
//!
//! A refused publish is not an error the publisher sees on the publish itself: the server drops
//! the message and sends `-ERR 'Permissions Violation ...'`, which async-nats reports through the
//! connection's event callback. The tests capture those events, and also check that nothing was
//! stored, so a refusal is proven by both the server's word and its effect.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use async_nats::{Event, ServerError};
use futures::StreamExt;
use herald_shared::config::StreamsConfig;
use herald_shared::headers;
use herald_shared::streams::{self, StreamSpec};
use herald_test_support::{
    NatsServer, eventually_async, free_port, service_password, workspace_root,
};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

/// A nats-server with JetStream whose users are exactly those of the repo's `nats/auth.conf`.
fn server_with_repo_users() -> NatsServer {
    NatsServer::start_with_service_users()
}

/// A connection as one of the configured users, with the server's complaints about it.
struct Session {
    client: async_nats::Client,
    js: jetstream::Context,
    server_errors: mpsc::UnboundedReceiver<String>,
}

impl Session {
    async fn open(nats: &NatsServer, user: &str) -> Self {
        let (tx, server_errors) = mpsc::unbounded_channel();
        let client = async_nats::ConnectOptions::new()
            .user_and_password(user.to_owned(), service_password(user))
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    if let Event::ServerError(ServerError::Other(text)) = event {
                        let _ = tx.send(text);
                    }
                }
            })
            .connect(nats.url())
            .await
            .unwrap_or_else(|e| panic!("connect as {user}: {e}"));
        let js = jetstream::new(client.clone());
        Self {
            client,
            js,
            server_errors,
        }
    }

    /// Waits for the server to report a permissions violation naming `subject`.
    async fn refused(&mut self, subject: &str) -> String {
        let wanted = format!("\"{subject}\"");
        let wait = async {
            while let Some(text) = self.server_errors.recv().await {
                if text.to_lowercase().contains("permissions violation") && text.contains(&wanted) {
                    return text;
                }
            }
            panic!("the connection closed before the server refused {subject}");
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("the server never refused {subject}"))
    }

    async fn publish_acked(&self, subject: &str) {
        self.js
            .publish(subject.to_owned(), "{}".into())
            .await
            .unwrap_or_else(|e| panic!("publish to {subject}: {e}"))
            .await
            .unwrap_or_else(|e| panic!("ack for {subject}: {e}"));
    }
}

async fn messages_in(js: &jetstream::Context, stream: &str) -> u64 {
    let mut stream = js.get_stream(stream).await.expect("stream exists");
    stream.info().await.expect("stream info").state.messages
}

async fn provision(session: &Session, specs: &[StreamSpec]) {
    streams::ensure(&session.js, &StreamsConfig::default(), specs)
        .await
        .expect("the service user provisions the streams it touches");
}

#[tokio::test]
async fn every_service_user_can_provision_its_streams_and_publish_its_own_subjects() {
    let nats = server_with_repo_users();
    let cases: [(&str, &[StreamSpec], &[&str]); 6] = [
        (
            "gateway",
            &[streams::EVENTS, streams::DLQ],
            &["herald.events.Order.insert", "herald.dlq.events"],
        ),
        (
            "dispatcher",
            &[streams::EVENTS, streams::ACTIONS, streams::DLQ],
            &["herald.actions.webhook.order_created", "herald.dlq.events"],
        ),
        (
            "action-worker",
            &[
                streams::ACTIONS,
                streams::OUTCOMES,
                streams::JOBS,
                streams::DLQ,
            ],
            &[
                "herald.outcomes.webhook.order_created",
                "herald.jobs.submit.default",
                "herald.dlq.actions",
            ],
        ),
        (
            "job-worker",
            &[streams::JOBS, streams::DLQ],
            &["herald.jobs.status.default", "herald.dlq.jobs"],
        ),
        (
            "auditor",
            &streams::ALL,
            &["herald.dlq.events", "herald.dlq.actions", "herald.dlq.jobs"],
        ),
        ("flight-streamer", &[streams::EVENTS], &[]),
    ];
    for (user, specs, subjects) in cases {
        let session = Session::open(&nats, user).await;
        provision(&session, specs).await;
        // Provisioning is idempotent under the same user: a restart must not be refused.
        provision(&session, specs).await;
        for subject in subjects {
            session.publish_acked(subject).await;
        }
    }
    let admin = Session::open(&nats, "cli").await;
    assert_eq!(messages_in(&admin.js, "HERALD_EVENTS").await, 1);
    assert_eq!(messages_in(&admin.js, "HERALD_DLQ").await, 7);
}

#[tokio::test]
async fn consumers_can_pull_ack_and_read_by_sequence_on_the_streams_they_read() {
    let nats = server_with_repo_users();
    let gateway = Session::open(&nats, "gateway").await;
    provision(&gateway, &[streams::EVENTS, streams::DLQ]).await;
    gateway.publish_acked("herald.events.Order.insert").await;

    let dispatcher = Session::open(&nats, "dispatcher").await;
    let events = dispatcher
        .js
        .get_stream("HERALD_EVENTS")
        .await
        .expect("dispatcher reads HERALD_EVENTS");
    let consumer = events
        .get_or_create_consumer(
            "dispatcher",
            pull::Config {
                durable_name: Some("dispatcher".into()),
                filter_subject: "herald.events.>".into(),
                ..Default::default()
            },
        )
        .await
        .expect("dispatcher creates its durable consumer");
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .expect("dispatcher pulls");
    let message = batch
        .next()
        .await
        .expect("one event")
        .expect("event delivered");
    message.double_ack().await.expect("dispatcher acks");
    // The dispatcher recreates its consumer when a checkpoint moves it (dispatcher/checkpoint.rs).
    events
        .delete_consumer("dispatcher")
        .await
        .expect("dispatcher deletes its own consumer");

    let auditor = Session::open(&nats, "auditor").await;
    let dlq = auditor
        .js
        .get_stream("HERALD_DLQ")
        .await
        .expect("auditor reads HERALD_DLQ");
    dlq.get_or_create_consumer(
        "auditor",
        pull::Config {
            durable_name: Some("auditor".into()),
            ..Default::default()
        },
    )
    .await
    .expect("auditor creates its durable consumer");
    // Its indexers: one filtered durable per stream, pulled and acked.
    let events = auditor
        .js
        .get_stream("HERALD_EVENTS")
        .await
        .expect("auditor reads HERALD_EVENTS");
    let consumer = events
        .create_consumer(pull::Config {
            durable_name: Some("auditor-events".into()),
            filter_subject: "herald.events.>".into(),
            ..Default::default()
        })
        .await
        .expect("auditor creates its events consumer");
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .expect("auditor pulls");
    let message = batch
        .next()
        .await
        .expect("one event")
        .expect("event delivered");
    message.double_ack().await.expect("auditor acks");
}

#[tokio::test]
async fn the_flight_streamer_reads_through_ordered_consumers_and_can_touch_no_other() {
    let nats = server_with_repo_users();
    let gateway = Session::open(&nats, "gateway").await;
    provision(&gateway, &[streams::EVENTS]).await;
    gateway.publish_acked("herald.events.Order.insert").await;
    let dispatcher = Session::open(&nats, "dispatcher").await;
    dispatcher
        .js
        .get_stream("HERALD_EVENTS")
        .await
        .expect("stream")
        .get_or_create_consumer(
            "dispatcher",
            pull::Config {
                durable_name: Some("dispatcher".into()),
                ..Default::default()
            },
        )
        .await
        .expect("the dispatcher's durable consumer");

    let mut streamer = Session::open(&nats, "flight-streamer").await;
    let events = streamer
        .js
        .get_stream("HERALD_EVENTS")
        .await
        .expect("flight-streamer reads HERALD_EVENTS");
    // What an event ticket does (services/flight-streamer/src/events.rs).
    let ordered = events
        .create_consumer(pull::OrderedConfig {
            name: Some("flight_test".into()),
            filter_subject: "herald.events.Order.>".into(),
            ..Default::default()
        })
        .await
        .expect("flight-streamer creates an ordered consumer");
    let mut messages = ordered.messages().await.expect("flight-streamer pulls");
    let first = tokio::time::timeout(WAIT, messages.next())
        .await
        .expect("an event in time")
        .expect("one event")
        .expect("event delivered");
    assert_eq!(first.subject.as_str(), "herald.events.Order.insert");
    let mut counting = events
        .create_consumer(pull::Config {
            name: Some("flight_count".into()),
            filter_subjects: vec!["herald.events.Order.insert".into()],
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("flight-streamer creates an ephemeral consumer to count");
    assert_eq!(counting.info().await.expect("consumer info").num_pending, 1);

    // Never a durable, never a delete of anyone's consumer, never an ack.
    for subject in [
        "$JS.API.CONSUMER.DURABLE.CREATE.HERALD_EVENTS.mine",
        "$JS.API.CONSUMER.DELETE.HERALD_EVENTS.dispatcher",
        "$JS.ACK.HERALD_EVENTS.dispatcher.1.1.1.0.0",
        "$JS.API.DIRECT.GET.HERALD_EVENTS",
    ] {
        streamer
            .client
            .publish(subject, "{}".into())
            .await
            .expect("the client sends the publish");
        streamer.client.flush().await.expect("flush");
        streamer.refused(subject).await;
    }
    let admin = Session::open(&nats, "cli").await;
    admin
        .js
        .get_stream("HERALD_EVENTS")
        .await
        .expect("stream")
        .consumer_info("dispatcher")
        .await
        .expect("the dispatcher's consumer is untouched");
}

#[tokio::test]
async fn the_dispatcher_keeps_checkpoints_leases_and_order_lines_in_its_kv_buckets() {
    let nats = server_with_repo_users();
    let dispatcher = Session::open(&nats, "dispatcher").await;
    for bucket in ["herald_checkpoints", "herald_leases", "herald_order"] {
        let kv = dispatcher
            .js
            .create_key_value(jetstream::kv::Config {
                bucket: bucket.into(),
                history: 1,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("dispatcher creates KV bucket {bucket}: {e}"));
        kv.put("observer_a", "42".into())
            .await
            .unwrap_or_else(|e| panic!("put into {bucket}: {e}"));
        let value = kv
            .get("observer_a")
            .await
            .unwrap_or_else(|e| panic!("get from {bucket}: {e}"));
        assert_eq!(value.as_deref(), Some(b"42".as_slice()));
    }
}

/// The dispatcher keeps first-failure times (the Settler's durable memory) in their bucket:
/// created by the shared code, written once, read and purged.
#[tokio::test]
async fn the_dispatcher_keeps_first_failure_times_in_their_bucket() {
    let nats = server_with_repo_users();
    let dispatcher = Session::open(&nats, "dispatcher").await;
    // As at the dispatcher's start: the bucket takes the copies of the stream it follows.
    provision(
        &dispatcher,
        &[streams::EVENTS, streams::ACTIONS, streams::DLQ],
    )
    .await;
    let kv = herald_shared::consume::first_failures_bucket(
        &dispatcher.js,
        herald_shared::subjects::EVENTS_STREAM,
    )
    .await
    .expect("the dispatcher creates the first-failure bucket");
    kv.create("dispatcher.main.7", "2026-01-01T00:00:00Z".into())
        .await
        .expect("create a first-failure time");
    let value = kv.get("dispatcher.main.7").await.expect("read it back");
    assert_eq!(value.as_deref(), Some(b"2026-01-01T00:00:00Z".as_slice()));
    kv.purge("dispatcher.main.7").await.expect("purge it");
    assert_eq!(kv.get("dispatcher.main.7").await.expect("read"), None);
    // Opened again (a restart) it is found, not re-created.
    herald_shared::consume::first_failures_bucket(
        &dispatcher.js,
        herald_shared::subjects::EVENTS_STREAM,
    )
    .await
    .expect("the bucket is found again");
}

#[tokio::test]
async fn a_service_user_is_refused_outside_its_subjects() {
    let nats = server_with_repo_users();
    let admin = Session::open(&nats, "cli").await;
    streams::ensure_all(&admin.js, &StreamsConfig::default())
        .await
        .expect("cli provisions every stream");

    let cases = [
        ("gateway", "herald.actions.webhook.x"),
        ("gateway", "herald.dlq.actions"),
        ("dispatcher", "herald.events.Order.insert"),
        ("action-worker", "herald.events.Order.insert"),
        ("job-worker", "herald.jobs.submit.default"),
        ("auditor", "herald.outcomes.webhook.x"),
        ("auditor", "herald.events.Order.insert"),
        ("flight-streamer", "herald.events.Order.insert"),
    ];
    for (user, subject) in cases {
        let mut session = Session::open(&nats, user).await;
        session
            .client
            .publish(subject, "{}".into())
            .await
            .expect("the client sends the publish");
        session.client.flush().await.expect("flush");
        session.refused(subject).await;
    }

    // The refusals were real: nothing reached any stream.
    for spec in streams::ALL {
        assert_eq!(messages_in(&admin.js, spec.name).await, 0, "{}", spec.name);
    }
}

#[tokio::test]
async fn a_service_user_cannot_read_a_stream_it_does_not_consume() {
    let nats = server_with_repo_users();
    let admin = Session::open(&nats, "cli").await;
    streams::ensure_all(&admin.js, &StreamsConfig::default())
        .await
        .expect("cli provisions every stream");
    let mut gateway = Session::open(&nats, "gateway").await;
    let subject = "$JS.API.CONSUMER.CREATE.HERALD_ACTIONS";
    let js = gateway.js.clone();
    tokio::select! {
        created = js.get_stream("HERALD_ACTIONS") => {
            panic!("gateway's look-up of HERALD_ACTIONS was answered (ok: {})", created.is_ok());
        }
        _ = gateway.refused("$JS.API.STREAM.INFO.HERALD_ACTIONS") => {}
    }
    gateway
        .client
        .publish(subject, "{}".into())
        .await
        .expect("the client sends the request");
    gateway.refused(subject).await;
}

#[tokio::test]
async fn no_service_user_can_delete_or_purge_a_stream_or_a_message() {
    let nats = server_with_repo_users();
    let admin = Session::open(&nats, "cli").await;
    streams::ensure_all(&admin.js, &StreamsConfig::default())
        .await
        .expect("cli provisions every stream");
    admin.publish_acked("herald.jobs.submit.default").await;

    let mut worker = Session::open(&nats, "job-worker").await;
    let js = worker.js.clone();
    tokio::select! {
        deleted = js.delete_stream("HERALD_JOBS") => {
            panic!("job-worker deleting HERALD_JOBS was answered (ok: {})", deleted.is_ok());
        }
        _ = worker.refused("$JS.API.STREAM.DELETE.HERALD_JOBS") => {}
    }

    let mut worker = Session::open(&nats, "action-worker").await;
    let jobs = worker
        .js
        .get_stream("HERALD_JOBS")
        .await
        .expect("action-worker looks up a stream it provisions");
    tokio::select! {
        purged = jobs.purge() => {
            panic!("action-worker purging HERALD_JOBS was answered: {purged:?}");
        }
        _ = worker.refused("$JS.API.STREAM.PURGE.HERALD_JOBS") => {}
    }
    tokio::select! {
        deleted = jobs.delete_message(1) => {
            panic!("action-worker deleting message 1 was answered: {deleted:?}");
        }
        _ = worker.refused("$JS.API.STREAM.MSG.DELETE.HERALD_JOBS") => {}
    }

    assert_eq!(messages_in(&admin.js, "HERALD_JOBS").await, 1);
}

#[tokio::test]
async fn the_cli_user_can_purge_and_delete_a_stream() {
    let nats = server_with_repo_users();
    let admin = Session::open(&nats, "cli").await;
    streams::ensure_all(&admin.js, &StreamsConfig::default())
        .await
        .expect("cli provisions every stream");
    admin.publish_acked("herald.dlq.jobs").await;
    let dlq = admin.js.get_stream("HERALD_DLQ").await.expect("DLQ exists");
    dlq.purge().await.expect("cli purges HERALD_DLQ");
    assert_eq!(messages_in(&admin.js, "HERALD_DLQ").await, 0);
    admin
        .js
        .delete_stream("HERALD_JOBS")
        .await
        .expect("cli deletes HERALD_JOBS");
    assert!(admin.js.get_stream("HERALD_JOBS").await.is_err());
}

#[tokio::test]
async fn the_job_worker_answers_job_management_requests() {
    let nats = server_with_repo_users();
    let worker = Session::open(&nats, "job-worker").await;
    let mut requests = worker
        .client
        .queue_subscribe(
            herald_shared::subjects::JOBS_CONTROL_ALL,
            "job-workers".to_owned(),
        )
        .await
        .expect("job-worker subscribes to job management");
    worker.client.flush().await.expect("flush");
    let responder = worker.client.clone();
    tokio::spawn(async move {
        if let Some(request) = requests.next().await
            && let Some(reply) = request.reply
        {
            responder
                .publish(reply, "[]".into())
                .await
                .expect("job-worker answers");
        }
    });
    let admin = Session::open(&nats, "cli").await;
    let answer = tokio::time::timeout(
        WAIT,
        admin
            .client
            .request("herald.control.jobs.list", "{}".into()),
    )
    .await
    .expect("answered in time")
    .expect("job-worker's answer reaches the requester");
    assert_eq!(answer.payload.as_ref(), b"[]");
}

#[tokio::test]
async fn a_wrong_password_is_refused() {
    let nats = server_with_repo_users();
    let refused = async_nats::ConnectOptions::new()
        .user_and_password("gateway".into(), "not-the-password".into())
        .connect(nats.url())
        .await;
    assert!(refused.is_err(), "a wrong password got a connection");
}

/// A server process that is killed when the test ends, however it ends.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_shipped_server_config_runs_jetstream_with_the_service_users() {
    // Started the way scripts/dev starts it: the shipped file, placed by command-line flags.
    let store = tempfile::tempdir().expect("store dir");
    let (port, monitor) = (free_port(), free_port());
    let binary = herald_test_support::nats_server_binary();
    let _server = Running(
        std::process::Command::new(&binary)
            .arg("-c")
            .arg(workspace_root().join("nats/nats-server.conf"))
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(["-m", &monitor.to_string(), "-sd"])
            .arg(store.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "start {} -c nats/nats-server.conf: {e} (scripts/install-deps installs it; \
                     HERALD_NATS_SERVER names another)",
                    binary.display()
                )
            }),
    );
    let url = format!("nats://127.0.0.1:{port}");
    let client = eventually_async(
        "the shipped config to accept the gateway user",
        WAIT,
        || async {
            async_nats::ConnectOptions::new()
                .user_and_password("gateway".into(), service_password("gateway"))
                .connect(url.as_str())
                .await
                .ok()
        },
    )
    .await;
    assert_eq!(client.server_info().max_payload, 8 * 1024 * 1024);
    let js = jetstream::new(client);
    streams::ensure(
        &js,
        &StreamsConfig::default(),
        &[streams::EVENTS, streams::DLQ],
    )
    .await
    .expect("the gateway provisions its streams on the shipped config");
    js.publish("herald.events.Order.insert", "{}".into())
        .await
        .expect("publish")
        .await
        .expect("stored by JetStream");
}

#[tokio::test]
async fn every_dead_lettering_user_can_store_a_dead_letter_body_and_none_can_delete_one() {
    let nats = server_with_repo_users();
    for user in ["gateway", "dispatcher", "action-worker", "job-worker"] {
        let session = Session::open(&nats, user).await;
        provision(&session, &[streams::DLQ]).await;
        let bucket = session
            .js
            .get_object_store(herald_shared::dlq::BODIES_BUCKET)
            .await
            .unwrap_or_else(|e| panic!("{user} opens the bodies bucket: {e}"));
        let name = format!("{user}:body:dlq");
        let mut body: &[u8] = b"an original body too large to travel inline";
        bucket
            .put(name.as_str(), &mut body)
            .await
            .unwrap_or_else(|e| panic!("{user} stores a dead letter body: {e}"));
        bucket
            .info(name.as_str())
            .await
            .unwrap_or_else(|e| panic!("{user} reads its info back: {e}"));
    }
    let auditor = Session::open(&nats, "auditor").await;
    let bucket = auditor
        .js
        .get_object_store(herald_shared::dlq::BODIES_BUCKET)
        .await
        .expect("the auditor opens the bodies bucket");
    let mut read = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(
        &mut bucket
            .get("gateway:body:dlq")
            .await
            .expect("the auditor reads a body"),
        &mut read,
    )
    .await
    .expect("body");
    assert_eq!(read, b"an original body too large to travel inline");

    let mut worker = Session::open(&nats, "job-worker").await;
    let stream = worker
        .js
        .get_stream(herald_shared::dlq::BODIES_STREAM)
        .await
        .expect("stream");
    tokio::select! {
        purged = stream.purge() => panic!("job-worker purging the bodies was answered: {purged:?}"),
        _ = worker.refused("$JS.API.STREAM.PURGE.OBJ_herald_dlq_bodies") => {}
    }
}

/// The `custom-worker` user: a worker written outside Herald (examples/python) consumes a custom
/// kind's actions and the events, and publishes its outcomes and action dead letters.
#[tokio::test]
async fn a_custom_worker_consumes_actions_and_events_and_publishes_outcomes_and_dead_letters() {
    let nats = server_with_repo_users();
    let admin = Session::open(&nats, "cli").await;
    streams::ensure_all(&admin.js, &StreamsConfig::default())
        .await
        .expect("cli provisions every stream");
    admin.publish_acked("herald.actions.invoice.billing").await;
    admin.publish_acked("herald.events.Order.insert").await;

    let worker = Session::open(&nats, "custom-worker").await;
    for (stream, filter) in [
        ("HERALD_ACTIONS", "herald.actions.invoice.>"),
        ("HERALD_EVENTS", "herald.events.Order.>"),
    ] {
        let consumer: jetstream::consumer::Consumer<pull::Config> = worker
            .js
            .create_consumer_on_stream(
                pull::Config {
                    durable_name: Some("invoicing".into()),
                    filter_subject: filter.into(),
                    ..Default::default()
                },
                stream,
            )
            .await
            .unwrap_or_else(|e| panic!("custom-worker creates a durable on {stream}: {e}"));
        let mut messages = consumer
            .fetch()
            .max_messages(1)
            .messages()
            .await
            .expect("custom-worker pulls");
        let message = tokio::time::timeout(WAIT, messages.next())
            .await
            .expect("a message within the wait")
            .expect("one message")
            .expect("a delivered message");
        message.double_ack().await.expect("custom-worker acks");
        let again: jetstream::consumer::Consumer<pull::Config> = worker
            .js
            .get_consumer_from_stream("invoicing", stream)
            .await
            .unwrap_or_else(|e| panic!("custom-worker reads its consumer on {stream}: {e}"));
        let info = again.cached_info();
        assert_eq!(
            info.ack_floor.stream_sequence, 1,
            "{stream}: the ack was taken"
        );
    }

    worker
        .publish_acked("herald.outcomes.invoice.billing")
        .await;
    worker.publish_acked("herald.dlq.actions").await;
    assert_eq!(messages_in(&admin.js, "HERALD_OUTCOMES").await, 1);
    assert_eq!(messages_in(&admin.js, "HERALD_DLQ").await, 1);
}

/// Why the `custom-worker` user may not publish scheduled retries: nats-server checks the
/// publisher's permissions on a schedule's own subject, never on its `Nats-Schedule-Target`, so
/// whoever may publish on `herald.actions._scheduled.>` may have any action published. Here the
/// action worker, which may schedule but never publish an action itself, gets a webhook action
/// published. (Should a server version check the target, custom workers can be given the
/// schedule grant of their own kind.)
#[tokio::test]
async fn a_schedule_is_published_on_its_target_whatever_the_publisher_may_publish() {
    let nats = server_with_repo_users();
    let admin = Session::open(&nats, "cli").await;
    streams::ensure_all(&admin.js, &StreamsConfig::default())
        .await
        .expect("cli provisions every stream");
    let mut worker = Session::open(&nats, "action-worker").await;
    let target = "herald.actions.webhook.order_created";
    worker
        .client
        .publish(target, "{}".into())
        .await
        .expect("the client sends the publish");
    worker.client.flush().await.expect("flush");
    worker.refused(target).await;

    let msg_id = "scheduled-by-action-worker:after:1";
    let mut schedule = async_nats::HeaderMap::new();
    schedule.insert(headers::MSG_ID, msg_id);
    let due = chrono::Utc::now() + chrono::Duration::milliseconds(300);
    schedule.insert(
        headers::SCHEDULE,
        format!(
            "@at {}",
            due.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        )
        .as_str(),
    );
    schedule.insert(headers::SCHEDULE_TARGET, target);
    let subject = herald_shared::subjects::scheduled_action(target, msg_id)
        .expect("a schedule subject for an action subject");
    worker
        .js
        .publish_with_headers(subject.clone(), schedule, "{}".into())
        .await
        .unwrap_or_else(|e| panic!("publish the schedule on {subject}: {e}"))
        .await
        .unwrap_or_else(|e| panic!("the stream stores the schedule on {subject}: {e}"));
    let stream = admin
        .js
        .get_stream("HERALD_ACTIONS")
        .await
        .expect("HERALD_ACTIONS");
    let fired = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(message) = stream.get_last_raw_message_by_subject(target).await {
                return message;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the server publishes the schedule on its target when it is due");
    assert_eq!(fired.subject.as_str(), target);
}

#[tokio::test]
async fn a_custom_worker_is_refused_everything_else() {
    let nats = server_with_repo_users();
    let admin = Session::open(&nats, "cli").await;
    streams::ensure_all(&admin.js, &StreamsConfig::default())
        .await
        .expect("cli provisions every stream");
    let mut worker = Session::open(&nats, "custom-worker").await;
    for subject in [
        "herald.events.Order.insert",
        "herald.actions.invoice.billing",
        "herald.dlq.events",
        "herald.dlq.jobs",
        "herald.jobs.submit.default",
        "herald.jobs.status.default",
        // A scheduled copy may target any action subject (the test above): custom workers
        // retry with NAK-and-delay on their own consumer.
        "herald.actions._scheduled.invoice.billing.0123456789abcdef",
        // Another worker's consumer is not its to delete, nor a stream to set up or remove.
        "$JS.API.CONSUMER.DELETE.HERALD_ACTIONS.action-worker",
        "$JS.API.CONSUMER.CREATE.HERALD_DLQ.peek",
        "$JS.API.CONSUMER.CREATE.HERALD_JOBS.peek",
        "$JS.API.STREAM.CREATE.HERALD_CUSTOM",
        "$JS.API.STREAM.PURGE.HERALD_ACTIONS",
    ] {
        worker
            .client
            .publish(subject, "{}".into())
            .await
            .expect("the client sends the publish");
        worker.client.flush().await.expect("flush");
        worker.refused(subject).await;
    }
    for spec in streams::ALL {
        assert_eq!(messages_in(&admin.js, spec.name).await, 0, "{}", spec.name);
    }
}
