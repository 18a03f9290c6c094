//! The whole pipeline, end to end, with the real service binaries as child processes: a GraphQL
//! mutation through the gateway becomes an entity event, the dispatcher turns it into actions by
//! the example shop's observers (`examples/shop/observers.toml`), the action worker delivers them
//! to a local HTTP sink (signed per Standard Webhooks) or hands them to the job worker, and a
//! permanent failure lands in the DLQ with its reason.
//!
//! The services are the binaries `cargo build --workspace --bins` leaves next to this test's
//! executable (`cargo nextest run --workspace` builds them too), started with configuration
//! files written for this test's own servers, so what runs is exactly what ships.
//!
//! The sink is this test's own: an axum server that answers 410 Gone for the Slack URL of the
//! `order_shipped` observer (the permanent failure the DLQ must record) and 204 otherwise, and a
//! minimal SMTP relay for that observer's e-mail.
//!
//! The same flow then runs 1,000 mutations while every service is killed (SIGKILL) and restarted
//! at random points: every committed order must give exactly one event, every event its webhook
//! and (over the threshold) its job; repeats are allowed only as deliveries of a `webhook-id`
//! already received, which a receiver absorbs. Short redelivery timers and leases in the test's
//! configs keep recovery within seconds.
//!
//! A last test starts the services exactly as `scripts/dev up` does, from `examples/dev/`,
//! against a nats-server running the repo's `nats/auth.conf`, so the dev configs and each
//! service's NATS permissions are proven to carry the pipeline.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures::StreamExt;
use herald_shared::messages::decode;
use herald_shared::subjects::{
    self, ACTIONS_STREAM, DLQ_STREAM, DlqSource, EVENTS_STREAM, JOBS_STREAM, OUTCOMES_STREAM,
};
use herald_shared::{ActionOutcome, ActionRequest, EntityEvent, JobState, JobStatus, Op, headers};
use herald_test_support::{
    CLUSTER_SIZE, NatsCluster, NatsServer, Postgres, RedisServer, eventually, eventually_async,
    free_port, service_password, workspace_root,
};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const WAIT: Duration = Duration::from_secs(30);
const API_KEY: &str = "pipeline-test-api-key-0123456789";
/// The API key of examples/dev/gateway.toml.
const DEV_API_KEY: &str = "dev-shop-api-key-0123456789";
const WEBHOOK_SECRET: &str = "whsec_cGlwZWxpbmUtdGVzdC13ZWJob29rLXNlY3JldA==";
/// Where the example observers file sends everything; the test swaps in its own sink.
const EXAMPLE_SINK: &str = "http://127.0.0.1:9900";
const WEBHOOK_PATH: &str = "/webhooks/order-created";
const SLACK_PATH: &str = "/slack/order-shipped";
const JOB_PATH: &str = "/jobs/big-order";

