//! Who is calling: a JWT (`Authorization: Bearer`, HS256 with a shared secret or RS256 with the
//! keys of a JWKS file, chosen by the token's `kid`) or an API key (`X-Api-Key`). The JWT subject, or the name configured for the API
//! key, becomes the `actor` written into every event the caller's mutations produce.
//!
//! Roles, which the schema file's per-entity permissions name, come from the token's claim at
//! `jwt_roles_claim` (a JSON pointer, `/roles` by default) or from `api_key_roles`; a caller
//! without a credential has the single role `anonymous`.
//!
//! A credential that is present but wrong is refused outright (never downgraded to anonymous),
//! so a typo in a token cannot silently turn an attributed write into an unattributed one.

use std::collections::BTreeMap;
use std::path::PathBuf;

use axum::http::HeaderMap;
use herald_shared::config::{Files, Problems, Validate};
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

pub const API_KEY_HEADER: &str = "x-api-key";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// Shared secret for HS256 tokens.
    pub jwt_hs256_secret: Option<String>,
    /// JWKS file (`{"keys": [...]}`) with the RSA public keys for RS256 tokens.
    pub jwt_rs256_jwks_file: Option<PathBuf>,
    /// When set, a token's `iss` must equal it.
    pub jwt_issuer: Option<String>,
    /// When set, a token's `aud` must contain it.
    pub jwt_audience: Option<String>,
    /// API key → the actor it acts as.
    pub api_keys: BTreeMap<String, String>,
    /// Where a token's roles are (a JSON pointer to a string or a list of strings); `/roles`
    /// when unset. Hasura-style tokens: `/https:~1~1hasura.io~1jwt~1claims/x-hasura-allowed-roles`.
    pub jwt_roles_claim: Option<String>,
    /// An API key's actor → its roles.
    pub api_key_roles: BTreeMap<String, Vec<String>>,
    /// Refuse anonymous queries too (mutations always need a caller).
    pub queries_require_auth: bool,
}

impl Validate for AuthSettings {
    fn validate(&self, problems: &mut Problems) {
        if self.jwt_hs256_secret.as_ref().is_some_and(|s| s.len() < 32) {
            problems.push("jwt_hs256_secret", "must be at least 32 bytes");
        }
        if let Some(path) = &self.jwt_rs256_jwks_file
            && !path.is_file()
        {
            problems.push(
                "jwt_rs256_jwks_file",
                format!("{} is not a file", path.display()),
            );
        }
        if self.api_keys.keys().any(|k| k.len() < 16) {
            problems.push("api_keys", "every key must be at least 16 characters");
        }
        if let Some(pointer) = &self.jwt_roles_claim
            && !pointer.starts_with('/')
        {
            problems.push("jwt_roles_claim", "must be a JSON pointer such as /roles");
        }
        for actor in self.api_key_roles.keys() {
            if !self.api_keys.values().any(|a| a == actor) {
                problems.push(
                    "api_key_roles",
                    format!("`{actor}` is the actor of no API key"),
                );
            }
        }
    }

    fn check_files(&self, files: &mut Files) {
        if let Some(path) = &self.jwt_rs256_jwks_file {
            files.loaded("jwt_rs256_jwks_file", path, Authenticator::new(self));
        }
    }
}

/// The caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Anonymous,
    Authenticated {
        actor: String,
        roles: Vec<String>,
        /// The token's claims (`{"sub": actor}` for an API key), for row filters.
        claims: serde_json::Value,
    },
}

impl Caller {
    pub fn actor(&self) -> Option<&str> {
        match self {
            Caller::Anonymous => None,
            Caller::Authenticated { actor, .. } => Some(actor),
        }
    }

    pub fn roles(&self) -> Vec<&str> {
        match self {
            Caller::Anonymous => vec![crate::schema::ANONYMOUS_ROLE],
            Caller::Authenticated { roles, .. } => roles.iter().map(String::as_str).collect(),
        }
    }

