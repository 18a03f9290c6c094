//! `herald observers`: try an observers file on one event (`test`, a dry run), run one observer
//! over history (`backfill`), and see that every action kind it uses has a consumer (`check`).
//!
//! `check` reads the consumers of HERALD_ACTIONS and their filter subjects: an action whose
//! subject no consumer's filter covers would wait unread until retention deletes it, so a kind
//! that is not served is reported, with the observers using it, and the command fails.
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

use futures::TryStreamExt;
use herald_shared::subjects::{self, ACTIONS_STREAM};

use crate::checkpoint::rfc3339;
use crate::connection::{ConnectionArgs, ConnectionError, Session};
use crate::progress::Progress;

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
    /// Report the action kinds of FILE that no consumer on HERALD_ACTIONS serves (their actions
    /// would never be read), one `<kind>  <consumers or NOT SERVED>` line each. Exits non-zero
    /// when any kind is unserved.
    Check {
        /// The observers file.
        file: PathBuf,
        /// One JSON object per kind ({"kind", "observers", "consumers"}) instead of lines.
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
    #[error("no consumer on {ACTIONS_STREAM} serves the action kind(s) {}: their actions would never be read", .0.join(", "))]
    Unserved(Vec<String>),
    #[error("cannot read the consumers of {ACTIONS_STREAM}: {0}")]
    Consumers(String),
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
        ObserversCommand::Check { file, json } => {
            let set = ObserverSet::load(&file)?;
            let session = Session::open(connection).await?;
            check(session.jetstream(), &set, json, out).await
        }
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
            let mut bar: Option<Progress> = None;
            let report =
                backfill::run_with_progress(session.jetstream(), found, since, |done, total| {
                    let bar = bar.get_or_insert_with(|| Progress::bar(total, "events"));
                    bar.set_position(done.events);
                    bar.tally(format!(
                        "{} matched, {} requests",
                        done.matched, done.requests
                    ));
                })
                .await?;
            if let Some(bar) = &bar {
                bar.finish();
            }
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

/// One kind as `observers check --json` prints it.
#[derive(Debug, Serialize)]
struct Served<'a> {
    kind: &'a str,
    observers: &'a [String],
    /// The durable consumers whose filters cover every subject of this kind in the file.
    consumers: Vec<String>,
}

async fn check(
    js: &async_nats::jetstream::Context,
    set: &ObserverSet,
    json: bool,
    out: &mut impl Write,
) -> Result<(), ObserversCommandError> {
    let consumers_error =
        |e: &dyn std::fmt::Display| ObserversCommandError::Consumers(e.to_string());
    let stream = js
        .get_stream(ACTIONS_STREAM)
        .await
        .map_err(|e| consumers_error(&e))?;
    let consumers: Vec<(String, Vec<String>)> = stream
        .consumers()
        .map_ok(|info| {
            let mut filters = info.config.filter_subjects.clone();
            if !info.config.filter_subject.is_empty() {
                filters.push(info.config.filter_subject.clone());
            }
            (info.name, filters)
        })
        .try_collect()
        .await
        .map_err(|e| consumers_error(&e))?;
    let mut unserved = Vec::new();
    for (kind, observers) in set.kinds() {
        let subjects: Vec<String> = observers
            .iter()
            .filter_map(|observer| subjects::action(&kind, observer).ok())
            .collect();
        let serving: Vec<String> = consumers
            .iter()
            .filter(|(_, filters)| {
                subjects.iter().all(|subject| {
                    // No filter: the consumer reads the whole stream.
                    filters.is_empty()
                        || filters.iter().any(|filter| {
                            crate::pattern::intersection(filter, subject).as_deref()
                                == Some(subject.as_str())
                        })
                })
            })
            .map(|(name, _)| name.clone())
            .collect();
        if serving.is_empty() {
            unserved.push(kind.clone());
        }
        if json {
            let served = Served {
                kind: &kind,
                observers: &observers,
                consumers: serving,
            };
            writeln!(out, "{}", serde_json::to_string(&served)?)?;
        } else if serving.is_empty() {
            writeln!(out, "{kind}  NOT SERVED (used by {})", observers.join(", "))?;
        } else {
            writeln!(out, "{kind}  served by {}", serving.join(", "))?;
        }
    }
    if unserved.is_empty() {
        Ok(())
    } else {
        Err(ObserversCommandError::Unserved(unserved))
    }
}
