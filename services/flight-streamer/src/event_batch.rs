//! Entity events → one record batch of their entity's schema (see `schema`). A batch is cut
//! when it reaches the configured rows or bytes; the bytes counted are those of the values
//! held, so a wide row cannot make a batch grow past what one Flight message may carry.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Int64Builder, ListBuilder, StringBuilder, TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use std::borrow::Cow;

use chrono::{DateTime, Utc};
use herald_shared::{Op, SCHEMA_VERSION};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::columns::Column;
use crate::schema::EntityTypes;

/// Why a stored message cannot become a row.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EventError {
    #[error("not an entity event: {0}")]
    Malformed(String),
    #[error("unsupported schema_version {0} (this build understands {SCHEMA_VERSION})")]
    Version(u32),
    #[error("an event of entity {found} in the stream of {expected}")]
    WrongEntity { expected: String, found: String },
}

/// An entity event as stored (the contract's EntityEvent), read without copying: strings
/// borrow from the message body and row values stay raw JSON text until their column parses
/// them, which is what lets conversion keep up with JetStream.
#[derive(Debug, Deserialize)]
pub struct RawEvent<'a> {
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    #[serde(borrow)]
    pub entity: Cow<'a, str>,
    pub op: Op,
    #[serde(borrow)]
    pub key: Cow<'a, str>,
    #[serde(borrow)]
    pub data: Option<Row<'a>>,
    #[serde(borrow)]
    pub before: Option<Row<'a>>,
    pub changed: Option<Vec<String>>,
    pub at: DateTime<Utc>,
    #[serde(borrow)]
    pub actor: Option<Cow<'a, str>>,
    pub tx: i64,
    pub schema_version: u32,
}

/// A row: column name → raw JSON value, in the order PostgreSQL wrote them.
#[derive(Debug, Default)]
pub struct Row<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Row<'a> {
    pub fn get(&self, column: &str) -> Option<&'a RawValue> {
        self.0
            .iter()
            .find(|(name, _)| name == column)
            .map(|(_, v)| *v)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Row<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visitor<'a> {
            type Value = Row<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a row object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Row<'a>, M::Error> {
                let mut row = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((name, value)) = map.next_entry::<Borrowed<'de>, &'de RawValue>()? {
                    row.push((name.0, value));
                }
                Ok(Row(row))
            }
        }
        deserializer.deserialize_map(Visitor(std::marker::PhantomData))
    }
}

/// A string that borrows when it can (no escapes) and owns when it must.
struct Borrowed<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Borrowed<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a column name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
        }
        deserializer.deserialize_str(Visitor).map(Borrowed)
    }
}

/// Parses one stored message body.
pub fn parse(body: &[u8]) -> Result<RawEvent<'_>, EventError> {
    #[derive(Deserialize)]
    struct Version {
        schema_version: u32,
    }
    match serde_json::from_slice::<RawEvent<'_>>(body) {
        Ok(event) if event.schema_version == SCHEMA_VERSION => Ok(event),
        Ok(event) => Err(EventError::Version(event.schema_version)),
        // A newer version may have another shape: name the version rather than the shape.
        Err(e) => match serde_json::from_slice::<Version>(body) {
            Ok(v) if v.schema_version != SCHEMA_VERSION => {
                Err(EventError::Version(v.schema_version))
            }
            _ => Err(EventError::Malformed(e.to_string())),
        },
    }
}

pub struct EventBatch {
    types: Arc<EntityTypes>,
    id: StringBuilder,
    entity: StringBuilder,
    op: StringBuilder,
    key: StringBuilder,
    at: TimestampMicrosecondBuilder,
    actor: StringBuilder,
    tx: Int64Builder,
    changed: ListBuilder<StringBuilder>,
    seq: UInt64Builder,
    after: Vec<Column>,
    before: Vec<Column>,
    rows: usize,
    bytes: usize,
}

impl EventBatch {
    pub fn new(types: Arc<EntityTypes>) -> Self {
        let columns = |types: &EntityTypes| {
            types
                .columns
                .iter()
                .map(|c| Column::new(c.kind))
                .collect::<Vec<_>>()
        };
        Self {
            after: columns(&types),
            before: columns(&types),
            types,
            id: StringBuilder::new(),
            entity: StringBuilder::new(),
            op: StringBuilder::new(),
            key: StringBuilder::new(),
            at: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            actor: StringBuilder::new(),
            tx: Int64Builder::new(),
            changed: ListBuilder::new(StringBuilder::new()),
            seq: UInt64Builder::new(),
            rows: 0,
            bytes: 0,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Appends one event stored at stream sequence `seq`.
    pub fn push(&mut self, event: &RawEvent<'_>, seq: u64) -> Result<(), EventError> {
        if event.entity != self.types.entity {
            return Err(EventError::WrongEntity {
                expected: self.types.entity.clone(),
                found: event.entity.to_string(),
            });
        }
        self.id.append_value(&event.id);
        self.entity.append_value(&event.entity);
        self.op.append_value(event.op.as_str());
        self.key.append_value(&event.key);
        self.at.append_value(event.at.timestamp_micros());
        self.actor.append_option(event.actor.as_deref());
        self.tx.append_value(event.tx);
        match &event.changed {
            Some(changed) => {
                for name in changed {
                    self.changed.values().append_value(name);
                    self.bytes += name.len() + 4;
                }
                self.changed.append(true);
            }
            None => self.changed.append(false),
        }
        self.seq.append_value(seq);
        self.bytes += 36 + event.entity.len() + event.key.len() + 40;
        let current = match event.op {
            Op::Delete => event.before.as_ref(),
            Op::Insert | Op::Update => event.data.as_ref(),
        };
        for (i, column) in self.types.columns.iter().enumerate() {
            let after = current.and_then(|row| row.get(&column.name));
            self.bytes += self.after[i].append_json(after, column.kind);
            let before = event.before.as_ref().and_then(|row| row.get(&column.name));
            self.bytes += self.before[i].append_json(before, column.kind);
        }
        self.rows += 1;
        Ok(())
    }

    /// The rows pushed so far as one batch; the builder is empty afterwards.
    pub fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        let mut arrays: Vec<ArrayRef> = vec![
            Arc::new(self.id.finish()),
            Arc::new(self.entity.finish()),
            Arc::new(self.op.finish()),
            Arc::new(self.key.finish()),
            Arc::new(self.at.finish()),
            Arc::new(self.actor.finish()),
            Arc::new(self.tx.finish()),
            Arc::new(self.changed.finish()),
            Arc::new(self.seq.finish()),
        ];
        arrays.extend(self.after.iter_mut().map(Column::finish));
        arrays.extend(self.before.iter_mut().map(Column::finish));
        self.rows = 0;
        self.bytes = 0;
        RecordBatch::try_new(self.types.events.clone(), arrays)
    }
}
