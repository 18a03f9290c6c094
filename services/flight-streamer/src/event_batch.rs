//! Entity events → one record batch of their entity's schema (see `schema`). A batch is cut
//! when it reaches the configured rows or bytes; the bytes counted are those of the values
//! held, so a wide row cannot make a batch grow past what one Flight message may carry.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Int64Builder, ListBuilder, StringBuilder, TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use herald_shared::{EntityEvent, Op, SCHEMA_VERSION};

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

/// Parses one stored message body.
pub fn parse(body: &[u8]) -> Result<EntityEvent, EventError> {
    #[derive(serde::Deserialize)]
    struct Version {
        schema_version: u32,
    }
    match serde_json::from_slice::<EntityEvent>(body) {
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
    pub fn push(&mut self, event: &EntityEvent, seq: u64) -> Result<(), EventError> {
        if event.entity != self.types.entity {
            return Err(EventError::WrongEntity {
                expected: self.types.entity.clone(),
                found: event.entity.clone(),
            });
        }
        self.id.append_value(event.id.to_string());
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
