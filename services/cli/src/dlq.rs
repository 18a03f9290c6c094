//! `herald dlq`: list, replay and purge dead letters (stream HERALD_DLQ).
//!
//! Listing reads stored messages by sequence (JetStream direct get): nothing is consumed or
//! acked, no consumer is left behind, and what is printed is exactly what the stream holds.
//!
//! Replay is ordered for the promise: publish the original body to its original subject, wait
//! for that stream's ack (for a job, until the job worker took it up: `accept.rs`), and only
//! then delete the DLQ entry. A crash in between leaves the entry
//! in place, and replaying it again is absorbed by JetStream, because a replay's Msg-Id is
//! `<original msg id>:replay:<dlq seq>`: fixed per DLQ entry, yet different from the original's
//! Msg-Id, whose dedup entry would otherwise swallow a replay made within the duplicate window.
//! An event goes back without the partition token it was stored with
//! (`subjects::event_to_republish`): the stream's transform gives it its key's partition under
//! the current partition count.
//!
//! A dead letter whose body was too large to carry (`Herald-Body-Object`) is replayed with the
//! original body read back from the bucket `herald_dlq_bodies`; the stored body is removed after
//! the entry, and purging removes the bodies of the purged entries too.

use std::io::Write;

use async_nats::HeaderMap;
use async_nats::jetstream::context::{GetStreamError, PublishError};
use async_nats::jetstream::message::{PublishMessage, StreamMessage};
use async_nats::jetstream::stream::{
    DeleteMessageError, DirectGetError, DirectGetErrorKind, PurgeError, Stream,
};
use async_nats::jetstream::{self, context::RequestError};
use chrono::{DateTime, SecondsFormat, Utc};
use herald_shared::dlq::{self, DeadLetterInfo};
use herald_shared::headers::{MSG_ID, ORIGINAL_SUBJECT, REPLAYED_FROM};
use herald_shared::subjects::{self, DLQ_ALL, DLQ_STREAM, DlqSource};
use serde::Serialize;

use crate::connection::Session;
use crate::progress::Progress;
use crate::render;
use crate::replay_filter::ReplayFilter;

