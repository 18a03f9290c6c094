//! `herald observers`: try an observers file on one event (`test`, a dry run), and run one
//! observer over history (`backfill`).
//!
//! Both are the dispatcher's own code (`herald_dispatcher::observers::dry_run`,
//! `herald_dispatcher::backfill::run`), so a dry run matches exactly as the live dispatcher
//! would, and a backfill publishes the very action ids the live path uses: running it twice, or
//! over events already dispatched to that observer, is absorbed by JetStream's Msg-Id dedup.
//! Other observers are never re-run; rewinding everything is `herald checkpoint set`.

use std::io::Write;
use std::path::PathBuf;

use chrono::{DateTime, SecondsFormat, Utc};
use herald_dispatcher::ObserverSet;
use herald_dispatcher::backfill::{self, BackfillError};
use herald_dispatcher::observers::{DryRunError, ObserversError, dry_run};
use herald_shared::ActionRequest;
use serde::Serialize;

use crate::checkpoint::rfc3339;
use crate::connection::{ConnectionArgs, ConnectionError, Session};

#[derive(Debug, clap::Subcommand)]
pub enum ObserversCommand {
    /// Dry run: which observers of FILE match the event, and the action requests they would
    /// publish (one `<observer>  <subject>  <action id>` line each). Publishes nothing and needs
    /// no NATS. Exits non-zero when a condition fails on the event.
    Test {
        /// The observers file.
        file: PathBuf,
        /// The event, as the EntityEvent JSON published on herald.events.<Entity>.<op>.
        #[arg(long)]
        event: String,
        /// One JSON object ({"matched", "requests", "errors"}) instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Run one observer over the events of its entity stored since a time, publishing its action
    /// requests; other observers are not re-run. Safe to repeat. Prints what it read, matched and
    /// published.
    Backfill {
        /// The observer's name in the file.
        observer: String,
        /// The observers file the observer is declared in.
        #[arg(long)]
        file: PathBuf,
        /// Start at events stored at or after this RFC 3339 time.
        #[arg(long, value_parser = rfc3339)]
        since: DateTime<Utc>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ObserversCommandError {
    #[error(transparent)]
    DryRun(#[from] DryRunError),
    #[error(transparent)]
    File(#[from] ObserversError),
    #[error("there is no observer {name} in {file}; it declares: {declared}")]
    NoSuchObserver {
        name: String,
        file: String,
        declared: String,
    },
    #[error("{0} condition(s) failed on the event (see above)")]
    ConditionsFailed(usize),
    #[error("backfill stopped: {0}")]
    Backfill(#[from] BackfillError),
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot encode the output: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The dry run as `observers test --json` prints it.
#[derive(Debug, Serialize)]
struct Tested<'a> {
    matched: &'a [String],
    requests: Vec<Request<'a>>,
    errors: &'a [String],
}

#[derive(Debug, Serialize)]
struct Request<'a> {
    subject: &'a str,
    request: &'a ActionRequest,
}

/// `test` needs no NATS, so the connection is opened here, only for `backfill`.
pub async fn run(
    connection: &ConnectionArgs,
    command: ObserversCommand,
    out: &mut impl Write,
) -> Result<(), ObserversCommandError> {
    match command {
        ObserversCommand::Test { file, event, json } => test(&file, &event, json, out),
        ObserversCommand::Backfill {
            observer,
            file,
            since,
        } => {
            let set = ObserverSet::load(&file)?;
            let Some(found) = set.get(&observer) else {
                return Err(ObserversCommandError::NoSuchObserver {
                    name: observer,
                    file: file.display().to_string(),
                    declared: set
                        .observers
                        .iter()
                        .map(|o| o.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            };
            let session = Session::open(connection).await?;
            let report = backfill::run(session.jetstream(), found, since).await?;
            writeln!(
                out,
                "backfilled {observer} since {}: {} events read, {} matched, {} requests \
                 published, {} unreadable skipped",
                since.to_rfc3339_opts(SecondsFormat::Millis, true),
                report.events,
                report.matched,
                report.requests,
                report.skipped
            )?;
            Ok(())
        }
    }
}

fn test(
    file: &std::path::Path,
    event: &str,
    json: bool,
    out: &mut impl Write,
) -> Result<(), ObserversCommandError> {
    let run = dry_run(file, event)?;
    if json {
        let tested = Tested {
            matched: &run.matched,
            requests: run
                .requests
                .iter()
                .map(|(subject, request)| Request { subject, request })
                .collect(),
            errors: &run.errors,
        };
        writeln!(out, "{}", serde_json::to_string(&tested)?)?;
    } else {
        if run.matched.is_empty() {
            writeln!(out, "(no observer matches)")?;
        }
        for (subject, request) in &run.requests {
            writeln!(out, "{}  {subject}  {}", request.observer, request.id)?;
        }
        for error in &run.errors {
            writeln!(out, "condition failed: {error}")?;
        }
    }
    if run.errors.is_empty() {
        Ok(())
    } else {
        Err(ObserversCommandError::ConditionsFailed(run.errors.len()))
    }
}
