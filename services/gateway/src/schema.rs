//! The schema file: which tables are entities, their key, the fields exposed with their GraphQL
//! types, and the relations between entities. It is checked against the live catalogue at start
//! (a missing table or column refuses the start, naming it), and the checked form carries each
//! column's SQL type so queries can cast bound parameters without ever interpolating a value.
//!
//! Identifiers reach SQL only from a `Catalog`, i.e. only names the database itself reported.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::capture::quote_ident;

/// The GraphQL scalar a column is exposed as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FieldType {
    ID,
    Int,
    Float,
    String,
    Boolean,
    JSON,
}

impl FieldType {
    pub fn graphql_name(self) -> &'static str {
        match self {
            FieldType::ID => "ID",
            FieldType::Int => "Int",
            FieldType::Float => "Float",
            FieldType::String => "String",
            FieldType::Boolean => "Boolean",
            FieldType::JSON => "JSON",
        }
    }

    /// The usual GraphQL type for a PostgreSQL type (as `format_type` names it).
    pub fn for_sql(sql_type: &str) -> Self {
        match sql_type {
            "smallint" | "integer" | "bigint" => FieldType::Int,
            "real" | "double precision" => FieldType::Float,
            t if t.starts_with("numeric") => FieldType::Float,
            "boolean" => FieldType::Boolean,
            "uuid" => FieldType::ID,
            "json" | "jsonb" => FieldType::JSON,
            _ => FieldType::String,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelationKind {
    /// At most one target row: `target.to = this.from` (e.g. an order's customer).
    One,
    /// Any number of target rows: `target.to = this.from` (e.g. a customer's orders).
    Many,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Relation {
    pub entity: String,
    pub kind: RelationKind,
    /// The column of this entity's table.
    pub from: String,
    /// The column of the target entity's table.
    pub to: String,
}

/// What a role may do with an entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Read,
    Insert,
    Update,
    Delete,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
        }
    }
}

/// Rows a role reaches only where `column` equals the caller's claim (`customer_id = sub`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RowFilter {
    pub column: String,
    /// A top-level claim name, or a JSON pointer (`/org/id`) into the token's claims. An API
    /// key's only claim is `sub`, its actor name.
    pub claim: String,
}

/// One role's grant on one entity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Permission {
    pub operations: Vec<Operation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_filter: Option<RowFilter>,
}

/// The role every caller without a credential has.
pub const ANONYMOUS_ROLE: &str = "anonymous";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entity {
    pub table: String,
    pub key: String,
    /// Column name → GraphQL type. The key column must be among them. Columns not listed are
    /// not served at all.
    pub fields: BTreeMap<String, FieldType>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub relations: BTreeMap<String, Relation>,
    /// Role → grant. When an entity declares any, only the roles listed reach it (anonymous
    /// callers only through the `anonymous` role); when it declares none, any authenticated
    /// caller may read and write it and anonymous callers may not reach it at all.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub permissions: BTreeMap<String, Permission>,
}

