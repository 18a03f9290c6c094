//! TLS from the action worker, against servers whose certificate a CA made in the test signs:
//! with that CA in `service.ca_file` a webhook is delivered over HTTPS and an e-mail over TLS and
//! over STARTTLS; without it the certificate is refused and the outcome says so. Both rustls
//! providers are linked in this binary, as in the services, so this also proves the one
//! process-wide provider serves reqwest and lettre.

mod common;

use common::smtp::{self, Security};
use common::tls::{TestCa, https_receiver};
use common::{App, action, retry};
use herald_action_worker::email::SmtpSecurity;
use herald_shared::messages::OutcomeStatus;
use serde_json::json;

#[tokio::test]
async fn a_webhook_is_delivered_over_https_to_a_receiver_the_ca_file_vouches_for() {
    let mut app = App::start().await;
    let ca = TestCa::new();
    let (port, requests) = https_receiver(ca.acceptor.clone()).await;
    let mut settings = app.settings();
    settings.ca_file = Some(ca.ca_file.path().to_owned());
    app.spawn_worker(settings);
    let request = action(
        "webhook",
        "orders",
        json!({"url": format!("https://127.0.0.1:{port}/hooks/orders")}),
        retry(3, 50),
    );
    app.publish(&request).await;

    let outcomes = app
        .wait_outcomes(&request.id, "an outcome", |o| !o.is_empty())
        .await;
    assert_eq!(outcomes[0].status, OutcomeStatus::Succeeded, "{outcomes:?}");
    let received = requests.lock().expect("requests lock").clone();
    assert_eq!(received.len(), 1, "{received:?}");
    assert!(
        received[0].starts_with("POST /hooks/orders HTTP/1.1"),
        "{}",
        received[0]
    );
    assert!(
        received[0].contains(&format!("webhook-id: {}", request.id)),
        "{}",
        received[0]
    );
}

#[tokio::test]
async fn without_the_ca_the_receivers_certificate_is_refused_and_the_outcome_says_why() {
    let mut app = App::start().await;
    let ca = TestCa::new();
    let (port, requests) = https_receiver(ca.acceptor.clone()).await;
    app.spawn_worker(app.settings());
    let request = action(
        "webhook",
        "orders",
        json!({"url": format!("https://127.0.0.1:{port}/hooks/orders")}),
        retry(1, 50),
    );
    app.publish(&request).await;

    let outcomes = app
        .wait_outcomes(&request.id, "an outcome", |o| !o.is_empty())
        .await;
    assert_ne!(outcomes[0].status, OutcomeStatus::Succeeded, "{outcomes:?}");
    let error = outcomes[0].error.clone().unwrap_or_default();
    assert!(error.contains("certificate"), "{error}");
    assert!(requests.lock().expect("requests lock").is_empty());
}

/// How the relay and the worker meet: TLS from the first byte, or STARTTLS.
#[derive(Debug, Clone, Copy)]
enum Over {
    Tls,
    StartTls,
}

/// Sends one e-mail through a relay with a certificate signed by a test CA; `trust` puts the CA
/// in `service.ca_file`. Returns what the relay got and the outcome's status and error.
async fn send_mail(over: Over, trust: bool) -> (Vec<smtp::Mail>, OutcomeStatus, String) {
    let mut app = App::start().await;
    let ca = TestCa::new();
    let (relay, security) = match over {
        Over::Tls => (Security::Tls(ca.acceptor.clone()), SmtpSecurity::Tls),
        Over::StartTls => (
            Security::StartTls(ca.acceptor.clone()),
            SmtpSecurity::Starttls,
        ),
    };
    let (port, mails) = smtp::sink(relay).await;
    let mut settings = app.settings();
    settings.smtp.port = port;
    settings.smtp.security = security;
    settings.smtp.from = "herald@example.com".into();
    if trust {
        settings.ca_file = Some(ca.ca_file.path().to_owned());
    }
    app.spawn_worker(settings);
    let config = json!({"to": "{{data.email}}", "subject": "Order {{key}}", "body": "shipped"});
    let request = action("email", "shipping", config, retry(1, 50));
    app.publish(&request).await;
    let outcomes = app
        .wait_outcomes(&request.id, "an outcome", |o| !o.is_empty())
        .await;
    let mails = mails.lock().expect("mail lock").clone();
    (
        mails,
        outcomes[0].status,
        outcomes[0].error.clone().unwrap_or_default(),
    )
}

#[tokio::test]
async fn an_email_goes_over_tls_and_over_starttls_to_a_relay_the_ca_file_vouches_for() {
    for over in [Over::Tls, Over::StartTls] {
        let (mails, status, error) = send_mail(over, true).await;
        assert_eq!(status, OutcomeStatus::Succeeded, "{over:?}: {error}");
        assert_eq!(mails.len(), 1, "{over:?}: {mails:?}");
        assert!(mails[0].data.contains("Subject: Order 42"), "{mails:?}");
    }
}

#[tokio::test]
async fn without_the_ca_an_email_over_tls_fails_naming_the_certificate() {
    for over in [Over::Tls, Over::StartTls] {
        let (mails, status, error) = send_mail(over, false).await;
        assert_ne!(status, OutcomeStatus::Succeeded, "{over:?}: {error}");
        assert!(error.contains("certificate"), "{over:?}: {error}");
        assert!(mails.is_empty(), "{over:?}: {mails:?}");
    }
}
