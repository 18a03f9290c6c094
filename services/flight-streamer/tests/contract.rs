//! The Flight contract in contracts/ (README section "Arrow Flight" and
//! schemas/flight-ticket.schema.json) agrees with the Rust ticket types and schemas: every
//! documented ticket parses into the kind it says, the JSON schema has exactly the fields and
//! operators the parser accepts, and the column tables are the types the server sends. No
//! servers here; real streams are checked in `events.rs`, `export.rs` and `python.rs`.

use std::collections::BTreeSet;

use arrow::datatypes::{DataType, TimeUnit};
use chrono::Utc;
use herald_flight_streamer::filter::Filter;
use herald_flight_streamer::schema::{ENVELOPE, Kind, envelope_fields};
use herald_flight_streamer::ticket::{EventsTicket, Ticket};
use herald_shared::Op;
use herald_test_support::contract::Schemas;
use herald_test_support::workspace_root;
use serde_json::{Value, json};

fn readme() -> String {
    std::fs::read_to_string(workspace_root().join("contracts/README.md")).expect("README")
}

/// The text between `<!-- name -->` and `<!-- /name -->`.
fn section(readme: &str, name: &str) -> String {
    let start = readme
        .find(&format!("<!-- {name} -->"))
        .unwrap_or_else(|| panic!("README has no {name} section"));
    let end = readme
        .find(&format!("<!-- /{name} -->"))
        .unwrap_or_else(|| panic!("README's {name} section is not closed"));
    readme[start..end].to_owned()
}

/// The first two backticked cells of every table row of a section.
fn table(readme: &str, name: &str) -> Vec<(String, String)> {
    section(readme, name)
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let unquote = |c: &str| c.split('`').nth(1).unwrap_or_default().to_owned();
            (unquote(cells[1]), unquote(cells[2]))
        })
        .collect()
}

/// The Arrow type in the notation the README (and pyarrow) uses.
fn arrow_name(data_type: &DataType) -> String {
    match data_type {
        DataType::Int64 => "int64".into(),
        DataType::UInt64 => "uint64".into(),
        DataType::Float64 => "float64".into(),
        DataType::Boolean => "bool".into(),
        DataType::Utf8 => "utf8".into(),
        DataType::Date32 => "date32".into(),
        DataType::Timestamp(TimeUnit::Microsecond, None) => "timestamp[us]".into(),
        DataType::Timestamp(TimeUnit::Microsecond, Some(tz)) => format!("timestamp[us, {tz}]"),
        DataType::List(item) => format!("list<{}>", arrow_name(item.data_type())),
        other => panic!("no README name for {other}"),
    }
}