#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first, without consuming them.
    List {
        /// Only dead letters from this source: events, actions or jobs.
        #[arg(long)]
        source: Option<DlqSource>,
        /// Print at most this many.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
        limit: u64,
        /// Start at this DLQ sequence (to page through a long DLQ).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        from: u64,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter in full: its description, headers and body, as JSON.
    Show {
        /// The DLQ sequence of the dead letter (see `herald dlq list`).
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        seq: u64,
    },
    /// Republish dead letters to their original subjects, then remove them from the DLQ.
    Replay {
        /// The DLQ sequence of the dead letter to replay (see `herald dlq list`).
        #[arg(
            required_unless_present = "all",
            conflicts_with = "all",
            value_parser = clap::value_parser!(u64).range(1..)
        )]
        seq: Option<u64>,
        /// Replay every dead letter stored when the command starts.
        #[arg(long)]
        all: bool,
        /// With --all: only dead letters from this source.
        #[arg(long, requires = "all")]
        source: Option<DlqSource>,
        #[command(flatten)]
        filter: ReplayFilter,
    },
    /// Delete dead letters for good, without replaying them.
    Purge {
        /// Only dead letters from this source; all of them without it.
        #[arg(long)]
        source: Option<DlqSource>,
        /// Confirm: purged dead letters cannot be recovered.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("cannot open stream {DLQ_STREAM} (has `herald streams init` run?): {0}")]
    Open(#[from] GetStreamError),
    #[error("cannot read stream {DLQ_STREAM}: {0}")]
    Read(#[from] DirectGetError),
    #[error("cannot read the state of stream {DLQ_STREAM}: {0}")]
    State(#[from] RequestError),
    #[error("there is no dead letter with DLQ sequence {0}")]
    NoSuchEntry(u64),
    #[error("DLQ entry {0} is not a Herald dead letter (it has no {ORIGINAL_SUBJECT} header)")]
    NotADeadLetter(u64),
    #[error("replaying DLQ entry {seq} to {subject} failed; the entry is kept: {source}")]
    Republish {
        seq: u64,
        subject: String,
        #[source]
        source: PublishError,
    },
    #[error(
        "DLQ entry {seq} was replayed but could not be removed; replaying it again is \
         absorbed by its Msg-Id: {source}"
    )]
    Remove {
        seq: u64,
        #[source]
        source: DeleteMessageError,
    },
    #[error(
        "DLQ entry {seq}'s body is stored apart as {object} and cannot be read; the entry is kept: {source}"
    )]
    Body {
        seq: u64,
        object: String,
        #[source]
        source: dlq::DlqError,
    },
    #[error(
        "DLQ entry {seq} was replayed (stored as seq {stored}) but not yet accepted; the entry is \
         kept, and replaying it again is absorbed: {source}"
    )]
    NotAccepted {
        seq: u64,
        stored: u64,
        #[source]
        source: crate::accept::AcceptError,
    },
    #[error("{failed} of {total} replays failed (see above); the failed entries are kept")]
    SomeReplaysFailed { failed: usize, total: usize },
    #[error("purging deletes dead letters for good: pass --yes to confirm")]
    PurgeNotConfirmed,
    #[error("cannot purge stream {DLQ_STREAM}: {0}")]
    Purge(#[from] PurgeError),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot encode the output: {0}")]
    Encode(#[from] serde_json::Error),
}

pub async fn run(
    session: &Session,
    command: DlqCommand,
    out: &mut impl Write,
) -> Result<(), DlqError> {
    if let DlqCommand::Purge { yes: false, .. } = command {
        return Err(DlqError::PurgeNotConfirmed);
    }
    let stream = session.jetstream().get_stream(DLQ_STREAM).await?;
    match command {
        DlqCommand::List {
            source,
            limit,
            from,
            json,
        } => list(&stream, source, limit, from, json, out).await,
        DlqCommand::Show { seq } => {
            let entry = read_one(&stream, seq).await?;
            let shown = Shown {
                row: Row::of(&entry),
                headers: render::headers(Some(&entry.message.headers)),
                data: render::payload(&entry.message.payload),
            };
            writeln!(out, "{}", serde_json::to_string_pretty(&shown)?)?;
            Ok(())
        }
        DlqCommand::Replay { seq: Some(seq), .. } => {
            let entry = read_one(&stream, seq).await?;
            let replayed = replay(session.jetstream(), &stream, &entry).await?;
            writeln!(out, "{replayed}")?;
            Ok(())
        }
        DlqCommand::Replay {
            seq: None,
            source,
            filter,
            ..
        } => replay_all(session.jetstream(), &stream, source, &filter, out).await,
        DlqCommand::Purge { source, .. } => purge(session.jetstream(), &stream, source, out).await,
    }
}

/// One stored dead letter.
struct Entry {
    message: StreamMessage,
    info: Option<DeadLetterInfo>,
}

impl Entry {
    fn new(message: StreamMessage) -> Self {
        let info = DeadLetterInfo::from_headers(&message.headers);
        Self { message, info }
    }

    fn seq(&self) -> u64 {
        self.message.sequence
    }

    fn source(&self) -> Option<DlqSource> {
        DlqSource::ALL
            .into_iter()
            .find(|source| source.subject() == self.message.subject.as_str())
    }
}

fn filter(source: Option<DlqSource>) -> String {
    source.map_or_else(|| DLQ_ALL.to_owned(), DlqSource::subject)
}

/// Reads the entries matching a filter in sequence order, one direct get each.
struct Reader<'a> {
    stream: &'a Stream,
    filter: String,
    next: u64,
}

