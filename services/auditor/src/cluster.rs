//! The Elasticsearch or OpenSearch cluster, through the `elasticsearch` crate: which
//! distribution it is (from `GET /`), the index templates (installed at start and again after an
//! outage, since the cluster that comes back may be a fresh one), searches, and the index
//! listing and deletion that retention needs. Every answer is read into `ClusterError` variants
//! callers can match; the cluster's own words go to the logs, never to API callers.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use bytes::Bytes;
use elasticsearch::cat::CatIndicesParts;
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::indices::{
    IndicesDeleteParts, IndicesPutIndexTemplateParts, IndicesPutMappingParts,
};
use elasticsearch::{BulkParts, Elasticsearch, SearchParts, auth::Credentials};
use serde_json::{Value, json};

use crate::document::{Kind, common_properties};
use crate::settings::AuditorSettings;

/// Which search engine answers: they differ in the name of the flattened field type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Elasticsearch,
    OpenSearch,
}

impl Flavor {
    /// The field type that indexes a whole JSON object as one field.
    pub fn flat_type(self) -> &'static str {
        match self {
            Flavor::Elasticsearch => "flattened",
            Flavor::OpenSearch => "flat_object",
        }
    }

    /// Reads the distribution from the answer to `GET /`.
    pub fn from_root(root: &Value) -> Self {
        match root
            .pointer("/version/distribution")
            .and_then(Value::as_str)
        {
            Some("opensearch") => Flavor::OpenSearch,
            _ => Flavor::Elasticsearch,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("the cluster cannot be reached: {0}")]
    Unreachable(String),
    #[error("the cluster answered {status}: {reason}")]
    Status { status: u16, reason: String },
    #[error("the cluster's answer cannot be read: {0}")]
    Malformed(String),
    #[error("cannot set up the cluster client: {0}")]
    Client(String),
}

impl ClusterError {
    /// Worth sending again later: the cluster is down, slow, overloaded or failing inside.
    pub fn is_transient(&self) -> bool {
        match self {
            ClusterError::Unreachable(_) | ClusterError::Malformed(_) => true,
            ClusterError::Status { status, .. } => crate::classify::is_transient(*status),
            ClusterError::Client(_) => false,
        }
    }
}

fn unreachable(e: elasticsearch::Error) -> ClusterError {
    ClusterError::Unreachable(e.to_string())
}

pub struct Cluster {
    client: Elasticsearch,
    prefix: String,
    /// 0: not known yet, 1: Elasticsearch, 2: OpenSearch.
    flavor: AtomicU8,
}

/// A readiness probe must answer quickly even when the cluster hangs.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

