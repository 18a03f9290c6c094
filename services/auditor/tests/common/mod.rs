//! What the auditor's tests share: a stack (a real nats-server, a cluster, the auditor started
//! in-process), message builders for the four kinds, and the search API as a client sees it.
//!
//! The cluster is an osmem-server the harness starts, or, for the `elasticsearch` suite, the
//! real cluster at `HERALD_TEST_ELASTICSEARCH_URL` (each stack then gets its own index prefix,
//! so tests sharing that cluster never see each other's documents).

#![allow(dead_code)]

pub mod faulty;
pub mod scenarios;

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use chrono::{DateTime, Utc};
use herald_auditor::{Auditor, AuditorSettings, Kind};
use herald_shared::dlq::{self, DeadLetter};
use herald_shared::subjects::{self, DlqSource};
use herald_shared::{
    ActionOutcome, EntityEvent, JobState, JobStatus, Op, OutcomeStatus, SCHEMA_VERSION, headers,
};
use herald_test_support::{NatsServer, OpenSearchServer, eventually_async};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const WAIT: Duration = Duration::from_secs(30);
pub const TOKEN: &str = "auditor-test-token-0123456789";

/// Where the documents go.
pub enum Backend {
    /// An osmem-server started for this test.
    Osmem,
    /// A real cluster someone runs, at this URL.
    External(String),
}

impl Backend {
    /// The real Elasticsearch of `HERALD_TEST_ELASTICSEARCH_URL`, or `None` with the reason the
    /// suite is skipped printed.
    pub fn elasticsearch() -> Option<Self> {
        match std::env::var("HERALD_TEST_ELASTICSEARCH_URL") {
            Ok(url) if !url.is_empty() => Some(Backend::External(url)),
            _ => {
                eprintln!(
                    "skipped: HERALD_TEST_ELASTICSEARCH_URL is not set (point it at an \
                     Elasticsearch or OpenSearch node to run this suite against it)"
                );
                None
            }
        }
    }
}

pub struct Stack {
    pub nats: NatsServer,
    pub js: jetstream::Context,
    pub osmem: Option<OpenSearchServer>,
    pub cluster_url: String,
    pub prefix: String,
    pub auditor: Option<Auditor>,
    pub shutdown: CancellationToken,
    pub http: reqwest::Client,
    pub api: String,
}

/// Settings with short timers, so retries and redeliveries happen within a test's patience.
pub fn settings(cluster_url: &str, prefix: &str) -> AuditorSettings {
    AuditorSettings {
        cluster_url: cluster_url.to_owned(),
        // Generous: the test machine may be busy building; a slow answer is not what is tested.
        request_timeout: Duration::from_secs(5),
        index_prefix: prefix.to_owned(),
        bulk_max_docs: 200,
        bulk_max_wait: Duration::from_millis(50),
        retry_initial_delay: Duration::from_millis(50),
        retry_max_delay: Duration::from_millis(500),
        ack_wait: Duration::from_secs(10),
        api_token: TOKEN.to_owned(),
        ..AuditorSettings::default()
    }
}

impl Stack {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    /// A stack whose auditor settings `adjust` changes first.
    pub async fn start_with(backend: Backend, adjust: impl FnOnce(&mut AuditorSettings)) -> Self {
        let (osmem, cluster_url, prefix) = match backend {
            Backend::Osmem => {
                let server = OpenSearchServer::start();
                let url = server.url();
                (Some(server), url, "herald".to_owned())
            }
            Backend::External(url) => {
                let prefix = format!("herald-test-{}", Uuid::now_v7().simple());
                (None, url, prefix)
            }
        };
        Self::start_on(osmem, cluster_url, prefix, adjust).await
    }

