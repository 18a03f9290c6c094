//! `--check-config`: what a service would run with, without running it. The file and the
//! environment are loaded and validated exactly as at a real start; then either the effective
//! settings (defaults included) are printed as TOML with every secret masked and the process
//! exits 0, or every bad key is named and it exits 1. Nothing is connected to, so a deployment
//! (compose, a unit file) can be checked where none of its servers run.

use std::path::Path;

use serde::Serialize;

use crate::config::{ConfigError, ENV_PREFIX, Files};

/// What a masked secret prints as.
pub const MASK: &str = "********";

/// Environment variables a service reads besides its `HERALD_<SECTION>__<KEY>` settings: its
/// config file, the log filter, and what the OpenTelemetry SDK and OTLP exporter honour for
/// traces (not `OTEL_SERVICE_NAME`: each service names itself).
pub const OTHER_ENVIRONMENT: [&str; 25] = [
    "HERALD_CONFIG",
    "RUST_LOG",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_INSECURE",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_INSECURE",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_BSP_EXPORT_TIMEOUT",
    "OTEL_BSP_MAX_CONCURRENT_EXPORTS",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_SPAN_EVENT_COUNT_LIMIT",
    "OTEL_SPAN_LINK_COUNT_LIMIT",
];

/// Prefixes of variables meant for a Herald service; one of these that nothing reads is named,
/// since it is most likely a misspelt setting (`HERALD_NATS_URL` for `HERALD_NATS__URL`).
const OURS: [&str; 2] = [ENV_PREFIX, "OTEL_"];

/// Setting names whose values are secrets, wherever they appear.
const SECRET_WORDS: [&str; 4] = ["password", "secret", "token", "private_key"];

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("the effective settings cannot be printed as TOML: {0}")]
    Render(#[from] toml::ser::Error),
}

/// Prints the outcome of a configuration load for `--check-config` and exits: 0 with the
/// effective settings when `loaded` is valid and every file it names (`files`, checked when it
/// loaded) loads, 1 with every bad key, a bad file's key included, when not.
pub fn report_and_exit<T: Serialize>(
    file: Option<&Path>,
    loaded: &Result<T, ConfigError>,
    files: Option<Files>,
) -> ! {
    let service = std::env::args_os()
        .next()
        .and_then(|arg0| {
            Path::new(&arg0)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "service".into());
    let settings = match loaded {
        Ok(config) => effective_settings(config),
        Err(invalid) => {
            eprintln!("{service} --check-config: {invalid}");
            std::process::exit(1);
        }
    };
    let files = files.unwrap_or_default();
    let checked = files.checked.clone();
    if let Err(invalid) = files.problems.into_result() {
        eprintln!("{service} --check-config: a file the settings name is bad: {invalid}");
        std::process::exit(1);
    }
    match settings {
        Ok(settings) => {
            let environment = Environment::of(std::env::vars());
            println!("# {service} --check-config: the configuration is valid.");
            match file {
                Some(file) => println!("# file: {}", file.display()),
                None => println!("# file: none (defaults and environment only)"),
            }
            let read = if environment.read.is_empty() {
                "none".to_owned()
            } else {
                environment.read.join(", ")
            };
            println!("# environment read: {read}");
            for (key, path) in &checked {
                println!("# file loaded: {key} = {}", path.display());
            }
            if !environment.unread.is_empty() {
                println!("# environment not read: {}", environment.unread.join(", "));
            }
            println!("# Secrets print as {MASK}.\n\n{settings}");
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("{service} --check-config: {e}");
            std::process::exit(1);
        }
    }
}

/// Which of the given variables a service reads, and which of those meant for it it does not.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Environment {
    pub read: Vec<String>,
    pub unread: Vec<String>,
}

impl Environment {
    pub fn of(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut environment = Self::default();
        for (name, _) in vars {
            let setting = name
                .strip_prefix(ENV_PREFIX)
                .is_some_and(|key| key.contains("__"));
            if setting || OTHER_ENVIRONMENT.contains(&name.as_str()) {
                environment.read.push(name);
            } else if OURS.iter().any(|prefix| name.starts_with(prefix)) {
                environment.unread.push(name);
            }
        }
        environment.read.sort();
        environment.unread.sort();
        environment
    }
}

/// `config` as TOML, with secrets masked: the values of keys named like a secret, the keys of
/// API-key tables (the keys are the secrets there), and the passwords inside URLs.
pub fn effective_settings<T: Serialize>(config: &T) -> Result<String, CheckError> {
    let mut value = toml::Value::try_from(config)?;
    mask(&mut value);
    Ok(toml::to_string(&value)?)
}

fn mask(value: &mut toml::Value) {
    match value {
        toml::Value::Table(table) => {
            for (key, value) in table.iter_mut() {
                let key = key.to_ascii_lowercase();
                if key.contains("api_key") {
                    mask_keyed(value);
                } else if SECRET_WORDS.iter().any(|word| key.contains(word)) {
                    mask_all(value);
                } else {
                    mask(value);
                }
            }
        }
        toml::Value::Array(values) => values.iter_mut().for_each(mask),
        toml::Value::String(text) => {
            if let Some(masked) = without_url_passwords(text) {
                *text = masked;
            }
        }
        _ => {}
    }
}

