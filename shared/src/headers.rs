//! Header names of the public contract. `Nats-Msg-Id` is JetStream's own de-duplication key; the
//! `Herald-*` headers describe dead letters; `traceparent` carries the W3C trace context so one
//! trace spans gateway → dispatcher → worker → job.

pub const MSG_ID: &str = "Nats-Msg-Id";
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

pub const ORIGINAL_SUBJECT: &str = "Herald-Original-Subject";
pub const ORIGINAL_MSG_ID: &str = "Herald-Original-Msg-Id";
pub const ERROR: &str = "Herald-Error";
pub const ATTEMPTS: &str = "Herald-Attempts";
pub const FIRST_FAILED_AT: &str = "Herald-First-Failed-At";
pub const DEAD_LETTERED_AT: &str = "Herald-Dead-Lettered-At";
pub const DEAD_LETTERED_BY: &str = "Herald-Dead-Lettered-By";

/// Set on a message that the CLI re-published from the DLQ, so its consumers and the audit trail
/// can tell a replay from a first delivery.
pub const REPLAYED_FROM: &str = "Herald-Replayed-From";

/// On a message schedule (ADR-51): `@at <RFC 3339 time>`, when the server is to publish it.
pub const SCHEDULE: &str = "Nats-Schedule";
/// On a message schedule: the subject the server publishes it on.
pub const SCHEDULE_TARGET: &str = "Nats-Schedule-Target";
/// Set by the server on a message a schedule produced: the schedule's subject. An action
/// carrying it is a scheduled retry (`schedule::Copy`).
pub const SCHEDULER: &str = "Nats-Scheduler";

/// HTTP header a job's `http` handler sends with the job id, so a receiver can absorb the repeat
/// of a job whose worker died after the call but before recording success.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// On an action's dead letter: the receiver's last HTTP status, when the action speaks HTTP.
pub const HTTP_STATUS: &str = "Herald-Http-Status";
/// On an action's dead letter: the start of the receiver's last answer, as one header line.
pub const RESPONSE_SNIPPET: &str = "Herald-Response-Snippet";

/// On a dead letter whose original body was too large to travel beside the dead-letter headers:
/// the name of the object holding that body in the JetStream object store bucket
/// `herald_dlq_bodies` (`dlq::BODIES_BUCKET`). The dead letter's own body is then empty.
pub const BODY_OBJECT: &str = "Herald-Body-Object";

/// On an action request: the HERALD_EVENTS partition its event came from, `<index>/<count>`.
pub const PARTITION: &str = "Herald-Partition";
/// On an action request: the revision that began the dispatcher's tenure of the partition's
/// lease. Later tenures have higher revisions, so in the actions stream a partition's
/// revisions never go down unless two dispatchers served it at once.
pub const LEASE_REVISION: &str = "Herald-Lease-Revision";

/// The longest header value Herald writes; longer text is cut (ending in `…`).
pub const MAX_VALUE_LEN: usize = 4096;

/// `text` as a header value that cannot break the NATS protocol: control characters (CR and LF
/// first of all, which would end the header line) become spaces, and anything past `max_len`
/// bytes is cut at a character boundary and marked with `…`. UTF-8 is kept.
pub fn safe_value(text: &str, max_len: usize) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > max_len {
        let mut cut = max_len.saturating_sub('…'.len_utf8());
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

/// Sets header `name` (one of this module's constants, or any valid name) to `text` made safe
/// with `safe_value(text, MAX_VALUE_LEN)`. Never panics, whatever `text` holds; a name that is
/// not a valid header name is skipped with a warning.
pub fn insert_safe(headers: &mut async_nats::HeaderMap, name: &str, text: &str) {
    insert_bounded(headers, name, text, MAX_VALUE_LEN);
}

/// `insert_safe` with another length bound.
pub fn insert_bounded(headers: &mut async_nats::HeaderMap, name: &str, text: &str, max_len: usize) {
    let Ok(name) = name.parse::<async_nats::HeaderName>() else {
        tracing::warn!(name, "not a valid header name; header left out");
        return;
    };
    match safe_value(text, max_len).parse::<async_nats::HeaderValue>() {
        Ok(value) => headers.insert(name, value),
        Err(e) => tracing::warn!(%name, error = %e, "header value refused; header left out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_values_become_one_bounded_line() {
        let hostile = format!("00-abc\r\nX-Injected: 1\0{}", "é".repeat(5000));
        let mut headers = async_nats::HeaderMap::new();
        insert_safe(&mut headers, ERROR, &hostile);
        let stored = headers.get(ERROR).map(|v| v.as_str().to_owned());
        let stored = stored.as_deref().unwrap_or_default();
        assert!(!stored.contains(['\r', '\n', '\0']));
        assert!(stored.len() <= MAX_VALUE_LEN, "{}", stored.len());
        assert!(stored.ends_with('…'));
        assert!(stored.starts_with("00-abc  X-Injected: 1 é"));
    }

    #[test]
    fn a_bad_header_name_is_skipped_not_a_panic() {
        let mut headers = async_nats::HeaderMap::new();
        insert_safe(&mut headers, "Bad:Name\r\n", "x");
        assert!(headers.is_empty());
    }

    #[test]
    fn short_values_are_kept_as_they_are() {
        assert_eq!(
            safe_value("plain ascii, ünïcode", 64),
            "plain ascii, ünïcode"
        );
    }
}
