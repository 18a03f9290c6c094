//! How far the pipeline has got, read from JetStream itself: the number of messages stored on a
//! subject, as the pending count of an ephemeral consumer that reads nothing. Counting the
//! stream, not a service's log or metrics, measures what downstream can actually consume.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};

#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    #[error("stream {stream}: {source}")]
    Stream {
        stream: String,
        source: async_nats::jetstream::context::GetStreamError,
    },
    #[error("a counting consumer on {subject}: {source}")]
    Consumer {
        subject: String,
        source: async_nats::jetstream::stream::ConsumerError,
    },
    #[error("counting {subject}: {source}")]
    Info {
        subject: String,
        source: async_nats::jetstream::context::ConsumerInfoError,
    },
}

/// Counts the messages stored on one subject of one stream.
pub struct SubjectCount {
    subject: String,
    consumer: consumer::Consumer<consumer::pull::Config>,
}

impl SubjectCount {
    pub async fn new(
        js: &jetstream::Context,
        stream: &str,
        subject: &str,
    ) -> Result<Self, ProgressError> {
        let consumer = js
            .get_stream(stream)
            .await
            .map_err(|source| ProgressError::Stream {
                stream: stream.to_owned(),
                source,
            })?
            .create_consumer(consumer::pull::Config {
                filter_subject: subject.to_owned(),
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(300),
                ..Default::default()
            })
            .await
            .map_err(|source| ProgressError::Consumer {
                subject: subject.to_owned(),
                source,
            })?;
        Ok(Self {
            subject: subject.to_owned(),
            consumer,
        })
    }

    pub async fn count(&self) -> Result<u64, ProgressError> {
        let info = self
            .consumer
            .get_info()
            .await
            .map_err(|source| ProgressError::Info {
                subject: self.subject.clone(),
                source,
            })?;
        Ok(info.num_pending)
    }
}
