//! The public contract is three things that must agree: the Rust message types in
//! `herald-shared`, the JSON Schemas in `contracts/schemas/`, and the subject map and headers in
//! `contracts/README.md`. These tests fail, naming the field, subject or header, as soon as one
//! side changes without the others. No servers are needed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use chrono::{TimeZone, Utc};
use herald_shared::dlq::DeadLetter;
use herald_shared::messages::{self, decode};
use herald_shared::subjects::{self, DlqSource};
use herald_shared::{
    ActionOutcome, ActionRequest, EntityEvent, JobRequest, JobState, JobStatus, Op, OutcomeStatus,
    RetryPolicy, SCHEMA_VERSION, headers, streams,
};
use jsonschema::{Registry, Validator};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use uuid::Uuid;

const CONTRACTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../contracts");

/// The schema files, by the name the tests use for them.
const SCHEMAS: [&str; 6] = [
    "entity-event",
    "action-request",
    "action-outcome",
    "job-request",
    "job-status",
    "retry-policy",
];

/// Schemas of the services' own interfaces, checked against those services' Rust types and real
/// answers in the services' tests: the auditor's search API (`services/auditor/tests/contract.rs`
/// and the trail scenario) and Flight tickets (`services/flight-streamer/tests/contract.rs`).
/// Here only their form is checked.
const SERVICE_SCHEMAS: [&str; 5] = [
    "audit-document",
    "audit-search-page",
    "audit-trail",
    "audit-error",
    "flight-ticket",
];

fn schema_path(name: &str) -> PathBuf {
    Path::new(CONTRACTS)
        .join("schemas")
        .join(format!("{name}.schema.json"))
}

fn load_schema(name: &str) -> Value {
    let path = schema_path(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read schema {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("schema {} is not JSON: {e}", path.display()))
}

fn schema_id(schema: &Value, name: &str) -> String {
    schema["$id"]
        .as_str()
        .unwrap_or_else(|| panic!("schema {name} has no $id"))
        .to_owned()
}

/// Every schema file in `contracts/schemas`, keyed by file stem, so a schema added there without a
/// test here is noticed.
fn all_schemas() -> BTreeMap<String, Value> {
    let dir = Path::new(CONTRACTS).join("schemas");
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    entries
        .map(|entry| {
            let path = entry.expect("reading the schemas directory").path();
            let file = path
                .file_name()
                .and_then(|f| f.to_str())
                .expect("schema file names are UTF-8")
                .to_owned();
            let name = file
                .strip_suffix(".schema.json")
                .unwrap_or_else(|| panic!("{file} in contracts/schemas is not a *.schema.json"))
                .to_owned();
            let schema = load_schema(&name);
            (name, schema)
        })
        .collect()
}

/// The schemas, with every file registered under its `$id` so relative `$ref`s resolve
/// offline, exactly as a consumer loading the whole directory would see them.
struct Contract {
    schemas: BTreeMap<String, Value>,
    registry: Registry<'static>,
}

impl Contract {
    fn load() -> Self {
        let schemas = all_schemas();
        let resources: Vec<(String, Value)> = schemas
            .iter()
            .map(|(name, schema)| (schema_id(schema, name), schema.clone()))
            .collect();
        let registry = Registry::new()
            .extend(resources)
            .expect("schema $ids are valid URIs")
            .prepare()
            .expect("the schemas form a consistent registry");
        Self { schemas, registry }
    }

    fn schema(&self, name: &str) -> &Value {
        self.schemas
            .get(name)
            .unwrap_or_else(|| panic!("contracts/schemas/{name}.schema.json is missing"))
    }

    fn validator(&self, name: &str) -> Validator {
        jsonschema::options()
            .with_registry(&self.registry)
            .should_validate_formats(true)
            .offline()
            .build(self.schema(name))
            .unwrap_or_else(|e| panic!("schema {name} does not compile: {e}"))
    }

    fn assert_valid(&self, name: &str, instance: &Value, what: &str) {
        let problems: Vec<String> = self
            .validator(name)
            .iter_errors(instance)
            .map(|e| format!("  at `{}`: {e}", e.instance_path()))
            .collect();
        assert!(
            problems.is_empty(),
            "{what} does not validate against {name}.schema.json:\n{}\ninstance: {instance:#}",
            problems.join("\n")
        );
    }

    fn property_names(&self, name: &str) -> BTreeSet<String> {
        self.schema(name)["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("schema {name} has no `properties` object"))
            .keys()
            .cloned()
            .collect()
    }

    fn enum_values(&self, name: &str, property: &str) -> BTreeSet<String> {
        self.schema(name)["properties"][property]["enum"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}.{property} has no `enum`"))
            .iter()
            .map(|v| {
                v.as_str()
                    .unwrap_or_else(|| panic!("{name}.{property} lists a non-string {v}"))
                    .to_owned()
            })
            .collect()
    }
}

fn to_json(value: &impl Serialize) -> Value {
    serde_json::to_value(value).expect("contract types always serialise")
}

fn at(seconds: i64) -> chrono::DateTime<Utc> {
    Utc.timestamp_opt(1_764_065_730 + seconds, 123_456_000)
        .single()
        .expect("a valid timestamp")
}

fn event_id() -> Uuid {
    Uuid::parse_str("0193a5f2-7c4e-7d10-9b1a-3f6c2e8d4a01").expect("a valid UUID")
}

fn retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        initial_delay_ms: 500,
        max_delay_ms: 60_000,
        multiplier: 1.5,
        jitter: false,
    }
}

