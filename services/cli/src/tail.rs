//! `herald tail <subject-filter>`: print messages as they are stored, one JSON line each, until
//! Ctrl-C.
//!
//! For subjects inside Herald streams it reads through an ordered consumer per stream, starting
//! at new messages: it sees what JetStream stored (a duplicate absorbed by a Msg-Id is not
//! shown, which is the truth a tail should tell), with stream sequences, and it acks nothing and
//! leaves no durable consumer behind. A filter that touches no stream (e.g. the job management
//! requests on `herald.control.jobs.>`) is followed with a plain subscription instead; a filter
//! that touches streams shows only what they store.

use std::io::Write;
use std::pin::Pin;

use async_nats::jetstream::consumer::{DeliverPolicy, StreamError, pull};
use async_nats::jetstream::context::GetStreamError;
use async_nats::jetstream::stream::ConsumerError;
use futures::{Stream, StreamExt};
use herald_shared::streams;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::connection::Session;
use crate::pattern::{self, InvalidPattern};
use crate::render;

#[derive(Debug, clap::Args)]
pub struct TailArgs {
    /// Subject filter; wildcards allowed, e.g. `herald.events.Order.>` or `herald.>`.
    pub subject: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error(transparent)]
    Filter(#[from] InvalidPattern),
    #[error("cannot open stream {stream} (has `herald streams init` run?): {source}")]
    Open {
        stream: &'static str,
        #[source]
        source: GetStreamError,
    },
    #[error("cannot create a consumer on {stream}: {source}")]
    Consumer {
        stream: &'static str,
        #[source]
        source: ConsumerError,
    },
    #[error("cannot read from {stream}: {source}")]
    Read {
        stream: &'static str,
        #[source]
        source: StreamError,
    },
    #[error("cannot subscribe to {subject}: {source}")]
    Subscribe {
        subject: String,
        #[source]
        source: async_nats::SubscribeError,
    },
    #[error("cannot register the subscription with the server: {0}")]
    Flush(#[from] async_nats::client::FlushError),
    #[error("lost the messages of {stream}: {source}")]
    Receive {
        stream: &'static str,
        #[source]
        source: pull::OrderedError,
    },
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot encode the output: {0}")]
    Encode(#[from] serde_json::Error),
}

/// One printed message.
#[derive(Debug, Serialize)]
struct Line {
    /// `null` for a message followed outside any stream.
    stream: Option<&'static str>,
    seq: Option<u64>,
    subject: String,
    headers: serde_json::Map<String, Value>,
    /// The payload as JSON when it is JSON, otherwise as (lossily decoded) text.
    data: Value,
}

impl Line {
    fn new(stream: Option<&'static str>, seq: Option<u64>, message: &async_nats::Message) -> Self {
        Self {
            stream,
            seq,
            subject: message.subject.to_string(),
            headers: render::headers(message.headers.as_ref()),
            data: render::payload(&message.payload),
        }
    }
}

type Lines = Pin<Box<dyn Stream<Item = Result<Line, TailError>> + Send>>;

/// Follows `args.subject` until `shutdown` is cancelled or the connection ends.
pub async fn run(
    session: &Session,
    args: TailArgs,
    shutdown: CancellationToken,
    out: &mut impl Write,
) -> Result<(), TailError> {
    pattern::validate(&args.subject)?;
    let (mut lines, description) = follow(session, &args.subject).await?;
    eprintln!("tail: following {description} (Ctrl-C to stop)");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            next = lines.next() => match next {
                Some(line) => {
                    writeln!(out, "{}", serde_json::to_string(&line?)?)?;
                    out.flush()?;
                }
                None => return Ok(()),
            },
        }
    }
}

/// The merged message stream for `filter`, and a description of what is followed.
async fn follow(session: &Session, filter: &str) -> Result<(Lines, String), TailError> {
    let plan: Vec<(&'static str, Vec<String>)> = streams::ALL
        .iter()
        .filter_map(|spec| {
            let filters: Vec<String> = spec
                .subjects
                .iter()
                .filter_map(|subject| pattern::intersection(filter, subject))
                .collect();
            (!filters.is_empty()).then_some((spec.name, filters))
        })
        .collect();

    if plan.is_empty() {
        let subscription = session
            .nats
            .client
            .subscribe(filter.to_owned())
            .await
            .map_err(|source| TailError::Subscribe {
                subject: filter.to_owned(),
                source,
            })?;
        // The subscription must be registered before the caller says it is following.
        session.nats.client.flush().await?;
        let lines = subscription.map(|message| Ok(Line::new(None, None, &message)));
        return Ok((
            Box::pin(lines),
            format!("{filter} (no stream; live publishes)"),
        ));
    }

    let mut all: Vec<Lines> = Vec::new();
    let mut described = Vec::new();
    for (stream_name, filters) in plan {
        described.push(format!("{} on {stream_name}", filters.join(" ")));
        let stream = session
            .jetstream()
            .get_stream(stream_name)
            .await
            .map_err(|source| TailError::Open {
                stream: stream_name,
                source,
            })?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subjects: filters,
                deliver_policy: DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(|source| TailError::Consumer {
                stream: stream_name,
                source,
            })?;
        let messages = consumer
            .messages()
            .await
            .map_err(|source| TailError::Read {
                stream: stream_name,
                source,
            })?;
        all.push(Box::pin(messages.map(move |message| {
            let message = message.map_err(|source| TailError::Receive {
                stream: stream_name,
                source,
            })?;
            let seq = message.info().ok().map(|info| info.stream_sequence);
            Ok(Line::new(Some(stream_name), seq, &message.message))
        })));
    }
    Ok((
        Box::pin(futures::stream::select_all(all)),
        described.join(", "),
    ))
}
