//! The `slack` kind: a message to a Slack incoming webhook, `{"text": ...}` rendered from a
//! template over the triggering event. Failures classify like any HTTP action.
//!
//! Config: `webhook_url` (required), `text` (a template, required), `timeout_ms` (default the
//! request's).

use std::time::Duration;

use futures::future::BoxFuture;
use herald_shared::ActionRequest;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use serde::Deserialize;
use url::Url;

use crate::error::ActionError;
use crate::http::{self, Http};
use crate::kind::{self, ActionKind, Success};
use crate::template;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    pub webhook_url: Url,
    pub text: String,
    pub timeout_ms: Option<u64>,
}

pub struct Slack {
    http: Http,
}

impl Slack {
    pub fn new(http: Http) -> Self {
        Self { http }
    }

    async fn run(&self, request: &ActionRequest) -> Result<Success, ActionError> {
        let config: SlackConfig = kind::config(request)?;
        let text = template::render(&config.text, &kind::event_json(request));
        let body = serde_json::to_vec(&serde_json::json!({ "text": text }))
            .map_err(|e| ActionError::permanent(format!("cannot serialise the message: {e}")))?;
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let timeout = Duration::from_millis(config.timeout_ms.unwrap_or(request.timeout_ms).max(1));
        self.http
            .send(
                reqwest::Method::POST,
                &config.webhook_url,
                headers,
                body,
                timeout,
            )
            .await
    }
}

impl ActionKind for Slack {
    fn name(&self) -> &'static str {
        "slack"
    }

    fn destination(&self, request: &ActionRequest) -> Result<Option<String>, ActionError> {
        let config: SlackConfig = kind::config(request)?;
        Ok(Some(http::destination(&config.webhook_url)))
    }

    fn execute<'a>(
        &'a self,
        request: &'a ActionRequest,
    ) -> BoxFuture<'a, Result<Success, ActionError>> {
        Box::pin(self.run(request))
    }
}
