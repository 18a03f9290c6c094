//! `compose.yaml`, checked where no Docker engine runs. Every Herald service in it runs its real
//! binary with `--check-config` under exactly the environment and command compose gives it:
//! container paths mapped back to the repository (the image's `/etc/herald` mirrors the
//! repository root, bind mounts map to their sources), compose host names resolved to
//! loopback, and nothing else in the environment. A key the service refuses, or a variable
//! compose sets that the service does not read, fails the test. The stack's shape is checked
//! too (one image built once, pinned images, healthchecks on `/ready` with a program the image
//! has, `depends_on` on health, durable Redis, traces to Jaeger), and `scripts/dev` must describe
//! the same stack: the same configs and the same users, only addresses differing.
//!
//! Both profiles are checked: `single` (the default, from `.env`) and `cluster` (three NATS
//! nodes with routes, every Herald service pointed at all of them with R3 streams), whose nodes
//! are also booted from their compose commands to see them form one JetStream cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use herald_test_support::{herald_binary, service_password, workspace_root};
use serde_yaml_ng::Value;

const LOOPBACK: &str = "127.0.0.1";

/// The profiles compose.yaml defines: the single-node stack (the default) and the same stack on
/// a 3-node NATS cluster.
const PROFILES: [&str; 2] = ["single", "cluster"];

/// compose.yaml with its merge keys (`<<: *herald`) applied, as one profile runs it: the
/// services without a `profiles` list and those listing the profile.
struct Compose {
    services: BTreeMap<String, Value>,
}

impl Compose {
    /// What `docker compose up` runs: the profile `.env` gives as COMPOSE_PROFILES.
    fn load() -> Self {
        Self::load_profile(&default_profile())
    }

    /// What `docker compose --profile <profile> up` runs: the flag replaces the `.env` default.
    fn load_profile(profile: &str) -> Self {
        let text =
            std::fs::read_to_string(workspace_root().join("compose.yaml")).expect("compose.yaml");
        let mut document: Value = serde_yaml_ng::from_str(&text).expect("compose.yaml is YAML");
        merge_everywhere(&mut document);
        let services = document["services"]
            .as_mapping()
            .expect("compose.yaml has services")
            .iter()
            .filter(|(_, service)| {
                let profiles = strings(&service["profiles"]);
                profiles.is_empty() || profiles.iter().any(|p| p == profile)
            })
            .map(|(name, service)| {
                let name = name.as_str().expect("a service name").to_owned();
                (name, service.clone())
            })
            .collect();
        Self { services }
    }