/// One instance of each message: every `Option` set (`full`) or every `Option` null.
struct Samples {
    event: EntityEvent,
    action: ActionRequest,
    outcome: ActionOutcome,
    job: JobRequest,
    status: JobStatus,
}

impl Samples {
    fn full() -> Self {
        let event = EntityEvent {
            id: event_id(),
            entity: "Order".into(),
            op: Op::Update,
            key: "42".into(),
            data: Some(json!({"id": 42, "status": "shipped"})),
            before: Some(json!({"id": 42, "status": "paid"})),
            changed: Some(vec!["status".into()]),
            at: at(0),
            actor: Some("user|7".into()),
            tx: 884_213,
            schema_version: SCHEMA_VERSION,
        };
        let action_id = ActionRequest::action_id(event.id, "order_shipped", 1);
        let action = ActionRequest {
            id: action_id.clone(),
            kind: "job".into(),
            observer: "order_shipped".into(),
            action_index: 1,
            config: json!({"queue": "default", "job_type": "http"}),
            retry: retry(),
            timeout_ms: 10_000,
            event: event.clone(),
            created_at: at(1),
            schema_version: SCHEMA_VERSION,
            order: Some(herald_shared::ActionOrder {
                sequence: 1_207,
                after: Some(1_180),
            }),
        };
        let outcome = ActionOutcome {
            action_id: action_id.clone(),
            event_id: event.id,
            kind: "webhook".into(),
            observer: "order_shipped".into(),
            attempt: 2,
            status: OutcomeStatus::Retrying,
            latency_ms: 5_012,
            error: Some("receiver answered 503".into()),
            http_status: Some(503),
            at: at(2),
            schema_version: SCHEMA_VERSION,
        };
        let job = JobRequest {
            id: action_id.clone(),
            queue: "default".into(),
            job_type: "http".into(),
            payload: json!({"url": "https://erp.example.com/api/shipments", "method": "POST"}),
            priority: -3,
            retry: retry(),
            timeout_ms: 120_000,
            action_id: Some(action_id.clone()),
            submitted_at: at(3),
            schema_version: SCHEMA_VERSION,
        };
        let status = JobStatus {
            job_id: action_id,
            queue: "default".into(),
            job_type: "http".into(),
            state: JobState::Failed,
            attempt: 1,
            error: Some("connection refused".into()),
            result: Some(json!({"http_status": 502})),
            at: at(4),
            schema_version: SCHEMA_VERSION,
        };
        Self {
            event,
            action,
            outcome,
            job,
            status,
        }
    }

    fn with_every_option_none() -> Self {
        let mut s = Self::full();
        s.event.op = Op::Insert;
        s.event.data = None;
        s.event.before = None;
        s.event.changed = None;
        s.event.actor = None;
        s.action.event = s.event.clone();
        s.action.order = None;
        s.outcome.error = None;
        s.outcome.http_status = None;
        s.job.action_id = None;
        s.status.error = None;
        s.status.result = None;
        s
    }

