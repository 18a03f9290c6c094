//! Bearer-token authentication as a tower layer in front of every Flight RPC: a request
//! without `authorization: Bearer <token>` is answered `Unauthenticated` before any service
//! code runs. Handshake passes through, because it is how a client that only has the token
//! gets the header (pyarrow's `authenticate_basic_token(user, token)`; see `service`).

use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine;
use futures::future::{Either, Ready, ready};
use tonic::codegen::http;
use tower::{Layer, Service};

const HANDSHAKE: &str = "/arrow.flight.protocol.FlightService/Handshake";

/// The configured token, compared in constant time.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl Token {
    pub fn new(token: &str) -> Self {
        Self(Arc::from(token))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, offered: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), offered.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// True when `authorization` is `Bearer <token>`.
    pub fn bearer(&self, authorization: Option<&str>) -> bool {
        authorization
            .and_then(|value| value.strip_prefix("Bearer "))
            .is_some_and(|offered| self.matches(offered.trim()))
    }

    /// True when `authorization` is `Basic base64(<any user>:<token>)`.
    pub fn basic(&self, authorization: Option<&str>) -> bool {
        authorization
            .and_then(|value| value.strip_prefix("Basic "))
            .and_then(|encoded| {
                base64::engine::general_purpose::STANDARD
                    .decode(encoded.trim())
                    .ok()
            })
            .and_then(|decoded| String::from_utf8(decoded).ok())
            .and_then(|pair| {
                pair.split_once(':')
                    .map(|(_, password)| self.matches(password))
            })
            .unwrap_or(false)
    }
}

#[derive(Clone)]
pub struct BearerAuth {
    token: Token,
}

impl BearerAuth {
    pub fn new(token: Token) -> Self {
        Self { token }
    }
}

impl<S> Layer<S> for BearerAuth {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            token: self.token.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    token: Token,
}

impl<S, B, ResBody> Service<http::Request<B>> for Authenticated<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let authorization = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if request.uri().path() == HANDSHAKE || self.token.bearer(authorization) {
            return Either::Left(self.inner.call(request));
        }
        metrics::counter!("herald_flight_unauthenticated_total").increment(1);
        let status = tonic::Status::unauthenticated(
            "send `authorization: Bearer <token>` (or Handshake with the token first)",
        );
        Either::Right(ready(Ok(status.into_http())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_passes() {
        let token = Token::new("flight-dev-token-0123456789");
        assert!(token.bearer(Some("Bearer flight-dev-token-0123456789")));
        assert!(!token.bearer(Some("Bearer flight-dev-token-012345678")));
        assert!(!token.bearer(Some("flight-dev-token-0123456789")));
        assert!(!token.bearer(None));
        let basic =
            base64::engine::general_purpose::STANDARD.encode("me:flight-dev-token-0123456789");
        assert!(token.basic(Some(&format!("Basic {basic}"))));
        let wrong = base64::engine::general_purpose::STANDARD.encode("me:nope");
        assert!(!token.basic(Some(&format!("Basic {wrong}"))));
    }
}
