//! What operators see, with the three programs as real processes, each with its admin listener
//! on a port of its own choosing (read from its log): the metrics move by exactly what a known
//! transfer, a failed connection and a refused request should move them by, and `promtool`
//! accepts them; the relay's status page, in headless Chromium, shows a tunnel while it is open
//! and its end, without being reloaded; the audit log records tunnels and refusals. The
//! binaries are those `cargo test --workspace` builds; to run this file alone after a change,
//! `cargo build --workspace` first, or it tests the binaries built before.
//!
//! `promtool` (Debian's `prometheus`), `chromium` and `chromedriver` come from `.ci/setup`; a
//! test that needs one fails, saying so, when it is missing.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use ptth_common::keys::PrivateKey;
use ptth_common::protocol;
use ptth_tests::process::{LogsOnFailure, Program, free_port, spawn};
use ptth_tests::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(120);
/// How long a program may take to show what a test waits for (a log line, a count, a row).
const SHOWN_WITHIN: Duration = Duration::from_secs(20);
/// The admin listener line of every configuration here: a port of the program's choosing.
const ADMIN: &str = "admin_listen = \"127.0.0.1:0\"\n";
const MIB: usize = 1024 * 1024;

/// The relay, server `db` and alice's proxy as processes, with their admin listeners.
struct Trio {
    // Dropped first, while the logs it prints are still there.
    _logs: LogsOnFailure,
    setup: Setup,
    relay_addr: SocketAddr,
    /// The relay's, the server's and the proxy's admin listeners.
    relay_admin: SocketAddr,
    server_admin: SocketAddr,
    proxy_admin: SocketAddr,
    /// The proxy's forwards, one per port of the server, in order.
    forwards: Vec<SocketAddr>,
    relay: Program,
    _server: Program,
    _proxy: Program,
    http: reqwest::Client,
}

impl Trio {
    /// Starts the three programs: `db` offers each of `ports` (name, target), alice forwards a
    /// local port to each; `relay_extra` goes into relay.toml. Returns once the relay shows
    /// every port ready and alice's channels open.
    async fn start(ports: &[(&str, SocketAddr)], relay_extra: &str) -> Self {
        let mut setup = Setup::new().expect("setup");
        setup.relay_extra = format!("{ADMIN}{relay_extra}");
        let logs = LogsOnFailure(setup.path().to_owned());
        let dir = setup.path().to_owned();
        let relay_addr = free_port().expect("port");
        let mut relay = spawn(
            &dir,
            "ptth_relay",
            "relay.toml",
            &setup.relay_toml(relay_addr),
        );
        // Each program binds its listeners before its admin listener: once that is ready, so
        // are they. (Probing a forward would open a tunnel, and count it.)
        let relay_admin = admin_address(&mut relay).await;
        let url = format!("http://{relay_addr}");
        let mut server_toml = format!(
            "relay_url = \"{url}\"\nname = \"db\"\nkey_file = \"db.key\"\n\
             max_backoff = \"500ms\"\n{ADMIN}[ports]\n"
        );
        let mut proxy_toml = format!("relay_url = \"{url}\"\nkey_file = \"alice.key\"\n{ADMIN}");
        let mut forwards = Vec::new();
        for (name, target) in ports {
            server_toml.push_str(&format!("{name} = \"{target}\"\n"));
            let local = free_port().expect("port");
            proxy_toml.push_str(&format!(
                "[[forwards]]\nlisten = \"{local}\"\nserver = \"db\"\nport = \"{name}\"\n"
            ));
            forwards.push(local);
        }
        let mut server = spawn(&dir, "ptth_server", "server.toml", &server_toml);
        let server_admin = admin_address(&mut server).await;
        let mut proxy = spawn(&dir, "ptth_proxy", "proxy.toml", &proxy_toml);
        let proxy_admin = admin_address(&mut proxy).await;
        let trio = Self {
            _logs: logs,
            setup,
            relay_addr,
            relay_admin,
            server_admin,
            proxy_admin,
            forwards,
            relay,
            _server: server,
            _proxy: proxy,
            http: http_client_builder(None)
                .expect("client builder")
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client"),
        };
        trio.wait_ready(ports.len()).await;
        trio
    }

