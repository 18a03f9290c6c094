//! A 3-node JetStream cluster: three nats-server processes on free loopback ports, each with its
//! own store directory, joined by routes, so tests can run R3 streams and kill -9 or restart
//! one node while the others keep a quorum.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::binaries;
use crate::process::{ServerProcess, wait_for_port};

/// One node of a `NatsCluster`.
struct Node {
    /// One directory per node, directly below the system temp dir, like a single server's, so
    /// the `include` of `nats/auth.conf` resolves the same way.
    dir: tempfile::TempDir,
    port: u16,
    /// The monitoring port, whose `/healthz` says when the node's JetStream is current.
    monitor: u16,
    process: Option<ServerProcess>,
}

pub struct NatsCluster {
    nodes: Vec<Node>,
}

/// Nodes in a test cluster: the smallest that keeps a quorum with one node down.
pub const CLUSTER_SIZE: usize = 3;

impl NatsCluster {
    /// Three nodes with JetStream and no authentication.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Three nodes whose configurations also contain `extra` (e.g. `include` of the repo's
    /// `nats/auth.conf`, see `start_with_service_users`).
    pub fn start_with(extra: &str) -> Self {
        let all = crate::free_ports(3 * CLUSTER_SIZE);
        let ports: Vec<(u16, u16, u16)> = all.chunks(3).map(|p| (p[0], p[1], p[2])).collect();
        let routes = ports
            .iter()
            .map(|(_, route, _)| format!("\"nats-route://127.0.0.1:{route}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let cluster_name = format!("herald_test_{}", ports[0].0);
        let mut nodes = Vec::with_capacity(CLUSTER_SIZE);
        for (index, (port, route, monitor)) in ports.iter().enumerate() {
            let dir = tempfile::Builder::new()
                .prefix("herald-nats-cluster-")
                .tempdir()
                .expect("temp dir for a cluster node");
            let config = format!(
                "listen: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{monitor}\"\nserver_name: {cluster_name}_n{index}\n\
                 jetstream {{\n  store_dir: \"{store}\"\n}}\n\
                 cluster {{\n  name: {cluster_name}\n  listen: \"127.0.0.1:{route}\"\n  \
                 routes: [{routes}]\n}}\n{extra}\n",
                store = dir.path().join("jetstream").display(),
            );
            std::fs::write(dir.path().join("nats.conf"), config).expect("write nats.conf");
            nodes.push(Node {
                dir,
                port: *port,
                monitor: *monitor,
                process: None,
            });
        }
        let mut cluster = Self { nodes };
        for index in 0..CLUSTER_SIZE {
            cluster.spawn(index);
        }
        cluster.wait_for_jetstream(Duration::from_secs(60));
        cluster
    }

    fn spawn(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        let log = node.dir.path().join("nats.log");
        let mut command = Command::new(binaries::nats_server());
        command.arg("-c").arg(node.dir.path().join("nats.conf"));
        node.process = Some(ServerProcess::spawn("nats-server", command, &log));
        wait_for_port("nats-server", node.port, Duration::from_secs(15), &log);
    }

    /// Waits until every running node answers JetStream requests (the meta leader is elected
    /// and every node has caught up with it), panicking with the logs after `timeout`.
    fn wait_for_jetstream(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for (index, node) in self.nodes.iter().enumerate() {
            if node.process.is_none() {
                continue;
            }
            while !healthy(node.monitor) {
                if Instant::now() >= deadline {
                    panic!(
                        "cluster node {index} has no JetStream after {timeout:?}; logs:\n{}",
                        self.logs()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Every node's URL, comma-separated: what `[nats] url` takes for a cluster.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The URL of one node only.
    pub fn node_url(&self, index: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[index].port)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Every node's log, headed by its index.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                format!(
                    "--- node {i} ---\n{}",
                    std::fs::read_to_string(n.dir.path().join("nats.log")).unwrap_or_default()
                )
            })
            .collect()
    }

    /// Every node's address, for `ConnectOptions::connect` (which takes a list, not `url()`).
    pub fn addresses(&self) -> Vec<async_nats::ServerAddr> {
        self.nodes
            .iter()
            .map(|n| {
                format!("nats://127.0.0.1:{}", n.port)
                    .parse()
                    .expect("a loopback URL")
            })
            .collect()
    }

    /// A client without credentials that may connect to any node and fails over between them.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(self.addresses())
            .await
            .unwrap_or_else(|e| panic!("connect to the test cluster at {}: {e}", self.url()))
    }

    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client().await)
    }

    /// SIGKILL one node: a crash, not a shutdown. The other two keep a quorum.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut process) = self.nodes[index].process.take() {
            process.kill();
        }
    }

    /// Whether the node runs (was not killed, or was restarted since).
    pub fn is_running(&self, index: usize) -> bool {
        self.nodes[index].process.is_some()
    }

    /// Starts a node again on the same ports with the same store; it rejoins the cluster and
    /// catches its streams up. Returns once it answers JetStream requests.
    pub fn restart(&mut self, index: usize) {
        self.kill(index);
        self.spawn(index);
        self.wait_for_jetstream(Duration::from_secs(60));
    }
}

/// Whether the node's `/healthz` answers 200: its JetStream has a meta leader and its streams
/// are current. Plain HTTP over std, so it needs neither credentials nor a runtime.
fn healthy(monitor: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut socket) = std::net::TcpStream::connect(("127.0.0.1", monitor)) else {
        return false;
    };
    let _ = socket.set_read_timeout(Some(Duration::from_secs(2)));
    if socket
        .write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = socket.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200")
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut process) = node.process.take() {
                process.kill();
            }
        }
    }
}