impl Cluster {
    /// A client for the configured node; nothing is sent yet.
    pub fn new(settings: &AuditorSettings) -> Result<Self, ClusterError> {
        let url = url::Url::parse(&settings.cluster_url)
            .map_err(|e| ClusterError::Client(format!("cluster_url: {e}")))?;
        let mut builder = TransportBuilder::new(SingleNodeConnectionPool::new(url))
            .timeout(settings.request_timeout)
            .enable_meta_header(false);
        if let (Some(user), Some(password)) = (&settings.cluster_user, &settings.cluster_password) {
            builder = builder.auth(Credentials::Basic(user.clone(), password.clone()));
        }
        let transport = builder
            .build()
            .map_err(|e| ClusterError::Client(e.to_string()))?;
        Ok(Self {
            client: Elasticsearch::new(transport),
            prefix: settings.index_prefix.clone(),
            flavor: AtomicU8::new(0),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The distribution last read from the cluster, if any yet.
    pub fn flavor(&self) -> Option<Flavor> {
        match self.flavor.load(Ordering::Relaxed) {
            1 => Some(Flavor::Elasticsearch),
            2 => Some(Flavor::OpenSearch),
            _ => None,
        }
    }

    /// Asks the cluster what it is, then installs (or overwrites, idempotently) one index
    /// template per kind with a strict mapping: a field nobody declared is refused, never
    /// guessed. A template shapes only indices created after it, so the same properties are put
    /// on the kind's existing indices too: a field a newer auditor adds (the dead letters'
    /// `kind`, say) is then accepted in this month's index, not refused by its strict mapping.
    pub async fn setup(&self) -> Result<Flavor, ClusterError> {
        let root = read(self.client.info().send().await.map_err(unreachable)?).await?;
        let flavor = Flavor::from_root(&root);
        self.flavor.store(
            match flavor {
                Flavor::Elasticsearch => 1,
                Flavor::OpenSearch => 2,
            },
            Ordering::Relaxed,
        );
        for kind in Kind::ALL {
            let name = format!("{}-{}", self.prefix, kind.index_part());
            let template = template(kind, &self.prefix, flavor);
            let properties = json!({"properties": template["template"]["mappings"]["properties"]});
            let response = self
                .client
                .indices()
                .put_index_template(IndicesPutIndexTemplateParts::Name(&name))
                .body(template)
                .send()
                .await
                .map_err(unreachable)?;
            read(response).await?;
            let pattern = kind.pattern(&self.prefix);
            let response = self
                .client
                .indices()
                .put_mapping(IndicesPutMappingParts::Index(&[&pattern]))
                .allow_no_indices(true)
                .ignore_unavailable(true)
                .body(properties)
                .send()
                .await
                .map_err(unreachable)?;
            read(response).await?;
        }
        tracing::info!(?flavor, prefix = %self.prefix, "index templates and mappings installed");
        Ok(flavor)
    }

    /// Whether the cluster answers at all, quickly.
    pub async fn ping(&self) -> Result<(), ClusterError> {
        let response = self
            .client
            .info()
            .request_timeout(PING_TIMEOUT)
            .send()
            .await
            .map_err(unreachable)?;
        read(response).await.map(|_| ())
    }

    /// Sends one bulk body (NDJSON lines) and returns its answer, whatever the items say.
    pub async fn bulk(&self, lines: Vec<Bytes>) -> Result<Value, ClusterError> {
        let response = self
            .client
            .bulk(BulkParts::None)
            .body(lines)
            .send()
            .await
            .map_err(unreachable)?;
        read(response).await
    }

    /// Runs a search over `indices` (wildcards that match nothing give no hits, not an error).
    pub async fn search(&self, indices: &str, body: Value) -> Result<Value, ClusterError> {
        let response = self
            .client
            .search(SearchParts::Index(&[indices]))
            .allow_no_indices(true)
            .ignore_unavailable(true)
            .body(body)
            .send()
            .await
            .map_err(unreachable)?;
        read(response).await
    }

    /// The names of the indices matching `pattern`.
    pub async fn indices(&self, pattern: &str) -> Result<Vec<String>, ClusterError> {
        let response = self
            .client
            .cat()
            .indices(CatIndicesParts::Index(&[pattern]))
            .format("json")
            .h(&["index"])
            .send()
            .await
            .map_err(unreachable)?;
        let rows = read(response).await?;
        Ok(rows
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|row| row.get("index").and_then(Value::as_str).map(str::to_owned))
            .collect())
    }

    pub async fn delete_index(&self, index: &str) -> Result<(), ClusterError> {
        let response = self
            .client
            .indices()
            .delete(IndicesDeleteParts::Index(&[index]))
            .send()
            .await
            .map_err(unreachable)?;
        read(response).await.map(|_| ())
    }

    /// Makes recent writes visible to searches at once (tests and the bench use it).
    pub async fn refresh(&self) -> Result<(), ClusterError> {
        let response = self
            .client
            .indices()
            .refresh(elasticsearch::indices::IndicesRefreshParts::Index(&[
                &crate::document::all_patterns(&self.prefix),
            ]))
            .allow_no_indices(true)
            .send()
            .await
            .map_err(unreachable)?;
        read(response).await.map(|_| ())
    }
}

/// The body of a 2xx answer as JSON, or the answer as an error.
async fn read(response: elasticsearch::http::response::Response) -> Result<Value, ClusterError> {
    let status = response.status_code().as_u16();
    let text = response.text().await.map_err(unreachable)?;
    if !(200..300).contains(&status) {
        return Err(ClusterError::Status {
            status,
            reason: error_reason(&text),
        });
    }
    serde_json::from_str(&text).map_err(|e| ClusterError::Malformed(e.to_string()))
}

/// `type: reason` from an error answer, or its start when it is not the usual shape.
pub fn error_reason(text: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(text).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    match error {
        Some(Value::Object(e)) => describe(e),
        Some(Value::String(s)) => s.clone(),
        _ => text.chars().take(200).collect(),
    }
}

/// `type: reason` of one error object, as the cluster puts it.
pub fn describe(error: &serde_json::Map<String, Value>) -> String {
    let ty = error.get("type").and_then(Value::as_str).unwrap_or("error");
    let reason = error.get("reason").and_then(Value::as_str).unwrap_or("");
    format!("{ty}: {reason}")
}

/// The index template of one kind.
pub fn template(kind: Kind, prefix: &str, flavor: Flavor) -> Value {
    let mut properties = common_properties();
    properties.extend(kind.properties(flavor.flat_type()));
    json!({
        "index_patterns": [kind.pattern(prefix)],
        "priority": 200,
        "template": {
            "mappings": {
                "dynamic": "strict",
                "properties": properties,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_distribution_picks_the_flattened_type() {
        let opensearch = json!({"version": {"distribution": "opensearch", "number": "2.17.0"}});
        let elastic = json!({"version": {"number": "9.1.0", "build_flavor": "default"}});
        assert_eq!(Flavor::from_root(&opensearch).flat_type(), "flat_object");
        assert_eq!(Flavor::from_root(&elastic).flat_type(), "flattened");
    }

    #[test]
    fn templates_are_strict_and_map_rows_as_one_field() {
        let t = template(Kind::Event, "herald", Flavor::OpenSearch);
        assert_eq!(t["index_patterns"][0], "herald-events-*");
        let mappings = &t["template"]["mappings"];
        assert_eq!(mappings["dynamic"], "strict");
        assert_eq!(mappings["properties"]["data"]["type"], "flat_object");
        assert_eq!(mappings["properties"]["changed"]["type"], "keyword");
        assert_eq!(mappings["properties"]["at"]["type"], "date");
    }

    #[test]
    fn error_reasons_are_read_from_the_usual_shape_or_cut_short() {
        let text = r#"{"error":{"type":"index_not_found_exception","reason":"no such index"}}"#;
        assert_eq!(
            error_reason(text),
            "index_not_found_exception: no such index"
        );
        assert_eq!(error_reason(&"x".repeat(500)).len(), 200);
    }
}
