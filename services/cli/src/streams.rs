//! `herald streams`: provision the five Herald streams, and show what they hold.
//!
//! `init` is the same idempotent provisioning every service runs at start
//! (`herald_shared::streams::ensure_all`) with the same `[streams]` settings, so running it
//! before, after or between service starts changes nothing a service would not.

use std::io::Write;

use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::context::{GetStreamError, RequestError};
use async_nats::jetstream::{self, ErrorCode};
use herald_shared::streams::{self, ProvisionError, StreamSpec};
use serde::Serialize;

use crate::connection::Session;

#[derive(Debug, clap::Subcommand)]
pub enum StreamsCommand {
    /// Create the Herald streams, or bring them to the configured settings. Safe to repeat.
    Init,
    /// Messages, bytes, sequences and consumers of each Herald stream.
    Info {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StreamsError {
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    #[error("cannot open stream {stream}: {source}")]
    Open {
        stream: &'static str,
        #[source]
        source: GetStreamError,
    },
    #[error("cannot read the state of stream {stream}: {source}")]
    State {
        stream: &'static str,
        #[source]
        source: RequestError,
    },
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot encode the output: {0}")]
    Encode(#[from] serde_json::Error),
}

pub async fn run(
    session: &Session,
    command: StreamsCommand,
    out: &mut impl Write,
) -> Result<(), StreamsError> {
    match command {
        StreamsCommand::Init => init(session, out).await,
        StreamsCommand::Info { json } => info(session.jetstream(), json, out).await,
    }
}

async fn init(session: &Session, out: &mut impl Write) -> Result<(), StreamsError> {
    streams::ensure_all(session.jetstream(), &session.config.streams).await?;
    for spec in streams::ALL {
        writeln!(out, "{:<16} ready  {}", spec.name, spec.subjects.join(" "))?;
    }
    Ok(())
}

/// One stream's state as `streams info --json` prints it.
#[derive(Debug, Serialize)]
struct Row {
    stream: &'static str,
    exists: bool,
    messages: u64,
    bytes: u64,
    first_seq: u64,
    last_seq: u64,
    consumers: usize,
}

async fn row(js: &jetstream::Context, spec: &StreamSpec) -> Result<Row, StreamsError> {
    let absent = Row {
        stream: spec.name,
        exists: false,
        messages: 0,
        bytes: 0,
        first_seq: 0,
        last_seq: 0,
        consumers: 0,
    };
    let stream = match js.get_stream(spec.name).await {
        Ok(stream) => stream,
        Err(e) if is_not_found(&e) => return Ok(absent),
        Err(source) => {
            return Err(StreamsError::Open {
                stream: spec.name,
                source,
            });
        }
    };
    let state = stream
        .get_info()
        .await
        .map_err(|source| StreamsError::State {
            stream: spec.name,
            source,
        })?
        .state;
    Ok(Row {
        exists: true,
        messages: state.messages,
        bytes: state.bytes,
        first_seq: state.first_sequence,
        last_seq: state.last_sequence,
        consumers: state.consumer_count,
        ..absent
    })
}

fn is_not_found(e: &GetStreamError) -> bool {
    matches!(e.kind(), GetStreamErrorKind::JetStream(js) if js.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

async fn info(
    js: &jetstream::Context,
    json: bool,
    out: &mut impl Write,
) -> Result<(), StreamsError> {
    if !json {
        writeln!(
            out,
            "{:<16} {:>10} {:>12} {:>10} {:>10} {:>9}",
            "STREAM", "MESSAGES", "BYTES", "FIRST SEQ", "LAST SEQ", "CONSUMERS"
        )?;
    }
    for spec in &streams::ALL {
        let row = row(js, spec).await?;
        if json {
            writeln!(out, "{}", serde_json::to_string(&row)?)?;
        } else if row.exists {
            writeln!(
                out,
                "{:<16} {:>10} {:>12} {:>10} {:>10} {:>9}",
                row.stream, row.messages, row.bytes, row.first_seq, row.last_seq, row.consumers
            )?;
        } else {
            writeln!(out, "{:<16} absent (run `herald streams init`)", row.stream)?;
        }
    }
    Ok(())
}
