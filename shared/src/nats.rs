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
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

pub async fn connect(config: &NatsConfig, service: &str) -> Result<Nats, ConnectError> {
    let attempt = || async {
        let mut options = async_nats::ConnectOptions::new()
            .name(service)
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(config.request_timeout));
        if let (Some(user), Some(password)) = (&config.user, &config.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        options.connect(config.url.as_str()).await
    };
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
    let jetstream = jetstream::ContextBuilder::new()
        .timeout(config.request_timeout)
        .build(client.clone());
    Ok(Nats { client, jetstream })
}
