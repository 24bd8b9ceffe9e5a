//! Drain and reload, with the programs as real processes: SIGTERM lets open tunnels finish
//! (within `drain_grace`) while new work is refused, a second SIGTERM exits at once, and
//! SIGHUP applies a changed configuration without dropping the tunnels it still allows. The
//! binaries are those `cargo test --workspace` builds; to run this file alone after a change,
//! `cargo build --workspace` first.

use std::net::SocketAddr;
use std::time::Duration;

use ptth_tests::process::{self, LogsOnFailure, Program, free_port, spawn};
use ptth_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(120);
/// How long a program may take to exit once nothing holds it.
const EXITS_WITHIN: Duration = Duration::from_secs(10);

/// The three programs as processes: relay, server `db` offering `echo` (and the ports in
/// `server_ports`), and alice's proxy forwarding one local port per port name in `forwards`.
struct Stack {
    /// Before `setup`, whose folder holds the logs: fields are dropped in order.
    _logs: LogsOnFailure,
    setup: Setup,
    relay_addr: SocketAddr,
    relay: Program,
    server: Program,
    proxy: Program,
    /// Local address of each forward, in the order given.
    locals: Vec<SocketAddr>,
}

impl Stack {
    async fn start(relay_extra: &str, server: &str, proxy_extra: &str, forwards: &[&str]) -> Self {
        let mut setup = Setup::new().expect("setup");
        setup.relay_extra = relay_extra.to_owned();
        let logs = LogsOnFailure(setup.path().to_owned());
        let relay_addr = free_port().expect("port");
        let dir = setup.path().to_owned();
        let mut relay = spawn(
            &dir,
            "ptth_relay",
            "relay.toml",
            &setup.relay_toml(relay_addr),
        );
        process::wait_listening(relay_addr, &mut relay)
            .await
            .expect("relay listening");
        let server_toml = format!(
            "relay_url = \"http://{relay_addr}\"\nname = \"db\"\nkey_file = \"db.key\"\n\
             max_backoff = \"500ms\"\n{server}"
        );
        let server = spawn(&dir, "ptth_server", "server.toml", &server_toml);
        let mut proxy_toml = format!(
            "relay_url = \"http://{relay_addr}\"\nkey_file = \"alice.key\"\n{proxy_extra}\n"
        );
        let mut locals = Vec::new();
        for port in forwards {
            let local = free_port().expect("port");
            proxy_toml.push_str(&format!(
                "[[forwards]]\nlisten = \"{local}\"\nserver = \"db\"\nport = \"{port}\"\n"
            ));
            locals.push(local);
        }
        let mut proxy = spawn(&dir, "ptth_proxy", "proxy.toml", &proxy_toml);
        for local in &locals {
            process::wait_listening(*local, &mut proxy)
                .await
                .expect("proxy listening");
        }
        Self {
            setup,
            _logs: logs,
            relay_addr,
            relay,
            server,
            proxy,
            locals,
        }
    }

    /// Writes server.toml again with `server` lines after the common ones.
    fn rewrite_server_toml(&self, server: &str) {
        let text = format!(
            "relay_url = \"http://{}\"\nname = \"db\"\nkey_file = \"db.key\"\n\
             max_backoff = \"500ms\"\n{server}",
            self.relay_addr
        );
        std::fs::write(self.setup.path().join("server.toml"), text).expect("server.toml");
    }
}

