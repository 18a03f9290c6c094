//! The observers file: which events (entity, operations, condition) trigger which actions.
//!
//! The file is TOML, one `[[observer]]` table per observer with its `[[observer.action]]`
//! tables, and optionally a top-level `custom_kinds = ["mykind"]` naming the action kinds beyond
//! the built-in ones (webhook, slack, email, job) that a worker of your own consumes. An action
//! of any other kind is refused at load, with its key and line: a misspelt kind would otherwise
//! publish actions no consumer ever reads. It is read by walking toml's spanned document tree rather than through serde, so a
//! refusal can name EVERY bad key with its path and line (serde stops at the first problem and
//! loses the position of semantic errors). Everything in an action table other than `kind`,
//! `retry` and `timeout` is the kind's own settings and travels verbatim as JSON in
//! `ActionRequest.config`.
//!
//! The loaded set lives behind an `ArcSwap`: a reload swaps in a whole new set at once, and work
//! in flight keeps the snapshot it started with.

use std::cell::OnceCell;
use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use chrono::Utc;
use herald_shared::messages::BUILTIN_ACTION_KINDS;
use herald_shared::subjects::{self, InvalidToken};
use herald_shared::template;
use herald_shared::{ActionRequest, EntityEvent, Op, RetryPolicy, SCHEMA_VERSION};
use serde_json::Value as Json;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::condition::{Condition, ConditionError, Scope};