// Short redelivery timers and leases, so a service killed mid-work has its work taken up again
// within seconds rather than the production defaults' half minute.
const RECOVERY_DISPATCHER: &str = "ack_wait = \"2s\"\nlease_ttl = \"2s\"\n";
const RECOVERY_ACTION_WORKER: &str = "ack_wait = \"2s\"\n";
const RECOVERY_ACTION_LEASE: &str = "\n[service.dedup]\nlease = \"2s\"\n";
const RECOVERY_JOB_WORKER: &str = "lease = \"1500ms\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutation_becomes_a_signed_webhook_a_job_and_a_dead_letter() {
    let sink = Sink::start(&[SLACK_PATH]).await;
    let stack = Stack::with_test_configs(&sink).await;

    let customer = stack
        .graphql(
            r#"mutation { createCustomer(input: {email: "ada@shop.test", name: "Ada"}) { id } }"#,
        )
        .await["createCustomer"]["id"]
        .clone();
    let small = stack
        .graphql(&format!(
            "mutation {{ createOrder(input: {{customer_id: {customer}, total: 120.0}}) {{ id }} }}"
        ))
        .await["createOrder"]["id"]
        .as_str()
        .expect("the gateway answers ids as strings")
        .to_owned();
    let big = stack
        .graphql(&format!(
            "mutation {{ createOrder(input: {{customer_id: {customer}, total: 750.0}}) {{ id }} }}"
        ))
        .await["createOrder"]["id"]
        .as_str()
        .expect("the gateway answers ids as strings")
        .to_owned();
    stack
        .graphql(&format!(
            r#"mutation {{ updateOrder(id: {small}, input: {{status: "shipped"}}) {{ status }} }}"#
        ))
        .await;

    // The events the gateway published, from the stream itself: the ids every effect must carry.
    let events = stack.watch(EVENTS_STREAM, "herald.events.Order.>").await;
    let (small_insert, big_insert, small_update) =
        eventually_async("the gateway's three Order events", WAIT, || async {
            let events: Vec<EntityEvent> = events
                .poll()
                .await
                .iter()
                .map(|m| decode(&m.payload).expect("an EntityEvent"))
                .collect();
            let find =
                |key: &str, op: Op| events.iter().find(|e| e.key == key && e.op == op).cloned();
            Some((
                find(&small, Op::Insert)?,
                find(&big, Op::Insert)?,
                find(&small, Op::Update)?,
            ))
        })
        .await;
    assert_eq!(small_insert.actor.as_deref(), Some("pipeline-test"));

    // order_created: one signed webhook per order, webhook-id = action id.
    let expected_webhooks: BTreeSet<String> = [&small_insert, &big_insert]
        .iter()
        .map(|e| ActionRequest::action_id(e.id, "order_created", 0))
        .collect();
    let webhooks = eventually("a webhook for each new order", WAIT, || {
        let received = sink.received(WEBHOOK_PATH);
        let ids: BTreeSet<String> = received
            .iter()
            .filter_map(|r| r.header("webhook-id"))
            .collect();
        (ids == expected_webhooks).then_some(received)
    })
    .await;
    for webhook in &webhooks {
        let id = webhook.header("webhook-id").expect("webhook-id");
        let timestamp = webhook
            .header("webhook-timestamp")
            .expect("webhook-timestamp");
        let signature = webhook
            .header("webhook-signature")
            .expect("webhook-signature");
        assert!(
            signature_is_valid(WEBHOOK_SECRET, &id, &timestamp, &webhook.body, &signature),
            "webhook {id} is not signed with the observer's secret: {signature}"
        );
        let sent_at: i64 = timestamp
            .parse()
            .expect("webhook-timestamp is unix seconds");
        assert!(
            (chrono::Utc::now().timestamp() - sent_at).abs() < 300,
            "webhook-timestamp {sent_at} is not current"
        );
        let body: EntityEvent = decode(&webhook.body).expect("the body is the event");
        assert_eq!(
            id,
            ActionRequest::action_id(body.id, "order_created", 0),
            "the webhook-id names the action of the event in the body"
        );
    }

    // big_order: a job run to `succeeded` for the order over 500, and for no other.
    let job_id = ActionRequest::action_id(big_insert.id, "big_order", 0);
    let status_subject = subjects::job_status("default").expect("a valid queue name");
    let statuses = stack.watch(JOBS_STREAM, &status_subject).await;
    let job_states = eventually_async("the big order's job to succeed", WAIT, || async {
        let statuses: Vec<JobStatus> = statuses
            .poll()
            .await
            .iter()
            .map(|m| decode(&m.payload).expect("a JobStatus"))
            .collect();
        statuses
            .iter()
            .any(|s| s.job_id == job_id && s.state == JobState::Succeeded)
            .then_some(statuses)
    })
    .await;
    let jobs: BTreeSet<&str> = job_states.iter().map(|s| s.job_id.as_str()).collect();
    assert_eq!(
        jobs,
        BTreeSet::from([job_id.as_str()]),
        "only the big order makes a job"
    );
    let calls = sink.received(JOB_PATH);
    assert!(
        calls
            .iter()
            .any(|c| c.header(headers::IDEMPOTENCY_KEY).as_deref() == Some(job_id.as_str())),
        "the http job called the sink with Idempotency-Key = job id"
    );

    // order_shipped: the Slack URL answers 410, a permanent failure, dead-lettered with its reason.
    let shipped_action = ActionRequest::action_id(small_update.id, "order_shipped", 0);
    let dlq = stack.watch(DLQ_STREAM, &DlqSource::Actions.subject()).await;
    let dead = eventually_async(
        "the shipped order's Slack action in the DLQ",
        WAIT,
        || async {
            dlq.poll()
                .await
                .iter()
                .find(|m| decode::<ActionRequest>(&m.payload).is_ok_and(|a| a.id == shipped_action))
                .cloned()
        },
    )
    .await;
    let header = |name: &str| {
        dead.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(
        header(headers::ORIGINAL_SUBJECT),
        subjects::action("slack", "order_shipped").expect("valid subject")
    );
    assert!(
        header(headers::ERROR).contains("410"),
        "the reason names the answer: {}",
        header(headers::ERROR)
    );
    assert_eq!(
        header(headers::ATTEMPTS),
        "1",
        "a permanent failure is not retried"
    );
    assert_eq!(
        sink.received(SLACK_PATH).len(),
        1,
        "the Slack URL was called once"
    );

    // order_shipped's second action, independent of the first's failure: the warehouse e-mail.
    let subject = format!("Subject: Order {small} shipped");
    let mails = eventually("the shipped order's e-mail", WAIT, || {
        let mails = sink.mails();
        mails
            .iter()
            .any(|m| m.data.contains(&subject))
            .then_some(mails)
    })
    .await;
    let mail = mails
        .iter()
        .find(|m| m.data.contains(&subject))
        .expect("found above");
    assert_eq!(mail.to, ["<warehouse@shop.localhost>"]);

    let deliveries = sink.received(WEBHOOK_PATH).len();
    println!(
        "pipeline: {} Order events; {deliveries} webhook deliveries for {} webhook ids, all \
         signed; {} job status messages for {} job(s), final state succeeded; {} job call(s); \
         {} e-mail(s); {} dead letter(s) on {}: {}",
        events.seen(),
        expected_webhooks.len(),
        job_states.len(),
        jobs.len(),
        calls.len(),
        mails.len(),
        dlq.seen(),
        DlqSource::Actions.subject(),
        header(headers::ERROR),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_configs_run_the_pipeline_with_each_service_as_its_own_nats_user() {
    let stack = Stack::with_dev_configs().await;

    let customer = stack
        .graphql(
            r#"mutation { createCustomer(input: {email: "bo@shop.test", name: "Bo"}) { id } }"#,
        )
        .await["createCustomer"]["id"]
        .clone();
    let order = stack
        .graphql(&format!(
            "mutation {{ createOrder(input: {{customer_id: {customer}, total: 900.0}}) {{ id }} }}"
        ))
        .await["createOrder"]["id"]
        .as_str()
        .expect("the gateway answers ids as strings")
        .to_owned();

    let events = stack
        .watch(EVENTS_STREAM, "herald.events.Order.insert.>")
        .await;
    let event = eventually_async(
        "the gateway's event, published as user gateway",
        WAIT,
        || async {
            events
                .poll()
                .await
                .iter()
                .map(|m| decode::<EntityEvent>(&m.payload).expect("an EntityEvent"))
                .find(|e| e.key == order)
        },
    )
    .await;
    assert_eq!(event.actor.as_deref(), Some("shop-dev"));

    // Whether or not a sink listens on the example's port, every attempt has an outcome: the
    // outcome proves the dispatcher published the action and the action worker ran it.
    let webhook = ActionRequest::action_id(event.id, "order_created", 0);
    let outcome_subject = subjects::outcome("webhook", "order_created").expect("valid subject");
    let outcomes = stack.watch(OUTCOMES_STREAM, &outcome_subject).await;
    let attempts = eventually_async("an outcome of the order's webhook", WAIT, || async {
        let outcomes: Vec<ActionOutcome> = outcomes
            .poll()
            .await
            .iter()
            .map(|m| decode(&m.payload).expect("an ActionOutcome"))
            .filter(|o: &ActionOutcome| o.action_id == webhook)
            .collect();
        (!outcomes.is_empty()).then_some(outcomes)
    })
    .await;

    // Likewise every job has a status, whatever its call answers.
    let job = ActionRequest::action_id(event.id, "big_order", 0);
    let status_subject = subjects::job_status("default").expect("a valid queue name");
    let statuses = stack.watch(JOBS_STREAM, &status_subject).await;
    let states = eventually_async("a status of the order's job", WAIT, || async {
        let states: Vec<JobState> = statuses
            .poll()
            .await
            .iter()
            .map(|m| decode::<JobStatus>(&m.payload).expect("a JobStatus"))
            .filter(|s| s.job_id == job)
            .map(|s| s.state)
            .collect();
        (!states.is_empty()).then_some(states)
    })
    .await;
    println!(
        "dev configs: event {} by {:?}; webhook attempts so far: {:?}; job states so far: {states:?}",
        event.id,
        event.actor,
        attempts.iter().map(|o| o.status).collect::<Vec<_>>(),
    );
}

/// How many mutations the crash test sends, and how often each service is killed meanwhile.
const CHAOS_MUTATIONS: usize = 1000;
const KILLS_PER_SERVICE: usize = 2;
/// Every how many orders of the crash test are updated, and to which statuses in turn.
const UPDATED_EVERY: usize = 5;
const UPDATES: [&str; 2] = ["paid", "cancelled"];
/// How long the pipeline may take to catch up once the crashes are over.
const CHAOS_WAIT: Duration = Duration::from_secs(90);

/// The cluster layout: replicas of every service, and HERALD_EVENTS' partitions (more than the
/// dispatchers, so each holds several and a dead one's move to the survivor).
const CLUSTER_REPLICAS: usize = 2;
const CLUSTER_PARTITIONS: u32 = 4;
/// The observer the cluster layout adds: a webhook for every change of an order, declared
/// `ordered`, so the order of one key's webhooks is held to its commit order.
const ORDER_CHANGED: &str = "order_changed";
const CHANGED_PATH: &str = "/webhooks/order-changed";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_mutations_lose_nothing_when_every_service_is_killed_at_random() {
    let sink = Sink::start(&[]).await;
    let mut stack = Stack::with_test_configs(&sink).await;
    let seed = chaos_seed();
    let services = Mutex::new(std::mem::take(&mut stack.services));
    let plan = crash_plan(seed, services.lock().expect("services lock").len());

    let started = std::time::Instant::now();
    let updated = send_chaos_mutations(&stack, |i| {
        let crash = plan.get(&i).copied();
        let services = &services;
        async move {
            if let Some((victim, down)) = crash {
                kill_and_restart(services, victim, down).await;
            }
        }
    })
    .await;
    let sending = started.elapsed();
    let kills = plan.len();
    let report = verify_chaos(&stack, &sink, &updated, started).await;
    println!(
        "chaos: {CHAOS_MUTATIONS} mutations sent in {sending:.1?}, {kills} kill -9s; {report}"
    );
}

/// What happens to the cluster chaos test after a mutation.
#[derive(Debug, Clone, Copy)]
enum Strike {
    /// SIGKILL this NATS node; it stays down to the end, the other two keep a quorum.
    Node(usize),
    /// SIGKILL this service process, restarted after the pause.
    Service(usize, Duration),
}

/// The issue's scale-out promise: a 3-node cluster with R3 streams, HERALD_EVENTS in
/// partitions, and two of every service the pipeline runs through (gateways whose relays elect
/// per pass, dispatchers sharing the partitions, action workers and job workers sharing their
/// consumers and queue). One NATS node is killed -9 at a random point of 1,000 mutations, then
/// one replica of each service at random later points. Nothing committed is lost, repeats are
/// only repeated `webhook-id`s, and each key's events, actions and (for the ordered observer)
/// delivered webhooks keep commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_with_two_of_every_service_a_thousand_mutations_survive_a_node_and_a_replica_each_killed()
 {
    let sink = Sink::start(&[]).await;
    let mut stack = Stack::with_layout(&sink, Layout::Cluster).await;
    let seed = chaos_seed();
    let services = Mutex::new(std::mem::take(&mut stack.services));
    let plan = cluster_crash_plan(seed, services.lock().expect("services lock").len());
    let Broker::Cluster(cluster) = &stack._servers.nats else {
        unreachable!("the cluster layout runs on a cluster")
    };

    let started = std::time::Instant::now();
    let updated = send_chaos_mutations(&stack, |i| {
        let strike = plan.get(&i).copied();
        let services = &services;
        async move {
            match strike {
                Some(Strike::Node(node)) => {
                    cluster.lock().expect("cluster lock").kill(node);
                    println!("chaos: killed nats node {node} after mutation {i}");
                }
                Some(Strike::Service(victim, down)) => {
                    kill_and_restart(services, victim, down).await;
                }
                None => {}
            }
        }
    })
    .await;
    let sending = started.elapsed();
    let report = verify_chaos(&stack, &sink, &updated, started).await;

    // order_changed: a webhook for every event, insert and updates alike.
    let all = stack.watch(EVENTS_STREAM, "herald.events.Order.>").await;
    let events: Vec<EntityEvent> = all
        .poll()
        .await
        .iter()
        .map(|m| decode(&m.payload).expect("an EntityEvent"))
        .collect();
    let expected: BTreeSet<String> = events
        .iter()
        .map(|e| ActionRequest::action_id(e.id, ORDER_CHANGED, 0))
        .collect();
    let received = eventually(
        "an order_changed webhook for every event",
        CHAOS_WAIT,
        || {
            let received = sink.received(CHANGED_PATH);
            let ids: BTreeSet<String> = received
                .iter()
                .filter_map(|r| r.header("webhook-id"))
                .collect();
            ids.is_superset(&expected).then_some(received)
        },
    )
    .await;
    let delivered: BTreeSet<String> = received
        .iter()
        .filter_map(|r| r.header("webhook-id"))
        .collect();
    assert_eq!(
        delivered, expected,
        "no order_changed webhook for an action that never was"
    );
    let duplicates = received.len() - delivered.len();
    let lost = expected.difference(&delivered).count();

    // Per key, in commit order (the events stream's, which the relay makes commit order per
    // key): the actions as the dispatchers published them, and the webhooks as they arrived.
    let mut commit_order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for event in &events {
        commit_order
            .entry(event.key.clone())
            .or_default()
            .push(ActionRequest::action_id(event.id, ORDER_CHANGED, 0));
    }
    let actions = stack
        .watch(
            ACTIONS_STREAM,
            &subjects::action("webhook", ORDER_CHANGED).expect("a valid subject"),
        )
        .await
        .poll()
        .await;
    // The dispatchers' publications only: a retry or a put-back of the action worker comes
    // back on the same subject as a scheduled copy, which carries `Nats-Scheduler`.
    let actions: Vec<&jetstream::Message> = actions
        .iter()
        .filter(|m| {
            m.headers
                .as_ref()
                .is_none_or(|h| h.get(headers::SCHEDULER).is_none())
        })
        .collect();
    let mut published: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for message in &actions {
        let action: ActionRequest = decode(&message.payload).expect("an ActionRequest");
        published
            .entry(action.event.key.clone())
            .or_default()
            .push(action.id);
    }
    assert_eq!(
        actions.len(),
        expected.len(),
        "one order_changed action per event, none published twice"
    );
    let mut arrived: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut first = BTreeSet::new();
    for webhook in &received {
        let id = webhook.header("webhook-id").expect("webhook-id");
        if first.insert(id.clone()) {
            let body: EntityEvent = decode(&webhook.body).expect("the body is the event");
            arrived.entry(body.key).or_default().push(id);
        }
    }
    let out_of_order = |seen: &BTreeMap<String, Vec<String>>| -> Vec<String> {
        commit_order
            .iter()
            .filter(|(key, ids)| seen.get(*key) != Some(*ids))
            .map(|(key, ids)| format!("order {key}: {:?}, committed {ids:?}", seen.get(key)))
            .collect()
    };
    let actions_out = out_of_order(&published);
    let webhooks_out = out_of_order(&arrived);
    println!(
        "cluster chaos: {CHAOS_MUTATIONS} mutations sent in {sending:.1?} through \
         {CLUSTER_REPLICAS} of every service on {CLUSTER_SIZE} nodes, R{CLUSTER_SIZE}, \
         {CLUSTER_PARTITIONS} partitions, {} kill -9s ({:?}); {report}; order_changed: sent \
         {} events, delivered {}, duplicates {duplicates}, lost {lost}; keys whose actions are \
         out of commit order {}, whose webhooks arrived out of commit order {}",
        plan.len(),
        plan.values().collect::<Vec<_>>(),
        expected.len(),
        delivered.len(),
        actions_out.len(),
        webhooks_out.len(),
    );
    assert!(
        actions_out.is_empty(),
        "each key's actions in commit order: {actions_out:?}"
    );
    assert!(
        webhooks_out.is_empty(),
        "each key's order_changed webhooks, first arrivals, in commit order: {webhooks_out:?}"
    );
}

/// The seed of a crash test's random plan, printed; a failing run is repeated with
/// HERALD_TEST_CHAOS_SEED=<the seed it printed>.
fn chaos_seed() -> u64 {
    let seed = std::env::var("HERALD_TEST_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("chaos seed {seed}");
    seed
}

/// Sends `CHAOS_MUTATIONS` new orders from a few clients at once, every `UPDATED_EVERY`th then
/// updated through `UPDATES` one after the other, and runs `after(i)` once mutation `i` is done,
/// so crashes fall among the requests and between events of one key. Returns the updated orders.
async fn send_chaos_mutations<F, Fut>(stack: &Stack, after: F) -> BTreeSet<String>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = ()>,
{
    let customer = stack
        .mutate(r#"mutation { createCustomer(input: {email: "cy@shop.test", name: "Cy"}) { id } }"#)
        .await["createCustomer"]["id"]
        .clone();
    futures::stream::iter(0..CHAOS_MUTATIONS)
        .map(|i| {
            // Every tenth order is over the job threshold.
            let total = if i % 10 == 0 { 750 } else { 20 + i % 400 };
            let query = format!(
                "mutation {{ createOrder(input: {{customer_id: {customer}, total: {total}}}) {{ id }} }}"
            );
            let after = &after;
            async move {
                let created = stack.mutate(&query).await;
                let mut updated = None;
                if i % UPDATED_EVERY == 0 {
                    let id = created["createOrder"]["id"]
                        .as_str()
                        .expect("the gateway answers ids as strings")
                        .to_owned();
                    for status in UPDATES {
                        stack
                            .mutate(&format!(
                                r#"mutation {{ updateOrder(id: {id}, input: {{status: "{status}"}}) {{ id }} }}"#
                            ))
                            .await;
                    }
                    updated = Some(id);
                }
                after(i).await;
                updated
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<Option<String>>>()
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// The crash tests' verdict, against what PostgreSQL committed (a mutation whose answer a
/// gateway crash swallowed was sent again, and both orders are real): one event per committed
/// order, each key's events in commit order, an `order_created` webhook for every order (a
/// repeat only as a `webhook-id` already seen), and every big order's job run to success.
/// Returns the counts, to print.
async fn verify_chaos(
    stack: &Stack,
    sink: &Sink,
    updated: &BTreeSet<String>,
    started: std::time::Instant,
) -> String {
    let pool = sqlx::PgPool::connect(&stack.database_url)
        .await
        .expect("connect to the test PostgreSQL");
    let orders: Vec<(i64, f64)> = sqlx::query_as("SELECT id, total::float8 FROM orders")
        .fetch_all(&pool)
        .await
        .expect("read the committed orders");
    let committed: BTreeSet<String> = orders.iter().map(|(id, _)| id.to_string()).collect();
    let big: BTreeSet<String> = orders
        .iter()
        .filter(|(_, total)| *total > 500.0)
        .map(|(id, _)| id.to_string())
        .collect();

    // Exactly one event per committed insert.
    let watch = stack
        .watch(EVENTS_STREAM, "herald.events.Order.insert.>")
        .await;
    let events = eventually_async("an event for every committed order", CHAOS_WAIT, || async {
        let events: Vec<EntityEvent> = watch
            .poll()
            .await
            .iter()
            .map(|m| decode(&m.payload).expect("an EntityEvent"))
            .collect();
        let keys: BTreeSet<&str> = events.iter().map(|e| e.key.as_str()).collect();
        (keys.len() == committed.len()).then_some(events)
    })
    .await;
    let events_at = started.elapsed();
    let keys: BTreeSet<String> = events.iter().map(|e| e.key.clone()).collect();
    assert_eq!(
        keys, committed,
        "the events name exactly the committed orders"
    );
    assert_eq!(
        events.len(),
        committed.len(),
        "one event per order, no repeat"
    );

    // Each key's events in commit order, each once: the updated orders have theirs after their
    // insert, in the order they were made; every other order has none.
    let every = stack.watch(EVENTS_STREAM, "herald.events.Order.>").await;
    let series = eventually_async(
        "both updates of every updated order",
        CHAOS_WAIT,
        || async {
            let all: Vec<EntityEvent> = every
                .poll()
                .await
                .iter()
                .map(|m| decode(&m.payload).expect("an EntityEvent"))
                .collect();
            (all.len() >= committed.len() + updated.len() * UPDATES.len()).then_some(all)
        },
    )
    .await;
    // In stream order, which the relay makes commit order per key.
    let mut per_key: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for event in &series {
        let status = event
            .data
            .as_ref()
            .map_or("gone", |d| d["status"].as_str().unwrap_or("?"));
        per_key
            .entry(event.key.as_str())
            .or_default()
            .push(format!("{}:{status}", event.op));
    }
    let mut out_of_order = Vec::new();
    for (key, series) in &per_key {
        let expected: Vec<String> = if updated.contains(*key) {
            std::iter::once("insert:new".to_owned())
                .chain(UPDATES.iter().map(|s| format!("update:{s}")))
                .collect()
        } else {
            vec!["insert:new".to_owned()]
        };
        if series != &expected {
            out_of_order.push(format!("order {key}: {series:?}, expected {expected:?}"));
        }
    }
    assert!(
        out_of_order.is_empty(),
        "per-key events in commit order, each once: {out_of_order:?}"
    );

    // Every webhook arrives; a repeat carries a webhook-id already seen, so the receiver absorbs it.
    let expected_webhooks: BTreeSet<String> = events
        .iter()
        .map(|e| ActionRequest::action_id(e.id, "order_created", 0))
        .collect();
    let (deliveries, delivered) = eventually("a webhook for every order", CHAOS_WAIT, || {
        let received = sink.received(WEBHOOK_PATH);
        let ids: BTreeSet<String> = received
            .iter()
            .filter_map(|r| r.header("webhook-id"))
            .collect();
        ids.is_superset(&expected_webhooks)
            .then_some((received.len(), ids))
    })
    .await;
    let webhooks_at = started.elapsed();
    assert_eq!(
        delivered, expected_webhooks,
        "no webhook for an action that never was"
    );

    // Every job of a big order runs to success.
    let expected_jobs: BTreeSet<String> = events
        .iter()
        .filter(|e| big.contains(&e.key))
        .map(|e| ActionRequest::action_id(e.id, "big_order", 0))
        .collect();
    let status_subject = subjects::job_status("default").expect("a valid queue name");
    let statuses = stack.watch(JOBS_STREAM, &status_subject).await;
    let (succeeded, jobs) =
        eventually_async("every big order's job to succeed", CHAOS_WAIT, || async {
            let statuses: Vec<JobStatus> = statuses
                .poll()
                .await
                .iter()
                .map(|m| decode(&m.payload).expect("a JobStatus"))
                .collect();
            let succeeded: BTreeSet<String> = statuses
                .iter()
                .filter(|s| s.state == JobState::Succeeded)
                .map(|s| s.job_id.clone())
                .collect();
            let jobs: BTreeSet<String> = statuses.into_iter().map(|s| s.job_id).collect();
            succeeded
                .is_superset(&expected_jobs)
                .then_some((succeeded, jobs))
        })
        .await;
    let jobs_at = started.elapsed();
    assert_eq!(
        jobs, expected_jobs,
        "a job for every big order and no other"
    );
    let calls = sink.received(JOB_PATH);
    let keys: BTreeSet<String> = calls
        .iter()
        .filter_map(|c| c.header(headers::IDEMPOTENCY_KEY))
        .collect();
    assert_eq!(keys, expected_jobs, "every job call carries its job id");

    format!(
        "{} orders committed; {} orders updated twice, {} events in all, each key's in commit \
         order; {} insert events; {deliveries} webhook deliveries for {} webhook ids ({} absorbed \
         repeats, 0 lost); {} jobs succeeded; {} job calls for {} jobs; all events in after \
         {events_at:.1?}, all webhooks after {webhooks_at:.1?}, all jobs after {jobs_at:.1?}",
        committed.len(),
        updated.len(),
        series.len(),
        events.len(),
        delivered.len(),
        deliveries - delivered.len(),
        succeeded.len(),
        calls.len(),
        keys.len(),
    )
}

/// The cluster test's plan: one NATS node killed at a random point of the first quarter of the
/// mutations, then one replica of each service (services come `CLUSTER_REPLICAS` per kind) at
/// random later points, each restarted after a random pause.
fn cluster_crash_plan(seed: u64, services: usize) -> BTreeMap<usize, Strike> {
    use rand::seq::IndexedRandom;
    use rand::{Rng, SeedableRng};

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let node_at = rng.random_range(0..CHAOS_MUTATIONS / 4);
    let mut plan = BTreeMap::from([(node_at, Strike::Node(rng.random_range(0..CLUSTER_SIZE)))]);
    let later: Vec<usize> = (node_at + 1..CHAOS_MUTATIONS).collect();
    let kinds = services / CLUSTER_REPLICAS;
    let points: Vec<usize> = later.choose_multiple(&mut rng, kinds).copied().collect();
    for (kind, at) in points.into_iter().enumerate() {
        let victim = kind * CLUSTER_REPLICAS + rng.random_range(0..CLUSTER_REPLICAS);
        let down = Duration::from_millis(rng.random_range(0..500));
        plan.insert(at, Strike::Service(victim, down));
    }
    plan
}

/// A server the pipeline depends on, to be crashed (kill -9) and restarted mid-stream.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Nats,
    Redis,
    Postgres,
}

#[tokio::test]
async fn orders_and_their_updates_survive_a_nats_server_restart_mid_stream() {
    orders_survive(Fault::Nats).await;
}

#[tokio::test]
async fn orders_and_their_updates_survive_a_redis_restart_mid_stream() {
    orders_survive(Fault::Redis).await;
}

#[tokio::test]
async fn orders_and_their_updates_survive_a_postgres_restart_mid_stream() {
    orders_survive(Fault::Postgres).await;
}

/// Orders, each updated twice, while `fault` strikes halfway: every committed order has exactly
/// its events, in commit order per key, and one webhook per insert reaches the receiver (repeats
/// carry the same `webhook-id`, which the receiver absorbs).
async fn orders_survive(fault: Fault) {
    const ORDERS: usize = 40;
    let sink = Sink::start(&[]).await;
    let mut stack = Stack::with_test_configs(&sink).await;
    let customer = stack
        .mutate(r#"mutation { createCustomer(input: {email: "f@shop.test", name: "F"}) { id } }"#)
        .await["createCustomer"]["id"]
        .clone();
    for i in 0..ORDERS {
        if i == ORDERS / 2 {
            match fault {
                Fault::Nats => stack._servers.nats.server_mut().restart(),
                Fault::Redis => stack._servers.redis.restart(),
                Fault::Postgres => stack._servers.postgres.restart(),
            }
        }
        let id = stack
            .mutate(&format!(
                "mutation {{ createOrder(input: {{customer_id: {customer}, total: 25}}) {{ id }} }}"
            ))
            .await["createOrder"]["id"]
            .as_str()
            .expect("the gateway answers ids as strings")
            .to_owned();
        for status in ["paid", "shipped"] {
            stack
                .mutate(&format!(
                    r#"mutation {{ updateOrder(id: {id}, input: {{status: "{status}"}}) {{ id }} }}"#
                ))
                .await;
        }
    }

    let pool = sqlx::PgPool::connect(&stack.database_url)
        .await
        .expect("connect to the test PostgreSQL");
    let committed: BTreeSet<String> = sqlx::query_scalar::<_, i64>("SELECT id FROM orders")
        .fetch_all(&pool)
        .await
        .expect("read the committed orders")
        .into_iter()
        .map(|id| id.to_string())
        .collect();
    let watch = stack.watch(EVENTS_STREAM, "herald.events.Order.>").await;
    let events = eventually_async(
        "every committed order's three events",
        CHAOS_WAIT,
        || async {
            let events: Vec<EntityEvent> = watch
                .poll()
                .await
                .iter()
                .map(|m| decode(&m.payload).expect("an EntityEvent"))
                .collect();
            (events.len() >= committed.len() * 3).then_some(events)
        },
    )
    .await;
    let mut per_key: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for event in &events {
        let status = event
            .data
            .as_ref()
            .map_or("gone", |d| d["status"].as_str().unwrap_or("?"));
        per_key
            .entry(event.key.as_str())
            .or_default()
            .push(format!("{}:{status}", event.op));
    }
    assert_eq!(
        per_key
            .keys()
            .map(|k| k.to_string())
            .collect::<BTreeSet<_>>(),
        committed,
        "one event series per committed order"
    );
    for (key, series) in &per_key {
        assert_eq!(
            series,
            &["insert:new", "update:paid", "update:shipped"],
            "order {key}'s events in commit order, each once"
        );
    }
    let expected: BTreeSet<String> = events
        .iter()
        .filter(|e| e.op == Op::Insert)
        .map(|e| ActionRequest::action_id(e.id, "order_created", 0))
        .collect();
    let received = eventually("a webhook for every order", CHAOS_WAIT, || {
        let received = sink.received(WEBHOOK_PATH);
        let ids: BTreeSet<String> = received
            .iter()
            .filter_map(|r| r.header("webhook-id"))
            .collect();
        (ids == expected).then_some(received)
    })
    .await;
    let dead = stack
        .watch(DLQ_STREAM, "herald.dlq.>")
        .await
        .poll()
        .await
        .len();
    println!(
        "{fault:?} restart: sent {} orders ({} events), delivered {} webhooks, duplicates absorbed \
         {}, dead-lettered {dead}, lost 0",
        committed.len(),
        events.len(),
        expected.len(),
        received.len() - expected.len()
    );
    assert_eq!(dead, 0, "a restart is no reason to give up on anything");
}

/// A poison corpus pushed at every stream a Herald service consumes: each message is
/// dead-lettered with its reason (or, if harmless, handled), none is lost, and a real mutation
/// sent after them still becomes its webhook: nothing stalls.
#[tokio::test]
async fn a_poison_corpus_at_every_stream_is_dead_lettered_and_stalls_nothing() {
    let sink = Sink::start(&[]).await;
    let stack = Stack::with_test_configs(&sink).await;
    let dlq = stack.watch(DLQ_STREAM, "herald.dlq.>").await;
    // JetStream itself refuses a header block above 64 KiB (error 10097), so just below it.
    let huge_parent = format!("00-{}-00f067aa0ba902b7-01", "a".repeat(60 * 1024));
    let traced = uuid::Uuid::now_v7();
    let event = |id: uuid::Uuid, version: u32| {
        json!({
            "id": id, "entity": "Order", "op": "insert", "key": "90001",
            "data": {"id": 90001, "customer_id": 1, "status": "new", "total": 10.0},
            "before": null, "changed": null, "at": chrono::Utc::now(), "actor": null, "tx": 1,
            "schema_version": version,
        })
        .to_string()
    };
    let job = |id: &str, version: u32| {
        json!({
            "id": id, "queue": "default", "job_type": "http", "payload": {}, "priority": 0,
            "retry": {"max_attempts": 1, "initial_delay_ms": 10, "max_delay_ms": 10,
                      "multiplier": 1.0, "jitter": false},
            "timeout_ms": 1000, "action_id": null, "submitted_at": chrono::Utc::now(),
            "schema_version": version,
        })
        .to_string()
    };
    let action = |kind: &str, url: String| {
        json!({
            "id": format!("{}:order_created:0", uuid::Uuid::now_v7()), "kind": kind,
            "observer": "order_created", "action_index": 0, "config": {"url": url},
            "retry": {"max_attempts": 1, "initial_delay_ms": 10, "max_delay_ms": 10,
                      "multiplier": 1.0, "jitter": false},
            "timeout_ms": 1000,
            "event": serde_json::from_str::<Value>(&event(uuid::Uuid::now_v7(), 1))
                .expect("the event is JSON"),
            "created_at": chrono::Utc::now(), "schema_version": 1,
        })
        .to_string()
    };
    let plain = |what: &'static str, subject: &str, body: String| Poison {
        what,
        subject: subject.to_owned(),
        body,
        traceparent: None,
        raw_headers: None,
        webhook_of: None,
    };
    let raw = |what: &'static str, subject: &str, body: String, lines: &[u8]| Poison {
        raw_headers: Some(lines.to_vec()),
        ..plain(what, subject, body)
    };
    // An event that just fits the server's max_payload (1 MiB) beside its Msg-Id, so its
    // ActionRequest (the event plus the observer's config) cannot.
    let oversize_event = {
        let with_note = |note: String| {
            json!({
                "id": uuid::Uuid::now_v7(), "entity": "Order", "op": "insert", "key": "90004",
                "data": {"id": 90004, "customer_id": 1, "status": "new", "total": 10.0,
                         "note": note},
                "before": null, "changed": null, "at": chrono::Utc::now(), "actor": null,
                "tx": 1, "schema_version": 1,
            })
            .to_string()
        };
        let base = with_note(String::new()).len();
        with_note("x".repeat(1024 * 1024 - 200 - base))
    };
    let lf_event = uuid::Uuid::now_v7();
    let cr_event = uuid::Uuid::now_v7();
    let odd_names_event = uuid::Uuid::now_v7();
    let mut corpus: Vec<Poison> = vec![
        plain(
            "event: bad JSON",
            "herald.events.Order.insert",
            "{not json".into(),
        ),
        plain(
            "event: schema_version 2",
            "herald.events.Order.insert",
            event(uuid::Uuid::now_v7(), 2),
        ),
        plain(
            "action: bad JSON",
            "herald.actions.webhook.order_created",
            "[1,".into(),
        ),
        plain(
            "action: schema_version 9",
            "herald.actions.webhook.order_created",
            json!({"schema_version": 9}).to_string(),
        ),
        plain("job: bad JSON", "herald.jobs.submit.default", "nope".into()),
        plain(
            "job: schema_version 3",
            "herald.jobs.submit.default",
            job("p-v3", 3),
        ),
        plain(
            "job: id with a newline",
            "herald.jobs.submit.default",
            job("p\nid", 1),
        ),
        Poison {
            traceparent: Some(huge_parent.clone()),
            webhook_of: Some(traced),
            ..plain(
                "event: 60 KiB traceparent",
                "herald.events.Order.insert",
                event(traced, 1),
            )
        },
        // Header blocks no async-nats client would write, as any client with publish rights can:
        // a bare LF that splits a value into a second header, a bare CR inside a value, a line
        // without a colon, a name with a space, bytes that are not UTF-8. (Unpatched async-nats
        // 0.51 panics or drops the connection on receiving the last four; vendor/README.md.)
        Poison {
            webhook_of: Some(lf_event),
            ..raw(
                "event: raw LF inside the traceparent",
                "herald.events.Order.insert",
                event(lf_event, 1),
                b"Traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\nX-Injected: 1",
            )
        },
        raw(
            "action: raw LF inside a header value",
            "herald.actions.webhook.order_created",
            "[".into(),
            b"X-Hostile: a\nX-Injected: 1",
        ),
        raw(
            "job: raw LF inside a header value",
            "herald.jobs.submit.default",
            "nope".into(),
            b"X-Hostile: a\nX-Injected: 1",
        ),
        Poison {
            webhook_of: Some(cr_event),
            ..raw(
                "event: bare CR inside the traceparent",
                "herald.events.Order.insert",
                event(cr_event, 1),
                b"Traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\rX-Injected: 1",
            )
        },
        raw(
            "action: bare CR inside a header value",
            "herald.actions.webhook.order_created",
            "[".into(),
            b"X-Hostile: a\rb",
        ),
        raw(
            "job: a header line without a colon",
            "herald.jobs.submit.default",
            "nope".into(),
            b"X-Hostile a",
        ),
        Poison {
            webhook_of: Some(odd_names_event),
            ..raw(
                "event: a header name with a space, bytes that are not UTF-8",
                "herald.events.Order.insert",
                event(odd_names_event, 1),
                b"X Hostile: 1\r\nX-Bytes: \xff\xfe",
            )
        },
        // An event whose ActionRequest (the event plus the observer's config) exceeds the
        // server's max_payload: the dispatcher can never publish it.
        plain(
            "event: its ActionRequest is above max_payload",
            "herald.events.Order.insert",
            oversize_event,
        ),
        // A misspelled kind inside a request on the webhook subject.
        plain(
            "action: unknown kind `webhok`",
            "herald.actions.webhook.order_created",
            action("webhok", sink.url()),
        ),
    ];
    // A job of a type no handler serves; its id is its Msg-Id, so its dead letter names it.
    let unknown_type = format!("poison-{}", corpus.len());
    corpus.push(plain(
        "job: unknown job type",
        "herald.jobs.submit.default",
        json!({
            "id": unknown_type, "queue": "default", "job_type": "no-such-type", "payload": {},
            "priority": 0,
            "retry": {"max_attempts": 1, "initial_delay_ms": 10, "max_delay_ms": 10,
                      "multiplier": 1.0, "jitter": false},
            "timeout_ms": 1000, "action_id": null, "submitted_at": chrono::Utc::now(),
            "schema_version": 1,
        })
        .to_string(),
    ));
    let sent = corpus.len();
    for (n, poison) in corpus.iter().enumerate() {
        let msg_id = format!("poison-{n}");
        if let Some(lines) = &poison.raw_headers {
            raw_publish(
                stack._servers.nats.server().port(),
                &poison.subject,
                &[format!("Nats-Msg-Id: {msg_id}\r\n").as_bytes(), lines].concat(),
                poison.body.as_bytes(),
            )
            .await;
            continue;
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(headers::MSG_ID, msg_id.as_str());
        if let Some(parent) = &poison.traceparent {
            headers.insert(headers::TRACEPARENT, parent.as_str());
        }
        let what = poison.what;
        stack
            .js
            .send_publish(
                poison.subject.clone(),
                jetstream::message::PublishMessage::build()
                    .payload(poison.body.clone().into())
                    .headers(headers),
            )
            .await
            .unwrap_or_else(|e| panic!("publish {what}: {e}"))
            .await
            .unwrap_or_else(|e| panic!("store {what}: {e}"));
    }

    // A real change after the poison still goes all the way.
    let customer = stack
        .mutate(r#"mutation { createCustomer(input: {email: "p@shop.test", name: "P"}) { id } }"#)
        .await["createCustomer"]["id"]
        .clone();
    let order = stack
        .mutate(&format!(
            "mutation {{ createOrder(input: {{customer_id: {customer}, total: 30}}) {{ id }} }}"
        ))
        .await["createOrder"]["id"]
        .as_str()
        .expect("the gateway answers ids as strings")
        .to_owned();
    let events = stack
        .watch(EVENTS_STREAM, "herald.events.Order.insert.>")
        .await;
    let real = eventually_async("the real order's event", WAIT, || async {
        events
            .poll()
            .await
            .iter()
            .filter_map(|m| decode::<EntityEvent>(&m.payload).ok())
            .find(|e| e.key == order)
    })
    .await;
    let webhook_id = ActionRequest::action_id(real.id, "order_created", 0);
    eventually("the real order's webhook, past the poison", WAIT, || {
        sink.received(WEBHOOK_PATH)
            .iter()
            .any(|r| r.header("webhook-id").as_deref() == Some(webhook_id.as_str()))
            .then_some(())
    })
    .await;

    // Every poison message is accounted for: dead-lettered with a reason, or (the valid event
    // with an over-long traceparent) handled like any event.
    let accounted = eventually_async("every poison message accounted for", WAIT, || async {
        let letters = dlq.poll().await;
        let reason_of = |n: usize| {
            letters.iter().find_map(|m| {
                let h = m.headers.as_ref()?;
                let original = h.get(headers::ORIGINAL_MSG_ID)?.as_str();
                (original == format!("poison-{n}")).then(|| {
                    h.get(headers::ERROR)
                        .map(|e| e.to_string())
                        .unwrap_or_default()
                })
            })
        };
        let mut rows = Vec::new();
        let mut missing = Vec::new();
        for (n, poison) in corpus.iter().enumerate() {
            let handled = poison.webhook_of.is_some_and(|id| {
                let webhook = ActionRequest::action_id(id, "order_created", 0);
                sink.received(WEBHOOK_PATH)
                    .iter()
                    .any(|r| r.header("webhook-id").as_deref() == Some(webhook.as_str()))
            });
            match (reason_of(n), handled) {
                (Some(reason), _) => rows.push((poison.what, format!("dead-lettered: {reason}"))),
                (None, true) => rows.push((poison.what, "delivered".to_owned())),
                (None, false) => missing.push(poison.what),
            }
        }
        if !missing.is_empty() {
            eprintln!("poison not yet accounted for: {missing:?}");
            return None;
        }
        Some(rows)
    })
    .await;
    let dead = accounted
        .iter()
        .filter(|(_, r)| r.starts_with("dead"))
        .count();
    println!(
        "poison corpus: sent {sent}, delivered {}, duplicates absorbed 0, dead-lettered {dead}, lost 0",
        sent - dead
    );
    for (what, result) in &accounted {
        println!("  {what}: {result}");
    }
    let letters = dlq.poll().await;
    for letter in &letters {
        let parent = letter
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::TRACEPARENT))
            .map(|v| v.as_str().len())
            .unwrap_or(0);
        assert!(
            parent <= 256,
            "a dead letter carries a {parent}-byte traceparent"
        );
    }
}

/// One message of the poison corpus.
struct Poison {
    what: &'static str,
    subject: String,
    body: String,
    traceparent: Option<String>,
    /// Header lines written byte for byte on a raw connection (what async-nats would refuse to
    /// send), after the Msg-Id.
    raw_headers: Option<Vec<u8>>,
    /// The event id whose `order_created` webhook shows it was handled like any event.
    webhook_of: Option<uuid::Uuid>,
}

/// Publishes with a header block written by hand (`HPUB`), so header values async-nats would
/// never send reach the stream as they are; returns once the server answered a PING after it.
async fn raw_publish(port: u16, subject: &str, header_lines: &[u8], body: &[u8]) {
    let socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to nats-server");
    let mut socket = BufReader::new(socket);
    let mut line = String::new();
    socket
        .read_line(&mut line)
        .await
        .expect("the server's INFO");
    assert!(line.starts_with("INFO"), "{line}");
    let header = [&b"NATS/1.0\r\n"[..], header_lines, b"\r\n\r\n"].concat();
    let mut out = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}}\r\n\
         HPUB {subject} {} {}\r\n",
        header.len(),
        header.len() + body.len()
    )
    .into_bytes();
    out.extend_from_slice(&header);
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\nPING\r\n");
    socket.get_mut().write_all(&out).await.expect("send HPUB");
    loop {
        line.clear();
        socket
            .read_line(&mut line)
            .await
            .expect("the server's answer");
        assert!(
            !line.starts_with("-ERR"),
            "the server refused the HPUB: {line}"
        );
        if line.starts_with("PONG") {
            return;
        }
    }
}

/// Which service is killed after which mutation, and how long it stays down: every service
/// `KILLS_PER_SERVICE` times, in a random order at random points of the stream of mutations.
fn crash_plan(seed: u64, services: usize) -> BTreeMap<usize, (usize, Duration)> {
    use rand::seq::{IndexedRandom, SliceRandom};
    use rand::{Rng, SeedableRng};

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut victims: Vec<usize> = (0..services)
        .flat_map(|s| std::iter::repeat_n(s, KILLS_PER_SERVICE))
        .collect();
    victims.shuffle(&mut rng);
    let points: Vec<usize> = (0..CHAOS_MUTATIONS).collect();
    let mut points: Vec<usize> = points
        .choose_multiple(&mut rng, victims.len())
        .copied()
        .collect();
    points.sort_unstable();
    points
        .into_iter()
        .zip(victims)
        .map(|(at, victim)| {
            let down = Duration::from_millis(rng.random_range(0..500));
            (at, (victim, down))
        })
        .collect()
}

/// SIGKILL, then a start after `down` (unless a later crash's restart came first).
async fn kill_and_restart(services: &Mutex<Vec<Service>>, victim: usize, down: Duration) {
    let name = {
        let mut services = services.lock().expect("services lock");
        services[victim].kill();
        services[victim].label.clone()
    };
    // A random outage, not a wait for an effect.
    tokio::time::sleep(down).await;
    services.lock().expect("services lock")[victim].start_if_stopped();
    println!("chaos: killed {name}, restarted it after {down:?}");
}

/// The Standard Webhooks check a receiver makes, written from the spec rather than borrowed from
/// the worker: `v1,` + base64 HMAC-SHA256 over `id.timestamp.body` with the `whsec_` key, among
/// the space-separated signatures of the header.
fn signature_is_valid(secret: &str, id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    let key = STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .expect("the test's secret is base64");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    header.split(' ').any(|candidate| candidate == expected)
}

/// How a stack runs: one nats-server and one of each service, or a 3-node cluster with R3
/// streams, HERALD_EVENTS in `CLUSTER_PARTITIONS` partitions and `CLUSTER_REPLICAS` of each
/// service, whose observers add `order_changed`.
#[derive(Debug, Clone, Copy)]
enum Layout {
    Single,
    Cluster,
}

/// The servers and the four services, stopped (services killed) on drop.
struct Stack {
    /// A JetStream connection that may read every stream.
    js: jetstream::Context,
    /// Every gateway's GraphQL endpoint; mutations go round them.
    graphql_urls: Vec<String>,
    next_gateway: std::sync::atomic::AtomicUsize,
    database_url: String,
    api_key: &'static str,
    http: reqwest::Client,
    services: Vec<Service>,
    _servers: Servers,
}

/// The servers a stack runs on, with the example shop's tables in the `postgres` database.
struct Servers {
    nats: Broker,
    postgres: Postgres,
    redis: RedisServer,
    dir: tempfile::TempDir,
}

/// NATS as a stack sees it: one server, or a 3-node cluster (behind a lock, so the chaos test
/// can kill a node from among its concurrent mutations).
enum Broker {
    Server(NatsServer),
    Cluster(Mutex<NatsCluster>),
}

impl Broker {
    fn url(&self) -> String {
        match self {
            Self::Server(server) => server.url(),
            Self::Cluster(cluster) => cluster.lock().expect("cluster lock").url(),
        }
    }

    /// The single server; the tests that restart or dial it run on one.
    fn server(&self) -> &NatsServer {
        match self {
            Self::Server(server) => server,
            Self::Cluster(_) => panic!("this test runs on a single nats-server"),
        }
    }

    fn server_mut(&mut self) -> &mut NatsServer {
        match self {
            Self::Server(server) => server,
            Self::Cluster(_) => panic!("this test runs on a single nats-server"),
        }
    }

    async fn jetstream(&self) -> jetstream::Context {
        match self {
            Self::Server(server) => server.jetstream().await,
            Self::Cluster(cluster) => {
                let addresses = cluster.lock().expect("cluster lock").addresses();
                let client = async_nats::ConnectOptions::new()
                    .retry_on_initial_connect()
                    .connect(addresses)
                    .await
                    .expect("connect to the test cluster");
                jetstream::new(client)
            }
        }
    }
}

impl Servers {
    async fn start(nats: Broker) -> Self {
        let postgres = Postgres::start();
        let redis = RedisServer::start_with_aof();
        let dir = tempfile::Builder::new()
            .prefix("herald-pipeline-")
            .tempdir()
            .expect("temp dir for the service configs and logs");
        postgres.with_shop_schema().await.close().await;
        Self {
            nats,
            postgres,
            redis,
            dir,
        }
    }
}

fn shop() -> PathBuf {
    workspace_root().join("examples/shop")
}

impl Stack {
    /// One of each service on one nats-server.
    async fn with_test_configs(sink: &Sink) -> Self {
        Self::with_layout(sink, Layout::Single).await
    }

    /// The services configured by this test: no NATS authentication, the example observers
    /// sending to `sink`, loopback allow-listed past the action worker's SSRF guard. In
    /// `services` order: every replica of the gateway, then of the dispatcher, the action worker
    /// and the job worker.
    async fn with_layout(sink: &Sink, layout: Layout) -> Self {
        let (nats, streams, replicas) = match layout {
            Layout::Single => (Broker::Server(NatsServer::start()), String::new(), 1),
            Layout::Cluster => (
                Broker::Cluster(Mutex::new(NatsCluster::start())),
                format!(
                    "[streams]\nreplicas = {CLUSTER_SIZE}\nevent_partitions = {CLUSTER_PARTITIONS}\n\n"
                ),
                CLUSTER_REPLICAS,
            ),
        };
        let servers = Servers::start(nats).await;
        let example = std::fs::read_to_string(shop().join("observers.toml"))
            .expect("examples/shop/observers.toml");
        assert!(
            example.contains(EXAMPLE_SINK),
            "the example observers send to {EXAMPLE_SINK}"
        );
        let mut observers_file = example.replace(EXAMPLE_SINK, &sink.url());
        if let Layout::Cluster = layout {
            observers_file.push_str(&format!(
                "\n[[observer]]\nname = \"{ORDER_CHANGED}\"\nentity = \"Order\"\n\
                 ops = [\"insert\", \"update\"]\nordered = true\n\n[[observer.action]]\nkind = \"webhook\"\n\
                 url = \"{}{CHANGED_PATH}\"\n",
                sink.url()
            ));
        }
        let observers = servers.dir.path().join("observers.toml");
        std::fs::write(&observers, observers_file).expect("write observers.toml");

        let graphql: Vec<u16> = (0..replicas).map(|_| free_port()).collect();
        let gateway = |port: u16| {
            format!(
                "[service]\ndatabase_url = \"{db}\"\nschema_file = \"{schema}\"\n\
                 listen = \"127.0.0.1:{port}\"\n\n[service.auth.api_keys]\n\
                 \"{API_KEY}\" = \"pipeline-test\"\n\n[service.relay]\npoll_interval = \"200ms\"\n",
                db = servers.postgres.url(),
                schema = shop().join("gateway-schema.toml").display(),
            )
        };
        let dispatcher = format!(
            "[service]\nobservers = \"{}\"\n{RECOVERY_DISPATCHER}",
            observers.display()
        );
        let action_worker = format!(
            "[service]\nredis_url = \"{redis}\"\nssrf_allow = [\"127.0.0.1\"]\n{RECOVERY_ACTION_WORKER}\n\
             [service.webhook_secrets]\norder_created = \"{WEBHOOK_SECRET}\"\n\
             {ORDER_CHANGED} = \"{WEBHOOK_SECRET}\"\n\n\
             [service.smtp]\nhost = \"127.0.0.1\"\nport = {smtp}\n{RECOVERY_ACTION_LEASE}",
            redis = servers.redis.url(),
            smtp = sink.smtp_port,
        );
        let job_worker = format!(
            "[service]\nredis_url = \"{redis}\"\npoll = \"100ms\"\n{RECOVERY_JOB_WORKER}",
            redis = servers.redis.url()
        );
        let mut configs = Vec::new();
        configs.extend(graphql.iter().map(|port| ("gateway", gateway(*port))));
        for (name, settings) in [
            ("dispatcher", dispatcher),
            ("action-worker", action_worker),
            ("job-worker", job_worker),
        ] {
            configs.extend(std::iter::repeat_n((name, settings), replicas));
        }
        let mut services = Vec::new();
        for (n, (name, settings)) in configs.into_iter().enumerate() {
            let label = if replicas == 1 {
                name.to_owned()
            } else {
                format!("{name}-{}", n % replicas + 1)
            };
            let admin = free_port();
            let config = servers.dir.path().join(format!("{label}.toml"));
            let common = format!(
                "[nats]\nurl = \"{nats}\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
                 [telemetry]\nlog_format = \"pretty\"\n\n{streams}",
                nats = servers.nats.url()
            );
            std::fs::write(&config, format!("{common}{settings}")).expect("write a config");
            services.push(Service::spawn(
                name,
                label,
                &config,
                servers.dir.path(),
                admin,
                &[],
            ));
        }
        let js = servers.nats.jetstream().await;
        Self::ready(servers, services, js, &graphql, API_KEY).await
    }

    /// The services started the way `scripts/dev up` starts them: `examples/dev/<service>.toml`
    /// from the workspace root, the servers' addresses given as the same environment overrides,
    /// and nats-server running `nats/auth.conf`, so each service connects as its own user. Only
    /// the listen ports are moved off the files' fixed ones, so a running local stack is no
    /// obstacle.
    async fn with_dev_configs() -> Self {
        let servers = Servers::start(Broker::Server(NatsServer::start_with_service_users())).await;
        let graphql = free_port();
        let mut services = Vec::new();
        for name in ["gateway", "dispatcher", "action-worker", "job-worker"] {
            let admin = free_port();
            // What scripts/dev's service_env gives each service, plus the moved ports.
            let mut env = vec![
                ("HERALD_NATS__URL", servers.nats.url()),
                ("HERALD_ADMIN__LISTEN", format!("127.0.0.1:{admin}")),
            ];
            match name {
                "gateway" => env.extend([
                    ("HERALD_SERVICE__DATABASE_URL", servers.postgres.url()),
                    ("HERALD_SERVICE__LISTEN", format!("127.0.0.1:{graphql}")),
                ]),
                "action-worker" | "job-worker" => {
                    env.push(("HERALD_SERVICE__REDIS_URL", servers.redis.url()))
                }
                _ => {}
            }
            let config = workspace_root().join(format!("examples/dev/{name}.toml"));
            services.push(Service::spawn(
                name,
                name.to_owned(),
                &config,
                servers.dir.path(),
                admin,
                &env,
            ));
        }
        let operator = async_nats::ConnectOptions::new()
            .user_and_password("cli".into(), service_password("cli"))
            .connect(servers.nats.url())
            .await
            .expect("connect as the cli user");
        let js = jetstream::new(operator);
        Self::ready(servers, services, js, &[graphql], DEV_API_KEY).await
    }

    async fn ready(
        servers: Servers,
        mut services: Vec<Service>,
        js: jetstream::Context,
        graphql: &[u16],
        api_key: &'static str,
    ) -> Self {
        let http = reqwest::Client::new();
        for service in &mut services {
            service.wait_ready(&http).await;
        }
        Self {
            js,
            graphql_urls: graphql
                .iter()
                .map(|port| format!("http://127.0.0.1:{port}/graphql"))
                .collect(),
            next_gateway: Default::default(),
            database_url: servers.postgres.url(),
            api_key,
            http,
            services,
            _servers: servers,
        }
    }

    /// Runs a GraphQL operation with the stack's API key; returns `data`, refusing any error.
    async fn graphql(&self, query: &str) -> Value {
        let response: Value = self
            .http
            .post(&self.graphql_urls[0])
            .header("x-api-key", self.api_key)
            .json(&json!({ "query": query }))
            .send()
            .await
            .expect("the gateway answers")
            .json()
            .await
            .expect("a GraphQL JSON answer");
        assert!(response.get("errors").is_none(), "{query}: {response}");
        response["data"].clone()
    }

    /// Runs a mutation until a gateway accepts it, through crashes and restarts: each attempt
    /// goes to the next gateway, as a load balancer would send it.
    async fn mutate(&self, query: &str) -> Value {
        eventually_async(&format!("a gateway to accept {query}"), WAIT, || async {
            let next = self
                .next_gateway
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let url = &self.graphql_urls[next % self.graphql_urls.len()];
            let response = self
                .http
                .post(url)
                .header("x-api-key", self.api_key)
                .timeout(Duration::from_secs(5))
                .json(&json!({ "query": query }))
                .send()
                .await
                .ok()?;
            let answer: Value = response.json().await.ok()?;
            answer
                .get("errors")
                .is_none()
                .then(|| answer["data"].clone())
        })
        .await
    }

    async fn watch(&self, stream: &str, subject: &str) -> Watch {
        Watch::new(&self.js, stream, subject).await
    }
}

/// Every message stored on a subject, read from the start by an ephemeral consumer and kept.
struct Watch {
    consumer: consumer::Consumer<consumer::pull::Config>,
    seen: Mutex<Vec<jetstream::Message>>,
}

impl Watch {
    /// Retried for a while: on a cluster that just lost a node, JetStream API requests time out
    /// until the leaders are elected again, as any client sees them do.
    async fn new(js: &jetstream::Context, stream: &str, subject: &str) -> Self {
        let create = || async {
            js.get_stream(stream)
                .await
                .map_err(|e| format!("stream {stream}: {e}"))?
                .create_consumer(consumer::pull::Config {
                    filter_subject: subject.to_owned(),
                    deliver_policy: consumer::DeliverPolicy::All,
                    ack_policy: consumer::AckPolicy::None,
                    inactive_threshold: Duration::from_secs(120),
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("a consumer on {subject}: {e}"))
        };
        let what = format!("a watch consumer on {subject} of {stream}");
        let consumer = eventually_async(&what, Duration::from_secs(60), || async {
            create()
                .await
                .map_err(|e| eprintln!("{e}; trying again"))
                .ok()
        })
        .await;
        Self {
            consumer,
            seen: Mutex::new(Vec::new()),
        }
    }

    /// Reads what arrived since the last call; returns everything seen so far.
    async fn poll(&self) -> Vec<jetstream::Message> {
        const BATCH: usize = 512;
        let mut arrived = Vec::new();
        loop {
            let before = arrived.len();
            // A fetch refused while a cluster elects its leaders is read again at the next poll.
            let mut batch = match self.consumer.fetch().max_messages(BATCH).messages().await {
                Ok(batch) => batch,
                Err(e) => {
                    eprintln!("fetch from the watch consumer: {e}; reading again next poll");
                    break;
                }
            };
            while let Some(Ok(message)) = batch.next().await {
                arrived.push(message);
            }
            if arrived.len() - before < BATCH {
                break;
            }
        }
        let mut seen = self
            .seen
            .lock()
            .expect("the watch's lock is never poisoned");
        seen.extend(arrived);
        seen.clone()
    }

    fn seen(&self) -> usize {
        self.seen
            .lock()
            .expect("the watch's lock is never poisoned")
            .len()
    }
}

/// One request the sink received.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Received {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

/// The local receiver: HTTP (records every request, answers 204, or 410 Gone on `gone` paths)
/// and a minimal SMTP relay (records every message).
#[derive(Clone)]
struct Sink {
    address: SocketAddr,
    smtp_port: u16,
    received: Arc<Mutex<Vec<Received>>>,
    mails: Arc<Mutex<Vec<Mail>>>,
}

/// One message the SMTP relay accepted: its recipients and its raw DATA.
#[derive(Debug, Clone, Default)]
struct Mail {
    to: Vec<String>,
    data: String,
}

#[derive(Clone)]
struct SinkState {
    gone: Arc<BTreeSet<String>>,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Sink {
    async fn start(gone: &[&str]) -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let state = SinkState {
            gone: Arc::new(gone.iter().map(|p| (*p).to_owned()).collect()),
            received: Arc::clone(&received),
        };
        let app = axum::Router::new().fallback(receive).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the sink");
        let address = listener.local_addr().expect("the sink's address");
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("the sink serves");
        });
        let mails = Arc::new(Mutex::new(Vec::new()));
        let smtp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the SMTP sink");
        let smtp_port = smtp.local_addr().expect("the SMTP sink's address").port();
        let store = Arc::clone(&mails);
        tokio::spawn(async move {
            while let Ok((socket, _)) = smtp.accept().await {
                tokio::spawn(smtp_session(socket, Arc::clone(&store)));
            }
        });
        Self {
            address,
            smtp_port,
            received,
            mails,
        }
    }

    fn mails(&self) -> Vec<Mail> {
        self.mails
            .lock()
            .expect("the sink's lock is never poisoned")
            .clone()
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    fn received(&self, path: &str) -> Vec<Received> {
        self.received
            .lock()
            .expect("the sink's lock is never poisoned")
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }
}

async fn receive(
    State(state): State<SinkState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let path = uri.path().to_owned();
    let status = if state.gone.contains(&path) {
        StatusCode::GONE
    } else {
        StatusCode::NO_CONTENT
    };
    state
        .received
        .lock()
        .expect("the sink's lock is never poisoned")
        .push(Received {
            path,
            headers,
            body,
        });
    status
}

/// Enough of RFC 5321 for lettre to deliver one or more messages (no TLS, no authentication):
/// `aiosmtpd` is not installed on these machines.
async fn smtp_session(socket: tokio::net::TcpStream, store: Arc<Mutex<Vec<Mail>>>) {
    let (read, mut write) = socket.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut mail = Mail::default();
    if write.write_all(b"220 sink ESMTP\r\n").await.is_err() {
        return;
    }
    while let Ok(Some(line)) = lines.next_line().await {
        let verb = line.get(..4).unwrap_or_default().to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-sink\r\n250 8BITMIME\r\n",
            "RSET" => {
                mail = Mail::default();
                b"250 OK\r\n"
            }
            "RCPT" => {
                mail.to.push(line.get(8..).unwrap_or_default().to_owned());
                b"250 OK\r\n"
            }
            "DATA" => {
                if write.write_all(b"354 end with .\r\n").await.is_err() {
                    return;
                }
                while let Ok(Some(data)) = lines.next_line().await {
                    if data == "." {
                        break;
                    }
                    mail.data.push_str(&data);
                    mail.data.push('\n');
                }
                store
                    .lock()
                    .expect("the sink's lock is never poisoned")
                    .push(std::mem::take(&mut mail));
                b"250 OK queued\r\n"
            }
            "QUIT" => {
                let _ = write.write_all(b"221 bye\r\n").await;
                return;
            }
            _ => b"250 OK\r\n",
        };
        if write.write_all(reply).await.is_err() {
            return;
        }
    }
}

/// A service binary running as a child process; killed on drop, its log printed when the test
/// is failing.
struct Service {
    /// The binary's name, or with replicas `<name>-<n>`: names its log.
    label: String,
    command: Command,
    child: Option<Child>,
    log: PathBuf,
    admin: u16,
}

impl Service {
    /// Starts `herald-<name> --config <config>` from the workspace root (where the dev configs'
    /// relative paths start) with `env` as its only `HERALD_<SECTION>__<KEY>` overrides.
    fn spawn(
        name: &'static str,
        label: String,
        config: &Path,
        dir: &Path,
        admin: u16,
        env: &[(&str, String)],
    ) -> Self {
        let mut command = Command::new(binary(&format!("herald-{name}")));
        // Only this test's config counts: no HERALD_<SECTION>__<KEY> override from the caller.
        for (key, _) in
            std::env::vars().filter(|(k, _)| k.starts_with("HERALD_") && k.contains("__"))
        {
            command.env_remove(key);
        }
        command
            .arg("--config")
            .arg(config)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(workspace_root())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        let mut service = Self {
            command,
            child: None,
            log: dir.join(format!("{label}.log")),
            label,
            admin,
        };
        service.start_if_stopped();
        service
    }

    /// Starts the process again after a kill, its output appended to the same log.
    fn start_if_stopped(&mut self) {
        if self.child.is_some() {
            return;
        }
        let out = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open a service log");
        let err = out.try_clone().expect("clone the log handle");
        let child = self
            .command
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.label));
        self.child = Some(child);
    }

    /// SIGKILL: a crash, not a shutdown.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn wait_ready(&mut self, http: &reqwest::Client) {
        let url = format!("http://127.0.0.1:{}/ready", self.admin);
        let what = format!("{} to be ready", self.label);
        let name = self.label.clone();
        let child = self.child.as_mut().expect("the service was started");
        let log = self.log.clone();
        eventually_async(&what, WAIT, || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{name} exited ({status}) before it was ready; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let request = http.get(&url).timeout(Duration::from_secs(1)).send();
            async move { request.await.ok().filter(|r| r.status().is_success()) }
        })
        .await;
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- {} log -----\n{}",
                self.label,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// A workspace binary, from the target directory this test was built into.
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    // target/<profile>/deps/pipeline-<hash> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the services first with `cargo build --workspace --bins` \
         (`cargo nextest run --workspace` builds them too)",
        path.display()
    );
    path
}
