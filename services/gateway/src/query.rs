//! Compiles one GraphQL root field into ONE parameterised SQL statement that returns the whole
//! answer as a single `jsonb` value: nested relations become correlated sub-selects aggregated
//! with `jsonb_agg`, so a query never fans out into one statement per row.
//!
//! Safety rule: values only ever travel as bound parameters (cast in SQL to the column's base
//! type, so the column's own length and precision apply when it is stored); identifiers only ever come from the checked `Catalog` and are
//! quoted. Nothing a client sends is spliced into SQL text.

use async_graphql::{Name, Value};

use crate::capture::quote_ident;
use crate::schema::{Catalog, CheckedEntity, Column, FieldType, Operation, RelationKind};
use crate::settings::Limits;

/// `jsonb_build_object` takes at most 100 arguments: objects are built in chunks and joined.
const PAIRS_PER_CALL: usize = 40;
/// `json_build_object` objects cannot be joined, so in text mode one call holds them all.
const PAIRS_PER_TEXT_OBJECT: usize = 50;

/// A value bound to a placeholder.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Text(Option<String>),
    TextArray(Vec<String>),
    Int(i64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    pub sql: String,
    pub params: Vec<Param>,
}

/// What the client asked for below a field, independent of the GraphQL engine.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// The response key (the alias, else the field name).
    pub key: String,
    pub field: String,
    pub arguments: Vec<(Name, Value)>,
    pub children: Vec<Selection>,
}

impl Selection {
    pub(crate) fn argument(&self, name: &str) -> Option<&Value> {
        self.arguments
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, v)| v)
    }
}

/// Why a request cannot be compiled. Every variant is the client's mistake (a permanent error).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QueryError {
    #[error("unknown entity {0}")]
    UnknownEntity(String),
    #[error("{entity} has no field `{field}`")]
    UnknownField { entity: String, field: String },
    #[error("unknown filter operator `{0}`")]
    UnknownOperator(String),
    #[error("not permitted to {} {entity}", .operation.as_str())]
    Forbidden {
        entity: String,
        operation: Operation,
    },
    #[error(
        "{entity} is closed to anonymous callers: send a JWT or an API key (or grant the \
         `anonymous` role on {entity} in the schema file)"
    )]
    Anonymous { entity: String },
    /// Only in text mode: the selection has more fields than one `json_build_object` holds.
    #[error("{0} fields in one object are too many to answer as response text")]
    TooWide(usize),
    #[error("`{argument}` {message}")]
    BadArgument {
        argument: &'static str,
        message: String,
    },
}

fn bad(argument: &'static str, message: impl Into<String>) -> QueryError {
    QueryError::BadArgument {
        argument,
        message: message.into(),
    }
}

/// Arguments of a list: `where`, `order_by`, `limit`, `offset`, `after` (a key: the rows
/// after that row in this order).
#[derive(Default)]
pub struct ListArgs<'a> {
    pub filter: Option<&'a Value>,
    pub order_by: Option<&'a Value>,
    pub limit: Option<&'a Value>,
    pub offset: Option<&'a Value>,
    pub after: Option<&'a Value>,
}

impl<'a> ListArgs<'a> {
    pub fn of(selection: &'a Selection) -> Self {
        Self {
            filter: selection.argument("where"),
            order_by: selection.argument("order_by"),
            limit: selection.argument("limit"),
            offset: selection.argument("offset"),
            after: selection.argument("after"),
        }
    }
}

/// Who a statement runs for: their roles, and their claims for row filters.
pub struct Access<'a> {
    /// The caller sent no credential.
    pub anonymous: bool,
    pub roles: Vec<&'a str>,
    pub claim: &'a dyn Fn(&str) -> Option<String>,
}

/// What a caller reaches of one entity for one operation: all rows, or the rows where one of
/// the (column, claim value) pairs holds.
enum Reach {
    All,
    Rows(Vec<(String, String)>),
}

pub struct Compiler<'a> {
    catalog: &'a Catalog,
    limits: &'a Limits,
    access: Option<Access<'a>>,
    params: Vec<Param>,
    aliases: usize,
    /// Build the answer as `json` (keys in selection order, `__typename` filled in) for a
    /// response written as it comes from the database, rather than as `jsonb` for the engine.
    text: bool,
    /// The actor and trace a write records for the capture trigger (`writing_for`).
    request: Option<(String, String)>,
}

impl<'a> Compiler<'a> {
    pub fn new(catalog: &'a Catalog, limits: &'a Limits) -> Self {
        Self {
            catalog,
            limits,
            access: None,
            params: Vec::new(),
            aliases: 0,
            text: false,
            request: None,
        }
    }

    /// Writes record `actor` and `traceparent` for the capture trigger inside their own
    /// statement (`written`), so a mutation is one statement and one round trip, its own
    /// transaction, rather than BEGIN, set_config, the write and COMMIT.
    pub fn writing_for(mut self, actor: String, traceparent: String) -> Self {
        self.request = Some((actor, traceparent));
        self
    }

    /// Answers in the response's own shape: a `json` value whose keys are the response keys in
    /// selection order, with `__typename` filled in and JSON columns normalised, so the text
    /// the database returns is the `data` entry as it is (see `plan.rs`).
    pub fn as_response_text(mut self) -> Self {
        self.text = true;
        self
    }

