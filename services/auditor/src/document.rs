//! What the auditor stores: one document per message, in a monthly index picked by the
//! document's own time, under the message's own id.
//!
//! Every kind shares a few fields, so one search spans them all: `type` (which kind), `id` (the
//! `_id` again, because `_id` cannot be sorted on), `event_id` (the event the document belongs
//! to, what the trail follows), `at` (its time) and `text` (the values of the row and the
//! message, for full-text search). Each kind adds its own fields in its own module
//! (`kinds::*`); the index templates in `mapping` are built from the same lists.

use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, Datelike, Utc};
use serde_json::{Map, Value, json};

use crate::kinds;

/// The kinds of document, one per consumed stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Event,
    Outcome,
    Job,
    DeadLetter,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Event, Kind::Outcome, Kind::Job, Kind::DeadLetter];

    /// The `type` field, and the name used in metrics and consumer names.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Event => "event",
            Kind::Outcome => "outcome",
            Kind::Job => "job",
            Kind::DeadLetter => "dead_letter",
        }
    }

    /// The middle part of index and template names.
    pub fn index_part(self) -> &'static str {
        match self {
            Kind::Event => "events",
            Kind::Outcome => "outcomes",
            Kind::Job => "jobs",
            Kind::DeadLetter => "dead-letters",
        }
    }

    /// `<prefix>-events-2026.12`: the month of the document's own time, so a replay of the same
    /// message lands in the same index and meets its `_id` there.
    pub fn index(self, prefix: &str, at: DateTime<Utc>) -> String {
        format!(
            "{prefix}-{}-{:04}.{:02}",
            self.index_part(),
            at.year(),
            at.month()
        )
    }

    /// Every index of this kind.
    pub fn pattern(self, prefix: &str) -> String {
        format!("{prefix}-{}-*", self.index_part())
    }

    /// This kind's own fields and their mapping, beside the common ones.
    pub fn properties(self, flat: &str) -> Map<String, Value> {
        match self {
            Kind::Event => kinds::event::properties(flat),
            Kind::Outcome => kinds::outcome::properties(),
            Kind::Job => kinds::job::properties(flat),
            Kind::DeadLetter => kinds::dead_letter::properties(),
        }
    }

    /// The document a message becomes, or why it cannot become one (then it is dead-lettered).
    pub fn document(self, message: &Incoming) -> Result<Document, String> {
        match self {
            Kind::Event => kinds::event::document(message),
            Kind::Outcome => kinds::outcome::document(message),
            Kind::Job => kinds::job::document(message),
            Kind::DeadLetter => kinds::dead_letter::document(message),
        }
    }
}

/// All patterns, for searches across kinds.
pub fn all_patterns(prefix: &str) -> String {
    Kind::ALL
        .iter()
        .map(|k| k.pattern(prefix))
        .collect::<Vec<_>>()
        .join(",")
}

/// A message as the auditor sees it, whichever stream it came from.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub subject: String,
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
    /// When JetStream stored it; the time of a document whose body has none of its own.
    pub published: DateTime<Utc>,
    /// Its stream sequence; names a message that has no Msg-Id.
    pub sequence: u64,
}

impl Incoming {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str())
    }
}

/// One document ready for a bulk `create`.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub kind: Kind,
    pub id: String,
    pub at: DateTime<Utc>,
    /// The document's body, common fields included.
    pub body: Value,
}

impl Document {
    /// Builds a document from a kind's own fields, adding the common ones.
    pub fn new(
        kind: Kind,
        id: String,
        event_id: Option<String>,
        at: DateTime<Utc>,
        mut fields: Map<String, Value>,
    ) -> Self {
        let text = full_text(&fields);
        fields.insert("type".into(), json!(kind.as_str()));
        fields.insert("id".into(), json!(id));
        fields.insert("event_id".into(), json!(event_id));
        fields.insert("at".into(), json!(at));
        fields.insert("text".into(), json!(text));
        Self {
            kind,
            id,
            at,
            body: Value::Object(fields),
        }
    }

