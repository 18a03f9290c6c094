//! Retention by index age: a monthly index is deleted once its month ended longer ago than the
//! configured retention. Whole indices go at once, which is cheap for the cluster, and the
//! month in the name is the documents' own time, so nothing younger than the retention goes.

use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::document::Kind;

const EVERY: Duration = Duration::from_secs(3600);

/// When the month named by `index` (`<prefix>-<kind>-YYYY.MM`) ended, if it is one of ours.
pub fn month_end(prefix: &str, index: &str) -> Option<DateTime<Utc>> {
    let month = Kind::ALL.iter().find_map(|k| {
        index
            .strip_prefix(prefix)?
            .strip_prefix('-')?
            .strip_prefix(k.index_part())?
            .strip_prefix('-')
    })?;
    let (year, month) = month.split_once('.')?;
    let (year, month): (i32, u32) = (year.parse().ok()?, month.parse().ok()?);
    let first = NaiveDate::from_ymd_opt(year, month, 1)?;
    let next = if first.month() == 12 {
        NaiveDate::from_ymd_opt(year + 1, 1, 1)?
    } else {
        NaiveDate::from_ymd_opt(year, month + 1, 1)?
    };
    Some(next.and_hms_opt(0, 0, 0)?.and_utc())
}

/// Deletes the indices past `retention` once now and then every hour, until `stop`.
pub async fn enforce(cluster: &Cluster, retention: Duration, stop: CancellationToken) {
    let Ok(retention) = chrono::Duration::from_std(retention) else {
        return;
    };
    loop {
        if let Err(e) = sweep(cluster, retention, Utc::now()).await {
            tracing::warn!(error = %e, "retention sweep failed; trying again later");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// One sweep; returns the indices deleted.
pub async fn sweep(
    cluster: &Cluster,
    retention: chrono::Duration,
    now: DateTime<Utc>,
) -> Result<Vec<String>, crate::cluster::ClusterError> {
    let prefix = cluster.prefix();
    let mut deleted = Vec::new();
    for index in cluster.indices(&format!("{prefix}-*")).await? {
        if month_end(prefix, &index).is_some_and(|end| end + retention < now) {
            cluster.delete_index(&index).await?;
            tracing::info!(%index, "index past retention deleted");
            deleted.push(index);
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_month_ends_at_the_first_of_the_next() {
        let end = month_end("herald", "herald-events-2026.12").expect("ours");
        assert_eq!(end.to_rfc3339(), "2027-01-01T00:00:00+00:00");
        let end = month_end("herald", "herald-dead-letters-2026.02").expect("ours");
        assert_eq!(end.to_rfc3339(), "2026-03-01T00:00:00+00:00");
        assert_eq!(month_end("herald", "herald-other-2026.02"), None);
        assert_eq!(month_end("herald", "heraldx-events-2026.02"), None);
        assert_eq!(month_end("herald", "herald-events-2026.13"), None);
    }
}