/// Waits (at most 20 s) until a round trip through `local` comes back exact.
async fn reachable(local: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if round_trip(local, b"ping").await.ok().as_deref() == Some(b"ping".as_slice()) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no round trip through {local}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A connection through `local` that carries nothing: the proxy refuses it (reset, or no
/// local port) or closes it without a byte of echo.
async fn refused(local: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(local).await else {
        return true;
    };
    let _ = s.write_all(b"anyone?").await;
    let (echo, _) = tokio::time::timeout(Duration::from_secs(15), read_until_closed(&mut s))
        .await
        .expect("a refused connection ends");
    echo.is_empty()
}

/// An open tunnel to the echo service, with a first exchange done.
async fn open_tunnel(local: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(local).await.expect("connect");
    exchange(&mut s, b"before").await;
    s
}

/// Sends `msg` on `s` and reads exactly that back.
async fn exchange(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.expect("write");
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(back, msg);
}

/// Half-closes `s` and expects a clean EOF with nothing more.
async fn close_cleanly(mut s: TcpStream) {
    s.shutdown().await.expect("shutdown");
    let (rest, failed) = tokio::time::timeout(Duration::from_secs(10), read_until_closed(&mut s))
        .await
        .expect("EOF in time");
    assert!(rest.is_empty() && !failed, "clean EOF: {rest:?} {failed}");
}

/// `GET` and `HEAD` of the relay's health check: status and body (empty for `HEAD`).
async fn health(relay: SocketAddr) -> [(u16, String); 2] {
    let client = http_client_builder(None)
        .expect("client")
        .build()
        .expect("client");
    let url = format!("http://{relay}{}", ptth_common::protocol::HEALTH_PATH);
    let mut out = Vec::new();
    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        let r = client.request(method, &url).send().await.expect("health");
        let status = r.status().as_u16();
        out.push((status, r.text().await.expect("body")));
    }
    [out.remove(0), out.remove(0)]
}

/// SIGTERM to the relay: listen and connect get 503 (a new connection through the proxy is
/// refused), its health check turns from 200 to 503, an open tunnel carries on, byte-exact,
/// and the relay exits once it has ended, long before drain_grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_drains_open_tunnels_and_refuses_new_ones() {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let mut stack = Stack::start(
            "drain_grace = \"60s\"",
            &format!("[ports]\necho = \"{echo}\"\n"),
            "",
            &["echo"],
        )
        .await;
        let local = stack.locals[0];
        reachable(local).await;
        let mut tunnel = open_tunnel(local).await;
        assert_eq!(
            health(stack.relay_addr).await,
            [(200, "ok\n".to_owned()), (200, String::new())]
        );
        stack.relay.signal("TERM").expect("TERM");
        stack
            .relay
            .logged(&["draining: taking no new connections", "tunnels=1"])
            .await
            .expect("draining");
        assert_eq!(
            health(stack.relay_addr).await,
            [(503, "draining\n".to_owned()), (503, String::new())]
        );
        // The first may meet a pooled channel that the drain is retiring; the second opens
        // a fresh channel, which the relay refuses with 503.
        assert!(refused(local).await, "a new connection while draining");
        assert!(
            refused(local).await,
            "another new connection while draining"
        );
        let refusal = stack
            .proxy
            .logged(&[
                "connect to db/echo failed",
                "relay draining or shutting down",
            ])
            .await
            .expect("the proxy names the refusal");
        assert!(refusal.contains("retry"), "{refusal}");
        exchange(&mut tunnel, b"after the signal").await;
        close_cleanly(tunnel).await;
        let status = stack.relay.exited(EXITS_WITHIN).await.expect("exit");
        assert!(status.success(), "{status}");
        let log = stack.relay.log();
        assert!(log.contains("drained: every tunnel has ended"), "{log}");
    })
    .await;
}

/// A tunnel still open when drain_grace ends is closed (reset), and the relay exits; with a
/// long drain_grace, a second SIGTERM exits at once, with code 130.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_grace_bounds_the_drain_and_a_second_signal_exits_at_once() {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let mut stack = Stack::start(
            "drain_grace = \"1s\"",
            &format!("[ports]\necho = \"{echo}\"\n"),
            "",
            &["echo"],
        )
        .await;
        let local = stack.locals[0];
        reachable(local).await;
        let mut tunnel = open_tunnel(local).await;
        stack.relay.signal("TERM").expect("TERM");
        let status = stack.relay.exited(EXITS_WITHIN).await.expect("exit");
        assert!(status.success(), "{status}");
        let log = stack.relay.log();
        assert!(log.contains("drain_grace is over"), "{log}");
        let (rest, failed) =
            tokio::time::timeout(Duration::from_secs(10), read_until_closed(&mut tunnel))
                .await
                .expect("the tunnel ends");
        assert!(
            rest.is_empty() && failed,
            "reset, not a clean close: {rest:?}"
        );

        // Again with a long grace: the second signal does not wait for it.
        let dir = stack.setup.path().to_owned();
        std::fs::write(
            dir.join("relay.toml"),
            stack
                .setup
                .relay_toml(stack.relay_addr)
                .replace("drain_grace = \"1s\"", "drain_grace = \"60s\""),
        )
        .expect("relay.toml");
        let mut relay = process::start(&dir, "ptth_relay", "relay.toml");
        process::wait_listening(stack.relay_addr, &mut relay)
            .await
            .expect("relay listening");
        reachable(local).await;
        let _tunnel = open_tunnel(local).await;
        relay.signal("TERM").expect("TERM");
        relay
            .logged(&["draining: taking no new connections", "tunnels=1"])
            .await
            .expect("draining");
        relay.signal("TERM").expect("second TERM");
        let status = relay
            .exited(Duration::from_secs(3))
            .await
            .expect("exits at once");
        assert_eq!(status.code(), Some(130), "{status}");
    })
    .await;
}

