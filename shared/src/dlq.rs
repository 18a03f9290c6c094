//! Dead-lettering, the same way from every service: the original body goes to
//! `herald.dlq.<source>` unchanged, with the original headers plus `Herald-Original-Subject`,
//! `Herald-Error`, `Herald-Attempts` and `Herald-First-Failed-At`, and Msg-Id
//! `<original msg id>:dlq` so dead-lettering the same message twice stores it once.
//!
//! JetStream has no dead-letter queue of its own; a consumer must publish here, wait for the
//! stream's ack, and only then ack (or terminate) the original message.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};

use crate::headers;
use crate::subjects::DlqSource;

/// The longest `Herald-Error` kept; the full story belongs in the logs and the audit index.
const MAX_ERROR_LEN: usize = 1024;

/// What is known about a message that is given up on.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub source: DlqSource,
    pub original_subject: String,
    /// The original Nats-Msg-Id, or `<stream>:<sequence>` when it had none.
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
        let msg_id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::MSG_ID))
            .map(|v| v.as_str().to_owned());
        let original_msg_id = msg_id.unwrap_or_else(|| match message.info() {
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
        out.insert(headers::MSG_ID, self.msg_id().as_str());
        out.insert(headers::ORIGINAL_SUBJECT, self.original_subject.as_str());
        out.insert(headers::ORIGINAL_MSG_ID, self.original_msg_id.as_str());
        out.insert(headers::ERROR, header_safe(&self.error).as_str());
        out.insert(headers::ATTEMPTS, self.attempts.to_string().as_str());
        out.insert(
            headers::FIRST_FAILED_AT,
            rfc3339(self.first_failed_at).as_str(),
        );
        out.insert(headers::DEAD_LETTERED_AT, rfc3339(Utc::now()).as_str());
        out.insert(headers::DEAD_LETTERED_BY, dead_lettered_by);
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("publishing the dead letter failed: {0}")]
    Publish(#[from] jetstream::context::PublishError),
}

/// Publishes the dead letter and waits for JetStream to store it. Only after this returns `Ok`
/// may the caller ack the original message.
pub async fn publish(
    js: &jetstream::Context,
    letter: &DeadLetter,
    body: Bytes,
    original_headers: Option<&HeaderMap>,
    dead_lettered_by: &str,
) -> Result<(), DlqError> {
    let message = PublishMessage::build()
        .payload(body)
        .headers(letter.headers(original_headers, dead_lettered_by));
    js.send_publish(letter.source.subject(), message)
        .await?
        .await?;
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
        })
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Header values are one line of printable text.
fn header_safe(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > MAX_ERROR_LEN {
        let mut cut = MAX_ERROR_LEN;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
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
        let safe = header_safe(&long);
        assert!(!safe.contains(['\r', '\n']));
        assert!(safe.len() <= MAX_ERROR_LEN + '…'.len_utf8());
    }
}