impl Reader<'_> {
    async fn next_entry(&mut self) -> Result<Option<Entry>, DlqError> {
        match self
            .stream
            .direct_get_next_for_subject(self.filter.as_str(), Some(self.next))
            .await
        {
            Ok(message) => {
                self.next = message.sequence + 1;
                Ok(Some(Entry::new(message)))
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

async fn read_one(stream: &Stream, seq: u64) -> Result<Entry, DlqError> {
    match stream.direct_get(seq).await {
        Ok(message) => Ok(Entry::new(message)),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Err(DlqError::NoSuchEntry(seq)),
        Err(e) => Err(e.into()),
    }
}

/// A dead letter as `dlq list --json` prints it.
#[derive(Debug, Serialize)]
struct Row<'a> {
    seq: u64,
    source: Option<&'static str>,
    original_subject: Option<&'a str>,
    original_msg_id: Option<&'a str>,
    error: Option<&'a str>,
    attempts: Option<u32>,
    first_failed_at: Option<String>,
    dead_lettered_at: Option<String>,
    bytes: usize,
}

impl<'a> Row<'a> {
    fn of(entry: &'a Entry) -> Self {
        let info = entry.info.as_ref();
        Self {
            seq: entry.seq(),
            source: entry.source().map(DlqSource::as_str),
            original_subject: info.map(|i| i.original_subject.as_str()),
            original_msg_id: info.and_then(|i| i.original_msg_id.as_deref()),
            error: info.map(|i| i.error.as_str()),
            attempts: info.map(|i| i.attempts),
            first_failed_at: info.and_then(|i| i.first_failed_at).map(rfc3339),
            dead_lettered_at: info.and_then(|i| i.dead_lettered_at).map(rfc3339),
            bytes: entry.message.payload.len(),
        }
    }
}

/// A dead letter as `dlq show` prints it: the list row plus everything it carries.
#[derive(Debug, Serialize)]
struct Shown<'a> {
    #[serde(flatten)]
    row: Row<'a>,
    headers: serde_json::Map<String, serde_json::Value>,
    data: serde_json::Value,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

async fn list(
    stream: &Stream,
    source: Option<DlqSource>,
    limit: u64,
    from: u64,
    json: bool,
    out: &mut impl Write,
) -> Result<(), DlqError> {
    let mut reader = Reader {
        stream,
        filter: filter(source),
        next: from,
    };
    let mut printed = 0;
    if !json {
        writeln!(
            out,
            "{:>8}  {:<7}  {:>8}  {:<24}  {:<40}  ERROR",
            "SEQ", "SOURCE", "ATTEMPTS", "FIRST FAILED AT", "ORIGINAL SUBJECT"
        )?;
    }
    while printed < limit {
        let Some(entry) = reader.next_entry().await? else {
            break;
        };
        let row = Row::of(&entry);
        if json {
            writeln!(out, "{}", serde_json::to_string(&row)?)?;
        } else {
            writeln!(
                out,
                "{:>8}  {:<7}  {:>8}  {:<24}  {:<40}  {}",
                row.seq,
                row.source.unwrap_or("?"),
                row.attempts
                    .map_or_else(|| "?".to_owned(), |a| a.to_string()),
                row.first_failed_at.as_deref().unwrap_or("?"),
                row.original_subject
                    .unwrap_or("? (not a Herald dead letter)"),
                row.error.unwrap_or(""),
            )?;
        }
        printed += 1;
    }
    if printed == 0 && !json {
        writeln!(out, "(no dead letters)")?;
    }
    if printed == limit
        && let Some(more) = reader.next_entry().await?
    {
        eprintln!(
            "(more dead letters from DLQ sequence {}; use --limit or --from {})",
            more.seq(),
            more.seq()
        );
    }
    Ok(())
}

/// What one replay did, as printed.
struct Replayed {
    seq: u64,
    subject: String,
    stream: String,
    stream_seq: u64,
    duplicate: bool,
}

impl std::fmt::Display for Replayed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.duplicate {
            write!(
                f,
                "DLQ {} -> {}: already replayed before (absorbed by {} as a duplicate of seq {}); entry removed",
                self.seq, self.subject, self.stream, self.stream_seq
            )
        } else {
            write!(
                f,
                "DLQ {} -> {}: stored in {} as seq {}; entry removed",
                self.seq, self.subject, self.stream, self.stream_seq
            )
        }
    }
}

/// The headers a replay carries: the dead letter's own (which are the original's, trace context
/// included) minus the Herald-* description and any Nats-* publish controls, plus the replay's
/// Msg-Id and where it came from.
fn replay_headers(entry: &Entry, original_msg_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, values) in entry.message.headers.iter() {
        let name_str: &str = name.as_ref();
        let lower = name_str.to_ascii_lowercase();
        if lower.starts_with("herald-") || lower.starts_with("nats-") {
            continue;
        }
        for value in values {
            headers.append(name.clone(), value.clone());
        }
    }
    let seq = entry.seq();
    headers.insert(MSG_ID, format!("{original_msg_id}:replay:{seq}").as_str());
    headers.insert(REPLAYED_FROM, seq.to_string().as_str());
    headers
}

async fn replay(
    js: &jetstream::Context,
    stream: &Stream,
    entry: &Entry,
) -> Result<Replayed, DlqError> {
    let seq = entry.seq();
    let info = entry.info.as_ref().ok_or(DlqError::NotADeadLetter(seq))?;
    // A dead letter always names its original Msg-Id; one written by hand may not, and then
    // its own position is what makes the replay's Msg-Id unique.
    let original_msg_id = info
        .original_msg_id
        .clone()
        .unwrap_or_else(|| format!("{DLQ_STREAM}:{seq}"));
    let subject = subjects::event_to_republish(&info.original_subject).to_owned();
    let republish_failed = |source| DlqError::Republish {
        seq,
        subject: subject.clone(),
        source,
    };
    let payload = match &info.body_object {
        Some(object) => dlq::load_body(js, object)
            .await
            .map_err(|source| DlqError::Body {
                seq,
                object: object.clone(),
                source,
            })?,
        None => entry.message.payload.clone(),
    };
    let message = PublishMessage::build()
        .payload(payload)
        .headers(replay_headers(entry, &original_msg_id));
    let ack = js
        .send_publish(subject.clone(), message)
        .await
        .map_err(republish_failed)?
        .await
        .map_err(republish_failed)?;
    if let Some(job) = crate::accept::replayed_job(&subject, &entry.message.payload) {
        crate::accept::job_taken_up(js, &job, ack.sequence, crate::accept::JOB_ACCEPT_TIMEOUT)
            .await
            .map_err(|source| DlqError::NotAccepted {
                seq,
                stored: ack.sequence,
                source,
            })?;
    }
    // Only now, with the replay stored (and for a job, taken up), may the dead letter go.
    stream
        .delete_message(seq)
        .await
        .map_err(|source| DlqError::Remove { seq, source })?;
    if let Some(object) = &info.body_object
        && let Err(e) = dlq::delete_body(js, object).await
    {
        eprintln!("DLQ {seq}: replayed, but its stored body {object} was not removed: {e}");
    }
    Ok(Replayed {
        seq,
        subject,
        stream: ack.stream,
        stream_seq: ack.sequence,
        duplicate: ack.duplicate,
    })
}

