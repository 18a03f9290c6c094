//! The real binary, killed with SIGKILL while relaying: nothing committed is lost and nothing is
//! stored twice.

mod common;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::World;

/// The gateway binary as a child process, killed (SIGKILL) when dropped.
struct Process(Child);

impl Process {
    fn start(world: &World) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_herald-gateway"))
            .env("HERALD_NATS__URL", world.nats_server.url())
            .env("HERALD_SERVICE__DATABASE_URL", world.pg.url())
            .env("HERALD_SERVICE__SCHEMA_FILE", world.schema_path())
            .env("HERALD_SERVICE__LISTEN", "127.0.0.1:0")
            .env("HERALD_SERVICE__RELAY__BATCH_SIZE", "25")
            .env("HERALD_TELEMETRY__LOG_LEVEL", "warn")
            .env_remove("HERALD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the gateway binary");
        Self(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn outbox_depth(world: &World) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM herald_outbox")
        .fetch_one(&world.db)
        .await
        .expect("count outbox")
}

#[tokio::test]
async fn a_gateway_killed_between_commit_and_publish_loses_nothing_and_duplicates_nothing() {
    const ROWS: usize = 5000;
    let world = World::start().await;
    let file = herald_gateway::SchemaFile::parse(common::SCHEMA).expect("schema");
    herald_gateway::capture::install(&world.db, &file)
        .await
        .expect("install capture");
    sqlx::query("INSERT INTO counters (id, n) SELECT g, 0 FROM generate_series(1, $1) g")
        .bind(ROWS as i32)
        .execute(&world.db)
        .await
        .expect("commit the changes while no gateway runs");

    let mut gateway = Process::start(&world);
    herald_test_support::eventually_async(
        "the first events to be published",
        Duration::from_secs(30),
        || async { (!world.events().await.is_empty()).then_some(()) },
    )
    .await;
    gateway.kill();
    let left = outbox_depth(&world).await;
    let published = world.events().await.len();
    assert!(
        left > 0,
        "the kill came after the relay had finished; nothing was tested"
    );
    assert!(published < ROWS);

    let _restarted = Process::start(&world);
    herald_test_support::eventually_async("an empty outbox", Duration::from_secs(60), || async {
        (outbox_depth(&world).await == 0).then_some(())
    })
    .await;
    let stored = world.events().await;
    let ids: HashSet<_> = stored.iter().map(|s| s.event().id).collect();
    assert_eq!(ids.len(), ROWS, "every committed change arrived");
    assert_eq!(stored.len(), ROWS, "no event is stored twice");
}

#[tokio::test]
async fn the_binary_prints_a_starting_schema_file_from_the_database() {
    let world = World::start().await;
    let output = Command::new(env!("CARGO_BIN_EXE_herald-gateway"))
        .arg("--print-schema-from-db")
        .env("HERALD_SERVICE__DATABASE_URL", world.pg.url())
        .env_remove("HERALD_CONFIG")
        .output()
        .expect("run the gateway binary");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let file = herald_gateway::SchemaFile::parse(&text).expect("a valid schema file");
    assert_eq!(file.entities["Customers"].table, "customers");
    assert_eq!(file.entities["Orders"].relations["customer"].to, "id");
}