    /// A stack whose auditor talks to `cluster_url` (a fault double, say) while documents are
    /// stored in `osmem`.
    pub async fn start_on(
        osmem: Option<OpenSearchServer>,
        cluster_url: String,
        prefix: String,
        adjust: impl FnOnce(&mut AuditorSettings),
    ) -> Self {
        let nats = NatsServer::start();
        let js = nats.jetstream().await;
        herald_shared::streams::ensure_all(&js, &Default::default())
            .await
            .expect("streams");
        let mut stack = Self {
            nats,
            js,
            osmem,
            cluster_url,
            prefix,
            auditor: None,
            shutdown: CancellationToken::new(),
            http: reqwest::Client::new(),
            api: String::new(),
        };
        stack.start_auditor(adjust).await;
        stack
    }

    pub async fn start_auditor(&mut self, adjust: impl FnOnce(&mut AuditorSettings)) {
        let mut settings = settings(&self.cluster_url, &self.prefix);
        adjust(&mut settings);
        self.shutdown = CancellationToken::new();
        let auditor = Auditor::start(self.js.clone(), settings, self.shutdown.clone())
            .await
            .expect("auditor starts");
        self.api = format!("http://{}", auditor.api_address);
        self.auditor = Some(auditor);
    }

    /// Stops the auditor gracefully and waits for it.
    pub async fn stop_auditor(&mut self) {
        self.shutdown.cancel();
        if let Some(auditor) = self.auditor.take() {
            auditor.wait().await;
        }
    }

    /// The readiness failures, as `/ready` would list them.
    pub async fn not_ready(&self) -> Vec<String> {
        match &self.auditor {
            Some(a) => a.readiness.failures().await,
            None => vec!["not running".into()],
        }
    }

