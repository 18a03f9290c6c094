//! TLS from config: with `[service.tls]` the streamer speaks only TLS, and a client that trusts
//! the certificate reads flights as usual.

mod common;

use arrow_flight::FlightClient;
use common::{Stack, TOKEN};
use futures::TryStreamExt;
use herald_flight_streamer::settings::TlsSettings;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

#[tokio::test]
async fn with_tls_configured_the_streamer_serves_flight_over_tls_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = |name: &str| dir.path().join(name).display().to_string();
    std::fs::write(path("leaf.ext"), "subjectAltName=DNS:localhost\n").expect("extensions");
    // A test CA, and a certificate for localhost signed by it.
    for args in [
        "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=herald-test-ca -keyout ca.key -out ca.pem",
        "req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout key.pem -out leaf.csr",
        "x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile leaf.ext -out cert.pem",
    ] {
        let made = std::process::Command::new("openssl")
            .args(args.split(' '))
            .current_dir(dir.path())
            .output()
            .expect("openssl makes test certificates");
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
    }
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let tls = TlsSettings {
        cert_file: cert,
        key_file: key,
    };
    let stack = Stack::start_with(|s| s.tls = Some(tls)).await;

    let pem = std::fs::read(dir.path().join("ca.pem")).expect("CA certificate");
    let channel = Channel::from_shared(format!("https://localhost:{}", stack.address.port()))
        .expect("url")
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pem))
                .domain_name("localhost"),
        )
        .expect("client TLS")
        .connect()
        .await
        .expect("a TLS connection");
    let mut client = FlightClient::new(channel);
    client
        .add_header("authorization", &format!("Bearer {TOKEN}"))
        .expect("header");
    let flights: Vec<_> = client
        .list_flights("")
        .await
        .expect("ListFlights over TLS")
        .try_collect()
        .await
        .expect("flights");
    assert_eq!(flights.len(), 6);

    // Plain gRPC gets nowhere: an error, or no answer at all.
    let plain = tokio::time::timeout(std::time::Duration::from_secs(3), async {
        let channel = Channel::from_shared(stack.url())
            .expect("url")
            .connect()
            .await?;
        let mut client = FlightClient::new(channel);
        client
            .add_header("authorization", &format!("Bearer {TOKEN}"))
            .expect("header");
        client
            .list_flights("")
            .await
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!(e))
    })
    .await;
    assert!(
        plain.is_err() || plain.is_ok_and(|r| r.is_err()),
        "plain gRPC is refused"
    );
}