    /// The NATS servers this profile runs (the services of the `nats` image).
    fn nats_services(&self) -> BTreeSet<&str> {
        self.services
            .iter()
            .filter(|(_, s)| text(&s["image"]).is_some_and(|i| i.starts_with("nats:")))
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// The image the one `build:` produces.
    fn herald_image(&self) -> String {
        let built: Vec<&String> = self
            .services
            .iter()
            .filter(|(_, s)| !s["build"].is_null())
            .map(|(name, _)| name)
            .collect();
        assert_eq!(
            built.len(),
            1,
            "exactly one service builds the image: {built:?}"
        );
        text(&self.services[built[0]]["image"])
            .expect("the built service names its image, for the others to reuse")
    }

    /// The services that run a Herald binary from the Herald image.
    fn herald_services(&self) -> BTreeMap<&str, &Value> {
        let image = self.herald_image();
        self.services
            .iter()
            .filter(|(_, s)| text(&s["image"]).as_deref() == Some(image.as_str()))
            .map(|(name, s)| (name.as_str(), s))
            .collect()
    }

    /// What compose gives a service: its program and arguments, and its environment, with the
    /// container paths mapped to the repository and the compose host names to loopback.
    fn invocation(&self, name: &str, paths: &PathMap) -> Invocation {
        let service = &self.services[name];
        let entrypoint = strings(&service["entrypoint"]);
        let program = entrypoint
            .first()
            .unwrap_or_else(|| panic!("{name}: an entrypoint names the Herald binary"))
            .clone();
        let args = entrypoint[1..]
            .iter()
            .chain(&strings(&service["command"]))
            .map(|arg| paths.map(arg))
            .collect();
        let environment = service["environment"]
            .as_mapping()
            .map(|env| {
                env.iter()
                    .map(|(k, v)| {
                        let key = k.as_str().expect("a variable name").to_owned();
                        let value = text(v).unwrap_or_default();
                        (key, self.to_loopback(&paths.map(&value)))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Invocation {
            program,
            args,
            environment,
        }
    }

    /// `value` with every URL whose host is a compose service pointed at loopback instead.
    fn to_loopback(&self, value: &str) -> String {
        value
            .split(',')
            .map(|part| {
                let Some((scheme, rest)) = part.split_once("://") else {
                    return part.to_owned();
                };
                let (userinfo, hostport) = match rest.rsplit_once('@') {
                    Some((userinfo, hostport)) => (format!("{userinfo}@"), hostport),
                    None => (String::new(), rest),
                };
                let host_end = hostport.find([':', '/']).unwrap_or(hostport.len());
                let host = &hostport[..host_end];
                if self.services.contains_key(host) {
                    format!("{scheme}://{userinfo}{LOOPBACK}{}", &hostport[host_end..])
                } else {
                    part.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Applies merge keys at every depth (`environment: { <<: *herald-env, ... }` too), outer ones
/// first so what they bring in is merged in turn.
fn merge_everywhere(value: &mut Value) {
    // A merged mapping may bring its own merge key (`cluster-gateway: { <<: *gateway }`, where
    // `gateway` has `<<: *herald`): merge again until none is left at this level.
    while value.as_mapping().is_some_and(|m| m.contains_key("<<")) {
        value.apply_merge().expect("compose.yaml's merge keys");
    }
    match value {
        Value::Mapping(map) => map.values_mut().for_each(merge_everywhere),
        Value::Sequence(items) => items.iter_mut().for_each(merge_everywhere),
        _ => {}
    }
}

/// The profile compose runs without `--profile`: COMPOSE_PROFILES in `.env`.
fn default_profile() -> String {
    let env = std::fs::read_to_string(workspace_root().join(".env"))
        .expect(".env names the default profile");
    env.lines()
        .find_map(|l| l.trim().strip_prefix("COMPOSE_PROFILES="))
        .map(str::to_owned)
        .expect(".env sets COMPOSE_PROFILES")
}

/// A Herald service's role, the same in every profile (`cluster-gateway` is a gateway).
fn role(name: &str) -> &str {
    name.strip_prefix("cluster-").unwrap_or(name)
}

/// A scalar as text (compose accepts numbers and booleans where it means strings).
fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A list of strings, or a single string split on white space (both compose forms).
fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::Sequence(items) => items.iter().filter_map(text).collect(),
        Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

/// Container path prefix → repository path.
struct PathMap(Vec<(String, PathBuf)>);

impl PathMap {
    /// From the Dockerfile's runtime stage (its `WORKDIR` must mirror the repository root: every
    /// `COPY <path> <workdir>/<path>`) and the service's bind mounts.
    fn for_service(service: &Value) -> Self {
        let root = workspace_root();
        let workdir = Dockerfile::load().mirror_of_the_repository();
        let mut prefixes = vec![(workdir, root.clone())];
        for volume in strings(&service["volumes"]) {
            let mut parts = volume.split(':');
            let (Some(source), Some(target)) = (parts.next(), parts.next()) else {
                continue;
            };
            if let Some(relative) = source.strip_prefix("./") {
                prefixes.push((target.to_owned(), root.join(relative)));
            }
        }
        // The longest prefix wins.
        prefixes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Self(prefixes)
    }

    fn map(&self, value: &str) -> String {
        for (prefix, host) in &self.0 {
            if let Some(rest) = value.strip_prefix(prefix.as_str())
                && (rest.is_empty() || rest.starts_with('/'))
            {
                return host
                    .join(rest.trim_start_matches('/'))
                    .display()
                    .to_string();
            }
        }
        value.to_owned()
    }
}

/// The runtime (last) stage of the Dockerfile.
struct Dockerfile {
    from: Vec<String>,
    workdir: String,
    copies: Vec<(String, String)>,
    installed: BTreeSet<String>,
}

impl Dockerfile {
    fn load() -> Self {
        let text =
            std::fs::read_to_string(workspace_root().join("Dockerfile")).expect("Dockerfile");
        // Continuation lines joined, so each instruction is one line.
        let joined = text.replace("\\\n", " ");
        let mut file = Self {
            from: Vec::new(),
            workdir: "/".into(),
            copies: Vec::new(),
            installed: BTreeSet::new(),
        };
        for line in joined.lines().map(str::trim) {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.first().copied() {
                Some("FROM") => {
                    file.from.push(words[1].to_owned());
                    file.copies.clear();
                    file.installed.clear();
                    file.workdir = "/".into();
                }
                Some("WORKDIR") => file.workdir = words[1].to_owned(),
                Some("COPY") if !words[1].starts_with("--from") => {
                    file.copies.push((words[1].to_owned(), words[2].to_owned()))
                }
                Some("RUN") if line.contains("apt-get install") => file.installed.extend(
                    line.split("apt-get install")
                        .nth(1)
                        .into_iter()
                        .flat_map(|rest| rest.split("&&").next())
                        .flat_map(str::split_whitespace)
                        .filter(|w| !w.starts_with('-'))
                        .map(str::to_owned),
                ),
                _ => {}
            }
        }
        file
    }

    /// The runtime stage's `WORKDIR`, checked to hold repository files at their repository
    /// paths, so a config's relative paths mean the same in the image and in the repository.
    fn mirror_of_the_repository(&self) -> String {
        assert!(
            !self.copies.is_empty(),
            "the image copies the example configs"
        );
        for (source, target) in &self.copies {
            assert_eq!(
                target.trim_end_matches('/'),
                format!("{}/{}", self.workdir, source.trim_end_matches('/')),
                "COPY {source} {target}: paths under WORKDIR {} must mirror the repository",
                self.workdir
            );
        }
        self.workdir.clone()
    }
}

struct Invocation {
    program: String,
    args: Vec<String>,
    environment: BTreeMap<String, String>,
}

/// What `--check-config` said.
struct Check {
    success: bool,
    output: String,
    read: BTreeSet<String>,
    unread: BTreeSet<String>,
    /// The files it loaded besides its config: setting key → path.
    files: BTreeMap<String, PathBuf>,
    settings: toml::Table,
}

impl Invocation {
    /// Runs the binary with `--check-config`, from the repository root (the image's WORKDIR),
    /// with this environment and nothing else.
    fn check(&self) -> Check {
        let output = Command::new(herald_binary(&self.program))
            .args(&self.args)
            .arg("--check-config")
            .env_clear()
            .envs(&self.environment)
            .current_dir(workspace_root())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.program));
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let listed = |label: &str| -> BTreeSet<String> {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(label))
                .map(|names| {
                    names
                        .split(", ")
                        .filter(|n| !n.is_empty() && *n != "none")
                        .map(|n| n.trim().to_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        let settings = if output.status.success() {
            toml::from_str(&stdout).expect("--check-config prints TOML")
        } else {
            toml::Table::new()
        };
        let files = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("# file loaded: "))
            .filter_map(|l| l.split_once(" = "))
            .map(|(key, path)| (key.to_owned(), PathBuf::from(path)))
            .collect();
        Check {
            files,
            success: output.status.success(),
            output: format!("{stdout}{}", String::from_utf8_lossy(&output.stderr)),
            read: listed("# environment read: "),
            unread: listed("# environment not read: "),
            settings,
        }
    }
}

#[test]
fn every_herald_service_accepts_exactly_what_compose_gives_it() {
    let mut failures = Vec::new();
    for profile in PROFILES {
        check_every_herald_service(&Compose::load_profile(profile), profile, &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn check_every_herald_service(compose: &Compose, profile: &str, failures: &mut Vec<String>) {
    let services = compose.herald_services();
    let roles: BTreeSet<&str> = services.keys().map(|name| role(name)).collect();
    for expected in [
        "gateway",
        "dispatcher",
        "action-worker",
        "job-worker",
        "auditor",
        "flight-streamer",
    ] {
        assert!(
            roles.contains(expected),
            "profile {profile} runs no {expected}"
        );
    }
    assert_eq!(roles.len(), services.len(), "one of each in {profile}");
    for (name, service) in &services {
        let invocation = compose.invocation(name, &PathMap::for_service(service));
        let check = invocation.check();
        if !check.success {
            failures.push(format!(
                "{profile}: {name}: --check-config refused:\n{}",
                check.output
            ));
            continue;
        }
        let unread: BTreeSet<&String> = invocation
            .environment
            .keys()
            .filter(|k| !check.read.contains(*k))
            .chain(&check.unread)
            .collect();
        if !unread.is_empty() {
            failures.push(format!(
                "{profile}: {name}: compose sets {unread:?}, which it does not read"
            ));
        }
        let expected: &[&str] = match role(name) {
            "dispatcher" => &["service.observers"],
            "gateway" | "flight-streamer" => &["service.schema_file"],
            _ => &[],
        };
        for key in expected {
            match check.files.get(*key) {
                Some(path) if workspace_root().join(path).is_file() => {}
                other => failures.push(format!(
                    "{profile}: {name}: --check-config did not load the file {key} names ({other:?}):\n{}",
                    check.output
                )),
            }
        }
        println!(
            "{profile}: {name}: {} {:?} is valid, files loaded: {:?}",
            invocation.program, invocation.args, check.files
        );
    }
}

#[test]
fn a_key_a_service_does_not_read_fails_the_check() {
    let compose = Compose::load();
    let service = compose.herald_services()["dispatcher"];
    let mut invocation = compose.invocation("dispatcher", &PathMap::for_service(service));
    invocation.environment.insert(
        "HERALD_SERVICE__REDIS_URL".into(),
        "redis://127.0.0.1:6379".into(),
    );
    invocation
        .environment
        .insert("HERALD_NATS_URL".into(), "nats://127.0.0.1:4222".into());
    let check = invocation.check();
    assert!(
        !check.success,
        "a dispatcher has no Redis:\n{}",
        check.output
    );
    assert!(
        check.output.contains("service.redis_url"),
        "{}",
        check.output
    );

    invocation.environment.remove("HERALD_SERVICE__REDIS_URL");
    let check = invocation.check();
    assert!(check.success, "{}", check.output);
    assert!(check.unread.contains("HERALD_NATS_URL"), "{}", check.output);
}

/// A broken file that compose's settings point a service at, and what the refusal must name.
struct BrokenFile {
    service: &'static str,
    variable: &'static str,
    key: &'static str,
    text: String,
    says: &'static str,
}

#[test]
fn a_bad_file_a_service_loads_at_start_fails_the_check_naming_file_and_key() {
    let observers = std::fs::read_to_string(workspace_root().join("examples/shop/observers.toml"))
        .expect("the shop's observers");
    let schema =
        std::fs::read_to_string(workspace_root().join("examples/shop/gateway-schema.toml"))
            .expect("the shop's schema file");
    let cases = [
        BrokenFile {
            service: "dispatcher",
            variable: "HERALD_SERVICE__OBSERVERS",
            key: "service.observers",
            text: observers.replacen("kind = \"webhook\"", "kind = \"carrier_pigeon\"", 1),
            says: "carrier_pigeon",
        },
        BrokenFile {
            service: "dispatcher",
            variable: "HERALD_SERVICE__OBSERVERS",
            key: "service.observers",
            text: observers.replacen(
                "condition = 'changed_to(\"status\", \"shipped\")'",
                "condition = 'data.status =='",
                1,
            ),
            says: "condition",
        },
        BrokenFile {
            service: "gateway",
            variable: "HERALD_SERVICE__SCHEMA_FILE",
            key: "service.schema_file",
            text: format!("{schema}\n[[entity\n"),
            says: "schema file",
        },
        BrokenFile {
            service: "flight-streamer",
            variable: "HERALD_SERVICE__SCHEMA_FILE",
            key: "service.schema_file",
            text: schema.replacen("key = \"id\"", "key = 7", 1),
            says: "schema file",
        },
        BrokenFile {
            service: "action-worker",
            variable: "HERALD_SERVICE__CA_FILE",
            key: "service.ca_file",
            text: "-----BEGIN PRIVATE KEY-----\nnot a certificate\n-----END PRIVATE KEY-----\n"
                .into(),
            says: "CA file",
        },
    ];
    let compose = Compose::load();
    let services = compose.herald_services();
    for case in cases {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), &case.text).expect("write the broken file");
        let service = services[case.service];
        let mut invocation = compose.invocation(case.service, &PathMap::for_service(service));
        invocation
            .environment
            .insert(case.variable.into(), file.path().display().to_string());
        let check = invocation.check();
        assert!(
            !check.success,
            "{}: a broken {} passed the check:\n{}",
            case.service, case.key, check.output
        );
        for needle in [case.key, &file.path().display().to_string(), case.says] {
            assert!(
                check.output.contains(needle),
                "{}: the refusal does not name `{needle}`:\n{}",
                case.service,
                check.output
            );
        }
    }
}

#[test]
fn a_flight_certificate_that_is_not_one_fails_the_check() {
    let compose = Compose::load();
    let service = compose.herald_services()["flight-streamer"];
    let mut invocation = compose.invocation("flight-streamer", &PathMap::for_service(service));
    let cert = tempfile::NamedTempFile::new().expect("temp file");
    let key = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(cert.path(), "not a certificate\n").expect("write");
    std::fs::write(key.path(), "not a key\n").expect("write");
    for (variable, path) in [
        ("HERALD_SERVICE__TLS__CERT_FILE", cert.path()),
        ("HERALD_SERVICE__TLS__KEY_FILE", key.path()),
    ] {
        invocation
            .environment
            .insert(variable.into(), path.display().to_string());
    }
    let check = invocation.check();
    assert!(!check.success, "{}", check.output);
    for needle in ["service.tls.cert_file", &cert.path().display().to_string()] {
        assert!(
            check.output.contains(needle),
            "no `{needle}`:\n{}",
            check.output
        );
    }
}

#[test]
fn one_image_built_once_runs_every_herald_service_and_every_image_is_pinned() {
    let images: BTreeSet<String> = PROFILES
        .iter()
        .map(|profile| {
            let compose = Compose::load_profile(profile);
            check_one_image(&compose);
            compose.herald_image()
        })
        .collect();
    assert_eq!(
        images.len(),
        1,
        "every profile runs the same image: {images:?}"
    );
    for profile in [None, Some("cluster")] {
        let mut command = Command::new("docker-compose");
        if let Some(profile) = profile {
            command.args(["--profile", profile]);
        }
        let checked = command
            .args(["-f", "compose.yaml", "config", "-q"])
            .current_dir(workspace_root())
            .output()
            .expect("docker-compose validates compose.yaml (scripts/install-deps installs it)");
        assert!(
            checked.status.success(),
            "docker-compose config ({profile:?}): {}",
            String::from_utf8_lossy(&checked.stderr)
        );
    }
}

fn check_one_image(compose: &Compose) {
    let image = compose.herald_image();
    for (name, service) in &compose.services {
        let image = text(&service["image"]).unwrap_or_else(|| panic!("{name} names no image"));
        assert!(
            pinned(&image),
            "{name}: image {image} is not pinned to a version"
        );
    }
    for from in Dockerfile::load()
        .from
        .iter()
        .chain(std::slice::from_ref(&image))
    {
        assert!(pinned(from), "{from} is not pinned to a version");
    }
    for (name, service) in compose.herald_services() {
        let program = strings(&service["entrypoint"]);
        assert!(
            program.first().is_some_and(|p| p.starts_with("herald-")),
            "{name}: the entrypoint picks a Herald binary: {program:?}"
        );
    }
}

/// What can be checked of the image without building it: the build stage builds every binary
/// of the workspace from the lock file and copies those named `herald*` onto `PATH`, so each
/// compose entrypoint must be such a binary; the build context leaves out the local build and
/// venv; the toolchain is at least the workspace's `rust-version`.
#[test]
fn every_entrypoint_is_a_binary_the_image_builds() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let metadata = Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ])
        .current_dir(workspace_root())
        .output()
        .expect("cargo metadata");
    assert!(
        metadata.status.success(),
        "{}",
        String::from_utf8_lossy(&metadata.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&metadata.stdout).expect("cargo metadata is JSON");
    let binaries: BTreeSet<String> = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
        })
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect();

    let dockerfile =
        std::fs::read_to_string(workspace_root().join("Dockerfile")).expect("Dockerfile");
    let joined = dockerfile.replace("\\\n", " ");
    let build = joined
        .lines()
        .find(|l| l.trim_start().starts_with("RUN cargo build"))
        .expect("the build stage runs cargo build");
    for flag in ["--release", "--locked", "--workspace", "--bins"] {
        assert!(
            build.contains(flag),
            "the image's build lacks {flag}: {build}"
        );
    }
    assert!(
        build.contains("-name 'herald*'")
            && joined.contains("COPY --from=build /out/ /usr/local/bin/"),
        "the image copies the herald* binaries onto PATH: {build}"
    );

    let profiles: Vec<Compose> = PROFILES.iter().map(|p| Compose::load_profile(p)).collect();
    for (name, service) in profiles.iter().flat_map(Compose::herald_services) {
        let program = strings(&service["entrypoint"])
            .first()
            .cloned()
            .unwrap_or_default();
        assert!(
            program.starts_with("herald") && binaries.contains(&program),
            "{name}: the entrypoint {program} is not a workspace binary the image copies \
             (binaries: {binaries:?})"
        );
    }

    let ignored = std::fs::read_to_string(workspace_root().join(".dockerignore"))
        .expect(".dockerignore keeps the local build out of the context");
    for path in ["target", ".venv"] {
        assert!(
            ignored.lines().any(|l| l.trim() == path),
            ".dockerignore lacks {path}"
        );
    }

    let toolchain = Dockerfile::load()
        .from
        .into_iter()
        .find(|from| from.starts_with("rust:"))
        .expect("the build stage is a rust image");
    let version = |text: &str| -> (u32, u32) {
        let mut parts = text
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    };
    let wanted = std::fs::read_to_string(workspace_root().join("Cargo.toml"))
        .expect("Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("the workspace's rust-version");
    assert!(
        version(&toolchain["rust:".len()..]) >= version(&wanted),
        "{toolchain} is older than rust-version {wanted}"
    );
}

/// `name:tag` with a version in the tag (`postgres:15.14`, `prom/prometheus:v3.5.0`), never a
/// floating `latest`.
fn pinned(image: &str) -> bool {
    image
        .rsplit_once(':')
        .is_some_and(|(_, tag)| tag != "latest" && tag.chars().any(|c| c.is_ascii_digit()))
}

#[test]
fn every_service_waits_for_healthy_dependencies_and_herald_is_checked_on_ready() {
    for profile in PROFILES {
        check_health(&Compose::load_profile(profile), profile);
    }
}

fn check_health(compose: &Compose, profile: &str) {
    let installed = Dockerfile::load().installed;
    let scraped = std::fs::read_to_string(workspace_root().join("grafana/prometheus.yml"))
        .expect("grafana/prometheus.yml");
    for (name, service) in compose.herald_services() {
        let test = strings(&service["healthcheck"]["test"]);
        assert_eq!(
            test.first().map(String::as_str),
            Some("CMD"),
            "{name}: {test:?}"
        );
        let program = &test[1];
        assert!(
            installed.contains(program),
            "{name}: the healthcheck runs {program}, which the image does not install"
        );
        let admin = text(&service["environment"]["HERALD_ADMIN__LISTEN"])
            .unwrap_or_else(|| panic!("{name}: compose sets the admin listener"));
        let port = admin.rsplit(':').next().expect("a port");
        assert!(
            test.iter()
                .any(|arg| arg == &format!("http://127.0.0.1:{port}/ready")),
            "{name}: the healthcheck asks /ready on the admin port {port}: {test:?}"
        );
        assert!(
            scraped.contains(&format!("- {}:{port}", role(name))),
            "{profile}: Prometheus does not scrape {name} as {}:{port}",
            role(name)
        );
        assert_eq!(
            text(&service["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]).as_deref(),
            Some("http://jaeger:4317"),
            "{name} exports its spans to Jaeger"
        );
    }
    assert!(
        text(&compose.services["jaeger"]["image"]).is_some_and(|i| i.contains("all-in-one")),
        "Jaeger all-in-one collects the traces"
    );
    for (name, service) in &compose.services {
        let Some(depends) = service["depends_on"].as_mapping() else {
            continue;
        };
        for (dependency, how) in depends {
            let dependency = dependency.as_str().expect("a service name");
            let target = compose.services.get(dependency).unwrap_or_else(|| {
                panic!("{profile}: {name} depends on {dependency}, which {profile} does not run")
            });
            if !target["healthcheck"].is_null() {
                assert_eq!(
                    text(&how["condition"]).as_deref(),
                    Some("service_healthy"),
                    "{name} waits for {dependency} to be healthy"
                );
            }
        }
    }
    let redis = strings(&compose.services["redis"]["command"]).join(" ");
    assert!(
        redis.contains("--appendonly yes") && redis.contains("--appendfsync always"),
        "Redis writes every change to disk before answering: {redis}"
    );
}

#[test]
fn compose_and_scripts_dev_run_the_same_configs_as_the_same_users() {
    let compose = Compose::load();
    let services = compose.herald_services();
    let dev_configs: Vec<String> = std::fs::read_dir(workspace_root().join("examples/dev"))
        .expect("examples/dev")
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_suffix(".toml")
                .map(str::to_owned)
        })
        .collect();
    assert!(!dev_configs.is_empty());
    let compose_names: BTreeSet<&str> = services.keys().copied().collect();
    let dev_names: BTreeSet<&str> = dev_configs.iter().map(String::as_str).collect();
    assert_eq!(
        compose_names, dev_names,
        "compose and scripts/dev run the same services"
    );

    for name in &dev_configs {
        let config = workspace_root().join(format!("examples/dev/{name}.toml"));
        let in_compose = compose.invocation(name, &PathMap::for_service(services[name.as_str()]));
        assert_eq!(
            in_compose.args,
            ["--config".to_owned(), config.display().to_string()],
            "{name}: compose runs the dev config"
        );
        let in_dev = Invocation {
            program: in_compose.program.clone(),
            args: in_compose.args.clone(),
            environment: dev_environment(name),
        };
        let (compose_check, dev_check) = (in_compose.check(), in_dev.check());
        assert!(compose_check.success, "{name}: {}", compose_check.output);
        assert!(dev_check.success, "{name}: {}", dev_check.output);

        let differences = differences(&compose_check.settings, &dev_check.settings, "");
        let unexpected: Vec<&String> = differences.iter().filter(|key| !is_address(key)).collect();
        assert!(
            unexpected.is_empty(),
            "{name}: compose and scripts/dev differ beyond addresses in {unexpected:?}"
        );
        for key in differences.iter().filter(|k| k.ends_with("url")) {
            let user = |settings: &toml::Table| url_user(&lookup(settings, key));
            assert_eq!(
                user(&compose_check.settings),
                user(&dev_check.settings),
                "{name}: {key} connects as the same user"
            );
        }
        let user = lookup(&compose_check.settings, "nats.user");
        let password = |invocation: &Invocation| {
            invocation
                .environment
                .get("HERALD_NATS__PASSWORD")
                .cloned()
                .unwrap_or_else(|| file_value(&config, "nats", "password"))
        };
        assert_eq!(
            password(&in_compose),
            service_password(&user),
            "{name}: compose gives the password nats/auth.conf has for {user}"
        );
        assert_eq!(
            password(&in_dev),
            service_password(&user),
            "{name} in scripts/dev"
        );
    }
}

/// The overrides `scripts/dev up` gives a service (`scripts/dev env <service>`).
fn dev_environment(service: &str) -> BTreeMap<String, String> {
    let output = Command::new("bash")
        .args(["scripts/dev", "env", service])
        .current_dir(workspace_root())
        .output()
        .expect("run scripts/dev env");
    assert!(output.status.success(), "scripts/dev env {service}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Dotted keys whose values differ between two settings tables.
fn differences(a: &toml::Table, b: &toml::Table, prefix: &str) -> Vec<String> {
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut found = Vec::new();
    for key in keys {
        let dotted = format!("{prefix}{key}");
        match (a.get(key), b.get(key)) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                found.extend(differences(x, y, &format!("{dotted}.")))
            }
            (x, y) if x != y => found.push(dotted),
            _ => {}
        }
    }
    found
}

/// Where a server is, or where to listen: what may differ between containers and one machine.
fn is_address(key: &str) -> bool {
    key.ends_with("url") || key.ends_with("listen") || key == "telemetry.log_format"
}

fn lookup(settings: &toml::Table, dotted: &str) -> String {
    let mut value = None;
    let mut table = Some(settings);
    for part in dotted.split('.') {
        value = table.and_then(|t| t.get(part));
        table = value.and_then(toml::Value::as_table);
    }
    value
        .and_then(toml::Value::as_str)
        .unwrap_or_else(|| panic!("no {dotted} in the settings"))
        .to_owned()
}

/// The user part of `scheme://user[:password]@host`, if any.
fn url_user(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let (userinfo, _) = rest.split_once('@')?;
    Some(userinfo.split(':').next().unwrap_or_default().to_owned())
}

fn file_value(path: &Path, section: &str, key: &str) -> String {
    let table: toml::Table =
        toml::from_str(&std::fs::read_to_string(path).expect("a config")).expect("a TOML config");
    table[section][key]
        .as_str()
        .unwrap_or_else(|| panic!("{}: no {section}.{key}", path.display()))
        .to_owned()
}

/// `docker compose --profile cluster up` is the default stack on a 3-node JetStream cluster:
/// nats-1..3 run nats/cluster.conf (the single node's file and users, plus routes naming exactly
/// those three), and each Herald service is its single-node twin with only the NATS URL (all
/// three nodes), `streams.replicas = 3` and `streams.event_partitions` (the same for all, more
/// than the dispatchers) changed, run as two replicas, reachable under the same host name. A
/// service that publishes a port publishes it on a range with a host port per replica.
#[test]
fn the_cluster_profile_is_the_same_stack_on_three_nodes_with_r3_streams() {
    assert_eq!(
        default_profile(),
        "single",
        "docker compose up runs one node"
    );
    let single = Compose::load_profile("single");
    let cluster = Compose::load_profile("cluster");
    assert_eq!(single.nats_services(), BTreeSet::from(["nats"]));
    let nodes = cluster.nats_services();
    assert_eq!(nodes, BTreeSet::from(["nats-1", "nats-2", "nats-3"]));

    let conf = std::fs::read_to_string(workspace_root().join("nats/cluster.conf"))
        .expect("nats/cluster.conf");
    assert!(
        conf.lines()
            .any(|l| l.trim() == "include \"nats-server.conf\""),
        "a cluster node has the single node's settings and users"
    );
    let routed: BTreeSet<&str> = conf
        .split("nats-route://")
        .skip(1)
        .filter_map(|rest| rest.split_once(":6222"))
        .map(|(host, _)| host)
        .collect();
    assert_eq!(routed, nodes, "the routes name exactly the cluster's nodes");
    assert!(conf.contains("listen: \"0.0.0.0:6222\""), "{conf}");
    for node in &nodes {
        let command = strings(&cluster.services[*node]["command"]);
        let after = |flag: &str| {
            command
                .iter()
                .position(|a| a == flag)
                .and_then(|i| command.get(i + 1))
                .cloned()
        };
        assert_eq!(after("-c").as_deref(), Some("/etc/nats/cluster.conf"));
        assert_eq!(after("-n").as_deref(), Some(*node), "its own server name");
        assert!(
            after("-sd").is_some(),
            "{node} stores JetStream on its volume"
        );
    }

    let twins = single.herald_services();
    let cluster_services = cluster.herald_services();
    assert_eq!(cluster_services.len(), twins.len());
    let mut replicas = BTreeMap::new();
    let mut partitions = BTreeSet::new();
    for (name, service) in cluster_services {
        let twin = twins
            .get(role(name))
            .unwrap_or_else(|| panic!("{name} has no single-node twin"));
        let url = text(&service["environment"]["HERALD_NATS__URL"]).expect("a NATS URL");
        let hosts: BTreeSet<&str> = url
            .split(',')
            .filter_map(|u| u.strip_prefix("nats://"))
            .filter_map(|u| u.split(':').next())
            .collect();
        assert_eq!(hosts, nodes, "{name} connects to every node: {url}");
        assert!(
            strings(&service["networks"]["default"]["aliases"]).contains(&role(name).to_owned()),
            "{name} answers to {} too (prometheus.yml scrapes that name)",
            role(name)
        );
        let on_cluster = cluster
            .invocation(name, &PathMap::for_service(service))
            .check();
        let on_one = single
            .invocation(role(name), &PathMap::for_service(twin))
            .check();
        assert!(on_cluster.success, "{name}: {}", on_cluster.output);
        assert!(on_one.success, "{}: {}", role(name), on_one.output);
        assert_eq!(
            differences(&on_cluster.settings, &on_one.settings, ""),
            ["nats.url", "streams.event_partitions", "streams.replicas"],
            "{name} differs from {} in its NATS only",
            role(name)
        );
        assert_eq!(
            on_cluster.settings["streams"]["replicas"].as_integer(),
            Some(3),
            "{name}: {}",
            on_cluster.output
        );
        let copies = service["deploy"]["replicas"].as_u64().unwrap_or(1);
        assert!(copies >= 2, "{name} runs {copies} replica(s)");
        replicas.insert(role(name).to_owned(), copies);
        partitions.insert(on_cluster.settings["streams"]["event_partitions"].as_integer());
        for published in strings(&service["ports"]) {
            let host = published.split(':').next().unwrap_or_default();
            let range: Vec<u64> = host.split('-').filter_map(|p| p.parse().ok()).collect();
            assert!(
                range.len() == 2 && range[1] - range[0] + 1 >= copies,
                "{name}: {copies} replicas need a host port each, not {published}"
            );
        }
    }
    let partitions: Vec<i64> = partitions.into_iter().flatten().collect();
    assert_eq!(
        partitions.len(),
        1,
        "every service provisions HERALD_EVENTS with the same partitions: {partitions:?}"
    );
    assert!(
        partitions[0] as u64 > replicas["dispatcher"],
        "more partitions ({}) than dispatchers ({}), so each serves several",
        partitions[0],
        replicas["dispatcher"]
    );
}

/// A child process killed (SIGKILL) when dropped, so a failing test leaves no server behind.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The cluster profile's three nodes, started from their compose commands (nats/cluster.conf
/// and its include of the single node's file and users), moved onto loopback ports: they form
/// one JetStream cluster, Herald's streams are created there with three replicas, and the
/// service users of nats/auth.conf log in as on the single node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_profiles_nodes_form_one_jetstream_cluster_with_the_same_users() {
    use herald_shared::config::StreamsConfig;
    let compose = Compose::load_profile("cluster");
    let nodes: Vec<&str> = compose.nats_services().into_iter().collect();
    let ports: Vec<(u16, u16, u16)> = nodes
        .iter()
        .map(|_| {
            (
                herald_test_support::free_port(),
                herald_test_support::free_port(),
                herald_test_support::free_port(),
            )
        })
        .collect();
    let routes = ports
        .iter()
        .map(|(_, route, _)| format!("nats-route://127.0.0.1:{route}"))
        .collect::<Vec<_>>()
        .join(",");
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut servers = Vec::new();
    for (node, (port, route, monitor)) in nodes.iter().zip(&ports) {
        let service = &compose.services[*node];
        let paths = PathMap::for_service(service);
        let store = dir.path().join(node);
        let mut args: Vec<String> = strings(&service["command"])
            .iter()
            .map(|a| paths.map(a))
            .collect();
        let sd = args.iter().position(|a| a == "-sd").expect("-sd") + 1;
        args[sd] = store.display().to_string();
        // Only the addresses move: compose's host names become loopback ports.
        args.extend(
            [
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-m",
                &monitor.to_string(),
                "--cluster",
                &format!("nats://127.0.0.1:{route}"),
                "--routes",
                &routes,
            ]
            .map(str::to_owned),
        );
        let log = std::fs::File::create(dir.path().join(format!("{node}.log"))).expect("log");
        let child = Command::new(herald_test_support::nats_server_binary())
            .args(&args)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {node}: {e}"));
        servers.push(Killed(child));
    }
    let logs = || {
        nodes
            .iter()
            .map(|n| {
                std::fs::read_to_string(dir.path().join(format!("{n}.log"))).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    let http = reqwest::Client::new();
    for (_, _, monitor) in &ports {
        let healthy = herald_test_support::eventually_async(
            "every node current with the meta leader",
            std::time::Duration::from_secs(60),
            || async {
                let answer = http
                    .get(format!("http://127.0.0.1:{monitor}/healthz"))
                    .send()
                    .await
                    .ok()?;
                answer.status().is_success().then_some(())
            },
        );
        healthy.await;
    }

    let addresses: Vec<async_nats::ServerAddr> = ports
        .iter()
        .map(|(port, _, _)| {
            format!("nats://127.0.0.1:{port}")
                .parse()
                .expect("a server address")
        })
        .collect();
    let connect = |user: &str, password: String| {
        async_nats::ConnectOptions::new()
            .user_and_password(user.into(), password)
            .connect(addresses.clone())
    };
    let cli = connect("cli", service_password("cli"))
        .await
        .unwrap_or_else(|e| panic!("the cli user logs in: {e}\n{}", logs()));
    let js = async_nats::jetstream::new(cli);
    let replicated = StreamsConfig {
        replicas: 3,
        ..StreamsConfig::default()
    };
    herald_shared::streams::ensure_all(&js, &replicated)
        .await
        .unwrap_or_else(|e| panic!("Herald's streams on the cluster: {e}\n{}", logs()));
    let mut stream = js
        .get_stream(herald_shared::streams::EVENTS.name)
        .await
        .expect("HERALD_EVENTS");
    let info = stream.info().await.expect("stream info");
    assert_eq!(info.config.num_replicas, 3);
    let peers = info.cluster.as_ref().map_or(0, |c| c.replicas.len());
    assert_eq!(peers, 2, "a leader and two replicas: {:?}", info.cluster);

    for user in ["gateway", "dispatcher", "custom-worker"] {
        connect(user, service_password(user))
            .await
            .unwrap_or_else(|e| panic!("{user} logs in as on one node: {e}"));
    }
    assert!(
        connect("gateway", "not-the-password".into()).await.is_err(),
        "a wrong password is refused"
    );
}
