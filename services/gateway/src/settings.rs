//! The gateway's own settings, under `[service]` in the configuration file
//! (`HERALD_SERVICE__<KEY>` in the environment). Defaults live here, in one place.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use herald_shared::config::{Files, Problems, Validate};
use serde::{Deserialize, Serialize};

use crate::auth::AuthSettings;
use crate::relay::RelaySettings;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    pub database_url: String,
    /// The schema file (TOML) declaring the entities.
    pub schema_file: PathBuf,
    /// Where GraphQL is served (`/graphql`).
    pub listen: SocketAddr,
    /// Connections in GraphQL's pool (the relay has its own, `relay.max_connections`).
    pub max_connections: u32,
    pub limits: Limits,
    pub graphql: GraphqlSettings,
    pub auth: AuthSettings,
    pub relay: RelaySettings,
}

/// What the GraphQL endpoint offers besides queries and mutations.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GraphqlSettings {
    /// Answer `__schema` / `__type` (what GraphiQL, Apollo and codegen read).
    pub introspection: bool,
    /// Serve the GraphiQL page on `/graphiql`.
    pub graphiql: bool,
    /// Automatic persisted queries: documents kept by hash (0 turns them off).
    pub persisted_queries: usize,
    /// Compiled plans kept (`plan.rs`): a query answered once without error is answered
    /// again without the engine, its SQL compiled once per role set (0 turns them off).
    pub compiled_plans: usize,
}

impl Default for GraphqlSettings {
    fn default() -> Self {
        Self {
            introspection: true,
            graphiql: true,
            persisted_queries: 1024,
            compiled_plans: 1024,
        }
    }
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            database_url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            schema_file: PathBuf::from("herald-schema.toml"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_connections: 10,
            limits: Limits::default(),
            graphql: GraphqlSettings::default(),
            auth: AuthSettings::default(),
            relay: RelaySettings::default(),
        }
    }
}

/// What one request may cost.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Deepest nesting of data fields (introspection is not counted).
    pub max_depth: usize,
    /// Most data fields in one operation, after fragments are expanded and repeats merged.
    pub max_complexity: usize,
    /// Most aliased fields in one operation.
    pub max_aliases: usize,
    /// Most directives on one field or fragment.
    pub max_directives: usize,
    /// Rows one operation may fetch: each list counts its `limit` (or `default_limit`) times
    /// the rows of the lists above it.
    pub max_rows: u64,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Every SQL statement a request runs is cancelled after this long.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// Rows a list returns when the query gives no `limit`, and the most it may ask for.
    pub default_limit: u32,
    pub max_limit: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_depth: 10,
            max_complexity: 500,
            max_aliases: 50,
            max_directives: 8,
            max_rows: 100_000,
            max_body_bytes: 256 * 1024,
            statement_timeout: Duration::from_secs(5),
            default_limit: 100,
            max_limit: 1000,
        }
    }
}

impl Validate for Limits {
    fn validate(&self, problems: &mut Problems) {
        for (key, value) in [
            ("max_depth", self.max_depth),
            ("max_complexity", self.max_complexity),
            ("max_aliases", self.max_aliases),
            ("max_directives", self.max_directives),
            ("max_body_bytes", self.max_body_bytes),
        ] {
            if value == 0 {
                problems.push(key, "must be positive");
            }
        }
        if self.max_rows == 0 {
            problems.push("max_rows", "must be positive");
        }
        if self.statement_timeout.as_millis() == 0 {
            problems.push("statement_timeout", "must be at least 1ms");
        }
        if self.default_limit == 0 {
            problems.push("default_limit", "must be positive");
        }
        if self.max_limit < self.default_limit {
            problems.push("max_limit", "must not be below default_limit");
        }
    }
}

impl Validate for GatewaySettings {
    fn validate(&self, problems: &mut Problems) {
        if !(self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://"))
        {
            problems.push("database_url", "must be a postgres:// URL");
        }
        if self.schema_file.as_os_str().is_empty() {
            problems.push("schema_file", "must name the schema file");
        }
        if self.max_connections < 2 {
            problems.push(
                "max_connections",
                "must be at least 2 (the relay holds one while publishing)",
            );
        }
        problems.section("limits", &self.limits);
        problems.section("auth", &self.auth);
        problems.section("relay", &self.relay);
    }

    fn check_files(&self, files: &mut Files) {
        files.loaded(
            "schema_file",
            &self.schema_file,
            crate::schema::SchemaFile::load(&self.schema_file),
        );
        files.section("auth", &self.auth);
    }
}

#[cfg(test)]
mod tests {
    use herald_shared::config::{Problems, Validate};

    use super::*;

    #[test]
    fn the_example_configuration_loads_and_validates() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("herald-gateway.example.toml");
        let no_env: [(&str, &str); 0] = [];
        let config: herald_shared::service::ServiceConfig<GatewaySettings> =
            herald_shared::config::load_with_env(Some(&path), no_env).expect("valid example");
        assert_eq!(config.service.relay.batch_size, 500);
        assert_eq!(config.service.auth.api_keys.len(), 1);
    }

    #[test]
    fn every_bad_setting_is_named() {
        let mut settings = GatewaySettings {
            database_url: "mysql://x".into(),
            max_connections: 1,
            ..Default::default()
        };
        settings.limits.max_depth = 0;
        settings.limits.max_limit = 1;
        settings.auth.jwt_hs256_secret = Some("short".into());
        settings.relay.batch_size = 0;
        let mut problems = Problems::default();
        settings.validate(&mut problems);
        let text = problems.into_result().expect_err("invalid").to_string();
        for key in [
            "database_url",
            "max_connections",
            "limits.max_depth",
            "limits.max_limit",
            "auth.jwt_hs256_secret",
            "relay.batch_size",
        ] {
            assert!(text.contains(key), "{key} missing from: {text}");
        }
    }
}
