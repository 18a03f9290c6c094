//! `herald checkpoint show|set`: read or move a dispatcher's checkpoint.
//!
//! The checkpoint is the highest HERALD_EVENTS sequence at and below which every event is fully
//! dispatched. Reading and moving it is the dispatcher's own code (`herald_dispatcher::checkpoint`):
//! moving it re-creates the dispatcher's durable consumer, and only the dispatcher knows how that
//! consumer must look. `set --sequence N` makes the checkpoint N, so `show` then prints N back and
//! events from N + 1 on are dispatched again.

use std::io::Write;

use async_nats::jetstream;
use chrono::{DateTime, SecondsFormat, Utc};
use herald_dispatcher::DispatcherSettings;
use herald_dispatcher::checkpoint::{self, CheckpointError, Target};
use herald_shared::subjects::EVENTS_STREAM;
use serde::Serialize;

use crate::connection::Session;

#[derive(Debug, clap::Subcommand)]
pub enum CheckpointCommand {
    /// A dispatcher's checkpoint, the events stream's last sequence and the lag between them, as
    /// `key: value` lines (dispatcher, checkpoint, updated, stream last sequence, lag).
    Show {
        #[command(flatten)]
        dispatcher: DispatcherName,
        /// One JSON object instead of `key: value` lines.
        #[arg(long)]
        json: bool,
    },
    /// Rewind (or advance) a dispatcher: every event after the new checkpoint is dispatched
    /// again, to every observer. Run it while the dispatcher is stopped; a running one binds to
    /// the re-created consumer. Prints `<dispatcher> checkpoint <sequence>`.
    Set {
        #[command(flatten)]
        dispatcher: DispatcherName,
        /// The new checkpoint: events after this stream sequence are dispatched again.
        #[arg(long, required_unless_present = "time", conflicts_with = "time")]
        sequence: Option<u64>,
        /// Dispatch again every event stored at or after this RFC 3339 time.
        #[arg(long, value_parser = rfc3339)]
        time: Option<DateTime<Utc>>,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct DispatcherName {
    /// The dispatcher's name (its `[service] name`): names its consumer and checkpoint.
    #[arg(long = "dispatcher", default_value_t = DispatcherSettings::default().name)]
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointCommandError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("cannot read stream {EVENTS_STREAM} (has `herald streams init` run?): {0}")]
    Stream(String),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot encode the output: {0}")]
    Encode(#[from] serde_json::Error),
}

pub fn rfc3339(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("`{text}` is not an RFC 3339 time such as 2026-01-31T12:00:00Z: {e}"))
}

pub async fn run(
    session: &Session,
    command: CheckpointCommand,
    out: &mut impl Write,
) -> Result<(), CheckpointCommandError> {
    let js = session.jetstream();
    match command {
        CheckpointCommand::Show { dispatcher, json } => show(js, &dispatcher.name, json, out).await,
        CheckpointCommand::Set {
            dispatcher,
            sequence,
            time,
        } => {
            // clap requires exactly one of --sequence and --time. The dispatcher's target is
            // the first sequence to dispatch again, one past the checkpoint.
            let target = match time {
                Some(at) => Target::Time(at),
                None => Target::Sequence(sequence.unwrap_or(0).saturating_add(1)),
            };
            let sequence = checkpoint::set(js, &dispatcher.name, target).await?;
            writeln!(out, "{} checkpoint {sequence}", dispatcher.name)?;
            Ok(())
        }
    }
}

/// `checkpoint show --json`.
#[derive(Debug, Serialize)]
struct Shown<'a> {
    dispatcher: &'a str,
    /// None when the dispatcher never saved one.
    checkpoint: Option<u64>,
    updated: Option<DateTime<Utc>>,
    stream_last_sequence: u64,
    lag: Option<u64>,
}

async fn show(
    js: &jetstream::Context,
    name: &str,
    json: bool,
    out: &mut impl Write,
) -> Result<(), CheckpointCommandError> {
    let saved = checkpoint::show(js, name).await?;
    let stream_error = |e: &dyn std::fmt::Display| CheckpointCommandError::Stream(e.to_string());
    let last = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(|e| stream_error(&e))?
        .get_info()
        .await
        .map_err(|e| stream_error(&e))?
        .state
        .last_sequence;
    let shown = Shown {
        dispatcher: name,
        checkpoint: saved.as_ref().map(|c| c.sequence),
        updated: saved.as_ref().and_then(|c| c.updated),
        stream_last_sequence: last,
        lag: saved.as_ref().map(|c| last.saturating_sub(c.sequence)),
    };
    if json {
        writeln!(out, "{}", serde_json::to_string(&shown)?)?;
        return Ok(());
    }
    let or_none = |value: Option<String>| value.unwrap_or_else(|| "none".to_owned());
    writeln!(out, "dispatcher: {name}")?;
    writeln!(
        out,
        "checkpoint: {}",
        or_none(shown.checkpoint.map(|s| s.to_string()))
    )?;
    writeln!(
        out,
        "updated: {}",
        or_none(
            shown
                .updated
                .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        )
    )?;
    writeln!(out, "stream last sequence: {last}")?;
    writeln!(out, "lag: {}", or_none(shown.lag.map(|l| l.to_string())))?;
    Ok(())
}