/// A table whose keys are secrets shows only how many there are.
fn mask_keyed(value: &mut toml::Value) {
    match value {
        toml::Value::Table(table) => {
            *value = toml::Value::String(format!("{MASK} ({} keys)", table.len()));
        }
        other => mask_all(other),
    }
}

/// Every leaf masked; table keys (observer names, say) stay readable.
fn mask_all(value: &mut toml::Value) {
    match value {
        toml::Value::Table(table) => table.iter_mut().for_each(|(_, v)| mask_all(v)),
        toml::Value::Array(values) => values.iter_mut().for_each(mask_all),
        other => *other = toml::Value::String(MASK.into()),
    }
}

/// The text with the password of every URL in it (comma-separated, as in a NATS cluster list)
/// masked, or `None` when it holds none.
fn without_url_passwords(text: &str) -> Option<String> {
    let parts: Vec<Option<String>> = text.split(',').map(without_url_password).collect();
    if parts.iter().all(Option::is_none) {
        return None;
    }
    Some(
        text.split(',')
            .zip(parts)
            .map(|(part, masked)| masked.unwrap_or_else(|| part.to_owned()))
            .collect::<Vec<_>>()
            .join(","),
    )
}

fn without_url_password(url: &str) -> Option<String> {
    let authority_start = url.find("://")? + 3;
    let rest = &url[authority_start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    let colon = rest[..at].find(':')?;
    if colon + 1 == at {
        return None;
    }
    Some(format!(
        "{}{}:{MASK}{}",
        &url[..authority_start],
        &rest[..colon],
        &rest[at..]
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[derive(Serialize)]
    struct Sample {
        nats: Nats,
        service: Service,
    }

    #[derive(Serialize)]
    struct Nats {
        url: String,
        user: Option<String>,
        password: Option<String>,
    }

    #[derive(Serialize)]
    struct Service {
        database_url: String,
        redis_url: String,
        jwt_hs256_secret: Option<String>,
        api_keys: BTreeMap<String, String>,
        webhook_secrets: BTreeMap<String, String>,
        listen: String,
    }

    fn sample() -> Sample {
        Sample {
            nats: Nats {
                url: "nats://a:4222,nats://u:nats-pw@b:4222".into(),
                user: Some("gateway".into()),
                password: Some("gateway-pw".into()),
            },
            service: Service {
                database_url: "postgres://postgres:db-pw@db:5432/herald".into(),
                redis_url: "redis://:redis-pw@redis:6379/0".into(),
                jwt_hs256_secret: Some("jwt-secret-value".into()),
                api_keys: BTreeMap::from([("the-api-key-itself".into(), "shop".into())]),
                webhook_secrets: BTreeMap::from([("order_created".into(), "whsec_x".into())]),
                listen: "0.0.0.0:8080".into(),
            },
        }
    }

    #[test]
    fn no_secret_survives_and_everything_else_does() {
        let text = effective_settings(&sample()).expect("renders");
        for secret in [
            "nats-pw",
            "gateway-pw",
            "db-pw",
            "redis-pw",
            "jwt-secret-value",
            "the-api-key-itself",
            "whsec_x",
        ] {
            assert!(!text.contains(secret), "{secret} leaked:\n{text}");
        }
        for kept in [
            "nats://a:4222,nats://u:********@b:4222",
            "user = \"gateway\"",
            "postgres://postgres:********@db:5432/herald",
            "redis://:********@redis:6379/0",
            "order_created = \"********\"",
            "api_keys = \"******** (1 keys)\"",
            "listen = \"0.0.0.0:8080\"",
        ] {
            assert!(text.contains(kept), "{kept} missing from:\n{text}");
        }
    }

    #[test]
    fn the_output_is_toml_that_reads_back() {
        let text = effective_settings(&sample()).expect("renders");
        let back: toml::Table = toml::from_str(&text).expect("TOML");
        assert_eq!(back["service"]["listen"].as_str(), Some("0.0.0.0:8080"));
    }

    #[test]
    fn a_url_without_a_password_is_left_alone() {
        for url in [
            "postgres://postgres@db/herald",
            "nats://127.0.0.1:4222",
            "redis://:@r",
            "https://example.com/a@b:c",
        ] {
            assert_eq!(without_url_passwords(url), None, "{url}");
        }
    }

    #[test]
    fn variables_meant_for_herald_that_nothing_reads_are_named() {
        let vars = [
            ("HERALD_NATS__URL", "nats://x:1"),
            ("HERALD_NATS_URL", "nats://x:1"),
            ("HERALD_CONFIG", "/etc/x.toml"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://jaeger:4317"),
            ("OTEL_TRACES_SAMPLER", "always_on"),
            ("OTEL_SERVICE_NAME", "renamed"),
            ("PATH", "/bin"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let environment = Environment::of(vars);
        assert_eq!(
            environment.read,
            [
                "HERALD_CONFIG",
                "HERALD_NATS__URL",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "OTEL_TRACES_SAMPLER"
            ]
        );
        assert_eq!(environment.unread, ["HERALD_NATS_URL", "OTEL_SERVICE_NAME"]);
    }
}