/// The whole file: entity name → declaration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaFile {
    pub entities: BTreeMap<String, Entity>,
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot read schema file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("schema file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    /// The file and the database disagree; every mismatch is listed.
    #[error("schema file does not match the database:\n{}", .0.join("\n"))]
    Mismatch(Vec<String>),
    #[error("cannot read the database catalogue: {0}")]
    Database(#[from] sqlx::Error),
}

impl SchemaFile {
    pub fn load(path: &Path) -> Result<Self, SchemaError> {
        let text = std::fs::read_to_string(path).map_err(|source| SchemaError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|message| SchemaError::Parse {
            path: path.display().to_string(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string_pretty(self)
    }
}

/// One column as the database reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub sql_type: String,
    pub field_type: FieldType,
}

/// An entity checked against the database.
#[derive(Debug, Clone)]
pub struct CheckedEntity {
    pub name: String,
    pub table: String,
    pub key: Column,
    pub columns: Vec<Column>,
    pub relations: BTreeMap<String, Relation>,
    pub permissions: BTreeMap<String, Permission>,
}

impl Column {
    /// The column's type without its modifier (`character varying(5)` → `character varying`):
    /// values are cast to it, so storing them applies the column's own limit and an overflow
    /// is an error, where a cast to `varchar(5)` would silently cut the string.
    pub fn base_type(&self) -> String {
        let mut base = String::with_capacity(self.sql_type.len());
        let mut depth = 0usize;
        for c in self.sql_type.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                c if depth == 0 => base.push(c),
                _ => {}
            }
        }
        let base = base.split_whitespace().collect::<Vec<_>>().join(" ");
        // `character` without a length means `character(1)`; `bpchar` has no length.
        match base.strip_prefix("character") {
            Some(rest) if rest.is_empty() || rest.starts_with('[') => format!("bpchar{rest}"),
            _ => base.replace(" []", "[]"),
        }
    }

    /// The GraphQL scalar the column is served as. 64-bit integers and `numeric` travel as
    /// strings (`BigInt`, `Decimal`): JSON numbers lose precision beyond 2^53 in JavaScript
    /// clients, and a float cannot hold money exactly.
    pub fn graphql_type(&self) -> &'static str {
        let base = self.base_type();
        match self.field_type {
            FieldType::Int if base == "bigint" => "BigInt",
            FieldType::Float if base == "numeric" => "Decimal",
            other => other.graphql_name(),
        }
    }

    /// Whether the value is answered in its text form (ID, BigInt and Decimal are strings).
    pub fn answers_text(&self) -> bool {
        matches!(self.graphql_type(), "ID" | "BigInt" | "Decimal")
    }
}

impl CheckedEntity {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// The schema file after checking: every name in it exists in the database.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub entities: BTreeMap<String, CheckedEntity>,
}

impl Catalog {
    pub fn entity(&self, name: &str) -> Option<&CheckedEntity> {
        self.entities.get(name)
    }
}

fn is_graphql_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
        && !name.starts_with("__")
}

async fn table_columns(
    pool: &PgPool,
    table: &str,
) -> Result<Option<BTreeMap<String, String>>, sqlx::Error> {
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(quote_ident(table))
        .fetch_one(pool)
        .await?;
    if exists.is_none() {
        return Ok(None);
    }
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
         WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    .bind(quote_ident(table))
    .fetch_all(pool)
    .await?;
    Ok(Some(rows.into_iter().collect()))
}

/// Whether `column` is the table's primary key, or NOT NULL with a unique index of its own.
async fn key_is_unique(pool: &PgPool, table: &str, column: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_index i \
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
           WHERE i.indrelid = to_regclass($1) AND i.indnkeyatts = 1 AND i.indisunique \
             AND i.indpred IS NULL AND a.attname = $2 AND (i.indisprimary OR a.attnotnull))",
    )
    .bind(quote_ident(table))
    .bind(column)
    .fetch_one(pool)
    .await
}

