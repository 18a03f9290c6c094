//! What becomes of each consumed message, decided by the indexer and turned into JetStream acks
//! here, in one place: stored → ack; not storable yet → NAK with a delay; never storable →
//! dead-letter with the reason, then TERM. (Shaped like the shared disposition path the other
//! consumers are moving to, so the auditor can move onto it unchanged.)

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use chrono::Utc;
use herald_shared::dlq::{self, DeadLetter};
use herald_shared::subjects::DlqSource;

use crate::document::Kind;

/// Names the auditor in dead letters.
pub const SERVICE: &str = "auditor";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// The document is in the cluster (or was already): the message is done.
    Stored,
    /// Not stored, and worth trying again after `delay`.
    Retry { delay: Duration },
    /// Can never be stored: dead-letter it with the reason.
    DeadLetter { reason: String },
}

/// Where a message of `kind` is dead-lettered. Dead letters themselves are not: they already
/// are in the DLQ stream, and dead-lettering one again would feed it back to this consumer.
fn dlq_source(kind: Kind) -> Option<DlqSource> {
    match kind {
        Kind::Event => Some(DlqSource::Events),
        Kind::Outcome => Some(DlqSource::Actions),
        Kind::Job => Some(DlqSource::Jobs),
        Kind::DeadLetter => None,
    }
}

/// Acts on the disposition. A failed ack only means a redelivery, which `create` absorbs; a
/// dead letter that cannot be published leaves the message unacked, so it comes back.
pub async fn settle(
    js: &jetstream::Context,
    kind: Kind,
    message: &jetstream::Message,
    disposition: Disposition,
) {
    let outcome = match disposition {
        Disposition::Stored => message.ack().await,
        Disposition::Retry { delay } => message.ack_with(AckKind::Nak(Some(delay))).await,
        Disposition::DeadLetter { reason } => {
            metrics::counter!("herald_auditor_refused_total", "kind" => kind.as_str()).increment(1);
            let Some(source) = dlq_source(kind) else {
                // The entry stays in HERALD_DLQ, where `herald dlq` shows it; only its audit
                // copy is missing, and the log says why.
                tracing::error!(subject = %message.subject, %reason, "a dead letter cannot be indexed; it stays in the DLQ stream only");
                return terminate(message).await;
            };
            let attempts = message
                .info()
                .map_or(1, |i| u32::try_from(i.delivered).unwrap_or(u32::MAX));
            let letter = DeadLetter::for_message(source, message, reason, attempts, Utc::now());
            if let Err(e) = dlq::dead_letter_message(js, message, &letter, SERVICE).await {
                tracing::error!(error = %e, "cannot dead-letter a refused document; it will be redelivered");
            }
            return;
        }
    };
    if let Err(e) = outcome {
        tracing::warn!(error = %e, "ack failed; the message is redelivered and absorbed as a duplicate");
    }
}

async fn terminate(message: &jetstream::Message) {
    if let Err(e) = message.ack_with(AckKind::Term).await {
        tracing::warn!(error = %e, "could not terminate a message");
    }
}
