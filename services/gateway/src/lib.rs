//! The Herald gateway: GraphQL over PostgreSQL whose every committed change becomes an event.
//!
//! Two halves, each with its own pool so heavy queries cannot starve the relay: the GraphQL
//! server (`graphql`, `query`, `http`, `auth`) reads and writes the declared tables, and the
//! relay (`relay`, supervised by `supervise`) moves the outbox rows that the capture trigger
//! (`capture`) wrote in the same transactions to JetStream. Capture being a trigger is
//! what makes the promise hold for writes that never pass through the gateway.

pub mod auth;
pub mod budget;
pub mod capture;
pub mod collect;
pub mod graphql;
pub mod http;
pub mod order;
pub mod plan;
pub mod query;
pub mod relay;
pub mod schema;
pub mod settings;
pub mod supervise;

use std::net::SocketAddr;
use std::sync::Arc;

use herald_shared::admin::Readiness;
use herald_shared::nats::Nats;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use schema::{SchemaFile, introspect};
pub use settings::GatewaySettings;

/// The service name, as NATS and telemetry know it.
pub const SERVICE: &str = "gateway";

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot connect to PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Schema(#[from] schema::SchemaError),
    #[error(transparent)]
    Capture(#[from] capture::CaptureError),
    #[error("cannot build the GraphQL schema: {0}")]
    Graphql(String),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Connects a pool whose every statement is bounded by `limits.statement_timeout`.
pub async fn connect_database(settings: &GatewaySettings) -> Result<PgPool, GatewayError> {
    connect_pool(settings, settings.max_connections, &[]).await
}

async fn connect_pool(
    settings: &GatewaySettings,
    size: u32,
    extra: &[(&str, &str)],
) -> Result<PgPool, GatewayError> {
    let timeout = settings.limits.statement_timeout.as_millis().to_string();
    let options: PgConnectOptions = settings.database_url.parse()?;
    let options = options
        .options([("statement_timeout", timeout.as_str())])
        .options(extra.iter().copied());
    Ok(PgPoolOptions::new()
        .max_connections(size)
        // sqlx pings a connection when it is released and, by default, again when it is next
        // acquired: a round trip more per request. A connection back from a request a moment
        // ago passed the release ping; one that sat idle longer is still pinged before use.
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_AFTER_IDLE {
                    sqlx::Connection::ping(connection).await?;
                }
                Ok(true)
            })
        })
        .connect_with(options)
        .await?)
}

/// How long a pooled connection may sit idle before it is pinged again on acquire.
const PING_AFTER_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// A started gateway.
pub struct Running {
    /// Where GraphQL is served.
    pub address: SocketAddr,
    pub pool: PgPool,
    plans: Option<Arc<plan::Plans>>,
    relay: Option<Arc<supervise::TaskHealth>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Requests answered from a compiled plan (`plan.rs`) so far.
    pub fn plan_hits(&self) -> u64 {
        self.plans.as_ref().map_or(0, |p| p.hits())
    }

    /// Ready while NATS is connected, PostgreSQL answers and the relay (if enabled) runs.
    pub fn readiness(&self, nats: &Nats) -> Readiness {
        let pool = self.pool.clone();
        let relay = self.relay.clone();
        let readiness = Readiness::new().nats(nats).check("postgres", move || {
            let pool = pool.clone();
            async move {
                sqlx::query("SELECT 1")
                    .execute(&pool)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        });
        match relay {
            Some(health) => readiness.check("relay", move || {
                let alive = health.is_alive();
                async move {
                    alive
                        .then_some(())
                        .ok_or_else(|| "the relay task died and is restarting".to_owned())
                }
            }),
            None => readiness,
        }
    }

    /// Waits for the server and the relay to stop (after `shutdown` is cancelled).
    pub async fn wait(self) {
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "a gateway task panicked");
            }
        }
    }
}

/// Checks the schema file against the database, installs capture, starts GraphQL and (unless
/// disabled) the relay. Refuses to start, naming the problem, when the file and database differ.
pub async fn start(
    settings: &GatewaySettings,
    nats: &Nats,
    shutdown: CancellationToken,
) -> Result<Running, GatewayError> {
    let pool = connect_database(settings).await?;
    let file = SchemaFile::load(&settings.schema_file)?;
    let catalog = Arc::new(schema::check(&pool, &file).await?);
    capture::install_with(&pool, &file, settings.relay.all_columns_in_events).await?;
    let schema = graphql::build(
        pool.clone(),
        catalog.clone(),
        &settings.limits,
        &settings.graphql,
    )
    .map_err(|e| GatewayError::Graphql(e.to_string()))?;
    let plans = plan::Plans::new(
        pool.clone(),
        catalog.clone(),
        settings.limits.clone(),
        graphql::read_roots(&catalog),
        settings.graphql.compiled_plans,
        settings.graphql.persisted_queries > 0,
    )
    .map(Arc::new);
    let app = http::router(http::Http {
        schema,
        plans: plans.clone(),
        auth: auth::Authenticator::new(&settings.auth)?,
        max_body_bytes: settings.limits.max_body_bytes,
        graphiql: settings.graphql.graphiql,
    });
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| GatewayError::Bind {
            address: settings.listen,
            source,
        })?;
    let address = listener.local_addr().map_err(|source| GatewayError::Bind {
        address: settings.listen,
        source,
    })?;
    let mut tasks = Vec::new();
    let server_shutdown = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(server_shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "GraphQL server failed");
        }
    }));
    let mut relay_health = None;
    if settings.relay.enabled {
        let relay = relay::Relay::new(
            // The outbox is empty most of the time and then, in a burst, holds a backlog: a
            // generic plan cached while it was empty (sqlx prepares every statement) scans and
            // sorts the whole table for every claim and delete of the backlog (measured: the
            // drain of 20k rows fell from ~8k to ~3k events/s after a few thousand small
            // passes). Custom plans see the table's current size.
            connect_pool(
                settings,
                settings.relay.max_connections,
                &[("plan_cache_mode", "force_custom_plan")],
            )
            .await?,
            nats.jetstream.clone(),
            nats.client.server_info().max_payload,
            settings.relay.clone(),
        );
        let health = supervise::TaskHealth::new();
        let stop = shutdown.clone();
        tasks.push(supervise::spawn(
            "relay",
            health.clone(),
            settings.relay.retry_delay,
            shutdown,
            move || relay.clone().run(stop.clone()),
        ));
        relay_health = Some(health);
    }
    tracing::info!(%address, "GraphQL listening on /graphql");
    Ok(Running {
        address,
        pool,
        plans,
        relay: relay_health,
        tasks,
    })
}
