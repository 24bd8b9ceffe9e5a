//! The container packaging, checked against what it must agree with, so that none of it drifts
//! silently (no container engine is needed): the Dockerfile builds with the release command
//! that the README and docs/deploy.md document and `.ci/test` runs, runs as a numeric non-root
//! user, and starts the relay on the configuration that the compose example mounts; the compose
//! example's `relay.toml` loads, and its relay, Caddy and network agree. (`hadolint` lints the
//! Dockerfile in `.ci/test`; `tests/tests/deploy_docs.rs` runs `caddy validate` on the compose
//! example's Caddyfile.)

use std::path::Path;

use ptth_common::config::{Cidr, RelayConfig};

const DOCKERFILE: &str = include_str!("../../Dockerfile");
const DOCKERIGNORE: &str = include_str!("../../.dockerignore");
const README: &str = include_str!("../../README.md");
const DEPLOY_MD: &str = include_str!("../../docs/deploy.md");
const CI_TEST: &str = include_str!("../../.ci/test");
const COMPOSE: &str = include_str!("../../docs/docker/compose.yaml");
const CADDYFILE: &str = include_str!("../../docs/docker/Caddyfile");

/// The release build of the three programs.
const RELEASE_BUILD: &str =
    "cargo build --release --locked -p ptth_relay -p ptth_server -p ptth_proxy";

/// The Dockerfile's instructions: each logical line (continuations joined), comments left out,
/// as (instruction, arguments).
fn instructions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in DOCKERFILE.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                let (op, args) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((op.to_uppercase(), args.trim().to_owned()));
                current.clear();
            }
        }
    }
    assert!(!out.is_empty(), "no instruction in the Dockerfile");
    out
}

/// The arguments of each `op` instruction, in order.
fn all(op: &str) -> Vec<String> {
    instructions()
        .into_iter()
        .filter(|(o, _)| o == op)
        .map(|(_, args)| args)
        .collect()
}

/// The last stage: the instructions after the last `FROM`.
fn final_stage() -> Vec<(String, String)> {
    let all = instructions();
    let from = all
        .iter()
        .rposition(|(op, _)| op == "FROM")
        .expect("a FROM");
    all[from..].to_vec()
}

#[test]
fn the_image_is_built_with_the_release_command_that_ci_runs_and_the_docs_give() {
    let builds: Vec<String> = all("RUN")
        .into_iter()
        .filter(|run| run.contains("cargo build"))
        .collect();
    assert_eq!(builds, [RELEASE_BUILD], "the Dockerfile's cargo build");
    // A step whose failure is recorded, not fatal: `cargo build ... || status=$?`.
    let ci: Vec<&str> = CI_TEST
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("cargo build"))
        .map(|l| l.split(" || ").next().unwrap_or(l))
        .collect();
    assert_eq!(ci, [RELEASE_BUILD], ".ci/test's cargo build");
    for (page, text) in [("README.md", README), ("docs/deploy.md", DEPLOY_MD)] {
        let documented: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("cargo build"))
            .collect();
        assert_eq!(documented, [RELEASE_BUILD], "{page}'s cargo build");
    }
}

#[test]
fn the_build_stage_starts_from_the_supported_rust_and_no_base_image_floats() {
    let froms = all("FROM");
    assert_eq!(froms.len(), 2, "a build stage and the runtime: {froms:?}");
    for from in &froms {
        let image = from.split_whitespace().next().expect("an image");
        let (_, tag) = image
            .split_once(':')
            .unwrap_or_else(|| panic!("{image} has no tag"));
        assert_ne!(tag, "latest", "{image}");
    }
    // The oldest Rust the workspace supports: what rust-version promises is what is built.
    let manifest = include_str!("../../Cargo.toml");
    let msrv = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("rust-version in Cargo.toml")
        .trim_matches('"');
    assert!(
        froms[0].starts_with(&format!("rust:{msrv}-")),
        "{} is not rust:{msrv}",
        froms[0]
    );
}

#[test]
fn the_image_runs_as_a_numeric_user_that_is_not_root() {
    let users: Vec<String> = final_stage()
        .into_iter()
        .filter(|(op, _)| op == "USER")
        .map(|(_, args)| args)
        .collect();
    let [user] = users.as_slice() else {
        panic!("one USER in the final stage: {users:?}");
    };
    for id in user.split(':') {
        let id: u32 = id
            .parse()
            .unwrap_or_else(|_| panic!("USER {user} is not numeric"));
        assert_ne!(id, 0, "USER {user}");
    }
    let useradd = all("RUN")
        .into_iter()
        .find(|run| run.contains("useradd"))
        .expect("a RUN that creates the user");
    let uid = user.split(':').next().expect("a uid");
    assert!(useradd.contains(&format!("--uid {uid} ")), "{useradd}");
}

#[test]
fn the_image_holds_the_three_programs_and_starts_the_relay_on_the_mounted_config() {
    let copies: Vec<String> = final_stage()
        .into_iter()
        .filter(|(op, _)| op == "COPY")
        .map(|(_, args)| args)
        .collect();
    let [copy] = copies.as_slice() else {
        panic!("one COPY in the final stage: {copies:?}");
    };
    assert!(copy.starts_with("--from=build "), "{copy}");
    assert!(copy.ends_with(" /usr/local/bin/"), "{copy}");
    for bin in ["ptth_relay", "ptth_server", "ptth_proxy"] {
        assert!(
            copy.contains(&format!("/src/target/release/{bin} ")),
            "{bin}: {copy}"
        );
    }
    assert_eq!(
        all("CMD"),
        [r#"["ptth_relay", "--config", "/etc/ptth/relay.toml"]"#]
    );
    assert!(
        COMPOSE.contains("- ./relay.toml:/etc/ptth/relay.toml:ro"),
        "the compose example mounts relay.toml, read-only, where the image reads it"
    );
    assert!(COMPOSE.contains("- ./Caddyfile:/etc/caddy/Caddyfile:ro"));
    for ignored in ["target/", ".git/"] {
        assert!(
            DOCKERIGNORE.lines().any(|l| l == ignored),
            ".dockerignore lacks {ignored}"
        );
    }
}

#[test]
fn the_compose_example_relay_config_loads_and_agrees_with_caddy_and_the_network() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/docker/relay.toml");
    let config = RelayConfig::load(&path).expect("docs/docker/relay.toml loads");
    let port = config.listen.port();
    assert!(config.listen.ip().is_unspecified(), "{}", config.listen);
    assert_eq!(all("EXPOSE"), [port.to_string()], "EXPOSE");
    assert!(
        CADDYFILE.contains(&format!("reverse_proxy relay:{port} ")),
        "Caddy proxies to the relay's port {port}"
    );
    // Caddy is on the compose network, which relay.toml trusts.
    let subnet = COMPOSE
        .lines()
        .find_map(|l| l.trim().strip_prefix("- subnet: "))
        .expect("a subnet in compose.yaml");
    let subnet = Cidr::parse(subnet).expect("the compose subnet");
    assert_eq!(config.trusted_proxies, [subnet], "trusted_proxies");
    assert_eq!(config.authorities, ["relay.example.com"]);
    assert!(CADDYFILE.contains("\nrelay.example.com {\n"), "{CADDYFILE}");
}
