//! Connecting to NATS: one named connection per service, authenticated as the service's own user,
//! retried with backoff at start so the stack can come up in any order.

use std::time::Duration;

use async_nats::jetstream;
use backon::{ExponentialBuilder, Retryable};

use crate::config::NatsConfig;

#[derive(Debug, thiserror::Error)]
#[error("cannot connect to NATS at {url}: {source}")]
pub struct ConnectError {
    url: String,
    #[source]
    source: async_nats::ConnectError,
}

/// A connection and the JetStream context over it.
#[derive(Clone, Debug)]
pub struct Nats {
    pub client: async_nats::Client,
    pub jetstream: jetstream::Context,
}

impl Nats {
    /// Wraps a connected client, with JetStream requests bounded by `config.request_timeout`.
    pub fn new(client: async_nats::Client, config: &NatsConfig) -> Self {
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            .build(client.clone());
        Self { client, jetstream }
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

pub async fn connect(config: &NatsConfig, service: &str) -> Result<Nats, ConnectError> {
    let servers = config.servers();
    let attempt = || connect_options(config, service).connect(servers.as_slice());
    let client = attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5))
                .with_max_times(8),
        )
        .notify(|err, delay| {
            tracing::warn!(error = %err, ?delay, url = %config.url, "NATS not reachable yet; retrying");
        })
        .await
        .map_err(|source| ConnectError {
            url: config.url.clone(),
            source,
        })?;
    Ok(Nats::new(client, config))
}

/// The options every Herald connection uses: its name, timeouts, its user's credentials, and a
/// listener that remembers which subjects the server refused (so `publish::classify` can tell a
/// permission refusal from a timeout). Callers may add their own (the CLI reports server
/// complaints) before connecting; a caller replacing the event callback should pass server
/// errors on to `publish::note_server_error`.
pub fn connect_options(config: &NatsConfig, name: &str) -> async_nats::ConnectOptions {
    // A `tls://` connection builds a rustls configuration with the process default provider.
    crate::tls::install_crypto_provider();
    let options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(config.request_timeout))
        .event_callback(|event| async move {
            match &event {
                async_nats::Event::ServerError(async_nats::ServerError::Other(complaint)) => {
                    tracing::warn!(%complaint, "the NATS server complained");
                    crate::publish::note_server_error(complaint);
                }
                other => tracing::info!(event = %other, "NATS connection event"),
            }
        });
    match (&config.user, &config.password) {
        (Some(user), Some(password)) => options.user_and_password(user.clone(), password.clone()),
        _ => options,
    }
}
