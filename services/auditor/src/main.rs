use clap::Parser;
use herald_auditor::{Auditor, AuditorSettings};
use herald_shared::service::{self, ServiceArgs, ServiceConfig};
use herald_shared::telemetry;

const SERVICE: &str = "auditor";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = ServiceArgs::parse();
    let config = ServiceConfig::<AuditorSettings>::load(&args)?;
    let _telemetry = telemetry::init(SERVICE, &config.telemetry)?;
    let shutdown = herald_shared::shutdown::on_signals();
    let nats = service::connect(&config, SERVICE, &herald_auditor::STREAMS).await?;
    let auditor = Auditor::start(
        nats.jetstream.clone(),
        config.service.clone(),
        shutdown.clone(),
    )
    .await?;
    let readiness = auditor.readiness.clone().nats(&nats);
    let (_, admin) = service::admin(&config, readiness, &shutdown).await?;
    auditor.wait().await;
    tracing::info!("auditor stopped");
    admin.await?;
    nats.client.drain().await?;
    Ok(())
}
