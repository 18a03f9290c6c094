//! What keeps an action's effect single and the pipeline moving when things go wrong: Redis
//! leases across replicas and crashes, Redis itself going away, circuit breakers, the SSRF
//! guard and slow receivers.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{App, Reply, Sink, WAIT, action, header, retry};
use herald_shared::headers;
use herald_shared::messages::OutcomeStatus;
use herald_shared::subjects::ACTIONS_STREAM;
use herald_test_support::eventually_async;
use serde_json::json;

/// Waits until the worker's consumer holds nothing: every action acked or terminated.
async fn wait_settled(app: &App) {
    eventually_async("every action acknowledged", WAIT, || async {
        let stream = app.jetstream.get_stream(ACTIONS_STREAM).await.ok()?;
        let mut consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer("action-worker").await.ok()?;
        let info = consumer.info().await.ok()?;
        (info.num_ack_pending == 0 && info.num_pending == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_same_action_delivered_twice_to_two_workers_runs_once() {
    let mut app = App::start().await;
    let sink = Sink::start(|_| Reply::status(200).after(Duration::from_millis(500))).await;
    // One slot each: while the first worker runs the action, the copy goes to the second.
    for _ in 0..2 {
        let mut settings = app.settings();
        settings.concurrency = 1;
        app.spawn_worker(settings);
    }
    let request = action(
        "webhook",
        "orders",
        json!({"url": sink.url("/once")}),
        retry(3, 50),
    );
    app.publish_with_id(&request, None).await;
    app.publish_with_id(&request, None).await;

    let outcomes = app
        .wait_outcomes(&request.id, "a success and a duplicate", |o| o.len() >= 2)
        .await;
    let mut statuses: Vec<_> = outcomes.iter().map(|o| o.status).collect();
    statuses.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(
        statuses,
        [OutcomeStatus::Duplicate, OutcomeStatus::Succeeded]
    );
    wait_settled(&app).await;
    assert_eq!(sink.received().len(), 1, "executed once");
}

#[tokio::test]
async fn a_long_action_keeps_its_lease_and_ack_timer_alive() {
    let mut app = App::start().await;
    let sink = Sink::start(|_| Reply::status(200).after(Duration::from_millis(2500))).await;
    for _ in 0..2 {
        let mut settings = app.settings();
        settings.concurrency = 1;
        settings.ack_wait = Duration::from_secs(1);
        app.spawn_worker(settings);
    }
    let request = action(
        "webhook",
        "orders",
        json!({"url": sink.url("/long")}),
        retry(3, 50),
    );
    app.publish_with_id(&request, None).await;
    app.publish_with_id(&request, None).await;

    app.wait_outcomes(&request.id, "a success and a duplicate", |o| o.len() >= 2)
        .await;
    wait_settled(&app).await;
    let outcomes = app.outcomes(&request.id).await;
    // A lapsed lease would let the copy run (two requests); a lapsed ack timer would redeliver
    // the running message (a second duplicate outcome).
    assert_eq!(
        sink.received().len(),
        1,
        "the copy ran: the lease was not kept alive"
    );
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
}

#[tokio::test]
async fn a_worker_killed_mid_action_has_it_completed_once_its_lease_expires() {
    let mut app = App::start().await;
    let sink = Sink::start(|n| {
        if n == 0 {
            Reply::hang()
        } else {
            Reply::status(200)
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "[nats]\nurl = \"{}\"\n[telemetry]\nlog_format = \"pretty\"\n[service]\nredis_url = \"{}\"\n\
             ssrf_allow = [\"127.0.0.1\"]\nack_wait = \"2s\"\n[service.dedup]\nlease = \"1s\"\n\
             [service.webhook_secrets]\norders = \"{}\"\n",
            app.nats.url(),
            app.redis.url(),
            common::SECRET
        ),
    )
    .expect("write config");
    let log = std::fs::File::create(dir.path().join("worker.log")).expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald-action-worker"))
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log)
        .spawn()
        .expect("start the worker binary");

    let request = action(
        "webhook",
        "orders",
        json!({"url": sink.url("/slow")}),
        retry(5, 50),
    );
    app.publish(&request).await;
    sink.wait_for(1).await;
    child.kill().expect("kill -9 the worker");
    child.wait().expect("reap the worker");

    app.spawn_worker(app.settings());
    let outcomes = app
        .wait_outcomes(&request.id, "a success", |o| {
            o.iter().any(|o| o.status == OutcomeStatus::Succeeded)
        })
        .await;
    wait_settled(&app).await;
    let received = sink.received();
    assert_eq!(
        received.len(),
        2,
        "the killed attempt and the one that completed it"
    );
    assert!(
        received
            .iter()
            .all(|r| r.header("webhook-id").as_deref() == Some(request.id.as_str()))
    );
    let succeeded: Vec<_> = outcomes
        .iter()
        .filter(|o| o.status == OutcomeStatus::Succeeded)
        .collect();
    assert_eq!(succeeded.len(), 1);
    assert_eq!(
        succeeded[0].attempt, 2,
        "the crashed delivery counts as an attempt"
    );
}

#[tokio::test]
async fn redis_down_pauses_actions_and_they_run_exactly_once_when_it_returns() {
    let mut app = App::start().await;
    let sink = Sink::start(|_| Reply::status(200)).await;
    app.spawn_worker(app.settings());
    let warm = action(
        "webhook",
        "orders",
        json!({"url": sink.url("/warm")}),
        retry(3, 50),
    );
    app.publish(&warm).await;
    sink.wait_for(1).await;

    app.redis.kill();
    let requests: Vec<_> = (0..3)
        .map(|_| {
            action(
                "webhook",
                "orders",
                json!({"url": sink.url("/while-down")}),
                retry(3, 50),
            )
        })
        .collect();
    for request in &requests {
        app.publish(request).await;
    }
    // A bounded look at the absence of an effect: nothing may run without its dedup claim.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        sink.received().len(),
        1,
        "an action ran while Redis was down"
    );

    app.redis.restart();
    let received = sink.wait_for(4).await;
    wait_settled(&app).await;
    assert_eq!(sink.received().len(), 4);
    for request in &requests {
        let hits = received
            .iter()
            .filter(|r| r.header("webhook-id").as_deref() == Some(request.id.as_str()))
            .count();
        assert_eq!(hits, 1, "{} ran {hits} times", request.id);
        let outcomes = app.outcomes(&request.id).await;
        assert_eq!(outcomes.len(), 1);
        assert_eq!(outcomes[0].status, OutcomeStatus::Succeeded);
    }
}

#[tokio::test]
async fn an_open_breaker_delays_actions_without_spending_attempts_and_a_probe_closes_it() {
    let mut app = App::start().await;
    let sink = Sink::start(|n| {
        if n < 2 {
            Reply::status(503)
        } else {
            Reply::status(200)
        }
    })
    .await;
    let mut settings = app.settings();
    settings.breaker.failure_threshold = 2;
    settings.breaker.cool_down = Duration::from_millis(1500);
    app.spawn_worker(settings);
    let request = action(
        "webhook",
        "orders",
        json!({"url": sink.url("/flaky")}),
        retry(3, 50),
    );
    app.publish(&request).await;

    let outcomes = app
        .wait_outcomes(&request.id, "a success", |o| {
            o.iter().any(|o| o.status == OutcomeStatus::Succeeded)
        })
        .await;
    let mut seen: Vec<_> = outcomes.iter().map(|o| (o.attempt, o.status)).collect();
    seen.sort_by_key(|(a, _)| *a);
    assert_eq!(
        seen,
        [
            (1, OutcomeStatus::Retrying),
            (2, OutcomeStatus::Retrying),
            (3, OutcomeStatus::Succeeded)
        ],
        "deliveries held back by the open circuit spent no attempt"
    );
    let received = sink.received();
    assert_eq!(received.len(), 3);
    assert!(
        received[2].at - received[1].at >= Duration::from_millis(1400),
        "the third attempt waited for the cool-down, not the 100ms backoff: {:?}",
        received[2].at - received[1].at
    );

    // Closed again: the next action goes straight through.
    let next = action(
        "webhook",
        "orders",
        json!({"url": sink.url("/flaky")}),
        retry(1, 50),
    );
    app.publish(&next).await;
    let outcomes = app
        .wait_outcomes(&next.id, "an outcome", |o| !o.is_empty())
        .await;
    assert_eq!(outcomes[0].status, OutcomeStatus::Succeeded);
}

#[tokio::test]
async fn a_loopback_destination_is_refused_unless_allow_listed() {
    let mut app = App::start().await;
    let sink = Sink::start(|_| Reply::status(200)).await;
    let mut settings = app.settings();
    settings.ssrf_allow.clear();
    app.spawn_worker(settings);
    let request = action(
        "webhook",
        "orders",
        json!({"url": sink.url("/internal")}),
        retry(5, 50),
    );
    app.publish(&request).await;

    let letter = eventually_async("a dead letter", WAIT, || async {
        app.dead_letters().await.pop()
    })
    .await;
    let error = header(&letter, headers::ERROR).expect("error");
    assert!(
        error.contains("SSRF") && error.contains("127.0.0.1") && error.contains("loopback"),
        "{error}"
    );
    assert_eq!(header(&letter, headers::ATTEMPTS).as_deref(), Some("1"));
    assert!(sink.received().is_empty(), "nothing was sent");
}

#[tokio::test]
async fn a_slow_receiver_does_not_stall_other_destinations() {
    let mut app = App::start().await;
    let slow = Sink::start(|_| Reply::hang()).await;
    let fast = Sink::start(|_| Reply::status(200)).await;
    let mut settings = app.settings();
    settings.concurrency = 4;
    app.spawn_worker(settings);
    for _ in 0..2 {
        app.publish(&action(
            "webhook",
            "orders",
            json!({"url": slow.url("/slow")}),
            retry(3, 50),
        ))
        .await;
    }
    slow.wait_for(2).await;
    for _ in 0..5 {
        app.publish(&action(
            "webhook",
            "orders",
            json!({"url": fast.url("/fast")}),
            retry(3, 50),
        ))
        .await;
    }
    fast.wait_for(5).await;
    assert_eq!(
        slow.received().len(),
        2,
        "the slow receiver still holds both of its requests"
    );
}

/// The action worker tells, like the job worker, whether its Redis would keep the done marks
/// through a crash: the check is the shared one (`herald_shared::redis_persistence`).
#[tokio::test]
async fn the_worker_can_tell_whether_redis_persists_its_done_marks() {
    use herald_shared::redis_persistence::Persistence;
    let plain = herald_test_support::RedisServer::start();
    let aof = herald_test_support::RedisServer::start_with_aof();
    let dedup = |url: String| {
        let settings = common::settings(&url);
        herald_action_worker::dedup(&settings).expect("dedup client")
    };
    assert_eq!(
        dedup(plain.url()).persistence().await,
        Persistence::SnapshotsOnly
    );
    let durable = dedup(aof.url()).persistence().await;
    assert_eq!(
        durable,
        Persistence::AppendOnly {
            fsync: Some("always".into())
        }
    );
    assert!(durable.is_durable());
    // Reporting waits for Redis to answer, then returns.
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::time::timeout(WAIT, dedup(aof.url()).report_persistence(&stop))
        .await
        .expect("reported once Redis answered");
}

/// How a receiver is down during the outage.
#[derive(Debug, Clone, Copy)]
enum Down {
    /// Nothing listens on its port: connection refused.
    Refused,
    /// It accepts and never answers: every attempt runs into the action's timeout.
    Hanging,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Two webhook receivers get actions side by side for 40 s; one is down for 30 s of it. The
/// healthy one keeps receiving during the outage, promptly (its p99 stays far below the
/// outage, which it would exceed if its actions waited behind the down host's), the down one
/// receives every one of its actions once it is back, and nothing is lost.
async fn one_receiver_down_for_thirty_seconds(down: Down) {
    use std::collections::{BTreeSet, HashMap};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    const OUTAGE: Duration = Duration::from_secs(30);
    const BEFORE: Duration = Duration::from_secs(5);
    const AFTER: Duration = Duration::from_secs(5);
    const EVERY: Duration = Duration::from_millis(100);
    let mut app = App::start().await;
    let healthy = Sink::start(|_| Reply::status(204)).await;
    let is_down = Arc::new(AtomicBool::new(false));
    let flag = is_down.clone();
    let sick = Sink::start(move |_| {
        if flag.load(Ordering::SeqCst) {
            Reply::hang()
        } else {
            Reply::status(204)
        }
    })
    .await;
    let sick_address = sick.address;
    let mut settings = app.settings();
    settings.concurrency = 16;
    settings.per_destination_concurrency = 4;
    settings.breaker.cool_down = Duration::from_secs(2);
    app.spawn_worker(settings);
    let policy = herald_shared::RetryPolicy {
        max_attempts: 200,
        initial_delay_ms: 250,
        max_delay_ms: 2000,
        multiplier: 2.0,
        jitter: false,
    };

    let started = Instant::now();
    let mut published: HashMap<String, Instant> = HashMap::new();
    let (mut to_healthy, mut to_sick) = (Vec::new(), Vec::new());
    let (mut down_at, mut up_at) = (None, None);
    let mut restored: Option<Sink> = None;
    while started.elapsed() < BEFORE + OUTAGE + AFTER {
        let elapsed = started.elapsed();
        if down_at.is_none() && elapsed >= BEFORE {
            match down {
                Down::Hanging => is_down.store(true, Ordering::SeqCst),
                Down::Refused => sick.stop(),
            }
            down_at = Some(Instant::now());
        }
        if up_at.is_none() && elapsed >= BEFORE + OUTAGE {
            up_at = Some(Instant::now());
            match down {
                Down::Hanging => is_down.store(false, Ordering::SeqCst),
                Down::Refused => {
                    restored = Some(Sink::start_on(sick_address, |_| Reply::status(204)).await);
                }
            }
        }
        for (url, sent) in [
            (healthy.url("/healthy"), &mut to_healthy),
            (format!("http://{sick_address}/sick"), &mut to_sick),
        ] {
            let request = action("webhook", "orders", json!({"url": url}), policy.clone());
            published.insert(request.id.clone(), Instant::now());
            app.publish(&request).await;
            sent.push(request.id);
        }
        tokio::time::sleep(EVERY).await;
    }
    let (down_at, up_at) = (down_at.expect("went down"), up_at.expect("came back"));
    let sick_sinks: Vec<&Sink> = match &restored {
        Some(restored) => vec![&sick, restored],
        None => vec![&sick],
    };

    // Successful deliveries: every receipt at the healthy sink; at the sick one, those it
    // answered (a hanging receiver's receipts during the outage never were).
    let delivered_of = |sinks: &[&Sink], hung: Option<(Instant, Instant)>| {
        let mut first: HashMap<String, Instant> = HashMap::new();
        let mut receipts = 0;
        for r in sinks.iter().flat_map(|sink| sink.received()) {
            if hung.is_some_and(|(from, to)| r.at >= from && r.at < to) {
                continue;
            }
            if let Some(id) = r.header("webhook-id") {
                receipts += 1;
                first.entry(id).or_insert(r.at);
            }
        }
        (first, receipts)
    };
    let hung = matches!(down, Down::Hanging).then_some((down_at, up_at));
    let all_in = herald_test_support::eventually(
        "every action at its receiver",
        Duration::from_secs(90),
        || {
            let (h, _) = delivered_of(&[&healthy], None);
            let (s, _) = delivered_of(&sick_sinks, hung);
            (to_healthy.iter().all(|id| h.contains_key(id))
                && to_sick.iter().all(|id| s.contains_key(id)))
            .then_some(())
        },
    );
    all_in.await;
    wait_settled(&app).await;
    let (healthy_first, healthy_receipts) = delivered_of(&[&healthy], None);
    let (sick_first, sick_receipts) = delivered_of(&sick_sinks, hung);
    let dead = app.dead_letters().await.len();

    let mut during = Vec::new();
    let mut outside = Vec::new();
    for id in &to_healthy {
        let sent = published[id];
        let latency = healthy_first[id].saturating_duration_since(sent);
        if sent >= down_at && sent < up_at {
            during.push(latency);
        } else {
            outside.push(latency);
        }
    }
    during.sort();
    outside.sort();
    let early_sick = to_sick
        .iter()
        .filter(|id| {
            let sent = published[*id];
            sent >= down_at && sent < up_at && sick_first[*id] < up_at
        })
        .count();
    let unique = |ids: &[String]| ids.iter().collect::<BTreeSet<_>>().len();
    println!(
        "receiver {down:?} for {OUTAGE:?}: healthy sent {}, delivered {}, duplicates {}, \
         dead-lettered 0, lost 0; down one sent {}, delivered {}, duplicates {}, lost 0; \
         dead letters in all {dead}",
        to_healthy.len(),
        unique(&to_healthy),
        healthy_receipts - healthy_first.len(),
        to_sick.len(),
        unique(&to_sick),
        sick_receipts - sick_first.len(),
    );
    println!(
        "healthy receiver latency during the outage: p50 {:?} p99 {:?} ({} actions); \
         outside it: p50 {:?} p99 {:?} ({} actions)",
        percentile(&during, 0.50),
        percentile(&during, 0.99),
        during.len(),
        percentile(&outside, 0.50),
        percentile(&outside, 0.99),
        outside.len(),
    );
    assert_eq!(
        dead, 0,
        "an outage of 30 s is no reason to give up on anything"
    );
    assert!(
        during.len() > 100,
        "the healthy receiver got actions during the outage"
    );
    // Generous for a loaded machine, yet a healthy action waiting behind the down host's
    // (30 s of retries) would blow it.
    assert!(
        percentile(&during, 0.99) < Duration::from_secs(8),
        "the healthy receiver waited behind the down one: p99 {:?}",
        percentile(&during, 0.99)
    );
    assert_eq!(
        early_sick, 0,
        "a down receiver's action reported delivered before it was back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_refusing_connections_for_thirty_seconds_never_delays_a_healthy_one() {
    one_receiver_down_for_thirty_seconds(Down::Refused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_hanging_for_thirty_seconds_never_delays_a_healthy_one() {
    one_receiver_down_for_thirty_seconds(Down::Hanging).await;
}

/// 2000 actions to a receiver that keeps answering 503, with the consumer's max_ack_pending at
/// 100: while they wait for their retries, actions to a healthy receiver keep flowing (a retry
/// is a scheduled copy, not a message held unacknowledged), and every failing one is tried
/// `max_attempts` times, attempt numbers continuing across the copies, then dead-lettered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_waiting_for_retries_never_hold_back_healthy_ones() {
    use std::collections::{BTreeMap, HashMap};
    use std::time::Instant;

    const FAILING: usize = 2000;
    const HEALTHY: usize = 100;
    let mut app = App::start().await;
    let healthy = Sink::start(|_| Reply::status(204)).await;
    let failing = Sink::start(|_| Reply::status(503)).await;
    let mut settings = app.settings();
    settings.concurrency = 16;
    settings.per_destination_concurrency = 4;
    settings.max_ack_pending = 100;
    // The breaker would pace the failing host's attempts to one probe per cool-down; this test
    // is about retries, so it stays closed.
    settings.breaker.failure_threshold = u32::MAX;
    app.spawn_worker(settings);
    let failing_policy = herald_shared::RetryPolicy {
        max_attempts: 3,
        initial_delay_ms: 2_000,
        max_delay_ms: 4_000,
        multiplier: 2.0,
        jitter: false,
    };

    let mut doomed = Vec::with_capacity(FAILING);
    for _ in 0..FAILING {
        let request = action(
            "webhook",
            "orders",
            json!({"url": failing.url("/failing")}),
            failing_policy.clone(),
        );
        app.publish(&request).await;
        doomed.push(request.id);
    }
    // A quarter of the failing actions have had their first attempt and wait for a retry.
    failing.wait_for(FAILING / 4).await;

    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    for _ in 0..HEALTHY {
        let request = action(
            "webhook",
            "orders",
            json!({"url": healthy.url("/healthy")}),
            retry(3, 100),
        );
        sent_at.insert(request.id.clone(), Instant::now());
        app.publish(&request).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let received = herald_test_support::eventually(
        "every healthy action delivered",
        Duration::from_secs(60),
        || {
            let received = healthy.received();
            (received.len() >= HEALTHY).then_some(received)
        },
    )
    .await;
    let mut latencies: Vec<Duration> = received
        .iter()
        .filter_map(|r| {
            let id = r.header("webhook-id")?;
            Some(r.at.saturating_duration_since(*sent_at.get(&id)?))
        })
        .collect();
    latencies.sort();

    let letters = eventually_async(
        "every failing action dead-lettered",
        Duration::from_secs(120),
        || async {
            let letters = app.dead_letters().await;
            (letters.len() >= FAILING).then_some(letters)
        },
    )
    .await;
    let mut attempts: BTreeMap<String, usize> = BTreeMap::new();
    for letter in &letters {
        let id = header(letter, headers::ORIGINAL_MSG_ID).unwrap_or_default();
        assert_eq!(
            header(letter, headers::ATTEMPTS).as_deref(),
            Some("3"),
            "dead letter of {id}"
        );
        assert_eq!(
            header(letter, headers::ORIGINAL_SUBJECT).as_deref(),
            Some("herald.actions.webhook.orders")
        );
        let first = header(letter, headers::FIRST_FAILED_AT).unwrap_or_default();
        let dead = header(letter, headers::DEAD_LETTERED_AT).unwrap_or_default();
        assert!(
            first < dead,
            "{id}: first failure {first} is not before {dead}"
        );
        *attempts.entry(id).or_default() += 1;
    }
    let at_receiver = failing
        .received()
        .iter()
        .filter_map(|r| r.header("webhook-id"))
        .fold(BTreeMap::<String, usize>::new(), |mut n, id| {
            *n.entry(id).or_default() += 1;
            n
        });
    println!(
        "{FAILING} actions to a 503 receiver with max_ack_pending 100: {} dead-lettered, {} \
         requests at it; {HEALTHY} healthy actions meanwhile: p50 {:?} p99 {:?} max {:?}",
        attempts.len(),
        at_receiver.values().sum::<usize>(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
    );
    assert_eq!(
        latencies.len(),
        HEALTHY,
        "every healthy action reached its receiver"
    );
    // Loose for a loaded machine; behind 100 slots held by waiting retries, healthy actions
    // waited for the failing ones' whole retry schedule (tens of seconds).
    assert!(
        percentile(&latencies, 0.99) < Duration::from_secs(5),
        "healthy actions waited behind retries: p99 {:?}",
        percentile(&latencies, 0.99)
    );
    assert!(
        doomed.iter().all(|id| attempts.get(id) == Some(&1)),
        "every failing action is dead-lettered exactly once"
    );
    assert!(
        doomed.iter().all(|id| at_receiver.get(id) == Some(&3)),
        "every failing action was tried exactly three times"
    );
    let outcomes = app.outcomes(&doomed[0]).await;
    let mut seen: Vec<(u32, OutcomeStatus)> =
        outcomes.iter().map(|o| (o.attempt, o.status)).collect();
    seen.sort_by_key(|(attempt, _)| *attempt);
    assert_eq!(
        seen,
        [
            (1, OutcomeStatus::Retrying),
            (2, OutcomeStatus::Retrying),
            (3, OutcomeStatus::DeadLettered)
        ]
    );
}
