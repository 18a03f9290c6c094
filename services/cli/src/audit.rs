//! `herald audit`: search the audit record and show an event's trail, through the auditor's
//! search API (HTTP, bearer token), not NATS: the record lives in Elasticsearch or OpenSearch,
//! and the auditor is the one that knows its indices.
//!
//! Tables are for people; `--json` prints the API's answer as one JSON object, unchanged, so
//! scripts see the same field names as API callers.

use std::io::Write;

use serde_json::Value;

#[derive(Debug, Clone, clap::Args)]
pub struct AuditArgs {
    /// The auditor's search API. Default: HERALD_AUDIT_URL, then http://127.0.0.1:8090 (the
    /// local stack's auditor).
    #[arg(
        long,
        env = "HERALD_AUDIT_URL",
        default_value = "http://127.0.0.1:8090"
    )]
    pub audit_url: String,
    /// The API's bearer token. Default: HERALD_AUDIT_TOKEN.
    #[arg(long, env = "HERALD_AUDIT_TOKEN", hide_env_values = true)]
    pub token: String,
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum AuditCommand {
    /// Search events, outcomes, job states and dead letters, newest first. Table columns: AT,
    /// TYPE, ID, WHAT. A last line gives the cursor of the next page, if there is one.
    Search(Box<SearchArgs>),
    /// An event, then everything that carries its id (every outcome attempt, job state change
    /// and dead letter), oldest first. Table columns: AT, TYPE, ID, WHAT.
    Trail {
        event_id: String,
        /// The API's answer as one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct SearchArgs {
    /// Full text (Lucene query string): words, "phrases", field:value (`data.status:paid`).
    #[arg(long)]
    pub q: Option<String>,
    #[arg(long)]
    pub entity: Option<String>,
    /// insert, update or delete.
    #[arg(long)]
    pub op: Option<String>,
    /// The row's primary key.
    #[arg(long)]
    pub key: Option<String>,
    #[arg(long)]
    pub actor: Option<String>,
    #[arg(long)]
    pub observer: Option<String>,
    /// The action kind (webhook, slack, email, job, ...).
    #[arg(long)]
    pub kind: Option<String>,
    /// An outcome's or a job's status (succeeded, retrying, dead_lettered, failed, ...).
    #[arg(long)]
    pub status: Option<String>,
    /// Only one type of document: event, outcome, job or dead_letter.
    #[arg(long = "type")]
    pub doc_type: Option<String>,
    /// Everything that carries this event id.
    #[arg(long)]
    pub event_id: Option<String>,
    /// From this time on (RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Up to this time (RFC 3339).
    #[arg(long)]
    pub until: Option<String>,
    /// Hits per page, at most 500.
    #[arg(long, default_value_t = 50)]
    pub size: u32,
    /// Where the page starts: the `next` cursor a previous page printed.
    #[arg(long)]
    pub cursor: Option<String>,
    /// The API's answer as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("`{0}` is not a URL for the auditor's search API")]
    Url(String),
    #[error("cannot reach the auditor at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the auditor answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("the auditor's answer is not JSON: {0}")]
    Answer(reqwest::Error),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot encode: {0}")]
    Encode(#[from] serde_json::Error),
}

pub async fn run(args: &AuditArgs, out: &mut impl Write) -> Result<(), AuditError> {
    match args.command.clone() {
        AuditCommand::Search(search) => {
            let SearchArgs {
                q,
                entity,
                op,
                key,
                actor,
                observer,
                kind,
                status,
                doc_type,
                event_id,
                since,
                until,
                size,
                cursor,
                json,
            } = *search;
            let size = size.to_string();
            let pairs = [
                ("q", q),
                ("entity", entity),
                ("op", op),
                ("key", key),
                ("actor", actor),
                ("observer", observer),
                ("kind", kind),
                ("status", status),
                ("type", doc_type),
                ("event_id", event_id),
                ("since", since),
                ("until", until),
                ("size", Some(size)),
                ("cursor", cursor),
            ];
            let query: Vec<(&str, String)> = pairs
                .into_iter()
                .filter_map(|(name, value)| value.map(|v| (name, v)))
                .collect();
            let answer = get(args, "/v1/search", &query).await?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&answer)?)?;
                return Ok(());
            }
            let hits = answer["hits"].as_array().cloned().unwrap_or_default();
            table(out, &hits)?;
            if let Some(next) = answer["next_cursor"].as_str() {
                writeln!(out, "next: --cursor {next}")?;
            }
        }
        AuditCommand::Trail { event_id, json } => {
            let answer = get(args, &format!("/v1/trail/{event_id}"), &[]).await?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&answer)?)?;
                return Ok(());
            }
            let mut rows: Vec<Value> = answer["event"]
                .as_object()
                .map(|_| answer["event"].clone())
                .into_iter()
                .collect();
            rows.extend(answer["items"].as_array().cloned().unwrap_or_default());
            table(out, &rows)?;
            if answer["truncated"] == true {
                writeln!(
                    out,
                    "(truncated: the trail has more documents than one answer holds)"
                )?;
            }
        }
    }
    Ok(())
}

