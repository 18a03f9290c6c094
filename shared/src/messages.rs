//! The JSON messages of the public contract, one type per message, as documented by the JSON
//! Schemas in `contracts/schemas/` (a test keeps both sides in step). Every message carries
//! `schema_version`; a consumer that meets a version it does not know dead-letters the message
//! rather than guessing.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::retry::RetryPolicy;

/// The version of every message schema this build writes and understands.
pub const SCHEMA_VERSION: u32 = 1;

/// What happened to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    pub const ALL: [Op; 3] = [Op::Insert, Op::Update, Op::Delete];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Op {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|op| op.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown operation `{s}` (expected insert, update or delete)"))
    }
}

/// One committed change to one row: `herald.events.<entity>.<op>`, Msg-Id = `id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntityEvent {
    /// UUIDv7: ids sort by creation time to the millisecond; within one millisecond the stream
    /// sequence is the order.
    pub id: Uuid,
    pub entity: String,
    pub op: Op,
    /// The primary key, as text.
    pub key: String,
    /// The row after the change; null on delete.
    pub data: Option<Value>,
    /// The row before the change; null on insert.
    pub before: Option<Value>,
    /// Names of the fields whose value changed; set on update only.
    pub changed: Option<Vec<String>>,
    /// Commit time.
    pub at: DateTime<Utc>,
    /// The JWT subject of whoever made the change, or null (e.g. a change made straight in SQL).
    pub actor: Option<String>,
    /// The PostgreSQL transaction id.
    pub tx: i64,
    pub schema_version: u32,
}

/// The action kinds Herald's own action worker runs. Any other kind is custom: it must be
/// declared in the observers file (`custom_kinds`), and a worker of its own consumes it.
pub const BUILTIN_ACTION_KINDS: [&str; 4] = ["webhook", "slack", "email", "job"];

/// One action of one observer, to run for one event: `herald.actions.<kind>.<observer>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionRequest {
    /// `<event id>:<observer>:<action index>`; stable, so every retry and replay is recognisable.
    pub id: String,
    pub kind: String,
    pub observer: String,
    pub action_index: u32,
    /// The action's settings from the observers file (URL, template, queue, ...), as declared.
    pub config: Value,
    pub retry: RetryPolicy,
    pub timeout_ms: u64,
    /// The event that triggered the action, whole, so a worker needs nothing else to run it.
    pub event: EntityEvent,
    pub created_at: DateTime<Utc>,
    pub schema_version: u32,
    /// Set for an observer declared `ordered = true`: where this action stands among the
    /// actions of the same observer, action index and entity key. A worker runs it only once
    /// the action of `after` is settled (done or dead-lettered). Null otherwise (and read as
    /// null when absent, as in requests from before this field).
    #[serde(default)]
    pub order: Option<ActionOrder>,
}

/// An ordered action's place in its key's line (`ActionRequest::order`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionOrder {
    /// HERALD_EVENTS' sequence of the event this action is for.
    pub sequence: u64,
    /// HERALD_EVENTS' sequence of the event of the previous action in the line, or null for the
    /// first (or for an older event replayed, which waits for nothing).
    pub after: Option<u64>,
}

impl ActionRequest {
    pub fn action_id(event_id: Uuid, observer: &str, action_index: u32) -> String {
        format!("{event_id}:{observer}:{action_index}")
    }

    /// The line an ordered action waits in: `<observer>.<action index>.<entity>.<key token>`,
    /// one per observer action and entity key (a valid KV key and Redis key alike).
    pub fn order_line(&self) -> String {
        format!(
            "{}.{}.{}.{}",
            self.observer,
            self.action_index,
            self.event.entity,
            crate::subjects::key_token(&self.event.key)
        )
    }
}

/// How one attempt at an action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeStatus {
    /// The effect is done (webhook answered 2xx, job stored, ...).
    Succeeded,
    /// A transient failure; the action will be tried again after a delay.
    Retrying,
    /// A permanent failure, or the last attempt failed: the action went to the DLQ.
    DeadLettered,
    /// Another delivery of the same action had already done it; nothing was executed.
    Duplicate,
}

/// `herald.outcomes.<kind>.<observer>`, Msg-Id = `<action id>:<attempt>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionOutcome {
    pub action_id: String,
    pub event_id: Uuid,
    pub kind: String,
    pub observer: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    pub status: OutcomeStatus,
    pub latency_ms: u64,
    /// What went wrong, when something did.
    pub error: Option<String>,
    /// The receiver's HTTP status, for kinds that speak HTTP.
    pub http_status: Option<u16>,
    pub at: DateTime<Utc>,
    pub schema_version: u32,
}

impl ActionOutcome {
    pub fn msg_id(&self) -> String {
        format!("{}:{}", self.action_id, self.attempt)
    }
}

