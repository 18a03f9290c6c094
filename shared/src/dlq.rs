//! Dead-lettering, the same way from every service: the original body goes to
//! `herald.dlq.<source>` unchanged, with the original headers plus `Herald-Original-Subject`,
//! `Herald-Error`, `Herald-Attempts` and `Herald-First-Failed-At`, and Msg-Id
//! `<original msg id>:dlq` so dead-lettering the same message twice stores it once.
//!
//! JetStream has no dead-letter queue of its own; a consumer must publish here, wait for the
//! stream's ack, and only then ack (or terminate) the original message.
//!
//! A body too large to travel beside the dead-letter headers (an original that filled
//! `max_payload` by itself) is stored whole in the JetStream object store bucket
//! `herald_dlq_bodies`, under the dead letter's own Msg-Id, and the dead letter carries an empty
//! body and `Herald-Body-Object: <object name>`. `herald dlq replay` restores the original from
//! there; the bucket keeps objects as long as the DLQ keeps dead letters. If even the headers do
//! not fit, the dead letter keeps only the Herald-* ones.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use tokio::io::AsyncReadExt;

use crate::config::StreamsConfig;
use crate::headers;
use crate::publish::{self, PublishFailure};
use crate::subjects::{DLQ_STREAM, DlqSource};

/// The object store bucket holding the bodies of dead letters too large to carry them.
pub const BODIES_BUCKET: &str = "herald_dlq_bodies";
/// The stream behind `BODIES_BUCKET` (JetStream names it `OBJ_<bucket>`).
pub const BODIES_STREAM: &str = "OBJ_herald_dlq_bodies";

/// The longest `Herald-Error` kept; the full story belongs in the logs and the audit index.
const MAX_ERROR_LEN: usize = 1024;

/// What is known about a message that is given up on.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub source: DlqSource,
    pub original_subject: String,
    /// The original Nats-Msg-Id (for a scheduled retry, its first publication's), or
    /// `<stream>:<sequence>` when it had none.
    pub original_msg_id: String,
    pub error: String,
    pub attempts: u32,
    pub first_failed_at: DateTime<Utc>,
}

impl DeadLetter {
    /// Describes a JetStream message that failed for `error` after `attempts` deliveries.
    pub fn for_message(
        source: DlqSource,
        message: &jetstream::Message,
        error: impl Into<String>,
        attempts: u32,
        first_failed_at: DateTime<Utc>,
    ) -> Self {
        // A scheduled retry has no Msg-Id of its own; it names its first publication's.
        let original_msg_id =
            crate::schedule::original_msg_id(message).unwrap_or_else(|| match message.info() {
                Ok(info) => format!("{}:{}", info.stream, info.stream_sequence),
                Err(_) => format!("{}:unknown", message.subject),
            });
        Self {
            source,
            original_subject: message.subject.to_string(),
            original_msg_id,
            error: error.into(),
            attempts,
            first_failed_at,
        }
    }

    pub fn msg_id(&self) -> String {
        format!("{}:dlq", self.original_msg_id)
    }

    /// The headers the dead letter carries: the original ones (minus publish-time controls) plus
    /// the Herald-* description.
    pub fn headers(&self, original: Option<&HeaderMap>, dead_lettered_by: &str) -> HeaderMap {
        let mut out = HeaderMap::new();
        if let Some(original) = original {
            for (name, values) in original.iter() {
                let name_str: &str = name.as_ref();
                // Publish-time controls would make JetStream judge the dead letter by the
                // original's expectations.
                if name_str.starts_with("Nats-") {
                    continue;
                }
                for value in values {
                    out.append(name.clone(), value.clone());
                }
            }
        }
        // Everything here may come from outside (ids, subjects, reasons): never a panic.
        headers::insert_safe(&mut out, headers::MSG_ID, &self.msg_id());
        headers::insert_safe(&mut out, headers::ORIGINAL_SUBJECT, &self.original_subject);
        headers::insert_safe(&mut out, headers::ORIGINAL_MSG_ID, &self.original_msg_id);
        headers::insert_bounded(&mut out, headers::ERROR, &self.error, MAX_ERROR_LEN);
        headers::insert_safe(&mut out, headers::ATTEMPTS, &self.attempts.to_string());
        headers::insert_safe(
            &mut out,
            headers::FIRST_FAILED_AT,
            &rfc3339(self.first_failed_at),
        );
        headers::insert_safe(&mut out, headers::DEAD_LETTERED_AT, &rfc3339(Utc::now()));
        headers::insert_safe(&mut out, headers::DEAD_LETTERED_BY, dead_lettered_by);
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// JetStream did not store the dead letter; `is_permanent` says whether trying again can.
    #[error("publishing the dead letter failed: {0}")]
    Publish(#[from] PublishFailure),
    /// The original body needed the bodies bucket and it could not take it.
    #[error("cannot store the dead letter's body in bucket {BODIES_BUCKET}: {0}")]
    Body(String),
}

impl DlqError {
    /// Whether storing this dead letter can never succeed as it is.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Publish(failure) => failure.is_permanent(),
            Self::Body(_) => false,
        }
    }
}