async fn get(args: &AuditArgs, path: &str, query: &[(&str, String)]) -> Result<Value, AuditError> {
    let base = args.audit_url.trim_end_matches('/');
    let mut url = url::Url::parse(&format!("{base}{path}"))
        .map_err(|_| AuditError::Url(args.audit_url.clone()))?;
    if !query.is_empty() {
        url.query_pairs_mut()
            .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
    }
    let response = reqwest::Client::new()
        .get(url)
        .bearer_auth(&args.token)
        .send()
        .await
        .map_err(|source| AuditError::Unreachable {
            url: args.audit_url.clone(),
            source,
        })?;
    let status = response.status().as_u16();
    let body: Value = response.json().await.map_err(AuditError::Answer)?;
    if status != 200 {
        let message = body["error"]
            .as_str()
            .map_or_else(|| body.to_string(), str::to_owned);
        return Err(AuditError::Refused { status, message });
    }
    Ok(body)
}

fn table(out: &mut impl Write, rows: &[Value]) -> std::io::Result<()> {
    writeln!(out, "{:<24}  {:<11}  {:<44}  WHAT", "AT", "TYPE", "ID")?;
    for row in rows {
        writeln!(
            out,
            "{:<24}  {:<11}  {:<44}  {}",
            time(&row["at"]),
            text(&row["type"]),
            text(&row["id"]),
            what(row)
        )?;
    }
    Ok(())
}

/// One line saying what a document records.
pub fn what(row: &Value) -> String {
    let t = |name: &str| text(&row[name]);
    match row["type"].as_str() {
        Some("event") => {
            let changed = row["changed"]
                .as_array()
                .map(|c| c.iter().map(text).collect::<Vec<_>>().join(","))
                .map_or_else(String::new, |c| format!(" ({c})"));
            format!(
                "{} {} {}{changed} by {}",
                t("entity"),
                t("key"),
                t("op"),
                or_dash(&row["actor"])
            )
        }
        Some("outcome") => format!(
            "{} {} attempt {}: {} (HTTP {}, {} ms){}",
            t("kind"),
            t("observer"),
            t("attempt"),
            t("status"),
            or_dash(&row["http_status"]),
            t("latency_ms"),
            error(row)
        ),
        Some("job") => format!(
            "job {} ({} on {}) attempt {}: {}{}",
            t("job_id"),
            t("job_type"),
            t("queue"),
            t("attempt"),
            t("status"),
            error(row)
        ),
        Some("dead_letter") => format!("dead letter of {}{}", t("original_subject"), error(row)),
        _ => String::new(),
    }
}

/// A time to the millisecond, so the column stays one width.
fn time(value: &Value) -> String {
    value
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map_or_else(
            || text(value),
            |t| {
                t.with_timezone(&chrono::Utc)
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            },
        )
}

fn error(row: &Value) -> String {
    match row["error"].as_str() {
        Some(e) if !e.is_empty() => format!(": {e}"),
        _ => String::new(),
    }
}

fn or_dash(value: &Value) -> String {
    if value.is_null() {
        "-".into()
    } else {
        text(value)
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_type_of_document_reads_as_one_line() {
        let event = json!({"type": "event", "entity": "Order", "key": "1042", "op": "update", "changed": ["status"], "actor": null});
        assert_eq!(what(&event), "Order 1042 update (status) by -");
        let outcome = json!({"type": "outcome", "kind": "webhook", "observer": "notify", "attempt": 2, "status": "retrying", "http_status": 503, "latency_ms": 40, "error": "receiver answered 503"});
        assert_eq!(
            what(&outcome),
            "webhook notify attempt 2: retrying (HTTP 503, 40 ms): receiver answered 503"
        );
        let letter = json!({"type": "dead_letter", "original_subject": "herald.actions.slack.s", "error": "410"});
        assert_eq!(what(&letter), "dead letter of herald.actions.slack.s: 410");
    }
}