    /// Each sample, serialised, with the schema that describes it.
    fn as_json(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("entity-event", to_json(&self.event)),
            ("action-request", to_json(&self.action)),
            ("action-outcome", to_json(&self.outcome)),
            ("job-request", to_json(&self.job)),
            ("job-status", to_json(&self.status)),
            ("retry-policy", to_json(&self.job.retry)),
        ]
    }
}

#[test]
fn every_schema_file_is_one_of_the_contract_messages() {
    let on_disk: BTreeSet<String> = all_schemas().into_keys().collect();
    let expected: BTreeSet<String> = SCHEMAS
        .iter()
        .chain(&SERVICE_SCHEMAS)
        .map(|s| (*s).to_owned())
        .collect();
    assert_eq!(
        on_disk, expected,
        "contracts/schemas holds a schema this test does not check, or lacks one"
    );
}

#[test]
fn every_schema_declares_its_id_title_and_a_description_for_every_property() {
    let contract = Contract::load();
    for name in SCHEMAS {
        let schema = contract.schema(name);
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{name} is not draft 2020-12"
        );
        let id = schema_id(schema, name);
        assert!(
            id.ends_with(&format!("/{name}.schema.json")),
            "{name}'s $id {id} does not end in its file name, so relative $refs would not resolve"
        );
        assert!(schema["title"].is_string(), "{name} has no title");
        assert!(
            schema["description"].is_string(),
            "{name} has no description"
        );
        assert_eq!(
            schema["additionalProperties"],
            json!(false),
            "{name} must be closed"
        );
        for property in contract.property_names(name) {
            assert!(
                schema["properties"][&property]["description"].is_string(),
                "{name}.{property} has no description"
            );
        }
    }
}

#[test]
fn every_service_schema_declares_its_id_title_and_describes_every_property() {
    let contract = Contract::load();
    for name in SERVICE_SCHEMAS {
        let schema = contract.schema(name);
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{name} is not draft 2020-12"
        );
        let id = schema_id(schema, name);
        assert!(
            id.ends_with(&format!("/{name}.schema.json")),
            "{name}: $id {id}"
        );
        assert!(schema["title"].is_string(), "{name} has no title");
        assert!(
            schema["description"].is_string(),
            "{name} has no description"
        );
        // The schema itself, or each of its definitions, is an object schema whose every
        // property is described.
        let mut objects = vec![(name.to_owned(), schema)];
        if let Some(defs) = schema["$defs"].as_object() {
            objects.extend(defs.iter().map(|(d, def)| (format!("{name}#{d}"), def)));
        }
        let mut described = 0;
        for (what, object) in objects {
            let Some(properties) = object["properties"].as_object() else {
                continue;
            };
            for (property, value) in properties {
                assert!(
                    value["description"].is_string(),
                    "{what}.{property} has no description"
                );
                described += 1;
            }
        }
        assert!(described > 0, "{name} describes no property");
        // The schema compiles, with every $ref resolved.
        let _ = contract.validator(name);
    }
}

#[test]
fn every_message_type_validates_against_its_schema() {
    let contract = Contract::load();
    for (name, instance) in Samples::full().as_json() {
        contract.assert_valid(name, &instance, "a fully populated instance");
    }
}

#[test]
fn every_message_type_with_every_option_none_validates_against_its_schema() {
    let contract = Contract::load();
    for (name, instance) in Samples::with_every_option_none().as_json() {
        contract.assert_valid(name, &instance, "an instance with every Option None");
    }
}

#[test]
fn schema_properties_are_exactly_the_fields_rust_serialises_and_all_are_required() {
    let contract = Contract::load();
    for (name, instance) in Samples::full().as_json() {
        let serialised: BTreeSet<String> = instance
            .as_object()
            .unwrap_or_else(|| panic!("{name} does not serialise to an object"))
            .keys()
            .cloned()
            .collect();
        let properties = contract.property_names(name);
        let only_rust: Vec<_> = serialised.difference(&properties).collect();
        let only_schema: Vec<_> = properties.difference(&serialised).collect();
        assert!(
            only_rust.is_empty() && only_schema.is_empty(),
            "{name}: fields serialised by Rust but missing from the schema: {only_rust:?}; \
             properties in the schema that Rust does not serialise: {only_schema:?}"
        );
        let required: BTreeSet<String> = contract.schema(name)["required"]
            .as_array()
            .unwrap_or_else(|| panic!("{name} has no `required` list"))
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        let not_required: Vec<_> = serialised.difference(&required).collect();
        assert!(
            not_required.is_empty(),
            "{name}: Rust always serialises {not_required:?}, so the schema must require them"
        );
    }
}

