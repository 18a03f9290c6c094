//! The export filter: the gateway's `where` operators (`eq`, `neq`, `gt`, `gte`, `lt`, `lte`,
//! `in`, `like`, `is_null`, and `and` / `or` lists), parsed into SQL whose every value is a
//! bound parameter cast to the column's catalogue type. Column names come only from the schema
//! file (checked against the database); nothing a ticket sends becomes SQL text.
//!
//! The gateway's compiler works on GraphQL values and is private to it, so this module parses
//! the same operators from JSON and from the seed's text form (`created_at>2026-01-01&status=paid`,
//! with `=`, `!=`, `>`, `>=`, `<`, `<=` and `~` for `like`). Values are checked against their
//! column's type before PostgreSQL sees them, and a value holding `;`, `--`, `/*`, `*/` or a
//! parenthesis is refused outright: such a ticket is an injection attempt or a mistake, and a
//! clear refusal beats an empty result.

use chrono::{DateTime, NaiveDate, NaiveDateTime};
use herald_gateway::capture::quote_ident;
use serde_json::Value;

use crate::schema::{EntityTypes, Kind, TypedColumn};

#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// Every part holds (a `where` object, an `and` list, `&` in the text form).
    All(Vec<Filter>),
    /// Some part holds (an `or` list).
    Any(Vec<Filter>),
    Compare {
        column: String,
        op: Operator,
        value: Value,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    Eq,
    Neq,
    Gt,
    Gte,
    Lt,
    Lte,
    In,
    Like,
    IsNull,
}

impl Operator {
    fn named(name: &str) -> Option<Self> {
        Some(match name {
            "eq" => Operator::Eq,
            "neq" => Operator::Neq,
            "gt" => Operator::Gt,
            "gte" => Operator::Gte,
            "lt" => Operator::Lt,
            "lte" => Operator::Lte,
            "in" => Operator::In,
            "like" => Operator::Like,
            "is_null" => Operator::IsNull,
            _ => return None,
        })
    }
}

/// A value bound to a placeholder.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Text(String),
    TextArray(Vec<String>),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FilterError {
    #[error("table {table} has no column `{column}` in the schema file")]
    UnknownColumn { table: String, column: String },
    #[error(
        "unknown filter operator `{0}` (expected eq, neq, gt, gte, lt, lte, in, like, is_null)"
    )]
    UnknownOperator(String),
    #[error("filter `{0}`: expected <column><op><value> with op one of = != > >= < <= ~")]
    BadCondition(String),
    #[error("filter value `{value}` is refused: it contains `{token}`")]
    Forbidden { value: String, token: &'static str },
    #[error("`{column}` is {kind}; `{value}` is not")]
    WrongType {
        column: String,
        kind: &'static str,
        value: String,
    },
    #[error("filter: {0}")]
    Shape(String),
}

const FORBIDDEN: [&str; 6] = [";", "--", "/*", "*/", "(", ")"];

impl Filter {
    /// The text form: conditions joined by `&`, each `<column><op><value>`.
    pub fn parse_text(text: &str) -> Result<Option<Self>, FilterError> {
        let mut parts = Vec::new();
        for condition in text.split('&').map(str::trim).filter(|c| !c.is_empty()) {
            let at = condition
                .find(['=', '!', '>', '<', '~'])
                .ok_or_else(|| FilterError::BadCondition(condition.to_owned()))?;
            let (column, rest) = condition.split_at(at);
            let (op, value) = [
                (">=", Operator::Gte),
                ("<=", Operator::Lte),
                ("!=", Operator::Neq),
                ("=", Operator::Eq),
                (">", Operator::Gt),
                ("<", Operator::Lt),
                ("~", Operator::Like),
            ]
            .into_iter()
            .find_map(|(symbol, op)| rest.strip_prefix(symbol).map(|v| (op, v)))
            .ok_or_else(|| FilterError::BadCondition(condition.to_owned()))?;
            let column = column.trim();
            if column.is_empty() {
                return Err(FilterError::BadCondition(condition.to_owned()));
            }
            parts.push(Filter::Compare {
                column: column.to_owned(),
                op,
                value: Value::String(value.trim().to_owned()),
            });
        }
        Ok((!parts.is_empty()).then_some(Filter::All(parts)))
    }