    /// The claim a row filter names, as text: a top-level name or a JSON pointer.
    pub fn claim(&self, claim: &str) -> Option<String> {
        let Caller::Authenticated { claims, .. } = self else {
            return None;
        };
        let value = if claim.starts_with('/') {
            claims.pointer(claim)
        } else {
            claims.get(claim)
        }?;
        match value {
            serde_json::Value::String(text) => Some(text.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            serde_json::Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("the token is signed with {0:?}, which this gateway does not accept")]
    UnsupportedAlgorithm(Algorithm),
    #[error("unknown API key")]
    UnknownApiKey,
    #[error("the Authorization header must be `Bearer <token>`")]
    MalformedHeader,
    #[error("no RS256 key in the JWKS file matches the token's kid")]
    UnknownKey,
    #[error("cannot read the JWKS file {path}: {message}")]
    Key { path: String, message: String },
}

pub struct Authenticator {
    hs256: Option<DecodingKey>,
    /// (kid, key) from the JWKS file.
    rs256: Vec<(Option<String>, DecodingKey)>,
    settings: AuthSettings,
}

impl Authenticator {
    pub fn new(settings: &AuthSettings) -> Result<Self, AuthError> {
        let mut rs256 = Vec::new();
        if let Some(path) = &settings.jwt_rs256_jwks_file {
            let fail = |message: String| AuthError::Key {
                path: path.display().to_string(),
                message,
            };
            let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
            let set: JwkSet = serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?;
            for jwk in &set.keys {
                if matches!(jwk.algorithm, AlgorithmParameters::RSA(_)) {
                    let key = DecodingKey::from_jwk(jwk).map_err(|e| fail(e.to_string()))?;
                    rs256.push((jwk.common.key_id.clone(), key));
                }
            }
            if rs256.is_empty() {
                return Err(fail("it holds no RSA key".into()));
            }
        }
        Ok(Self {
            hs256: settings
                .jwt_hs256_secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.as_bytes())),
            rs256,
            settings: settings.clone(),
        })
    }

    pub fn queries_require_auth(&self) -> bool {
        self.settings.queries_require_auth
    }

    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, AuthError> {
        if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or(AuthError::MalformedHeader)?;
            return self.verify(token.trim());
        }
        if let Some(value) = headers.get(API_KEY_HEADER) {
            let presented = value.as_bytes();
            // Every key is compared in full so timing does not reveal a matching prefix.
            let found = self
                .settings
                .api_keys
                .iter()
                .fold(None, |found, (key, actor)| {
                    if constant_time_eq(key.as_bytes(), presented) {
                        Some(actor.clone())
                    } else {
                        found
                    }
                });
            return found
                .map(|actor| Caller::Authenticated {
                    roles: self
                        .settings
                        .api_key_roles
                        .get(&actor)
                        .cloned()
                        .unwrap_or_default(),
                    claims: serde_json::json!({ "sub": actor }),
                    actor,
                })
                .ok_or(AuthError::UnknownApiKey);
        }
        Ok(Caller::Anonymous)
    }

    fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))?;
        let key = match header.alg {
            Algorithm::HS256 => self
                .hs256
                .as_ref()
                .ok_or(AuthError::UnsupportedAlgorithm(header.alg))?,
            Algorithm::RS256 if self.rs256.is_empty() => {
                return Err(AuthError::UnsupportedAlgorithm(header.alg));
            }
            Algorithm::RS256 => self
                .rs256
                .iter()
                .find(|(kid, _)| header.kid.is_none() || kid == &header.kid)
                .map(|(_, key)| key)
                .ok_or(AuthError::UnknownKey)?,
            other => return Err(AuthError::UnsupportedAlgorithm(other)),
        };
        let mut validation = Validation::new(header.alg);
        if let Some(issuer) = &self.settings.jwt_issuer {
            validation.set_issuer(&[issuer]);
        }
        match &self.settings.jwt_audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<serde_json::Value>(token, key, &validation)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))?;
        let claims = data.claims;
        let actor = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .ok_or_else(|| AuthError::InvalidToken("the token has no string `sub`".into()))?
            .to_owned();
        let pointer = self.settings.jwt_roles_claim.as_deref().unwrap_or("/roles");
        let roles = match claims.pointer(pointer) {
            Some(serde_json::Value::String(role)) => vec![role.clone()],
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|r| r.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Caller::Authenticated {
            actor,
            roles,
            claims,
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
