//! Publishing to JetStream and telling apart the failures worth retrying from those that never
//! heal. Every consumer that publishes on behalf of a message it holds (actions, outcomes, dead
//! letters) asks here, so a permanent failure is never retried in place forever.
//!
//! Permanent: the message (payload plus headers) exceeds the server's `max_payload` or the
//! stream's maximum message or header size; no stream stores the subject; the connection's user
//! may not publish on it. Everything else (timeouts, a broken connection, a store error) is
//! transient.
//!
//! "No responders" alone does not prove that no stream stores the subject: on a cluster a
//! stream answers nothing while it elects a new leader after a node loss. So a publisher that
//! is about to give a message up as unpublishable asks JetStream first (`confirm`), and only a
//! subject no stream is assigned to counts as missing.
//!
//! A publish the user is not allowed to make is not answered by JetStream at all: the server
//! drops it and sends an asynchronous `-ERR 'Permissions Violation for Publish to "<subject>"'`,
//! and the PubAck times out. Connections made through `nats::connect_options` record those
//! complaints (`note_server_error`), so a timeout on a subject the server just refused is
//! reported as denied, not retried as a timeout.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::context::{GetStreamByNameErrorKind, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;

/// How long a permission complaint about a subject explains a timed-out publish to it.
const PERMISSION_MEMORY: Duration = Duration::from_secs(60);
/// Subjects remembered at most; a flood of refusals must not grow memory without bound.
const PERMISSION_SUBJECTS: usize = 1024;

/// JetStream API error codes of refusals that no retry can change.
const MESSAGE_TOO_LARGE: u64 = 10054;
const HEADER_TOO_LARGE: u64 = 10097;
const STREAM_NOT_FOUND: u64 = 10059;
/// "duplicate message id is in process": another publisher (a second relay or job worker on the
/// same outbox) is storing a message with this Msg-Id right now. It is no refusal of the message:
/// a little later the same publish is answered as a duplicate of the stored copy.
const DUPLICATE_IN_PROCESS: u64 = 10158;
/// Message schedules disabled on the stream, a schedule pattern or a target it refuses.
const SCHEDULE_REFUSED: std::ops::RangeInclusive<u64> = 10188..=10190;

/// Why a publish failed, sorted by what a retry can do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishFailure {
    /// The message cannot be stored as it is, whenever it is tried.
    #[error("message too large: {0}")]
    TooLarge(String),
    /// This connection's user may not publish on the subject.
    #[error("permission denied to publish on {0}")]
    PermissionDenied(String),
    /// No stream stores the subject.
    #[error("no stream stores {0}")]
    NoStream(String),
    /// The stream refuses the message's schedule (`Nats-Schedule*`): schedules disabled, or a
    /// pattern or target it does not take.
    #[error("the stream refuses the message schedule: {0}")]
    ScheduleRefused(String),
    /// Worth trying again after a while.
    #[error("{0}")]
    Transient(String),
}

impl PublishFailure {
    pub fn is_permanent(&self) -> bool {
        !matches!(self, Self::Transient(_))
    }

    /// A label for metrics: too_large, permission_denied, no_stream, schedule_refused, transient.
    pub fn class(&self) -> &'static str {
        match self {
            Self::TooLarge(_) => "too_large",
            Self::PermissionDenied(_) => "permission_denied",
            Self::NoStream(_) => "no_stream",
            Self::ScheduleRefused(_) => "schedule_refused",
            Self::Transient(_) => "transient",
        }
    }
}

/// Sorts a JetStream publish error for a message sent to `subject`.
pub fn classify(subject: &str, error: &jetstream::context::PublishError) -> PublishFailure {
    let text = error.to_string();
    match error.kind() {
        PublishErrorKind::MaxPayloadExceeded => PublishFailure::TooLarge(text),
        PublishErrorKind::StreamNotFound => PublishFailure::NoStream(subject.to_owned()),
        PublishErrorKind::TimedOut if recently_denied(subject) => {
            PublishFailure::PermissionDenied(subject.to_owned())
        }
        PublishErrorKind::Other => match api_error_code(error) {
            Some(MESSAGE_TOO_LARGE | HEADER_TOO_LARGE) => PublishFailure::TooLarge(text),
            Some(STREAM_NOT_FOUND) => PublishFailure::NoStream(subject.to_owned()),
            Some(code) if SCHEDULE_REFUSED.contains(&code) => PublishFailure::ScheduleRefused(text),
            _ => PublishFailure::Transient(text),
        },
        _ => PublishFailure::Transient(text),
    }
}