    /// The JSON form, shaped like the gateway's `where`:
    /// `{"created_at": {"gt": "2026-01-01"}, "or": [{"status": {"eq": "paid"}}, ...]}`.
    pub fn parse_json(value: &Value) -> Result<Self, FilterError> {
        let Value::Object(fields) = value else {
            return Err(FilterError::Shape("a where must be an object".into()));
        };
        let mut parts = Vec::new();
        for (name, value) in fields {
            match name.as_str() {
                "and" | "or" => {
                    let Value::Array(items) = value else {
                        return Err(FilterError::Shape(format!("`{name}` takes a list")));
                    };
                    let items = items
                        .iter()
                        .map(Self::parse_json)
                        .collect::<Result<Vec<_>, _>>()?;
                    parts.push(if name == "and" {
                        Filter::All(items)
                    } else {
                        Filter::Any(items)
                    });
                }
                column => {
                    let Value::Object(operators) = value else {
                        return Err(FilterError::Shape(format!(
                            "`{column}` takes an operator object such as {{\"eq\": ...}}"
                        )));
                    };
                    for (op, value) in operators {
                        let op = Operator::named(op)
                            .ok_or_else(|| FilterError::UnknownOperator(op.clone()))?;
                        parts.push(Filter::Compare {
                            column: column.to_owned(),
                            op,
                            value: value.clone(),
                        });
                    }
                }
            }
        }
        Ok(Filter::All(parts))
    }

    /// The SQL condition over `types`' table; values are appended to `params` as `$n`.
    pub fn compile(
        &self,
        types: &EntityTypes,
        params: &mut Vec<Param>,
    ) -> Result<String, FilterError> {
        self.compile_with(types, params, &|n| format!("${n}"))
    }

    /// As `compile`, with the `n`th value (from 1) referred to as `placeholder(n)`: a statement
    /// that takes no parameters (COPY) reads them from settings set with bound values.
    pub fn compile_with(
        &self,
        types: &EntityTypes,
        params: &mut Vec<Param>,
        placeholder: &dyn Fn(usize) -> String,
    ) -> Result<String, FilterError> {
        match self {
            Filter::All(parts) | Filter::Any(parts) => {
                if parts.is_empty() {
                    let empty = matches!(self, Filter::All(_));
                    return Ok(if empty { "TRUE" } else { "FALSE" }.into());
                }
                let joiner = if matches!(self, Filter::All(_)) {
                    " AND "
                } else {
                    " OR "
                };
                let parts = parts
                    .iter()
                    .map(|p| p.compile_with(types, params, placeholder))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(format!("({})", parts.join(joiner)))
            }
            Filter::Compare { column, op, value } => {
                let column = types
                    .column(column)
                    .ok_or_else(|| FilterError::UnknownColumn {
                        table: types.table.clone(),
                        column: column.clone(),
                    })?;
                compare(column, *op, value, params, placeholder)
            }
        }
    }
}

fn compare(
    column: &TypedColumn,
    op: Operator,
    value: &Value,
    params: &mut Vec<Param>,
    placeholder: &dyn Fn(usize) -> String,
) -> Result<String, FilterError> {
    let target = quote_ident(&column.name);
    let ty = &column.sql_type;
    let mut bind = |param: Param| {
        params.push(param);
        placeholder(params.len())
    };
    Ok(match (op, value) {
        (Operator::Eq, Value::Null) => format!("{target} IS NULL"),
        (Operator::Neq, Value::Null) => format!("{target} IS NOT NULL"),
        (Operator::IsNull, value) => match value_bool(value) {
            Some(true) => format!("{target} IS NULL"),
            Some(false) => format!("{target} IS NOT NULL"),
            None => return Err(FilterError::Shape("`is_null` takes true or false".into())),
        },
        (Operator::In, Value::Array(items)) => {
            let texts = items
                .iter()
                .map(|item| checked_text(column, item))
                .collect::<Result<Vec<_>, _>>()?;
            let p = bind(Param::TextArray(texts));
            format!("{target} = ANY(CAST({p} AS {ty}[]))")
        }
        (Operator::In, Value::String(list)) => {
            let texts = list
                .split('|')
                .map(|item| checked_text(column, &Value::String(item.to_owned())))
                .collect::<Result<Vec<_>, _>>()?;
            let p = bind(Param::TextArray(texts));
            format!("{target} = ANY(CAST({p} AS {ty}[]))")
        }
        (Operator::In, _) => return Err(FilterError::Shape("`in` takes a list".into())),
        (Operator::Like, Value::String(pattern)) => {
            forbid(pattern)?;
            let p = bind(Param::Text(pattern.clone()));
            format!("{target}::text LIKE {p}")
        }
        (Operator::Like, _) => return Err(FilterError::Shape("`like` takes a string".into())),
        (op, value) => {
            let sql_op = match op {
                Operator::Eq => "=",
                Operator::Neq => "<>",
                Operator::Gt => ">",
                Operator::Gte => ">=",
                Operator::Lt => "<",
                _ => "<=",
            };
            let p = bind(Param::Text(checked_text(column, value)?));
            format!("{target} {sql_op} CAST({p} AS {ty})")
        }
    })
}

