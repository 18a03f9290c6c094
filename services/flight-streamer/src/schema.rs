//! One Arrow schema per entity and per exportable table, derived from the one source of truth
//! the gateway uses: its schema file, checked against the database catalogue
//! (`herald_gateway::schema::Catalog`), whose column types are PostgreSQL's own
//! (`format_type`). Nothing is guessed per batch, so GetSchema, every DoGet batch and the
//! empty keep-alive batches of a live tail all carry the same schema.
//!
//! # Event columns
//! The envelope comes first: `id`, `entity`, `op`, `key`, `at` (`timestamp[us, UTC]`), `actor`,
//! `tx`, `changed` (`list<utf8>`), `seq` (the JetStream stream sequence, `uint64`). Then one
//! column per entity field with the row after the change (the row before it for a delete),
//! then `before_<field>` with the row before the change (null on insert). A field whose name
//! is an envelope column is named `row_<field>` (the shop's `Order.id` is `row_id`).
//!
//! # Types
//! integers → int64; `real`, `double precision` and `numeric` → float64 (pandas keeps float64,
//! where decimal128 would become `object`); boolean → bool; `timestamp with time zone` →
//! `timestamp[us, UTC]`; `timestamp` → `timestamp[us]`; `date` → `date32`; json, jsonb, text
//! and every other type → utf8 (JSON columns as their JSON text).

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use herald_gateway::capture::quote_ident;
use herald_gateway::schema::{Catalog, CheckedEntity};

/// How a column is typed in Arrow, and how it is read from an event or selected from SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int,
    Float,
    Bool,
    TimestampTz,
    Timestamp,
    Date,
    Json,
    Text,
}

impl Kind {
    /// The kind for a PostgreSQL type as `format_type` names it.
    pub fn for_sql(sql_type: &str) -> Self {
        let t = sql_type.trim();
        match t {
            "smallint" | "integer" | "bigint" => Kind::Int,
            "real" | "double precision" => Kind::Float,
            "boolean" => Kind::Bool,
            "date" => Kind::Date,
            "json" | "jsonb" => Kind::Json,
            _ if t.starts_with("numeric") => Kind::Float,
            _ if t.starts_with("timestamp") && t.ends_with("with time zone") => Kind::TimestampTz,
            _ if t.starts_with("timestamp") => Kind::Timestamp,
            _ => Kind::Text,
        }
    }

    pub fn data_type(self) -> DataType {
        match self {
            Kind::Int => DataType::Int64,
            Kind::Float => DataType::Float64,
            Kind::Bool => DataType::Boolean,
            Kind::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            Kind::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            Kind::Date => DataType::Date32,
            Kind::Json | Kind::Text => DataType::Utf8,
        }
    }

    /// The select-list expression that yields exactly the Rust type the export decodes.
    pub fn select(self, column: &str) -> String {
        let quoted = quote_ident(column);
        match self {
            Kind::Int => format!("{quoted}::int8"),
            Kind::Float => format!("{quoted}::float8"),
            Kind::Bool => format!("{quoted}::bool"),
            Kind::TimestampTz => format!("{quoted}::timestamptz"),
            Kind::Timestamp => format!("{quoted}::timestamp"),
            Kind::Date => format!("{quoted}::date"),
            Kind::Json | Kind::Text => format!("{quoted}::text"),
        }
    }
}

/// One column of a table, typed.
#[derive(Debug, Clone, PartialEq)]
pub struct TypedColumn {
    pub name: String,
    /// The PostgreSQL type, as the catalogue reports it (used to cast bound filter values).
    pub sql_type: String,
    pub kind: Kind,
}

/// An entity (and its table) with its typed columns and the schema of its event batches.
#[derive(Debug, Clone)]
pub struct EntityTypes {
    pub entity: String,
    pub table: String,
    /// In the schema file's order (by name).
    pub columns: Vec<TypedColumn>,
    pub events: SchemaRef,
}

