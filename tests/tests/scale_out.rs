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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ptth_tests::cluster::{Fleet, FleetPlan};
use ptth_tests::fronts::FrontKind;
use ptth_tests::process::LogsOnFailure;
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
    fleet: Fleet,
    _logs: LogsOnFailure,
    _dir: tempfile::TempDir,
}

impl Scale {
    async fn start(kind: FrontKind) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = LogsOnFailure(dir.path().to_owned());
        let echo = echo_service().await.expect("echo");
        let names = server_names();
        let endpoint_extra = format!("channel_max_age = \"{MAX_AGE}\"\n");
        let plan = FleetPlan {
            kind,
            relays: RELAYS,
            servers: &names,
            proxies: PROXIES,
            ports: &[("echo", echo)],
            // A connection queued at a relay just as its server leaves fails after this
            // (docs/scale-out.md), within the transfers' deadline below.
            relay_extra: "accept_timeout = \"3s\"\n",
            endpoint_extra: &endpoint_extra,
            timeout: Duration::from_secs(75),
            tunnels: 200,
        };
        let fleet = Fleet::start(plan, dir.path()).await.expect("fleet");
        Self {
            fleet,
            _logs: logs,
            _dir: dir,
        }
    }

    /// The local address of `server`'s echo on proxy `p`.
    fn local(&self, p: usize, server: &str) -> SocketAddr {
        self.fleet.proxies[p].local(server, "echo")
    }

    /// Which relay each server is online at (each at exactly one), read from the relays'
    /// `/api/status`; relays in `skip` are not asked.
    async fn placement(&self, skip: Option<usize>) -> BTreeMap<String, Vec<usize>> {
        let mut at: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for i in (0..RELAYS).filter(|i| Some(*i) != skip) {
            for name in self.fleet.cluster.servers_online(i).await.expect("status") {
                at.entry(name).or_default().push(i);
            }
        }
        at
    }

    /// Waits (at most `limit`) until a round trip through every proxy reaches every server.
    async fn all_reachable(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        for (p, proxy) in self.fleet.proxies.iter().enumerate() {
            for ((name, _), local) in &proxy.locals {
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
            open += s
                .fleet
                .cluster
                .tunnel_servers(i)
                .await
                .expect("status")
                .len();
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
    s.fleet.cluster.kill(victim);
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
    s.fleet.cluster.restart(victim).await.expect("restart");
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
                && s.fleet
                    .cluster
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
    for (name, server) in &mut s.fleet.servers {
        server
            .check_running()
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    }
}

/// A local connection made while its server is offline (moving to another relay behind a
/// balancer, say) waits, unread, and is carried with every byte once the server comes within
/// the proxy's wait (docs/scale-out.md).
#[tokio::test]
async fn a_connection_waits_for_a_server_that_comes_meanwhile() {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let mut opts = WorldOptions::echo(echo);
        opts.ports.clear();
        let w = World::start(opts).await.expect("world");
        // The proxy's channels are refused: the forward's channels fail.
        let logs = w.proxy.logs();
        let offline = |t: &str| t.contains("server offline");
        assert!(
            logs.wait_for(Duration::from_secs(20), offline).await,
            "{}",
            logs.text()
        );
        let mut s = TcpStream::connect(w.local()).await.expect("connect");
        s.write_all(b"sent before the server came")
            .await
            .expect("write");
        let waits = |t: &str| t.contains("the connection waits");
        assert!(
            logs.wait_for(Duration::from_secs(5), waits).await,
            "{}",
            logs.text()
        );
        let config = w
            .setup
            .server_config(w.relay.addr, &[("echo", echo.to_string())], "")
            .expect("server config");
        let _server = start_server(config, w.setup.server_key.clone());
        let mut back = vec![0u8; b"sent before the server came".len()];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
            .await
            .expect("carried within the wait")
            .expect("echo");
        assert_eq!(back, b"sent before the server came");
        s.shutdown().await.expect("shutdown");
        let (rest, failed) = read_until_closed(&mut s).await;
        assert!(rest.is_empty() && !failed, "a clean end");
    })
    .await;
}