async fn replay_all(
    js: &jetstream::Context,
    stream: &Stream,
    source: Option<DlqSource>,
    selection: &ReplayFilter,
    out: &mut impl Write,
) -> Result<(), DlqError> {
    // A replay that fails again is dead-lettered again, behind this point: stopping at the last
    // sequence stored at the start keeps the command from chasing its own tail.
    let state = stream.get_info().await?.state;
    let (first, last) = (state.first_sequence, state.last_sequence);
    let progress = Progress::bar(last.saturating_sub(first) + 1, "DLQ entries scanned");
    let mut reader = Reader {
        stream,
        filter: filter(source),
        next: 1,
    };
    let (mut total, mut failed) = (0, 0);
    while let Some(entry) = reader.next_entry().await? {
        if entry.seq() > last {
            break;
        }
        progress.set_position(entry.seq().saturating_sub(first) + 1);
        if !selected(selection, &entry) {
            continue;
        }
        total += 1;
        if selection.dry_run {
            writeln!(out, "would replay {}", would_replay(&entry))?;
            progress.tally(format!("{total} would be replayed"));
            continue;
        }
        match replay(js, stream, &entry).await {
            Ok(replayed) => writeln!(out, "{replayed}")?,
            Err(e) => {
                failed += 1;
                progress.warn(&format!("DLQ {}: {e}", entry.seq()));
            }
        }
        progress.tally(format!("{} replayed, {failed} failed", total - failed));
    }
    progress.set_position(last.saturating_sub(first) + 1);
    progress.finish();
    if total == 0 {
        writeln!(out, "no dead letters to replay")?;
    }
    if failed > 0 {
        return Err(DlqError::SomeReplaysFailed { failed, total });
    }
    Ok(())
}

async fn purge(
    js: &jetstream::Context,
    stream: &Stream,
    source: Option<DlqSource>,
    out: &mut impl Write,
) -> Result<(), DlqError> {
    let filter = filter(source);
    // The bodies stored apart go with their dead letters, after them (an interrupted purge leaves
    // at worst bodies that expire with the DLQ's max_age).
    let last = stream.get_info().await?.state.last_sequence;
    let mut reader = Reader {
        stream,
        filter: filter.clone(),
        next: 1,
    };
    let mut bodies = Vec::new();
    while let Some(entry) = reader.next_entry().await? {
        if entry.seq() > last {
            break;
        }
        if let Some(object) = entry.info.and_then(|i| i.body_object) {
            bodies.push(object);
        }
    }
    let purged = stream
        .purge()
        .filter(filter.as_str())
        .sequence(last + 1)
        .await?;
    for object in &bodies {
        if let Err(e) = dlq::delete_body(js, object).await {
            eprintln!("stored body {object} was not removed: {e}");
        }
    }
    writeln!(
        out,
        "purged {} dead letter(s) from {filter} ({} stored bodies removed)",
        purged.purged,
        bodies.len()
    )?;
    Ok(())
}

/// Whether `replay --all`'s filters take this entry (a message without dead-letter headers
/// is never replayed anyway, and is reported by the replay itself).
fn selected(filter: &ReplayFilter, entry: &Entry) -> bool {
    match &entry.info {
        Some(info) => filter.admits(&info.original_subject, &info.error, info.dead_lettered_at),
        None => filter.admits("", "", None),
    }
}

/// A dry run's line: what the replay would publish where, and why it was dead-lettered.
fn would_replay(entry: &Entry) -> String {
    match &entry.info {
        Some(info) => format!(
            "DLQ {} to {} ({})",
            entry.seq(),
            subjects::event_to_republish(&info.original_subject),
            info.error
        ),
        None => format!(
            "DLQ {} (no dead-letter headers: would be refused)",
            entry.seq()
        ),
    }
}
