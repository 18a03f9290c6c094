//! Retrying a consumed message later without holding it: a scheduled copy.
//!
//! A message NAKed with a delay stays unacknowledged until it comes back, so it counts against
//! its consumer's `max_ack_pending`; enough of them waiting (one destination down, a long
//! `Retry-After`) and the consumer delivers nothing else. Instead, a consumer built with
//! `consume::Settler::rescheduling` settles a retry by publishing a copy of the message as a
//! JetStream message schedule (ADR-51, nats-server 2.12+) and then acking the original:
//!
//! - the copy goes to `<schedule prefix>.<rest of the subject>.<token>` (for actions
//!   `herald.actions._scheduled.<kind>.<observer>.<token>`, `subjects::scheduled_action`),
//!   stored by the same stream, with `Nats-Schedule: @at <RFC 3339 time>` and
//!   `Nats-Schedule-Target: <the original subject>`; at that time the server publishes its body
//!   and headers on the original subject (adding `Nats-Scheduler`, dropping the copy's
//!   `Nats-Msg-Id`) and deletes the schedule. The consumer meets it there as a new message.
//! - its Msg-Id is `<first msg id>:after:<stream sequence of the message being retried>`, and
//!   `<token>` is derived from it: a crash between the publish and the ack redelivers the same
//!   message, whose copy then has the same Msg-Id and is absorbed, so one retry never becomes
//!   two series. (The effect is once in any case: the action worker's Redis marks.)
//! - `Herald-Original-Msg-Id` names the Msg-Id of the message as first published (the action
//!   id, or a replay's `<action id>:replay:<seq>`), `Herald-Attempts` the attempts made so far,
//!   and `Herald-First-Failed-At` the first failure. A copy (it carries `Nats-Scheduler`) is
//!   read back through `Copy::of`; a first publication has none of these.
//!
//! A stream that refuses schedules (`publish::PublishFailure::ScheduleRefused`: disabled, or an
//! older server) makes the settler fall back to a NAK with the delay: the message is held
//! meanwhile, as before, and nothing is lost.

use async_nats::HeaderMap;
use async_nats::jetstream;
use chrono::{DateTime, SecondsFormat, Utc};

use crate::consume::Publication;
use crate::headers;

/// What a consumed message says about the retries before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// The Msg-Id of the message as first published.
    pub original_msg_id: String,
    /// Attempts made before this copy was scheduled.
    pub attempts: u32,
    pub first_failed_at: Option<DateTime<Utc>>,
}

impl Copy {
    /// The retry history a message carries: `Some` for a scheduled copy (`Nats-Scheduler` set
    /// by the server), `None` for a message as first published. Header values that do not parse
    /// count as absent: a copy never fails to be handled for its bookkeeping.
    pub fn of(message_headers: Option<&HeaderMap>) -> Option<Self> {
        let h = message_headers?;
        h.get(headers::SCHEDULER)?;
        let text = |name: &str| h.get(name).map(|v| v.as_str().to_owned());
        Some(Self {
            original_msg_id: text(headers::ORIGINAL_MSG_ID)?,
            attempts: text(headers::ATTEMPTS)
                .and_then(|a| a.parse().ok())
                .unwrap_or(0),
            first_failed_at: text(headers::FIRST_FAILED_AT)
                .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&Utc)),
        })
    }
}

/// The Msg-Id of `message` as first published: its own, or for a scheduled copy the one its
/// first publication had; `None` when it had none.
pub fn original_msg_id(message: &jetstream::Message) -> Option<String> {
    if let Some(copy) = Copy::of(message.headers.as_ref()) {
        return Some(copy.original_msg_id);
    }
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::MSG_ID))
        .map(|v| v.as_str().to_owned())
}

/// Attempts made on earlier copies of `message` (0 for a message as first published).
pub fn prior_attempts(message: &jetstream::Message) -> u32 {
    Copy::of(message.headers.as_ref()).map_or(0, |c| c.attempts)
}

/// The schedule subject for a copy of a message on `subject` with Msg-Id `msg_id`, or `None`
/// when the subject is not one the schedules cover.
pub type ScheduleSubject = fn(subject: &str, msg_id: &str) -> Option<String>;

/// The copy of `message` to publish so that it comes back on its subject at `at`: what the
/// module docs describe. `attempts` are those made so far, `first_failed_at` the first failure
/// if there was one.
pub fn copy(
    message: &jetstream::Message,
    schedule_subject: ScheduleSubject,
    at: DateTime<Utc>,
    attempts: u32,
    first_failed_at: Option<DateTime<Utc>>,
) -> Option<Publication> {
    let sequence = message.info().ok()?.stream_sequence;
    let original = original_msg_id(message).unwrap_or_else(|| {
        message
            .info()
            .map(|i| format!("{}:{}", i.stream, i.stream_sequence))
            .unwrap_or_default()
    });
    let msg_id = format!("{original}:after:{sequence}");
    let subject = schedule_subject(&message.subject, &msg_id)?;
    let mut out = HeaderMap::new();
    if let Some(h) = message.headers.as_ref() {
        for (name, values) in h.iter() {
            let name_str: &str = name.as_ref();
            // Publish-time controls and the server's schedule marks belong to the message
            // being retried, not to its copy.
            if name_str.starts_with("Nats-") || name_str == headers::FIRST_FAILED_AT {
                continue;
            }
            for value in values {
                out.append(name.clone(), value.clone());
            }
        }
    }
    headers::insert_safe(&mut out, headers::MSG_ID, &msg_id);
    let when = at.to_rfc3339_opts(SecondsFormat::Millis, true);
    headers::insert_safe(&mut out, headers::SCHEDULE, &format!("@at {when}"));
    headers::insert_safe(&mut out, headers::SCHEDULE_TARGET, &message.subject);
    headers::insert_safe(&mut out, headers::ORIGINAL_MSG_ID, &original);
    headers::insert_safe(&mut out, headers::ATTEMPTS, &attempts.to_string());
    if let Some(first) = first_failed_at {
        headers::insert_safe(
            &mut out,
            headers::FIRST_FAILED_AT,
            &first.to_rfc3339_opts(SecondsFormat::Millis, true),
        );
    }
    Some(Publication::new(subject, out, message.payload.clone()))
}
