//! What every service binary shares around its own logic: the command line (`--config`,
//! `--check-config`), the config sections every service has, and the start-up sequence config → telemetry → connect →
//! streams → admin server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use backon::Retryable;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Readiness};
use crate::config::{
    AdminConfig, Files, NatsConfig, Problems, StreamsConfig, TelemetryConfig, Validate,
};
use crate::nats::{self, Nats};
use crate::streams::{self, StreamSpec};

/// The command line every service accepts.
#[derive(Debug, Clone, clap::Parser)]
pub struct ServiceArgs {
    /// TOML configuration file; `HERALD_<SECTION>__<KEY>` variables override it.
    #[arg(long, env = "HERALD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Load and validate the configuration, print the effective settings (secrets masked) and
    /// exit 0, or name every bad key and exit 1. Connects to nothing.
    #[arg(long)]
    pub check_config: bool,
}

/// A service's whole configuration: the sections every service has, plus its own settings
/// under `[service]`. One shape for every binary, so one loader, one set of environment names
/// (`HERALD_NATS__URL`, `HERALD_SERVICE__DATABASE_URL`) and one validation path.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig<S> {
    pub nats: NatsConfig,
    pub admin: AdminConfig,
    pub telemetry: TelemetryConfig,
    pub streams: StreamsConfig,
    pub service: S,
}

impl<S: Validate> Validate for ServiceConfig<S> {
    fn validate(&self, problems: &mut Problems) {
        problems.section("nats", &self.nats);
        problems.section("admin", &self.admin);
        problems.section("telemetry", &self.telemetry);
        problems.section("streams", &self.streams);
        problems.section("service", &self.service);
    }

    fn check_files(&self, files: &mut Files) {
        files.section("service", &self.service);
    }
}

impl<S: DeserializeOwned + Serialize + Validate + Default> ServiceConfig<S> {
    /// Loads the file named on the command line (if any) with environment overrides. With
    /// `--check-config` it also loads the files the settings name, reports the result and exits
    /// instead of returning.
    ///
    /// Every service starts here, so the process's TLS crypto provider is installed here too.
    pub fn load(args: &ServiceArgs) -> Result<Self, crate::config::ConfigError> {
        crate::tls::install_crypto_provider();
        let loaded: Result<Self, _> = crate::config::load(args.config.as_deref());
        if args.check_config {
            let files = loaded.as_ref().ok().map(|config: &Self| {
                let mut files = Files::default();
                config.check_files(&mut files);
                files
            });
            crate::check_config::report_and_exit(args.config.as_deref(), &loaded, files);
        }
        loaded
    }
}

/// Settings for a service that has none of its own yet.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoSettings {}

impl Validate for NoSettings {
    fn validate(&self, _: &mut Problems) {}
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Connect(#[from] nats::ConnectError),
    #[error(transparent)]
    Streams(#[from] streams::ProvisionError),
    #[error("cannot bind the admin server: {0}")]
    Admin(#[from] std::io::Error),
}

/// Connects to NATS and makes sure the streams this service touches exist. Provisioning is
/// asked again, for up to `PROVISION_PATIENCE`, while JetStream is only in flux (a cluster
/// node lost, a leader being elected); a configuration JetStream refuses ends the start at once.
pub async fn connect<S>(
    common: &ServiceConfig<S>,
    service: &str,
    touches: &[StreamSpec],
) -> Result<Nats, StartError> {
    let nats = nats::connect(&common.nats, service).await?;
    let backoff = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_total_delay(Some(PROVISION_PATIENCE))
        .without_max_times()
        .with_jitter();
    (|| streams::ensure(&nats.jetstream, &common.streams, touches))
        .retry(backoff)
        .when(streams::ProvisionError::is_transient)
        .notify(|e, delay| tracing::warn!(error = %e, ?delay, "cannot provision the streams yet; trying again"))
        .await?;
    Ok(nats)
}

/// How long a starting service keeps asking JetStream to provision its streams.
pub const PROVISION_PATIENCE: Duration = Duration::from_secs(120);

/// Starts the admin server with the given readiness checks.
pub async fn admin<S>(
    common: &ServiceConfig<S>,
    readiness: Readiness,
    shutdown: &CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>), StartError> {
    Ok(admin::serve(common.admin.listen, readiness, shutdown.child_token()).await?)
}