#[test]
fn every_message_schema_pins_the_schema_version_this_build_speaks() {
    let contract = Contract::load();
    for name in SCHEMAS.into_iter().filter(|n| *n != "retry-policy") {
        assert_eq!(
            contract.schema(name)["properties"]["schema_version"]["const"],
            json!(SCHEMA_VERSION),
            "{name}.schema_version must be const {SCHEMA_VERSION}"
        );
    }
}

/// Every OutcomeStatus, in declaration order. The match has no wildcard, so a new variant does
/// not compile until it is placed in this chain.
fn all_outcome_statuses() -> Vec<OutcomeStatus> {
    fn after(status: Option<OutcomeStatus>) -> Option<OutcomeStatus> {
        match status {
            None => Some(OutcomeStatus::Succeeded),
            Some(OutcomeStatus::Succeeded) => Some(OutcomeStatus::Retrying),
            Some(OutcomeStatus::Retrying) => Some(OutcomeStatus::DeadLettered),
            Some(OutcomeStatus::DeadLettered) => Some(OutcomeStatus::Duplicate),
            Some(OutcomeStatus::Duplicate) => None,
        }
    }
    std::iter::successors(after(None), |s| after(Some(*s))).collect()
}

fn serialised_names<T: Serialize + std::fmt::Debug>(values: &[T]) -> BTreeSet<String> {
    values
        .iter()
        .map(|v| {
            to_json(v)
                .as_str()
                .unwrap_or_else(|| panic!("{v:?} does not serialise to a string"))
                .to_owned()
        })
        .collect()
}

#[test]
fn schema_enums_list_exactly_the_rust_enum_values() {
    let contract = Contract::load();
    let cases = [
        ("entity-event", "op", serialised_names(&Op::ALL)),
        (
            "action-outcome",
            "status",
            serialised_names(&all_outcome_statuses()),
        ),
        ("job-status", "state", serialised_names(&JobState::ALL)),
    ];
    for (name, property, rust) in cases {
        let schema = contract.enum_values(name, property);
        assert_eq!(
            schema, rust,
            "{name}.{property}: schema enum (left) differs from the Rust enum (right)"
        );
    }
    for op in Op::ALL {
        assert_eq!(
            to_json(&op),
            json!(op.as_str()),
            "Op::as_str and serde disagree"
        );
    }
    for state in JobState::ALL {
        assert_eq!(
            to_json(&state),
            json!(state.as_str()),
            "JobState::as_str and serde disagree"
        );
    }
}

fn examples(contract: &Contract, name: &str) -> Vec<Value> {
    let examples = contract.schema(name)["examples"]
        .as_array()
        .unwrap_or_else(|| panic!("{name} has no `examples`"))
        .clone();
    assert!(!examples.is_empty(), "{name} has an empty `examples` list");
    examples
}

/// Decodes the way a Herald service does, then checks nothing was lost on the way back.
fn decodes_as<T: DeserializeOwned + Serialize>(name: &str, example: &Value) {
    let body = serde_json::to_vec(example).expect("an example serialises");
    let decoded: T = decode(&body)
        .unwrap_or_else(|e| panic!("the {name} example does not decode into the Rust type: {e}"));
    assert_eq!(
        &to_json(&decoded),
        example,
        "the {name} example changes when it goes through the Rust type"
    );
}

#[test]
fn every_schema_example_validates_and_decodes_into_the_rust_type() {
    let contract = Contract::load();
    for name in SCHEMAS {
        for example in examples(&contract, name) {
            contract.assert_valid(name, &example, "the schema's own example");
            match name {
                "entity-event" => decodes_as::<EntityEvent>(name, &example),
                "action-request" => decodes_as::<ActionRequest>(name, &example),
                "action-outcome" => decodes_as::<ActionOutcome>(name, &example),
                "job-request" => decodes_as::<JobRequest>(name, &example),
                "job-status" => decodes_as::<JobStatus>(name, &example),
                // Not a message of its own (no schema_version): it travels inside others.
                "retry-policy" => {
                    let policy: RetryPolicy = serde_json::from_value(example.clone())
                        .unwrap_or_else(|e| panic!("the retry-policy example is refused: {e}"));
                    assert!(
                        policy.problems("retry").is_empty(),
                        "the retry-policy example is not a valid policy: {:?}",
                        policy.problems("retry")
                    );
                    assert_eq!(
                        to_json(&policy),
                        example,
                        "the retry-policy example changes"
                    );
                }
                other => panic!("no Rust type is mapped to schema {other}"),
            }
        }
    }
}

