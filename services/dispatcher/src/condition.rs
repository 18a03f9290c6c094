//! Observer conditions: CEL expressions (the `cel` crate) over one event.
//!
//! A condition sees `data`, `before`, `changed`, `op`, `actor`, `entity` and `key`, plus two
//! helpers: `changed("field")` and `changed_to("field", value)`. Expressions compile when the
//! observers file is loaded, so a typo is a load error, never a surprise in the stream.
//!
//! JSON numbers become CEL `int` when they are whole and fit, `double` otherwise; CEL's
//! heterogeneous equality then makes `100.00 == 100` true, as an operator expects from JSON.
//! `changed` is the event's own list when it has one; otherwise (insert, delete, or a producer
//! that left it out) it is the fields whose value differs between `before` and `data`, so the
//! helpers mean the same thing for every operation.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, LazyLock};

use cel::objects::Key;
use cel::{Context, Env, Program, Value};
use herald_shared::EntityEvent;
use serde_json::Value as Json;

/// The standard library environment, built once: every program and every evaluation share it.
static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ConditionError {
    /// The expression does not parse; permanent, reported at load time.
    #[error("invalid condition: {0}")]
    Compile(String),
    /// The expression failed on this event (a missing field, a type mismatch).
    #[error("condition failed on this event: {0}")]
    Evaluate(String),
    /// The expression ran but did not answer true or false.
    #[error("condition must be true or false, got {0}")]
    NotBool(String),
}

/// A compiled condition, shared by every evaluation.
#[derive(Clone)]
pub struct Condition {
    source: String,
    program: Arc<Program>,
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Condition").field(&self.source).finish()
    }
}