    pub fn index(&self, prefix: &str) -> String {
        self.kind.index(prefix, self.at)
    }

    /// Counts a newly stored document in the metrics every worker's work shows in: outcomes by
    /// action kind and status, dead letters by source, action kind and who dead-lettered them.
    /// Only the auditor sees every worker's messages, custom workers in any language included,
    /// so these counters (not the services' own) are what the dashboard plots. Duplicates are
    /// not counted: a redelivery or a consumer starting over counts nothing twice.
    pub fn count_stored(&self) {
        match self.kind {
            Kind::Outcome => kinds::outcome::count(self),
            Kind::DeadLetter => kinds::dead_letter::count(self),
            Kind::Event | Kind::Job => {}
        }
    }

    /// A string field of the body, as a metric label (see `label`).
    pub fn label(&self, field: &str) -> String {
        label(self.body.get(field).and_then(Value::as_str).unwrap_or(""))
    }
}

/// A label value from a message: at most 64 bytes, so a worker writing long or odd values
/// cannot blow up a label's size (the values themselves come from a bounded set of kinds,
/// statuses and services).
pub fn label(value: &str) -> String {
    let mut end = value.len().min(64);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value[..end].to_owned()
}

/// The mapping of the fields every kind has.
pub fn common_properties() -> Map<String, Value> {
    let mut p = Map::new();
    p.insert("type".into(), json!({"type": "keyword"}));
    p.insert("id".into(), json!({"type": "keyword"}));
    p.insert("event_id".into(), json!({"type": "keyword"}));
    p.insert("at".into(), json!({"type": "date"}));
    p.insert("text".into(), json!({"type": "text"}));
    p
}

/// Every string, number and boolean in the fields, in order, space-separated: the row's values
/// become searchable words without each column becoming a mapped field.
fn full_text(fields: &Map<String, Value>) -> String {
    fn walk(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::String(s) => out.push(s.clone()),
            Value::Number(n) => out.push(n.to_string()),
            Value::Bool(b) => out.push(b.to_string()),
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            Value::Object(map) => map.values().for_each(|v| walk(v, out)),
            Value::Null => {}
        }
    }
    let mut words = Vec::new();
    fields.values().for_each(|v| walk(v, &mut words));
    words.join(" ")
}

/// The event id at the start of an action id, job id or message id (`<event id>:...`).
pub fn event_id_prefix(id: &str) -> Option<String> {
    let head = id.split(':').next()?;
    uuid::Uuid::parse_str(head).ok().map(|u| u.to_string())
}

/// A keyword and number map entry builder, so each kind's `properties()` reads as a table.
pub fn mapped(fields: &[(&str, Value)]) -> Map<String, Value> {
    fields
        .iter()
        .map(|(name, mapping)| ((*name).to_owned(), mapping.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_monthly_by_the_documents_own_time() {
        let at = DateTime::parse_from_rfc3339("2026-12-31T23:59:59Z")
            .expect("time")
            .with_timezone(&Utc);
        assert_eq!(Kind::Event.index("herald", at), "herald-events-2026.12");
        assert_eq!(Kind::DeadLetter.index("h", at), "h-dead-letters-2026.12");
    }

    #[test]
    fn full_text_takes_every_value_of_nested_rows() {
        let mut fields = Map::new();
        fields.insert(
            "data".into(),
            json!({"status": "paid", "total": 12.5, "tags": ["a"]}),
        );
        fields.insert("none".into(), Value::Null);
        let text = full_text(&fields);
        let mut words: Vec<_> = text.split(' ').collect();
        words.sort_unstable();
        assert_eq!(words, ["12.5", "a", "paid"]);
    }

    #[test]
    fn event_ids_are_read_from_the_front_of_derived_ids() {
        let id = "0190a7a4-2c3b-7a9e-8f00-000000000001";
        assert_eq!(
            event_id_prefix(&format!("{id}:order_created:0")).as_deref(),
            Some(id)
        );
        assert_eq!(event_id_prefix("job-7"), None);
    }
}
