use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use herald_dispatcher::checkpoint::{self, Target};
use herald_dispatcher::{DispatcherSettings, ObserverSet, Observers, backfill, observers};
use herald_shared::admin::Readiness;
use herald_shared::service::{self, ServiceArgs, ServiceConfig};

#[derive(Debug, Parser)]
#[command(
    name = "herald-dispatcher",
    about = "Herald dispatcher: events to observer actions"
)]
struct Cli {
    #[command(flatten)]
    service: ServiceArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Show the stored checkpoint.
    CheckpointShow,
    /// Rewind (or skip ahead): dispatch again from a stream sequence or an RFC 3339 time.
    CheckpointSet { target: Target },
    /// Run one observer of the observers file over the events stored since a time.
    Backfill {
        observer: String,
        #[arg(long)]
        since: chrono::DateTime<chrono::Utc>,
    },
    /// Dry run: which observers of FILE match EVENT (JSON) and what they would publish.
    Test {
        file: PathBuf,
        #[arg(long)]
        event: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Test { file, event }) = &cli.command {
        let run = observers::dry_run(file, event)?;
        println!("matched: {:?}", run.matched);
        for error in &run.errors {
            println!("condition error: {error}");
        }
        for (subject, request) in &run.requests {
            println!("{subject} {}", serde_json::to_string(request)?);
        }
        return Ok(());
    }
    let config = ServiceConfig::<DispatcherSettings>::load(&cli.service)?;
    // Refuse a bad observers file before touching anything else.
    let observers = match &cli.command {
        None => Some(Arc::new(Observers::load(&config.service.observers)?)),
        Some(_) => None,
    };
    let _telemetry = herald_shared::telemetry::init("dispatcher", &config.telemetry)?;
    let nats = service::connect(&config, "dispatcher", &herald_dispatcher::STREAMS).await?;
    let settings = config.service.clone();
    let js = nats.jetstream.clone();

    match cli.command {
        Some(Command::CheckpointShow) => {
            match checkpoint::show(&js, &settings.name).await? {
                Some(c) => println!("{}: {} (saved {:?})", settings.name, c.sequence, c.updated),
                None => println!("{}: no checkpoint", settings.name),
            }
            return Ok(());
        }
        Some(Command::CheckpointSet { target }) => {
            let sequence = checkpoint::set(&js, &settings.name, target).await?;
            println!("{}: checkpoint now {sequence}", settings.name);
            return Ok(());
        }
        Some(Command::Backfill { observer, since }) => {
            let set = ObserverSet::load(&settings.observers)?;
            let observer = set
                .get(&observer)
                .with_context(|| format!("no observer named {observer}"))?;
            let report = backfill::run(&js, observer, since).await?;
            println!("{report:?}");
            return Ok(());
        }
        Some(Command::Test { .. }) | None => {}
    }

    let observers = observers.context("the observers file is loaded for a dispatcher run")?;
    let shutdown = herald_shared::shutdown::on_signals();
    let reloads = herald_dispatcher::reload_on_hangup(Arc::clone(&observers), shutdown.clone())?;
    let health = herald_dispatcher::partition::Health::new();
    let readiness = health.readiness(Readiness::new().nats(&nats));
    let (_, admin) = service::admin(&config, readiness, &shutdown).await?;
    let summary = herald_dispatcher::run(js, settings, observers, health, shutdown).await;
    tracing::info!(events = summary.events, "dispatcher stopped");
    reloads.await?;
    admin.await?;
    nats.client.drain().await?;
    Ok(())
}
