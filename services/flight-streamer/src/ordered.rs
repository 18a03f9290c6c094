//! An ordered, ephemeral pull consumer that keeps Herald's short inactivity threshold when it
//! has to be recreated.
//!
//! async-nats' own ordered consumer recreates a removed consumer (after a reader paused past the
//! threshold, a missed heartbeat, a gap in consumer sequences) with a fixed 30 s inactivity
//! threshold, so after such a pause a cancelled stream left its consumer on the server for up
//! to 30 s. This one does what that one does (no acks, in memory, one replica; checks that
//! consumer sequences follow each other; on a gap, a removed consumer or a second missed
//! heartbeat, creates a new consumer starting after the last stream sequence it delivered) but
//! creates every consumer from the same config, so each one goes away `inactive_threshold`
//! after its reader does. The old consumer is not deleted: the streamer's user may not (see
//! `events`), and it is either gone already or goes away on its own at the same threshold.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{self, Message};
use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};

/// The pull requests' shape, as async-nats' ordered consumer makes them.
const PULL_BATCH: usize = 500;
const PULL_EXPIRES: Duration = Duration::from_secs(30);
const IDLE_HEARTBEAT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum OrderedError {
    #[error("cannot read the consumer: {0}")]
    Read(String),
    #[error("cannot recreate the consumer: {0}")]
    Recreate(String),
    #[error("a message without metadata: {0}")]
    Metadata(String),
}

pub struct Ordered {
    js: jetstream::Context,
    stream_name: String,
    /// The first consumer's config; a recreated one differs only in name and start.
    config: pull::Config,
    name_prefix: String,
    serial: u32,
    consumer_seq: u64,
    /// The last stream sequence delivered; 0 before the first.
    stream_seq: u64,
    missed_heartbeat: bool,
    messages: Option<pull::Stream>,
    creating: Option<BoxFuture<'static, Result<pull::Stream, OrderedError>>>,
}

async fn pull(
    consumer: &jetstream::consumer::Consumer<pull::Config>,
) -> Result<pull::Stream, OrderedError> {
    consumer
        .stream()
        .max_messages_per_batch(PULL_BATCH)
        .expires(PULL_EXPIRES)
        .heartbeat(IDLE_HEARTBEAT)
        .messages()
        .await
        .map_err(|e| OrderedError::Read(e.to_string()))
}

impl Ordered {
    /// Reads `consumer`, created from `config` on `stream_name`.
    pub async fn new(
        js: jetstream::Context,
        stream_name: &str,
        config: pull::Config,
        consumer: jetstream::consumer::Consumer<pull::Config>,
    ) -> Result<Self, OrderedError> {
        let messages = pull(&consumer).await?;
        Ok(Self {
            js,
            stream_name: stream_name.to_owned(),
            name_prefix: consumer.cached_info().name.clone(),
            config,
            serial: 0,
            consumer_seq: 0,
            stream_seq: 0,
            missed_heartbeat: false,
            messages: Some(messages),
            creating: None,
        })
    }

    fn recreate(&mut self) {
        self.messages = None;
        self.consumer_seq = 0;
        self.missed_heartbeat = false;
        self.serial += 1;
        let mut config = self.config.clone();
        config.name = Some(format!("{}_{}", self.name_prefix, self.serial));
        if self.stream_seq > 0 {
            config.deliver_policy = DeliverPolicy::ByStartSequence {
                start_sequence: self.stream_seq + 1,
            };
        }
        tracing::debug!(
            consumer = config.name.as_deref().unwrap_or_default(),
            after = self.stream_seq,
            "recreating the ordered consumer"
        );
        let js = self.js.clone();
        let stream_name = self.stream_name.clone();
        self.creating = Some(
            async move {
                let consumer = js
                    .create_consumer_on_stream(config, stream_name)
                    .await
                    .map_err(|e| OrderedError::Recreate(e.to_string()))?;
                pull(&consumer).await
            }
            .boxed(),
        );
    }
}

impl Stream for Ordered {
    type Item = Result<Message, OrderedError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(creating) = self.creating.as_mut() {
                match creating.poll_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => {
                        self.creating = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                    Poll::Ready(Ok(messages)) => {
                        self.creating = None;
                        self.messages = Some(messages);
                    }
                }
            }
            let Some(messages) = self.messages.as_mut() else {
                return Poll::Ready(None);
            };
            let message = match messages.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(message)) => message,
            };
            match message {
                Ok(message) => {
                    let info = match message.info() {
                        Ok(info) => (info.consumer_sequence, info.stream_sequence),
                        Err(e) => {
                            return Poll::Ready(Some(Err(OrderedError::Metadata(e.to_string()))));
                        }
                    };
                    self.missed_heartbeat = false;
                    let (consumer_seq, stream_seq) = info;
                    if consumer_seq != self.consumer_seq + 1 {
                        self.recreate();
                        continue;
                    }
                    self.consumer_seq = consumer_seq;
                    self.stream_seq = stream_seq;
                    return Poll::Ready(Some(Ok(message)));
                }
                Err(e) => {
                    use pull::MessagesErrorKind as Kind;
                    match e.kind() {
                        // One missed heartbeat may be a slow network; two in a row, a lost
                        // consumer.
                        Kind::MissingHeartbeat if !self.missed_heartbeat => {
                            self.missed_heartbeat = true;
                        }
                        Kind::MissingHeartbeat | Kind::ConsumerDeleted | Kind::NoResponders => {
                            self.recreate();
                        }
                        _ => return Poll::Ready(Some(Err(OrderedError::Read(e.to_string())))),
                    }
                }
            }
        }
    }
}
