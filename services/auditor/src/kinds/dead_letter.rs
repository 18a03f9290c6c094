//! Dead letters (`HERALD_DLQ`): `_id` is the dead letter's own Msg-Id (`<original msg id>:dlq`).
//! The body is kept as text, exactly as it was refused (it may not even be JSON), so indexing a
//! dead letter cannot itself fail on its content; the event it belongs to is read from it when
//! it can be. An action's dead letter also names the action's `kind` and `observer` (from its
//! original subject `herald.actions.<kind>.<observer>`), so a search by kind or observer finds
//! it beside the outcomes, for built-in and custom kinds alike.

use herald_shared::dlq::DeadLetterInfo;
use herald_shared::headers;
use herald_shared::subjects::DLQ_STREAM;
use serde_json::{Map, Value, json};

use crate::document::{Document, Incoming, Kind, event_id_prefix, mapped};

pub fn properties() -> Map<String, Value> {
    mapped(&[
        ("source", json!({"type": "keyword"})),
        ("original_subject", json!({"type": "keyword"})),
        ("original_msg_id", json!({"type": "keyword"})),
        ("kind", json!({"type": "keyword"})),
        ("observer", json!({"type": "keyword"})),
        ("error", json!({"type": "text"})),
        ("attempts", json!({"type": "integer"})),
        ("first_failed_at", json!({"type": "date"})),
        ("dead_lettered_by", json!({"type": "keyword"})),
        ("http_status", json!({"type": "integer"})),
        ("replayed_from", json!({"type": "keyword"})),
        ("body", json!({"type": "text"})),
    ])
}

pub fn document(message: &Incoming) -> Result<Document, String> {
    let info = message
        .headers
        .as_ref()
        .and_then(DeadLetterInfo::from_headers);
    let id = message.header(headers::MSG_ID).map_or_else(
        || format!("{DLQ_STREAM}:{}", message.sequence),
        str::to_owned,
    );
    let at = info
        .as_ref()
        .and_then(|i| i.dead_lettered_at)
        .unwrap_or(message.published);
    let body = String::from_utf8_lossy(&message.payload).into_owned();
    let original_msg_id = info.as_ref().and_then(|i| i.original_msg_id.clone());
    let event_id = event_id_of(&message.payload)
        .or_else(|| original_msg_id.as_deref().and_then(event_id_prefix));
    let source = message.subject.rsplit('.').next().unwrap_or_default();
    let action = info.as_ref().and_then(|i| action_of(&i.original_subject));
    let fields = mapped(&[
        ("source", json!(source)),
        (
            "original_subject",
            json!(info.as_ref().map(|i| &i.original_subject)),
        ),
        ("original_msg_id", json!(original_msg_id)),
        ("kind", json!(action.map(|(kind, _)| kind))),
        ("observer", json!(action.and_then(|(_, observer)| observer))),
        ("error", json!(info.as_ref().map(|i| &i.error))),
        ("attempts", json!(info.as_ref().map(|i| i.attempts))),
        (
            "first_failed_at",
            json!(info.as_ref().and_then(|i| i.first_failed_at)),
        ),
        (
            "dead_lettered_by",
            json!(message.header(headers::DEAD_LETTERED_BY)),
        ),
        (
            "http_status",
            json!(
                message
                    .header(headers::HTTP_STATUS)
                    .and_then(|s| s.parse::<u16>().ok())
            ),
        ),
        (
            "replayed_from",
            json!(message.header(headers::REPLAYED_FROM)),
        ),
        ("body", json!(body)),
    ]);
    Ok(Document::new(Kind::DeadLetter, id, event_id, at, fields))
}

/// The event a dead-lettered body belongs to: an event's `id`, an action's `event.id`, an
/// outcome's `event_id`, or the front of an action id or job id.
fn event_id_of(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let text = |v: &Value| v.as_str().map(str::to_owned);
    let uuid = |s: String| uuid::Uuid::parse_str(&s).ok().map(|u| u.to_string());
    value
        .pointer("/event/id")
        .and_then(text)
        .and_then(uuid)
        .or_else(|| value.get("event_id").and_then(text).and_then(uuid))
        .or_else(|| {
            value
                .get("entity")
                .and(value.get("id"))
                .and_then(text)
                .and_then(uuid)
        })
        .or_else(|| {
            ["action_id", "job_id", "id"]
                .iter()
                .filter_map(|k| value.get(*k).and_then(text))
                .find_map(|id| event_id_prefix(&id))
        })
}

/// `herald_auditor_dead_letters_total{source, kind, by}`: `kind` is the action kind of an
/// action's dead letter, empty for other sources; `by` is `Herald-Dead-Lettered-By`.
pub fn count(document: &Document) {
    metrics::counter!(
        "herald_auditor_dead_letters_total",
        "source" => document.label("source"),
        "kind" => document.label("kind"),
        "by" => document.label("dead_lettered_by"),
    )
    .increment(1);
}

/// The `<kind>` and `<observer>` of `herald.actions.<kind>.<observer>`.
fn action_of(subject: &str) -> Option<(&str, Option<&str>)> {
    let mut tokens = subject.split('.');
    match (tokens.next(), tokens.next(), tokens.next()) {
        (Some("herald"), Some("actions"), Some(kind)) if !kind.is_empty() => {
            Some((kind, tokens.next().filter(|o| !o.is_empty())))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::action_of;

    #[test]
    fn the_action_kind_and_observer_are_read_from_the_original_subject() {
        assert_eq!(
            action_of("herald.actions.invoice.order_invoiced"),
            Some(("invoice", Some("order_invoiced")))
        );
        assert_eq!(action_of("herald.actions.webhook"), Some(("webhook", None)));
        assert_eq!(action_of("herald.events.Order.insert"), None);
        assert_eq!(action_of("herald.actions"), None);
        assert_eq!(action_of("herald.actions..x"), None);
    }
}
