//! Real HTTPS fronts for tests: a private CA and a certificate for `localhost`, and nginx,
//! Caddy or HAProxy started with a generated configuration in front of a relay. The front
//! programs are installed with apt-get when absent (as root), as on a fresh CI machine.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::{TcpListener, TcpStream};

/// A private CA and a server certificate for `localhost` and `127.0.0.1`, as PEM files.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA certificate (what `ca_file` points at).
    pub ca: PathBuf,
    /// The server certificate chain.
    pub cert: PathBuf,
    /// The server private key.
    pub key: PathBuf,
    /// Certificate followed by key (HAProxy's `crt`).
    pub combined: PathBuf,
}

impl Pki {
    /// Generates the CA and the certificate into `dir`.
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "ptth test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
        let pki = Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("cert.key"),
            combined: dir.join("combined.pem"),
        };
        std::fs::write(&pki.ca, ca_cert.pem())?;
        std::fs::write(&pki.cert, cert.pem())?;
        std::fs::write(&pki.key, key.serialize_pem())?;
        std::fs::write(
            &pki.combined,
            format!("{}{}", cert.pem(), key.serialize_pem()),
        )?;
        Ok(pki)
    }
}

/// Which reverse proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontKind {
    /// nginx, configured as docs/deploy.md says.
    Nginx,
    /// nginx left with request buffering on (its default), to test the diagnosis.
    NginxBuffering,
    /// Caddy.
    Caddy,
    /// HAProxy.
    Haproxy,
}

/// A running front; stopped when dropped.
#[derive(Debug)]
pub struct Front {
    /// Where it listens (TLS).
    pub addr: SocketAddr,
    /// Which program it is.
    pub kind: FrontKind,
    child: Child,
    /// This front's own folder: its configuration and its logs.
    dir: PathBuf,
}

/// A path that only the front answers (with its start-up token), never the relay.
const PROBE_PATH: &str = "/ptth-front-probe";

/// HAProxy termination states accepted in its request log: `----` is a request that ended
/// normally on both sides (a long-poll answered 204, a tunnel whose two bodies ended).
const HAPROXY_CLEAN: &[&str] = &["----"];

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

impl Front {
    /// What the front wrote on stdout and stderr (for HAProxy, its request log too).
    pub fn log(&self) -> String {
        read(&self.dir.join("stdio.log"))
    }

    /// nginx's error log (empty for the others).
    pub fn error_log(&self) -> String {
        read(&self.dir.join("error.log"))
    }

    /// The request log: one line per request (nginx's combined format, Caddy's JSON,
    /// HAProxy's `option httplog`).
    pub fn access_log(&self) -> String {
        match self.kind {
            FrontKind::Haproxy => self.log(),
            _ => read(&self.dir.join("access.log")),
        }
    }

    /// Lines of the front's logs that report a problem:
    /// - nginx: `[warn]` and worse, and lines (whatever their level: nginx logs client
    ///   timeouts at `[info]`) saying `timed out`, `prematurely closed` or naming the upstream;
    /// - Caddy: `warn` and `error` entries (but the warnings of every start), and requests
    ///   answered 5xx;
    /// - HAProxy: `[WARNING]` and `[ALERT]` lines, requests answered 5xx or ended with a
    ///   termination state other than `----`, and connection-level errors (any other line).
    pub fn errors(&self) -> Vec<String> {
        match self.kind {
            FrontKind::Nginx | FrontKind::NginxBuffering => {
                let text = format!("{}{}", self.log(), self.error_log());
                text.lines()
                    .filter(|l| nginx_problem(l))
                    .map(str::to_owned)
                    .collect()
            }
            FrontKind::Caddy => {
                let log = self.log();
                let access = self.access_log();
                log.lines()
                    .filter(|l| caddy_problem(l))
                    .chain(
                        access
                            .lines()
                            .filter(|l| caddy_status(l).is_some_and(|s| s >= 500)),
                    )
                    .map(str::to_owned)
                    .collect()
            }
            FrontKind::Haproxy => self
                .log()
                .lines()
                .filter(|l| haproxy_problem(l))
                .map(str::to_owned)
                .collect(),
        }
    }

