//! Benchmark (prints, asserts nothing): no-op jobs per second through the whole pool — submit on
//! `herald.jobs.submit.bench` → intake → Redis → claim → handler → success → status events
//! published — and Redis round trips per job.
//!
//! Round trips are counted from `INFO commandstats`: Redis counts the commands a Lua script runs
//! as calls too, so only the commands this service sends itself are summed (EVALSHA/EVAL for
//! every transition, XRANGE/XTRIM (XDEL when parking) for the outbox, SMEMBERS for the reaper's
//! queue list, SCRIPT LOAD).
//!
//! `cargo bench -p herald-job-worker --bench throughput` (JOBS=<n> to change the job count,
//! CONCURRENCY=<n> the pool's size, HERALD_BENCH_REDIS_URL to run against a Redis already
//! started, as `scripts/bench-jobs-vs-bullmq` does so BullMQ gets the same server).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use chrono::Utc;
use futures::FutureExt;
use futures::future::BoxFuture;
use herald_job_worker::{HandlerError, JobHandler, Queue, Registry, Settings};
use herald_shared::config::{NatsConfig, StreamsConfig};
use herald_shared::{JobRequest, RetryPolicy, SCHEMA_VERSION, streams, subjects};
use herald_test_support::{NatsServer, RedisServer};
use redis::AsyncCommands;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Commands the service sends itself (not from inside its scripts).
const DIRECT: [&str; 8] = [
    "evalsha",
    "eval",
    "xrange",
    "xtrim",
    "xdel",
    "smembers",
    "script|load",
    "hgetall",
];

struct Noop;

impl JobHandler for Noop {
    fn run<'a>(
        &'a self,
        _: &'a JobRequest,
        _: CancellationToken,
    ) -> BoxFuture<'a, Result<Value, HandlerError>> {
        async { Ok(Value::Null) }.boxed()
    }
}

fn job(n: usize) -> JobRequest {
    JobRequest {
        id: format!("bench-{n}"),
        queue: "bench".into(),
        job_type: "noop".into(),
        payload: Value::Null,
        priority: 0,
        retry: RetryPolicy::default(),
        timeout_ms: 10_000,
        action_id: None,
        submitted_at: Utc::now(),
        schema_version: SCHEMA_VERSION,
    }
}

async fn submit(js: &jetstream::Context, range: std::ops::Range<usize>) -> anyhow::Result<()> {
    let subject = subjects::job_submit("bench")?;
    let mut acks = Vec::new();
    for n in range {
        let request = job(n);
        let message = PublishMessage::build()
            .payload(Bytes::from(serde_json::to_vec(&request)?))
            .headers(herald_job_worker::intake::submission_headers(&request));
        acks.push(js.send_publish(subject.clone(), message).await?);
        if acks.len() >= 1000 {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in acks {
        ack.await?;
    }
    Ok(())
}

async fn direct_calls(redis: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(redis)
        .await?;
    let calls: HashMap<&str, u64> = info
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name, calls))
        })
        .collect();
    Ok(DIRECT
        .iter()
        .map(|c| calls.get(c).copied().unwrap_or(0))
        .sum())
}

async fn wait_until_done(
    redis: &mut redis::aio::MultiplexedConnection,
    total: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let started = Instant::now();
    let mut succeeded_at = None;
    loop {
        let succeeded: usize = redis.zcard("herald:q:bench:succeeded").await?;
        if succeeded >= total && succeeded_at.is_none() {
            succeeded_at = Some(started.elapsed());
        }
        if let Some(succeeded_at) = succeeded_at {
            let unpublished: usize = redis.xlen("herald:outbox").await?;
            if unpublished == 0 {
                return Ok((succeeded_at, started.elapsed()));
            }
        }
        if started.elapsed() > Duration::from_secs(300) {
            anyhow::bail!("only {succeeded} of {total} jobs succeeded after 300s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let jobs: usize = std::env::var("JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let concurrency: usize = std::env::var("CONCURRENCY")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(64);
    let warmup = 500;
    let nats_server = NatsServer::start();
    let (_redis_server, redis_url) = match std::env::var("HERALD_BENCH_REDIS_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let server = RedisServer::start();
            let url = server.url();
            (Some(server), url)
        }
    };
    let nats = herald_shared::nats::connect(
        &NatsConfig {
            url: nats_server.url(),
            ..NatsConfig::default()
        },
        "job-worker-bench",
    )
    .await?;
    streams::ensure(
        &nats.jetstream,
        &StreamsConfig::default(),
        &[streams::JOBS, streams::DLQ],
    )
    .await?;
    let settings = Settings {
        redis_url: redis_url.clone(),
        concurrency,
        ..Settings::default()
    };
    let queue = Queue::connect(&settings).await?;
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(herald_job_worker::run(
        settings,
        nats.clone(),
        queue,
        Registry::new().register("noop", Noop),
        shutdown.clone(),
    ));
    let mut redis = redis::Client::open(redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;

    submit(&nats.jetstream, 0..warmup).await?;
    wait_until_done(&mut redis, warmup).await?;

    let before = direct_calls(&mut redis).await?;
    let started = Instant::now();
    let submitting = {
        let js = nats.jetstream.clone();
        tokio::spawn(async move {
            submit(&js, warmup..warmup + jobs).await?;
            anyhow::Ok(started.elapsed())
        })
    };
    let (succeeded, published) = wait_until_done(&mut redis, warmup + jobs).await?;
    let submit_time = submitting.await??;
    let calls = direct_calls(&mut redis).await? - before;

    println!("job-worker throughput, {jobs} no-op jobs, concurrency {concurrency}, one instance");
    println!(
        "  submit → succeeded in Redis: {:>8.0} jobs/s ({:.2?})",
        jobs as f64 / succeeded.as_secs_f64(),
        succeeded
    );
    println!(
        "  submit → all status events published: {:>8.0} jobs/s ({:.2?}; submitting took {:.2?})",
        jobs as f64 / published.as_secs_f64(),
        published,
        submit_time
    );
    println!(
        "herald_jobs_per_second={:.0}",
        jobs as f64 / succeeded.as_secs_f64()
    );
    println!(
        "  Redis round trips per job: {:.2} ({calls} commands sent by the service)",
        calls as f64 / jobs as f64
    );

    shutdown.cancel();
    worker.await??;
    Ok(())
}
