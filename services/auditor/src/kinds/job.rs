//! Job state changes (`herald.jobs.status.>` of `HERALD_JOBS`): `_id` is the status Msg-Id
//! (`<job id>:<state>:<attempt>`). A job submitted by an action has the action id as its job id,
//! which starts with the event id: that is how a job joins its event's trail.

use herald_shared::{JobStatus, headers, messages};
use serde_json::{Map, Value, json};

use crate::document::{Document, Incoming, Kind, event_id_prefix, mapped};

pub fn properties(flat: &str) -> Map<String, Value> {
    mapped(&[
        ("job_id", json!({"type": "keyword"})),
        ("queue", json!({"type": "keyword"})),
        ("job_type", json!({"type": "keyword"})),
        ("status", json!({"type": "keyword"})),
        ("attempt", json!({"type": "integer"})),
        ("error", json!({"type": "text"})),
        ("result", json!({"type": flat})),
    ])
}

pub fn document(message: &Incoming) -> Result<Document, String> {
    let status: JobStatus = messages::decode(&message.payload).map_err(|e| e.to_string())?;
    let id = message
        .header(headers::MSG_ID)
        .map_or_else(|| status.msg_id(), str::to_owned);
    let event_id = event_id_prefix(&status.job_id);
    // A flattened field takes objects only; a scalar or list result is kept under `value`.
    let result = match status.result {
        Some(Value::Object(map)) => Some(Value::Object(map)),
        Some(Value::Null) | None => None,
        Some(other) => Some(json!({ "value": other })),
    };
    let fields = mapped(&[
        ("job_id", json!(status.job_id)),
        ("queue", json!(status.queue)),
        ("job_type", json!(status.job_type)),
        ("status", json!(status.state)),
        ("attempt", json!(status.attempt)),
        ("error", json!(status.error)),
        ("result", json!(result)),
    ]);
    Ok(Document::new(Kind::Job, id, event_id, status.at, fields))
}
