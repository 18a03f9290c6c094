//! The search API's schemas in contracts/schemas agree with what the auditor stores: each
//! kind's document has exactly the fields its index mapping has (the derived full-text field
//! aside, which the API never shows), every one required, each with a JSON type its mapping
//! stores. Real answers are checked against the same schemas in the trail scenario
//! (`common::scenarios`, against osmem-server and, when set, Elasticsearch). No servers here.

use std::collections::BTreeSet;

use herald_auditor::Kind;
use herald_auditor::document::common_properties;
use herald_test_support::contract::Schemas;
use serde_json::{Value, json};

/// The JSON types a value of this mapping type may have in a document (`null` aside).
fn json_types(mapping: &Value) -> &'static [&'static str] {
    match mapping["type"].as_str() {
        // `changed` is a keyword field holding a list of names.
        Some("keyword") => &["string", "array"],
        Some("text" | "date") => &["string"],
        Some("integer" | "long") => &["integer"],
        Some("flat_object" | "flattened") => &["object"],
        other => panic!("no JSON type known for mapping type {other:?}"),
    }
}

fn types_of(property: &Value) -> BTreeSet<String> {
    match &property["type"] {
        Value::String(t) => BTreeSet::from([t.clone()]),
        Value::Array(ts) => ts
            .iter()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect(),
        // `type` is a const: a string.
        _ if property["const"].is_string() => BTreeSet::from(["string".to_owned()]),
        other => panic!("a property without a type: {other}"),
    }
}

#[test]
fn each_kinds_document_schema_has_exactly_its_mapped_fields_with_their_types() {
    let schemas = Schemas::load();
    let document = schemas.schema("audit-document");
    for kind in Kind::ALL {
        let def = &document["$defs"][kind.as_str()];
        assert!(
            def.is_object(),
            "audit-document has no $defs/{}",
            kind.as_str()
        );
        assert_eq!(def["additionalProperties"], json!(false));
        let mut mapping = common_properties();
        mapping.remove("text");
        mapping.extend(kind.properties("flat_object"));
        let properties = def["properties"].as_object().expect("properties");
        let in_schema: BTreeSet<&String> = properties.keys().collect();
        let mapped: BTreeSet<&String> = mapping.keys().collect();
        assert_eq!(
            in_schema,
            mapped,
            "{}: schema vs index mapping",
            kind.as_str()
        );
        let required: BTreeSet<&str> = def["required"]
            .as_array()
            .expect("required")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            required,
            mapped.iter().map(|s| s.as_str()).collect(),
            "{}: every field is always present",
            kind.as_str()
        );
        for (name, field) in &mapping {
            let property = &properties[name];
            assert!(
                property["description"].is_string(),
                "{name} has no description"
            );
            let mut types = types_of(property);
            types.remove("null");
            let allowed = json_types(field);
            assert!(
                !types.is_empty() && types.iter().all(|t| allowed.contains(&t.as_str())),
                "{}.{name}: schema types {types:?}, mapping {field}",
                kind.as_str()
            );
        }
        assert_eq!(
            properties["type"]["const"],
            json!(kind.as_str()),
            "`type` names the kind"
        );
    }
}

#[test]
fn documents_of_the_wrong_shape_are_refused_by_the_schema() {
    let schemas = Schemas::load();
    let event = json!({
        "type": "event", "id": "0190a7a4-2c3b-7a9e-8f00-000000000001",
        "event_id": "0190a7a4-2c3b-7a9e-8f00-000000000001", "at": "2026-12-01T10:00:00Z",
        "entity": "Order", "op": "update", "key": "1042", "actor": null,
        "changed": ["status"], "tx": 7, "data": {"status": "paid"}, "before": null,
        "subject": "herald.events.Order.update", "replayed_from": null
    });
    schemas.assert_valid("audit-document", &event, "an event document");
    let mut extra = event.clone();
    extra["text"] = json!("paid");
    schemas.assert_invalid("audit-document", &extra, "the full-text field");
    let mut wrong = event.clone();
    wrong["type"] = json!("job");
    schemas.assert_invalid("audit-document", &wrong, "an event called a job");
    schemas.assert_invalid(
        "audit-search-page",
        &json!({"hits": [event], "next_cursor": 3}),
        "a numeric cursor",
    );
}

#[test]
fn the_readme_documents_exactly_the_parameters_search_accepts() {
    let readme =
        std::fs::read_to_string(herald_test_support::workspace_root().join("contracts/README.md"))
            .expect("README");
    let start = readme
        .find("<!-- audit-search-parameters -->")
        .expect("the parameter table");
    let end = readme
        .find("<!-- /audit-search-parameters -->")
        .expect("the table's end");
    let documented: BTreeSet<String> = readme[start..end]
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('`').nth(1).map(str::to_owned))
        .collect();
    let mut accepted: BTreeSet<String> = ["q", "since", "until", "size", "cursor"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    accepted.extend(
        herald_auditor::query::FILTERS
            .iter()
            .map(|f| (*f).to_owned()),
    );
    assert_eq!(documented, accepted);
    // Each one is accepted by the parser; anything else is refused.
    for name in &accepted {
        let value = match name.as_str() {
            "since" | "until" => "2026-12-01T00:00:00Z",
            "size" => "10",
            _ => "x",
        };
        if name == "cursor" {
            continue;
        }
        herald_auditor::query::Search::parse(&[(name.clone(), value.to_owned())])
            .unwrap_or_else(|e| panic!("documented parameter {name} refused: {e}"));
    }
    assert!(herald_auditor::query::Search::parse(&[("limit".into(), "1".into())]).is_err());
}
