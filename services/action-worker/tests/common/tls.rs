//! A certificate authority made in the test, a server certificate it signs for 127.0.0.1, and
//! an HTTPS receiver using it: what `service.ca_file` is for (receivers behind a private CA).

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct TestCa {
    /// The CA's certificate as a PEM file, for `service.ca_file`.
    pub ca_file: tempfile::NamedTempFile,
    pub acceptor: TlsAcceptor,
}

impl TestCa {
    pub fn new() -> Self {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Herald test CA");
        let ca = ca_params.self_signed(&ca_key).expect("self-signed CA");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);

        let key = rcgen::KeyPair::generate().expect("server key");
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("server params");
        let cert = params.signed_by(&key, &issuer).expect("signed by the CA");

        let ca_file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(ca_file.path(), ca.pem()).expect("write the CA");
        herald_shared::tls::install_crypto_provider();
        let config = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("server TLS config");
        Self {
            ca_file,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        }
    }
}

/// The head and body of each request an HTTPS receiver got.
pub type Requests = Arc<Mutex<Vec<String>>>;

/// An HTTPS receiver on a free loopback port that answers every request 200; returns the
/// port and what it received.
pub async fn https_receiver(acceptor: TlsAcceptor) -> (u16, Requests) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind HTTPS receiver");
    let port = listener.local_addr().expect("address").port();
    let requests: Requests = Arc::default();
    let store = requests.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let store = store.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(socket).await else {
                    return;
                };
                let mut stream = BufReader::new(tls);
                let mut head = String::new();
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    match stream.read_line(&mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if let Some((name, value)) = line.split_once(':')
                        && name.eq_ignore_ascii_case("content-length")
                    {
                        length = value.trim().parse().unwrap_or(0);
                    }
                    head.push_str(&line);
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; length];
                if stream.read_exact(&mut body).await.is_err() {
                    return;
                }
                head.push_str(&String::from_utf8_lossy(&body));
                store.lock().expect("requests lock").push(head);
                let _ = stream
                    .get_mut()
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                let _ = stream.get_mut().shutdown().await;
            });
        }
    });
    (port, requests)
}
