//! How the CLI reaches NATS, and with which stream settings.
//!
//! The settings are the `[nats]` and `[streams]` sections every Herald service reads, loaded the
//! same way (a TOML file, `HERALD_NATS__*` / `HERALD_STREAMS__*` variables over it), so
//! `herald streams init` provisions exactly what the services would. Command-line flags win over
//! both. Only those two sections are read from the environment: an operator's shell may well
//! hold a service's `HERALD_SERVICE__*` variables, which are none of the CLI's business.
//!
//! Unlike a service, the CLI does not retry an unreachable server: an operator wants to hear at
//! once that NATS is down.

use std::path::PathBuf;

use async_nats::{Event, ServerError, jetstream};
use herald_shared::config::{self, ConfigError, NatsConfig, Problems, StreamsConfig, Validate};
use herald_shared::nats::{self, Nats};
use serde::Deserialize;

const CONNECTION_NAME: &str = "herald-cli";
const SECTIONS_FROM_ENV: [&str; 2] = ["HERALD_NATS__", "HERALD_STREAMS__"];

#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionArgs {
    /// TOML file with `[nats]` and `[streams]` sections; HERALD_NATS__* and HERALD_STREAMS__*
    /// variables override it.
    #[arg(long, env = "HERALD_CLI_CONFIG", global = true)]
    pub config: Option<PathBuf>,

    /// NATS URL (comma-separated for a cluster). Default: HERALD_NATS__URL, the file, then
    /// nats://127.0.0.1:4222.
    #[arg(long, global = true)]
    pub nats_url: Option<String>,

    /// NATS user (the `cli` user of nats/auth.conf). Default: HERALD_NATS__USER.
    #[arg(long, global = true)]
    pub user: Option<String>,

    /// NATS password. Default: HERALD_NATS__PASSWORD.
    #[arg(long, global = true)]
    pub password: Option<String>,
}

/// What the CLI reads from configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CliConfig {
    pub nats: NatsConfig,
    pub streams: StreamsConfig,
}

impl Validate for CliConfig {
    fn validate(&self, problems: &mut Problems) {
        problems.section("nats", &self.nats);
        problems.section("streams", &self.streams);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
}

impl ConnectionArgs {
    /// The configuration from the file, the environment and the flags, in rising precedence.
    pub fn load(&self) -> Result<CliConfig, ConfigError> {
        let from_env = std::env::vars().filter(|(name, _)| {
            SECTIONS_FROM_ENV
                .iter()
                .any(|prefix| name.starts_with(prefix))
        });
        let mut config: CliConfig = config::load_with_env(self.config.as_deref(), from_env)?;
        // Flags are set as given, not parsed like environment values: a password such as `123`
        // or `[x]` must stay a string.
        if let Some(url) = &self.nats_url {
            config.nats.url = url.clone();
        }
        if let Some(user) = &self.user {
            config.nats.user = Some(user.clone());
        }
        if let Some(password) = &self.password {
            config.nats.password = Some(password.clone());
        }
        let mut problems = Problems::default();
        config.validate(&mut problems);
        problems.into_result()?;
        Ok(config)
    }
}

/// A connection, its JetStream context, and the stream settings the commands use.
pub struct Session {
    pub nats: Nats,
    pub config: CliConfig,
}

impl Session {
    pub async fn open(args: &ConnectionArgs) -> Result<Self, ConnectionError> {
        let config = args.load()?;
        let nats = connect(&config.nats).await?;
        Ok(Self { nats, config })
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.nats.jetstream
    }
}

async fn connect(config: &NatsConfig) -> Result<Nats, ConnectionError> {
    let client = nats::connect_options(config, CONNECTION_NAME)
        // A request the user may not make is dropped by the server, and the caller only sees a
        // timeout; the server's own complaint says why, so it goes to the operator at once.
        .event_callback(|event| async move {
            if let Event::ServerError(ServerError::Other(complaint)) = event {
                eprintln!("herald: the NATS server says: {complaint}");
            }
        })
        .connect(config.servers().as_slice())
        .await
        .map_err(|source| ConnectionError::Connect {
            url: config.url.clone(),
            source,
        })?;
    Ok(Nats::new(client, config))
}
