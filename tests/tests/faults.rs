//! Faults, with the programs as real processes: clocks that differ, programs killed with
//! SIGKILL in the middle of transfers, network paths that go silent. Each test bounds its
//! waits; the binaries are those `cargo test --workspace` builds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ptth_tests::fronts::ensure_installed;
use ptth_tests::process::{Program, binary, free_port, wait_listening};
use ptth_tests::*;

const LIMIT: Duration = Duration::from_secs(120);

/// Writes `proxy.toml` for alice: `local` forwards to `db/echo` through `relay_url`.
fn proxy_toml(setup: &Setup, relay_url: &str, local: SocketAddr) -> PathBuf {
    let path = setup.path().join("proxy.toml");
    let text = format!(
        "relay_url = \"{relay_url}\"\nkey_file = \"alice.key\"\n\n\
         [[forwards]]\nlisten = \"{local}\"\nserver = \"db\"\nport = \"echo\"\n"
    );
    std::fs::write(&path, text).expect("proxy.toml");
    path
}

/// A relay (in-process) and server `db` (in-process) offering `echo` → `target`, its channels
/// ready.
async fn relay_and_server(target: SocketAddr) -> (Setup, RelayHandle, Component) {
    let setup = Setup::new().expect("setup");
    let relay = setup.start_relay().expect("relay");
    let config = setup
        .server_config(relay.addr, &[("echo", target.to_string())], "")
        .expect("server config");
    let want = config.listen_pool;
    let server = start_server(config, setup.server_key.clone());
    relay
        .expect_server_channels(want, Duration::from_secs(20), "server channels")
        .await;
    (setup, relay, server)
}

/// `ptth_proxy` with `config`, its clock moved by `offset` (faketime's syntax: `+30s`).
fn proxy_with_clock(config: &Path, offset: &str, log: PathBuf) -> Program {
    let faketime = ensure_installed("faketime", "faketime").expect("faketime");
    let mut cmd = Command::new(faketime);
    cmd.args(["-f", offset])
        .arg(binary("ptth_proxy").expect("ptth_proxy"))
        .arg("--config")
        .arg(config)
        .args(["--log-level", "info"]);
    Program::start("ptth_proxy", cmd, log).expect("start ptth_proxy")
}

/// Waits (at most 20 s) until `program`'s log has a line with every one of `words`.
async fn wait_for_log(program: &mut Program, words: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = program.log();
        if let Some(line) = log.lines().find(|l| words.iter().all(|w| l.contains(w))) {
            return line.to_owned();
        }
        program.check_running().expect("still running");
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: no line with {words:?}:\n{log}",
            program.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A proxy whose clock is 30 s ahead of the relay's, or 30 s behind, works; one 90 s ahead is
/// refused, and says that the clocks differ and by how much.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clocks_may_differ_by_30_s_and_90_s_is_explained() {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let (setup, relay, _server) = relay_and_server(echo).await;
        let url = format!("http://{}", relay.addr);
        for offset in ["+30s", "-30s"] {
            let local = free_port().expect("port");
            let config = proxy_toml(&setup, &url, local);
            let log = setup.path().join(format!("proxy{offset}.log"));
            let mut proxy = proxy_with_clock(&config, offset, log);
            wait_listening(local, &mut proxy).await.expect("listening");
            let reply = round_trip(local, b"what time is it")
                .await
                .expect("round trip");
            assert_eq!(reply, b"what time is it", "clock {offset}");
            let problems: Vec<_> = proxy
                .log()
                .lines()
                .filter(|l| l.contains("WARN"))
                .map(str::to_owned)
                .collect();
            assert!(
                problems.is_empty(),
                "clock {offset}:\n{}",
                problems.join("\n")
            );
        }
        let local = free_port().expect("port");
        let config = proxy_toml(&setup, &url, local);
        let log = setup.path().join("proxy+90s.log");
        let mut proxy = proxy_with_clock(&config, "+90s", log);
        let line = wait_for_log(
            &mut proxy,
            &[
                "check the clocks",
                "our clock is 9",
                "s ahead of the relay's",
            ],
        )
        .await;
        assert!(line.contains("401"), "{line}");
    })
    .await;
}
