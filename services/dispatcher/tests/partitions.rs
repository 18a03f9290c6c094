//! Partitioned dispatch across processes: HERALD_EVENTS in 4 partitions, dispatcher processes
//! coming and going (a graceful join, a kill -9). Every partition keeps one holder at a time,
//! moves to the survivor within the lease period, and per-key order and exactly-one action per
//! event hold throughout.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use herald_dispatcher::lease;
use herald_dispatcher::partition::Partition;
use herald_shared::config::StreamsConfig;
use herald_shared::subjects::{ACTIONS_STREAM, EVENTS_STREAM};
use herald_shared::{Op, headers};
use herald_test_support::{NatsCluster, NatsServer, eventually_async};
use serde_json::json;

const PARTITIONS: u32 = 4;
const LEASE_TTL: Duration = Duration::from_secs(2);

const ONE_WEBHOOK: &str = r#"
[[observer]]
name = "order_changed"
entity = "Order"
ops = ["insert", "update"]

[[observer.action]]
kind = "webhook"
url = "https://example.test/a"
"#;

/// The real binary, so that a kill is a kill -9.
struct Process {
    child: Child,
    _config: tempfile::NamedTempFile,
    /// Its output, printed when the test fails.
    log: tempfile::NamedTempFile,
}

impl Process {
    fn start(nats: &NatsServer, observers: &Path) -> Self {
        Self::start_at(&nats.url(), observers, 1)
    }

    /// `replicas` must be the streams' own: every service provisions them from its config.
    fn start_at(url: &str, observers: &Path, replicas: usize) -> Self {
        let config = write_file(&format!(
            "[nats]\nurl = \"{}\"\n[streams]\nreplicas = {replicas}\nevent_partitions = {PARTITIONS}\n\
             [telemetry]\nlog_level = \"info\"\n[service]\nname = \"dispatcher\"\n\
             observers = \"{}\"\nlanes = 4\nbatch = 32\nack_wait = \"5s\"\nlease_ttl = \"{}s\"\n\
             checkpoint_interval = \"100ms\"\n",
            url,
            observers.display(),
            LEASE_TTL.as_secs(),
        ));
        let log = tempfile::NamedTempFile::new().expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_herald-dispatcher"))
            .arg("--config")
            .arg(config.path())
            .stdin(Stdio::null())
            .stdout(log.reopen().expect("log file"))
            .stderr(log.reopen().expect("log file"))
            .spawn()
            .expect("start herald-dispatcher");
        Self {
            child,
            _config: config,
            log,
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.log.path()).unwrap_or_default();
            eprintln!("--- dispatcher {} log ---\n{log}", self.child.id());
        }
    }
}

/// Partition index → holder, for the partitions whose lease is held now.
async fn holders(js: &async_nats::jetstream::Context) -> BTreeMap<u32, String> {
    let Ok(store) = js.get_key_value(lease::BUCKET).await else {
        return BTreeMap::new();
    };
    let mut held = BTreeMap::new();
    for partition in Partition::all("dispatcher", PARTITIONS) {
        if let Ok(Some(holder)) = store.get(&partition.name).await {
            held.insert(
                partition.index,
                String::from_utf8_lossy(&holder).into_owned(),
            );
        }
    }
    held
}

/// How many partitions each holder holds, when all of them are held.
async fn shares(js: &async_nats::jetstream::Context) -> Option<BTreeMap<String, usize>> {
    let held = holders(js).await;
    if held.len() != PARTITIONS as usize {
        return None;
    }
    let mut shares = BTreeMap::new();
    for holder in held.into_values() {
        *shares.entry(holder).or_default() += 1;
    }
    Some(shares)
}

async fn publish_round(js: &async_nats::jetstream::Context, round: i64, events: &mut Vec<i64>) {
    for n in 0..100 {
        let k = n % 25;
        let e = event(
            "Order",
            if round == 0 && n < 25 {
                Op::Insert
            } else {
                Op::Update
            },
            &format!("order.{k}"),
            json!({"n": round * 100 + n}),
        );
        publish_keyed_event(js, &e).await;
        events.push(round * 100 + n);
    }
}

