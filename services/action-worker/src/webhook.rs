//! The `webhook` kind: an HTTP request to the observer's URL, signed per Standard Webhooks
//! (`webhook-id` = action id, so a receiver can absorb the repeats a crash may cause;
//! `webhook-timestamp`; `webhook-signature` = `v1,` + base64 HMAC-SHA256 of `id.timestamp.body`).
//!
//! Config (`config` of the action):
//! - `url` (required), `method` (default `POST`),
//! - `headers`: name → value template,
//! - `body`: a template; default the triggering event as JSON,
//! - `secret`: a `whsec_` secret; default the worker's `service.webhook_secrets.<observer>`;
//!   without either the request goes unsigned,
//! - `timeout_ms`: default the request's `timeout_ms`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures::future::BoxFuture;
use herald_shared::ActionRequest;
use hmac::{Hmac, Mac};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use sha2::Sha256;
use url::Url;

use crate::error::ActionError;
use crate::http::{self, Http};
use crate::kind::{self, ActionKind, Success};
use crate::template;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: Url,
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub body: Option<String>,
    pub secret: Option<String>,
    pub timeout_ms: Option<u64>,
}

fn default_method() -> String {
    "POST".into()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("a webhook secret must start with `whsec_`")]
    Prefix,
    #[error("the part after `whsec_` is not base64: {0}")]
    Base64(String),
}

/// The key bytes of a `whsec_<base64>` secret.
pub fn secret_key(secret: &str) -> Result<Vec<u8>, SecretError> {
    let encoded = secret.strip_prefix("whsec_").ok_or(SecretError::Prefix)?;
    STANDARD
        .decode(encoded)
        .map_err(|e| SecretError::Base64(e.to_string()))
}

/// The `webhook-signature` value for one delivery.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

pub struct Webhook {
    http: Http,
    secrets: HashMap<String, String>,
}

impl Webhook {
    /// `secrets`: observer name → `whsec_` secret.
    pub fn new(http: Http, secrets: HashMap<String, String>) -> Self {
        Self { http, secrets }
    }

    async fn run(&self, request: &ActionRequest) -> Result<Success, ActionError> {
        let config: WebhookConfig = kind::config(request)?;
        let method = reqwest::Method::from_bytes(config.method.to_ascii_uppercase().as_bytes())
            .map_err(|e| ActionError::bad_config("webhook", format!("method: {e}")))?;
        let event = kind::event_json(request);
        let body = match &config.body {
            Some(t) => template::render(t, &event).into_bytes(),
            None => serde_json::to_vec(&event)
                .map_err(|e| ActionError::permanent(format!("cannot serialise the event: {e}")))?,
        };

        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in &config.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| ActionError::bad_config("webhook", format!("header `{name}`: {e}")))?;
            let value = HeaderValue::from_str(&template::render(value, &event))
                .map_err(|e| ActionError::bad_config("webhook", format!("header `{name}`: {e}")))?;
            headers.insert(name, value);
        }
        let timestamp = chrono::Utc::now().timestamp();
        let header = |v: &str| {
            HeaderValue::from_str(v)
                .map_err(|e| ActionError::permanent(format!("cannot send `{v}` as a header: {e}")))
        };
        headers.insert("webhook-id", header(&request.id)?);
        headers.insert("webhook-timestamp", header(&timestamp.to_string())?);
        if let Some(secret) = config
            .secret
            .as_ref()
            .or(self.secrets.get(&request.observer))
        {
            let key = secret_key(secret).map_err(|e| ActionError::bad_config("webhook", e))?;
            headers.insert(
                "webhook-signature",
                header(&sign(&key, &request.id, timestamp, &body))?,
            );
        }
        let timeout = Duration::from_millis(config.timeout_ms.unwrap_or(request.timeout_ms).max(1));
        self.http
            .send(method, &config.url, headers, body, timeout)
            .await
    }
}

impl ActionKind for Webhook {
    fn name(&self) -> &'static str {
        "webhook"
    }

    fn destination(&self, request: &ActionRequest) -> Result<Option<String>, ActionError> {
        let config: WebhookConfig = kind::config(request)?;
        Ok(Some(http::destination(&config.url)))
    }

    fn execute<'a>(
        &'a self,
        request: &'a ActionRequest,
    ) -> BoxFuture<'a, Result<Success, ActionError>> {
        Box::pin(self.run(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example of the Standard Webhooks reference implementations.
    #[test]
    fn signatures_match_the_standard_webhooks_example() {
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid secret");
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_without_the_prefix_or_with_bad_base64_are_refused() {
        assert_eq!(secret_key("abc"), Err(SecretError::Prefix));
        assert!(matches!(
            secret_key("whsec_!!"),
            Err(SecretError::Base64(_))
        ));
    }
}