#[test]
fn schemas_refuse_what_herald_would_never_send() {
    let contract = Contract::load();
    let full = Samples::full();
    let event = to_json(&full.event);
    let action = to_json(&full.action);

    let mut cases: Vec<(&str, &str, Value)> = Vec::new();
    let mut bad = event.clone();
    bad["op"] = json!("upsert");
    cases.push(("entity-event", "an unknown op", bad));
    let mut bad = event.clone();
    bad["id"] = json!("not-a-uuid");
    cases.push(("entity-event", "an id that is not a UUID", bad));
    let mut bad = event.clone();
    bad["at"] = json!("yesterday");
    cases.push(("entity-event", "a commit time that is not RFC 3339", bad));
    let mut bad = event.clone();
    bad["entity"] = json!("Order.Line");
    cases.push((
        "entity-event",
        "an entity that is not one subject token",
        bad,
    ));
    let mut bad = event.clone();
    bad["schema_version"] = json!(SCHEMA_VERSION + 1);
    cases.push(("entity-event", "a newer schema_version", bad));
    let mut bad = event.clone();
    bad.as_object_mut().expect("an object").remove("actor");
    cases.push(("entity-event", "a null field left out", bad));
    let mut bad = event;
    bad["extra"] = json!(1);
    cases.push(("entity-event", "a field the contract does not know", bad));
    // The nested cases prove the relative $refs are resolved, not silently ignored.
    let mut bad = action.clone();
    bad["event"]["op"] = json!("upsert");
    cases.push((
        "action-request",
        "an embedded event with an unknown op",
        bad,
    ));
    let mut bad = action;
    bad["retry"]["backoff"] = json!("linear");
    cases.push(("action-request", "a retry policy with an unknown key", bad));

    for (name, what, instance) in cases {
        assert!(
            !contract.validator(name).is_valid(&instance),
            "{name}.schema.json accepts {what}: {instance:#}"
        );
    }
}