    /// Waits until the relay's status shows every one of `ports` of `db` with a ready channel,
    /// and alice with a channel per port.
    async fn wait_ready(&self, ports: usize) {
        let deadline = tokio::time::Instant::now() + SHOWN_WITHIN;
        loop {
            let status = self.status().await;
            let ready = status["servers"].as_array().is_some_and(|servers| {
                servers.iter().any(|s| {
                    s["name"] == "db"
                        && s["online"] == true
                        && s["ports"].as_array().is_some_and(|p| {
                            p.len() == ports && p.iter().all(|p| p["ready"].as_u64() >= Some(1))
                        })
                })
            });
            let alice = status["clients"].as_array().is_some_and(|clients| {
                clients
                    .iter()
                    .any(|c| c["name"] == "alice" && c["channels"].as_u64() >= Some(ports as u64))
            });
            if ready && alice {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not ready within {SHOWN_WITHIN:?}: {status:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GET `path` from the admin listener `admin`: the status and the body.
    async fn get(&self, admin: SocketAddr, path: &str) -> (u16, String) {
        let answer = self
            .http
            .get(format!("http://{admin}{path}"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {admin}{path}: {e}"));
        let status = answer.status().as_u16();
        (status, answer.text().await.expect("body"))
    }

    /// The relay's `/api/status`.
    async fn status(&self) -> Value {
        let (code, body) = self.get(self.relay_admin, "/api/status").await;
        assert_eq!(code, 200, "/api/status: {body}");
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/api/status is not JSON ({e}): {body}"))
    }

    /// The metrics of the program whose admin listener is `admin`.
    async fn scrape(&self, admin: SocketAddr) -> Scrape {
        let (code, body) = self.get(admin, "/metrics").await;
        assert_eq!(code, 200, "/metrics of {admin}: {body}");
        Scrape::parse(&body)
    }

    /// The metrics of the relay, the server and the proxy.
    async fn scrape_all(&self) -> [Scrape; 3] {
        [
            self.scrape(self.relay_admin).await,
            self.scrape(self.server_admin).await,
            self.scrape(self.proxy_admin).await,
        ]
    }

    /// Waits until the metric `name` with `labels` (summed) at `admin` reaches `want` (the
    /// caller checks afterwards that it did not go beyond).
    async fn wait_metric(&self, admin: SocketAddr, name: &str, labels: &[(&str, &str)], want: f64) {
        let deadline = tokio::time::Instant::now() + SHOWN_WITHIN;
        loop {
            let got = self.scrape(admin).await.sum(name, labels);
            if got >= want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}{labels:?} is {got}, not {want}, after {SHOWN_WITHIN:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until no tunnel is open at any of the three programs.
    async fn wait_no_tunnels(&self) {
        for (admin, name) in [
            (self.relay_admin, "ptth_relay_tunnels_open"),
            (self.server_admin, "ptth_server_tunnels_open"),
            (self.proxy_admin, "ptth_proxy_tunnels_open"),
        ] {
            let deadline = tokio::time::Instant::now() + SHOWN_WITHIN;
            loop {
                let open = self.scrape(admin).await.sum(name, &[]);
                if open == 0.0 {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{name} is {open} {SHOWN_WITHIN:?} after the tunnels closed"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Sends one request to the relay signed with a key it does not know: refused with 401.
    async fn refused_request(&self) {
        let stranger = SignedClient::new(self.relay_addr, &PrivateKey::generate().expect("key"));
        let answer = stranger
            .post(&protocol::connect_path("db", "echo"))
            .send()
            .await
            .expect("send");
        assert_eq!(answer.status().as_u16(), 401, "an unknown key");
    }

    /// Every secret the programs know, as it could appear in text: the public keys (base64),
    /// the private keys (the lines of their PEM files).
    fn key_material(&self) -> Vec<String> {
        let s = &self.setup;
        let mut secrets: Vec<String> = [&s.server_key, &s.alice_key, &s.bob_key, &s.web_key]
            .iter()
            .map(|k| k.public().to_string())
            .collect();
        for file in ["db.key", "alice.key", "bob.key", "web.key"] {
            let pem = std::fs::read_to_string(s.path().join(file)).expect("key file");
            secrets.extend(
                pem.lines()
                    .filter(|l| !l.starts_with("-----") && l.len() >= 16)
                    .map(str::to_owned),
            );
        }
        assert!(secrets.len() >= 8, "{secrets:?}");
        secrets
    }
}

/// Waits until `program` logs `admin listener ready address=…`: that address.
async fn admin_address(program: &mut Program) -> SocketAddr {
    let deadline = tokio::time::Instant::now() + SHOWN_WITHIN;
    loop {
        let log = program.log();
        let found = log
            .lines()
            .filter(|l| l.contains("admin listener ready"))
            .find_map(|l| {
                l.split_once("address=")?
                    .1
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            });
        if let Some(address) = found {
            return address;
        }
        program.check_running().expect("still running");
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: no admin listener line:\n{log}",
            program.name
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Prometheus text exposition, parsed.
#[derive(Debug)]
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Scrape {
    fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| Sample::parse(l).unwrap_or_else(|| panic!("not a sample: {l:?}")))
            .collect();
        Self {
            text: text.to_owned(),
            samples,
        }
    }

    /// The sum of the samples called `name` that have every one of `labels` (0 if none: a
    /// labelled counter appears once it has counted).
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .map(|s| s.value)
            .sum()
    }
}

impl Sample {
    /// `name{k="v",…} value`, label values with `\\`, `\"` and `\n` escapes.
    fn parse(line: &str) -> Option<Self> {
        let name_end = line.find(['{', ' '])?;
        let name = line[..name_end].to_owned();
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices();
            let mut key = String::new();
            loop {
                let (i, c) = chars.next()?;
                match c {
                    '}' => {
                        rest = &inner[i + 1..];
                        break;
                    }
                    ',' => {}
                    '=' => {
                        if chars.next()?.1 != '"' {
                            return None;
                        }
                        let mut value = String::new();
                        loop {
                            match chars.next()?.1 {
                                '"' => break,
                                '\\' => match chars.next()?.1 {
                                    'n' => value.push('\n'),
                                    c => value.push(c),
                                },
                                c => value.push(c),
                            }
                        }
                        labels.push((std::mem::take(&mut key), value));
                    }
                    c => key.push(c),
                }
            }
        }
        let value = rest.split_whitespace().next()?.parse().ok()?;
        Some(Self {
            name,
            labels,
            value,
        })
    }
}

/// The difference of `name` with `labels` between two scrapes.
fn moved(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.sum(name, labels) - before.sum(name, labels)
}

/// Fails the test unless `name` with `labels` moved by exactly `want` between two scrapes.
fn expect_moved(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)], want: f64) {
    assert_eq!(
        moved(before, after, name, labels),
        want,
        "{name}{labels:?}\n--- before:\n{}\n--- after:\n{}",
        before.text,
        after.text
    );
}

/// `program`, which `.ci/setup` installs from Debian package `package`; fails the test when
/// it is missing.
fn required(program: &str, package: &str) -> PathBuf {
    let path = Path::new("/usr/bin").join(program);
    assert!(
        path.is_file(),
        "{} is missing: run .ci/setup (it installs Debian's {package})",
        path.display()
    );
    path
}

/// Runs `promtool check metrics` on `text`, failing the test unless it passes and says
/// nothing (it prints each lint problem, such as a counter without `_total`).
fn promtool_check(text: &str, program: &str) {
    use std::io::Write;
    let promtool = required("promtool", "prometheus");
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(text.as_bytes()).expect("feed promtool");
    drop(stdin);
    let out = child.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics on {program}'s metrics: {}\n{said}\n--- the metrics:\n{text}",
        out.status
    );
}

/// A known transfer, a failed connection and a refused request move the three programs'
/// metrics by exactly what they should, and `promtool` finds nothing to say about them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_traffic_and_promtool_accepts_them() {
    // Before anything starts: a missing promtool fails at once.
    required("promtool", "prometheus");
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let gone = closed_port().expect("closed port");
        let trio = Trio::start(&[("echo", echo), ("gone", gone)], "").await;
        let [relay0, server0, proxy0] = trio.scrape_all().await;

        const TUNNELS: usize = 2;
        let transfers =
            (0..TUNNELS).map(|i| transfer_each_way(trio.forwards[0], MIB, i as u64 + 1));
        futures_join_all(transfers).await;
        trio.wait_no_tunnels().await;
        let [relay1, server1, proxy1] = trio.scrape_all().await;

        // Every program counts both tunnels and their bytes each way, under its labels (the
        // relay's name the client too).
        let (tunnels, bytes) = (TUNNELS as f64, (TUNNELS * MIB) as f64);
        for (program, before, after) in [
            ("relay", &relay0, &relay1),
            ("server", &server0, &server1),
            ("proxy", &proxy0, &proxy1),
        ] {
            let mut labels = vec![("server", "db"), ("port", "echo")];
            if program == "relay" {
                labels.push(("client", "alice"));
            }
            let name = format!("ptth_{program}_tunnels_total");
            expect_moved(before, after, &name, &labels, tunnels);
            let name = format!("ptth_{program}_tunnel_bytes_total");
            for direction in ["upstream", "downstream"] {
                let labels = [&labels[..], &[("direction", direction)]].concat();
                expect_moved(before, after, &name, &labels, bytes);
            }
        }
        for (scrape, name) in [
            (&relay1, "ptth_relay_tunnels_open"),
            (&server1, "ptth_server_tunnels_open"),
            (&proxy1, "ptth_proxy_tunnels_open"),
        ] {
            assert_eq!(scrape.sum(name, &[]), 0.0, "{name}\n{}", scrape.text);
        }
        let version = env!("CARGO_PKG_VERSION");
        for (scrape, program) in [(&relay1, "relay"), (&server1, "server"), (&proxy1, "proxy")] {
            let line = format!("ptth_{program}_build_info{{version=\"{version}\"}} 1");
            assert!(
                scrape.text.lines().any(|l| l == line),
                "no {line:?}:\n{}",
                scrape.text
            );
        }

        // A connection to a port whose target refuses it: the server says so in-band (502).
        // (The proxy may reset the connection before `connect` has returned.)
        let got = match TcpStream::connect(trio.forwards[1]).await {
            Ok(mut s) => read_until_closed(&mut s).await.0,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Vec::new(),
            Err(e) => panic!("connect: {e}"),
        };
        assert!(got.is_empty(), "{got:?}");
        let failure = [
            ("status", "502"),
            ("reason", "the server could not reach its target"),
        ];
        let proxy_failure = [("server", "db"), ("port", "gone"), ("status", "502")];
        trio.wait_metric(
            trio.relay_admin,
            "ptth_relay_connect_failures_total",
            &failure,
            relay1.sum("ptth_relay_connect_failures_total", &failure) + 1.0,
        )
        .await;
        trio.wait_metric(
            trio.proxy_admin,
            "ptth_proxy_connect_failures_total",
            &proxy_failure,
            proxy1.sum("ptth_proxy_connect_failures_total", &proxy_failure) + 1.0,
        )
        .await;

        // A request signed by a key the relay does not know.
        trio.refused_request().await;
        let rejection = [("status", "401"), ("reason", "invalid signature")];
        trio.wait_metric(
            trio.relay_admin,
            "ptth_relay_rejections_total",
            &rejection,
            relay1.sum("ptth_relay_rejections_total", &rejection) + 1.0,
        )
        .await;

        // Counted once each, and nothing else counted: the refused request was a `connect`,
        // but a refused signature is an authentication failure, not a connection that could
        // not be made.
        let [relay2, server2, proxy2] = trio.scrape_all().await;
        let connect_failures = "ptth_relay_connect_failures_total";
        expect_moved(&relay1, &relay2, connect_failures, &failure, 1.0);
        expect_moved(&relay1, &relay2, connect_failures, &[], 1.0);
        let auth_failures = "ptth_relay_auth_failures_total";
        expect_moved(
            &relay1,
            &relay2,
            auth_failures,
            &[("cause", "unknown_key")],
            1.0,
        );
        expect_moved(&relay1, &relay2, auth_failures, &[], 1.0);
        let connect_failures = "ptth_proxy_connect_failures_total";
        expect_moved(&proxy1, &proxy2, connect_failures, &proxy_failure, 1.0);
        expect_moved(&proxy1, &proxy2, connect_failures, &[], 1.0);
        // The channels the failure ended are not refusals: only the unknown key is one.
        let rejections = "ptth_relay_rejections_total";
        expect_moved(&relay1, &relay2, rejections, &rejection, 1.0);
        expect_moved(&relay1, &relay2, rejections, &[], 1.0);

        for (scrape, program) in [
            (&relay2, "ptth_relay"),
            (&server2, "ptth_server"),
            (&proxy2, "ptth_proxy"),
        ] {
            promtool_check(&scrape.text, program);
        }
    })
    .await;
}

/// Awaits every future of `futures`, concurrently.
async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) {
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    for t in tasks {
        t.await.expect("task");
    }
}

/// The admin listener answers GET and HEAD on its pages only: other methods 405, other paths
/// 404; the endpoints have `/metrics` only; `/api/status` is JSON with the four lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_answers_get_on_its_pages_only() {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let trio = Trio::start(&[("echo", echo)], "").await;
        let relay = trio.relay_admin;
        let post = trio
            .http
            .post(format!("http://{relay}/metrics"))
            .body("x")
            .send()
            .await
            .expect("POST");
        assert_eq!(post.status().as_u16(), 405);
        assert_eq!(post.text().await.expect("body"), "GET or HEAD only\n");
        let head = trio
            .http
            .head(format!("http://{relay}/api/status"))
            .send()
            .await
            .expect("HEAD");
        assert_eq!(head.status().as_u16(), 200);
        // A name that a web page could have rebound to the listener (DNS rebinding).
        let rebound = trio
            .http
            .get(format!("http://{relay}/api/status"))
            .header("host", format!("attacker.example:{}", relay.port()))
            .send()
            .await
            .expect("GET with a name");
        assert_eq!(rebound.status().as_u16(), 421);
        assert_eq!(
            rebound.text().await.expect("body"),
            "the admin listener answers requests to an IP address or localhost only\n"
        );
        for (admin, path) in [
            (relay, "/nothing"),
            (relay, "/api/status/"),
            (relay, "/metrics/x"),
            (trio.server_admin, "/"),
            (trio.server_admin, "/api/status"),
            (trio.proxy_admin, "/"),
            (trio.proxy_admin, "/api/status"),
        ] {
            assert_eq!(
                trio.get(admin, path).await,
                (404, "not found\n".to_owned()),
                "{admin}{path}"
            );
        }
        let (code, page) = trio.get(relay, "/").await;
        assert_eq!(code, 200);
        assert!(page.contains("<table id=\"tunnels\">"), "{page}");
        let status = trio.status().await;
        for key in ["servers", "clients", "tunnels", "rejections"] {
            assert!(status[key].is_array(), "{key}: {status:#}");
        }
        assert_eq!(status["tunnels_open"], 0, "{status:#}");
        assert_eq!(status["tunnels"].as_array().map(Vec::len), Some(0));
        let text = status.to_string();
        for secret in trio.key_material() {
            assert!(!text.contains(&secret), "/api/status shows {secret}");
        }
    })
    .await;
}

