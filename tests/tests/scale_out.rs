//! Several relays behind HAProxy, and behind nginx, as docs/scale-out.md sets them up, with the
//! programs as real processes: 3 relays sharing one configuration, 12 servers, 3 client
//! proxies. Every server is reachable, at one relay; behind HAProxy the servers spread over
//! all the relays, none with more than twice the mean (nginx's ring depends on the relays'
//! addresses, which are random here); transfers through each relay are exact. A relay killed
//! with SIGKILL during transfers loses only its own tunnels, its servers are reachable again
//! through the others within [`FAILOVER`], and started again it takes its servers back for new
//! connections without cutting the tunnels opened meanwhile.
//!
//! The binaries are those `cargo test --workspace` builds; to run this file alone after a
//! change, `cargo build --workspace` first.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ptth_common::keys::PrivateKey;
use ptth_tests::cluster::Cluster;
use ptth_tests::fronts::{FrontKind, Pki};
use ptth_tests::process::{LogsOnFailure, Program, binary};
use ptth_tests::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(120);
const RELAYS: usize = 3;
const SERVERS: usize = 12;
const PROXIES: usize = 3;
/// How soon, after a relay dies, every server is reachable again through the others: what
/// docs/scale-out.md promises (the balancer's health checks and the endpoints' backoff).
const FAILOVER: Duration = Duration::from_secs(10);
/// `channel_max_age` of the endpoints here: how soon a relay that is back gets its servers
/// back (60 s by default).
const MAX_AGE: &str = "3s";

/// The servers' names: fixed, so that HAProxy's consistent hash, which depends only on the
/// name and on the relays' order, spreads them the same way on every run.
fn server_names() -> Vec<String> {
    (0..SERVERS).map(|i| format!("srv{i:02}")).collect()
}

/// Everything of the test, running.
struct Scale {
    cluster: Cluster,
    /// The server proxies, by name.
    servers: BTreeMap<String, Program>,
    /// Each proxy, and its local address for each server, by name.
    proxies: Vec<(Program, BTreeMap<String, SocketAddr>)>,
    _logs: LogsOnFailure,
    _dir: tempfile::TempDir,
}