    /// How many `listen` long-polls the front logged as answered with `status`.
    pub fn listen_answers(&self, status: u16) -> usize {
        let access = self.access_log();
        access
            .lines()
            .filter(|l| match self.kind {
                FrontKind::Nginx | FrontKind::NginxBuffering => {
                    l.contains("/listen HTTP/") && l.contains(&format!("\" {status} "))
                }
                FrontKind::Caddy => l.contains("/listen\"") && caddy_status(l) == Some(status),
                FrontKind::Haproxy => parse_httplog(l)
                    .is_some_and(|h| h.status == status && h.request.contains("/listen ")),
            })
            .count()
    }
}

fn nginx_problem(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    [
        "[warn]",
        "[error]",
        "[crit]",
        "[alert]",
        "[emerg]",
        "timed out",
        "prematurely closed",
        "upstream",
    ]
    .iter()
    .any(|p| l.contains(p))
}

/// Warnings Caddy 2.6 logs at every start with the test configuration.
const CADDY_START_WARNINGS: &[&str] = &[
    "Caddyfile input is not formatted",
    "admin endpoint disabled",
    "no OCSP stapling",
    "automatic HTTPS is completely disabled",
];

fn caddy_problem(line: &str) -> bool {
    let warn = line.contains("\"level\":\"warn\"");
    let bad = warn || line.contains("\"level\":\"error\"") || line.contains("\"level\":\"fatal\"");
    bad && !(warn && CADDY_START_WARNINGS.iter().any(|w| line.contains(w)))
}