/// Checks `file` against the live database; every mismatch is reported at once.
pub async fn check(pool: &PgPool, file: &SchemaFile) -> Result<Catalog, SchemaError> {
    let mut problems = Vec::new();
    let mut entities = BTreeMap::new();
    for (name, entity) in &file.entities {
        if !is_graphql_name(name) || herald_shared::subjects::token("an entity", name).is_err() {
            problems.push(format!("entity `{name}`: not a valid GraphQL type name"));
            continue;
        }
        let Some(columns) = table_columns(pool, &entity.table).await? else {
            problems.push(format!(
                "entity {name}: table `{}` does not exist",
                entity.table
            ));
            continue;
        };
        let mut checked = Vec::new();
        for (field, field_type) in &entity.fields {
            if !is_graphql_name(field) {
                problems.push(format!(
                    "entity {name}: field `{field}` is not a valid GraphQL name"
                ));
            }
            match columns.get(field) {
                Some(sql_type) => checked.push(Column {
                    name: field.clone(),
                    sql_type: sql_type.clone(),
                    field_type: *field_type,
                }),
                None => problems.push(format!(
                    "entity {name}: table `{}` has no column `{field}`",
                    entity.table
                )),
            }
        }
        let key = checked.iter().find(|c| c.name == entity.key).cloned();
        if key.is_none() && columns.contains_key(&entity.key) {
            problems.push(format!(
                "entity {name}: key `{}` must also be listed in fields",
                entity.key
            ));
        } else if key.is_none() {
            problems.push(format!(
                "entity {name}: table `{}` has no column `{}` (the key)",
                entity.table, entity.key
            ));
        }
        if let Some(key) = &key
            && !key_is_unique(pool, &entity.table, &key.name).await?
        {
            problems.push(format!(
                "entity {name}: key `{}` is neither the primary key of `{}` nor a unique NOT NULL \
                 column, so it cannot name one row",
                key.name, entity.table
            ));
        }
        if let Some(key) = key {
            entities.insert(
                name.clone(),
                CheckedEntity {
                    name: name.clone(),
                    table: entity.table.clone(),
                    key,
                    columns: checked,
                    relations: entity.relations.clone(),
                    permissions: entity.permissions.clone(),
                },
            );
        }
    }
    for (name, entity) in &file.entities {
        for (role, permission) in &entity.permissions {
            if let Some(filter) = &permission.row_filter
                && !entity.fields.contains_key(&filter.column)
            {
                problems.push(format!(
                    "entity {name}: the row filter of role `{role}` uses `{}`, which is not a field",
                    filter.column
                ));
            }
        }
        for (relation_name, relation) in &entity.relations {
            if entity.fields.contains_key(relation_name) || !is_graphql_name(relation_name) {
                problems.push(format!(
                    "entity {name}: relation `{relation_name}` is not a valid, unused field name"
                ));
            }
            if !entity.fields.contains_key(&relation.from) {
                problems.push(format!(
                    "entity {name}: relation `{relation_name}` uses `{}`, which is not a field",
                    relation.from
                ));
            }
            match file.entities.get(&relation.entity) {
                None => problems.push(format!(
                    "entity {name}: relation `{relation_name}` names unknown entity `{}`",
                    relation.entity
                )),
                Some(target) if !target.fields.contains_key(&relation.to) => {
                    problems.push(format!(
                        "entity {name}: relation `{relation_name}` uses `{}.{}`, which is not a field",
                        relation.entity, relation.to
                    ))
                }
                Some(_) => {}
            }
        }
    }
    if problems.is_empty() {
        Ok(Catalog { entities })
    } else {
        Err(SchemaError::Mismatch(problems))
    }
}

/// A starting schema file from the database: every ordinary table of the current schema that
/// has a single-column primary key becomes an entity (named in PascalCase), every column a field,
/// every single-column foreign key a `one` relation and its reverse a `many` relation.
pub async fn introspect(pool: &PgPool) -> Result<SchemaFile, SchemaError> {
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, a.attname::text FROM pg_class c \
         JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary AND i.indnkeyatts = 1 \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[0] \
         WHERE c.relkind = 'r' AND c.relnamespace = current_schema()::regnamespace \
           AND c.relname NOT LIKE 'herald\\_%' AND c.relname NOT LIKE '\\_sqlx%' \
         ORDER BY c.relname",
    )
    .fetch_all(pool)
    .await?;
    let mut file = SchemaFile::default();
    let mut names = BTreeMap::new();
    for (table, key) in &tables {
        let Some(columns) = table_columns(pool, table).await? else {
            continue;
        };
        let name = pascal_case(table);
        names.insert(table.clone(), name.clone());
        file.entities.insert(
            name,
            Entity {
                table: table.clone(),
                key: key.clone(),
                fields: columns
                    .iter()
                    .filter(|(column, _)| is_graphql_name(column))
                    .map(|(column, sql_type)| (column.clone(), FieldType::for_sql(sql_type)))
                    .collect(),
                relations: BTreeMap::new(),
                permissions: BTreeMap::new(),
            },
        );
    }
    let foreign_keys: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT c.relname::text, a.attname::text, t.relname::text, ta.attname::text \
         FROM pg_constraint k \
         JOIN pg_class c ON c.oid = k.conrelid JOIN pg_class t ON t.oid = k.confrelid \
         JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1] \
         JOIN pg_attribute ta ON ta.attrelid = k.confrelid AND ta.attnum = k.confkey[1] \
         WHERE k.contype = 'f' AND cardinality(k.conkey) = 1 \
           AND c.relnamespace = current_schema()::regnamespace",
    )
    .fetch_all(pool)
    .await?;
    for (table, column, target_table, target_column) in foreign_keys {
        let (Some(from), Some(to)) = (names.get(&table), names.get(&target_table)) else {
            continue;
        };
        let one = column
            .strip_suffix("_id")
            .unwrap_or(&target_table)
            .to_owned();
        let many = table.clone();
        if let Some(entity) = file.entities.get_mut(from)
            && !entity.fields.contains_key(&one)
        {
            entity.relations.insert(
                one,
                Relation {
                    entity: to.clone(),
                    kind: RelationKind::One,
                    from: column.clone(),
                    to: target_column.clone(),
                },
            );
        }
        if let Some(entity) = file.entities.get_mut(to)
            && !entity.fields.contains_key(&many)
        {
            entity.relations.insert(
                many,
                Relation {
                    entity: from.clone(),
                    kind: RelationKind::Many,
                    from: target_column,
                    to: column,
                },
            );
        }
    }
    Ok(file)
}

