//! The shared plumbing against a real nats-server: streams are provisioned idempotently with the
//! configured limits, dead letters carry their story and collapse on repeat, and trace context
//! crosses a message.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use herald_shared::config::StreamsConfig;
use herald_shared::dlq::{self, DeadLetter, DeadLetterInfo};
use herald_shared::headers;
use herald_shared::streams;
use herald_shared::subjects::{DLQ_STREAM, DlqSource};
use herald_test_support::NatsServer;

#[tokio::test]
async fn provisioning_creates_all_five_streams_and_is_idempotent() {
    let nats = NatsServer::start();
    let js = nats.jetstream().await;
    let config = StreamsConfig::default();
    streams::ensure_all(&js, &config)
        .await
        .expect("first provisioning");
    streams::ensure_all(&js, &config)
        .await
        .expect("second provisioning changes nothing");
    for spec in streams::ALL {
        let mut stream = js.get_stream(spec.name).await.expect("stream exists");
        let info = stream.info().await.expect("stream info");
        assert_eq!(info.config.subjects, spec.subjects);
        assert_eq!(info.config.duplicate_window, config.duplicate_window);
        assert_eq!(info.config.storage, jetstream::stream::StorageType::File);
    }
}

#[tokio::test]
async fn changed_limits_update_an_existing_stream_in_place() {
    let nats = NatsServer::start();
    let js = nats.jetstream().await;
    let mut config = StreamsConfig::default();
    streams::ensure(&js, &config, &[streams::EVENTS])
        .await
        .expect("create");
    js.publish("herald.events.Order.insert", "{}".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    config.events.max_age = Duration::from_secs(3 * 24 * 3600);
    streams::ensure(&js, &config, &[streams::EVENTS])
        .await
        .expect("update");
    let mut stream = js.get_stream(streams::EVENTS.name).await.expect("stream");
    let info = stream.info().await.expect("info");
    assert_eq!(info.config.max_age, config.events.max_age);
    assert_eq!(info.state.messages, 1, "updating must not lose messages");
}

#[tokio::test]
async fn a_dead_letter_keeps_body_headers_and_reason_and_repeats_collapse() {
    let nats = NatsServer::start();
    let js = nats.jetstream().await;
    streams::ensure_all(&js, &StreamsConfig::default())
        .await
        .expect("streams");

    let mut original = async_nats::HeaderMap::new();
    original.insert(headers::MSG_ID, "evt-1:notify:0");
    original.insert(
        headers::TRACEPARENT,
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    );
    let letter = DeadLetter {
        source: DlqSource::Actions,
        original_subject: "herald.actions.webhook.notify".into(),
        original_msg_id: "evt-1:notify:0".into(),
        error: "receiver answered 410 Gone".into(),
        attempts: 1,
        first_failed_at: chrono::Utc::now(),
    };
    for _ in 0..2 {
        dlq::publish(&js, &letter, "{\"body\":1}".into(), Some(&original), "test")
            .await
            .expect("dead-lettered");
    }

    let mut stream = js.get_stream(DLQ_STREAM).await.expect("dlq stream");
    assert_eq!(
        stream.info().await.expect("info").state.messages,
        1,
        "the same dead letter twice is stored once"
    );
    let stored = stream
        .get_raw_message(1)
        .await
        .expect("dead letter at seq 1");
    assert_eq!(stored.subject.as_str(), "herald.dlq.actions");
    assert_eq!(&stored.payload[..], b"{\"body\":1}");
    let info = DeadLetterInfo::from_headers(&stored.headers).expect("dead letter headers");
    assert_eq!(info.original_subject, "herald.actions.webhook.notify");
    assert_eq!(info.error, "receiver answered 410 Gone");
    assert_eq!(info.attempts, 1);
    assert_eq!(
        stored.headers.get(headers::TRACEPARENT).map(|v| v.as_str()),
        original.get(headers::TRACEPARENT).map(|v| v.as_str()),
        "the trace continues into the DLQ"
    );
}

#[tokio::test]
async fn dead_lettering_a_consumed_message_terminates_it() {
    let nats = NatsServer::start();
    let js = nats.jetstream().await;
    streams::ensure_all(&js, &StreamsConfig::default())
        .await
        .expect("streams");
    js.publish("herald.events.Order.insert", "not json".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let consumer = js
        .get_stream(streams::EVENTS.name)
        .await
        .expect("stream")
        .create_consumer(pull::Config {
            durable_name: Some("t".into()),
            ack_wait: Duration::from_millis(500),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let message = messages
        .next()
        .await
        .expect("one message")
        .expect("message");
    let letter = DeadLetter::for_message(
        DlqSource::Events,
        &message,
        "malformed JSON",
        1,
        chrono::Utc::now(),
    );
    assert_eq!(
        letter.original_msg_id, "HERALD_EVENTS:1",
        "no Msg-Id: stream and sequence"
    );
    dlq::dead_letter_message(&js, &message, &letter, "test")
        .await
        .expect("dead-lettered");

    // Terminated: not redelivered after ack_wait.
    let redelivered = tokio::time::timeout(Duration::from_secs(2), messages.next()).await;
    assert!(redelivered.is_err(), "a dead-lettered message came back");
    let mut dlq_stream = js.get_stream(DLQ_STREAM).await.expect("dlq");
    assert_eq!(dlq_stream.info().await.expect("info").state.messages, 1);
}

#[tokio::test]
async fn keyed_events_are_stored_with_the_partition_of_their_key() {
    use herald_shared::messages::Op;
    use herald_shared::subjects;
    let nats = NatsServer::start();
    let js = nats.jetstream().await;
    let config = StreamsConfig {
        event_partitions: 4,
        ..StreamsConfig::default()
    };
    streams::ensure(&js, &config, &[streams::EVENTS])
        .await
        .expect("create");
    let mut stream = js.get_stream(streams::EVENTS.name).await.expect("stream");
    let info = stream.info().await.expect("info");
    assert_eq!(streams::event_partitions(&info.config), 4);
    let keys: Vec<String> = (0..40).map(|k| format!("order-{k}")).collect();
    for key in keys.iter().chain(keys.iter()) {
        js.publish(
            subjects::keyed_event("Order", Op::Update, key).expect("subject"),
            key.clone().into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    }
    // An event without a key token is stored as sent.
    js.publish("herald.events.Order.insert", "legacy".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let reader = stream
        .create_consumer(pull::Config {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = reader.messages().await.expect("messages");
    let mut partition_of = std::collections::HashMap::new();
    let mut used = std::collections::HashSet::new();
    for _ in 0..keys.len() * 2 {
        let message = messages.next().await.expect("message").expect("message");
        let key = String::from_utf8(message.payload.to_vec()).expect("text");
        let tokens: Vec<&str> = message.subject.split('.').collect();
        assert_eq!(tokens.len(), 6, "{}", message.subject);
        assert_eq!(tokens[4], subjects::key_token(&key));
        let partition: u32 = tokens[5].parse().expect("a partition number");
        assert!(partition < 4);
        used.insert(partition);
        // Every event of one key lands in the same partition.
        assert_eq!(*partition_of.entry(key).or_insert(partition), partition);
    }
    assert_eq!(used.len(), 4, "40 keys spread over all 4 partitions");
    let legacy = messages.next().await.expect("message").expect("message");
    assert_eq!(legacy.subject.as_str(), "herald.events.Order.insert");
}

#[tokio::test]
async fn a_comma_separated_url_reaches_the_cluster_and_survives_a_node_loss() {
    use herald_test_support::NatsCluster;
    let mut cluster = NatsCluster::start();
    let config = herald_shared::config::NatsConfig {
        url: cluster.url(),
        ..Default::default()
    };
    let nats = herald_shared::nats::connect(&config, "test")
        .await
        .expect("a cluster URL connects");
    let streams_config = StreamsConfig {
        replicas: 3,
        ..StreamsConfig::default()
    };
    streams::ensure(&nats.jetstream, &streams_config, &[streams::EVENTS])
        .await
        .expect("an R3 stream");
    let connected = nats.client.server_info().port;
    let index = (0..cluster.len())
        .find(|i| cluster.node_url(*i).ends_with(&format!(":{connected}")))
        .expect("connected to one of the nodes");
    cluster.kill(index);
    herald_test_support::eventually_async(
        "a publish through the surviving nodes",
        Duration::from_secs(60),
        || {
            let js = nats.jetstream.clone();
            async move {
                js.publish("herald.events.Order.insert", "{}".into())
                    .await
                    .ok()?
                    .await
                    .ok()
            }
        },
    )
    .await;
}
