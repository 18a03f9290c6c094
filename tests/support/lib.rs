//! The one test harness: real nats-server (2.15, JetStream; one server or a 3-node cluster), PostgreSQL, Redis and an
//! OpenSearch-compatible server (osmem-server), each started
//! by the test itself on a free loopback port with a temporary data directory, so tests are
//! isolated from each other and from the machine's own services, and can kill (-9) and restart
//! a server mid-test. Servers stop when their handle is dropped.
//!
//! Tests wait for effects with `eventually`, never with a fixed sleep.

mod auth;
mod binaries;
mod cluster;
pub mod contract;
mod nats;
mod opensearch;
mod postgres;
mod process;
mod redis;
mod wait;

pub use auth::service_password;
pub use cluster::{CLUSTER_SIZE, NatsCluster};
pub use nats::NatsServer;
pub use opensearch::{OpenSearchServer, osmem_server as osmem_server_binary};
pub use postgres::Postgres;
pub use redis::RedisServer;
pub use wait::{eventually, eventually_async};

/// The nats-server binary the harness uses (2.10 or newer, never Debian's 2.9).
pub use binaries::nats_server as nats_server_binary;

/// A Herald binary (`herald-gateway`, `herald`) built beside the running test.
pub use binaries::herald as herald_binary;

use std::path::PathBuf;

/// The workspace root (where `Cargo.toml`, `nats/` and `contracts/` are).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral loopback port")
}

/// `count` distinct free loopback ports: each is held until all are picked, so one server's
/// ports never collide with each other (`free_port` twice may return the same port).
pub fn free_ports(count: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..count)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port")
        })
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("a bound address").port())
        .collect()
}
