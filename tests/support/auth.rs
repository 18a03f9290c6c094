//! The repo's own NATS users (`nats/auth.conf`) for tests that run servers with authentication.

use std::path::{Component, PathBuf};

use crate::{NatsServer, workspace_root};

impl NatsServer {
    /// A server that also enforces `nats/auth.conf`: one user per service, each allowed only
    /// its own subjects.
    pub fn start_with_service_users() -> Self {
        Self::start_with(&format!("include \"{}\"", auth_conf_include_path()))
    }
}

/// nats-server resolves even an absolute `include` path relative to the including file (the
/// harness's config in the system temp dir), so the path climbs from there to `/` first.
fn auth_conf_include_path() -> String {
    let temp = std::env::temp_dir()
        .canonicalize()
        .expect("the system temp dir exists");
    // The harness writes its config one directory below the temp dir.
    let depth = temp
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count()
        + 1;
    let auth = workspace_root()
        .join("nats/auth.conf")
        .canonicalize()
        .expect("nats/auth.conf exists");
    let below_root: PathBuf = auth
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    let mut relative = PathBuf::new();
    for _ in 0..depth {
        relative.push("..");
    }
    relative.join(below_root).display().to_string()
}

/// The dev password of one service user, read from `nats/auth.conf`.
pub fn service_password(user: &str) -> String {
    let text = std::fs::read_to_string(workspace_root().join("nats/auth.conf"))
        .expect("read nats/auth.conf");
    let mut lines = text.lines().map(str::trim);
    lines
        .by_ref()
        .find(|line| *line == format!("user: {user}"))
        .unwrap_or_else(|| panic!("no user {user} in nats/auth.conf"));
    let line = lines
        .next()
        .unwrap_or_else(|| panic!("no line after user {user}"));
    line.strip_prefix("password: \"")
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or_else(|| panic!("the line after user {user} is not its password: {line}"))
        .to_owned()
}

impl crate::NatsCluster {
    /// A 3-node cluster whose every node enforces `nats/auth.conf`, as `NatsServer`'s
    /// `start_with_service_users` does for one server.
    pub fn start_with_service_users() -> Self {
        Self::start_with(&format!("include \"{}\"", auth_conf_include_path()))
    }
}
