//! The harness itself: servers start isolated, and survive a crash and a restart.

use std::time::Duration;

use herald_test_support::{NatsServer, Postgres, RedisServer};

#[tokio::test]
async fn nats_streams_survive_a_kill_and_restart() {
    let mut nats = NatsServer::start();
    let js = nats.jetstream().await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "T".into(),
        subjects: vec!["t.>".into()],
        ..Default::default()
    })
    .await
    .expect("create stream");
    js.publish("t.1", "hello".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    nats.kill();
    nats.restart();
    let js = nats.jetstream().await;
    let mut stream = js.get_stream("T").await.expect("stream after restart");
    let info = stream.info().await.expect("info");
    assert_eq!(info.state.messages, 1);
}

#[tokio::test]
async fn the_harness_refuses_nats_older_than_2_10() {
    // Whatever binary the harness picked must be modern: JetStream features Herald relies on
    // (multi-subject filters, per-message TTL, KV from async-nats 0.51) are missing before it.
    let nats = NatsServer::start();
    let client = nats.client().await;
    let version = client.server_info().version;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    assert!(
        (major, minor) >= (2, 10),
        "harness started nats-server {version}"
    );
}

#[tokio::test]
async fn redis_with_aof_keeps_data_across_a_kill() {
    let mut redis = RedisServer::start_with_aof();
    let send = |port: u16, command: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.write_all(command.as_bytes()).expect("write");
        let mut buf = [0u8; 128];
        let n = s.read(&mut buf).expect("read");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert_eq!(send(redis.port(), "SET k v\r\n"), "+OK\r\n");
    redis.kill();
    redis.restart();
    assert_eq!(send(redis.port(), "GET k\r\n"), "$1\r\nv\r\n");
}

#[tokio::test]
async fn postgres_recovers_committed_rows_after_a_crash() {
    let mut pg = Postgres::start();
    let psql = |port: u16, sql: &str| {
        let out = std::process::Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .args(["-d", "postgres", "-Atc", sql])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    psql(pg.port(), "create table t(x int); insert into t values (1)");
    pg.kill();
    assert!(
        std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], pg.port()).into(),
            Duration::from_millis(200)
        )
        .is_err(),
        "killed PostgreSQL still accepts connections"
    );
    pg.restart();
    assert_eq!(psql(pg.port(), "select count(*) from t"), "1");
}

#[tokio::test]
async fn an_r3_stream_on_the_cluster_survives_a_node_killed_and_restarted() {
    use herald_test_support::{NatsCluster, eventually_async};
    let mut cluster = NatsCluster::start_with_service_users();
    let admin = async_nats::ConnectOptions::with_user_and_password(
        "cli".into(),
        herald_test_support::service_password("cli"),
    )
    .connect(cluster.addresses())
    .await
    .expect("connect as the admin user");
    let js = async_nats::jetstream::new(admin);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "HERALD_EVENTS".into(),
        subjects: vec!["herald.events.>".into()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .expect("create an R3 stream");
    let publish = |n: u32| {
        let js = js.clone();
        async move {
            // While a node is down, the client fails over and the stream re-elects a leader;
            // a publish may time out meanwhile, and is sent again with the same Msg-Id.
            eventually_async("a publish to be stored", Duration::from_secs(60), || {
                let js = js.clone();
                async move {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", format!("m{n}").as_str());
                    js.publish_with_headers("herald.events.T.insert", headers, "x".into())
                        .await
                        .ok()?
                        .await
                        .ok()
                }
            })
            .await
        }
    };
    for n in 0..10 {
        publish(n).await;
    }
    for node in 0..cluster.len() {
        cluster.kill(node);
        assert!(!cluster.is_running(node));
        for n in 10 * (node as u32 + 1)..10 * (node as u32 + 2) {
            publish(n).await;
        }
        cluster.restart(node);
    }
    let expected = 10 * (cluster.len() as u64 + 1);
    let mut stream = js.get_stream("HERALD_EVENTS").await.expect("stream");
    let info = stream.info().await.expect("info").clone();
    assert_eq!(info.state.messages, expected, "{}", cluster.logs());
    let replicas = info.cluster.expect("clustered").replicas;
    assert_eq!(replicas.len(), 2, "a leader and two replicas");
    // Every node, the restarted ones included, serves the whole stream once caught up.
    for node in 0..cluster.len() {
        let client = async_nats::ConnectOptions::with_user_and_password(
            "cli".into(),
            herald_test_support::service_password("cli"),
        )
        .connect(cluster.node_url(node))
        .await
        .expect("connect to one node");
        let js = async_nats::jetstream::new(client);
        eventually_async(
            "every node to see the stream",
            Duration::from_secs(30),
            || {
                let js = js.clone();
                async move {
                    let mut stream = js.get_stream("HERALD_EVENTS").await.ok()?;
                    let messages = stream.info().await.ok()?.state.messages;
                    (messages == expected).then_some(())
                }
            },
        )
        .await;
    }
}
