//! The email kind against a real SMTP conversation. `aiosmtpd` is not installed on these
//! machines, so the relay is a minimal SMTP server written here over a TCP listener: enough of
//! RFC 5321 (greeting, EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT) for lettre to deliver to.

mod common;

use std::sync::{Arc, Mutex};

use common::{App, action, retry};
use herald_shared::messages::OutcomeStatus;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One delivered message: envelope and raw DATA.
#[derive(Debug, Clone, Default)]
struct Mail {
    from: String,
    to: Vec<String>,
    data: String,
}

async fn smtp_sink() -> (u16, Arc<Mutex<Vec<Mail>>>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind SMTP sink");
    let port = listener.local_addr().expect("address").port();
    let mails: Arc<Mutex<Vec<Mail>>> = Arc::default();
    let store = mails.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let store = store.clone();
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut lines = BufReader::new(read).lines();
                let mut mail = Mail::default();
                let _ = write.write_all(b"220 sink ESMTP\r\n").await;
                while let Ok(Some(line)) = lines.next_line().await {
                    let verb = line.get(..4).unwrap_or_default().to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" => b"250-sink\r\n250 8BITMIME\r\n",
                        "HELO" | "NOOP" => b"250 OK\r\n",
                        "RSET" => {
                            mail = Mail::default();
                            b"250 OK\r\n"
                        }
                        "MAIL" => {
                            mail.from = line[10..].to_owned();
                            b"250 OK\r\n"
                        }
                        "RCPT" => {
                            mail.to.push(line[8..].to_owned());
                            b"250 OK\r\n"
                        }
                        "DATA" => {
                            let _ = write.write_all(b"354 end with .\r\n").await;
                            while let Ok(Some(data)) = lines.next_line().await {
                                if data == "." {
                                    break;
                                }
                                mail.data.push_str(&data);
                                mail.data.push('\n');
                            }
                            store
                                .lock()
                                .expect("mail lock")
                                .push(std::mem::take(&mut mail));
                            b"250 OK queued\r\n"
                        }
                        "QUIT" => {
                            let _ = write.write_all(b"221 bye\r\n").await;
                            break;
                        }
                        _ => b"502 not implemented\r\n",
                    };
                    if write.write_all(reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (port, mails)
}

#[tokio::test]
async fn an_email_goes_through_the_smtp_relay_with_rendered_templates() {
    let mut app = App::start().await;
    let (port, mails) = smtp_sink().await;
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
    let (port, mails) = smtp_sink().await;
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
