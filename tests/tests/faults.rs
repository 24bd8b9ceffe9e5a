//! Faults, with the programs as real processes: clocks that differ, programs killed with
//! SIGKILL in the middle of transfers, network paths that go silent. Each test bounds its
//! waits. The binaries are those `cargo test --workspace` builds; to run this file alone
//! after a change, `cargo build --workspace` first, or it tests the binaries built before.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ptth_tests::process::{
    LogsOnFailure, Program, binary, free_port, spawn, start_with_clock, wait_listening,
};
use ptth_tests::*;

const LIMIT: Duration = Duration::from_secs(120);

/// Writes `proxy.toml` for alice: `local` forwards to `db/echo` through `relay_url`.
fn proxy_toml(setup: &Setup, relay_url: &str, local: SocketAddr) -> PathBuf {
    let path = setup.path().join("proxy.toml");
    std::fs::write(&path, alice_toml(relay_url, &[(local, "db")])).expect("proxy.toml");
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
            let mut proxy = start_with_clock("ptth_proxy", &config, offset, log);
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
        let mut proxy = start_with_clock("ptth_proxy", &config, "+90s", log);
        let line = proxy
            .logged(&[
                "check the clocks",
                "our clock is 9",
                "s ahead of the relay's",
            ])
            .await
            .expect("the clock difference explained");
        assert!(line.contains("401"), "{line}");
    })
    .await;
}

/// How long the surviving ends of a tunnel may take to see it end after a program dies.
const ENDS_WITHIN: Duration = Duration::from_secs(2);
/// Tunnels in flight when a program is killed.
const TUNNELS: usize = 4;
/// What each of them sets out to carry each way.
const TRANSFER: u64 = 100 * 1024 * 1024;

/// An echo service that counts its open connections.
struct CountedEcho {
    addr: SocketAddr,
    open: tokio::sync::watch::Receiver<usize>,
}

impl CountedEcho {
    async fn start() -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (count, open) = tokio::sync::watch::channel(0usize);
        let count = std::sync::Arc::new(count);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.send_modify(|n| *n += 1);
                let count = count.clone();
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                        let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
                    }
                    drop(s);
                    count.send_modify(|n| *n -= 1);
                });
            }
        });
        Self { addr, open }
    }

    /// Waits at most `limit` until no connection is open.
    async fn expect_all_closed(&self, limit: Duration, what: &str) {
        let mut open = self.open.clone();
        if tokio::time::timeout(limit, open.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            panic!(
                "{what}: {} service connections still open after {limit:?}",
                *open.borrow()
            );
        }
    }
}