impl Condition {
    pub fn compile(source: &str) -> Result<Self, ConditionError> {
        let program = ENV
            .compile(source)
            .map_err(|e| ConditionError::Compile(e.to_string()))?;
        Ok(Self {
            source: source.to_owned(),
            program: Arc::new(program),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the event in `scope` satisfies the condition.
    pub fn evaluate(&self, scope: &Scope) -> Result<bool, ConditionError> {
        match self.program.execute(&scope.context) {
            Ok(Value::Bool(answer)) => Ok(answer),
            Ok(other) => Err(ConditionError::NotBool(format!("{:?}", other.type_of()))),
            Err(e) => Err(ConditionError::Evaluate(e.to_string())),
        }
    }
}

/// One event's variables and helpers, built once and shared by every condition evaluated on
/// that event (building them costs more than evaluating a typical condition).
pub struct Scope {
    context: Context<'static, 'static>,
}

impl Scope {
    pub fn new(event: &EntityEvent) -> Self {
        let data = json_to_cel(event.data.as_ref().unwrap_or(&Json::Null));
        let before = json_to_cel(event.before.as_ref().unwrap_or(&Json::Null));
        let changed: Arc<BTreeSet<String>> = Arc::new(changed_fields(event));

        let mut context = Context::with_env(Arc::clone(&ENV));
        context.add_variable_from_value("data", data.clone());
        context.add_variable_from_value("before", before);
        context
            .add_variable_from_value("changed", changed.iter().cloned().collect::<Vec<String>>());
        context.add_variable_from_value("op", event.op.as_str());
        context.add_variable_from_value("actor", event.actor.clone());
        context.add_variable_from_value("entity", event.entity.as_str());
        context.add_variable_from_value("key", event.key.as_str());

        let fields = Arc::clone(&changed);
        context
            .add_function("changed", move |field: Arc<String>| {
                fields.contains(field.as_str())
            })
            .expect("`changed` is not a standard CEL function");
        context
            .add_function("changed_to", move |field: Arc<String>, value: Value| {
                changed.contains(field.as_str()) && field_of(&data, &field) == Some(value)
            })
            .expect("`changed_to` is not a standard CEL function");
        Self { context }
    }
}

fn field_of(row: &Value, field: &str) -> Option<Value> {
    match row {
        Value::Map(map) => map.get(&Key::from(field)).cloned(),
        _ => None,
    }
}

/// The event's `changed` list, or the fields whose value differs between `before` and `data`.
fn changed_fields(event: &EntityEvent) -> BTreeSet<String> {
    if let Some(listed) = &event.changed {
        return listed.iter().cloned().collect();
    }
    let empty = serde_json::Map::new();
    let row = |value: &Option<Json>| match value {
        Some(Json::Object(map)) => map.clone(),
        _ => empty.clone(),
    };
    let (before, after) = (row(&event.before), row(&event.data));
    before
        .keys()
        .chain(after.keys())
        .filter(|field| before.get(*field) != after.get(*field))
        .cloned()
        .collect()
}

/// JSON to CEL, whole numbers as `int` so arithmetic and comparisons with literals just work.
fn json_to_cel(value: &Json) -> Value {
    match value {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Value::Int(i),
            (None, Some(u), _) => Value::UInt(u),
            (None, None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => Value::Int(f as i64),
            (None, None, Some(f)) => Value::Float(f),
            (None, None, None) => Value::Null,
        },
        Json::String(s) => Value::String(Arc::new(s.clone())),
        Json::Array(items) => Value::List(Arc::new(items.iter().map(json_to_cel).collect())),
        Json::Object(map) => map
            .iter()
            .map(|(k, v)| (k.clone(), json_to_cel(v)))
            .collect::<HashMap<String, Value>>()
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use herald_shared::{Op, SCHEMA_VERSION};
    use serde_json::json;
    use uuid::Uuid;

    fn event(
        op: Op,
        before: Option<Json>,
        data: Option<Json>,
        changed: Option<&[&str]>,
    ) -> EntityEvent {
        EntityEvent {
            id: Uuid::now_v7(),
            entity: "Order".into(),
            op,
            key: "42".into(),
            data,
            before,
            changed: changed.map(|c| c.iter().map(|s| (*s).to_owned()).collect()),
            at: Utc::now(),
            actor: Some("user-1".into()),
            tx: 7,
            schema_version: SCHEMA_VERSION,
        }
    }

    fn shipped() -> EntityEvent {
        event(
            Op::Update,
            Some(json!({"id": 42, "status": "paid", "total": 99.5, "tags": ["a"]})),
            Some(json!({"id": 42, "status": "shipped", "total": 100.00, "tags": ["a", "vip"]})),
            Some(&["status", "total", "tags"]),
        )
    }

    fn eval(source: &str, event: &EntityEvent) -> Result<bool, ConditionError> {
        Condition::compile(source)
            .expect("compiles")
            .evaluate(&Scope::new(event))
    }

    fn holds(source: &str, event: &EntityEvent) -> bool {
        eval(source, event).unwrap_or_else(|e| panic!("{source}: {e}"))
    }

    #[test]
    fn fields_of_the_row_and_the_event_are_variables() {
        let e = shipped();
        assert!(holds(
            r#"data.status == "shipped" && before.status == "paid""#,
            &e
        ));
        assert!(holds(
            r#"op == "update" && entity == "Order" && key == "42""#,
            &e
        ));
        assert!(holds(r#"actor == "user-1""#, &e));
        assert!(!holds(r#"data.status == "paid""#, &e));
        assert!(holds(r#""vip" in data.tags && size(changed) == 3"#, &e));
    }

    #[test]
    fn numbers_compare_by_value_whatever_their_json_spelling() {
        let e = shipped();
        assert!(holds("data.total == 100", &e));
        assert!(holds("data.total == 100.0", &e));
        assert!(holds("data.total >= 100 && data.total < 100.5", &e));
        assert!(holds("before.total > 99 && before.total == 99.5", &e));
        assert!(holds("data.id + 1 == 43", &e));
        assert!(!holds("data.total == 101", &e));
    }

    #[test]
    fn changed_helpers_follow_the_changed_list() {
        let e = shipped();
        assert!(holds(r#"changed("status")"#, &e));
        assert!(!holds(r#"changed("id")"#, &e));
        assert!(holds(r#"changed_to("status", "shipped")"#, &e));
        assert!(!holds(r#"changed_to("status", "paid")"#, &e));
        assert!(holds(r#"changed_to("total", 100)"#, &e));
        assert!(!holds(r#"changed_to("id", 42)"#, &e), "id did not change");
    }

    #[test]
    fn without_a_changed_list_changes_are_computed_from_the_rows() {
        let insert = event(Op::Insert, None, Some(json!({"status": "new"})), None);
        assert!(holds(
            r#"changed_to("status", "new") && op == "insert""#,
            &insert
        ));
        assert!(holds(r#"changed == ["status"]"#, &insert));
        let delete = event(Op::Delete, Some(json!({"status": "gone"})), None, None);
        assert!(holds(r#"changed("status") && data == null"#, &delete));
        assert!(!holds(r#"changed_to("status", "gone")"#, &delete));
    }

    #[test]
    fn a_missing_actor_is_null() {
        let mut e = shipped();
        e.actor = None;
        assert!(holds("actor == null", &e));
    }

    #[test]
    fn a_missing_field_is_an_evaluation_error_that_has_can_avoid() {
        let e = shipped();
        assert!(matches!(
            eval("data.nope == 1", &e),
            Err(ConditionError::Evaluate(_))
        ));
        assert!(!holds("has(data.nope) && data.nope == 1", &e));
    }

    #[test]
    fn a_non_boolean_result_is_an_error_not_a_match() {
        assert!(matches!(
            eval("data.status", &shipped()),
            Err(ConditionError::NotBool(_))
        ));
    }

    #[test]
    fn a_malformed_expression_fails_to_compile() {
        assert!(matches!(
            Condition::compile("data.status == "),
            Err(ConditionError::Compile(_))
        ));
    }
}