/// `failure` as it stands once JetStream has been asked: a `NoStream` is kept only when no stream
/// is assigned the subject; when one is (its leader is away) or JetStream cannot say (its own
/// leader is away), the failure is an outage to wait out.
pub async fn confirm(js: &jetstream::Context, failure: PublishFailure) -> PublishFailure {
    let PublishFailure::NoStream(subject) = failure else {
        return failure;
    };
    match js.stream_by_subject(subject.as_str()).await {
        Ok(stream) => PublishFailure::Transient(format!(
            "stream {stream} stores {subject} but did not answer (electing a leader?)"
        )),
        Err(e)
            if matches!(
                e.kind(),
                GetStreamByNameErrorKind::NotFound | GetStreamByNameErrorKind::InvalidSubject
            ) =>
        {
            PublishFailure::NoStream(subject)
        }
        Err(e) => PublishFailure::Transient(format!(
            "no stream answered for {subject}, and JetStream cannot say which stores it: {e}"
        )),
    }
}

/// What a publisher holding one message should do about a failed publish of it. Permanent
/// failures (`classify`) are set aside at once; a refusal the server answered with (an API error
/// `classify` does not know to be permanent, or a permission complaint) is the message's own and
/// worth a few tries before it is set aside; anything else is an outage that every message would
/// meet, to be waited out without reordering. So is "duplicate message id is in process": the
/// message is being stored by another publisher of the same outbox, and waiting finds it stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    SetAside(PublishFailure),
    Refused(PublishFailure),
    Outage(PublishFailure),
}

/// Sorts a failed publish of one message to `subject` for a publisher that sets messages aside
/// (the gateway relay, the job outbox): one place that says which failures are whose.
pub fn verdict(subject: &str, error: &jetstream::context::PublishError) -> Verdict {
    let failure = classify(subject, error);
    match failure {
        PublishFailure::TooLarge(_) => Verdict::SetAside(failure),
        PublishFailure::PermissionDenied(_) | PublishFailure::ScheduleRefused(_) => {
            Verdict::Refused(failure)
        }
        PublishFailure::NoStream(_) => Verdict::Outage(failure),
        PublishFailure::Transient(_) if api_error_code(error) == Some(DUPLICATE_IN_PROCESS) => {
            Verdict::Outage(failure)
        }
        PublishFailure::Transient(_) => match error.kind() {
            PublishErrorKind::Other
            | PublishErrorKind::WrongLastMessageId
            | PublishErrorKind::WrongLastSequence => Verdict::Refused(failure),
            _ => Verdict::Outage(failure),
        },
    }
}

fn api_error_code(error: &jetstream::context::PublishError) -> Option<u64> {
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        if let Some(api) = inner.downcast_ref::<jetstream::Error>() {
            return Some(api.error_code().0);
        }
        source = inner.source();
    }
    None
}

/// Publishes and waits for the stream to store the message; a failure comes `confirm`ed.
pub async fn publish(
    js: &jetstream::Context,
    subject: &str,
    headers: HeaderMap,
    payload: Bytes,
) -> Result<PublishAck, PublishFailure> {
    let message = PublishMessage::build().payload(payload).headers(headers);
    let stored = match js.send_publish(subject.to_owned(), message).await {
        Ok(ack) => ack.await,
        Err(e) => Err(e),
    };
    match stored {
        Ok(ack) => Ok(ack),
        Err(e) => Err(confirm(js, classify(subject, &e)).await),
    }
}

fn denials() -> &'static Mutex<HashMap<String, Instant>> {
    static DENIALS: OnceLock<Mutex<HashMap<String, Instant>>> = OnceLock::new();
    DENIALS.get_or_init(Mutex::default)
}

/// Records a server complaint; `nats::connect_options` calls it for every server error.
pub fn note_server_error(complaint: &str) {
    let Some(subject) = denied_subject(complaint) else {
        return;
    };
    let mut denials = denials().lock().unwrap_or_else(|p| p.into_inner());
    if denials.len() >= PERMISSION_SUBJECTS {
        denials.retain(|_, at| at.elapsed() < PERMISSION_MEMORY);
        if denials.len() >= PERMISSION_SUBJECTS {
            denials.clear();
        }
    }
    denials.insert(subject.to_owned(), Instant::now());
}

