//! Which cluster answers are worth sending again, in one place (as Vector's Elasticsearch sink
//! does): 429 (too many requests) and 5xx may succeed later; any other 4xx will not, and the
//! document goes to the DLQ with the cluster's reason instead of looping. A 409 on `create`
//! means the document is already stored: success.

/// What one bulk item's status means for its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemVerdict {
    /// Stored now, or already stored before (`duplicate`, a 409 on `create`).
    Stored { duplicate: bool },
    /// The cluster could not take it now; send it again after a delay.
    Retry(String),
    /// The cluster will never take it (a mapping error, say): dead-letter it with this reason.
    Refused(String),
}

/// Overloaded or failing inside: another try may work.
pub fn is_transient(status: u16) -> bool {
    status == 429 || (500..600).contains(&status)
}

/// The verdict on one bulk item, from its status and the cluster's reason when it failed.
pub fn item(status: u16, reason: impl FnOnce() -> String) -> ItemVerdict {
    match status {
        200..=299 => ItemVerdict::Stored { duplicate: false },
        409 => ItemVerdict::Stored { duplicate: true },
        s if is_transient(s) => ItemVerdict::Retry(format!("{s} {}", reason())),
        s => ItemVerdict::Refused(format!(
            "the cluster refused the document ({s}): {}",
            reason()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_status_has_one_verdict() {
        let table: [(u16, &str); 10] = [
            (200, "stored"),
            (201, "stored"),
            (409, "duplicate"),
            (429, "retry"),
            (500, "retry"),
            (502, "retry"),
            (503, "retry"),
            (400, "refused"),
            (404, "refused"),
            (413, "refused"),
        ];
        for (status, expected) in table {
            let verdict = match item(status, || "why".into()) {
                ItemVerdict::Stored { duplicate: false } => "stored",
                ItemVerdict::Stored { duplicate: true } => "duplicate",
                ItemVerdict::Retry(_) => "retry",
                ItemVerdict::Refused(_) => "refused",
            };
            assert_eq!(verdict, expected, "status {status}");
        }
    }

    #[test]
    fn a_refusal_carries_the_clusters_reason() {
        let verdict = item(400, || "strict_dynamic_mapping_exception: no [x]".into());
        assert_eq!(
            verdict,
            ItemVerdict::Refused(
                "the cluster refused the document (400): strict_dynamic_mapping_exception: no [x]"
                    .into()
            )
        );
    }
}
