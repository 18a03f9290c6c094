//! Configuration: a TOML file (`--config`) overlaid by environment variables, then validated.
//!
//! An environment variable `HERALD_<SECTION>__<KEY>` overrides `<section>.<key>` of the file
//! (`HERALD_NATS__URL` → `nats.url`). Each service's config type denies unknown keys, so a typo
//! is an error rather than a silently ignored setting, and `Validate` reports every bad key at
//! once, each by its full dotted name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Toml};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::subjects::{ACTIONS_STREAM, DLQ_STREAM, EVENTS_STREAM, JOBS_STREAM, OUTCOMES_STREAM};

pub const ENV_PREFIX: &str = "HERALD_";

/// One problem with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("configuration: {0}")]
    Parse(String),
    #[error("configuration is invalid:\n{}", render(.0))]
    Invalid(Vec<Problem>),
}

fn render(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {}: {}", p.key, p.message))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Semantic checks beyond what the types enforce. Push a problem for every bad key; never stop
/// at the first.
pub trait Validate {
    fn validate(&self, problems: &mut Problems);

    /// Loads every file these settings name that the service reads at start (an observers file,
    /// a schema file, keys, certificates), with the loader the start uses, and pushes a problem
    /// under the setting's key for each bad one. Only `--check-config` calls it: a real start
    /// loads the files itself and refuses the same way.
    fn check_files(&self, _files: &mut Files) {}
}

/// The files `Validate::check_files` loaded, and what was wrong with them.
#[derive(Debug, Default)]
pub struct Files {
    /// Each file loaded: the setting's full key and the path, in order.
    pub checked: Vec<(String, PathBuf)>,
    pub problems: Problems,
}

impl Files {
    /// Records that the file `path`, named by `key`, was loaded, and its problems if `loaded`
    /// failed. One problem per line of the error, so each names the key.
    pub fn loaded<T, E: std::fmt::Display>(
        &mut self,
        key: &str,
        path: &Path,
        loaded: Result<T, E>,
    ) -> Option<T> {
        let mut full = self.problems.prefix.join(".");
        if !full.is_empty() {
            full.push('.');
        }
        full.push_str(key);
        self.checked.push((full, path.to_owned()));
        match loaded {
            Ok(value) => Some(value),
            Err(e) => {
                self.problems.push(key, e.to_string());
                None
            }
        }
    }

    /// Checks `section`'s files with every key prefixed by `name.`.
    pub fn section(&mut self, name: &str, section: &impl Validate) {
        self.problems.prefix.push(name.to_owned());
        section.check_files(self);
        self.problems.prefix.pop();
    }
}

/// Collects problems, with a key prefix for nested sections.
#[derive(Debug, Default)]
pub struct Problems {
    prefix: Vec<String>,
    found: Vec<Problem>,
}

impl Problems {
    pub fn push(&mut self, key: &str, message: impl Into<String>) {
        let mut full = self.prefix.join(".");
        if !full.is_empty() {
            full.push('.');
        }
        full.push_str(key);
        self.found.push(Problem {
            key: full,
            message: message.into(),
        });
    }

    /// Validates `section` with every key it reports prefixed by `name.`.
    pub fn section(&mut self, name: &str, section: &impl Validate) {
        self.prefix.push(name.to_owned());
        section.validate(self);
        self.prefix.pop();
    }

    pub fn into_result(self) -> Result<(), ConfigError> {
        if self.found.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(self.found))
        }
    }
}

/// Loads `T` from the optional file and the process environment, then validates it.
pub fn load<T: DeserializeOwned + Validate>(file: Option<&Path>) -> Result<T, ConfigError> {
    load_with_env(file, std::env::vars())
}

/// Like `load`, with the environment given explicitly (tests pass their own).
///
/// Only `HERALD_<SECTION>__<KEY>` variables are read as overrides: a variable without `__`
/// (`HERALD_CONFIG`, `HERALD_TEST_*`) is not a setting.
pub fn load_with_env<T, I, K, V>(file: Option<&Path>, env: I) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Validate,
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let mut figment = Figment::new();
    if let Some(path) = file {
        figment = figment.merge(file_provider(path)?);
    }
    for (name, value) in env {
        let Some(key) = name.as_ref().strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if !key.contains("__") {
            continue;
        }
        let dotted = key.to_ascii_lowercase().replace("__", ".");
        // Typed the way figment types real environment variables: numbers, booleans, arrays.
        let value: figment::value::Value = value
            .as_ref()
            .parse()
            .unwrap_or_else(|_| value.as_ref().to_owned().into());
        figment = figment.merge(figment::providers::Serialized::default(&dotted, value));
    }
    extract(figment)
}