impl Scale {
    async fn start(kind: FrontKind) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().to_owned();
        let logs = LogsOnFailure(d.clone());
        let pki = Pki::generate(&d).expect("pki");
        let names = server_names();
        // One relay.toml for all relays: the keys and the allow lists.
        let mut shared = String::from("trusted_proxies = [\"127.0.0.1\"]\n");
        for name in &names {
            let key = new_key(&d, name);
            shared.push_str(&format!(
                "[[servers]]\nname = \"{name}\"\npublic_key = \"{key}\"\n"
            ));
        }
        let allow: Vec<String> = names.iter().map(|n| format!("\"{n}/*\"")).collect();
        for p in 0..PROXIES {
            let key = new_key(&d, &format!("client{p}"));
            shared.push_str(&format!(
                "[[clients]]\nname = \"client{p}\"\npublic_key = \"{key}\"\nallow = [{}]\n",
                allow.join(", ")
            ));
        }
        let cluster = Cluster::start(
            kind,
            &d,
            &pki,
            &shared,
            RELAYS,
            Duration::from_secs(75),
            200,
        )
        .await
        .expect("cluster");
        let echo = echo_service().await.expect("echo");
        let url = cluster.url();
        let ca = pki.ca.display().to_string();
        let mut servers = BTreeMap::new();
        for name in &names {
            let text = format!(
                "relay_url = \"{url}\"\nca_file = \"{ca}\"\nname = \"{name}\"\n\
                 key_file = \"{name}.key\"\nchannel_max_age = \"{MAX_AGE}\"\n\
                 [ports]\necho = \"{echo}\"\n"
            );
            servers.insert(
                name.clone(),
                start(&d, &format!("server-{name}"), "ptth_server", &text),
            );
        }
        let mut proxies = Vec::new();
        for p in 0..PROXIES {
            let mut text = format!(
                "relay_url = \"{url}\"\nca_file = \"{ca}\"\nkey_file = \"client{p}.key\"\n\
                 channel_max_age = \"{MAX_AGE}\"\n"
            );
            for name in &names {
                text.push_str(&format!(
                    "[[forwards]]\nlisten = \"127.0.0.1:0\"\nserver = \"{name}\"\nport = \"echo\"\n"
                ));
            }
            let mut proxy = start(&d, &format!("proxy{p}"), "ptth_proxy", &text);
            // Each forward on a port of its own choosing, which the proxy logs.
            let mut locals = BTreeMap::new();
            for name in &names {
                let line = proxy
                    .logged(&["forwarding", &format!(" server={name} ")])
                    .await
                    .expect("forwarding");
                let local: SocketAddr = line
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix("listen="))
                    .and_then(|a| a.parse().ok())
                    .unwrap_or_else(|| panic!("no listen= in {line}"));
                locals.insert(name.clone(), local);
            }
            proxies.push((proxy, locals));
        }
        Self {
            cluster,
            servers,
            proxies,
            _logs: logs,
            _dir: dir,
        }
    }

    /// The local address of `server`'s forward on proxy `p`.
    fn local(&self, p: usize, server: &str) -> SocketAddr {
        self.proxies[p].1[server]
    }

    /// Which relay each server is online at (each at exactly one), read from the relays'
    /// `/api/status`; relays in `skip` are not asked.
    async fn placement(&self, skip: Option<usize>) -> BTreeMap<String, Vec<usize>> {
        let mut at: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for i in (0..RELAYS).filter(|i| Some(*i) != skip) {
            for name in self.cluster.servers_online(i).await.expect("status") {
                at.entry(name).or_default().push(i);
            }
        }
        at
    }

    /// Waits (at most `limit`) until a round trip through every proxy reaches every server.
    async fn all_reachable(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        for (p, (_, locals)) in self.proxies.iter().enumerate() {
            for (name, local) in locals {
                while round_trip(*local, b"ping").await.ok().as_deref() != Some(b"ping") {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{name} not reachable through proxy {p} within {limit:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

/// A fresh key written as `dir/name.key`; its public key.
fn new_key(dir: &Path, name: &str) -> String {
    let key = PrivateKey::generate().expect("key");
    key.write_new(&dir.join(format!("{name}.key")))
        .expect("key file");
    key.public().to_string()
}

/// Writes `dir/name.toml` and starts `bin` on it, logging to `dir/name.log`.
fn start(dir: &Path, name: &str, bin: &'static str, text: &str) -> Program {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, text).expect("config");
    Program::ptth(
        &binary(bin).expect("binary"),
        &config,
        "info",
        dir.join(format!("{name}.log")),
        bin,
    )
    .expect("start")
}

/// A transfer in flight through a tunnel to the echo service: chunks of random bytes written
/// until told to stop, the echo read meanwhile; then a half-close, and the SHA-256 of what came
/// back compared with what was sent.
struct Flow {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<anyhow::Result<u64>>,
}

impl Flow {
    async fn start(local: SocketAddr, seed: u64) -> Self {
        let s = TcpStream::connect(local).await.expect("connect");
        let (mut r, mut w) = s.into_split();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let task = tokio::spawn(async move {
            let writer = tokio::spawn(async move {
                let mut sent = Sha256::new();
                let mut total = 0u64;
                let mut seed = seed;
                while !stopping.load(Ordering::Relaxed) {
                    let chunk = random_bytes(32 * 1024, seed);
                    seed += 1;
                    w.write_all(&chunk).await?;
                    sent.update(&chunk);
                    total += chunk.len() as u64;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                w.shutdown().await?;
                anyhow::Ok((total, sent.finalize()))
            });
            let mut got = Sha256::new();
            let mut total = 0u64;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = r.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                got.update(&buf[..n]);
                total += n as u64;
            }
            let (sent_total, sent) = writer.await??;
            anyhow::ensure!(total == sent_total, "{total} bytes back of {sent_total}");
            anyhow::ensure!(got.finalize() == sent, "SHA-256 differs");
            Ok(total)
        });
        Self { stop, task }
    }

    /// Stops writing; how many bytes made the round trip, or why the tunnel failed.
    async fn finish(self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .map_err(|_| anyhow::anyhow!("the transfer did not end"))??
    }
}

/// An open tunnel whose bytes are checked exchange by exchange.
async fn exchange(s: &mut TcpStream, msg: &[u8]) -> anyhow::Result<()> {
    s.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back)).await??;
    anyhow::ensure!(back == msg, "the echo differs");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_behind_haproxy_share_the_servers_and_survive_a_kill() {
    within(LIMIT, scale_out(FrontKind::Haproxy)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_behind_nginx_share_the_servers_and_survive_a_kill() {
    within(LIMIT, scale_out(FrontKind::Nginx)).await;
}

/// The whole scenario behind `kind` (see the module documentation).
async fn scale_out(kind: FrontKind) {
    let mut s = Scale::start(kind).await;
    s.all_reachable(Duration::from_secs(30)).await;

    // Spread: each server at exactly one relay, every relay has some, none more than
    // twice the mean.
    let placement = s.placement(None).await;
    let names: BTreeSet<String> = server_names().into_iter().collect();
    assert_eq!(placement.keys().cloned().collect::<BTreeSet<_>>(), names);
    let mut per_relay = [0usize; RELAYS];
    for (name, at) in &placement {
        assert_eq!(at.len(), 1, "{name} is online at relays {at:?}");
        per_relay[at[0]] += 1;
    }
    let mean = SERVERS / RELAYS;
    if kind == FrontKind::Haproxy {
        assert!(
            per_relay.iter().all(|n| (1..=2 * mean).contains(n)),
            "servers per relay: {per_relay:?}"
        );
    } else {
        assert!(
            per_relay.iter().filter(|n| **n > 0).count() >= 2,
            "servers per relay: {per_relay:?}"
        );
    }
    eprintln!("{kind:?}: servers per relay: {per_relay:?}");

    // SHA-checked transfers to every server, through each proxy in turn: each relay
    // carries some.
    for (i, name) in server_names().iter().enumerate() {
        try_transfer_each_way(s.local(i % PROXIES, name), 1 << 20, i as u64)
            .await
            .unwrap_or_else(|e| panic!("transfer to {name}: {e:#}"));
    }

    // Transfers in flight to every server when one relay dies: the one with most servers.
    let victim = (0..RELAYS).max_by_key(|i| per_relay[*i]).expect("relays");
    let on = |name: &str| placement[name][0];
    let mut flows = Vec::new();
    for (i, name) in server_names().iter().enumerate() {
        flows.push((
            name.clone(),
            Flow::start(s.local(i % PROXIES, name), 100 + i as u64).await,
        ));
    }
    // Every flow is under way: its tunnel is open at its relay.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut open = 0;
        for i in 0..RELAYS {
            open += s.cluster.tunnel_servers(i).await.expect("status").len();
        }
        if open >= SERVERS {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{open} tunnels open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.cluster.kill(victim);
    let killed = tokio::time::Instant::now();

    // Every server reachable again, through every proxy, within FAILOVER.
    s.all_reachable(FAILOVER).await;
    let failover = killed.elapsed();
    eprintln!("{kind:?}: every server reachable again {failover:?} after the kill");

    // Tunnels opened at the survivors while the victim is away: kept open across its
    // return.
    let mut held = Vec::new();
    for (i, name) in server_names().iter().enumerate() {
        if on(name) == victim {
            let mut t = TcpStream::connect(s.local(i % PROXIES, name))
                .await
                .expect("connect");
            exchange(&mut t, b"while the relay is away")
                .await
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            held.push((name.clone(), t));
        }
    }
    assert!(!held.is_empty());

    // The flows: those at the victim failed (reset), the others finish exact.
    for (name, flow) in flows {
        let result = flow.finish().await;
        if on(&name) == victim {
            assert!(
                result.is_err(),
                "{name}'s tunnel at the killed relay survived"
            );
        } else {
            let bytes = result.unwrap_or_else(|e| panic!("{name} (relay {}): {e:#}", on(&name)));
            assert!(bytes > 0, "{name}");
        }
    }

    // The victim back on its address: its servers come back to it (channel_max_age), and
    // so do new connections to them.
    s.cluster.restart(victim).await.expect("restart");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for (i, name) in server_names().iter().enumerate() {
        if on(name) != victim {
            continue;
        }
        loop {
            let mut t = TcpStream::connect(s.local(i % PROXIES, name))
                .await
                .expect("connect");
            let carried = exchange(&mut t, b"back?").await.is_ok()
                && s.cluster
                    .tunnel_servers(victim)
                    .await
                    .expect("status")
                    .contains(name);
            drop(t);
            if carried {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "new connections to {name} do not reach the restarted relay"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let placement_after = s.placement(None).await;
    for (name, at) in &placement_after {
        if on(name) == victim {
            assert!(at.contains(&victim), "{name} at {at:?}");
        }
    }

    // The tunnels held at the survivors meanwhile are intact.
    for (name, mut t) in held {
        exchange(&mut t, b"after the relay came back")
            .await
            .unwrap_or_else(|e| panic!("{name}'s held tunnel: {e:#}"));
        t.shutdown().await.expect("shutdown");
        let (rest, failed) = read_until_closed(&mut t).await;
        assert!(rest.is_empty() && !failed, "{name}: clean end");
    }
    // And transfers through each relay, exact, through the other proxies. While a server
    // moves back, another proxy's idle channel may still be at the relay it is leaving, where
    // a connection is refused (`server offline`) and reset: tried again then, as an
    // application would; never inexact.
    for (i, name) in server_names().iter().enumerate() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let local = s.local((i + 1) % PROXIES, name);
        while let Err(e) = try_transfer_each_way(local, 1 << 20, 500 + i as u64).await {
            // A reset, not a clean end of short or different bytes.
            let e = format!("{e:#}");
            assert!(
                tokio::time::Instant::now() < deadline
                    && !e.contains("SHA-256")
                    && !e.contains("came back"),
                "transfer to {name} after the restart: {e}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for (name, server) in &mut s.servers {
        server
            .check_running()
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    }
}
