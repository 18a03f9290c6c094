//! `herald-bench`: starts its own Herald stack (real servers, the built service binaries, the
//! example shop with its observers pointed at the bench's sink), sends `createOrder` mutations
//! from concurrent clients, and follows them through the pipeline: events on HERALD_EVENTS,
//! actions on HERALD_ACTIONS, webhooks at the sink. Prints a table and, with `--json-out`,
//! writes the same figures as JSON.
//!
//! Closed loop by default (`--concurrency` clients, each sending its next mutation when the last
//! was answered). With `--rate N` the loop is open: mutations are sent on a schedule of N per
//! second and latency is measured from each one's due time, so a stall cannot hide behind
//! clients that wait. Both print the per-stage lag (commit → event, event → action, action →
//! webhook) from the messages' own timestamps.

mod lag;
mod load;
mod progress;
mod report;
mod sink;
mod stack;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use herald_shared::Op;
use herald_shared::subjects::{self, ACTIONS_STREAM, EVENTS_STREAM};

use crate::load::Gateway;
use crate::progress::SubjectCount;
use crate::report::{Latency, Report, Throughput};

/// How often the bench looks at the streams and the sink: the resolution of the stage times.
const POLL: Duration = Duration::from_millis(20);

#[derive(Parser)]
#[command(about = "Measures the Herald pipeline end to end on a stack it starts itself")]
struct Args {
    /// How many createOrder mutations to send.
    #[arg(long, default_value_t = 1000)]
    mutations: usize,
    /// How many clients send them at once (closed loop).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Open loop: send this many mutations per second on a fixed schedule instead.
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,
    /// Open loop: at most this many mutations outstanding at once.
    #[arg(long, default_value_t = 1024)]
    in_flight: usize,
    /// Also write the figures here, as JSON.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// How long the pipeline may take to deliver everything once the mutations are sent.
    #[arg(long, value_parser = parse_seconds, default_value = "120")]
    drain_timeout: Duration,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!(
            "`{s}` is not a positive number of mutations per second"
        )),
    }
}

fn parse_seconds(s: &str) -> Result<Duration, std::num::ParseFloatError> {
    s.parse::<f64>().map(Duration::from_secs_f64)
}

/// A stage's count and when it last grew: once the count is complete, that is when it finished.
struct Stage {
    count: u64,
    grew_at: Instant,
}

impl Stage {
    fn observe(&mut self, count: u64, now: Instant) {
        if count > self.count {
            self.count = count;
            self.grew_at = now;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Dropping the run on Ctrl-C drops the stack, which kills every process it started.
    tokio::select! {
        finished = run(args) => finished,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; the stack was stopped"),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let sink = sink::Sink::start()
        .await
        .context("start the webhook sink")?;
    eprintln!(
        "starting the stack (webhooks to {}; the action worker's per_destination_concurrency {})",
        sink.url(),
        stack::ONE_DESTINATION_CONCURRENCY
    );
    let stack = stack::Stack::start(&sink.url()).await?;
    let gateway = Gateway {
        http: reqwest::Client::new(),
        url: stack.graphql_url.clone(),
        api_key: stack::API_KEY,
    };
    let customer = gateway
        .graphql(r#"mutation { createCustomer(input: {email: "bench@shop.test", name: "Bench"}) { id } }"#)
        .await?["createCustomer"]["id"]
        .clone();
    let events =
        SubjectCount::new(&stack.js, EVENTS_STREAM, "herald.events.Order.insert.>").await?;
    let actions = SubjectCount::new(
        &stack.js,
        ACTIONS_STREAM,
        &subjects::action("webhook", "order_created")?,
    )
    .await?;

    match args.rate {
        Some(rate) => eprintln!(
            "sending {} mutations at {rate}/s (open loop)",
            args.mutations
        ),
        None => eprintln!(
            "sending {} mutations from {} clients",
            args.mutations, args.concurrency
        ),
    }
    let started = Instant::now();
    let mut sending = tokio::spawn({
        let gateway = gateway.clone();
        let (mutations, concurrency, rate, in_flight) =
            (args.mutations, args.concurrency, args.rate, args.in_flight);
        async move {
            match rate {
                Some(rate) => load::paced(&gateway, &customer, mutations, rate, in_flight).await,
                None => load::run(&gateway, &customer, mutations, concurrency).await,
            }
        }
    });
    let mut stages: [Stage; 3] = std::array::from_fn(|_| Stage {
        count: 0,
        grew_at: started,
    });
    let mut load = None;
    let mut deadline = None;
    loop {
        tokio::time::sleep(POLL).await;
        let now = Instant::now();
        let counts = [
            events.count().await?,
            actions.count().await?,
            sink.orders() as u64,
        ];
        for (stage, count) in stages.iter_mut().zip(counts) {
            stage.observe(count, now);
        }
        if load.is_none() && sending.is_finished() {
            load = Some((&mut sending).await.context("the load task")?);
            deadline = Some(now + args.drain_timeout);
        }
        if let (Some(load), Some(deadline)) = (&load, deadline) {
            let expected = load.committed.len() as u64;
            if stages.iter().all(|s| s.count >= expected) || now > deadline {
                break;
            }
        }
    }
    let load = load.context("the loop ends only after the load finished")?;
    for error in load.failed.iter().take(3) {
        eprintln!("a mutation failed: {error}");
    }

    let expected = load.committed.len() as u64;
    let arrivals = sink.arrivals();
    let latencies: Vec<f64> = load
        .committed
        .iter()
        .filter_map(|(key, committed)| {
            let received = arrivals.get(key)?;
            Some(received.saturating_duration_since(*committed).as_secs_f64() * 1000.0)
        })
        .collect();
    let from_schedule = args.rate.map(|_| {
        Latency::from_samples(
            load.scheduled
                .iter()
                .filter_map(|(key, due)| {
                    let received = arrivals.get(key)?;
                    Some(received.saturating_duration_since(*due).as_secs_f64() * 1000.0)
                })
                .collect(),
        )
    });
    let stage_lag = match lag::measure(
        &stack.js,
        // The relay publishes every event on its keyed subject (`…insert.<key token>`).
        &format!("{}.>", subjects::event("Order", Op::Insert)?),
        &subjects::action("webhook", "order_created")?,
        &load.committed,
        &sink.wall_arrivals(),
    )
    .await
    {
        Ok(lags) => Some(lags),
        Err(error) => {
            eprintln!("the stage lags could not be read: {error}");
            None
        }
    };
    let [events, actions, webhooks] =
        stages.map(|s| Throughput::new(s.count, expected, s.grew_at - started));
    let report = Report {
        mutations_requested: args.mutations,
        concurrency: args.concurrency,
        rate: args.rate,
        failed_mutations: load.failed.len(),
        mutations: Throughput::new(expected, args.mutations as u64, load.finished - started),
        events,
        actions,
        webhooks,
        webhook_deliveries: sink.deliveries(),
        latency_ms: Latency::from_samples(latencies),
        scheduled_latency_ms: from_schedule,
        stage_lag,
        peak_rss_kib: stack
            .peak_rss()
            .into_iter()
            .map(|(name, kib)| (name.to_owned(), kib))
            .collect::<BTreeMap<_, _>>(),
    };
    print!("{}", report.table());
    if !report.webhooks.complete {
        eprintln!("the service logs are in {}", stack.dir().display());
    }
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}
