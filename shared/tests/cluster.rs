//! Shared mechanisms on a 3-node JetStream cluster, where a stream without a leader answers
//! nothing for a while and that silence must not be taken for a missing stream.

use std::time::Duration;

use herald_shared::config::StreamsConfig;
use herald_shared::publish::{self, PublishFailure};
use herald_shared::streams;
use herald_shared::subjects::{EVENTS_STREAM, OUTCOMES_STREAM};
use herald_test_support::{NatsCluster, eventually_async};

#[tokio::test]
async fn a_stream_without_a_leader_is_an_outage_and_only_a_subject_no_stream_stores_is_missing() {
    let mut cluster = NatsCluster::start();
    let js = cluster.jetstream().await;
    let config = StreamsConfig {
        replicas: 3,
        ..StreamsConfig::default()
    };
    eventually_async("the streams", Duration::from_secs(30), || async {
        streams::ensure_all(&js, &config).await.ok()
    })
    .await;

    // Buckets take the copies of the stream they follow, whoever creates them.
    let bucket = streams::key_value(
        &js,
        async_nats::jetstream::kv::Config {
            bucket: "test_progress".into(),
            ..Default::default()
        },
        EVENTS_STREAM,
    )
    .await
    .expect("bucket");
    let mut info = js
        .get_stream("KV_test_progress")
        .await
        .expect("bucket stream");
    assert_eq!(info.info().await.expect("info").config.num_replicas, 3);
    drop(bucket);

    let missing = publish::publish(&js, "nowhere.at.all", Default::default(), "x".into()).await;
    assert!(
        matches!(missing, Err(PublishFailure::NoStream(_))),
        "a subject no stream stores: {missing:?}"
    );

    // Two of three nodes gone: no stream has a quorum, so none answers; yet they exist.
    let survivor = cluster.len() - 1;
    for node in 0..survivor {
        cluster.kill(node);
    }
    let js = async_nats::jetstream::new(
        async_nats::connect(cluster.node_url(survivor))
            .await
            .expect("connect to the survivor"),
    );
    let subject = format!(
        "{}.x",
        herald_shared::subjects::OUTCOMES_ALL.trim_end_matches(".>")
    );
    let lost_quorum = publish::publish(&js, &subject, Default::default(), "x".into()).await;
    let failure = lost_quorum.expect_err("no quorum, nothing stored");
    assert!(
        !failure.is_permanent(),
        "{OUTCOMES_STREAM} exists; its silence is an outage, not a missing stream: {failure:?}"
    );
}
