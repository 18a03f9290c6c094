//! The auditor will index every event and outcome into Elasticsearch and serve full-text search.
//! Not built yet: it loads and validates its config, connects and serves health and metrics, and
//! `/ready` says plainly that indexing does not exist, so nothing mistakes it for working.

use clap::Parser;
use herald_shared::admin::Readiness;
use herald_shared::service::{self, NoSettings, ServiceArgs, ServiceConfig};
use herald_shared::{streams, telemetry};

const SERVICE: &str = "auditor";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = ServiceArgs::parse();
    let config = ServiceConfig::<NoSettings>::load(&args)?;
    let _telemetry = telemetry::init(SERVICE, &config.telemetry)?;
    let shutdown = herald_shared::shutdown::on_signals();
    let nats = service::connect(&config, SERVICE, &[streams::EVENTS, streams::OUTCOMES]).await?;
    let readiness = Readiness::new().nats(&nats).check("indexer", || async {
        Err("not implemented yet".to_owned())
    });
    let (_, admin) = service::admin(&config, readiness, &shutdown).await?;
    tracing::warn!("the auditor does not index anything yet; it only serves health and metrics");
    shutdown.cancelled().await;
    admin.await?;
    Ok(())
}