fn readme() -> String {
    let path = Path::new(CONTRACTS).join("README.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A subject built by the Rust code from placeholder tokens, written the way the README writes
/// it (`herald.actions.<kind>.<observer>`).
fn template(
    built: Result<String, subjects::InvalidToken>,
    placeholders: &[(&str, &str)],
) -> String {
    let mut subject = built.expect("placeholder tokens are valid subject tokens");
    for (token, shown) in placeholders {
        subject = subject.replace(token, shown);
    }
    subject
}

#[test]
fn the_readme_subject_map_names_every_stream_with_its_subjects() {
    let readme = readme();
    let table_rows: Vec<&str> = readme.lines().filter(|l| l.starts_with('|')).collect();
    for spec in streams::ALL {
        let row = table_rows
            .iter()
            .find(|row| row.contains(&format!("`{}`", spec.name)))
            .unwrap_or_else(|| {
                panic!("the README subject map has no row for stream {}", spec.name)
            });
        for subject in spec.subjects {
            assert!(
                row.contains(&format!("`{subject}`")),
                "the README row for {} does not list its subject `{subject}`",
                spec.name
            );
        }
    }

    let mut subjects_shown = vec![
        subjects::EVENTS_ALL.to_owned(),
        subjects::ACTIONS_ALL.to_owned(),
        subjects::OUTCOMES_ALL.to_owned(),
        subjects::JOBS_SUBMIT_ALL.to_owned(),
        subjects::JOBS_STATUS_ALL.to_owned(),
        subjects::DLQ_ALL.to_owned(),
        subjects::JOBS_CONTROL_PREFIX.to_owned(),
        template(
            subjects::event("ENTITY", Op::Insert),
            &[("ENTITY", "<Entity>"), ("insert", "<op>")],
        ),
        template(subjects::events_of("ENTITY"), &[("ENTITY", "<Entity>")]),
        template(
            subjects::keyed_event("ENTITY", Op::Insert, "KEY"),
            &[
                ("ENTITY", "<Entity>"),
                ("insert", "<op>"),
                (&subjects::key_token("KEY"), "<key>"),
            ],
        ),
        format!(
            "{}.<partition>",
            template(
                subjects::keyed_event("ENTITY", Op::Insert, "KEY"),
                &[
                    ("ENTITY", "<Entity>"),
                    ("insert", "<op>"),
                    (&subjects::key_token("KEY"), "<key>"),
                ],
            )
        ),
        subjects::EVENTS_KEYED.to_owned(),
        streams::PARTITIONS_METADATA.to_owned(),
        format!("{}", subjects::key_token("42")),
        template(
            subjects::action("KIND", "OBSERVER"),
            &[("KIND", "<kind>"), ("OBSERVER", "<observer>")],
        ),
        template(subjects::actions_of_kind("KIND"), &[("KIND", "<kind>")]),
        subjects::ACTIONS_SCHEDULED_ALL.to_owned(),
        template(
            Ok(
                subjects::scheduled_action("herald.actions.KIND.OBSERVER", "ID")
                    .expect("an action subject has a schedule subject"),
            ),
            &[
                ("KIND", "<kind>"),
                ("OBSERVER", "<observer>"),
                (&subjects::key_token("ID"), "<token>"),
            ],
        ),
        template(
            subjects::outcome("KIND", "OBSERVER"),
            &[("KIND", "<kind>"), ("OBSERVER", "<observer>")],
        ),
        template(subjects::job_submit("QUEUE"), &[("QUEUE", "<queue>")]),
        template(subjects::job_status("QUEUE"), &[("QUEUE", "<queue>")]),
    ];
    subjects_shown.extend(DlqSource::ALL.iter().map(|s| s.subject()));
    for name in [
        subjects::EVENTS_STREAM,
        subjects::ACTIONS_STREAM,
        subjects::OUTCOMES_STREAM,
        subjects::JOBS_STREAM,
        subjects::DLQ_STREAM,
    ] {
        subjects_shown.push(name.to_owned());
    }
    for op in Op::ALL {
        subjects_shown.push(op.as_str().to_owned());
    }
    for subject in subjects_shown {
        assert!(
            readme.contains(&format!("`{subject}`")),
            "contracts/README.md does not mention `{subject}`"
        );
    }
}

#[test]
fn the_readme_documents_every_header_herald_sets() {
    let readme = readme();
    // Every `pub const` in headers.rs, read from the source so a new header cannot skip the docs.
    let source = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/src/headers.rs"
    ))
    .expect("read shared/src/headers.rs");
    let mut names: BTreeSet<String> = source
        .lines()
        .filter_map(|line| line.trim().strip_prefix("pub const "))
        .filter_map(|rest| rest.split('"').nth(1))
        .map(str::to_owned)
        .collect();
    assert!(
        names.contains(headers::MSG_ID) && names.contains(headers::REPLAYED_FROM),
        "header constants not found in headers.rs: {names:?}"
    );
    // Whatever the DLQ code actually writes must be documented too, even if it never got a
    // constant in `headers`.
    let letter = DeadLetter {
        source: DlqSource::Actions,
        original_subject: "herald.actions.webhook.o".into(),
        original_msg_id: "e:o:0".into(),
        error: "receiver answered 410".into(),
        attempts: 3,
        first_failed_at: at(0),
    };
    for (name, _) in letter.headers(None, "contract-test").iter() {
        let name: &str = name.as_ref();
        names.insert(name.to_owned());
    }
    for name in names {
        assert!(
            readme.contains(&format!("`{name}`")),
            "contracts/README.md does not document the header `{name}`"
        );
    }
}

#[test]
fn the_readme_states_the_schema_version_dead_letter_reason_herald_uses() {
    let reason = messages::DecodeError::UnsupportedVersion {
        found: u64::from(SCHEMA_VERSION) + 1,
    }
    .to_string();
    assert!(
        readme().contains(&reason),
        "contracts/README.md should quote the dead-letter reason `{reason}`"
    );
}

#[test]
fn the_readme_documents_the_partition_headers() {
    let readme = readme();
    for name in [headers::PARTITION, headers::LEASE_REVISION] {
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "contracts/README.md has no header row for `{name}`"
        );
    }
}
