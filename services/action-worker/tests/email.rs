//! The email kind against a real SMTP conversation (the relay is `common::smtp`).

mod common;

use common::{App, action, retry};
use herald_shared::messages::OutcomeStatus;
use serde_json::json;

#[tokio::test]
async fn an_email_goes_through_the_smtp_relay_with_rendered_templates() {
    let mut app = App::start().await;
    let (port, mails) = common::smtp::sink(common::smtp::Security::Plain).await;
    let mut settings = app.settings();
    settings.smtp.port = port;
    settings.smtp.from = "herald@example.com".into();
    app.spawn_worker(settings);
    let config = json!({
        "to": "{{data.email}}",
        "subject": "Order {{key}} {{data.status}}",
        "body": "Hello, your order {{data.id}} is {{data.status}}."
    });
    let request = action("email", "shipping", config, retry(3, 50));
    app.publish(&request).await;

    let outcomes = app
        .wait_outcomes(&request.id, "an outcome", |o| !o.is_empty())
        .await;
    assert_eq!(outcomes[0].status, OutcomeStatus::Succeeded, "{outcomes:?}");
    let mails = mails.lock().expect("mail lock").clone();
    assert_eq!(mails.len(), 1);
    assert!(
        mails[0].from.contains("herald@example.com"),
        "{:?}",
        mails[0]
    );
    assert_eq!(mails[0].to, ["<ada@example.com>"]);
    assert!(
        mails[0].data.contains("Subject: Order 42 shipped"),
        "{}",
        mails[0].data
    );
    assert!(
        mails[0].data.contains("your order 42 is shipped."),
        "{}",
        mails[0].data
    );
}

#[tokio::test]
async fn a_bad_recipient_is_a_permanent_failure() {
    let mut app = App::start().await;
    let (port, mails) = common::smtp::sink(common::smtp::Security::Plain).await;
    let mut settings = app.settings();
    settings.smtp.port = port;
    app.spawn_worker(settings);
    let config = json!({"to": ["not an address"], "subject": "s", "body": "b"});
    let request = action("email", "shipping", config, retry(3, 50));
    app.publish(&request).await;
    let outcomes = app
        .wait_outcomes(&request.id, "an outcome", |o| !o.is_empty())
        .await;
    assert_eq!(outcomes[0].status, OutcomeStatus::DeadLettered);
    assert!(
        outcomes[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("not an address"))
    );
    assert!(mails.lock().expect("mail lock").is_empty());
}
