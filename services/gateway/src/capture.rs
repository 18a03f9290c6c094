//! Event capture: the SQL migration that creates the outbox and its trigger function, and the
//! call that attaches the trigger to every declared table.
//!
//! Capture lives in the database rather than in the gateway's mutation code so that a change
//! made straight in SQL, by any client, produces exactly the same event as one made through
//! GraphQL, in the same transaction as the change itself.

use sqlx::PgPool;

use crate::schema::SchemaFile;

/// The migrations embedded in the binary (`migrations/`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The NOTIFY channel the trigger signals on commit.
pub const CHANNEL: &str = "herald_outbox";

/// Transaction-local settings the trigger reads: who made the change, and its trace.
pub const ACTOR_SETTING: &str = "herald.actor";
pub const TRACEPARENT_SETTING: &str = "herald.traceparent";

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot run the gateway migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot install capture: {0}")]
    Database(#[from] sqlx::Error),
    #[error("cannot install capture on table {table} for entity {entity}: {source}")]
    Install {
        table: String,
        entity: String,
        #[source]
        source: sqlx::Error,
    },
}

/// Serialises trigger installation between replicas starting together (concurrent `CREATE OR
/// REPLACE TRIGGER` on one table can fail with "tuple concurrently updated").
const INSTALL_LOCK: i64 = 0x6865_7261_6c65;

/// Runs the migrations, then attaches the capture trigger to every entity's table; events carry
/// only the columns the schema file exposes.
pub async fn install(pool: &PgPool, schema: &SchemaFile) -> Result<(), CaptureError> {
    install_with(pool, schema, false).await
}

/// As `install`; with `all_columns`, events carry every column of the tables, exposed or not.
pub async fn install_with(
    pool: &PgPool,
    schema: &SchemaFile,
    all_columns: bool,
) -> Result<(), CaptureError> {
    MIGRATOR.run(pool).await?;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(INSTALL_LOCK)
        .execute(&mut *tx)
        .await?;
    for (entity, declared) in &schema.entities {
        let exposed: Option<Vec<String>> = (!all_columns).then(|| {
            let mut columns: Vec<String> = declared.fields.keys().cloned().collect();
            if !columns.contains(&declared.key) {
                columns.push(declared.key.clone());
            }
            columns
        });
        // Attaching is idempotent: every replica runs it at start.
        sqlx::query("SELECT herald.install_capture($1::regclass, $2, $3, $4)")
            .bind(quote_ident(&declared.table))
            .bind(entity)
            .bind(&declared.key)
            .bind(exposed)
            .execute(&mut *tx)
            .await
            .map_err(|source| CaptureError::Install {
                table: declared.table.clone(),
                entity: entity.clone(),
                source,
            })?;
    }
    tx.commit().await?;
    let commit_times: bool =
        sqlx::query_scalar("SELECT current_setting('track_commit_timestamp') = 'on'")
            .fetch_one(pool)
            .await?;
    if !commit_times {
        tracing::warn!(
            "PostgreSQL runs without track_commit_timestamp: events' `at` is the time of the \
             change, not of the commit (set track_commit_timestamp = on and restart PostgreSQL)"
        );
    }
    Ok(())
}

/// Quotes an SQL identifier: the only way a name reaches SQL text in this crate, and only for
/// names already checked against the live catalogue.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