/// How long a worker may take on one action attempt when the file does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// One problem with one key of the observers file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path, e.g. `observer[1].action[0].kind`.
    pub key: String,
    /// 1-based line of the key (or of the table, for a missing key).
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ObserversError {
    #[error("cannot read observers file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("observers file {path} is invalid:\n{}", render(.problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn render(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One action of an observer, as declared.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    pub kind: String,
    pub config: Json,
    pub retry: RetryPolicy,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Observer {
    pub name: String,
    pub entity: String,
    pub ops: Vec<Op>,
    pub condition: Option<Condition>,
    pub actions: Vec<Action>,
    /// `ordered = true`: each action's requests carry their place in the line of their entity
    /// key (`ActionRequest::order`), and workers run them in that order (`order.rs`).
    pub ordered: bool,
}

/// Why an observer did not match an event although entity and operation fit.
#[derive(Debug, thiserror::Error)]
#[error("observer {observer}: {source}")]
pub struct MatchError {
    pub observer: String,
    #[source]
    pub source: ConditionError,
}

impl Observer {
    /// Whether the event triggers this observer. A condition that fails at run time is an
    /// error, which the caller counts and logs; the observer then does not match.
    ///
    /// `scope` holds the event's condition variables, built by the first observer that needs
    /// them and reused by the others.
    pub fn matches(
        &self,
        event: &EntityEvent,
        scope: &OnceCell<Scope>,
    ) -> Result<bool, MatchError> {
        if self.entity != event.entity || !self.ops.contains(&event.op) {
            return Ok(false);
        }
        match &self.condition {
            None => Ok(true),
            Some(condition) => condition
                .evaluate(scope.get_or_init(|| Scope::new(event)))
                .map_err(|source| MatchError {
                    observer: self.name.clone(),
                    source,
                }),
        }
    }

    /// The requests this observer emits for `event`, each with its subject.
    pub fn requests(
        &self,
        event: &EntityEvent,
    ) -> Result<Vec<(String, ActionRequest)>, InvalidToken> {
        let created_at = Utc::now();
        self.actions
            .iter()
            .zip(0u32..)
            .map(|(action, index)| {
                let subject = subjects::action(&action.kind, &self.name)?;
                let request = ActionRequest {
                    id: ActionRequest::action_id(event.id, &self.name, index),
                    kind: action.kind.clone(),
                    observer: self.name.clone(),
                    action_index: index,
                    config: action.config.clone(),
                    retry: action.retry.clone(),
                    timeout_ms: u64::try_from(action.timeout.as_millis()).unwrap_or(u64::MAX),
                    event: event.clone(),
                    created_at,
                    schema_version: SCHEMA_VERSION,
                    order: None,
                };
                Ok((subject, request))
            })
            .collect()
    }
}

/// A validated observers file.
#[derive(Debug, Clone, Default)]
pub struct ObserverSet {
    pub observers: Vec<Observer>,
    /// The custom action kinds the file declares (`custom_kinds`).
    pub custom_kinds: Vec<String>,
}

impl ObserverSet {
    pub fn get(&self, name: &str) -> Option<&Observer> {
        self.observers.iter().find(|o| o.name == name)
    }

    pub fn len(&self) -> usize {
        self.observers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.observers.is_empty()
    }

    /// Every action kind the observers use, each with the observers using it, sorted.
    pub fn kinds(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut kinds: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for observer in &self.observers {
            for action in &observer.actions {
                let users = kinds.entry(action.kind.clone()).or_default();
                if !users.contains(&observer.name) {
                    users.push(observer.name.clone());
                }
            }
        }
        kinds
    }

    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self, ObserversError> {
        let text = std::fs::read_to_string(path).map_err(|source| ObserversError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|problems| ObserversError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }

    /// Validates a document, returning every problem found.
    pub fn parse(text: &str) -> Result<Self, Vec<Problem>> {
        let mut reader = Reader {
            text,
            problems: Vec::new(),
            kinds: BUILTIN_ACTION_KINDS
                .iter()
                .map(|k| (*k).to_owned())
                .collect(),
        };
        let (document, syntax) = DeTable::parse_recoverable(text);
        if !syntax.is_empty() {
            for error in syntax {
                let line = error.span().map_or(1, |s| reader.line(&s));
                reader.problems.push(Problem {
                    key: "(syntax)".into(),
                    line,
                    message: error.message().to_owned(),
                });
            }
            return Err(reader.problems);
        }
        let set = reader.document(document.get_ref());
        if reader.problems.is_empty() {
            Ok(set)
        } else {
            Err(reader.problems)
        }
    }
}

/// The observer set in force, swapped whole on reload.
pub struct Observers {
    path: PathBuf,
    current: ArcSwap<ObserverSet>,
}

impl Observers {
    /// Loads the file; an invalid file refuses the start.
    pub fn load(path: &Path) -> Result<Self, ObserversError> {
        let set = ObserverSet::load(path)?;
        Ok(Self {
            path: path.to_owned(),
            current: ArcSwap::from_pointee(set),
        })
    }

    /// The set to use for one event; it stays valid however many reloads follow.
    pub fn snapshot(&self) -> Arc<ObserverSet> {
        self.current.load_full()
    }

    /// Reads the file again. An invalid file leaves the set in force untouched.
    pub fn reload(&self) -> Result<usize, ObserversError> {
        let set = ObserverSet::load(&self.path)?;
        let count = set.len();
        self.current.store(Arc::new(set));
        Ok(count)
    }
}

/// What one dry run found: the observers that match and the requests they would publish.
#[derive(Debug, Clone)]
pub struct DryRun {
    pub matched: Vec<String>,
    pub requests: Vec<(String, ActionRequest)>,
    /// Observers whose condition failed on the event.
    pub errors: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DryRunError {
    #[error(transparent)]
    Observers(#[from] ObserversError),
    #[error("the event is not a valid EntityEvent: {0}")]
    Event(#[from] herald_shared::messages::DecodeError),
    #[error("an observer cannot publish: {0}")]
    Subject(#[from] InvalidToken),
}

/// `herald observers test <file> --event <json>`: which observers match and what they would emit.
pub fn dry_run(file: &Path, event_json: &str) -> Result<DryRun, DryRunError> {
    let set = ObserverSet::load(file)?;
    let event: EntityEvent = herald_shared::messages::decode(event_json.as_bytes())?;
    let mut run = DryRun {
        matched: Vec::new(),
        requests: Vec::new(),
        errors: Vec::new(),
    };
    let scope = OnceCell::new();
    for observer in &set.observers {
        match observer.matches(&event, &scope) {
            Ok(true) => {
                run.matched.push(observer.name.clone());
                run.requests.extend(observer.requests(&event)?);
            }
            Ok(false) => {}
            Err(e) => run.errors.push(e.to_string()),
        }
    }
    Ok(run)
}

/// Walks the spanned document, collecting problems.
struct Reader<'t> {
    text: &'t str,
    problems: Vec<Problem>,
    /// The kinds an action may have: the built-in ones and the declared custom ones.
    kinds: HashSet<String>,
}

type Entry<'a, 'i> = (
    &'a Spanned<std::borrow::Cow<'i, str>>,
    &'a Spanned<DeValue<'i>>,
);

impl Reader<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    fn problem(&mut self, key: impl Into<String>, span: &Range<usize>, message: impl Into<String>) {
        let line = self.line(span);
        self.problems.push(Problem {
            key: key.into(),
            line,
            message: message.into(),
        });
    }

    fn document(&mut self, root: &DeTable<'_>) -> ObserverSet {
        let mut set = ObserverSet::default();
        let mut names = HashSet::new();
        // The declared kinds first: the actions are checked against them.
        if let Some((key, value)) = root.iter().find(|(k, _)| k.get_ref() == "custom_kinds") {
            set.custom_kinds = self.custom_kinds(key.get_ref(), value);
        }
        for (key, value) in root.iter() {
            if key.get_ref() == "custom_kinds" {
                continue;
            }
            if key.get_ref() != "observer" {
                self.problem(
                    key.get_ref().to_string(),
                    &key.span(),
                    "unknown key (expected custom_kinds and [[observer]] tables)",
                );
                continue;
            }
            let Some(tables) = self.tables("observer", value) else {
                continue;
            };
            for (index, table) in tables.into_iter().enumerate() {
                let path = format!("observer[{index}]");
                if let Some(observer) = self.observer(&path, table) {
                    if !names.insert(observer.name.clone()) {
                        self.problem(
                            format!("{path}.name"),
                            &table.span(),
                            format!("observer `{}` is declared twice", observer.name),
                        );
                    }
                    set.observers.push(observer);
                }
            }
        }
        set
    }

    /// `custom_kinds = ["mykind", ...]`: subject tokens, none a built-in kind, none twice.
    fn custom_kinds(&mut self, path: &str, value: &Spanned<DeValue<'_>>) -> Vec<String> {
        let Some(items) = value.get_ref().as_array() else {
            self.problem(
                path,
                &value.span(),
                "must be an array of kind names such as [\"fax\"]",
            );
            return Vec::new();
        };
        let mut declared = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            let Some(kind) = self.subject_token(&item_path, "an action kind", item) else {
                continue;
            };
            if BUILTIN_ACTION_KINDS.contains(&kind.as_str()) {
                self.problem(
                    &item_path,
                    &item.span(),
                    format!("`{kind}` is built in; declare only custom kinds"),
                );
            } else if !self.kinds.insert(kind.clone()) {
                self.problem(
                    &item_path,
                    &item.span(),
                    format!("`{kind}` is declared twice"),
                );
            } else {
                declared.push(kind);
            }
        }
        declared
    }

    /// An array of tables (`[[x]]`), each with its span.
    fn tables<'a, 'i>(
        &mut self,
        path: &str,
        value: &'a Spanned<DeValue<'i>>,
    ) -> Option<Vec<&'a Spanned<DeValue<'i>>>> {
        match value.get_ref() {
            DeValue::Array(items) if items.iter().all(|i| i.get_ref().is_table()) => {
                Some(items.iter().collect())
            }
            _ => {
                self.problem(
                    path,
                    &value.span(),
                    format!("must be an array of tables ([[{path}]])"),
                );
                None
            }
        }
    }

    fn string(&mut self, path: &str, value: &Spanned<DeValue<'_>>) -> Option<String> {
        match value.get_ref().as_str() {
            Some(s) => Some(s.to_owned()),
            None => {
                self.problem(path, &value.span(), "must be a string");
                None
            }
        }
    }

    fn subject_token(
        &mut self,
        path: &str,
        what: &'static str,
        value: &Spanned<DeValue<'_>>,
    ) -> Option<String> {
        let text = self.string(path, value)?;
        match subjects::token(what, &text) {
            Ok(_) => Some(text),
            Err(e) => {
                self.problem(path, &value.span(), e.to_string());
                None
            }
        }
    }

    fn observer(&mut self, path: &str, table: &Spanned<DeValue<'_>>) -> Option<Observer> {
        let entries: Vec<Entry<'_, '_>> = table
            .get_ref()
            .as_table()
            .map(|t| t.iter().collect())
            .unwrap_or_default();
        let before = self.problems.len();
        let mut seen = HashSet::new();
        let (mut name, mut entity, mut ops, mut condition, mut actions) =
            (None, None, None, None, None);
        let mut ordered = false;
        for (key, value) in entries {
            let key_path = format!("{path}.{}", key.get_ref());
            seen.insert(key.get_ref().to_string());
            match key.get_ref().as_ref() {
                "name" => name = self.subject_token(&key_path, "an observer", value),
                "entity" => entity = self.subject_token(&key_path, "an entity", value),
                "ops" => ops = self.ops(&key_path, value),
                "ordered" => match value.get_ref() {
                    DeValue::Boolean(b) => ordered = *b,
                    _ => self.problem(&key_path, &value.span(), "must be true or false"),
                },
                "condition" => {
                    condition = self.string(&key_path, value).and_then(|source| {
                        Condition::compile(&source)
                            .map_err(|e| self.problem(&key_path, &value.span(), e.to_string()))
                            .ok()
                    })
                }
                "action" => {
                    let tables = self.tables(&key_path, value);
                    if tables.as_ref().is_some_and(Vec::is_empty) {
                        self.problem(&key_path, &value.span(), "needs at least one action");
                    }
                    actions = tables.map(|tables| {
                        tables
                            .into_iter()
                            .enumerate()
                            .filter_map(|(i, t)| self.action(&format!("{path}.action[{i}]"), t))
                            .collect::<Vec<_>>()
                    });
                }
                other => self.problem(
                    &key_path,
                    &key.span(),
                    format!(
                        "unknown key `{other}` (expected name, entity, ops, condition, ordered, action)"
                    ),
                ),
            }
        }
        for field in ["name", "entity", "ops", "action"] {
            if !seen.contains(field) {
                self.problem(format!("{path}.{field}"), &table.span(), "is required");
            }
        }
        if self.problems.len() != before {
            return None;
        }
        Some(Observer {
            name: name?,
            entity: entity?,
            ops: ops?,
            condition,
            actions: actions?,
            ordered,
        })
    }

    fn ops(&mut self, path: &str, value: &Spanned<DeValue<'_>>) -> Option<Vec<Op>> {
        let Some(items) = value.get_ref().as_array() else {
            self.problem(
                path,
                &value.span(),
                "must be an array such as [\"insert\", \"update\"]",
            );
            return None;
        };
        let mut ops = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            let parsed = self.string(&item_path, item).map(|s| s.parse::<Op>());
            match parsed {
                Some(Ok(op)) => ops.push(op),
                Some(Err(message)) => self.problem(&item_path, &item.span(), message),
                None => return None,
            }
        }
        if ops.is_empty() {
            self.problem(path, &value.span(), "must name at least one operation");
            return None;
        }
        (ops.len() == items.len()).then_some(ops)
    }

    fn action(&mut self, path: &str, table: &Spanned<DeValue<'_>>) -> Option<Action> {
        let entries: Vec<Entry<'_, '_>> = table
            .get_ref()
            .as_table()
            .map(|t| t.iter().collect())
            .unwrap_or_default();
        let before = self.problems.len();
        let (mut kind, mut retry, mut timeout) = (None, RetryPolicy::default(), DEFAULT_TIMEOUT);
        let mut config = serde_json::Map::new();
        for (key, value) in entries {
            let key_path = format!("{path}.{}", key.get_ref());
            match key.get_ref().as_ref() {
                "kind" => {
                    kind = self.subject_token(&key_path, "an action kind", value);
                    if let Some(name) = &kind
                        && !self.kinds.contains(name)
                    {
                        self.problem(
                            &key_path,
                            &value.span(),
                            format!(
                                "unknown action kind `{name}` (built in: {}; declare a custom \
                                 kind in custom_kinds = [\"{name}\"] at the top of the file)",
                                BUILTIN_ACTION_KINDS.join(", ")
                            ),
                        );
                    }
                }
                "retry" => {
                    if let Some(policy) = self.retry(&key_path, value) {
                        retry = policy;
                    }
                }
                "timeout" => {
                    let parsed = self
                        .string(&key_path, value)
                        .map(|text| humantime_serde::re::humantime::parse_duration(&text));
                    match parsed {
                        Some(Ok(d)) if !d.is_zero() => timeout = d,
                        Some(Ok(_)) => self.problem(&key_path, &value.span(), "must be positive"),
                        Some(Err(e)) => self.problem(
                            &key_path,
                            &value.span(),
                            format!("not a duration such as \"30s\": {e}"),
                        ),
                        None => {}
                    }
                }
                other => {
                    if let Some(json) = self.json(&key_path, value) {
                        config.insert(other.to_owned(), json);
                    }
                }
            }
        }
        if kind.is_none() && self.problems.len() == before {
            self.problem(format!("{path}.kind"), &table.span(), "is required");
        }
        // A built-in kind renders its settings' templates, and a render cannot fail (a missing
        // path renders as nothing), so a template that could never render is refused here. A
        // custom kind's settings are its worker's business.
        if kind
            .as_deref()
            .is_some_and(|k| BUILTIN_ACTION_KINDS.contains(&k))
        {
            for (key, value) in table
                .get_ref()
                .as_table()
                .into_iter()
                .flat_map(|t| t.iter())
            {
                if !matches!(key.get_ref().as_ref(), "kind" | "retry" | "timeout") {
                    self.templates(&format!("{path}.{}", key.get_ref()), value);
                }
            }
        }
        if self.problems.len() != before {
            return None;
        }
        Some(Action {
            kind: kind?,
            config: Json::Object(config),
            retry,
            timeout,
        })
    }

    /// Every string in a setting, checked as a template (`herald_shared::template`).
    fn templates(&mut self, path: &str, value: &Spanned<DeValue<'_>>) {
        match value.get_ref() {
            DeValue::String(text) => {
                for problem in template::problems(text) {
                    self.problem(path, &value.span(), format!("template {problem}"));
                }
            }
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.templates(&format!("{path}[{i}]"), item);
                }
            }
            DeValue::Table(table) => {
                for (key, item) in table.iter() {
                    self.templates(&format!("{path}.{}", key.get_ref()), item);
                }
            }
            _ => {}
        }
    }

    fn retry(&mut self, path: &str, value: &Spanned<DeValue<'_>>) -> Option<RetryPolicy> {
        let json = self.json(path, value)?;
        let policy: RetryPolicy = match serde_json::from_value(json) {
            Ok(p) => p,
            Err(e) => {
                self.problem(path, &value.span(), format!("not a retry policy: {e}"));
                return None;
            }
        };
        let problems = policy.problems(path);
        let table = value.get_ref().as_table();
        for (key, message) in &problems {
            // Point at the offending field's own line when it is written out.
            let field = key.rsplit('.').next().unwrap_or(key);
            let span = table
                .and_then(|t| t.iter().find(|(k, _)| k.get_ref() == field))
                .map_or(value.span(), |(k, _)| k.span());
            self.problem(key.clone(), &span, message.clone());
        }
        problems.is_empty().then_some(policy)
    }

    fn json(&mut self, path: &str, value: &Spanned<DeValue<'_>>) -> Option<Json> {
        Some(match value.get_ref() {
            DeValue::String(s) => Json::String(s.to_string()),
            DeValue::Boolean(b) => Json::Bool(*b),
            DeValue::Datetime(d) => Json::String(d.to_string()),
            DeValue::Integer(i) => {
                let digits = i.as_str().replace('_', "");
                match i64::from_str_radix(&digits, i.radix()) {
                    Ok(n) => Json::from(n),
                    Err(e) => {
                        self.problem(path, &value.span(), format!("integer out of range: {e}"));
                        return None;
                    }
                }
            }
            DeValue::Float(f) => {
                let parsed = f.as_str().replace('_', "").parse::<f64>().ok();
                match parsed.and_then(serde_json::Number::from_f64) {
                    Some(n) => Json::Number(n),
                    None => {
                        self.problem(path, &value.span(), "must be a finite number");
                        return None;
                    }
                }
            }
            DeValue::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    out.push(self.json(&format!("{path}[{i}]"), item)?);
                }
                Json::Array(out)
            }
            DeValue::Table(table) => {
                let mut out = serde_json::Map::new();
                for (key, item) in table.iter() {
                    let json = self.json(&format!("{path}.{}", key.get_ref()), item)?;
                    out.insert(key.get_ref().to_string(), json);
                }
                Json::Object(out)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r##"
[[observer]]
name = "order_shipped"
entity = "Order"
ops = ["update"]
condition = 'changed_to("status", "shipped")'

[[observer.action]]
kind = "webhook"
url = "https://example.test/hook"
headers = { x-team = "ops" }
timeout = "5s"
retry = { max_attempts = 3, initial_delay_ms = 100, max_delay_ms = 1000, multiplier = 2.0, jitter = false }

[[observer.action]]
kind = "slack"
channel = "#orders"

[[observer]]
name = "any_user"
entity = "User"
ops = ["insert", "delete"]

[[observer.action]]
kind = "job"
queue = "default"
"##;

    #[test]
    fn a_valid_file_keeps_kind_settings_as_json_config() {
        let set = ObserverSet::parse(VALID).expect("valid");
        assert_eq!(set.len(), 2);
        let shipped = set.get("order_shipped").expect("declared");
        assert_eq!(shipped.ops, vec![Op::Update]);
        assert!(shipped.condition.is_some());
        let webhook = &shipped.actions[0];
        assert_eq!(webhook.kind, "webhook");
        assert_eq!(
            webhook.config,
            serde_json::json!({"url": "https://example.test/hook", "headers": {"x-team": "ops"}})
        );
        assert_eq!(webhook.timeout, Duration::from_secs(5));
        assert_eq!(webhook.retry.max_attempts, 3);
        assert_eq!(shipped.actions[1].retry, RetryPolicy::default());
        assert_eq!(shipped.actions[1].timeout, DEFAULT_TIMEOUT);
        assert!(set.get("any_user").expect("declared").condition.is_none());
    }

    fn problems(text: &str) -> Vec<Problem> {
        ObserverSet::parse(text).expect_err("invalid")
    }

    #[test]
    fn ordered_is_off_unless_declared_and_must_be_a_boolean() {
        let set = ObserverSet::parse(VALID).expect("valid");
        assert!(set.observers.iter().all(|o| !o.ordered));
        let ordered = VALID.replacen(
            "ops = [\"update\"]",
            "ops = [\"update\"]\nordered = true",
            1,
        );
        let set = ObserverSet::parse(&ordered).expect("valid");
        assert!(set.get("order_shipped").expect("declared").ordered);
        let wrong = VALID.replacen(
            "ops = [\"update\"]",
            "ops = [\"update\"]\nordered = \"yes\"",
            1,
        );
        let found = problems(&wrong);
        assert!(
            found.iter().any(|p| p.key == "observer[0].ordered"
                && p.line == 6
                && p.message.contains("true or false")),
            "{found:#?}"
        );
    }

    #[test]
    fn every_problem_is_named_by_key_and_line_not_only_the_first() {
        let text = r#"[[observer]]
name = "bad.name"
entity = "Order"
ops = ["update", "upsert"]
condition = 'data.status =='

[[observer.action]]
kind = "web hook"
timeout = "soon"
retry = { max_attempts = 0 }

[[observer]]
name = "second"
ops = ["insert"]
colour = "red"

[[observer.action]]
url = "x"
"#;
        let found = problems(text);
        let located: Vec<(&str, usize)> = found.iter().map(|p| (p.key.as_str(), p.line)).collect();
        for expected in [
            ("observer[0].name", 2),
            ("observer[0].ops[1]", 4),
            ("observer[0].condition", 5),
            ("observer[0].action[0].kind", 8),
            ("observer[0].action[0].timeout", 9),
            ("observer[0].action[0].retry.max_attempts", 10),
            ("observer[1].colour", 15),
            ("observer[1].action[0].kind", 17),
        ] {
            assert!(
                located.contains(&expected),
                "{expected:?} missing from {found:#?}"
            );
        }
        assert!(
            found.iter().any(|p| p.key == "observer[1].entity"),
            "missing entity not reported: {found:#?}"
        );
    }

    #[test]
    fn a_template_that_could_never_render_is_refused_at_load_with_its_line() {
        let text = r#"custom_kinds = ["invoice"]

[[observer]]
name = "order_paid"
entity = "Order"
ops = ["update"]

[[observer.action]]
kind = "email"
to = ["{{data.email}}", "{{dat.email}}"]
subject = "Order {{key}} paid"
body = "Hello {{ entity.name }}, order {{key"

[[observer.action]]
kind = "webhook"
url = "https://example.test/hook"
headers = { x-order = "{{ }}" }
body = '{"id": "{{key}}", "was": "{{before.status}}", "first": "{{changed.0}}"}'

[[observer.action]]
kind = "invoice"
note = "{{ its.own.language }}"
"#;
        let mut found = problems(text);
        found.sort_by_key(|p| p.line);
        let located: Vec<(&str, usize)> = found.iter().map(|p| (p.key.as_str(), p.line)).collect();
        assert_eq!(
            located,
            [
                ("observer[0].action[0].to[1]", 10),
                ("observer[0].action[0].body", 12),
                ("observer[0].action[0].body", 12),
                ("observer[0].action[1].headers.x-order", 17),
            ],
            "{found:#?}"
        );
        for (problem, says) in found.iter().zip([
            "no field `dat`",
            "`entity` is a single value",
            "never closed",
            "names no field",
        ]) {
            assert!(problem.message.contains(says), "{problem}");
        }

        let fixed = text
            .replace("{{dat.email}}", "{{data.backup_email}}")
            .replace("{{ entity.name }}", "{{data.name}}")
            .replace("{{key\"", "{{key}}\"")
            .replace("{{ }}", "{{key}}");
        ObserverSet::parse(&fixed).expect("fixed templates load; a custom kind's are its own");
    }

    #[test]
    fn a_misspelt_kind_is_refused_and_custom_kinds_must_be_declared() {
        let text = r#"custom_kinds = ["fax", "webhook", "fax"]

[[observer]]
name = "o"
entity = "Order"
ops = ["insert"]

[[observer.action]]
kind = "webhok"

[[observer.action]]
kind = "fax"

[[observer.action]]
kind = "pager"
"#;
        let found = problems(text);
        let located: Vec<(&str, usize)> = found.iter().map(|p| (p.key.as_str(), p.line)).collect();
        assert!(
            located.contains(&("observer[0].action[0].kind", 9)),
            "{found:#?}"
        );
        assert!(
            located.contains(&("observer[0].action[2].kind", 15)),
            "{found:#?}"
        );
        assert!(located.contains(&("custom_kinds[1]", 1)), "{found:#?}");
        assert!(located.contains(&("custom_kinds[2]", 1)), "{found:#?}");
        assert!(
            !located
                .iter()
                .any(|(k, _)| *k == "observer[0].action[1].kind"),
            "a declared custom kind is accepted: {found:#?}"
        );
        assert!(
            found[..]
                .iter()
                .any(|p| p.message.contains("unknown action kind `webhok`"))
        );

        let declared = ObserverSet::parse(
            "custom_kinds = [\"fax\"]\n[[observer]]\nname = \"o\"\nentity = \"Order\"\nops = [\"insert\"]\n[[observer.action]]\nkind = \"fax\"\n",
        )
        .expect("valid");
        assert_eq!(declared.custom_kinds, ["fax"]);
        assert_eq!(declared.kinds().keys().collect::<Vec<_>>(), ["fax"]);
    }

    #[test]
    fn a_syntax_error_is_refused_with_its_line() {
        let found = problems("[[observer]]\nname = \"a\"\nentity = \n");
        assert_eq!(found[0].line, 3, "{found:?}");
    }

    #[test]
    fn an_observer_declared_twice_is_refused() {
        let text = format!(
            "{VALID}\n{}",
            &VALID[VALID
                .find("[[observer]]\nname = \"any_user\"")
                .expect("present")..]
        );
        let found = problems(&text);
        assert!(
            found.iter().any(|p| p.message.contains("declared twice")),
            "{found:?}"
        );
    }

    #[test]
    fn a_dry_run_lists_matches_and_the_requests_they_would_publish() {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), VALID).expect("write");
        let event = serde_json::json!({
            "id": uuid::Uuid::now_v7(), "entity": "Order", "op": "update", "key": "1",
            "data": {"status": "shipped"}, "before": {"status": "paid"}, "changed": ["status"],
            "at": "2026-01-01T00:00:00Z", "actor": null, "tx": 1, "schema_version": 1
        });
        let run = dry_run(file.path(), &event.to_string()).expect("dry run");
        assert_eq!(run.matched, vec!["order_shipped"]);
        let subjects: Vec<&str> = run.requests.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(
            subjects,
            [
                "herald.actions.webhook.order_shipped",
                "herald.actions.slack.order_shipped"
            ]
        );
        assert!(run.errors.is_empty());
        assert!(matches!(
            dry_run(file.path(), "{\"schema_version\": 7}"),
            Err(DryRunError::Event(_))
        ));
    }

    #[test]
    fn requests_carry_stable_ids_and_the_contract_subject() {
        let set = ObserverSet::parse(VALID).expect("valid");
        let event = EntityEvent {
            id: uuid::Uuid::now_v7(),
            entity: "Order".into(),
            op: Op::Update,
            key: "1".into(),
            data: Some(serde_json::json!({"status": "shipped"})),
            before: Some(serde_json::json!({"status": "paid"})),
            changed: Some(vec!["status".into()]),
            at: Utc::now(),
            actor: None,
            tx: 1,
            schema_version: SCHEMA_VERSION,
        };
        let observer = set.get("order_shipped").expect("declared");
        assert!(
            observer
                .matches(&event, &OnceCell::new())
                .expect("evaluates")
        );
        let requests = observer.requests(&event).expect("valid subjects");
        let summary: Vec<(String, String, u64)> = requests
            .iter()
            .map(|(s, r)| (s.clone(), r.id.clone(), r.timeout_ms))
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "herald.actions.webhook.order_shipped".to_owned(),
                    format!("{}:order_shipped:0", event.id),
                    5_000
                ),
                (
                    "herald.actions.slack.order_shipped".to_owned(),
                    format!("{}:order_shipped:1", event.id),
                    30_000
                ),
            ]
        );
        assert!(
            !set.get("any_user")
                .expect("declared")
                .matches(&event, &OnceCell::new())
                .expect("evaluates")
        );
    }
}
