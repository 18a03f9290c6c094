//! The flight-streamer's own settings, under `[service]` in the configuration file
//! (`HERALD_SERVICE__<KEY>` in the environment). Defaults live here, in one place.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use herald_shared::config::{Files, Problems, Validate};
use serde::{Deserialize, Serialize};

/// The gRPC message limit tonic applies by default on both ends (4 MiB).
pub const GRPC_DEFAULT_LIMIT: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlightSettings {
    /// Where Arrow Flight (gRPC) is served.
    pub listen: SocketAddr,
    /// The database the exports read (the gateway's).
    pub database_url: String,
    /// The gateway's schema file: which entities and tables exist, and their columns.
    pub schema_file: PathBuf,
    /// Connections in the export pool; each running export holds one.
    pub max_connections: u32,
    /// The bearer token every RPC but Handshake must carry (`authorization: Bearer <token>`).
    pub token: String,
    /// Most rows in one record batch.
    pub batch_rows: usize,
    /// A batch is sent once its values reach about this many bytes.
    pub batch_bytes: usize,
    /// Largest Flight message sent. A batch above it is split; a single row above it ends its
    /// stream with an error. Keep it at or below the clients' decode limit (tonic: 4 MiB).
    pub max_message_bytes: usize,
    /// Record batches queued per stream between the reader and the client. A slow client fills
    /// the queue and then slows the reader; memory per stream stays bounded by it.
    pub queued_batches: usize,
    /// In follow mode, a partial batch is sent after this long without a new event.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// In follow mode, an empty batch is sent after this long without any event, so proxies
    /// and clients see a live stream.
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
    /// Serve TLS with this certificate and key (PEM files); plain gRPC when absent.
    pub tls: Option<TlsSettings>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Default for FlightSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            database_url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            schema_file: PathBuf::from("herald-schema.toml"),
            max_connections: 8,
            token: String::new(),
            batch_rows: 65_536,
            batch_bytes: 2 * 1024 * 1024,
            max_message_bytes: GRPC_DEFAULT_LIMIT - 64 * 1024,
            queued_batches: 2,
            linger: Duration::from_millis(50),
            keepalive: Duration::from_secs(10),
            tls: None,
        }
    }
}

impl Validate for FlightSettings {
    fn validate(&self, problems: &mut Problems) {
        if !(self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://"))
        {
            problems.push("database_url", "must be a postgres:// URL");
        }
        if self.schema_file.as_os_str().is_empty() {
            problems.push("schema_file", "must name the gateway's schema file");
        }
        if self.max_connections == 0 {
            problems.push("max_connections", "must be positive");
        }
        if self.token.len() < 16 {
            problems.push("token", "must be set, at least 16 characters");
        }
        if self.batch_rows == 0 {
            problems.push("batch_rows", "must be positive");
        }
        if self.batch_bytes == 0 {
            problems.push("batch_bytes", "must be positive");
        }
        if self.max_message_bytes < 64 * 1024 {
            problems.push("max_message_bytes", "must be at least 64 KiB");
        }
        if self.queued_batches == 0 {
            problems.push("queued_batches", "must be positive");
        }
        if self.linger.is_zero() {
            problems.push("linger", "must be at least 1ms");
        }
        if self.keepalive < self.linger {
            problems.push("keepalive", "must not be shorter than linger");
        }
        if let Some(tls) = &self.tls {
            for (key, path) in [
                ("tls.cert_file", &tls.cert_file),
                ("tls.key_file", &tls.key_file),
            ] {
                if !path.is_file() {
                    problems.push(key, format!("{} is not a readable file", path.display()));
                }
            }
        }
    }

    fn check_files(&self, files: &mut Files) {
        files.loaded(
            "schema_file",
            &self.schema_file,
            herald_gateway::schema::SchemaFile::load(&self.schema_file),
        );
        if let Some(tls) = &self.tls {
            files.loaded("tls.cert_file", &tls.cert_file, crate::server_builder(self));
        }
    }
}

#[cfg(test)]
mod tests {
    use herald_shared::config::{Problems, Validate};

    use super::*;

    #[test]
    fn the_example_configuration_loads_and_validates() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/dev/flight-streamer.toml");
        let no_env: [(&str, &str); 0] = [];
        let config: herald_shared::service::ServiceConfig<FlightSettings> =
            herald_shared::config::load_with_env(Some(&path), no_env).expect("valid example");
        assert_eq!(config.service.listen.port(), 50051);
    }

    #[test]
    fn every_bad_setting_is_named() {
        let settings = FlightSettings {
            database_url: "mysql://x".into(),
            token: "short".into(),
            batch_rows: 0,
            max_message_bytes: 10,
            keepalive: Duration::from_millis(1),
            tls: Some(TlsSettings {
                cert_file: "/nonexistent/cert.pem".into(),
                key_file: "/nonexistent/key.pem".into(),
            }),
            ..Default::default()
        };
        let mut problems = Problems::default();
        settings.validate(&mut problems);
        let text = problems.into_result().expect_err("invalid").to_string();
        for key in [
            "database_url",
            "token",
            "batch_rows",
            "max_message_bytes",
            "keepalive",
            "tls.cert_file",
            "tls.key_file",
        ] {
            assert!(text.contains(key), "{key} missing from: {text}");
        }
    }
}
