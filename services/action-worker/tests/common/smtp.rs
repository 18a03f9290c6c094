//! A minimal SMTP relay for the email tests. `aiosmtpd` is not installed on these machines, so
//! it is written here over a TCP listener: enough of RFC 5321 (greeting, EHLO/HELO, MAIL, RCPT,
//! DATA, RSET, NOOP, QUIT) for lettre to deliver to, plain, wrapped in TLS from the first byte,
//! or upgraded by STARTTLS (RFC 3207).

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// One delivered message: envelope and raw DATA.
#[derive(Debug, Clone, Default)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    pub data: String,
}

/// How the relay talks.
#[derive(Clone)]
pub enum Security {
    Plain,
    /// TLS from the first byte (port 465 style).
    Tls(TlsAcceptor),
    /// Plain until the client asks for STARTTLS, which EHLO offers.
    StartTls(TlsAcceptor),
}

pub type Mails = Arc<Mutex<Vec<Mail>>>;

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Starts the relay on a free loopback port; returns the port and what it received.
pub async fn sink(security: Security) -> (u16, Mails) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind SMTP sink");
    let port = listener.local_addr().expect("address").port();
    let mails: Mails = Arc::default();
    let store = mails.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let store = store.clone();
            let security = security.clone();
            tokio::spawn(async move {
                let (stream, upgrade): (Box<dyn Stream>, _) = match security {
                    Security::Plain => (Box::new(socket), None),
                    Security::StartTls(acceptor) => (Box::new(socket), Some(acceptor)),
                    Security::Tls(acceptor) => match acceptor.accept(socket).await {
                        Ok(tls) => (Box::new(tls), None),
                        Err(_) => return,
                    },
                };
                let mut stream = BufReader::new(stream);
                if stream
                    .get_mut()
                    .write_all(b"220 sink ESMTP\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                let Some(stream) = converse(stream, &store, upgrade.is_some()).await else {
                    return;
                };
                // The client asked for STARTTLS: the conversation starts again over TLS.
                let Some(acceptor) = upgrade else { return };
                let Ok(tls) = acceptor.accept(stream.into_inner()).await else {
                    return;
                };
                let boxed: Box<dyn Stream> = Box::new(tls);
                converse(BufReader::new(boxed), &store, false).await;
            });
        }
    });
    (port, mails)
}

/// Answers commands until QUIT or a closed connection (`None`), or until a STARTTLS the relay
/// offers, returning the stream to upgrade.
async fn converse(
    mut stream: BufReader<Box<dyn Stream>>,
    store: &Mails,
    offer_starttls: bool,
) -> Option<BufReader<Box<dyn Stream>>> {
    let mut mail = Mail::default();
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let line = line.trim_end().to_owned();
        let verb = line.get(..4).unwrap_or_default().to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" if offer_starttls => b"250-sink\r\n250-8BITMIME\r\n250 STARTTLS\r\n",
            "EHLO" => b"250-sink\r\n250 8BITMIME\r\n",
            "STAR" if offer_starttls => {
                stream.get_mut().write_all(b"220 go ahead\r\n").await.ok()?;
                return Some(stream);
            }
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
                stream
                    .get_mut()
                    .write_all(b"354 end with .\r\n")
                    .await
                    .ok()?;
                loop {
                    let mut data = String::new();
                    if stream.read_line(&mut data).await.ok()? == 0 {
                        return None;
                    }
                    let data = data.trim_end_matches(['\r', '\n']);
                    if data == "." {
                        break;
                    }
                    mail.data.push_str(data);
                    mail.data.push('\n');
                }
                store
                    .lock()
                    .expect("mail lock")
                    .push(std::mem::take(&mut mail));
                b"250 OK queued\r\n"
            }
            "QUIT" => {
                let _ = stream.get_mut().write_all(b"221 bye\r\n").await;
                return None;
            }
            _ => b"502 not implemented\r\n",
        };
        stream.get_mut().write_all(reply).await.ok()?;
    }
}
