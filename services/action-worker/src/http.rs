//! Delivering an HTTP request and classifying the answer, shared by the webhook and slack kinds:
//! 2xx is success; 408, 429, 5xx, timeouts and connection errors are transient; any other status
//! is permanent. `Retry-After` (seconds or an HTTP date) is read from every failure so the worker
//! can wait at least that long. Redirects are not followed: a receiver that redirects gets a
//! permanent failure rather than a way around the SSRF guard.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::header::{HeaderMap, RETRY_AFTER};
use url::Url;

use crate::ca::ExtraRoots;
use crate::error::{ActionError, Failure, is_transient_status};
use crate::kind::Success;
use crate::ssrf::SsrfGuard;

/// How much of a failed answer goes into the DLQ and the outcome.
const SNIPPET_LEN: usize = 512;

#[derive(Debug, Clone)]
pub struct Http {
    client: reqwest::Client,
    guard: SsrfGuard,
}

impl Http {
    /// A client trusting the platform's roots, plus `extra` (`service.ca_file`) when given.
    pub fn new(guard: SsrfGuard, extra: Option<&ExtraRoots>) -> Result<Self, reqwest::Error> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("herald-action-worker/", env!("CARGO_PKG_VERSION")));
        if let Some(extra) = extra {
            builder = builder.tls_certs_merge(extra.http.iter().cloned());
        }
        let client = builder.build()?;
        Ok(Self { client, guard })
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        url: &Url,
        headers: HeaderMap,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Success, ActionError> {
        self.guard.check(url).await?;
        let response = self
            .client
            .request(method, url.clone())
            .headers(headers)
            .body(body)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| {
                if e.is_builder() {
                    ActionError::permanent(format!("cannot build the request to {url}: {e}"))
                } else {
                    ActionError::transient(format!("request to {url} failed: {}", describe(&e)))
                }
            })?;
        let status = response.status().as_u16();
        if response.status().is_success() {
            return Ok(Success {
                http_status: Some(status),
            });
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, Utc::now()));
        // The snippet is best effort: a receiver that fails and then hangs must not hold us.
        let snippet = match tokio::time::timeout(timeout, response.bytes()).await {
            Ok(Ok(bytes)) => Some(snippet(&bytes)),
            _ => None,
        };
        let failure = Failure {
            reason: format!("{url} answered HTTP {status}"),
            http_status: Some(status),
            snippet,
            retry_after,
        };
        Err(if is_transient_status(status) {
            ActionError::Transient(failure)
        } else {
            ActionError::Permanent(failure)
        })
    }
}

/// The `host:port` a URL's requests go to: the unit of the circuit breaker.
pub fn destination(url: &Url) -> String {
    format!(
        "{}:{}",
        url.host_str().unwrap_or_default(),
        url.port_or_known_default().unwrap_or_default()
    )
}

fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    if e.is_timeout() {
        text.push_str(" (timed out)");
    }
    text
}

fn snippet(body: &[u8]) -> String {
    let cut = body.len().min(SNIPPET_LEN);
    String::from_utf8_lossy(&body[..cut]).into_owned()
}

/// `Retry-After` as a delay from `now`: delta seconds or an HTTP date (RFC 9110 §10.2.3).
pub fn retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .expect("time")
            .with_timezone(&Utc);
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", now), None);
    }

    #[test]
    fn destinations_include_the_port() {
        let url = Url::parse("https://hooks.example.com/x").expect("url");
        assert_eq!(destination(&url), "hooks.example.com:443");
    }
}