    fn json(&self) -> &'static str {
        if self.text { "json" } else { "jsonb" }
    }

    /// Applies the entities' permissions for this caller (without it, nothing is checked).
    pub fn with_access(mut self, access: Access<'a>) -> Self {
        self.access = Some(access);
        self
    }

    /// An entity without permissions is open to every authenticated caller and closed to
    /// anonymous ones; with permissions, a role of the caller must grant `operation` (an
    /// anonymous caller's only role is `anonymous`). Anonymous access is thus off unless the
    /// schema file grants the `anonymous` role something.
    fn reach(&self, entity: &CheckedEntity, operation: Operation) -> Result<Reach, QueryError> {
        let Some(access) = &self.access else {
            return Ok(Reach::All);
        };
        if entity.permissions.is_empty() {
            if access.anonymous {
                return Err(QueryError::Anonymous {
                    entity: entity.name.clone(),
                });
            }
            return Ok(Reach::All);
        }
        let mut rows = Vec::new();
        for role in &access.roles {
            let Some(permission) = entity.permissions.get(*role) else {
                continue;
            };
            if !permission.operations.contains(&operation) {
                continue;
            }
            match &permission.row_filter {
                None => return Ok(Reach::All),
                Some(filter) => {
                    if let Some(value) = (access.claim)(&filter.claim) {
                        rows.push((filter.column.clone(), value));
                    }
                }
            }
        }
        if rows.is_empty() {
            return Err(QueryError::Forbidden {
                entity: entity.name.clone(),
                operation,
            });
        }
        Ok(Reach::Rows(rows))
    }

    /// The SQL condition limiting `alias` to what `operation` reaches, if anything limits it.
    fn reach_condition(
        &mut self,
        entity: &CheckedEntity,
        alias: &str,
        operation: Operation,
    ) -> Result<Option<String>, QueryError> {
        let Reach::Rows(rows) = self.reach(entity, operation)? else {
            return Ok(None);
        };
        let mut terms = Vec::new();
        for (name, value) in rows {
            let column = column(entity, &name)?;
            let param = self.bind(Param::Text(Some(value)));
            // An UPDATE or DELETE names its table's columns without an alias.
            let prefix = if alias.is_empty() {
                String::new()
            } else {
                format!("{alias}.")
            };
            terms.push(format!(
                "{prefix}{} = CAST({param} AS {})",
                quote_ident(&column.name),
                column.base_type()
            ));
        }
        Ok(Some(format!("({})", terms.join(" OR "))))
    }

    /// A write's input, checked against the row filter: the filtered column may only hold the
    /// caller's claim, and on insert is set to it when the input leaves it out.
    fn constrained_input(
        &self,
        entity: &CheckedEntity,
        input: &Value,
        operation: Operation,
    ) -> Result<Value, QueryError> {
        let Reach::Rows(rows) = self.reach(entity, operation)? else {
            return Ok(input.clone());
        };
        let Value::Object(fields) = input else {
            return Err(bad("input", "must be an object"));
        };
        let mut fields = fields.clone();
        let forbidden = || QueryError::Forbidden {
            entity: entity.name.clone(),
            operation,
        };
        let (first_column, first_value) = &rows[0];
        let mut matched = false;
        for (name, value) in &rows {
            match fields.get(name.as_str()) {
                Some(given) => {
                    let column = column(entity, name)?;
                    if value_text(column, given)?.as_deref() == Some(value.as_str()) {
                        matched = true;
                    }
                }
                None if operation == Operation::Update => matched = true,
                None => {}
            }
        }
        if !matched {
            if operation == Operation::Insert && !fields.contains_key(first_column.as_str()) {
                fields.insert(Name::new(first_column), Value::String(first_value.clone()));
            } else {
                return Err(forbidden());
            }
        }
        Ok(Value::Object(fields))
    }

    fn finish(self, sql: String) -> Statement {
        Statement {
            sql,
            params: self.params,
        }
    }

    /// `WITH alias AS (write RETURNING *) SELECT select FROM alias`, and with `writing_for`
    /// the actor and trace set first in the same statement. `set_config(.., true)` lasts until
    /// the statement's implicit transaction ends, so a pooled connection never carries one
    /// caller's identity into another's request. The capture trigger reads them when its AFTER
    /// ROW events fire, at the end of the statement, after every part of it has run; and no
    /// changed row can be answered without reading `herald_request`, so whenever a row changed
    /// the settings were made before its event was written.
    fn written(&mut self, alias: &str, write: &str, select: &str) -> String {
        let Some((actor, traceparent)) = self.request.take() else {
            return format!("WITH {alias} AS ({write} RETURNING *) SELECT {select} FROM {alias}");
        };
        let settings = [
            (crate::capture::ACTOR_SETTING, actor),
            (crate::capture::TRACEPARENT_SETTING, traceparent),
        ]
        .map(|(name, value)| {
            let name = self.bind(Param::Text(Some(name.to_owned())));
            let value = self.bind(Param::Text(Some(value)));
            format!("set_config({name}, {value}, true)")
        });
        format!(
            "WITH herald_request AS MATERIALIZED (SELECT {} AS herald_actor, {} AS herald_trace), \
             {alias} AS ({write} RETURNING *) \
             SELECT {select} FROM {alias} CROSS JOIN herald_request",
            settings[0], settings[1]
        )
    }

    fn bind(&mut self, param: Param) -> String {
        self.params.push(param);
        format!("${}", self.params.len())
    }

    fn alias(&mut self) -> String {
        let alias = format!("t{}", self.aliases);
        self.aliases += 1;
        alias
    }

    fn entity(&self, name: &str) -> Result<&'a CheckedEntity, QueryError> {
        self.catalog
            .entity(name)
            .ok_or_else(|| QueryError::UnknownEntity(name.to_owned()))
    }

    /// `SELECT <row> FROM table WHERE key = $1`.
    pub fn by_key(
        mut self,
        entity: &str,
        key: &Value,
        selection: &[Selection],
    ) -> Result<Statement, QueryError> {
        let entity = self.entity(entity)?;
        let alias = self.alias();
        let reach = self
            .reach_condition(entity, &alias, Operation::Read)?
            .map(|c| format!(" AND {c}"))
            .unwrap_or_default();
        let object = self.object(entity, &alias, selection)?;
        let key_param = self.value_param(&entity.key, key, "key")?;
        let sql = format!(
            "SELECT {object} FROM {table} {alias} WHERE {alias}.{key} = CAST({key_param} AS {ty}){reach}",
            table = quote_ident(&entity.table),
            key = quote_ident(&entity.key.name),
            ty = entity.key.base_type(),
        );
        Ok(self.finish(sql))
    }

    /// A JSON array of rows, filtered, ordered and paged.
    pub fn list(
        mut self,
        entity: &str,
        args: &ListArgs<'_>,
        selection: &[Selection],
    ) -> Result<Statement, QueryError> {
        let entity = self.entity(entity)?;
        let sql = self.list_expr(entity, args, selection, None)?;
        Ok(self.finish(sql))
    }

    /// `{ count }` over the rows a filter matches (and the caller reaches).
    pub fn aggregate(
        mut self,
        entity: &str,
        filter: Option<&Value>,
        selection: &[Selection],
    ) -> Result<Statement, QueryError> {
        let entity = self.entity(entity)?;
        let alias = self.alias();
        let mut conditions = Vec::new();
        if let Some(reach) = self.reach_condition(entity, &alias, Operation::Read)? {
            conditions.push(reach);
        }
        if let Some(filter) = filter.filter(|f| !matches!(f, Value::Null)) {
            conditions.push(self.condition(entity, &alias, filter)?);
        }
        let mut pairs = Vec::new();
        for selected in selection {
            if selected.field == "count" {
                let key = self.bind(Param::Text(Some(selected.key.clone())));
                pairs.push(format!("{key}::text, count(*)"));
            } else if selected.field == "__typename" && self.text {
                let key = self.bind(Param::Text(Some(selected.key.clone())));
                let name = self.bind(Param::Text(Some(format!("{}Aggregate", entity.name))));
                pairs.push(format!("{key}::text, {name}::text"));
            }
        }
        let condition = if conditions.is_empty() {
            "TRUE".to_owned()
        } else {
            conditions.join(" AND ")
        };
        let sql = format!(
            "SELECT {}_build_object({}) FROM {table} {alias} WHERE {condition}",
            self.json(),
            pairs.join(", "),
            table = quote_ident(&entity.table),
        );
        Ok(self.finish(sql))
    }

    /// Many rows in ONE `INSERT ... VALUES (...), (...)`: one statement, one transaction, and
    /// the capture trigger still writes one event per row. A column some rows leave out takes
    /// its DEFAULT in those rows.
    pub fn create_many(
        mut self,
        entity: &str,
        inputs: &Value,
        selection: &[Selection],
    ) -> Result<Statement, QueryError> {
        let entity = self.entity(entity)?;
        let Value::List(items) = inputs else {
            return Err(bad("inputs", "must be a list"));
        };
        if items.is_empty() {
            return Err(bad("inputs", "must hold at least one row"));
        }
        let mut rows = Vec::new();
        for item in items {
            let input = self.constrained_input(entity, item, Operation::Insert)?;
            rows.push(self.assignments(entity, &input)?);
        }
        let mut columns: Vec<String> = Vec::new();
        for (column, _) in rows.iter().flatten() {
            if !columns.contains(column) {
                columns.push(column.clone());
            }
        }
        let alias = self.alias();
        let insert = if columns.is_empty() {
            let values = vec!["(DEFAULT)"; rows.len()].join(", ");
            format!(
                "INSERT INTO {table} ({key}) VALUES {values}",
                table = quote_ident(&entity.table),
                key = quote_ident(&entity.key.name),
            )
        } else {
            let values = rows
                .iter()
                .map(|row| {
                    let cells = columns
                        .iter()
                        .map(|c| {
                            row.iter()
                                .find(|(column, _)| column == c)
                                .map_or("DEFAULT".to_owned(), |(_, value)| value.clone())
                        })
                        .collect::<Vec<_>>();
                    format!("({})", cells.join(", "))
                })
                .collect::<Vec<_>>()
                .join(", ");
            format!(
                "INSERT INTO {} ({}) VALUES {values}",
                quote_ident(&entity.table),
                columns.join(", ")
            )
        };
        let object = self.object(entity, &alias, selection)?;
        let select = format!(
            "coalesce({json}_agg({object}), '[]'::{json})",
            json = self.json()
        );
        let sql = self.written(&alias, &insert, &select);
        Ok(self.finish(sql))
    }

    /// Insert, or update the row with the input's key: `INSERT ... ON CONFLICT (key) DO
    /// UPDATE`, one statement whose event is an insert or an update. The update half reaches
    /// only the rows the caller may update.
    pub fn upsert(
        mut self,
        entity: &str,
        input: &Value,
        selection: &[Selection],
    ) -> Result<Statement, QueryError> {
        let entity = self.entity(entity)?;
        let input = self.constrained_input(entity, input, Operation::Insert)?;
        let input = self.constrained_input(entity, &input, Operation::Update)?;
        let assignments = self.assignments(entity, &input)?;
        let key = quote_ident(&entity.key.name);
        if !assignments.iter().any(|(column, _)| *column == key) {
            return Err(bad(
                "input",
                format!("must set the key `{}`", entity.key.name),
            ));
        }
        let table = quote_ident(&entity.table);
        let reach = self
            .reach_condition(entity, &table, Operation::Update)?
            .map(|c| format!(" WHERE {c}"))
            .unwrap_or_default();
        let updates = assignments
            .iter()
            .filter(|(column, _)| *column != key)
            .map(|(column, _)| format!("{column} = EXCLUDED.{column}"))
            .collect::<Vec<_>>();
        // With nothing but the key given, the key itself is "updated" so the row still returns.
        let set = if updates.is_empty() {
            format!("{key} = EXCLUDED.{key}")
        } else {
            updates.join(", ")
        };
        let (columns, values): (Vec<_>, Vec<_>) = assignments.into_iter().unzip();
        let alias = self.alias();
        let object = self.object(entity, &alias, selection)?;
        let upsert = format!(
            "INSERT INTO {table} ({}) VALUES ({}) ON CONFLICT ({key}) DO UPDATE SET {set}{reach}",
            columns.join(", "),
            values.join(", "),
        );
        let sql = self.written(&alias, &upsert, &object);
        Ok(self.finish(sql))
    }

    /// `INSERT ... RETURNING *`, then the row as JSON, in one statement.
    pub fn create(
        mut self,
        entity: &str,
        input: &Value,
        selection: &[Selection],
    ) -> Result<Statement, QueryError> {
        let entity = self.entity(entity)?;
        let input = self.constrained_input(entity, input, Operation::Insert)?;
        let assignments = self.assignments(entity, &input)?;
        let alias = self.alias();
        let insert = if assignments.is_empty() {
            format!("INSERT INTO {} DEFAULT VALUES", quote_ident(&entity.table))
        } else {
            let (columns, values): (Vec<_>, Vec<_>) = assignments.into_iter().unzip();
            format!(
                "INSERT INTO {} ({}) VALUES ({})",
                quote_ident(&entity.table),
                columns.join(", "),
                values.join(", ")
            )
        };
        let object = self.object(entity, &alias, selection)?;
        let sql = self.written(&alias, &insert, &object);
        Ok(self.finish(sql))
    }

    /// `UPDATE ... WHERE key = $n RETURNING *`, then the row as JSON.
    pub fn update(
        mut self,
        entity: &str,
        key: &Value,
        input: &Value,
        selection: &[Selection],
    ) -> Result<Statement, QueryError> {
        let entity = self.entity(entity)?;
        let input = self.constrained_input(entity, input, Operation::Update)?;
        let assignments = self.assignments(entity, &input)?;
        if assignments.is_empty() {
            return Err(bad("input", "sets no field"));
        }
        let reach = self
            .reach_condition(entity, "", Operation::Update)?
            .map(|c| format!(" AND {c}"))
            .unwrap_or_default();
        let set = assignments
            .into_iter()
            .map(|(column, value)| format!("{column} = {value}"))
            .collect::<Vec<_>>()
            .join(", ");
        let key_param = self.value_param(&entity.key, key, "key")?;
        let alias = self.alias();
        let object = self.object(entity, &alias, selection)?;
        let update = format!(
            "UPDATE {table} SET {set} WHERE {key} = CAST({key_param} AS {ty}){reach}",
            table = quote_ident(&entity.table),
            key = quote_ident(&entity.key.name),
            ty = entity.key.base_type(),
        );
        let sql = self.written(&alias, &update, &object);
        Ok(self.finish(sql))
    }

    /// `DELETE ... WHERE key = $1 RETURNING *`, then the deleted row as JSON.
    pub fn delete(
        mut self,
        entity: &str,
        key: &Value,
        selection: &[Selection],
    ) -> Result<Statement, QueryError> {
        let entity = self.entity(entity)?;
        let key_param = self.value_param(&entity.key, key, "key")?;
        let reach = self
            .reach_condition(entity, "", Operation::Delete)?
            .map(|c| format!(" AND {c}"))
            .unwrap_or_default();
        let alias = self.alias();
        let object = self.object(entity, &alias, selection)?;
        let delete = format!(
            "DELETE FROM {table} WHERE {key} = CAST({key_param} AS {ty}){reach}",
            table = quote_ident(&entity.table),
            key = quote_ident(&entity.key.name),
            ty = entity.key.base_type(),
        );
        let sql = self.written(&alias, &delete, &object);
        Ok(self.finish(sql))
    }

    fn assignments(
        &mut self,
        entity: &CheckedEntity,
        input: &Value,
    ) -> Result<Vec<(String, String)>, QueryError> {
        let Value::Object(fields) = input else {
            return Err(bad("input", "must be an object"));
        };
        let mut assignments = Vec::new();
        for (name, value) in fields {
            let column = column(entity, name.as_str())?;
            let param = self.value_param(column, value, "input")?;
            assignments.push((
                quote_ident(&column.name),
                format!("CAST({param} AS {})", column.base_type()),
            ));
        }
        Ok(assignments)
    }

    /// The row at `alias` as a `jsonb` object holding exactly the selected fields.
    fn object(
        &mut self,
        entity: &CheckedEntity,
        alias: &str,
        selection: &[Selection],
    ) -> Result<String, QueryError> {
        let mut pairs = Vec::new();
        for selected in selection {
            if selected.field == "__typename" && self.text {
                let key = self.bind(Param::Text(Some(selected.key.clone())));
                let name = self.bind(Param::Text(Some(entity.name.clone())));
                pairs.push(format!("{key}::text, {name}::text"));
                continue;
            }
            if selected.field.starts_with("__") {
                continue;
            }
            let key = self.bind(Param::Text(Some(selected.key.clone())));
            let value = if let Some(column) = entity.column(&selected.field) {
                let cast = if column.answers_text() {
                    "::text"
                } else if self.text && column.base_type() == "json" {
                    // As `jsonb` does it: duplicate keys merged, whitespace normalised.
                    "::jsonb"
                } else {
                    ""
                };
                format!("{alias}.{}{cast}", quote_ident(&column.name))
            } else if let Some(relation) = entity.relations.get(&selected.field) {
                let target = self.entity(&relation.entity)?;
                let from = column(entity, &relation.from)?;
                let to = column(target, &relation.to)?;
                let link = (alias, from, to);
                match relation.kind {
                    RelationKind::One => {
                        let inner = self.alias();
                        let reach = self
                            .reach_condition(target, &inner, Operation::Read)?
                            .map(|c| format!(" AND {c}"))
                            .unwrap_or_default();
                        let object = self.object(target, &inner, &selected.children)?;
                        format!(
                            "(SELECT {object} FROM {table} {inner} WHERE {inner}.{to} = {alias}.{from}{reach} LIMIT 1)",
                            table = quote_ident(&target.table),
                            to = quote_ident(&to.name),
                            from = quote_ident(&from.name),
                        )
                    }
                    RelationKind::Many => format!(
                        "({})",
                        self.list_expr(
                            target,
                            &ListArgs::of(selected),
                            &selected.children,
                            Some(link)
                        )?
                    ),
                }
            } else {
                return Err(QueryError::UnknownField {
                    entity: entity.name.clone(),
                    field: selected.field.clone(),
                });
            };
            pairs.push(format!("{key}::text, {value}"));
        }
        if pairs.is_empty() {
            return Ok(format!("{}_build_object()", self.json()));
        }
        if self.text {
            if pairs.len() > PAIRS_PER_TEXT_OBJECT {
                return Err(QueryError::TooWide(pairs.len()));
            }
            return Ok(format!("json_build_object({})", pairs.join(", ")));
        }
        Ok(pairs
            .chunks(PAIRS_PER_CALL)
            .map(|chunk| format!("jsonb_build_object({})", chunk.join(", ")))
            .collect::<Vec<_>>()
            .join(" || "))
    }

    /// `SELECT coalesce(jsonb_agg(...), '[]')` over a filtered, ordered, paged sub-select;
    /// `link` correlates it with a parent row for a `many` relation.
    fn list_expr(
        &mut self,
        entity: &CheckedEntity,
        args: &ListArgs<'_>,
        selection: &[Selection],
        link: Option<(&str, &Column, &Column)>,
    ) -> Result<String, QueryError> {
        let alias = self.alias();
        let mut conditions = Vec::new();
        if let Some(reach) = self.reach_condition(entity, &alias, Operation::Read)? {
            conditions.push(reach);
        }
        let object = self.object(entity, &alias, selection)?;
        if let Some((parent, from, to)) = link {
            conditions.push(format!(
                "{alias}.{} = {parent}.{}",
                quote_ident(&to.name),
                quote_ident(&from.name)
            ));
        }
        if let Some(filter) = args.filter.filter(|f| !matches!(f, Value::Null)) {
            conditions.push(self.condition(entity, &alias, filter)?);
        }
        let order = self.order(entity, args.order_by)?;
        if let Some(after) = args.after.filter(|a| !matches!(a, Value::Null)) {
            conditions.push(self.after_condition(entity, &alias, &order, after)?);
        }
        let condition = if conditions.is_empty() {
            "TRUE".to_owned()
        } else {
            conditions.join(" AND ")
        };
        let page = self.alias();
        // The page is sorted (a bounded top-N sort) and limited inside; its order columns come
        // out beside each row so the aggregate puts the page's rows back in that order. (A
        // window `row_number()` instead would make the inner sort a full one.)
        let sort_columns = order
            .iter()
            .enumerate()
            .map(|(i, (column, _))| format!(", {alias}.{column} AS o{i}"))
            .collect::<String>();
        let outer_order = order
            .iter()
            .enumerate()
            .map(|(i, (_, direction))| format!("{page}.o{i} {direction} {}", nulls(direction)))
            .collect::<Vec<_>>()
            .join(", ");
        let order = order
            .iter()
            .map(|(column, direction)| format!("{alias}.{column} {direction} {}", nulls(direction)))
            .collect::<Vec<_>>()
            .join(", ");
        let limit = match args.limit {
            None | Some(Value::Null) => i64::from(self.limits.default_limit),
            Some(value) => {
                let limit = integer(value, "limit")?;
                if limit < 0 {
                    return Err(bad("limit", "must not be negative"));
                }
                if limit > i64::from(self.limits.max_limit) {
                    return Err(bad(
                        "limit",
                        format!("{limit} is above the maximum of {}", self.limits.max_limit),
                    ));
                }
                limit
            }
        };
        let offset = match args.offset {
            None | Some(Value::Null) => 0,
            Some(value) => {
                let offset = integer(value, "offset")?;
                if offset < 0 {
                    return Err(bad("offset", "must not be negative"));
                }
                offset
            }
        };
        let limit = self.bind(Param::Int(limit));
        let offset = self.bind(Param::Int(offset));
        Ok(format!(
            "SELECT coalesce({json}_agg({page}.j ORDER BY {outer_order}), '[]'::{json}) FROM \
             (SELECT {object} AS j{sort_columns} \
              FROM {table} {alias} WHERE {condition} ORDER BY {order} \
              LIMIT {limit} OFFSET {offset}) {page}",
            table = quote_ident(&entity.table),
            json = self.json(),
        ))
    }

    /// The `ORDER BY` list; the key always comes last so pages are stable.
    fn order(
        &mut self,
        entity: &CheckedEntity,
        order_by: Option<&Value>,
    ) -> Result<Vec<(String, &'static str)>, QueryError> {
        let mut terms = Vec::new();
        let items: Vec<&Value> = match order_by {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::List(items)) => items.iter().collect(),
            Some(single) => vec![single],
        };
        for item in items {
            let Value::Object(fields) = item else {
                return Err(bad("order_by", "must be a list of {field: ASC|DESC}"));
            };
            for (name, direction) in fields {
                let column = column(entity, name.as_str())?;
                let direction = match direction {
                    Value::Enum(d) if d.as_str() == "ASC" => "ASC",
                    Value::Enum(d) if d.as_str() == "DESC" => "DESC",
                    Value::Null => continue,
                    _ => return Err(bad("order_by", "direction must be ASC or DESC")),
                };
                terms.push((quote_ident(&column.name), direction));
            }
        }
        terms.push((quote_ident(&entity.key.name), "ASC"));
        Ok(terms)
    }

    /// Keyset paging: the rows that sort after the row whose key is `after`, in `order`. The
    /// anchor row's values are read in the same statement, so the cursor is just a key.
    ///
    /// Order columns may hold NULL, which sorts last in ascending and first in descending order
    /// (the `ORDER BY` says so explicitly): "after" on one column is therefore `> anchor OR IS
    /// NULL` ascending and `IS NOT NULL AND (anchor IS NULL OR < anchor)` descending, and equal
    /// prefixes compare with `IS NOT DISTINCT FROM`, so no row is skipped or repeated. A key
    /// naming no row pages nothing.
    fn after_condition(
        &mut self,
        entity: &CheckedEntity,
        alias: &str,
        order: &[(String, &'static str)],
        after: &Value,
    ) -> Result<String, QueryError> {
        let key = self.value_param(&entity.key, after, "after")?;
        let table = quote_ident(&entity.table);
        let key_column = quote_ident(&entity.key.name);
        let ty = entity.key.base_type();
        let anchor_row = format!("FROM {table} WHERE {key_column} = CAST({key} AS {ty})");
        let anchor = |column: &str| format!("(SELECT {column} {anchor_row})");
        let mut alternatives = Vec::new();
        for (i, (column, direction)) in order.iter().enumerate() {
            let mut terms: Vec<String> = order[..i]
                .iter()
                .map(|(c, _)| format!("{alias}.{c} IS NOT DISTINCT FROM {}", anchor(c)))
                .collect();
            let (row, anchor) = (format!("{alias}.{column}"), anchor(column));
            terms.push(if *direction == "ASC" {
                format!("({anchor} IS NOT NULL AND ({row} > {anchor} OR {row} IS NULL))")
            } else {
                format!("({row} IS NOT NULL AND ({anchor} IS NULL OR {row} < {anchor}))")
            });
            alternatives.push(format!("({})", terms.join(" AND ")));
        }
        Ok(format!(
            "(EXISTS (SELECT 1 {anchor_row}) AND ({}))",
            alternatives.join(" OR ")
        ))
    }

    /// A `where` object: its entries are ANDed; `and` / `or` take lists of where objects.
    fn condition(
        &mut self,
        entity: &CheckedEntity,
        alias: &str,
        filter: &Value,
    ) -> Result<String, QueryError> {
        let Value::Object(fields) = filter else {
            return Err(bad("where", "must be an object"));
        };
        let mut parts = Vec::new();
        for (name, value) in fields {
            match name.as_str() {
                "and" | "or" => {
                    let joiner = if name.as_str() == "and" {
                        " AND "
                    } else {
                        " OR "
                    };
                    let items = match value {
                        Value::List(items) => items.iter().collect::<Vec<_>>(),
                        Value::Null => {
                            return Err(bad("where", format!("`{name}` cannot be null")));
                        }
                        single => vec![single],
                    };
                    if items.is_empty() {
                        parts.push(if joiner == " AND " { "TRUE" } else { "FALSE" }.to_owned());
                        continue;
                    }
                    let inner = items
                        .into_iter()
                        .map(|item| self.condition(entity, alias, item))
                        .collect::<Result<Vec<_>, _>>()?;
                    parts.push(format!("({})", inner.join(joiner)));
                }
                field => {
                    let column = column(entity, field)?;
                    parts.extend(self.comparisons(column, alias, value)?);
                }
            }
        }
        if parts.is_empty() {
            return Ok("TRUE".into());
        }
        Ok(format!("({})", parts.join(" AND ")))
    }

    fn comparisons(
        &mut self,
        column: &Column,
        alias: &str,
        operators: &Value,
    ) -> Result<Vec<String>, QueryError> {
        let Value::Object(operators) = operators else {
            return Err(bad(
                "where",
                format!("`{}` takes an operator object", column.name),
            ));
        };
        let target = format!("{alias}.{}", quote_ident(&column.name));
        let ty = column.base_type();
        let mut parts = Vec::new();
        for (operator, value) in operators {
            let operator = operator.as_str();
            let comparison = match (operator, value) {
                // Dropping the comparison would answer every row; `= NULL` would answer none.
                (_, Value::Null) => {
                    return Err(bad(
                        "where",
                        format!(
                            "`{}: {{{operator}: null}}` compares with nothing; \
                             match nulls with `is_null: true`",
                            column.name
                        ),
                    ));
                }
                ("eq" | "neq" | "gt" | "gte" | "lt" | "lte", value) => {
                    let sql_operator = match operator {
                        "eq" => "=",
                        "neq" => "<>",
                        "gt" => ">",
                        "gte" => ">=",
                        "lt" => "<",
                        _ => "<=",
                    };
                    let param = self.value_param(column, value, "where")?;
                    format!("{target} {sql_operator} CAST({param} AS {ty})")
                }
                ("in", Value::List(items)) => {
                    let texts = items
                        .iter()
                        .map(|item| {
                            value_text(column, item)?
                                .ok_or_else(|| bad("where", "`in` cannot hold null"))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    let param = self.bind(Param::TextArray(texts));
                    format!("{target} = ANY(CAST({param} AS {ty}[]))")
                }
                ("like", Value::String(pattern)) => {
                    let param = self.bind(Param::Text(Some(pattern.clone())));
                    format!("{target}::text LIKE {param}")
                }
                ("is_null", Value::Boolean(true)) => format!("{target} IS NULL"),
                ("is_null", Value::Boolean(false)) => format!("{target} IS NOT NULL"),
                ("in" | "like" | "is_null", _) => {
                    return Err(bad("where", format!("wrong value for `{operator}`")));
                }
                (other, _) => return Err(QueryError::UnknownOperator(other.to_owned())),
            };
            parts.push(comparison);
        }
        Ok(parts)
    }

    fn value_param(
        &mut self,
        column: &Column,
        value: &Value,
        argument: &'static str,
    ) -> Result<String, QueryError> {
        let text = value_text(column, value).map_err(|_| {
            bad(
                argument,
                format!("has a value of the wrong shape for `{}`", column.name),
            )
        })?;
        Ok(self.bind(Param::Text(text)))
    }
}

/// Where NULLs sort, spelled out because keyset paging depends on it.
fn nulls(direction: &str) -> &'static str {
    if direction == "ASC" {
        "NULLS LAST"
    } else {
        "NULLS FIRST"
    }
}

fn column<'e>(entity: &'e CheckedEntity, name: &str) -> Result<&'e Column, QueryError> {
    entity.column(name).ok_or_else(|| QueryError::UnknownField {
        entity: entity.name.clone(),
        field: name.to_owned(),
    })
}

