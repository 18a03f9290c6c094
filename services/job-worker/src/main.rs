//! herald-job-worker: config → telemetry → connect (NATS, Redis) → admin server → run → drain.

use anyhow::Context;
use clap::Parser;
use herald_job_worker::{Queue, Registry, SERVICE, Settings};
use herald_shared::admin::Readiness;
use herald_shared::service::{self, ServiceArgs, ServiceConfig};
use herald_shared::{shutdown, streams, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = ServiceArgs::parse();
    let config = ServiceConfig::<Settings>::load(&args)?;
    let _telemetry = telemetry::init(SERVICE, &config.telemetry)?;
    let shutdown = shutdown::on_signals();

    let nats = service::connect(&config, SERVICE, &[streams::JOBS, streams::DLQ]).await?;
    let queue = Queue::connect(&config.service)
        .await
        .with_context(|| format!("cannot connect to Redis at {}", config.service.redis_url))?;
    herald_shared::redis_persistence::report(&queue.persistence().await, "acked jobs");
    let readiness = Readiness::new().nats(&nats).check("redis", {
        let queue = queue.clone();
        move || {
            let queue = queue.clone();
            async move { queue.ping().await.map_err(|e| e.to_string()) }
        }
    });
    let (address, admin) = service::admin(&config, readiness, &shutdown).await?;
    tracing::info!(%address, "job worker started");

    herald_job_worker::run(
        config.service,
        nats,
        queue,
        Registry::with_builtins(),
        shutdown.clone(),
    )
    .await?;
    shutdown.cancel();
    admin.await.context("admin server task")?;
    tracing::info!("job worker stopped");
    Ok(())
}
