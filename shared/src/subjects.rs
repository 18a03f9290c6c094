//! The subject map of the public contract (contracts/README.md). Every subject a Herald service
//! publishes or consumes is built here, so the map cannot drift between services.
//!
//! Names that become subject tokens (entities, observers, kinds, queues) are checked: a `.`, a
//! wildcard or white space inside a token would silently change which consumers see a message.

use crate::messages::Op;

pub const EVENTS_STREAM: &str = "HERALD_EVENTS";
pub const ACTIONS_STREAM: &str = "HERALD_ACTIONS";
pub const OUTCOMES_STREAM: &str = "HERALD_OUTCOMES";
pub const JOBS_STREAM: &str = "HERALD_JOBS";
pub const DLQ_STREAM: &str = "HERALD_DLQ";

pub const EVENTS_ALL: &str = "herald.events.>";
pub const ACTIONS_ALL: &str = "herald.actions.>";
pub const OUTCOMES_ALL: &str = "herald.outcomes.>";
pub const JOBS_SUBMIT_ALL: &str = "herald.jobs.submit.>";
pub const JOBS_STATUS_ALL: &str = "herald.jobs.status.>";
pub const DLQ_ALL: &str = "herald.dlq.>";

/// Request/reply subjects for managing jobs (core NATS, not stored in a stream).
pub const JOBS_CONTROL_PREFIX: &str = "herald.control.jobs";
/// List jobs by queue and state.
pub const JOBS_CONTROL_LIST: &str = "herald.control.jobs.list";
/// Show one job.
pub const JOBS_CONTROL_SHOW: &str = "herald.control.jobs.show";
/// Cancel a pending, delayed or running job (a running one cooperatively).
pub const JOBS_CONTROL_CANCEL: &str = "herald.control.jobs.cancel";
/// Put a dead job back in its queue.
pub const JOBS_CONTROL_RETRY: &str = "herald.control.jobs.retry";
/// Every job management request.
pub const JOBS_CONTROL_ALL: &str = "herald.control.jobs.*";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{value}` cannot be a subject token for {what}: {reason}")]
pub struct InvalidToken {
    pub what: &'static str,
    pub value: String,
    pub reason: &'static str,
}

/// Checks that `value` is usable as exactly one subject token.
pub fn token<'a>(what: &'static str, value: &'a str) -> Result<&'a str, InvalidToken> {
    let fail = |reason| {
        Err(InvalidToken {
            what,
            value: value.to_owned(),
            reason,
        })
    };
    if value.is_empty() {
        return fail("it is empty");
    }
    if value.contains('.') {
        return fail("it contains `.`, which splits subject tokens");
    }
    if value.contains(['*', '>']) {
        return fail("it contains a wildcard (`*` or `>`)");
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return fail("it contains white space or a control character");
    }
    Ok(value)
}

/// `herald.events.<Entity>.<op>`
pub fn event(entity: &str, op: Op) -> Result<String, InvalidToken> {
    Ok(format!(
        "herald.events.{}.{}",
        token("an entity", entity)?,
        op.as_str()
    ))
}

/// `herald.events.<Entity>.<op>.<key>`: what the relay publishes, `<key>` being `key_token` of
/// the event's primary key. HERALD_EVENTS appends the partition token on arrival (its subject
/// transform), so the event is stored as `herald.events.<Entity>.<op>.<key>.<partition>`.
pub fn keyed_event(entity: &str, op: Op, key: &str) -> Result<String, InvalidToken> {
    Ok(format!("{}.{}", event(entity, op)?, key_token(key)))
}

/// The subject token standing for a primary key: the first 16 hex digits of the SHA-256 of
/// the key's text. A key may hold any character (dots and wildcards included), so it never
/// appears in a subject itself; its digest is a valid token, the same for every event of the
/// key, which is what partitioning by key needs.
pub fn key_token(key: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The event subjects HERALD_EVENTS partitions on arrival: entity, op and key token.
pub const EVENTS_KEYED: &str = "herald.events.*.*.*";

/// Events published without a key token (`herald.events.<Entity>.<op>`, the form before
/// partitioning). Stored as sent; partition 0 serves them, so none is ever left unread.
pub const EVENTS_UNKEYED: &str = "herald.events.*.*";

/// Every stored event of one partition: `herald.events.*.*.*.<partition>`.
pub fn events_of_partition(partition: u32) -> String {
    format!("herald.events.*.*.*.{partition}")
}

/// The subject to publish a stored event on again (a DLQ replay): without the partition token
/// it was stored with, so HERALD_EVENTS' transform gives it the partition its key has now. The
/// partition count may have changed since (drain, then repartition), and an event replayed
/// into its old partition would be read out of line with its key's events, or by no consumer
/// at all. Any other subject is returned unchanged.
pub fn event_to_republish(stored: &str) -> &str {
    let Some(tail) = stored.strip_prefix("herald.events.") else {
        return stored;
    };
    let tokens: Vec<&str> = tail.split('.').collect();
    match tokens.as_slice() {
        [_, _, _, partition] if partition.parse::<u32>().is_ok() => {
            &stored[..stored.len() - partition.len() - 1]
        }
        _ => stored,
    }
}

/// The consumer filters for every stored event of one entity and op: the keyed and partitioned
/// form (`herald.events.<Entity>.<op>.>`) and the form without a key token.
pub fn events_of_op(entity: &str, op: Op) -> Result<[String; 2], InvalidToken> {
    let unkeyed = event(entity, op)?;
    Ok([format!("{unkeyed}.>"), unkeyed])
}

/// `herald.events.<Entity>.>`: every event of one entity.
pub fn events_of(entity: &str) -> Result<String, InvalidToken> {
    Ok(format!("herald.events.{}.>", token("an entity", entity)?))
}

/// The `<kind>` token of the subjects where scheduled retries of actions wait; no action kind
/// may have it.
pub const SCHEDULED_TOKEN: &str = "_scheduled";
/// Every scheduled retry of an action: `herald.actions._scheduled.>`.
pub const ACTIONS_SCHEDULED_ALL: &str = "herald.actions._scheduled.>";

/// Checks an action kind: a subject token, and not the one reserved for scheduled retries.
pub fn action_kind(kind: &str) -> Result<&str, InvalidToken> {
    let kind = token("an action kind", kind)?;
    if kind == SCHEDULED_TOKEN {
        return Err(InvalidToken {
            what: "an action kind",
            value: kind.to_owned(),
            reason: "it is reserved for scheduled retries",
        });
    }
    Ok(kind)
}

/// `herald.actions.<kind>.<observer>`
pub fn action(kind: &str, observer: &str) -> Result<String, InvalidToken> {
    Ok(format!(
        "herald.actions.{}.{}",
        action_kind(kind)?,
        token("an observer", observer)?
    ))
}

/// `herald.actions.<kind>.>`: every action of one kind, whichever observer emitted it.
pub fn actions_of_kind(kind: &str) -> Result<String, InvalidToken> {
    Ok(format!("herald.actions.{}.>", action_kind(kind)?))
}

/// `herald.actions._scheduled.<kind>.<observer>.<token>`: where the scheduled retry of an action
/// on `herald.actions.<kind>.<observer>` waits (`schedule`), `<token>` being `key_token` of the
/// copy's Msg-Id, so each pending retry has a subject of its own (a subject holds one schedule).
/// `None` for a subject that is not an action's.
pub fn scheduled_action(subject: &str, msg_id: &str) -> Option<String> {
    let rest = subject.strip_prefix("herald.actions.")?;
    let (kind, _) = rest.split_once('.')?;
    action_kind(kind).ok()?;
    Some(format!(
        "herald.actions.{SCHEDULED_TOKEN}.{rest}.{}",
        key_token(msg_id)
    ))
}

/// `herald.outcomes.<kind>.<observer>`
pub fn outcome(kind: &str, observer: &str) -> Result<String, InvalidToken> {
    Ok(format!(
        "herald.outcomes.{}.{}",
        token("an action kind", kind)?,
        token("an observer", observer)?
    ))
}

/// `herald.jobs.submit.<queue>`
pub fn job_submit(queue: &str) -> Result<String, InvalidToken> {
    Ok(format!(
        "herald.jobs.submit.{}",
        token("a job queue", queue)?
    ))
}

/// `herald.jobs.status.<queue>`
pub fn job_status(queue: &str) -> Result<String, InvalidToken> {
    Ok(format!(
        "herald.jobs.status.{}",
        token("a job queue", queue)?
    ))
}

/// Where dead letters from one kind of source go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DlqSource {
    Events,
    Actions,
    Jobs,
}

impl DlqSource {
    pub const ALL: [DlqSource; 3] = [DlqSource::Events, DlqSource::Actions, DlqSource::Jobs];

    pub fn as_str(self) -> &'static str {
        match self {
            DlqSource::Events => "events",
            DlqSource::Actions => "actions",
            DlqSource::Jobs => "jobs",
        }
    }

    /// The stream whose messages die into this DLQ.
    pub fn stream(self) -> &'static str {
        match self {
            DlqSource::Events => EVENTS_STREAM,
            DlqSource::Actions => ACTIONS_STREAM,
            DlqSource::Jobs => JOBS_STREAM,
        }
    }

    /// `herald.dlq.<source>`
    pub fn subject(self) -> String {
        format!("herald.dlq.{}", self.as_str())
    }
}

impl std::str::FromStr for DlqSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|source| source.as_str() == s)
            .ok_or_else(|| format!("unknown DLQ source `{s}` (expected events, actions or jobs)"))
    }
}

/// The parts of a subject below its fixed prefix, e.g. `("Order", "insert")` for
/// `herald.events.Order.insert`. `None` when the subject does not start with `prefix`.
pub fn tail_tokens<'a>(subject: &'a str, prefix: &str) -> Option<Vec<&'a str>> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    Some(rest.split('.').collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_contract() {
        assert_eq!(
            event("Order", Op::Update).as_deref(),
            Ok("herald.events.Order.update")
        );
        assert_eq!(
            action("webhook", "order_created").as_deref(),
            Ok("herald.actions.webhook.order_created")
        );
        assert_eq!(
            outcome("slack", "shipped").as_deref(),
            Ok("herald.outcomes.slack.shipped")
        );
        assert_eq!(
            job_submit("default").as_deref(),
            Ok("herald.jobs.submit.default")
        );
        assert_eq!(
            job_status("default").as_deref(),
            Ok("herald.jobs.status.default")
        );
        assert_eq!(DlqSource::Actions.subject(), "herald.dlq.actions");
    }

    #[test]
    fn keyed_events_carry_a_stable_digest_of_the_key() {
        let subject = keyed_event("Order", Op::Insert, "a.b *>").expect("valid");
        let token = key_token("a.b *>");
        assert_eq!(subject, format!("herald.events.Order.insert.{token}"));
        assert_eq!(token.len(), 16);
        assert!(token.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(token, key_token("a.b *>"), "the same key, the same token");
        assert_ne!(token, key_token("a.b *?"));
        // Fixed by the contract: other languages compute the same token.
        assert_eq!(key_token("42"), "73475cb40a568e8d");
        assert_eq!(events_of_partition(3), "herald.events.*.*.*.3");
    }

    #[test]
    fn a_stored_event_is_republished_without_its_partition() {
        let token = key_token("42");
        assert_eq!(
            event_to_republish(&format!("herald.events.Order.insert.{token}.3")),
            format!("herald.events.Order.insert.{token}")
        );
        for unchanged in [
            format!("herald.events.Order.insert.{token}"),
            "herald.events.Order.insert".to_owned(),
            format!("herald.events.Order.insert.{token}.x"),
            "herald.actions.webhook.a.b.3".to_owned(),
        ] {
            assert_eq!(event_to_republish(&unchanged), unchanged);
        }
    }

    #[test]
    fn names_that_would_change_routing_are_refused() {
        for bad in ["", "a.b", "a*", ">", "has space", "tab\t"] {
            assert!(event(bad, Op::Insert).is_err(), "{bad:?} accepted");
            assert!(action("webhook", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn tail_tokens_split_below_the_prefix() {
        assert_eq!(
            tail_tokens("herald.events.Order.insert", "herald.events"),
            Some(vec!["Order", "insert"])
        );
        assert_eq!(tail_tokens("herald.eventsX.a", "herald.events"), None);
    }
}