impl EntityTypes {
    fn new(entity: &CheckedEntity) -> Self {
        let columns: Vec<TypedColumn> = entity
            .columns
            .iter()
            .map(|c| TypedColumn {
                name: c.name.clone(),
                sql_type: c.sql_type.clone(),
                kind: Kind::for_sql(&c.sql_type),
            })
            .collect();
        let mut fields = envelope_fields();
        for column in &columns {
            fields.push(Field::new(
                after_name(&column.name),
                column.kind.data_type(),
                true,
            ));
        }
        for column in &columns {
            fields.push(Field::new(
                format!("before_{}", column.name),
                column.kind.data_type(),
                true,
            ));
        }
        Self {
            entity: entity.name.clone(),
            table: entity.table.clone(),
            columns,
            events: Arc::new(Schema::new(fields)),
        }
    }

    pub fn column(&self, name: &str) -> Option<&TypedColumn> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The schema of an export of `columns` (already checked to exist), in that order.
    pub fn export_schema(&self, columns: &[&TypedColumn]) -> SchemaRef {
        Arc::new(Schema::new(
            columns
                .iter()
                .map(|c| Field::new(c.name.clone(), c.kind.data_type(), true))
                .collect::<Vec<_>>(),
        ))
    }
}

/// The envelope columns, in order; `SEQ` is the index of `seq`. Their types: `envelope_fields`.
pub const ENVELOPE: [&str; 9] = [
    "id", "entity", "op", "key", "at", "actor", "tx", "changed", "seq",
];
pub const SEQ: usize = 8;

pub fn envelope_fields() -> Vec<Field> {
    vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("entity", DataType::Utf8, false),
        Field::new("op", DataType::Utf8, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("at", Kind::TimestampTz.data_type(), false),
        Field::new("actor", DataType::Utf8, true),
        Field::new("tx", DataType::Int64, false),
        Field::new(
            "changed",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            true,
        ),
        Field::new("seq", DataType::UInt64, false),
    ]
}

/// The column name of a field's after-value.
pub fn after_name(field: &str) -> String {
    if ENVELOPE.contains(&field) {
        format!("row_{field}")
    } else {
        field.to_owned()
    }
}

/// Every entity's types, by entity name, and the tables they live in.
#[derive(Debug, Clone, Default)]
pub struct Types {
    entities: BTreeMap<String, Arc<EntityTypes>>,
    tables: BTreeMap<String, Arc<EntityTypes>>,
}

impl Types {
    pub fn new(catalog: &Catalog) -> Self {
        let mut types = Self::default();
        for entity in catalog.entities.values() {
            let typed = Arc::new(EntityTypes::new(entity));
            types.tables.insert(typed.table.clone(), typed.clone());
            types.entities.insert(typed.entity.clone(), typed);
        }
        types
    }

    pub fn entity(&self, name: &str) -> Option<&Arc<EntityTypes>> {
        self.entities.get(name)
    }

    pub fn table(&self, name: &str) -> Option<&Arc<EntityTypes>> {
        self.tables.get(name)
    }

    pub fn entities(&self) -> impl Iterator<Item = &Arc<EntityTypes>> {
        self.entities.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_types_map_to_arrow_types() {
        for (sql, kind) in [
            ("bigint", Kind::Int),
            ("integer", Kind::Int),
            ("numeric(12,2)", Kind::Float),
            ("double precision", Kind::Float),
            ("boolean", Kind::Bool),
            ("timestamp with time zone", Kind::TimestampTz),
            ("timestamp(3) with time zone", Kind::TimestampTz),
            ("timestamp without time zone", Kind::Timestamp),
            ("date", Kind::Date),
            ("jsonb", Kind::Json),
            ("text", Kind::Text),
            ("uuid", Kind::Text),
            ("character varying(20)", Kind::Text),
        ] {
            assert_eq!(Kind::for_sql(sql), kind, "{sql}");
        }
    }

    #[test]
    fn a_field_named_like_an_envelope_column_is_prefixed() {
        assert_eq!(after_name("id"), "row_id");
        assert_eq!(after_name("total"), "total");
    }
}