/// The `"status":NNN` of a Caddy access log entry.
fn caddy_status(line: &str) -> Option<u16> {
    let rest = &line[line.find("\"status\":")? + "\"status\":".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// One request of HAProxy's `option httplog` format:
/// `client:port [date] frontend backend/server Treq/Tw/Tc/Tr/Ta status bytes cookie cookie
/// termination conns queues "request"`.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpLogLine {
    /// The HTTP status sent to the client.
    pub status: u16,
    /// The four-letter termination state (`----` when the request ended normally).
    pub termination: String,
    /// The request line, quoted.
    pub request: String,
}

/// Parses a line of HAProxy's `option httplog` format; `None` for anything else.
pub fn parse_httplog(line: &str) -> Option<HttpLogLine> {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let timers = |t: &str| {
        let parts: Vec<&str> = t.split('/').collect();
        parts.len() == 5 && parts.iter().all(|p| p.parse::<i64>().is_ok())
    };
    let i = tokens.iter().position(|t| timers(t))?;
    let status = tokens.get(i + 1)?.parse().ok()?;
    let termination = (*tokens.get(i + 5)?).to_owned();
    if termination.len() != 4 {
        return None;
    }
    let request = line[line.find('"')?..].to_owned();
    Some(HttpLogLine {
        status,
        termination,
        request,
    })
}

fn haproxy_problem(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    if l.trim().is_empty() || l.starts_with("[notice]") {
        return false;
    }
    match parse_httplog(line) {
        // The readiness probe is answered by HAProxy itself (state `LR--`).
        Some(h) if h.request.contains(PROBE_PATH) => false,
        Some(h) => h.status >= 500 || !HAPROXY_CLEAN.contains(&h.termination.as_str()),
        // `[WARNING]`, `[ALERT]`, or a connection that failed before any request (a TLS
        // handshake, an HTTP/2 protocol error): HAProxy logs those in another format.
        None => true,
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        // Already exited (and reaped): its pid may belong to another process by now.
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // SIGTERM first: nginx's master then stops its workers (SIGKILL would orphan them).
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Makes sure `program` exists, installing Debian package `package` if not.
pub fn ensure_installed(program: &str, package: &str) -> anyhow::Result<PathBuf> {
    let _one_at_a_time = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let find = || {
        ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"]
            .iter()
            .map(|d| Path::new(d).join(program))
            .find(|p| p.exists())
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "(apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {package}"
        ))
        .stdout(Stdio::null())
        .status()
        .context("running apt-get")?;
    match find() {
        Some(p) => Ok(p),
        None => {
            bail!("{program} is not installed and `apt-get install {package}` failed ({status})")
        }
    }
}

/// A loopback port that was free a moment ago (for programs that must bind it themselves;
/// another process may take it before they do: see [`start_front`]).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}

/// A token that this front alone answers on [`PROBE_PATH`].
fn probe_token() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "ptth-front-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Starts a front of `kind` listening on a fresh loopback port, proxying to `relay`, with its
/// idle timeouts set to `timeout`; waits until it answers.
///
/// The port is chosen free, then released for the front to bind, so a test running in
/// parallel may take it first. Each attempt therefore checks that the answer comes from this
/// very front (a token in its configuration), and a front that exits or a port answered by
/// someone else means a new attempt on a new port.
pub async fn start_front(
    kind: FrontKind,
    dir: &Path,
    pki: &Pki,
    relay: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<Front> {
    let mut failures = Vec::new();
    for attempt in 1..=4 {
        let sub = dir.join(format!("{kind:?}-{attempt}"));
        std::fs::create_dir_all(&sub)?;
        match start_once(kind, &sub, pki, relay, timeout).await {
            Ok(front) => return Ok(front),
            Err(e) => failures.push(format!("attempt {attempt}: {e:#}")),
        }
    }
    bail!("{kind:?} did not start:\n{}", failures.join("\n"))
}

async fn start_once(
    kind: FrontKind,
    dir: &Path,
    pki: &Pki,
    relay: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<Front> {
    let port = free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let t = secs(timeout);
    let token = probe_token();
    let out = std::fs::File::create(dir.join("stdio.log"))?;
    let mut cmd = match kind {
        FrontKind::Nginx | FrontKind::NginxBuffering => {
            let nginx = ensure_installed("nginx", "nginx")?;
            let conf = dir.join("nginx.conf");
            std::fs::write(&conf, nginx_conf(kind, dir, pki, port, relay, t, &token))?;
            let mut c = Command::new(nginx);
            c.arg("-c")
                .arg(&conf)
                .arg("-p")
                .arg(dir)
                .arg("-e")
                .arg(dir.join("error.log"));
            c
        }
        FrontKind::Caddy => {
            let caddy = ensure_installed("caddy", "caddy")?;
            let conf = dir.join("Caddyfile");
            std::fs::write(&conf, caddyfile(dir, pki, port, relay, t, &token))?;
            let mut c = Command::new(caddy);
            c.arg("run")
                .arg("--config")
                .arg(&conf)
                .arg("--adapter")
                .arg("caddyfile");
            c.env("HOME", dir)
                .env("XDG_DATA_HOME", dir.join("caddy-data"))
                .env("XDG_CONFIG_HOME", dir.join("caddy-config"));
            c
        }
        FrontKind::Haproxy => {
            let haproxy = ensure_installed("haproxy", "haproxy")?;
            let conf = dir.join("haproxy.cfg");
            std::fs::write(&conf, haproxy_cfg(pki, port, relay, t, &token))?;
            let mut c = Command::new(haproxy);
            c.arg("-f").arg(&conf).arg("-db");
            c
        }
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {kind:?}"))?;
    let mut front = Front {
        addr,
        kind,
        child,
        dir: dir.to_owned(),
    };
    // Readiness probe over HTTPS, trusting only this test's CA, resolved to this port only.
    let probe = ptth_common::client::http_client_builder(Some(&pki.ca))?
        .resolve("localhost", addr)
        .timeout(Duration::from_secs(5))
        .build()?;
    let url = format!("https://localhost:{port}{PROBE_PATH}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = front.child.try_wait()? {
            bail!(
                "{kind:?} exited with {status}:\n{}{}",
                front.log(),
                front.error_log()
            );
        }
        match probe.get(&url).send().await {
            Ok(r) => {
                let body = r.text().await.unwrap_or_default();
                // Still running after answering: it is not about to exit on a failed bind.
                if body.trim() == token && front.child.try_wait()?.is_none() {
                    return Ok(front);
                }
                bail!(
                    "port {port} answered the probe, but not as this {kind:?} (taken by another program?)"
                );
            }
            // Not listening yet, or someone else's TLS there: poll until it starts or exits.
            Err(e) if e.is_connect() => {}
            Err(e) => bail!("probe of {url}: {}", ptth_common::client::error_chain(&e)),
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{kind:?} did not answer on {addr}:\n{}{}",
                front.log(),
                front.error_log()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn nginx_conf(
    kind: FrontKind,
    dir: &Path,
    pki: &Pki,
    port: u16,
    relay: SocketAddr,
    t: u64,
    token: &str,
) -> String {
    let d = dir.display();
    let buffering = if kind == FrontKind::NginxBuffering {
        // The mistake under test: nginx's default, request bodies buffered whole.
        "proxy_request_buffering on;"
    } else {
        "proxy_request_buffering off;"
    };
    format!(
        r#"daemon off;
master_process on;
worker_processes 1;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 4096; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/nginx-body;
    proxy_temp_path {d}/nginx-proxy;
    fastcgi_temp_path {d}/nginx-fastcgi;
    uwsgi_temp_path {d}/nginx-uwsgi;
    scgi_temp_path {d}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        http2_max_concurrent_streams 1024;
        keepalive_requests 1000000;
        keepalive_timeout {t}s;
        client_body_timeout {t}s;
        send_timeout {t}s;
        location = {PROBE_PATH} {{
            return 200 "{token}";
        }}
        location /v1/ {{
            proxy_pass http://{relay};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            {buffering}
            proxy_buffering off;
            client_max_body_size 0;
            proxy_read_timeout {t}s;
            proxy_send_timeout {t}s;
        }}
    }}
}}
"#,
        cert = pki.cert.display(),
        key = pki.key.display(),
    )
}

/// Caddy 2.6 has no timer that measures the silence of a proxied stream in flight and that
/// the protocol can live with, so `t` only sets `idle`, which applies to connections with no
/// request in flight (and the proxies always keep a long-poll in flight):
/// - the server's `read_body` and `write` are total deadlines per request (Go's
///   `ReadTimeout`/`WriteTimeout`), which would cut every tunnel however busy;
/// - the transport's `read_timeout` is re-armed before each read from the relay, but an
///   upload's answer comes only when the upload ends, so it would cut every upload;
/// - the transport's `write_timeout` bounds one blocked write to the relay: a silent stream
///   has no write in progress and never trips it.
///
/// The site has no host name: the proxies reach Caddy through a [`CountingForwarder`], so the
/// `Host` they send names another port, and Caddy's access log only covers requests whose host
/// matches the site's unless the site has none.
fn caddyfile(dir: &Path, pki: &Pki, port: u16, relay: SocketAddr, t: u64, token: &str) -> String {
    format!(
        r#"{{
    admin off
    auto_https off
    servers {{
        timeouts {{
            idle {t}s
        }}
    }}
}}

https://:{port} {{
    bind 127.0.0.1
    tls {cert} {key}
    log {{
        output file {access}
        format json
    }}
    respond {PROBE_PATH} "{token}" 200
    reverse_proxy {relay} {{
        flush_interval -1
    }}
}}
"#,
        cert = pki.cert.display(),
        key = pki.key.display(),
        access = dir.join("access.log").display(),
    )
}