fn file_provider(path: &Path) -> Result<figment::providers::Data<Toml>, ConfigError> {
    if !path.is_file() {
        return Err(ConfigError::File {
            path: path.to_owned(),
            message: "no such file".into(),
        });
    }
    Ok(Toml::file_exact(path))
}

fn extract<T: DeserializeOwned + Validate>(figment: Figment) -> Result<T, ConfigError> {
    let config: T = match figment.extract() {
        Ok(config) => config,
        Err(first) => return Err(every_bad_key::<T>(&figment, first)),
    };
    let mut problems = Problems::default();
    config.validate(&mut problems);
    problems.into_result()?;
    Ok(config)
}

/// How many bad keys one refusal names at most: a bound on the loop below, far above any real
/// configuration's mistakes.
const MOST_PROBLEMS: usize = 64;

/// Names every key serde refuses, not only the first: serde stops at the first problem, so each
/// refused key is taken out of the merged settings (its default then stands in) and the rest is
/// tried again. When what is left deserializes, its semantic problems are named too.
fn every_bad_key<T: DeserializeOwned + Validate>(
    figment: &Figment,
    first: figment::Error,
) -> ConfigError {
    let Ok(mut merged) = figment.extract::<figment::value::Value>() else {
        return ConfigError::Parse(first.to_string());
    };
    let mut problems = Problems::default();
    for _ in 0..MOST_PROBLEMS {
        let error = match T::deserialize(&merged) {
            Ok(rest) => {
                rest.validate(&mut problems);
                break;
            }
            Err(error) => error,
        };
        let mut key = error.path.clone();
        if let figment::error::Kind::MissingField(field) = &error.kind {
            key.push(field.to_string());
        }
        problems.push(&key.join("."), error.kind.to_string());
        if error.missing() || !remove(&mut merged, &error.path) {
            break;
        }
    }
    match problems.into_result() {
        Err(invalid) => invalid,
        Ok(()) => ConfigError::Parse(first.to_string()),
    }
}

/// Removes the value at `path`; false when there is none (nothing left to try).
fn remove(value: &mut figment::value::Value, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut current = value;
    for key in parents {
        match current {
            figment::value::Value::Dict(_, dict) => match dict.get_mut(key) {
                Some(next) => current = next,
                None => return false,
            },
            _ => return false,
        }
    }
    match current {
        figment::value::Value::Dict(_, dict) => dict.remove(last).is_some(),
        _ => false,
    }
}

/// How to reach NATS. One user per service (see `nats/auth.conf`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    pub url: String,
    pub user: Option<String>,
    pub password: Option<String>,
    /// How long a JetStream request (publish ack, consumer call) may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            user: None,
            password: None,
            request_timeout: Duration::from_secs(5),
        }
    }
}

impl NatsConfig {
    /// The servers in `url`, one per comma-separated entry: async-nats takes a list, never a
    /// comma-separated string, and a cluster is reached (and failed over) through all of them.
    pub fn servers(&self) -> Vec<&str> {
        self.url.split(',').map(str::trim).collect()
    }
}

impl Validate for NatsConfig {
    fn validate(&self, problems: &mut Problems) {
        if !self
            .url
            .split(',')
            .all(|u| u.starts_with("nats://") || u.starts_with("tls://"))
        {
            problems.push(
                "url",
                "must be nats://host:port (comma-separated for a cluster)",
            );
        }
        if self.user.is_some() != self.password.is_some() {
            problems.push("password", "user and password go together");
        }
        if self.request_timeout.is_zero() {
            problems.push("request_timeout", "must be positive");
        }
    }
}

/// The admin HTTP server: `/health`, `/ready`, `/metrics`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

impl Validate for AdminConfig {
    fn validate(&self, _: &mut Problems) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// A `tracing` filter, e.g. `info,herald_dispatcher=debug`. `RUST_LOG` wins when set.
    pub log_level: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Json,
            log_level: "info".into(),
        }
    }
}

impl Validate for TelemetryConfig {
    fn validate(&self, problems: &mut Problems) {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            problems.push("log_level", format!("not a valid filter: {e}"));
        }
    }
}

/// Retention of one stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamLimits {
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// -1 for no limit.
    pub max_bytes: i64,
}

/// How the five streams are provisioned. Every service provisions (idempotently) the streams it
/// touches, so the stack starts in any order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamsConfig {
    pub replicas: usize,
    /// Partitions of HERALD_EVENTS: the stream appends `partition(N)` of entity and key to
    /// every keyed event's subject, and each partition is dispatched by one dispatcher at a
    /// time. Every service must agree on it (each provisions the stream); changing it means
    /// draining the dispatchers first (README, "Scale out").
    pub event_partitions: u32,
    /// How long JetStream remembers a Nats-Msg-Id. Redelivery after a crash must land within it
    /// for the repeat to be absorbed.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    pub events: StreamLimits,
    pub actions: StreamLimits,
    pub outcomes: StreamLimits,
    pub jobs: StreamLimits,
    pub dlq: StreamLimits,
}

