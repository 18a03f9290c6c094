use anyhow::Context;
use clap::Parser;
use herald_gateway::{GatewaySettings, SERVICE};
use herald_shared::service::{self, ServiceArgs, ServiceConfig};
use herald_shared::streams;

#[derive(Debug, Parser)]
#[command(
    name = "herald-gateway",
    about = "GraphQL over PostgreSQL; every committed change becomes an event"
)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    /// Print a starting schema file (TOML) made from the database's tables, then exit.
    #[arg(long)]
    print_schema_from_db: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = ServiceConfig::<GatewaySettings>::load(&args.service)?;
    if args.print_schema_from_db {
        let pool = herald_gateway::connect_database(&config.service).await?;
        print!("{}", herald_gateway::introspect(&pool).await?.to_toml()?);
        return Ok(());
    }
    let _telemetry = herald_shared::telemetry::init(SERVICE, &config.telemetry)?;
    let shutdown = herald_shared::shutdown::on_signals();
    let nats = service::connect(&config, SERVICE, &[streams::EVENTS, streams::DLQ]).await?;
    let gateway = herald_gateway::start(&config.service, &nats, shutdown.clone())
        .await
        .context("the gateway cannot start")?;
    let (_, admin) = service::admin(&config, gateway.readiness(&nats), &shutdown).await?;
    gateway.wait().await;
    admin.await?;
    Ok(())
}