fn value_bool(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn forbid(text: &str) -> Result<(), FilterError> {
    match FORBIDDEN.into_iter().find(|token| text.contains(token)) {
        Some(token) => Err(FilterError::Forbidden {
            value: text.to_owned(),
            token,
        }),
        None => Ok(()),
    }
}

/// The value as the text PostgreSQL will cast, after checking it suits the column's type.
fn checked_text(column: &TypedColumn, value: &Value) -> Result<String, FilterError> {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => return Err(FilterError::Shape("only `eq` and `neq` take null".into())),
        other if column.kind == Kind::Json => other.to_string(),
        _ => {
            return Err(FilterError::Shape(format!(
                "`{}` takes a scalar value",
                column.name
            )));
        }
    };
    forbid(&text)?;
    let wrong = |kind: &'static str| FilterError::WrongType {
        column: column.name.clone(),
        kind,
        value: text.clone(),
    };
    let fits = match column.kind {
        Kind::Int => text.parse::<i64>().is_ok(),
        Kind::Float => text.parse::<f64>().is_ok(),
        Kind::Bool => text.parse::<bool>().is_ok(),
        Kind::TimestampTz | Kind::Timestamp => {
            DateTime::parse_from_rfc3339(&text).is_ok()
                || NaiveDateTime::parse_from_str(&text, "%Y-%m-%dT%H:%M:%S%.f").is_ok()
                || NaiveDateTime::parse_from_str(&text, "%Y-%m-%d %H:%M:%S%.f").is_ok()
                || NaiveDate::parse_from_str(&text, "%Y-%m-%d").is_ok()
        }
        Kind::Date => NaiveDate::parse_from_str(&text, "%Y-%m-%d").is_ok(),
        Kind::Json => serde_json::from_str::<Value>(&text).is_ok(),
        Kind::Text => true,
    };
    if !fits {
        return Err(wrong(match column.kind {
            Kind::Int => "an integer",
            Kind::Float => "a number",
            Kind::Bool => "a boolean",
            Kind::TimestampTz | Kind::Timestamp => "a timestamp (RFC 3339 or YYYY-MM-DD)",
            Kind::Date => "a date (YYYY-MM-DD)",
            Kind::Json => "JSON",
            Kind::Text => "text",
        }));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::datatypes::Schema;
    use serde_json::json;

    use super::*;

    fn orders() -> EntityTypes {
        let column = |name: &str, sql_type: &str| TypedColumn {
            name: name.into(),
            sql_type: sql_type.into(),
            kind: Kind::for_sql(sql_type),
        };
        EntityTypes {
            entity: "Order".into(),
            table: "orders".into(),
            columns: vec![
                column("id", "bigint"),
                column("status", "text"),
                column("total", "numeric(12,2)"),
                column("created_at", "timestamp with time zone"),
            ],
            events: Arc::new(Schema::empty()),
        }
    }

    #[test]
    fn the_seed_text_form_compiles_to_bound_parameters() {
        let filter = Filter::parse_text("created_at>2026-01-01&status=paid&total<=10.5")
            .expect("parses")
            .expect("a filter");
        let mut params = Vec::new();
        let sql = filter.compile(&orders(), &mut params).expect("compiles");
        assert_eq!(
            sql,
            "(\"created_at\" > CAST($1 AS timestamp with time zone) AND \"status\" = CAST($2 AS text) AND \"total\" <= CAST($3 AS numeric(12,2)))"
        );
        assert_eq!(
            params,
            [
                Param::Text("2026-01-01".into()),
                Param::Text("paid".into()),
                Param::Text("10.5".into())
            ]
        );
    }

    #[test]
    fn the_json_form_takes_the_gateway_operators() {
        let filter = Filter::parse_json(&json!({
            "or": [{"status": {"in": ["paid", "new"]}}, {"total": {"is_null": true}}],
            "status": {"like": "p%"}
        }))
        .expect("parses");
        let mut params = Vec::new();
        let sql = filter.compile(&orders(), &mut params).expect("compiles");
        assert_eq!(
            sql,
            "(((\"status\" = ANY(CAST($1 AS text[]))) OR (\"total\" IS NULL)) AND \"status\"::text LIKE $2)"
        );
    }

    #[test]
    fn injection_attempts_and_unknown_columns_are_refused() {
        for (text, wanted) in [
            ("status=paid;drop table orders", "contains `;`"),
            ("status=paid--", "contains `--`"),
            ("id=(select 1)", "contains `(`"),
            ("status=a/*x*/", "contains `/*`"),
            ("id=1 or 1=1", "is an integer"),
            ("total>abc", "is a number"),
            ("created_at>yesterday", "is a timestamp"),
            ("password=x", "no column `password`"),
            ("\"id\"=1", "no column `\"id\"`"),
            ("status", "expected <column><op><value>"),
        ] {
            let err = Filter::parse_text(text)
                .and_then(|f| {
                    let mut params = Vec::new();
                    f.expect("a filter").compile(&orders(), &mut params)
                })
                .expect_err(text)
                .to_string();
            assert!(err.contains(wanted), "{text}: {err}");
        }
        let err = Filter::parse_json(&json!({"id": {"between": [1, 2]}})).expect_err("operator");
        assert_eq!(err, FilterError::UnknownOperator("between".into()));
    }
}