/// A transfer of `total` bytes each way through `local`, in flight: how many bytes came back
/// so far, and the task reading them, which ends when the tunnel does. The writer keeps its
/// side open once it has written everything.
struct InFlight {
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    reader: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

impl InFlight {
    async fn start(local: SocketAddr, seed: u64, total: u64) -> Self {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let s = tokio::net::TcpStream::connect(local)
            .await
            .expect("connect");
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            let mut sent = 0u64;
            let mut seed = seed;
            while sent < total {
                let len = usize::try_from((total - sent).min(256 * 1024)).expect("len");
                let chunk = random_bytes(len, seed);
                seed += 1;
                if w.write_all(&chunk).await.is_err() {
                    return;
                }
                sent += chunk.len() as u64;
            }
            // Open and quiet from now on (dropping `w` would half-close the connection).
            std::future::pending::<()>().await;
            drop(w);
        });
        let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = received.clone();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n @ 1..) = r.read(&mut buf).await {
                count.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
        Self {
            received,
            reader,
            writer,
        }
    }

    /// Waits (at most 30 s) until at least `bytes` came back.
    async fn wait_received(&self, bytes: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.received.load(std::sync::atomic::Ordering::Relaxed) < bytes {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the transfer does not move"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Which program a test kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    Relay,
    Server,
    Proxy,
}

/// The three programs as processes over h2c (one TCP connection per endpoint, so that their
/// open files do not depend on how many channels they keep), in front of a counted echo.
struct Processes {
    setup: Setup,
    relay_addr: SocketAddr,
    local: SocketAddr,
    relay: Option<Program>,
    server: Option<Program>,
    proxy: Option<Program>,
}

impl Processes {
    async fn start(echo: SocketAddr) -> Self {
        let setup = Setup::new().expect("setup");
        let relay_addr = free_port().expect("port");
        std::fs::write(
            setup.path().join("relay.toml"),
            setup.relay_toml(relay_addr),
        )
        .expect("relay.toml");
        let url = format!("h2c://{relay_addr}");
        setup
            .server_config_url(&url, &[("echo", echo.to_string())], "")
            .expect("server.toml");
        let local = free_port().expect("port");
        proxy_toml(&setup, &url, local);
        let mut p = Self {
            setup,
            relay_addr,
            local,
            relay: None,
            server: None,
            proxy: None,
        };
        for victim in [Victim::Relay, Victim::Server, Victim::Proxy] {
            p.start_program(victim).await;
        }
        p.expect_working().await;
        p
    }

    /// Starts (or restarts) one program.
    async fn start_program(&mut self, which: Victim) {
        let (bin, toml, name) = match which {
            Victim::Relay => ("ptth_relay", "relay.toml", "ptth_relay"),
            Victim::Server => ("ptth_server", "server.toml", "ptth_server"),
            Victim::Proxy => ("ptth_proxy", "proxy.toml", "ptth_proxy"),
        };
        let dir = self.setup.path();
        let n = std::fs::read_dir(dir).map_or(0, |d| d.count());
        let mut program = Program::ptth(
            &binary(bin).expect("binary"),
            &dir.join(toml),
            "info",
            dir.join(format!("{name}.{n}.log")),
            name,
        )
        .expect("start");
        match which {
            Victim::Relay => {
                wait_listening(self.relay_addr, &mut program)
                    .await
                    .expect("relay listens");
                self.relay = Some(program);
            }
            Victim::Server => self.server = Some(program),
            Victim::Proxy => {
                wait_listening(self.local, &mut program)
                    .await
                    .expect("proxy listens");
                self.proxy = Some(program);
            }
        }
    }

    fn program(&self, which: Victim) -> &Program {
        match which {
            Victim::Relay => self.relay.as_ref(),
            Victim::Server => self.server.as_ref(),
            Victim::Proxy => self.proxy.as_ref(),
        }
        .expect("running")
    }

    fn kill(&mut self, which: Victim) {
        let slot = match which {
            Victim::Relay => &mut self.relay,
            Victim::Server => &mut self.server,
            Victim::Proxy => &mut self.proxy,
        };
        slot.take().expect("running").kill();
    }

    /// Waits (at most 20 s: the endpoints reconnect with backoff) until a round trip passes.
    async fn expect_working(&self) {
        wait_working(self.local).await;
    }

    /// The open files of the running programs.
    fn open_files(&self) -> Vec<(Victim, usize)> {
        [Victim::Relay, Victim::Server, Victim::Proxy]
            .into_iter()
            .map(|v| (v, self.program(v).open_files().expect("open files")))
            .collect()
    }

    /// The open files of the running programs once they no longer change (the same in three
    /// readings 100 ms apart, within 5 s): sockets of connections just ended close a little
    /// later.
    async fn settled_open_files(&self) -> Vec<(Victim, usize)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut last = self.open_files();
        let mut same = 0;
        while same < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "open files keep changing"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.open_files();
            same = if now == last { same + 1 } else { 0 };
            last = now;
        }
        last
    }

    /// Waits (at most 5 s) until the programs have `baseline` open files again.
    async fn expect_open_files(&self, baseline: &[(Victim, usize)]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.open_files() != baseline {
            assert!(
                tokio::time::Instant::now() < deadline,
                "open files {:?}, at first {baseline:?}",
                self.open_files()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Kills `victim` with SIGKILL while [`TUNNELS`] transfers are in flight: the ends that
/// survive see their tunnels end within [`ENDS_WITHIN`]; restarted, the program is found again
/// by the others, the open files of all three are what they were, and new transfers are exact.
async fn killed_in_flight(victim: Victim) {
    let echo = CountedEcho::start().await;
    let mut p = Processes::start(echo.addr).await;
    let _logs = LogsOnFailure(p.setup.path().to_owned());
    echo.expect_all_closed(Duration::from_secs(5), "after the first round trip")
        .await;
    let baseline = p.settled_open_files().await;
    let mut transfers = Vec::new();
    for i in 0..TUNNELS {
        transfers.push(InFlight::start(p.local, i as u64 * 1000, TRANSFER).await);
    }
    for t in &transfers {
        t.wait_received(1024 * 1024).await;
    }
    p.kill(victim);
    let killed = tokio::time::Instant::now();
    // The client's side: its sockets end with the proxy itself, or within the limit.
    for t in transfers {
        let left = ENDS_WITHIN.saturating_sub(killed.elapsed());
        tokio::time::timeout(left, t.reader)
            .await
            .unwrap_or_else(|_| {
                panic!("a client socket outlived the {victim:?} by {ENDS_WITHIN:?}")
            })
            .expect("reader");
        t.writer.abort();
    }
    // The service's side.
    let left = ENDS_WITHIN.saturating_sub(killed.elapsed());
    echo.expect_all_closed(left, &format!("{victim:?} killed"))
        .await;
    p.start_program(victim).await;
    p.expect_working().await;
    for i in 0..TUNNELS {
        transfer_each_way(p.local, 4 * 1024 * 1024 + i, 77 + i as u64).await;
    }
    echo.expect_all_closed(Duration::from_secs(5), "after the transfers")
        .await;
    p.expect_open_files(&baseline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_killed_in_flight() {
    within(LIMIT, killed_in_flight(Victim::Proxy)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_in_flight() {
    within(LIMIT, killed_in_flight(Victim::Server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_in_flight() {
    within(LIMIT, killed_in_flight(Victim::Relay)).await;
}

/// The relay's `idle_timeout` in the silent-path tests, and everyone's `heartbeat_interval`.
const IDLE_TIMEOUT_S: u64 = 3;
/// How long an endpoint waits for anything on a channel's download before it takes the relay
/// for dead: 3 × `heartbeat_interval`, and at least 45 s (docs/protocol.md).
const DEAD_AFTER: Duration = Duration::from_secs(45);
/// Allowance for the timers' own granularity and a loaded machine.
const SLACK: Duration = Duration::from_secs(5);

/// A relay process with short timers (see [`IDLE_TIMEOUT_S`]).
async fn quick_relay(setup: &mut Setup) -> (Program, SocketAddr) {
    setup.relay_extra =
        format!("heartbeat_interval = \"1s\"\nidle_timeout = \"{IDLE_TIMEOUT_S}s\"\n");
    let addr = free_port().expect("port");
    let mut relay = spawn(
        setup.path(),
        "ptth_relay",
        "relay.toml",
        &setup.relay_toml(addr),
    );
    wait_listening(addr, &mut relay)
        .await
        .expect("relay listens");
    (relay, addr)
}

/// A server config: `name` (its key `name.key`) offering `echo` → `target` through `url`.
fn server_toml(url: &str, name: &str, target: SocketAddr) -> String {
    format!(
        "relay_url = \"{url}\"\nname = \"{name}\"\nkey_file = \"{name}.key\"\n\
         heartbeat_interval = \"1s\"\nmax_backoff = \"500ms\"\n[ports]\necho = \"{target}\"\n"
    )
}

/// A proxy config for alice through `url`: each (local, server) forwards to `server/echo`.
fn alice_toml(url: &str, forwards: &[(SocketAddr, &str)]) -> String {
    let mut text =
        format!("relay_url = \"{url}\"\nkey_file = \"alice.key\"\nheartbeat_interval = \"1s\"\n");
    for (local, server) in forwards {
        text.push_str(&format!(
            "[[forwards]]\nlisten = \"{local}\"\nserver = \"{server}\"\nport = \"echo\"\n"
        ));
    }
    text
}

/// Waits (at most 20 s) until a round trip passes through `local`.
async fn wait_working(local: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !matches!(round_trip(local, b"ping").await, Ok(r) if r == b"ping") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no round trip through {local}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The tunnels through `local` that a silent path cuts: one in the middle of a bulk transfer
/// (its sockets' buffers full), one open and quiet (only heartbeats pass).
async fn cut_tunnels(local: SocketAddr) -> [InFlight; 2] {
    let bulk = InFlight::start(local, 1, TRANSFER).await;
    let quiet = InFlight::start(local, 2, 4096).await;
    bulk.wait_received(1024 * 1024).await;
    quiet.wait_received(4096).await;
    [bulk, quiet]
}

/// SHA-checked transfers through `local`, one after the other, until `stop` is set; how many
/// passed. Each must pass: a tunnel of another path is not disturbed.
fn keep_transferring(
    local: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            transfer_each_way(local, 256 * 1024, n).await;
            n += 1;
        }
        n
    })
}

/// The path between one client proxy and the relay goes silent in the middle of a transfer:
/// the relay ends the tunnel within its `idle_timeout` (the service's socket closes), the
/// proxy within its dead-peer limit (the client's socket closes); another proxy's tunnels
/// carry on, exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_path_gone_silent_ends_its_tunnels_only() {
    within(LIMIT, async {
        let (echo1, echo2) = (CountedEcho::start().await, CountedEcho::start().await);
        let mut setup = Setup::new().expect("setup");
        let _logs = LogsOnFailure(setup.path().to_owned());
        let (_relay, relay_addr) = quick_relay(&mut setup).await;
        let direct = format!("http://{relay_addr}");
        // Two servers, so that each proxy's tunnels reach a service of their own.
        let _db = spawn(
            setup.path(),
            "ptth_server",
            "db.toml",
            &server_toml(&direct, "db", echo1.addr),
        );
        let _web = spawn(
            setup.path(),
            "ptth_server",
            "web.toml",
            &server_toml(&direct, "web", echo2.addr),
        );
        let path = ptth_tests::taps::FreezableForwarder::start(relay_addr)
            .await
            .expect("forwarder");
        let (local1, local2) = (free_port().expect("port"), free_port().expect("port"));
        let silent_url = format!("http://{}", path.addr);
        let _p1 = spawn(
            setup.path(),
            "ptth_proxy",
            "p1.toml",
            &alice_toml(&silent_url, &[(local1, "db")]),
        );
        let _p2 = spawn(
            setup.path(),
            "ptth_proxy",
            "p2.toml",
            &alice_toml(&direct, &[(local2, "web")]),
        );
        wait_working(local1).await;
        wait_working(local2).await;
        let cut = cut_tunnels(local1).await;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let others = keep_transferring(local2, stop.clone());
        path.freeze();
        let frozen = tokio::time::Instant::now();
        echo1
            .expect_all_closed(
                Duration::from_secs(IDLE_TIMEOUT_S) + SLACK,
                "the relay's side of the silent path",
            )
            .await;
        for t in cut {
            let left = (DEAD_AFTER + SLACK).saturating_sub(frozen.elapsed());
            tokio::time::timeout(left, t.reader)
                .await
                .expect("the proxy's side of the silent path ends")
                .expect("reader");
            t.writer.abort();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let passed = others.await.expect("other tunnels");
        assert!(passed > 0, "no transfer on the other path");
        transfer_each_way(local2, 1024 * 1024, 99).await;
    })
    .await;
}

/// The path between one server proxy and the relay goes silent in the middle of a transfer:
/// the relay ends the tunnel within its `idle_timeout` (the client's socket closes), the
/// server within its dead-peer limit (the service's socket closes); another server's tunnels
/// carry on, exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_path_gone_silent_ends_its_tunnels_only() {
    within(LIMIT, async {
        let (echo1, echo2) = (CountedEcho::start().await, CountedEcho::start().await);
        let mut setup = Setup::new().expect("setup");
        let _logs = LogsOnFailure(setup.path().to_owned());
        let (_relay, relay_addr) = quick_relay(&mut setup).await;
        let direct = format!("http://{relay_addr}");
        let path = ptth_tests::taps::FreezableForwarder::start(relay_addr)
            .await
            .expect("forwarder");
        let silent_url = format!("http://{}", path.addr);
        let _db = spawn(
            setup.path(),
            "ptth_server",
            "db.toml",
            &server_toml(&silent_url, "db", echo1.addr),
        );
        let _web = spawn(
            setup.path(),
            "ptth_server",
            "web.toml",
            &server_toml(&direct, "web", echo2.addr),
        );
        let (local1, local2) = (free_port().expect("port"), free_port().expect("port"));
        let _proxy = spawn(
            setup.path(),
            "ptth_proxy",
            "proxy.toml",
            &alice_toml(&direct, &[(local1, "db"), (local2, "web")]),
        );
        wait_working(local1).await;
        wait_working(local2).await;
        let cut = cut_tunnels(local1).await;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let others = keep_transferring(local2, stop.clone());
        path.freeze();
        let frozen = tokio::time::Instant::now();
        for t in cut {
            let left =
                (Duration::from_secs(IDLE_TIMEOUT_S) + SLACK).saturating_sub(frozen.elapsed());
            tokio::time::timeout(left, t.reader)
                .await
                .expect("the relay's side of the silent path ends the client's socket")
                .expect("reader");
            t.writer.abort();
        }
        echo1
            .expect_all_closed(
                (DEAD_AFTER + SLACK).saturating_sub(frozen.elapsed()),
                "the server's side of the silent path",
            )
            .await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let passed = others.await.expect("other tunnels");
        assert!(passed > 0, "no transfer on the other path");
        transfer_each_way(local2, 1024 * 1024, 99).await;
    })
    .await;
}

/// A soak: for `PTTH_SOAK_SECS` (60 s unless set), tunnels open, carry SHA-checked data of
/// random sizes each way and close, 16 at a time, while the server proxy or the client proxy
/// is killed with SIGKILL every few seconds and started again. Every tunnel that no kill
/// overlapped must be exact, hundreds of them; at the end the relay's open files are what
/// they were after a warm-up, its memory is back near it, and it stops at SIGTERM with no
/// task left over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_random_kills() {
    let secs: u64 = std::env::var("PTTH_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    within(Duration::from_secs(secs + 120), async move {
        let echo = CountedEcho::start().await;
        let mut p = Processes::start(echo.addr).await;
        let _logs = LogsOnFailure(p.setup.path().to_owned());
        // Warm-up: the same load without kills, so that the baseline has the allocator's pools
        // and the programs' channel pools in place.
        let warm = run_tunnels(p.local, Duration::from_secs(5), 0).await;
        assert!(
            warm.iter().all(|t| t.result.is_ok()),
            "warm-up: {:?}",
            warm.iter().find(|t| t.result.is_err())
        );
        echo.expect_all_closed(Duration::from_secs(5), "after the warm-up")
            .await;
        let files = p.settled_open_files().await;
        let rss = p.program(Victim::Relay).rss_kib().expect("rss");

        let until = tokio::time::Instant::now() + Duration::from_secs(secs);
        // The load's start, on both clocks: a failure's time can then be found in the logs.
        let (began, began_wall) = (tokio::time::Instant::now(), std::time::SystemTime::now());
        let load = tokio::spawn(run_tunnels(p.local, Duration::from_secs(secs), 1));
        let mut kills = Vec::new();
        let mut pick = 0x2545_f491_4f6c_dd1d_u64;
        loop {
            pick ^= pick << 13;
            pick ^= pick >> 7;
            pick ^= pick << 17;
            tokio::time::sleep(Duration::from_millis(2000 + pick % 4000)).await;
            if tokio::time::Instant::now() + Duration::from_secs(2) > until {
                break;
            }
            let victim = if pick.is_multiple_of(2) {
                Victim::Server
            } else {
                Victim::Proxy
            };
            let killed = tokio::time::Instant::now();
            p.kill(victim);
            tokio::time::sleep(Duration::from_millis(100 + pick % 400)).await;
            p.start_program(victim).await;
            p.expect_working().await;
            kills.push((killed, tokio::time::Instant::now(), victim));
        }
        let tunnels = load.await.expect("load");
        let touched = |t: &Tunnel| {
            kills
                .iter()
                .any(|(k0, k1, _)| t.started <= *k1 && t.ended >= *k0)
        };
        let mut exact = 0;
        for t in &tunnels {
            match &t.result {
                Ok(()) => exact += 1,
                Err(e) => assert!(
                    touched(t),
                    "a tunnel no kill touched failed: {e:#}; it ran from {:?} to {:?} after \
                     the load began ({:?} since the Unix epoch); the kills, from when the \
                     program was killed to when a round trip passed again: {:?}",
                    t.started - began,
                    t.ended - began,
                    began_wall
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default(),
                    kills
                        .iter()
                        .map(|(k0, k1, v)| (*v, *k0 - began, *k1 - began))
                        .collect::<Vec<_>>()
                ),
            }
        }
        eprintln!(
            "soak: {} tunnels in {secs} s, {exact} exact, {} kills",
            tunnels.len(),
            kills.len()
        );
        assert!(exact >= 200, "only {exact} tunnels passed");
        assert!(
            kills.len() >= secs as usize / 8,
            "only {} kills",
            kills.len()
        );
        echo.expect_all_closed(Duration::from_secs(5), "after the soak")
            .await;
        p.expect_open_files(&files).await;
        let after = p.program(Victim::Relay).rss_kib().expect("rss");
        assert!(
            after <= rss + rss / 2 + 8 * 1024,
            "the relay's memory grew: {rss} KiB after the warm-up, {after} KiB after the soak"
        );
        let relay = p.relay.take().expect("relay");
        let status = relay
            .terminate(Duration::from_secs(10))
            .expect("the relay stops");
        assert!(status.success(), "the relay exited with {status}");
        let log = std::fs::read_dir(p.setup.path())
            .expect("dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("ptth_relay"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect::<String>();
        assert!(!log.contains("tasks still running"), "{log}");
    })
    .await;
}

/// One tunnel of a soak: when it ran and how it ended.
#[derive(Debug)]
struct Tunnel {
    started: tokio::time::Instant,
    ended: tokio::time::Instant,
    result: anyhow::Result<()>,
}

/// 16 workers opening tunnels through `local` one after the other for `length`, each carrying
/// a random amount (up to 2 MiB) each way, SHA-checked.
async fn run_tunnels(local: SocketAddr, length: Duration, seed: u64) -> Vec<Tunnel> {
    let until = tokio::time::Instant::now() + length;
    let workers: Vec<_> = (0..16u64)
        .map(|w| {
            tokio::spawn(async move {
                let mut done = Vec::new();
                let mut x = (seed << 32) ^ (w + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                while tokio::time::Instant::now() < until {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let len = usize::try_from(x % (2 * 1024 * 1024)).expect("len");
                    let started = tokio::time::Instant::now();
                    let result = try_transfer_each_way(local, len, x).await;
                    let failed = result.is_err();
                    done.push(Tunnel {
                        started,
                        ended: tokio::time::Instant::now(),
                        result,
                    });
                    if failed {
                        // A program is down: do not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                done
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.expect("worker"));
    }
    all
}
