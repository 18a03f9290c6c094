//! Action outcomes (`HERALD_OUTCOMES`), one per attempt: `_id` is the outcome's Msg-Id
//! (`<action id>:<attempt>`, or the `duplicate` and replay forms of the contract), so every
//! attempt is its own document and a redelivery of one is absorbed.

use herald_shared::{ActionOutcome, headers, messages};
use serde_json::{Map, Value, json};

use crate::document::{Document, Incoming, Kind, mapped};

pub fn properties() -> Map<String, Value> {
    mapped(&[
        ("action_id", json!({"type": "keyword"})),
        ("kind", json!({"type": "keyword"})),
        ("observer", json!({"type": "keyword"})),
        ("attempt", json!({"type": "integer"})),
        ("status", json!({"type": "keyword"})),
        ("latency_ms", json!({"type": "long"})),
        ("http_status", json!({"type": "integer"})),
        ("error", json!({"type": "text"})),
    ])
}

pub fn document(message: &Incoming) -> Result<Document, String> {
    let outcome: ActionOutcome = messages::decode(&message.payload).map_err(|e| e.to_string())?;
    let id = message
        .header(headers::MSG_ID)
        .map_or_else(|| outcome.msg_id(), str::to_owned);
    let fields = mapped(&[
        ("action_id", json!(outcome.action_id)),
        ("kind", json!(outcome.kind)),
        ("observer", json!(outcome.observer)),
        ("attempt", json!(outcome.attempt)),
        ("status", json!(outcome.status)),
        ("latency_ms", json!(outcome.latency_ms)),
        ("http_status", json!(outcome.http_status)),
        ("error", json!(outcome.error)),
    ]);
    Ok(Document::new(
        Kind::Outcome,
        id,
        Some(outcome.event_id.to_string()),
        outcome.at,
        fields,
    ))
}

/// `herald_auditor_outcomes_total{kind, status}`: one per stored attempt.
pub fn count(document: &Document) {
    metrics::counter!(
        "herald_auditor_outcomes_total",
        "kind" => document.label("kind"),
        "status" => document.label("status"),
    )
    .increment(1);
}
