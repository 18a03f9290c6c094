//! The `email` kind: one message through the configured SMTP relay (`service.smtp`), subject and
//! body rendered from templates over the triggering event. SMTP 5xx replies are permanent; 4xx
//! replies, timeouts and connection errors are transient.
//!
//! Config: `to` (one address or a list, each a template, e.g. `{{data.email}}`; required),
//! `subject` and `body` (templates, required),
//! `from` (default `service.smtp.from`).

use std::time::Duration;

use futures::future::BoxFuture;
use herald_shared::ActionRequest;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};

use crate::ca::ExtraRoots;
use crate::error::ActionError;
use crate::kind::{self, ActionKind, Success};
use crate::template;

/// How to reach the relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    /// `none` (plain, for a relay on a trusted network), `starttls` or `tls`.
    pub security: SmtpSecurity,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The sender when an action names none.
    pub from: String,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    None,
    Starttls,
    Tls,
}

impl Default for SmtpSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 25,
            security: SmtpSecurity::None,
            username: None,
            password: None,
            from: "herald@localhost".into(),
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    #[serde(deserialize_with = "one_or_many")]
    pub to: Vec<String>,
    pub subject: String,
    pub body: String,
    pub from: Option<String>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

pub struct Email {
    settings: SmtpSettings,
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

impl Email {
    /// A transport to `settings`' relay; over TLS it trusts the public roots, plus `extra`
    /// (`service.ca_file`) when given.
    pub fn new(
        settings: SmtpSettings,
        extra: Option<&ExtraRoots>,
    ) -> Result<Self, lettre::transport::smtp::Error> {
        let tls = || {
            let mut parameters = TlsParameters::builder(settings.host.clone());
            if let Some(extra) = extra {
                parameters = parameters.add_root_certificate(extra.smtp.clone());
            }
            parameters.build_rustls()
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&settings.host)
            .tls(match settings.security {
                SmtpSecurity::None => Tls::None,
                SmtpSecurity::Starttls => Tls::Required(tls()?),
                SmtpSecurity::Tls => Tls::Wrapper(tls()?),
            })
            .port(settings.port)
            .timeout(Some(settings.timeout));
        if let (Some(user), Some(password)) = (&settings.username, &settings.password) {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(Self {
            transport: builder.build(),
            settings,
        })
    }

    fn message(&self, request: &ActionRequest) -> Result<Message, ActionError> {
        let config: EmailConfig = kind::config(request)?;
        let event = kind::event_json(request);
        let mailbox = |text: &str| {
            text.parse::<Mailbox>()
                .map_err(|e| ActionError::bad_config("email", format!("address `{text}`: {e}")))
        };
        let from = config.from.as_deref().unwrap_or(&self.settings.from);
        let mut builder = Message::builder()
            .from(mailbox(from)?)
            .subject(template::render(&config.subject, &event))
            // The action id lets a mail pipeline spot the repeat a crash may cause.
            .message_id(Some(format!("<{}@herald>", request.id.replace(':', "."))));
        if config.to.is_empty() {
            return Err(ActionError::bad_config("email", "`to` names no recipient"));
        }
        for to in &config.to {
            builder = builder.to(mailbox(&template::render(to, &event))?);
        }
        builder
            .body(template::render(&config.body, &event))
            .map_err(|e| ActionError::bad_config("email", e))
    }

    async fn run(&self, request: &ActionRequest) -> Result<Success, ActionError> {
        let message = self.message(request)?;
        match self.transport.send(message).await {
            Ok(_) => Ok(Success::default()),
            Err(e) if e.is_permanent() => Err(ActionError::permanent(format!(
                "SMTP relay refused the message: {e}"
            ))),
            Err(e) => Err(ActionError::transient(format!("SMTP delivery failed: {e}"))),
        }
    }
}

impl ActionKind for Email {
    fn name(&self) -> &'static str {
        "email"
    }

    fn destination(&self, request: &ActionRequest) -> Result<Option<String>, ActionError> {
        kind::config::<EmailConfig>(request)?;
        Ok(Some(format!(
            "{}:{}",
            self.settings.host, self.settings.port
        )))
    }

    fn execute<'a>(
        &'a self,
        request: &'a ActionRequest,
    ) -> BoxFuture<'a, Result<Success, ActionError>> {
        Box::pin(self.run(request))
    }
}
