use anyhow::Context;
use clap::Parser;
use herald_flight_streamer::{FlightSettings, SERVICE};
use herald_shared::service::{self, ServiceArgs, ServiceConfig};
use herald_shared::{streams, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = ServiceArgs::parse();
    let config = ServiceConfig::<FlightSettings>::load(&args)?;
    let _telemetry = telemetry::init(SERVICE, &config.telemetry)?;
    let shutdown = herald_shared::shutdown::on_signals();
    let nats = service::connect(&config, SERVICE, &[streams::EVENTS]).await?;
    let pool = herald_flight_streamer::connect_database(&config.service).await?;
    let flight =
        herald_flight_streamer::start(config.service.clone(), &nats, pool, shutdown.clone())
            .await
            .context("the flight-streamer cannot start")?;
    let (_, admin) = service::admin(&config, flight.readiness(&nats), &shutdown).await?;
    flight.wait().await;
    admin.await?;
    Ok(())
}