fn integer(value: &Value, argument: &'static str) -> Result<i64, QueryError> {
    match value {
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| bad(argument, "must be an integer")),
        _ => Err(bad(argument, "must be an integer")),
    }
}

/// The text form PostgreSQL casts to the column's type; JSON columns take the JSON text.
fn value_text(column: &Column, value: &Value) -> Result<Option<String>, QueryError> {
    if column.field_type == FieldType::JSON {
        return match value {
            Value::Null => Ok(None),
            other => other
                .clone()
                .into_json()
                .map(|json| Some(json.to_string()))
                .map_err(|e| bad("where", e.to_string())),
        };
    }
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Number(n) => Ok(Some(n.to_string())),
        Value::Boolean(b) => Ok(Some(b.to_string())),
        Value::Enum(e) => Ok(Some(e.to_string())),
        _ => Err(bad(
            "where",
            format!("`{}` takes a scalar value", column.name),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use async_graphql::{Name, Number, Value};

    use super::*;

    fn catalog() -> Catalog {
        let column = |name: &str, sql_type: &str, field_type| Column {
            name: name.into(),
            sql_type: sql_type.into(),
            field_type,
        };
        let entity = CheckedEntity {
            name: "Customer".into(),
            table: "customers".into(),
            key: column("id", "integer", FieldType::Int),
            columns: vec![
                column("id", "integer", FieldType::Int),
                column("name", "text", FieldType::String),
            ],
            relations: BTreeMap::new(),
            permissions: BTreeMap::new(),
        };
        Catalog {
            entities: BTreeMap::from([("Customer".to_owned(), entity)]),
        }
    }

    fn object(pairs: Vec<(&str, Value)>) -> Value {
        Value::Object(pairs.into_iter().map(|(k, v)| (Name::new(k), v)).collect())
    }

    fn selection(field: &str) -> Selection {
        Selection {
            key: field.into(),
            field: field.into(),
            arguments: Vec::new(),
            children: Vec::new(),
        }
    }

    #[test]
    fn values_travel_only_as_parameters_never_in_the_sql_text() {
        let attack = "x'); DROP TABLE customers; --";
        let operators = ["eq", "neq", "gt", "gte", "lt", "lte", "like"];
        let filter = object(vec![(
            "or",
            Value::List(
                operators
                    .iter()
                    .map(|op| {
                        object(vec![(
                            "name",
                            object(vec![(op, Value::String(attack.into()))]),
                        )])
                    })
                    .chain([object(vec![(
                        "name",
                        object(vec![(
                            "in",
                            Value::List(vec![Value::String(attack.into())]),
                        )]),
                    )])])
                    .collect(),
            ),
        )]);
        let catalog = catalog();
        let limits = Limits::default();
        let statement = Compiler::new(&catalog, &limits)
            .list(
                "Customer",
                &ListArgs {
                    filter: Some(&filter),
                    order_by: None,
                    limit: Some(&Value::Number(Number::from(5))),
                    ..Default::default()
                },
                &[selection("id"), selection("name")],
            )
            .expect("compiles");
        assert!(!statement.sql.contains("DROP"), "{}", statement.sql);
        let bound = statement
            .params
            .iter()
            .filter(|p| match p {
                Param::Text(Some(text)) => text == attack,
                Param::TextArray(items) => items.iter().any(|i| i == attack),
                _ => false,
            })
            .count();
        assert_eq!(bound, operators.len() + 1, "one parameter per comparison");
    }

    #[test]
    fn an_unknown_field_or_a_limit_above_the_maximum_is_refused() {
        let catalog = catalog();
        let limits = Limits::default();
        let err = Compiler::new(&catalog, &limits)
            .by_key(
                "Customer",
                &Value::Number(Number::from(1)),
                &[selection("password")],
            )
            .expect_err("unknown field");
        assert!(err.to_string().contains("password"), "{err}");
        let too_many = Value::Number(Number::from(i64::from(limits.max_limit) + 1));
        let err = Compiler::new(&catalog, &limits)
            .list(
                "Customer",
                &ListArgs {
                    filter: None,
                    order_by: None,
                    limit: Some(&too_many),
                    ..Default::default()
                },
                &[selection("id")],
            )
            .expect_err("limit");
        assert!(err.to_string().contains("maximum"), "{err}");
    }

    #[test]
    fn rows_of_a_bulk_insert_share_one_statement_and_missing_columns_take_their_default() {
        let catalog = catalog();
        let limits = Limits::default();
        let inputs = Value::List(vec![
            object(vec![
                ("id", Value::from(1)),
                ("name", Value::String("a".into())),
            ]),
            object(vec![("name", Value::String("b".into()))]),
        ]);
        let statement = Compiler::new(&catalog, &limits)
            .create_many("Customer", &inputs, &[selection("id")])
            .expect("compiles");
        assert_eq!(
            statement.sql.matches("INSERT").count(),
            1,
            "{}",
            statement.sql
        );
        assert!(
            statement.sql.contains("(DEFAULT, CAST($3 AS text))"),
            "{}",
            statement.sql
        );
    }

    #[test]
    fn a_write_sets_its_actor_and_trace_in_its_own_statement_as_parameters() {
        let catalog = catalog();
        let limits = Limits::default();
        let actor = "x'); DROP TABLE customers; --";
        let input = object(vec![("name", Value::String("a".into()))]);
        let statement = Compiler::new(&catalog, &limits)
            .writing_for(actor.into(), "00-trace".into())
            .create("Customer", &input, &[selection("id")])
            .expect("compiles");
        assert!(!statement.sql.contains("DROP"), "{}", statement.sql);
        assert_eq!(
            statement.sql.matches("set_config(").count(),
            2,
            "{}",
            statement.sql
        );
        assert!(
            statement.sql.contains("CROSS JOIN herald_request"),
            "the answer reads the settings, so they are made whenever a row changed: {}",
            statement.sql
        );
        for value in [crate::capture::ACTOR_SETTING, actor, "00-trace"] {
            assert!(
                statement.params.contains(&Param::Text(Some(value.into()))),
                "{value} is bound"
            );
        }
        let plain = Compiler::new(&catalog, &limits)
            .create("Customer", &input, &[selection("id")])
            .expect("compiles");
        assert!(!plain.sql.contains("set_config"), "{}", plain.sql);
    }

    #[test]
    fn response_text_keeps_selection_order_and_fills_in_typename() {
        let catalog = catalog();
        let limits = Limits::default();
        let statement = Compiler::new(&catalog, &limits)
            .as_response_text()
            .list(
                "Customer",
                &ListArgs::default(),
                &[selection("name"), selection("__typename"), selection("id")],
            )
            .expect("compiles");
        assert!(!statement.sql.contains("jsonb"), "{}", statement.sql);
        let texts: Vec<_> = statement
            .params
            .iter()
            .filter_map(|p| match p {
                Param::Text(Some(text)) => Some(text.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(texts, ["name", "__typename", "Customer", "id"]);
        let wide: Vec<_> = (0..60).map(|_| selection("id")).collect();
        let err = Compiler::new(&catalog, &limits)
            .as_response_text()
            .by_key("Customer", &Value::from(1), &wide)
            .expect_err("too wide for one json object");
        assert_eq!(err, QueryError::TooWide(60));
        // The engine's form skips `__typename` (the engine answers it) and joins wide objects.
        let engine = Compiler::new(&catalog, &limits)
            .by_key("Customer", &Value::from(1), &wide)
            .expect("compiles");
        assert!(engine.sql.contains(" || "), "{}", engine.sql);
    }

    #[test]
    fn a_null_comparison_is_refused_rather_than_dropped() {
        let catalog = catalog();
        let limits = Limits::default();
        for operator in ["eq", "neq", "gt", "like", "in", "is_null"] {
            let filter = object(vec![("name", object(vec![(operator, Value::Null)]))]);
            let err = Compiler::new(&catalog, &limits)
                .list(
                    "Customer",
                    &ListArgs {
                        filter: Some(&filter),
                        ..Default::default()
                    },
                    &[selection("id")],
                )
                .expect_err("null is refused");
            assert!(
                err.to_string().contains("is_null: true"),
                "{operator}: {err}"
            );
        }
    }
}
