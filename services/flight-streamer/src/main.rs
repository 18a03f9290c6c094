//! The flight-streamer will serve events and exports as Arrow record batches over Arrow Flight.
//! Not built yet: it loads and validates its config, connects and serves health and metrics, and
//! `/ready` says plainly that Flight streaming does not exist, so nothing mistakes it for working.

use clap::Parser;
use herald_shared::admin::Readiness;
use herald_shared::service::{self, NoSettings, ServiceArgs, ServiceConfig};
use herald_shared::{streams, telemetry};

const SERVICE: &str = "flight-streamer";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = ServiceArgs::parse();
    let config = ServiceConfig::<NoSettings>::load(&args)?;
    let _telemetry = telemetry::init(SERVICE, &config.telemetry)?;
    let shutdown = herald_shared::shutdown::on_signals();
    let nats = service::connect(&config, SERVICE, &[streams::EVENTS]).await?;
    let readiness = Readiness::new()
        .nats(&nats)
        .check("flight", || async { Err("not implemented yet".to_owned()) });
    let (_, admin) = service::admin(&config, readiness, &shutdown).await?;
    tracing::warn!(
        "the flight-streamer serves no Flight endpoint yet; it only serves health and metrics"
    );
    shutdown.cancelled().await;
    admin.await?;
    Ok(())
}
