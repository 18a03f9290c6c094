//! Which dead letters `herald dlq replay --all` takes: by original subject pattern, by error
//! text and by when they were dead-lettered, and `--dry-run` to see the selection first.

use chrono::{DateTime, Utc};

use crate::pattern;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct ReplayFilter {
    /// Only dead letters whose original subject matches this pattern (`*`, `>` wildcards),
    /// e.g. `herald.actions.webhook.>`.
    #[arg(long, requires = "all", value_parser = subject_pattern)]
    pub subject: Option<String>,
    /// Only dead letters whose error (`Herald-Error`) contains this text.
    #[arg(long, requires = "all")]
    pub error: Option<String>,
    /// Only dead letters dead-lettered at or after this RFC 3339 time.
    #[arg(long, requires = "all")]
    pub since: Option<DateTime<Utc>>,
    /// Only dead letters dead-lettered before this RFC 3339 time.
    #[arg(long, requires = "all")]
    pub until: Option<DateTime<Utc>>,
    /// Print what would be replayed, and replay nothing.
    #[arg(long, requires = "all")]
    pub dry_run: bool,
}

fn subject_pattern(text: &str) -> Result<String, pattern::InvalidPattern> {
    pattern::validate(text).map(|()| text.to_owned())
}

impl ReplayFilter {
    /// Whether a dead letter with these headers is selected. One without a dead-lettering time
    /// is never in a time window.
    pub fn admits(
        &self,
        original_subject: &str,
        error: &str,
        dead_lettered_at: Option<DateTime<Utc>>,
    ) -> bool {
        let subject = self.subject.as_deref().is_none_or(|p| {
            pattern::intersection(p, original_subject).as_deref() == Some(original_subject)
        });
        let error = self
            .error
            .as_deref()
            .is_none_or(|text| error.contains(text));
        let since = self
            .since
            .is_none_or(|since| dead_lettered_at.is_some_and(|at| at >= since));
        let until = self
            .until
            .is_none_or(|until| dead_lettered_at.is_some_and(|at| at < until));
        subject && error && since && until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().expect("RFC 3339")
    }

    #[test]
    fn every_filter_must_admit() {
        let filter = ReplayFilter {
            subject: Some("herald.actions.webhook.>".into()),
            error: Some("410".into()),
            since: Some(at("2026-01-01T00:00:00Z")),
            until: Some(at("2026-02-01T00:00:00Z")),
            dry_run: false,
        };
        let inside = Some(at("2026-01-15T00:00:00Z"));
        let subject = "herald.actions.webhook.order_created";
        assert!(filter.admits(subject, "answered 410 Gone", inside));
        assert!(!filter.admits("herald.actions.slack.x", "answered 410 Gone", inside));
        assert!(!filter.admits(subject, "answered 500", inside));
        assert!(!filter.admits(
            subject,
            "answered 410 Gone",
            Some(at("2026-02-01T00:00:00Z"))
        ));
        assert!(!filter.admits(subject, "answered 410 Gone", None));
        assert!(ReplayFilter::default().admits("herald.events.Order.insert", "", None));
    }
}