fn recently_denied(subject: &str) -> bool {
    let denials = denials().lock().unwrap_or_else(|p| p.into_inner());
    denials
        .get(subject)
        .is_some_and(|at| at.elapsed() < PERMISSION_MEMORY)
}

/// The subject of `Permissions Violation for Publish to "<subject>"`, in any letter case.
fn denied_subject(complaint: &str) -> Option<&str> {
    const PREFIX: &str = "permissions violation for publish to ";
    let head = complaint.get(..PREFIX.len())?;
    if !head.eq_ignore_ascii_case(PREFIX) {
        return None;
    }
    let rest = complaint[PREFIX.len()..].trim();
    Some(rest.trim_matches(|c| c == '"' || c == '\''))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_complaints_name_the_subject() {
        assert_eq!(
            denied_subject("Permissions Violation for Publish to \"herald.jobs.submit.x\""),
            Some("herald.jobs.submit.x")
        );
        assert_eq!(
            denied_subject("permissions violation for publish to herald.a"),
            Some("herald.a")
        );
        assert_eq!(
            denied_subject("Permissions Violation for Subscription to \"x\""),
            None
        );
        assert_eq!(denied_subject("é"), None);
    }

    #[test]
    fn a_noted_denial_turns_a_timeout_on_that_subject_into_a_refusal() {
        note_server_error("Permissions Violation for Publish to \"herald.test.denied\"");
        let timeout = jetstream::context::PublishError::new(PublishErrorKind::TimedOut);
        assert_eq!(
            classify("herald.test.denied", &timeout),
            PublishFailure::PermissionDenied("herald.test.denied".into())
        );
        assert!(!classify("herald.test.other", &timeout).is_permanent());
    }

    #[test]
    fn size_and_missing_streams_are_permanent_the_rest_transient() {
        let table = [
            (PublishErrorKind::MaxPayloadExceeded, "too_large"),
            (PublishErrorKind::StreamNotFound, "no_stream"),
            (PublishErrorKind::TimedOut, "transient"),
            (PublishErrorKind::BrokenPipe, "transient"),
            (PublishErrorKind::MaxAckPending, "transient"),
            (PublishErrorKind::Other, "transient"),
        ];
        for (kind, class) in table {
            let error = jetstream::context::PublishError::new(kind);
            assert_eq!(classify("herald.x", &error).class(), class, "{kind:?}");
        }
    }

    fn api_error(code: u64) -> jetstream::context::PublishError {
        let api: jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": 400, "err_code": code, "description": "refused"
        }))
        .expect("an API error");
        jetstream::context::PublishError::with_source(PublishErrorKind::Other, api)
    }

    #[test]
    fn size_refusals_are_set_aside_at_once_other_answers_refused_outages_waited_out() {
        let set_aside = |v: &Verdict| matches!(v, Verdict::SetAside(_));
        let refused = |v: &Verdict| matches!(v, Verdict::Refused(_));
        let outage = |v: &Verdict| matches!(v, Verdict::Outage(_));
        assert!(set_aside(&verdict("herald.x", &api_error(10054))));
        assert!(set_aside(&verdict("herald.x", &api_error(10097))));
        let too_big = jetstream::context::PublishError::new(PublishErrorKind::MaxPayloadExceeded);
        assert!(set_aside(&verdict("herald.x", &too_big)));
        assert!(refused(&verdict("herald.x", &api_error(10077))));
        let sequence = jetstream::context::PublishError::new(PublishErrorKind::WrongLastSequence);
        assert!(refused(&verdict("herald.x", &sequence)));
        assert!(outage(&verdict("herald.x", &api_error(10059))));
        // Another publisher is storing the same Msg-Id: wait, it is no fault of the message.
        assert!(outage(&verdict("herald.x", &api_error(10158))));
        for kind in [
            PublishErrorKind::TimedOut,
            PublishErrorKind::BrokenPipe,
            PublishErrorKind::MaxAckPending,
            PublishErrorKind::StreamNotFound,
        ] {
            let error = jetstream::context::PublishError::new(kind);
            assert!(outage(&verdict("herald.x", &error)), "{kind:?}");
        }
    }
}