/// A TCP service that reads everything it is sent, hands it to the test, then answers
/// `answer` and closes.
async fn answering_service(
    answer: Vec<u8>,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (tx, answer) = (tx.clone(), answer.clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                if s.read_to_end(&mut got).await.is_ok() {
                    let _ = tx.send(got);
                    if s.write_all(&answer).await.is_ok() {
                        let _ = s.shutdown().await;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// Reads the audit log `path` until it has a line of every one of `events` (at most
/// [`SHOWN_WITHIN`]): its lines, parsed.
async fn audit_lines(
    path: &Path,
    events: &[&str],
) -> (String, Vec<serde_json::Map<String, Value>>) {
    let deadline = tokio::time::Instant::now() + SHOWN_WITHIN;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        // Only whole lines: the writer may be in the middle of one.
        let whole = text.rfind('\n').map_or("", |end| &text[..=end]);
        let lines: Vec<serde_json::Map<String, Value>> = whole
            .lines()
            .map(|l| match serde_json::from_str(l) {
                Ok(Value::Object(m)) => m,
                other => panic!("not a JSON object ({other:?}): {l}"),
            })
            .collect();
        let has = |e: &str| {
            lines
                .iter()
                .any(|l| l.get("event").and_then(Value::as_str) == Some(e))
        };
        if events.iter().all(|e| has(e)) {
            return (whole.to_owned(), lines);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the audit log lacks one of {events:?} after {SHOWN_WITHIN:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The audit log has a line for a tunnel's opening, one for its end with the exact bytes of
/// each direction, and one for a refused request; each starts with `time`, `program` and
/// `event`, and none shows a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_records_tunnels_and_refusals() {
    within(LIMIT, async {
        const UP: usize = 100_003;
        const DOWN: usize = 250_001;
        let answer = random_bytes(DOWN, 7);
        let (service, mut received) = answering_service(answer.clone()).await;
        let trio = Trio::start(&[("answer", service)], "audit_log = \"audit.jsonl\"\n").await;

        let sent = random_bytes(UP, 3);
        let mut s = TcpStream::connect(trio.forwards[0]).await.expect("connect");
        s.write_all(&sent).await.expect("write");
        s.shutdown().await.expect("half-close");
        let (got, failed) = read_until_closed(&mut s).await;
        assert!(!failed, "the tunnel ended in an error");
        assert!(
            got == answer,
            "{} bytes came back, not the {DOWN} answered",
            got.len()
        );
        assert!(
            received.recv().await.expect("the service's bytes") == sent,
            "the service got other bytes"
        );
        drop(s);
        trio.refused_request().await;

        let path = trio.setup.path().join("audit.jsonl");
        let (text, lines) = audit_lines(
            &path,
            &["tunnel_opened", "tunnel_closed", "request_refused"],
        )
        .await;
        for (raw, line) in text.lines().zip(&lines) {
            let first: Vec<&str> = line.keys().take(3).map(String::as_str).collect();
            assert_eq!(first, ["time", "program", "event"], "{raw}");
            assert!(raw.starts_with("{\"time\":\""), "{raw}");
            assert_eq!(line["program"], "ptth_relay", "{raw}");
            let time = line["time"].as_str().expect("time");
            assert!(humantime_like(time), "time {time:?} in {raw}");
        }
        let of = |event: &str| -> Vec<&serde_json::Map<String, Value>> {
            lines.iter().filter(|l| l["event"] == event).collect()
        };
        let (opened, closed, refused) = (
            of("tunnel_opened"),
            of("tunnel_closed"),
            of("request_refused"),
        );
        assert_eq!(
            (opened.len(), closed.len(), refused.len()),
            (1, 1, 1),
            "{text}"
        );
        for line in [opened[0], closed[0]] {
            assert_eq!(line["server"], "db", "{text}");
            assert_eq!(line["port"], "answer", "{text}");
            assert_eq!(line["client"], "alice", "{text}");
            assert_eq!(line["client_ip"], "127.0.0.1", "{text}");
        }
        let closed = closed[0];
        assert_eq!(closed["bytes_upstream"], UP, "{text}");
        assert_eq!(closed["bytes_downstream"], DOWN, "{text}");
        assert_eq!(closed["outcome"], "closed", "{text}");
        assert!(closed["duration_ms"].is_u64(), "{text}");
        let refused = refused[0];
        assert_eq!(refused["status"], 401, "{text}");
        assert_eq!(refused["reason"], "invalid signature", "{text}");
        assert_eq!(refused["client_ip"], "127.0.0.1", "{text}");
        for secret in trio.key_material() {
            assert!(
                !text.contains(&secret),
                "the audit log shows key material {secret}:\n{text}"
            );
        }
        // The relay is still running: the lines were written without stopping it.
        let mut relay = trio.relay;
        relay.check_running().expect("relay running");
        drop(relay);
    })
    .await;
}

/// Whether `time` looks like the audit log's RFC 3339 UTC time with milliseconds.
fn humantime_like(time: &str) -> bool {
    time.len() == "2024-01-02T03:04:05.678Z".len()
        && time.ends_with('Z')
        && time.as_bytes()[10] == b'T'
        && time.as_bytes()[19] == b'.'
}

// ---- The status page in headless Chromium, driven through ChromeDriver (WebDriver). ----

/// ChromeDriver and the Chromium it starts, with one WebDriver session: dropping it deletes
/// the session and kills ChromeDriver's process group and any Chromium process of this
/// session's profile folder, whether the test passed or not.
struct Browser {
    driver: std::process::Child,
    url: String,
    session: Option<String>,
    http: reqwest::Client,
    /// Chromium's profile, unique to this browser: also how its processes are found.
    profile: tempfile::TempDir,
}

impl Browser {
    /// Starts ChromeDriver (logging to `log_dir/chromedriver.log`) and a headless Chromium
    /// session.
    async fn start(log_dir: &Path) -> Self {
        use std::os::unix::process::CommandExt;
        let chromium = required("chromium", "chromium");
        let chromedriver = required("chromedriver", "chromium-driver");
        let port = free_port().expect("port").port();
        let log = std::fs::File::create(log_dir.join("chromedriver.log")).expect("log");
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            // A group of its own, so that it and whatever it starts can be killed together.
            .process_group(0)
            .spawn()
            .expect("start chromedriver");
        let mut browser = Self {
            driver,
            url: format!("http://127.0.0.1:{port}"),
            session: None,
            http: http_client_builder(None)
                .expect("client builder")
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
            profile: tempfile::tempdir().expect("profile folder"),
        };
        browser.wait_driver_ready().await;
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1100,900",
        ]
        .map(str::to_owned)
        .into_iter()
        .chain([format!(
            "--user-data-dir={}",
            browser.profile.path().display()
        )])
        .collect::<Vec<_>>();
        let capabilities = serde_json::json!({
            "capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": chromium, "args": args},
            }}
        });
        let created = browser
            .call(reqwest::Method::POST, "/session", Some(capabilities))
            .await;
        let id = created["sessionId"].as_str().expect("sessionId").to_owned();
        browser.session = Some(id);
        browser
    }

    /// Waits until ChromeDriver answers `/status` with `ready`.
    async fn wait_driver_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + SHOWN_WITHIN;
        loop {
            let ready = match self.http.get(format!("{}/status", self.url)).send().await {
                Ok(r) => r.bytes().await.is_ok_and(|b| {
                    serde_json::from_slice::<Value>(&b).is_ok_and(|v| v["value"]["ready"] == true)
                }),
                Err(_) => false,
            };
            if ready {
                return;
            }
            if let Ok(Some(status)) = self.driver.try_wait() {
                panic!("chromedriver exited with {status}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver not ready within {SHOWN_WITHIN:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A WebDriver command: its `value`, failing the test on an error.
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.url));
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let answer = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let status = answer.status();
        let body = answer.bytes().await.expect("WebDriver's answer");
        let value: Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "WebDriver {method} {path}: not JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        });
        assert!(
            status.is_success(),
            "WebDriver {method} {path}: {status} {value:#}"
        );
        value["value"].clone()
    }

    /// A session command: `/session/{id}{path}`.
    async fn session_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Value {
        let id = self.session.as_deref().expect("session");
        self.call(method, &format!("/session/{id}{path}"), body)
            .await
    }

    /// Opens `url`.
    async fn open(&self, url: &str) {
        self.session_call(
            reqwest::Method::POST,
            "/url",
            Some(serde_json::json!({ "url": url })),
        )
        .await;
    }

    /// Runs `script` (a function body) in the page: what it returns.
    async fn run(&self, script: &str) -> Value {
        let body = serde_json::json!({"script": script, "args": []});
        self.session_call(reqwest::Method::POST, "/execute/sync", Some(body))
            .await
    }

    /// The page as a PNG.
    async fn screenshot(&self) -> Vec<u8> {
        let png = self
            .session_call(reqwest::Method::GET, "/screenshot", None)
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(png.as_str().expect("base64 text"))
            .expect("base64")
    }

    /// Waits until `script` returns something `ok` accepts (at most [`SHOWN_WITHIN`]): that.
    async fn wait_for(&self, what: &str, script: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + SHOWN_WITHIN;
        loop {
            let value = self.run(script).await;
            if ok(&value) {
                return value;
            }
            if tokio::time::Instant::now() >= deadline {
                let text = self.run("return document.body.innerText").await;
                panic!(
                    "the page does not show {what} after {SHOWN_WITHIN:?}: {value}\n--- page:\n{}",
                    text.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// PIDs of the processes running with this browser's profile folder.
    fn chromium_pids(&self) -> Vec<u32> {
        let needle = format!("--user-data-dir={}", self.profile.path().display());
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == needle.as_bytes()))
            })
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(id) = self.session.take() {
            // Dropped inside the test's runtime: the DELETE runs on a thread of its own, with
            // a client of its own (the test's pooled connections belong to the test's runtime).
            let url = format!("{}/session/{id}", self.url);
            let deleted = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                let http = http_client_builder(None).and_then(|b| Ok(b.build()?));
                if let (Ok(rt), Ok(http)) = (rt, http) {
                    rt.block_on(async {
                        let delete = http.delete(url).send();
                        let _ = tokio::time::timeout(Duration::from_secs(10), delete).await;
                    });
                }
            });
            let _ = deleted.join();
        }
        let group = format!("-{}", self.driver.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        for pid in self.chromium_pids() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// The rows of the status page's table `id`: the text of each cell.
fn rows_script(id: &str) -> String {
    format!(
        "return Array.from(document.querySelectorAll('#{id} tbody tr'))\
         .map(r => Array.from(r.cells).map(c => c.textContent));"
    )
}

/// The status page, open in a browser, shows a tunnel as soon as it is open (who, from where,
/// to which port, the bytes so far) and its end, without being reloaded; it shows no key and
/// no channel ID. With `PTTH_UPDATE_SCREENSHOT=1`, its picture with the tunnel open is
/// written to docs/status-page.png.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_tunnel_live_and_then_its_end() {
    required("chromium", "chromium");
    required("chromedriver", "chromium-driver");
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let trio = Trio::start(&[("echo", echo)], "audit_log = \"audit.jsonl\"\n").await;
        let browser = Browser::start(trio.setup.path()).await;
        browser.open(&format!("http://{}/", trio.relay_admin)).await;
        let no_tunnels = |v: &Value| *v == serde_json::json!([["no open tunnels"]]);
        browser
            .wait_for("an empty tunnel table", &rows_script("tunnels"), no_tunnels)
            .await;
        // Gone if the page is loaded again.
        browser
            .run("window.ptthMark = 'not reloaded'; return true;")
            .await;

        let hello = b"hello, status page";
        let mut tunnel = TcpStream::connect(trio.forwards[0]).await.expect("connect");
        tunnel.write_all(hello).await.expect("write");
        let mut back = [0u8; 18];
        tunnel.read_exact(&mut back).await.expect("echo");
        assert_eq!(&back, hello);
        let n = hello.len().to_string();
        let rows = browser
            .wait_for("alice's tunnel to db/echo", &rows_script("tunnels"), |v| {
                v.as_array().is_some_and(|rows| {
                    rows.len() == 1
                        && rows[0].as_array().is_some_and(|r| {
                            r.len() == 7
                                && r[0] == "alice"
                                && r[2] == "db"
                                && r[5] == n.as_str()
                                && r[6] == n.as_str()
                        })
                })
            })
            .await;
        let row: Vec<&str> = rows[0]
            .as_array()
            .expect("row")
            .iter()
            .map(|c| c.as_str().unwrap_or("?"))
            .collect();
        assert_eq!(
            [row[0], row[1], row[2], row[3]],
            ["alice", "127.0.0.1", "db", "echo"]
        );
        assert!(row[4].ends_with(" s"), "age {:?}", row[4]);
        assert_eq!([row[5], row[6]], ["18", "18"]);
        browser
            .wait_for(
                "1 tunnel open",
                "return document.getElementById('summary').textContent;",
                |v| v.as_str().is_some_and(|s| s.contains(" 1 tunnel open")),
            )
            .await;
        let servers = browser.run(&rows_script("servers")).await;
        assert_eq!(servers[0][0], "db", "{servers}");
        assert_eq!(servers[0][1], "online", "{servers}");
        assert_eq!(servers[0][2], "echo", "{servers}");

        let png = browser.screenshot().await;
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
            "{} bytes",
            png.len()
        );
        std::fs::write(trio.setup.path().join("status-page.png"), &png).expect("screenshot");
        if std::env::var_os("PTTH_UPDATE_SCREENSHOT").is_some_and(|v| v == "1") {
            let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/status-page.png");
            std::fs::write(&docs, &png).expect("docs/status-page.png");
        }

        // No key material and no channel ID, in what the page shows or holds.
        let (_, audit) =
            audit_lines(&trio.setup.path().join("audit.jsonl"), &["tunnel_opened"]).await;
        let channel = audit
            .iter()
            .find_map(|l| (l["event"] == "tunnel_opened").then(|| l["channel"].as_str())?)
            .expect("the tunnel's channel ID in the audit log")
            .to_owned();
        assert_eq!(channel.len(), 32, "{channel}");
        let page = browser
            .run("return document.body.innerText + '\\n' + document.documentElement.outerHTML;")
            .await;
        let page = page.as_str().expect("text");
        let status = trio.status().await.to_string();
        let mut secrets: HashSet<String> = trio.key_material().into_iter().collect();
        secrets.insert(channel);
        for secret in &secrets {
            assert!(
                !page.contains(secret.as_str()),
                "the page shows {secret}:\n{page}"
            );
            assert!(
                !status.contains(secret.as_str()),
                "/api/status shows {secret}:\n{status}"
            );
        }

        // Closed: the same page, not reloaded, shows no tunnel again.
        tunnel.shutdown().await.expect("half-close");
        let (rest, failed) = read_until_closed(&mut tunnel).await;
        assert!(rest.is_empty() && !failed, "{rest:?} {failed}");
        drop(tunnel);
        browser
            .wait_for("no open tunnels again", &rows_script("tunnels"), no_tunnels)
            .await;
        browser
            .wait_for(
                "0 tunnels open",
                "return document.getElementById('summary').textContent;",
                |v| v.as_str().is_some_and(|s| s.contains(" 0 tunnels open")),
            )
            .await;
        assert_eq!(browser.run("return window.ptthMark;").await, "not reloaded");
        drop(browser);
    })
    .await;
}
