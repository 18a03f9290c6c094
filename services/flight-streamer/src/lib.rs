//! The Herald flight-streamer: entity events and table exports as typed Arrow record batches
//! over Arrow Flight, for pandas, polars and any Flight client.
//!
//! # Layout
//! - `ticket`: what a client asks for (events of an entity since a time, live or not; an
//!   export of a table with a filter), in the seed's text form or JSON; `filter` compiles an
//!   export's `where` into bound parameters.
//! - `schema`: one Arrow schema per entity and table, from the gateway's schema file and the
//!   database catalogue (`herald_gateway::schema`), the one source of truth for column types.
//! - `events`: an ordered, ephemeral JetStream consumer per event ticket (never a durable,
//!   never an ack; `ordered` reads it and recreates it when the server removed it),
//!   `event_batch` turning events into rows and `columns` typing each value.
//! - `export`: a binary COPY per export ticket, decoded by `copy` into the column builders.
//! - `frames`: batches into Flight messages, schema first, resume cursor in `app_metadata`.
//! - `service`: the Flight RPCs; `auth`: the bearer-token layer in front of them.
//!
//! Every DoGet runs one producer task that sends batches into a bounded channel (at most
//! `queued_batches`); the gRPC response reads from it. A slow client therefore slows the
//! producer, and a client that goes away closes the channel, which stops the consumer or
//! cursor at once.

pub mod auth;
pub mod columns;
pub mod copy;
pub mod event_batch;
pub mod events;
pub mod export;
pub mod filter;
pub mod frames;
pub mod ordered;
pub mod schema;
pub mod service;
pub mod settings;
pub mod ticket;

use std::net::SocketAddr;

use arrow_flight::flight_service_server::FlightServiceServer;
use herald_gateway::schema::{SchemaError, SchemaFile};
use herald_shared::admin::Readiness;
use herald_shared::nats::Nats;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use settings::FlightSettings;

/// The service name, as NATS and telemetry know it.
pub const SERVICE: &str = "flight-streamer";

#[derive(Debug, thiserror::Error)]
pub enum FlightError {
    #[error("cannot connect to PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("cannot read the TLS {what} {path}: {source}")]
    Tls {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the TLS certificate {cert} and key {key} cannot serve: {message}")]
    TlsIdentity {
        cert: String,
        key: String,
        message: String,
    },
    #[error("cannot serve Flight: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub async fn connect_database(settings: &FlightSettings) -> Result<PgPool, FlightError> {
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .connect(&settings.database_url)
        .await?)
}

/// A started flight-streamer.
pub struct Running {
    /// Where Flight is served.
    pub address: SocketAddr,
    pool: PgPool,
    server: JoinHandle<()>,
}

impl Running {
    /// Ready while NATS is connected and PostgreSQL answers.
    pub fn readiness(&self, nats: &Nats) -> Readiness {
        let pool = self.pool.clone();
        Readiness::new().nats(nats).check("postgres", move || {
            let pool = pool.clone();
            async move {
                sqlx::query("SELECT 1")
                    .execute(&pool)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
    }

    /// Waits for the server to stop (after `shutdown` is cancelled).
    pub async fn wait(self) {
        if let Err(e) = self.server.await {
            tracing::error!(error = %e, "the Flight server panicked");
        }
    }
}

/// The gRPC server, over TLS when `settings.tls` names a certificate and key: both are read and
/// parsed here, so a bad pair refuses the start (and `--check-config`) naming the file.
pub fn server_builder(settings: &FlightSettings) -> Result<tonic::transport::Server, FlightError> {
    let builder = tonic::transport::Server::builder();
    let Some(tls) = &settings.tls else {
        return Ok(builder);
    };
    let read = |what, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| FlightError::Tls {
            what,
            path: path.display().to_string(),
            source,
        })
    };
    let identity = tonic::transport::Identity::from_pem(
        read("certificate", &tls.cert_file)?,
        read("key", &tls.key_file)?,
    );
    builder
        .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
        .map_err(|source| FlightError::TlsIdentity {
            cert: tls.cert_file.display().to_string(),
            key: tls.key_file.display().to_string(),
            message: source.to_string(),
        })
}

/// Checks the schema file against the database, then serves Flight until `shutdown`.
pub async fn start(
    settings: FlightSettings,
    nats: &Nats,
    pool: PgPool,
    shutdown: CancellationToken,
) -> Result<Running, FlightError> {
    let file = SchemaFile::load(&settings.schema_file)?;
    let catalog = herald_gateway::schema::check(&pool, &file).await?;
    let types = schema::Types::new(&catalog);
    let token = auth::Token::new(&settings.token);
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| FlightError::Bind {
            address: settings.listen,
            source,
        })?;
    let address = listener.local_addr().map_err(|source| FlightError::Bind {
        address: settings.listen,
        source,
    })?;
    let builder = server_builder(&settings)?;
    let max_message = settings.max_message_bytes;
    let flight = service::Flight::new(
        nats.jetstream.clone(),
        pool.clone(),
        types,
        token.clone(),
        settings,
    );
    let server = FlightServiceServer::new(flight)
        // Clients send only small requests; the answer's messages are bounded by `frames`.
        .max_decoding_message_size(settings::GRPC_DEFAULT_LIMIT)
        .max_encoding_message_size(max_message + 64 * 1024);
    let router = builder
        .layer(auth::BearerAuth::new(token))
        .add_service(server);
    // tonic's builder turns Nagle off for the listeners it binds, not for one passed in: without
    // this a batch's last segment may wait for the client's delayed ACK.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "the Flight server failed");
        }
    });
    tracing::info!(%address, "Arrow Flight listening");
    Ok(Running {
        address,
        pool,
        server,
    })
}
