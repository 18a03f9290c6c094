//! `herald schema init`: the file it writes from a real database is one the gateway accepts, and
//! an existing file is never overwritten by accident.

mod common;

use common::*;
use herald_gateway::SchemaFile;
use herald_gateway::schema::{RelationKind, check};
use herald_test_support::Postgres;
use sqlx::PgPool;

/// No NATS runs in these tests: `schema` must not need it.
const NO_NATS: &str = "nats://127.0.0.1:1";

async fn shop(postgres: &Postgres) -> PgPool {
    let pool = PgPool::connect(&postgres.url()).await.expect("connect");
    for statement in [
        "CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, vip boolean)",
        "CREATE TABLE order_items (id bigserial PRIMARY KEY, \
         customer_id integer REFERENCES customers (id), total numeric(10, 2), extra jsonb)",
        "CREATE TABLE audit_trail (at timestamptz, what text)",
    ] {
        sqlx::query(statement)
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
    pool
}

#[tokio::test]
async fn the_written_schema_describes_the_tables_and_passes_the_gateways_check() {
    let postgres = Postgres::start();
    let pool = shop(&postgres).await;

    let text = succeed(
        NO_NATS,
        &["schema", "init", "--database-url", &postgres.url()],
    )
    .await;
    let file = SchemaFile::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));

    // A table without a primary key cannot be an entity.
    assert_eq!(
        file.entities.keys().collect::<Vec<_>>(),
        ["Customers", "OrderItems"]
    );
    let customers = &file.entities["Customers"];
    assert_eq!(customers.table, "customers");
    assert_eq!(customers.key, "id");
    assert_eq!(
        customers
            .fields
            .iter()
            .map(|(name, ty)| (name.as_str(), ty.graphql_name()))
            .collect::<Vec<_>>(),
        [("id", "Int"), ("name", "String"), ("vip", "Boolean")]
    );
    let items = &file.entities["OrderItems"];
    assert_eq!(items.fields["total"].graphql_name(), "Float");
    assert_eq!(items.fields["extra"].graphql_name(), "JSON");
    let customer = &items.relations["customer"];
    assert_eq!(
        (
            customer.entity.as_str(),
            customer.kind,
            customer.from.as_str()
        ),
        ("Customers", RelationKind::One, "customer_id")
    );
    assert_eq!(customers.relations["order_items"].kind, RelationKind::Many);

    check(&pool, &file)
        .await
        .unwrap_or_else(|e| panic!("the gateway refuses the written file: {e}\n{text}"));
}

#[tokio::test]
async fn an_existing_file_is_only_overwritten_with_force() {
    let postgres = Postgres::start();
    shop(&postgres).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("schema.toml");
    let path_arg = path.to_str().expect("a UTF-8 temp path");
    let url = postgres.url();
    let init = ["schema", "init", "--database-url", &url, "--out", path_arg];

    let out = succeed(NO_NATS, &init).await;
    assert_eq!(out.trim(), format!("wrote 2 entities to {path_arg}"));
    let written = std::fs::read_to_string(&path).expect("the file was written");
    let printed = succeed(NO_NATS, &["schema", "init", "--database-url", &url]).await;
    assert_eq!(written, printed);

    std::fs::write(&path, "# hand-edited\n").expect("edit the file");
    let refused = fail(NO_NATS, &init).await;
    assert!(
        refused.contains(&format!("{path_arg} already exists; pass --force")),
        "{refused}"
    );
    assert_eq!(
        std::fs::read_to_string(&path).expect("file"),
        "# hand-edited\n"
    );

    let forced = [&init[..], &["--force"]].concat();
    succeed(NO_NATS, &forced).await;
    assert_eq!(std::fs::read_to_string(&path).expect("file"), written);
}

#[tokio::test]
async fn an_unreachable_database_is_a_clear_error() {
    let error = fail(
        NO_NATS,
        &[
            "schema",
            "init",
            "--database-url",
            "postgres://postgres@127.0.0.1:1/postgres",
        ],
    )
    .await;
    assert!(error.contains("cannot connect to PostgreSQL"), "{error}");
}
