//! A server child process that can be killed with SIGKILL (a crash, not a shutdown) and is
//! always reaped, so a failing test leaves no server behind.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct ServerProcess {
    child: Option<Child>,
}

impl ServerProcess {
    /// Spawns `command` with its output appended to `log`.
    pub fn spawn(name: &'static str, mut command: Command, log: &Path) -> Self {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let err = out.try_clone().expect("clone log handle");
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        Self { child: Some(child) }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until something accepts TCP connections on the loopback port.
pub fn wait_for_port(name: &str, port: u16, timeout: Duration, log: &Path) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() >= deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{name} did not listen on port {port} within {timeout:?}; its log:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
