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

/// HTTP header a job's `http` handler sends with the job id, so a receiver can absorb the repeat
/// of a job whose worker died after the call but before recording success.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// On an action's dead letter: the receiver's last HTTP status, when the action speaks HTTP.
pub const HTTP_STATUS: &str = "Herald-Http-Status";
/// On an action's dead letter: the start of the receiver's last answer, as one header line.
pub const RESPONSE_SNIPPET: &str = "Herald-Response-Snippet";