    pub async fn get(&self, path: &str, query: &[(&str, &str)]) -> (u16, Value) {
        let mut url = url::Url::parse(&format!("{}{path}", self.api)).expect("API URL");
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let response = self
            .http
            .get(url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("the search API answers");
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    pub async fn search(&self, query: &[(&str, &str)]) -> Value {
        let (status, body) = self.get("/v1/search", query).await;
        assert_eq!(status, 200, "search {query:?}: {body}");
        body
    }

    /// Polls until the search returns exactly `n` hits.
    pub async fn search_until(&self, query: &[(&str, &str)], n: usize) -> Vec<Value> {
        eventually_async(&format!("{n} hits for {query:?}"), WAIT, || async {
            // A 503 (the cluster slow or not up yet) is one more reason to poll again.
            let (status, body) = self.get("/v1/search", query).await;
            let hits = body["hits"].as_array().cloned().unwrap_or_default();
            (status == 200 && hits.len() == n).then_some(hits)
        })
        .await
    }

    pub async fn trail(&self, event_id: Uuid) -> (u16, Value) {
        self.get(&format!("/v1/trail/{event_id}"), &[]).await
    }

    /// Documents of one kind straight from the cluster, bypassing the API.
    pub async fn count(&self, kind: Kind) -> u64 {
        let url = format!(
            "{}/{}/_count?allow_no_indices=true&ignore_unavailable=true",
            self.storage_url(),
            kind.pattern(&self.prefix)
        );
        let body: Value = self
            .http
            .get(url)
            .send()
            .await
            .expect("count")
            .json()
            .await
            .expect("count answer");
        body["count"].as_u64().unwrap_or(0)
    }

    /// Where documents are stored (the real cluster, even when the auditor talks to a double).
    pub fn storage_url(&self) -> String {
        self.osmem
            .as_ref()
            .map_or_else(|| self.cluster_url.clone(), OpenSearchServer::url)
    }

    /// Unprocessed messages of one indexer: not yet delivered plus delivered but unacked.
    pub async fn backlog(&self, kind: Kind) -> u64 {
        let (spec, _) = herald_auditor::indexer::source(kind);
        let name = herald_auditor::indexer::consumer_name("auditor", kind);
        let stream = self.js.get_stream(spec.name).await.expect("stream");
        match stream.consumer_info(&name).await {
            Ok(info) => info.num_pending + info.num_ack_pending as u64,
            Err(_) => u64::MAX,
        }
    }

    /// Waits until every indexer has settled everything published so far.
    pub async fn settled(&self) {
        for kind in Kind::ALL {
            eventually_async(&format!("the {kind:?} backlog to drain"), WAIT, || async {
                (self.backlog(kind).await == 0).then_some(())
            })
            .await;
        }
    }

    pub async fn publish(&self, subject: String, body: Vec<u8>, msg_id: &str) {
        let mut headers = HeaderMap::new();
        headers.insert(headers::MSG_ID, msg_id);
        self.publish_with(subject, body, headers).await;
    }

    pub async fn publish_with(&self, subject: String, body: Vec<u8>, headers: HeaderMap) {
        self.js
            .send_publish(
                subject,
                PublishMessage::build()
                    .payload(body.into())
                    .headers(headers),
            )
            .await
            .expect("publish")
            .await
            .expect("stored");
    }

    pub async fn publish_event(&self, event: &EntityEvent) {
        let subject = subjects::event(&event.entity, event.op).expect("subject");
        let body = serde_json::to_vec(event).expect("encode");
        self.publish(subject, body, &event.id.to_string()).await;
    }

    pub async fn publish_outcome(&self, outcome: &ActionOutcome) {
        let subject = subjects::outcome(&outcome.kind, &outcome.observer).expect("subject");
        let body = serde_json::to_vec(outcome).expect("encode");
        self.publish(subject, body, &outcome.msg_id()).await;
    }

    pub async fn publish_job(&self, status: &JobStatus) {
        let subject = subjects::job_status(&status.queue).expect("subject");
        let body = serde_json::to_vec(status).expect("encode");
        self.publish(subject, body, &status.msg_id()).await;
    }

    /// Dead-letters `body` the way a worker does, as if it came from `original_subject`.
    pub async fn publish_dead_letter(
        &self,
        source: DlqSource,
        original_subject: &str,
        original_msg_id: &str,
        body: Vec<u8>,
        error: &str,
    ) {
        let letter = DeadLetter {
            source,
            original_subject: original_subject.to_owned(),
            original_msg_id: original_msg_id.to_owned(),
            error: error.to_owned(),
            attempts: 3,
            first_failed_at: Utc::now(),
        };
        dlq::publish(&self.js, &letter, body.into(), None, "action-worker")
            .await
            .expect("dead letter stored");
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn event(entity: &str, op: Op, key: &str, data: Value) -> EntityEvent {
    event_at(entity, op, key, data, Utc::now())
}

pub fn event_at(entity: &str, op: Op, key: &str, data: Value, at: DateTime<Utc>) -> EntityEvent {
    EntityEvent {
        id: Uuid::now_v7(),
        entity: entity.to_owned(),
        op,
        key: key.to_owned(),
        before: (op != Op::Insert).then(|| json!({"id": key, "status": "paid"})),
        changed: (op == Op::Update).then(|| vec!["status".to_owned()]),
        data: (op != Op::Delete).then_some(data),
        at,
        actor: Some("user-7".into()),
        tx: 4242,
        schema_version: SCHEMA_VERSION,
    }
}

pub fn action_id(event: &EntityEvent) -> String {
    format!("{}:notify:0", event.id)
}

pub fn outcome(
    event: &EntityEvent,
    attempt: u32,
    status: OutcomeStatus,
    http: u16,
    at: DateTime<Utc>,
) -> ActionOutcome {
    ActionOutcome {
        action_id: action_id(event),
        event_id: event.id,
        kind: "webhook".into(),
        observer: "notify".into(),
        attempt,
        status,
        latency_ms: 17 * u64::from(attempt),
        error: (status != OutcomeStatus::Succeeded).then(|| format!("receiver answered {http}")),
        http_status: Some(http),
        at,
        schema_version: SCHEMA_VERSION,
    }
}

pub fn job(event: &EntityEvent, state: JobState, attempt: u32, at: DateTime<Utc>) -> JobStatus {
    JobStatus {
        job_id: action_id(event),
        queue: "default".into(),
        job_type: "http".into(),
        state,
        attempt,
        error: None,
        result: (state == JobState::Succeeded).then(|| json!({"status": 200})),
        at,
        schema_version: SCHEMA_VERSION,
    }
}

pub fn ids(hits: &[Value]) -> Vec<String> {
    hits.iter()
        .map(|h| h["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}