/// SIGTERM to the server proxy: it opens no channel any more (new connections are refused at
/// the relay: server offline), the open tunnel carries on, and it exits once that has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_proxy_drains() {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        // The open tunnel keeps the port offered, so a new connection waits for a server
        // channel until accept_timeout: a short one, so that it is refused soon.
        let mut stack = Stack::start(
            "accept_timeout = \"2s\"\n",
            &format!("drain_grace = \"60s\"\n[ports]\necho = \"{echo}\"\n"),
            "",
            &["echo"],
        )
        .await;
        let local = stack.locals[0];
        reachable(local).await;
        let mut tunnel = open_tunnel(local).await;
        stack.server.signal("TERM").expect("TERM");
        stack
            .server
            .logged(&["draining: taking no new connections", "tunnels=1"])
            .await
            .expect("draining");
        // Its idle channels are retired: new connections find the port offered by no one.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !refused(local).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "new connections still carried"
            );
        }
        exchange(&mut tunnel, b"after the signal").await;
        close_cleanly(tunnel).await;
        let status = stack.server.exited(EXITS_WITHIN).await.expect("exit");
        assert!(status.success(), "{status}");
        assert!(
            stack
                .server
                .log()
                .contains("drained: every tunnel has ended"),
            "{}",
            stack.server.log()
        );
    })
    .await;
}

/// SIGTERM to the client proxy: its local ports close at once, the open tunnel carries on,
/// and it exits once that has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_proxy_drains() {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let mut stack = Stack::start(
            "",
            &format!("[ports]\necho = \"{echo}\"\n"),
            "drain_grace = \"60s\"",
            &["echo"],
        )
        .await;
        let local = stack.locals[0];
        reachable(local).await;
        let mut tunnel = open_tunnel(local).await;
        stack.proxy.signal("TERM").expect("TERM");
        stack
            .proxy
            .logged(&["draining: local port closed"])
            .await
            .expect("port closed");
        let connect = TcpStream::connect(local).await;
        assert!(connect.is_err(), "the local port still accepts");
        exchange(&mut tunnel, b"after the signal").await;
        close_cleanly(tunnel).await;
        let status = stack.proxy.exited(EXITS_WITHIN).await.expect("exit");
        assert!(status.success(), "{status}");
    })
    .await;
}

