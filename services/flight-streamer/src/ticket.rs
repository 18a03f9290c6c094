//! Tickets: what a DoGet (or GetFlightInfo / GetSchema command) asks for. Two kinds, each in
//! the seed's text form and in JSON:
//!
//! - events: `observer_events:<Entity>[:<start RFC 3339>]`, or
//!   `{"events": "Order", "since": "...", "until": "...", "ops": ["insert"], "follow": false,
//!   "after_seq": 41}`. `since` is inclusive and `until` exclusive, both on the event's commit
//!   time `at`; `after_seq` resumes after a stream sequence (a cursor from `app_metadata`).
//! - exports: `export:<table>[:<where>:<columns>]` (e.g.
//!   `export:orders:created_at>2026-01-01:id,total,customer_id`; an empty where or column list
//!   means all), or `{"export": "orders", "where": {...}, "columns": ["id", "total"]}`.
//!
//! Names are checked against the schema file later (`service`); here only the shape.

use chrono::{DateTime, Utc};
use herald_shared::Op;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::filter::{Filter, FilterError};

pub const EVENTS_PREFIX: &str = "observer_events:";
pub const EXPORT_PREFIX: &str = "export:";

#[derive(Debug, Clone, PartialEq)]
pub enum Ticket {
    Events(EventsTicket),
    Export(ExportTicket),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsTicket {
    #[serde(rename = "events")]
    pub entity: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// Empty: every operation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ops: Vec<Op>,
    #[serde(default)]
    pub follow: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_seq: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExportTicket {
    pub table: String,
    pub filter: Option<Filter>,
    /// Empty: every column of the schema file.
    pub columns: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportJson {
    export: String,
    #[serde(default, rename = "where")]
    filter: Option<Value>,
    #[serde(default)]
    columns: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TicketError {
    #[error("a ticket is UTF-8 text")]
    NotText,
    #[error(
        "unknown ticket `{0}`: expected observer_events:<Entity>:<start RFC 3339>, \
         export:<table>:<where>:<columns>, or a JSON ticket with \"events\" or \"export\""
    )]
    Unknown(String),
    #[error("ticket start time `{0}` is not RFC 3339 (e.g. 2026-01-24T00:00:00Z)")]
    Time(String),
    #[error("export ticket `{0}`: expected export:<table>:<where>:<columns>")]
    ExportShape(String),
    #[error("JSON ticket: {0}")]
    Json(String),
    #[error(transparent)]
    Filter(#[from] FilterError),
}

impl Ticket {
    pub fn parse(bytes: &[u8]) -> Result<Self, TicketError> {
        let text = std::str::from_utf8(bytes).map_err(|_| TicketError::NotText)?;
        let text = text.trim();
        if text.starts_with('{') {
            return Self::parse_json(text);
        }
        if let Some(rest) = text.strip_prefix(EVENTS_PREFIX) {
            let (entity, since) = match rest.split_once(':') {
                // The start time holds colons of its own: only the first one separates.
                Some((entity, time)) => {
                    let since = DateTime::parse_from_rfc3339(time)
                        .map_err(|_| TicketError::Time(time.to_owned()))?;
                    (entity, Some(since.with_timezone(&Utc)))
                }
                None => (rest, None),
            };
            return Ok(Ticket::Events(EventsTicket {
                entity: entity.to_owned(),
                since,
                ..Default::default()
            }));
        }
        if let Some(rest) = text.strip_prefix(EXPORT_PREFIX) {
            let (table, filter, columns) = match rest.split_once(':') {
                None => (rest, None, Vec::new()),
                Some((table, rest)) => {
                    // Columns never hold a colon; the where may (times), so split at the last.
                    let (filter, columns) = rest
                        .rsplit_once(':')
                        .ok_or_else(|| TicketError::ExportShape(text.to_owned()))?;
                    (table, Filter::parse_text(filter)?, column_list(columns))
                }
            };
            return Ok(Ticket::Export(ExportTicket {
                table: table.to_owned(),
                filter,
                columns,
            }));
        }
        Err(TicketError::Unknown(text.chars().take(80).collect()))
    }

    fn parse_json(text: &str) -> Result<Self, TicketError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| TicketError::Json(e.to_string()))?;
        if value.get("events").is_some() {
            let ticket: EventsTicket =
                serde_json::from_value(value).map_err(|e| TicketError::Json(e.to_string()))?;
            return Ok(Ticket::Events(ticket));
        }
        if value.get("export").is_some() {
            let ticket: ExportJson =
                serde_json::from_value(value).map_err(|e| TicketError::Json(e.to_string()))?;
            return Ok(Ticket::Export(ExportTicket {
                table: ticket.export,
                filter: ticket.filter.as_ref().map(Filter::parse_json).transpose()?,
                columns: ticket.columns,
            }));
        }
        Err(TicketError::Unknown(text.chars().take(80).collect()))
    }

    /// The text form of this ticket (for ListFlights endpoints).
    pub fn events_of(entity: &str) -> String {
        format!("{EVENTS_PREFIX}{entity}")
    }

    pub fn export_of(table: &str) -> String {
        format!("{EXPORT_PREFIX}{table}")
    }
}

fn column_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_events_ticket_keeps_the_colons_of_its_time() {
        let ticket = Ticket::parse(b"observer_events:Order:2026-01-24T00:00:00Z").expect("parses");
        let Ticket::Events(events) = ticket else {
            panic!("an events ticket");
        };
        assert_eq!(events.entity, "Order");
        assert_eq!(
            events.since.map(|t| t.to_rfc3339()),
            Some("2026-01-24T00:00:00+00:00".to_owned())
        );
        assert!(!events.follow);
        assert!(matches!(
            Ticket::parse(b"observer_events:Order:yesterday"),
            Err(TicketError::Time(_))
        ));
    }

    #[test]
    fn the_json_events_ticket_takes_ops_follow_and_a_cursor() {
        let ticket = Ticket::parse(
            br#"{"events": "Order", "since": "2026-01-24T00:00:00Z", "ops": ["insert", "update"], "follow": true, "after_seq": 41}"#,
        )
        .expect("parses");
        let Ticket::Events(events) = ticket else {
            panic!("an events ticket");
        };
        assert_eq!(events.ops, [Op::Insert, Op::Update]);
        assert!(events.follow);
        assert_eq!(events.after_seq, Some(41));
        let err = Ticket::parse(br#"{"events": "Order", "sinse": "x"}"#).expect_err("typo");
        assert!(err.to_string().contains("sinse"), "{err}");
    }

    #[test]
    fn the_seed_export_ticket_splits_table_where_and_columns() {
        let ticket = Ticket::parse(b"export:orders:created_at>2026-01-01T00:00:00Z:id,total")
            .expect("parses");
        let Ticket::Export(export) = ticket else {
            panic!("an export ticket");
        };
        assert_eq!(export.table, "orders");
        assert_eq!(export.columns, ["id", "total"]);
        assert!(export.filter.is_some());
        let Ticket::Export(all) = Ticket::parse(b"export:orders").expect("parses") else {
            panic!("an export ticket");
        };
        assert_eq!((all.filter, all.columns.len()), (None, 0));
        assert!(matches!(
            Ticket::parse(b"export:orders:id"),
            Err(TicketError::ExportShape(_))
        ));
        assert!(matches!(
            Ticket::parse(b"DROP TABLE orders"),
            Err(TicketError::Unknown(_))
        ));
    }
}