#[test]
fn every_documented_ticket_parses_into_the_kind_it_describes() {
    let readme = readme();
    let schemas = Schemas::load();
    let examples = section(&readme, "flight-ticket-examples");
    let tickets: Vec<String> = examples
        .lines()
        .filter_map(|l| l.strip_prefix("- `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect();
    assert_eq!(tickets.len(), 4, "{tickets:?}");
    for text in &tickets {
        let ticket = Ticket::parse(text.as_bytes())
            .unwrap_or_else(|e| panic!("the README's ticket {text} is refused: {e}"));
        let events = text.starts_with("observer_events:") || text.contains("\"events\"");
        assert_eq!(matches!(ticket, Ticket::Events(_)), events, "{text}");
        if text.starts_with('{') {
            let value: Value = serde_json::from_str(text).expect("JSON");
            schemas.assert_valid("flight-ticket", &value, "the README's JSON ticket");
        }
    }
    // The seed form keeps the colons of its time.
    let Ok(Ticket::Events(seed)) = Ticket::parse(tickets[0].as_bytes()) else {
        panic!("not an events ticket");
    };
    assert_eq!(seed.entity, "Order");
    assert_eq!(
        seed.since.map(|t| t.to_rfc3339()),
        Some("2026-01-24T00:00:00+00:00".into())
    );
    let Ok(Ticket::Export(export)) = Ticket::parse(tickets[1].as_bytes()) else {
        panic!("not an export ticket");
    };
    assert_eq!(export.table, "orders");
    assert_eq!(export.columns, ["id", "total", "customer_id"]);
    assert!(export.filter.is_some());
}

#[test]
fn the_ticket_schema_examples_validate_and_parse() {
    let schemas = Schemas::load();
    let examples = schemas.schema("flight-ticket")["examples"]
        .as_array()
        .expect("examples")
        .clone();
    assert!(examples.len() >= 2);
    for example in examples {
        schemas.assert_valid("flight-ticket", &example, "a schema example");
        let ticket = Ticket::parse(example.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("the example {example} is refused: {e}"));
        assert_eq!(
            matches!(ticket, Ticket::Events(_)),
            example.get("events").is_some()
        );
    }
}

#[test]
fn the_ticket_schema_has_exactly_the_fields_and_operators_the_parser_accepts() {
    let schemas = Schemas::load();
    let schema = schemas.schema("flight-ticket");
    let names = |def: &str| -> BTreeSet<String> {
        schema["$defs"][def]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("no $defs/{def}"))
            .keys()
            .cloned()
            .collect()
    };
    let full = EventsTicket {
        entity: "Order".into(),
        since: Some(Utc::now()),
        until: Some(Utc::now()),
        ops: vec![Op::Insert],
        follow: false,
        after_seq: Some(1),
    };
    let serialised: BTreeSet<String> = serde_json::to_value(&full)
        .expect("json")
        .as_object()
        .expect("object")
        .keys()
        .cloned()
        .collect();
    assert_eq!(names("events"), serialised, "events ticket fields");
    let ops: BTreeSet<String> = schema["$defs"]["events"]["properties"]["ops"]["items"]["enum"]
        .as_array()
        .expect("ops enum")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let rust_ops: BTreeSet<String> = Op::ALL.iter().map(|o| o.as_str().to_owned()).collect();
    assert_eq!(ops, rust_ops);

    // Every export field is accepted by the parser, and an unknown one by neither.
    let export = json!({"export": "orders", "where": {"id": {"eq": 1}}, "columns": ["id"]});
    let given: BTreeSet<String> = export
        .as_object()
        .expect("object")
        .keys()
        .cloned()
        .collect();
    assert_eq!(names("export"), given, "export ticket fields");
    assert!(Ticket::parse(export.to_string().as_bytes()).is_ok());
    for (extra, what) in [
        (
            json!({"export": "orders", "limit": 3}),
            "an unknown export field",
        ),
        (
            json!({"events": "Order", "limit": 3}),
            "an unknown events field",
        ),
    ] {
        schemas.assert_invalid("flight-ticket", &extra, what);
        assert!(
            Ticket::parse(extra.to_string().as_bytes()).is_err(),
            "{what}"
        );
    }

    let operators: Vec<String> = schema["$defs"]["filter"]["additionalProperties"]["propertyNames"]
        ["enum"]
        .as_array()
        .expect("operator enum")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    for op in &operators {
        let filter = json!({"total": {op.as_str(): 1}});
        assert!(
            Filter::parse_json(&filter).is_ok(),
            "the schema's operator {op} is refused by the parser"
        );
        let ticket = json!({"export": "orders", "where": filter});
        schemas.assert_valid(
            "flight-ticket",
            &ticket,
            "a filter with a documented operator",
        );
    }
    let unknown = json!({"total": {"between": [1, 2]}});
    assert!(Filter::parse_json(&unknown).is_err());
    schemas.assert_invalid(
        "flight-ticket",
        &json!({"export": "orders", "where": unknown}),
        "an unknown operator",
    );
    let nested = json!({"export": "orders", "where": {"or": [{"status": {"eq": "paid"}}, {"and": [{"total": {"gt": 1}}]}]}});
    schemas.assert_valid("flight-ticket", &nested, "and/or lists");
    assert!(Ticket::parse(nested.to_string().as_bytes()).is_ok());
}

#[test]
fn the_column_tables_are_the_types_the_server_sends() {
    let readme = readme();
    let envelope = table(&readme, "flight-envelope");
    let fields = envelope_fields();
    let sent: Vec<(String, String)> = fields
        .iter()
        .map(|f| (f.name().clone(), arrow_name(f.data_type())))
        .collect();
    assert_eq!(
        envelope, sent,
        "the README's envelope vs the event schema's"
    );
    assert_eq!(
        envelope.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ENVELOPE
    );
    let types = table(&readme, "flight-column-types");
    assert!(types.len() >= 10);
    for (sql, arrow) in types {
        assert_eq!(
            arrow_name(&Kind::for_sql(&sql).data_type()),
            arrow,
            "PostgreSQL {sql}"
        );
    }
}
