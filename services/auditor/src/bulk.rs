//! One bulk request: `create` ops with the document's own id, then every item of the answer
//! read in order. A bulk answers 200 even when items failed, so the top-level status says
//! nothing about any one document; only its item does.

use bytes::Bytes;
use serde_json::{Value, json};

use crate::classify::{self, ItemVerdict};
use crate::cluster::{Cluster, ClusterError, describe};
use crate::document::Document;

/// The NDJSON lines of a bulk of `create` ops.
pub fn lines(documents: &[&Document], prefix: &str) -> Result<Vec<Bytes>, serde_json::Error> {
    let mut lines = Vec::with_capacity(documents.len() * 2);
    for document in documents {
        let op = json!({"create": {"_index": document.index(prefix), "_id": document.id}});
        lines.push(Bytes::from(serde_json::to_vec(&op)?));
        lines.push(Bytes::from(serde_json::to_vec(&document.body)?));
    }
    Ok(lines)
}

/// Sends the documents and returns one verdict per document, in order. An `Err` means the
/// request as a whole failed (the cluster is down, timed out, or refused the whole body): no
/// document is known to be stored.
pub async fn send(
    cluster: &Cluster,
    documents: &[&Document],
) -> Result<Vec<ItemVerdict>, ClusterError> {
    let body = lines(documents, cluster.prefix())
        .map_err(|e| ClusterError::Malformed(format!("cannot encode a document: {e}")))?;
    let answer = cluster.bulk(body).await?;
    verdicts(&answer, documents.len())
}

/// The verdict on each item of a bulk answer. An answer with a different number of items than
/// documents sent cannot be matched to them, so it counts as a failed request.
pub fn verdicts(answer: &Value, expected: usize) -> Result<Vec<ItemVerdict>, ClusterError> {
    let items = answer
        .get("items")
        .and_then(Value::as_array)
        .ok_or_else(|| ClusterError::Malformed("a bulk answer without items".into()))?;
    if items.len() != expected {
        return Err(ClusterError::Malformed(format!(
            "a bulk answer with {} items for {expected} documents",
            items.len()
        )));
    }
    items
        .iter()
        .map(|item| {
            let result = item
                .as_object()
                .and_then(|ops| ops.values().next())
                .ok_or_else(|| ClusterError::Malformed("an empty bulk item".into()))?;
            let status = result
                .get("status")
                .and_then(Value::as_u64)
                .and_then(|s| u16::try_from(s).ok())
                .ok_or_else(|| ClusterError::Malformed("a bulk item without status".into()))?;
            Ok(classify::item(status, || {
                result
                    .get("error")
                    .and_then(Value::as_object)
                    .map_or_else(|| "no reason given".to_owned(), describe)
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_is_read_even_when_the_bulk_says_200() {
        let answer = json!({"errors": true, "items": [
            {"create": {"_id": "a", "status": 201}},
            {"create": {"_id": "b", "status": 409, "error": {"type": "version_conflict_engine_exception", "reason": "exists"}}},
            {"create": {"_id": "c", "status": 429, "error": {"type": "es_rejected_execution_exception", "reason": "queue full"}}},
            {"create": {"_id": "d", "status": 400, "error": {"type": "mapper_parsing_exception", "reason": "failed to parse field [at]"}}},
        ]});
        let verdicts = verdicts(&answer, 4).expect("readable");
        assert_eq!(verdicts[0], ItemVerdict::Stored { duplicate: false });
        assert_eq!(verdicts[1], ItemVerdict::Stored { duplicate: true });
        assert!(matches!(&verdicts[2], ItemVerdict::Retry(r) if r.contains("queue full")));
        assert!(
            matches!(&verdicts[3], ItemVerdict::Refused(r) if r.contains("mapper_parsing_exception: failed to parse field [at]"))
        );
    }

    #[test]
    fn an_answer_that_does_not_match_the_request_is_a_failed_request() {
        let answer = json!({"errors": false, "items": [{"create": {"status": 201}}]});
        assert!(matches!(
            verdicts(&answer, 2),
            Err(ClusterError::Malformed(_))
        ));
        assert!(matches!(
            verdicts(&json!({}), 1),
            Err(ClusterError::Malformed(_))
        ));
    }
}