fn pascal_case(table: &str) -> String {
    table
        .split('_')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schema_file_round_trips_through_toml() {
        let text = r#"
            [entities.Order]
            table = "orders"
            key = "id"
            fields = { id = "Int", status = "String", customer_id = "Int" }
            [entities.Order.relations.customer]
            entity = "Customer"
            kind = "one"
            from = "customer_id"
            to = "id"
            [entities.Customer]
            table = "customers"
            key = "id"
            fields = { id = "Int", name = "String" }
        "#;
        let file = SchemaFile::parse(text).expect("valid file");
        assert_eq!(
            file.entities["Order"].relations["customer"].kind,
            RelationKind::One
        );
        let text = file.to_toml().expect("serialise");
        assert_eq!(SchemaFile::parse(&text), Ok(file));
    }

    #[test]
    fn the_example_schema_file_is_valid() {
        let file = SchemaFile::parse(include_str!("../herald-schema.example.toml"))
            .expect("the example parses");
        assert_eq!(
            file.entities["Order"].relations["customer"].entity,
            "Customer"
        );
        let customer = &file.entities["Order"].permissions["customer"];
        assert_eq!(
            customer.operations,
            [Operation::Read, Operation::Insert, Operation::Update]
        );
        assert_eq!(
            customer.row_filter.as_ref().map(|f| f.column.as_str()),
            Some("customer_id")
        );
    }

    #[test]
    fn unknown_keys_in_the_schema_file_are_refused() {
        let err = SchemaFile::parse("[entities.A]\ntable='a'\nkey='id'\nfields={}\ncolour='x'\n")
            .expect_err("unknown key");
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn values_are_cast_to_the_base_type_and_wide_numbers_travel_as_text() {
        let column = |sql_type: &str, field_type| Column {
            name: "c".into(),
            sql_type: sql_type.into(),
            field_type,
        };
        for (sql_type, base) in [
            ("character varying(5)", "character varying"),
            ("character(3)", "bpchar"),
            ("character(3)[]", "bpchar[]"),
            ("numeric(10,2)", "numeric"),
            ("timestamp(3) with time zone", "timestamp with time zone"),
            ("integer", "integer"),
        ] {
            assert_eq!(column(sql_type, FieldType::String).base_type(), base);
        }
        assert_eq!(column("bigint", FieldType::Int).graphql_type(), "BigInt");
        assert_eq!(
            column("numeric(10,2)", FieldType::Float).graphql_type(),
            "Decimal"
        );
        assert_eq!(column("integer", FieldType::Int).graphql_type(), "Int");
        assert!(column("uuid", FieldType::ID).answers_text());
        assert!(!column("real", FieldType::Float).answers_text());
    }

    #[test]
    fn table_names_become_pascal_case_entities() {
        assert_eq!(pascal_case("order_items"), "OrderItems");
        assert_eq!(pascal_case("users"), "Users");
    }
}