/// A long-running job for the job-worker pool: `herald.jobs.submit.<queue>`, Msg-Id = `id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    /// Unique per job; a job emitted by an action uses the action id, so re-deliveries collapse.
    pub id: String,
    pub queue: String,
    /// Which registered handler runs it (e.g. `http`).
    pub job_type: String,
    pub payload: Value,
    /// Higher runs first.
    pub priority: i32,
    pub retry: RetryPolicy,
    pub timeout_ms: u64,
    /// The action that submitted the job, if any.
    pub action_id: Option<String>,
    pub submitted_at: DateTime<Utc>,
    pub schema_version: u32,
}

/// The life cycle of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Running,
    Succeeded,
    /// The attempt failed and the job will be retried.
    Failed,
    /// Out of attempts, or failed permanently: the job went to the DLQ.
    Dead,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Pending,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Dead,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl std::str::FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("unknown job state `{s}`"))
    }
}

/// One transition of one job: `herald.jobs.status.<queue>`, Msg-Id = `<job id>:<state>:<attempt>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub job_id: String,
    pub queue: String,
    pub job_type: String,
    pub state: JobState,
    pub attempt: u32,
    pub error: Option<String>,
    pub result: Option<Value>,
    pub at: DateTime<Utc>,
    pub schema_version: u32,
}

impl JobStatus {
    pub fn msg_id(&self) -> String {
        format!("{}:{}:{}", self.job_id, self.state.as_str(), self.attempt)
    }
}

/// Why a message body could not be used; the reason that goes into `Herald-Error`.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported schema_version {found} (this build understands {SCHEMA_VERSION})")]
    UnsupportedVersion { found: u64 },
    #[error("missing schema_version")]
    MissingVersion,
    #[error("schema_version must be a whole number, found {0}")]
    NotAnInteger(String),
}

/// Decodes a contract message, refusing a schema version this build does not understand before
/// looking at any other field (a newer producer's message must not be half-read). An embedded
/// event (ActionRequest's `event`) is held to the same rule.
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    let value: Value = serde_json::from_slice(body)?;
    check_version(&value)?;
    if let Some(event) = value.get("event").filter(|e| e.is_object()) {
        check_version(event)?;
    }
    Ok(serde_json::from_value(value)?)
}

fn check_version(value: &Value) -> Result<(), DecodeError> {
    match value.get("schema_version") {
        None | Some(Value::Null) => Err(DecodeError::MissingVersion),
        Some(version) => match version.as_u64() {
            Some(found) if found == u64::from(SCHEMA_VERSION) => Ok(()),
            Some(found) => Err(DecodeError::UnsupportedVersion { found }),
            None => Err(DecodeError::NotAnInteger(version.to_string())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> EntityEvent {
        EntityEvent {
            id: Uuid::now_v7(),
            entity: "Order".into(),
            op: Op::Update,
            key: "42".into(),
            data: Some(serde_json::json!({"id": 42, "status": "shipped"})),
            before: Some(serde_json::json!({"id": 42, "status": "paid"})),
            changed: Some(vec!["status".into()]),
            at: Utc::now(),
            actor: Some("user-1".into()),
            tx: 1234,
            schema_version: SCHEMA_VERSION,
        }
    }

    #[test]
    fn an_event_round_trips_through_json() {
        let original = event();
        let body = serde_json::to_vec(&original).expect("serialise");
        let decoded: EntityEvent = decode(&body).expect("decode");
        assert_eq!(decoded, original);
    }

    #[test]
    fn an_unknown_schema_version_is_refused_with_its_number() {
        let mut value = serde_json::to_value(event()).expect("serialise");
        value["schema_version"] = 99.into();
        let err = decode::<EntityEvent>(value.to_string().as_bytes()).expect_err("refused");
        assert!(err.to_string().contains("99"), "{err}");
    }

    #[test]
    fn malformed_json_is_a_decode_error_not_a_panic() {
        assert!(matches!(
            decode::<EntityEvent>(b"{not json"),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            decode::<EntityEvent>(b"{}"),
            Err(DecodeError::MissingVersion)
        ));
    }

    #[test]
    fn an_embedded_event_of_an_unknown_version_is_refused_too() {
        let request = ActionRequest {
            id: "x".into(),
            kind: "webhook".into(),
            observer: "o".into(),
            action_index: 0,
            config: serde_json::json!({}),
            retry: RetryPolicy::default(),
            timeout_ms: 1000,
            event: event(),
            created_at: Utc::now(),
            schema_version: SCHEMA_VERSION,
            order: None,
        };
        let mut value = serde_json::to_value(&request).expect("serialise");
        assert!(decode::<ActionRequest>(value.to_string().as_bytes()).is_ok());
        value["event"]["schema_version"] = 2.into();
        assert!(matches!(
            decode::<ActionRequest>(value.to_string().as_bytes()),
            Err(DecodeError::UnsupportedVersion { found: 2 })
        ));
        value["event"]["schema_version"] = "1".into();
        assert!(matches!(
            decode::<ActionRequest>(value.to_string().as_bytes()),
            Err(DecodeError::NotAnInteger(_))
        ));
    }

    #[test]
    fn action_ids_name_event_observer_and_index() {
        let id = Uuid::nil();
        assert_eq!(
            ActionRequest::action_id(id, "order_created", 2),
            "00000000-0000-0000-0000-000000000000:order_created:2"
        );
    }
}
