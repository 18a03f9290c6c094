//! Entity events (`HERALD_EVENTS`): `_id` is the event id, so a redelivery or a replay from the
//! DLQ (same body, new Msg-Id) meets the stored document and is absorbed. The row before and
//! after are one flattened field each, so arbitrary entity columns never grow the mapping.

use herald_shared::{EntityEvent, messages};
use serde_json::{Map, Value, json};

use crate::document::{Document, Incoming, Kind, mapped};

pub fn properties(flat: &str) -> Map<String, Value> {
    mapped(&[
        ("entity", json!({"type": "keyword"})),
        ("op", json!({"type": "keyword"})),
        ("key", json!({"type": "keyword"})),
        ("actor", json!({"type": "keyword"})),
        ("changed", json!({"type": "keyword"})),
        ("tx", json!({"type": "long"})),
        ("data", json!({"type": flat})),
        ("before", json!({"type": flat})),
        ("subject", json!({"type": "keyword"})),
        ("replayed_from", json!({"type": "keyword"})),
    ])
}

pub fn document(message: &Incoming) -> Result<Document, String> {
    let event: EntityEvent = messages::decode(&message.payload).map_err(|e| e.to_string())?;
    let id = event.id.to_string();
    let fields = mapped(&[
        ("entity", json!(event.entity)),
        ("op", json!(event.op)),
        ("key", json!(event.key)),
        ("actor", json!(event.actor)),
        ("changed", json!(event.changed)),
        ("tx", json!(event.tx)),
        ("data", json!(event.data)),
        ("before", json!(event.before)),
        ("subject", json!(message.subject)),
        (
            "replayed_from",
            json!(message.header(herald_shared::headers::REPLAYED_FROM)),
        ),
    ]);
    Ok(Document::new(
        Kind::Event,
        id.clone(),
        Some(id),
        event.at,
        fields,
    ))
}