/// Publishes the dead letter and waits for JetStream to store it. Only after this returns `Ok`
/// may the caller ack the original message. A body too large to fit beside the headers goes to
/// the bodies bucket (see the module docs).
pub async fn publish(
    js: &jetstream::Context,
    letter: &DeadLetter,
    body: Bytes,
    original_headers: Option<&HeaderMap>,
    dead_lettered_by: &str,
) -> Result<(), DlqError> {
    let subject = letter.source.subject();
    let headers = letter.headers(original_headers, dead_lettered_by);
    match publish::publish(js, &subject, headers.clone(), body.clone()).await {
        Ok(_) => {}
        Err(PublishFailure::TooLarge(_)) => {
            let object = letter.msg_id();
            store_body(js, &object, &body).await?;
            let mut slim = headers;
            headers::insert_safe(&mut slim, headers::BODY_OBJECT, &object);
            match publish::publish(js, &subject, slim, Bytes::new()).await {
                Ok(_) => {}
                Err(PublishFailure::TooLarge(_)) => {
                    // The original headers alone are too many: keep the description only.
                    let mut bare = letter.headers(None, dead_lettered_by);
                    headers::insert_safe(&mut bare, headers::BODY_OBJECT, &object);
                    publish::publish(js, &subject, bare, Bytes::new()).await?;
                }
                Err(e) => return Err(e.into()),
            }
            metrics::counter!("herald_dead_letter_bodies_stored_total", "source" => letter.source.as_str())
                .increment(1);
        }
        Err(e) => return Err(e.into()),
    }
    metrics::counter!("herald_dead_letters_total", "source" => letter.source.as_str()).increment(1);
    tracing::warn!(
        source = letter.source.as_str(),
        subject = %letter.original_subject,
        msg_id = %letter.original_msg_id,
        attempts = letter.attempts,
        error = %letter.error,
        "dead-lettered"
    );
    Ok(())
}

/// Dead-letters a JetStream message, then terminates it so it is never redelivered. The order
/// matters: the dead letter is durable before the original is let go.
pub async fn dead_letter_message(
    js: &jetstream::Context,
    message: &jetstream::Message,
    letter: &DeadLetter,
    dead_lettered_by: &str,
) -> Result<(), DlqError> {
    publish(
        js,
        letter,
        message.payload.clone(),
        message.headers.as_ref(),
        dead_lettered_by,
    )
    .await?;
    if let Err(e) = message.ack_with(jetstream::AckKind::Term).await {
        // The dead letter is stored; a redelivery will be dead-lettered again under the same
        // Msg-Id and absorbed.
        tracing::warn!(error = %e, "could not terminate a dead-lettered message");
    }
    Ok(())
}

/// Dead letter headers read back, for the CLI and the auditor.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterInfo {
    pub original_subject: String,
    pub original_msg_id: Option<String>,
    pub error: String,
    pub attempts: u32,
    pub first_failed_at: Option<DateTime<Utc>>,
    pub dead_lettered_at: Option<DateTime<Utc>>,
    /// Where the original body is when it did not fit in the dead letter (`BODIES_BUCKET`).
    pub body_object: Option<String>,
}

impl DeadLetterInfo {
    pub fn from_headers(h: &HeaderMap) -> Option<Self> {
        let text = |name: &str| h.get(name).map(|v| v.as_str().to_owned());
        let time = |name: &str| {
            text(name)
                .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&Utc))
        };
        Some(Self {
            original_subject: text(headers::ORIGINAL_SUBJECT)?,
            original_msg_id: text(headers::ORIGINAL_MSG_ID),
            error: text(headers::ERROR).unwrap_or_default(),
            attempts: text(headers::ATTEMPTS)
                .and_then(|a| a.parse().ok())
                .unwrap_or(0),
            first_failed_at: time(headers::FIRST_FAILED_AT),
            dead_lettered_at: time(headers::DEAD_LETTERED_AT),
            body_object: text(headers::BODY_OBJECT),
        })
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The JetStream configuration of the bodies bucket: what `create_object_store` would make,
/// kept as long as the DLQ keeps its dead letters.
pub fn bodies_stream_config(config: &StreamsConfig) -> stream::Config {
    let limits = config.limits(DLQ_STREAM);
    stream::Config {
        name: BODIES_STREAM.to_owned(),
        description: Some("Bodies of dead letters too large to carry them".into()),
        subjects: vec![
            format!("$O.{BODIES_BUCKET}.C.>"),
            format!("$O.{BODIES_BUCKET}.M.>"),
        ],
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        max_age: limits.max_age,
        max_bytes: limits.max_bytes,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        allow_direct: true,
        ..Default::default()
    }
}

