//! The `herald` operator CLI: dead letters (`dlq`), stream set-up and state (`streams`), a live
//! view of any subject (`tail`), the job worker's jobs (`jobs`), the gateway's schema file
//! (`schema`), the dispatcher's checkpoints and observers (`checkpoint`, `observers`), and the
//! auditor's record (`audit`, over its HTTP search API rather than NATS).
//!
//! One module per command group, each with its clap `Subcommand` (or `Args`), its error enum and
//! its `run`. Adding a group (dispatcher checkpoints, job management, the gateway's schema) is one
//! new module, one variant in `Command` and one arm in `run`; connection settings are shared by
//! all of them through `connection::Session`, opened only by the commands that talk to NATS.

pub mod accept;
pub mod audit;
pub mod checkpoint;
pub mod completions;
pub mod connection;
pub mod dlq;
pub mod export;
pub mod jobs;
pub mod observers;
pub mod pattern;
pub mod progress;
pub mod render;
pub mod replay_filter;
pub mod schema;
pub mod streams;
pub mod tail;

use std::io::Write;

use tokio_util::sync::CancellationToken;

use crate::connection::{ConnectionArgs, ConnectionError, Session};

#[derive(Debug, clap::Parser)]
#[command(
    name = "herald",
    version,
    about = "Operate a Herald deployment: streams, dead letters, jobs, dispatcher checkpoints and \
             observers, the gateway schema",
    after_help = "Output: tables and `key: value` lines are for people; with --json each command \
                  prints one JSON object per line, with stable field names, for scripts. The exit \
                  status is non-zero on any error or refusal, with the reason on stderr."
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
    /// The job worker's jobs: list, show, cancel, retry (asks a running herald-job-worker).
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// The gateway's schema file: write a starting one from the database (PostgreSQL only).
    #[command(subcommand)]
    Schema(schema::SchemaCommand),
    /// A dispatcher's checkpoint: show it, or move it to rewind (or skip) dispatch.
    #[command(subcommand)]
    Checkpoint(checkpoint::CheckpointCommand),
    /// Observers: dry-run a file on one event, backfill one observer over history.
    #[command(subcommand)]
    Observers(observers::ObserversCommand),
    /// The audit record (asks a running herald-auditor): search it, show an event's trail.
    Audit(Box<audit::AuditArgs>),
    /// Export a table through the flight-streamer into a .parquet, .arrow or .csv file.
    Export(export::ExportArgs),
    /// Print the completion script for a shell (bash, zsh, fish, elvish, powershell).
    Completions(completions::CompletionsArgs),
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
    #[error(transparent)]
    Jobs(#[from] jobs::JobsError),
    #[error(transparent)]
    Schema(#[from] schema::SchemaError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointCommandError),
    #[error(transparent)]
    Observers(#[from] observers::ObserversCommandError),
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    #[error(transparent)]
    Export(#[from] export::ExportError),
    #[error("cannot write the completion script: {0}")]
    Completions(#[from] std::io::Error),
}

/// Runs one command, writing its output to `out`. `shutdown` ends commands that run until
/// interrupted (`tail`).
pub async fn run(
    cli: Cli,
    shutdown: CancellationToken,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let connection = &cli.connection;
    match cli.command {
        Command::Dlq(command) => dlq::run(&Session::open(connection).await?, command, out).await?,
        Command::Streams(command) => {
            streams::run(&Session::open(connection).await?, command, out).await?;
        }
        Command::Tail(args) => {
            tail::run(&Session::open(connection).await?, args, shutdown, out).await?;
        }
        Command::Jobs(command) => {
            jobs::run(&Session::open(connection).await?, command, out).await?;
        }
        Command::Schema(command) => schema::run(command, out).await?,
        Command::Checkpoint(command) => {
            checkpoint::run(&Session::open(connection).await?, command, out).await?;
        }
        Command::Observers(command) => observers::run(connection, command, out).await?,
        Command::Audit(args) => audit::run(&args, out).await?,
        Command::Export(args) => export::run(args, shutdown, out).await?,
        Command::Completions(args) => completions::run(&args, out)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn every_command_and_flag_is_declared_consistently() {
        Cli::command().debug_assert();
    }
}