fn haproxy_cfg(pki: &Pki, port: u16, relay: SocketAddr, t: u64, token: &str) -> String {
    format!(
        r#"global
    maxconn 4000
    tune.h2.max-concurrent-streams 1024

defaults
    log stderr format raw local0 info
    option httplog
    mode http
    timeout connect 3s
    timeout client {t}s
    timeout server {t}s
    timeout http-request 10s
    timeout http-keep-alive {t}s

frontend ptth
    bind 127.0.0.1:{port} ssl crt {combined} alpn h2,http/1.1
    option forwardfor
    option http-no-delay
    http-request return status 200 content-type text/plain string "{token}" if {{ path {PROBE_PATH} }}
    default_backend relay

backend relay
    server relay {relay}
"#,
        combined = pki.combined.display(),
    )
}

/// A TCP forwarder that counts the connections made through it, to see how many TCP
/// connections a proxy opens to its relay.
#[derive(Debug, Clone)]
pub struct CountingForwarder {
    /// Where it listens.
    pub addr: SocketAddr,
    open: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    total: Arc<AtomicUsize>,
}

impl CountingForwarder {
    /// Forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let me = Self {
            addr: l.local_addr()?,
            open: Arc::default(),
            peak: Arc::default(),
            total: Arc::default(),
        };
        let c = me.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = l.accept().await {
                c.total.fetch_add(1, Ordering::SeqCst);
                let now = c.open.fetch_add(1, Ordering::SeqCst) + 1;
                c.peak.fetch_max(now, Ordering::SeqCst);
                let c2 = c.clone();
                tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(target).await {
                        let _ = inbound.set_nodelay(true);
                        let _ = out.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                    c2.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(me)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Most connections open at once since the last [`CountingForwarder::reset_peak`].
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    /// Connections made in all.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    /// Starts a new peak measurement from the connections open now.
    pub fn reset_peak(&self) {
        self.peak.store(self.open(), Ordering::SeqCst);
    }
}

/// A plain-TCP listener that carries each connection it accepts over TLS to `target` with
/// `openssl s_client`, offering ALPN `http/1.1` only and checking the certificate against a
/// given CA. Clients given `http://` its address thus reach a TLS relay over HTTP/1.1, as a
/// client without HTTP/2 would (the proxies' own TLS configuration always offers h2).
#[derive(Debug, Clone)]
pub struct TlsBridge {
    /// Where it listens (plain TCP).
    pub addr: SocketAddr,
    request_lines: Arc<std::sync::Mutex<Vec<String>>>,
}

impl TlsBridge {
    /// Starts the bridge to `target`, which must present a certificate for `name` from `ca`.
    pub async fn start(target: SocketAddr, ca: &Path, name: &str) -> anyhow::Result<Self> {
        let openssl = ensure_installed("openssl", "openssl")?;
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let me = Self {
            addr: l.local_addr()?,
            request_lines: Arc::default(),
        };
        let (ca, name, lines) = (ca.to_owned(), name.to_owned(), me.request_lines.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = l.accept().await {
                let mut cmd = tokio::process::Command::new(&openssl);
                cmd.args(["s_client", "-quiet", "-connect"])
                    .arg(target.to_string())
                    .args(["-servername", &name, "-verify_hostname", &name])
                    .args(["-alpn", "http/1.1", "-verify_return_error", "-CAfile"])
                    .arg(&ca)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .kill_on_drop(true);
                tokio::spawn(bridge_one(inbound, cmd, lines.clone()));
            }
        });
        Ok(me)
    }

    /// The request lines seen so far (`PRI * HTTP/2.0` for an HTTP/2 connection preface).
    pub fn request_lines(&self) -> Vec<String> {
        self.request_lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

async fn bridge_one(
    inbound: TcpStream,
    mut cmd: tokio::process::Command,
    lines: Arc<std::sync::Mutex<Vec<String>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut child) = cmd.spawn() else {
        return;
    };
    let (Some(mut to_tls), Some(mut from_tls)) = (child.stdin.take(), child.stdout.take()) else {
        return;
    };
    let (mut r, mut w) = inbound.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // Each request's head starts a write of its own (the body, if any, follows).
            let chunk = &buf[..n];
            if [&b"POST "[..], b"GET ", b"PRI "]
                .iter()
                .any(|m| chunk.starts_with(m))
            {
                let text = String::from_utf8_lossy(chunk);
                let line = text.split("\r\n").next().unwrap_or_default().to_owned();
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
            if to_tls.write_all(&buf[..n]).await.is_err() || to_tls.flush().await.is_err() {
                return;
            }
        }
    };
    let down = async {
        let _ = tokio::io::copy(&mut from_tls, &mut w).await;
        let _ = w.shutdown().await;
    };
    // An HTTP/1.1 client never half-closes: when either side ends, the connection is over
    // (and s_client, which ignores the end of its input, is killed on drop).
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haproxy_log_lines_are_judged() {
        // Lines as HAProxy 2.6 wrote them with the test configuration.
        let poll = r#"127.0.0.1:38892 [24/Nov/2026:09:05:47.224] ptth~ relay/relay 0/0/0/1007/1007 204 107 - - ---- 2/2/1/1/0 0/0 "POST https://localhost:40929/v1/servers/db/ports/echo/listen HTTP/2.0""#;
        let probe = r#"127.0.0.1:38886 [24/Nov/2026:09:05:47.208] ptth~ ptth/<NOSRV> 0/-1/-1/-1/0 200 110 - - LR-- 1/1/0/0/0 0/0 "GET https://localhost:41005/ptth-front-probe HTTP/2.0""#;
        let parsed = parse_httplog(poll).expect("httplog line");
        assert_eq!(parsed.status, 204);
        assert_eq!(parsed.termination, "----");
        assert!(parsed.request.contains("/listen "));
        assert!(!haproxy_problem(poll));
        assert!(!haproxy_problem(probe));
        // A timeout cutting a tunnel, a relay that went away, a startup warning, a failed
        // TLS handshake (not in httplog format).
        let cut = poll.replace(" ---- ", " sD-- ").replace(" 204 ", " 200 ");
        let gone = poll.replace(" ---- ", " SC-- ").replace(" 204 ", " 503 ");
        assert!(haproxy_problem(&cut));
        assert!(haproxy_problem(&gone));
        assert!(haproxy_problem(
            "[WARNING]  (1) : config : missing timeouts for frontend 'ptth'."
        ));
        assert!(haproxy_problem(
            "127.0.0.1:40000 [24/Nov/2026:09:05:47.208] ptth/1: SSL handshake failure"
        ));
    }

    #[test]
    fn nginx_log_lines_are_judged() {
        let p = "2026/11/24 09:06:14 [info] 31770#31770: *44 ";
        assert!(!nginx_problem(&format!(
            "{p}client 127.0.0.6 closed keepalive connection"
        )));
        assert!(nginx_problem(&format!(
            "{p}client timed out (110: Connection timed out) while reading client request body"
        )));
        assert!(nginx_problem(&format!(
            "{p}epoll_wait() reported that client prematurely closed connection, so upstream connection is closed too"
        )));
        assert!(nginx_problem(
            "2026/11/24 09:06:14 [error] 1#1: *3 upstream timed out (110: Connection timed out) while reading upstream"
        ));
    }

    #[test]
    fn caddy_log_lines_are_judged() {
        assert!(!caddy_problem(
            r#"{"level":"warn","ts":1.0,"logger":"admin","msg":"admin endpoint disabled"}"#
        ));
        assert!(caddy_problem(
            r#"{"level":"error","ts":1.0,"logger":"http.log.error","msg":"dial tcp 127.0.0.1:1: connect: connection refused"}"#
        ));
        assert_eq!(
            caddy_status(r#"{"size":0,"status":204,"resp_headers":{}}"#),
            Some(204)
        );
    }
}
