use anyhow::Context;
use clap::Parser;
use herald_action_worker::{STREAMS, Settings};
use herald_shared::admin::Readiness;
use herald_shared::service::{self, ServiceArgs, ServiceConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = ServiceArgs::parse();
    let config = ServiceConfig::<Settings>::load(&args)?;
    let _telemetry = herald_shared::telemetry::init("action-worker", &config.telemetry)?;
    let shutdown = herald_shared::shutdown::on_signals();

    let nats = service::connect(&config, "action-worker", &STREAMS).await?;
    let dedup = herald_action_worker::dedup(&config.service)?;
    let checked = dedup.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move { checked.report_persistence(&stop).await });
    let redis = dedup.clone();
    let readiness = Readiness::new().nats(&nats).check("redis", move || {
        let redis = redis.clone();
        async move { redis.ping().await.map_err(|e| e.to_string()) }
    });
    let (_, admin) = service::admin(&config, readiness, &shutdown).await?;

    herald_action_worker::run(
        nats.jetstream.clone(),
        config.service,
        dedup,
        shutdown.clone(),
    )
    .await
    .context("action worker failed")?;
    shutdown.cancel();
    admin.await.context("admin server task")?;
    Ok(())
}
