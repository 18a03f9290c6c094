//! The `herald` operator CLI: dead letters (`dlq`), stream set-up and state (`streams`) and a
//! live view of any subject (`tail`).
//!
//! One module per command group, each with its clap `Subcommand` (or `Args`), its error enum and
//! its `run`. Adding a group (dispatcher checkpoints, job management, the gateway's schema) is one
//! new module, one variant in `Command` and one arm in `run`; connection settings are shared by
//! all of them through `connection::Session`.

pub mod connection;
pub mod dlq;
pub mod pattern;
pub mod render;
pub mod streams;
pub mod tail;

use std::io::Write;

use tokio_util::sync::CancellationToken;

use crate::connection::{ConnectionArgs, ConnectionError, Session};

#[derive(Debug, clap::Parser)]
#[command(
    name = "herald",
    version,
    about = "Operate a Herald deployment through NATS"
)]
pub struct Cli {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Dead letters: list, replay, purge.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// The Herald streams: provision them, show their state.
    #[command(subcommand)]
    Streams(streams::StreamsCommand),
    /// Print messages on a subject as they arrive, one JSON line each, until Ctrl-C.
    Tail(tail::TailArgs),
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error(transparent)]
    Dlq(#[from] dlq::DlqError),
    #[error(transparent)]
    Streams(#[from] streams::StreamsError),
    #[error(transparent)]
    Tail(#[from] tail::TailError),
}

/// Runs one command, writing its output to `out`. `shutdown` ends commands that run until
/// interrupted (`tail`).
pub async fn run(
    cli: Cli,
    shutdown: CancellationToken,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let session = Session::open(&cli.connection).await?;
    match cli.command {
        Command::Dlq(command) => dlq::run(&session, command, out).await?,
        Command::Streams(command) => streams::run(&session, command, out).await?,
        Command::Tail(args) => tail::run(&session, args, shutdown, out).await?,
    }
    Ok(())
}