const DAY: Duration = Duration::from_secs(24 * 3600);

impl Default for StreamsConfig {
    fn default() -> Self {
        let limits = |days: u64| StreamLimits {
            max_age: DAY * days as u32,
            max_bytes: -1,
        };
        Self {
            replicas: 1,
            event_partitions: 1,
            duplicate_window: Duration::from_secs(2 * 3600),
            events: limits(30),
            actions: limits(7),
            outcomes: limits(7),
            jobs: limits(7),
            dlq: limits(90),
        }
    }
}

impl StreamsConfig {
    pub fn limits(&self, stream: &str) -> &StreamLimits {
        match stream {
            EVENTS_STREAM => &self.events,
            ACTIONS_STREAM => &self.actions,
            OUTCOMES_STREAM => &self.outcomes,
            JOBS_STREAM => &self.jobs,
            DLQ_STREAM => &self.dlq,
            _ => &self.events,
        }
    }
}

impl Validate for StreamsConfig {
    fn validate(&self, problems: &mut Problems) {
        if !(1..=5).contains(&self.replicas) {
            problems.push("replicas", "must be between 1 and 5");
        }
        if !(1..=1024).contains(&self.event_partitions) {
            problems.push("event_partitions", "must be between 1 and 1024");
        }
        if self.duplicate_window.is_zero() {
            problems.push("duplicate_window", "must be positive");
        }
        for (name, limits) in [
            ("events", &self.events),
            ("actions", &self.actions),
            ("outcomes", &self.outcomes),
            ("jobs", &self.jobs),
            ("dlq", &self.dlq),
        ] {
            if !limits.max_age.is_zero() && limits.max_age < self.duplicate_window {
                problems.push(
                    &format!("{name}.max_age"),
                    "must be 0 (forever) or at least duplicate_window",
                );
            }
            if limits.max_bytes == 0 || limits.max_bytes < -1 {
                problems.push(
                    &format!("{name}.max_bytes"),
                    "must be -1 (no limit) or positive",
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        #[serde(default)]
        nats: NatsConfig,
        #[serde(default)]
        streams: StreamsConfig,
    }

    impl Validate for Sample {
        fn validate(&self, problems: &mut Problems) {
            problems.section("nats", &self.nats);
            problems.section("streams", &self.streams);
        }
    }

    const NO_ENV: [(&str, &str); 0] = [];

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), text).expect("write");
        file
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let file = write("[nats]\nurl = \"nats://file:4222\"\n");
        let config: Sample =
            load_with_env(Some(file.path()), [("HERALD_NATS__URL", "nats://env:4222")])
                .expect("valid");
        assert_eq!(config.nats.url, "nats://env:4222");
    }

    #[test]
    fn every_bad_key_is_named_not_only_the_first() {
        let file = write(
            "[nats]\nurl = \"http://x\"\nuser = \"a\"\n[streams]\nreplicas = 9\nduplicate_window = \"0s\"\n",
        );
        let err = load_with_env::<Sample, _, _, _>(Some(file.path()), NO_ENV).expect_err("invalid");
        let text = err.to_string();
        for key in [
            "nats.url",
            "nats.password",
            "streams.replicas",
            "streams.duplicate_window",
        ] {
            assert!(text.contains(key), "{key} missing from: {text}");
        }
    }

    #[test]
    fn an_unknown_key_is_an_error_that_names_it() {
        let file = write("[nats]\nurll = \"nats://x:1\"\n");
        let err =
            load_with_env::<Sample, _, _, _>(Some(file.path()), NO_ENV).expect_err("unknown key");
        assert!(err.to_string().contains("urll"), "{err}");
    }

    #[test]
    fn every_key_serde_refuses_is_named_with_the_semantic_problems() {
        let file = write(
            "[nats]\nurll = \"nats://x:1\"\nrequest_timeout = \"soon\"\n[streams]\nreplicas = 9\n",
        );
        let err = load_with_env::<Sample, _, _, _>(
            Some(file.path()),
            [("HERALD_STREAMS__COLOUR", "blue")],
        )
        .expect_err("invalid");
        let text = err.to_string();
        for key in [
            "nats.urll",
            "nats.request_timeout",
            "streams.colour",
            "streams.replicas",
        ] {
            assert!(text.contains(key), "{key} missing from: {text}");
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = load_with_env::<Sample, _, _, _>(Some(Path::new("/no/such/herald.toml")), NO_ENV)
            .expect_err("missing");
        assert!(err.to_string().contains("/no/such/herald.toml"), "{err}");
    }
}