fn body_error(e: impl std::fmt::Display) -> DlqError {
    DlqError::Body(e.to_string())
}

/// Stores `body` as object `name`, unless an object of that name and size is already there (the
/// same dead letter, stored before a crash): writing it again would make JetStream purge the old
/// chunks, which services may not do.
async fn store_body(js: &jetstream::Context, name: &str, body: &[u8]) -> Result<(), DlqError> {
    let bucket = js
        .get_object_store(BODIES_BUCKET)
        .await
        .map_err(body_error)?;
    if let Ok(info) = bucket.info(name).await
        && !info.deleted
        && info.size == body.len()
    {
        return Ok(());
    }
    let mut reader = body;
    bucket.put(name, &mut reader).await.map_err(body_error)?;
    Ok(())
}

/// The original body of a dead letter stored in the bodies bucket, for replay.
pub async fn load_body(js: &jetstream::Context, name: &str) -> Result<Bytes, DlqError> {
    let bucket = js
        .get_object_store(BODIES_BUCKET)
        .await
        .map_err(body_error)?;
    let mut object = bucket.get(name).await.map_err(body_error)?;
    let mut body = Vec::new();
    object.read_to_end(&mut body).await.map_err(body_error)?;
    Ok(body.into())
}

/// Removes a stored body once its dead letter is replayed or purged. A body already gone is fine.
pub async fn delete_body(js: &jetstream::Context, name: &str) -> Result<(), DlqError> {
    let bucket = js
        .get_object_store(BODIES_BUCKET)
        .await
        .map_err(body_error)?;
    match bucket.delete(name).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == jetstream::object_store::DeleteErrorKind::NotFound => Ok(()),
        Err(e) => Err(body_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(error: &str) -> DeadLetter {
        DeadLetter {
            source: DlqSource::Actions,
            original_subject: "herald.actions.webhook.o".into(),
            original_msg_id: "e:o:0".into(),
            error: error.into(),
            attempts: 3,
            first_failed_at: Utc::now(),
        }
    }

    #[test]
    fn headers_describe_the_failure_and_round_trip() {
        let mut original = HeaderMap::new();
        original.insert(headers::MSG_ID, "e:o:0");
        original.insert(headers::TRACEPARENT, "00-abc-def-01");
        let l = letter("receiver answered 410");
        let h = l.headers(Some(&original), "action-worker");
        assert_eq!(
            h.get(headers::MSG_ID).map(|v| v.as_str()),
            Some("e:o:0:dlq")
        );
        assert_eq!(
            h.get(headers::TRACEPARENT).map(|v| v.as_str()),
            Some("00-abc-def-01")
        );
        let info = DeadLetterInfo::from_headers(&h).expect("dead letter headers");
        assert_eq!(info.original_subject, "herald.actions.webhook.o");
        assert_eq!(info.error, "receiver answered 410");
        assert_eq!(info.attempts, 3);
        assert!(info.first_failed_at.is_some());
    }

    #[test]
    fn errors_become_one_bounded_header_line() {
        let long = format!("line one\r\nline two {}", "é".repeat(2000));
        let h = letter(&long).headers(None, "test");
        let safe = h.get(headers::ERROR).map(|v| v.as_str().to_owned());
        let safe = safe.unwrap_or_default();
        assert!(!safe.contains(['\r', '\n']));
        assert!(safe.len() <= MAX_ERROR_LEN, "{}", safe.len());
    }

    #[test]
    fn hostile_ids_and_subjects_never_panic() {
        let mut l = letter("x");
        l.original_msg_id = "id\r\nNats-Expected-Stream: X".into();
        l.original_subject = "herald.actions.\n".into();
        let h = l.headers(None, "svc\r\n");
        let id = h
            .get(headers::ORIGINAL_MSG_ID)
            .map(|v| v.as_str().to_owned());
        assert!(!id.unwrap_or_default().contains('\n'));
    }
}
