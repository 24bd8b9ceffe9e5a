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

/// A running front; killed when dropped.
#[derive(Debug)]
pub struct Front {
    /// Where it listens (TLS).
    pub addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl Front {
    /// What the front wrote on stdout and stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Lines of the front's logs that report errors (nginx `[error]` and worse in its error
    /// log; lines with "error" or "alert" elsewhere).
    pub fn errors(&self) -> Vec<String> {
        let mut text = self.log();
        if let Some(dir) = self.log.parent() {
            text.push_str(
                &std::fs::read_to_string(dir.join("nginx-error.log")).unwrap_or_default(),
            );
        }
        text.lines()
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                l.contains("[error]")
                    || l.contains("[crit]")
                    || l.contains("[alert]")
                    || l.contains("[emerg]")
                    || l.contains("\"level\":\"error\"")
            })
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Front {
    fn drop(&mut self) {
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

/// A loopback port that was free a moment ago (for programs that must bind it themselves).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}

/// Starts a front of `kind` listening on a fresh loopback port, proxying to `relay`, with its
/// idle timeouts set to `timeout`; waits until it accepts connections.
pub async fn start_front(
    kind: FrontKind,
    dir: &Path,
    pki: &Pki,
    relay: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<Front> {
    let port = free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let t = secs(timeout);
    let log = dir.join(format!("{kind:?}.log"));
    let out = std::fs::File::create(&log)?;
    let mut cmd = match kind {
        FrontKind::Nginx | FrontKind::NginxBuffering => {
            let nginx = ensure_installed("nginx", "nginx")?;
            let conf = dir.join("nginx.conf");
            std::fs::write(&conf, nginx_conf(kind, dir, pki, port, relay, t))?;
            let mut c = Command::new(nginx);
            c.arg("-c")
                .arg(&conf)
                .arg("-p")
                .arg(dir)
                .arg("-e")
                .arg(dir.join("nginx-error.log"));
            c
        }
        FrontKind::Caddy => {
            let caddy = ensure_installed("caddy", "caddy")?;
            let conf = dir.join("Caddyfile");
            std::fs::write(&conf, caddyfile(pki, port, relay, t))?;
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
            std::fs::write(&conf, haproxy_cfg(pki, port, relay, t))?;
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
    let mut front = Front { addr, child, log };
    // Readiness probe: the front's own process binds the port; poll until it accepts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(front);
        }
        if let Ok(Some(status)) = front.child.try_wait() {
            bail!("{kind:?} exited with {status}:\n{}", front.log());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{kind:?} did not start listening on {addr}:\n{}",
                front.log()
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
error_log {d}/nginx-error.log info;
events {{ worker_connections 4096; }}
http {{
    access_log off;
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

fn caddyfile(pki: &Pki, port: u16, relay: SocketAddr, t: u64) -> String {
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

https://localhost:{port} {{
    bind 127.0.0.1
    tls {cert} {key}
    reverse_proxy {relay} {{
        flush_interval -1
    }}
}}
"#,
        cert = pki.cert.display(),
        key = pki.key.display(),
    )
}

fn haproxy_cfg(pki: &Pki, port: u16, relay: SocketAddr, t: u64) -> String {
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