#[tokio::test]
async fn partitions_move_to_the_survivor_within_the_lease_period_and_never_have_two_holders() {
    let nats = NatsServer::start();
    let streams = StreamsConfig {
        event_partitions: PARTITIONS,
        ..StreamsConfig::default()
    };
    let js = jetstream_with(&nats, &streams).await;
    let file = write_file(ONE_WEBHOOK);
    let mut published = Vec::new();

    // Alone, the first process serves every partition.
    let mut first = Process::start(&nats, file.path());
    let alone = eventually_async("one process to hold all 4 partitions", WAIT, || async {
        shares(&js).await.filter(|s| s.len() == 1)
    })
    .await;
    let first_holder = alone.into_keys().next().expect("one holder");
    publish_round(&js, 0, &mut published).await;

    // A second process joins: the first lets two partitions go, each after finishing it.
    let _second = Process::start(&nats, file.path());
    publish_round(&js, 1, &mut published).await;
    let balanced = eventually_async("two processes to hold 2 partitions each", WAIT, || async {
        shares(&js)
            .await
            .filter(|s| s.len() == 2 && s.values().all(|n| *n == 2))
    })
    .await;
    let second_holder = balanced
        .keys()
        .find(|h| **h != first_holder)
        .expect("a second holder")
        .clone();

    // kill -9 the first mid-stream: its partitions move to the survivor once its leases
    // expire, which is one TTL after its last renewal.
    publish_round(&js, 2, &mut published).await;
    first.kill();
    let killed = Instant::now();
    eventually_async(
        "the survivor to hold all 4 partitions",
        Duration::from_secs(60),
        || async {
            shares(&js)
                .await
                .filter(|s| s.len() == 1 && s.contains_key(&second_holder))
        },
    )
    .await;
    let moved = killed.elapsed();
    println!("partitions moved to the survivor {moved:?} after the kill (lease TTL {LEASE_TTL:?})");
    // One TTL for the leases to expire and a quarter TTL for the survivor's next turn; the rest
    // is slack for a loaded machine.
    assert!(
        moved < LEASE_TTL * 2 + Duration::from_secs(8),
        "ownership took {moved:?} to move"
    );
    publish_round(&js, 3, &mut published).await;

    let expected = published.len();
    eventually_async(
        "an action for every event",
        Duration::from_secs(60),
        || async { (action_count(&js).await >= expected as u64).then_some(()) },
    )
    .await;
    let stream = js.get_stream(EVENTS_STREAM).await.expect("stream");
    for partition in Partition::all("dispatcher", PARTITIONS) {
        eventually_async("every partition to be drained", WAIT, || async {
            let info = stream.consumer_info(&partition.name).await.ok()?;
            (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
        })
        .await;
    }

    // Exactly one action per event, and per key in commit order.
    let stored = read_all(&js, ACTIONS_STREAM).await;
    assert_eq!(stored.len(), expected, "one action per event, none twice");
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    // partition → the tenures (lease revisions) in stream order.
    let mut tenures: HashMap<String, Vec<u64>> = HashMap::new();
    let mut ids = BTreeSet::new();
    for (_, h, body) in &stored {
        let request: herald_shared::ActionRequest =
            serde_json::from_slice(body).expect("ActionRequest");
        ids.insert(request.id.clone());
        let n = request.event.data.as_ref().and_then(|d| d["n"].as_i64());
        per_key
            .entry(request.event.key.clone())
            .or_default()
            .push(n.expect("n"));
        let h = h.as_ref().expect("headers");
        let partition = h
            .get(headers::PARTITION)
            .expect("Herald-Partition")
            .to_string();
        let tenure: u64 = h
            .get(headers::LEASE_REVISION)
            .expect("Herald-Lease-Revision")
            .as_str()
            .parse()
            .expect("a revision");
        tenures.entry(partition).or_default().push(tenure);
    }
    assert_eq!(ids.len(), expected);
    for (key, ns) in &per_key {
        assert!(
            ns.is_sorted(),
            "actions of {key} out of commit order: {ns:?}"
        );
    }
    // Two holders at once would interleave their tenures in the actions stream; one after the
    // other, a partition's tenures only ever grow.
    assert_eq!(
        tenures.len(),
        PARTITIONS as usize,
        "every partition dispatched"
    );
    let mut moves = 0;
    for (partition, revisions) in &tenures {
        assert!(
            revisions.is_sorted(),
            "partition {partition} was served by two holders at once: {revisions:?}"
        );
        let distinct: BTreeSet<_> = revisions.iter().collect();
        moves += distinct.len() - 1;
    }
    assert!(moves >= 2, "partitions changed holder {moves} times");
    // Keys spread over the partitions, and every key stayed in one.
    let mut reader = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .expect("reader")
        .messages()
        .await
        .expect("messages");
    let mut partition_of: HashMap<String, String> = HashMap::new();
    for _ in 0..expected {
        let message = reader.next().await.expect("event").expect("event");
        let tokens: Vec<&str> = message.subject.split('.').collect();
        assert_eq!(tokens.len(), 6, "{}", message.subject);
        let event: herald_shared::EntityEvent =
            serde_json::from_slice(&message.payload).expect("event");
        let partition = partition_of
            .entry(event.key)
            .or_insert_with(|| tokens[5].to_owned());
        assert_eq!(partition, tokens[5]);
    }
}

/// Publishes until JetStream stores it: while a cluster node is down the stream may be
/// electing a leader, and the same Msg-Id makes a repeat harmless.
async fn publish_surely(js: &async_nats::jetstream::Context, e: &herald_shared::EntityEvent) {
    let subject = herald_shared::subjects::keyed_event(&e.entity, e.op, &e.key).expect("subject");
    let body: bytes::Bytes = serde_json::to_vec(e).expect("json").into();
    eventually_async("an event to be stored", Duration::from_secs(60), || {
        let (subject, body) = (subject.clone(), body.clone());
        async move {
            let mut h = async_nats::HeaderMap::new();
            h.insert(headers::MSG_ID, e.id.to_string().as_str());
            js.publish_with_headers(subject, h, body)
                .await
                .ok()?
                .await
                .ok()
        }
    })
    .await;
}

// A NATS node killed mid-stream once broke a key's order and stalled dispatch: buckets created
// with one copy on the dead node, a no-responders answer during a leader election taken for a
// missing stream, a start-up error ending a process, deliveries lost in flight. Each has its fix.
#[tokio::test]
async fn on_a_3_node_cluster_a_node_and_a_dispatcher_killed_lose_nothing_and_keep_key_order() {
    const EVENTS: i64 = 600;
    let mut cluster = NatsCluster::start();
    let streams = StreamsConfig {
        replicas: 3,
        event_partitions: PARTITIONS,
        ..StreamsConfig::default()
    };
    let js = jetstream_at(&cluster.url(), &streams).await;
    let file = write_file(ONE_WEBHOOK);
    let config_url = cluster.url();
    let mut processes = [
        Process::start_at(&config_url, file.path(), 3),
        Process::start_at(&config_url, file.path(), 3),
    ];
    // 40 keys, each updated 15 times; the kills land at random points of the run.
    let kill_node_at = rand_between(100, 250);
    let kill_dispatcher_at = rand_between(300, 450);
    let node = (kill_node_at as usize) % cluster.len();
    for n in 0..EVENTS {
        if n == kill_node_at {
            cluster.kill(node);
        }
        if n == kill_dispatcher_at {
            processes[0].kill();
        }
        let e = event(
            "Order",
            if n < 40 { Op::Insert } else { Op::Update },
            &format!("order.{}", n % 40),
            json!({"n": n}),
        );
        publish_surely(&js, &e).await;
    }
    println!(
        "killed nats node {node} after {kill_node_at} events, a dispatcher after {kill_dispatcher_at}"
    );
    eventually_async(
        "an action for every event",
        Duration::from_secs(120),
        || async {
            let mut stream = js.get_stream(ACTIONS_STREAM).await.ok()?;
            let stored = stream.info().await.ok()?.state.messages;
            (stored >= EVENTS as u64).then_some(())
        },
    )
    .await;
    let stored = read_all(&js, ACTIONS_STREAM).await;
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for (_, _, body) in &stored {
        let request: herald_shared::ActionRequest =
            serde_json::from_slice(body).expect("ActionRequest");
        ids.insert(request.id.clone());
        let n = request.event.data.as_ref().and_then(|d| d["n"].as_i64());
        per_key
            .entry(request.event.key.clone())
            .or_default()
            .push(n.expect("n"));
    }
    println!(
        "{} events, {} actions stored, {} distinct, {} keys",
        EVENTS,
        stored.len(),
        ids.len(),
        per_key.len()
    );
    assert_eq!(ids.len(), EVENTS as usize, "an action lost");
    assert_eq!(stored.len(), EVENTS as usize, "an action stored twice");
    for (key, ns) in &per_key {
        assert!(
            ns.is_sorted(),
            "actions of {key} out of commit order: {ns:?}"
        );
    }
}

fn rand_between(low: i64, high: i64) -> i64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    low + i64::from(nanos) % (high - low)
}