/// SIGHUP to the server proxy with a changed server.toml: a port no longer offered is closed
/// with its open tunnel (reset), a new port is offered, a port that stays keeps its tunnel;
/// a file that does not parse is refused with its line, and the ports in force stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_proxy_reloads_its_ports() {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let mut stack = Stack::start(
            "",
            &format!("[ports]\necho = \"{echo}\"\nkept = \"{echo}\"\n"),
            "",
            &["echo", "kept", "added"],
        )
        .await;
        let (echo_local, kept_local, added_local) =
            (stack.locals[0], stack.locals[1], stack.locals[2]);
        reachable(echo_local).await;
        reachable(kept_local).await;
        assert!(refused(added_local).await, "not offered yet");
        let mut dropped = open_tunnel(echo_local).await;
        let mut kept = open_tunnel(kept_local).await;

        stack.rewrite_server_toml(&format!("[ports]\nkept = \"{echo}\"\nadded = \"{echo}\"\n"));
        stack.server.signal("HUP").expect("HUP");
        let line = stack
            .server
            .logged(&["configuration reloaded"])
            .await
            .expect("reloaded");
        assert!(line.contains("added") && line.contains("removed"), "{line}");
        let (rest, failed) =
            tokio::time::timeout(Duration::from_secs(10), read_until_closed(&mut dropped))
                .await
                .expect("the removed port's tunnel ends");
        assert!(rest.is_empty() && failed, "reset: {rest:?}");
        reachable(added_local).await;
        exchange(&mut kept, b"still here").await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !refused(echo_local).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the removed port still carries"
            );
        }

        // A file that does not parse: refused with its line; the ports in force stay.
        stack.rewrite_server_toml("[ports]\nkept = 42\n");
        stack.server.signal("HUP").expect("HUP");
        let line = stack
            .server
            .logged(&["configuration not reloaded"])
            .await
            .expect("refused");
        assert!(
            line.contains("server.toml") && line.contains("line 6"),
            "{line}"
        );
        exchange(&mut kept, b"and still").await;
        reachable(added_local).await;
        close_cleanly(kept).await;
    })
    .await;
}

/// SIGHUP to the relay with a changed relay.toml: a client whose allow list no longer grants
/// a port loses its open tunnel there (reset) and is refused from then on; a client newly
/// allowed gets through; the server's channels go on. A file that does not parse is refused
/// with its line, and the configuration in force stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_reloads_clients_and_allow_lists() {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let mut stack =
            Stack::start("", &format!("[ports]\necho = \"{echo}\"\n"), "", &["echo"]).await;
        let alice = stack.locals[0];
        reachable(alice).await;
        let bob_config = stack
            .setup
            .proxy_config(stack.relay_addr, "bob", &[("db", "echo")], "")
            .expect("bob's proxy.toml");
        let (_bob_proxy, bob) = start_proxy(bob_config, stack.setup.bob_key.clone()).expect("bob");
        let bob = bob[0];
        assert!(refused(bob).await, "bob may not reach db/echo yet");
        let mut alices = open_tunnel(alice).await;

        let relay_toml = stack.setup.path().join("relay.toml");
        let text = std::fs::read_to_string(&relay_toml).expect("relay.toml");
        let changed = text
            .replace("allow = [\"db/*\", \"web/*\"]", "allow = [\"web/*\"]")
            .replace("allow = [\"db/other\"]", "allow = [\"db/echo\"]");
        assert_ne!(changed, text);
        std::fs::write(&relay_toml, &changed).expect("relay.toml");
        stack.relay.signal("HUP").expect("HUP");
        let line = stack
            .relay
            .logged(&["configuration reloaded"])
            .await
            .expect("reloaded");
        assert!(
            line.contains(r#"clients_changed=["alice", "bob"]"#),
            "{line}"
        );
        stack
            .relay
            .logged(&["closed the channels", "no longer allows"])
            .await
            .expect("closed");
        let (rest, failed) =
            tokio::time::timeout(Duration::from_secs(10), read_until_closed(&mut alices))
                .await
                .expect("alice's tunnel ends");
        assert!(rest.is_empty() && failed, "reset: {rest:?}");
        reachable(bob).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !refused(alice).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "alice still gets through"
            );
        }
        stack
            .proxy
            .logged(&["403", "not allowed to connect to this port"])
            .await
            .expect("alice is told why");

        // A file that does not parse: refused with its line, the configuration in force stays.
        std::fs::write(&relay_toml, format!("{changed}\nmax_nonces = \"many\"\n"))
            .expect("relay.toml");
        stack.relay.signal("HUP").expect("HUP");
        let line = stack
            .relay
            .logged(&["configuration not reloaded"])
            .await
            .expect("refused");
        assert!(
            line.contains("relay.toml") && line.contains("line"),
            "{line}"
        );
        let mut bobs = open_tunnel(bob).await;
        exchange(&mut bobs, b"still allowed").await;
        close_cleanly(bobs).await;
    })
    .await;
}
