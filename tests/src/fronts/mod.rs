//! Real HTTPS fronts for tests: nginx, Caddy or HAProxy started with a generated
//! configuration in front of a relay, with TLS from a private CA (`pki.rs`). Each front has a
//! file of its own with its configuration and the rules that judge its logs. The front
//! programs are installed with apt-get when absent (as root), as on a fresh CI machine.

mod caddy;
mod haproxy;
mod nginx;
mod pki;
mod site;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

use site::Site;

pub use haproxy::HAPROXY_BALANCING;
pub use nginx::NGINX_BALANCING;
pub use pki::Pki;

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

    /// Lines of the front's logs that report a problem (each front's file says which).
    pub fn errors(&self) -> Vec<String> {
        match self.kind {
            FrontKind::Nginx | FrontKind::NginxBuffering => {
                nginx::errors(&self.log(), &self.error_log())
            }
            FrontKind::Caddy => caddy::errors(&self.log(), &self.access_log()),
            FrontKind::Haproxy => haproxy::errors(&self.log(), PROBE_PATH),
        }
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

static INSTALL: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// Makes sure `program` exists, installing Debian package `package` if not.
pub fn ensure_installed(program: &str, package: &str) -> anyhow::Result<PathBuf> {
    let _one_at_a_time = INSTALL.lock();
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
/// idle timeouts set to `timeout` and its connection and stream limits sized for `tunnels`
/// tunnels at once; waits until it answers.
///
/// The port is chosen free, then released for the front to bind, so another process may
/// take it first (rarely: [`crate::process::free_port`] keeps out of the ports that outgoing
/// connections take). Each attempt therefore checks that the answer comes from this
/// very front (a token in its configuration), and a front that exits or a port answered by
/// someone else means a new attempt on a new port.
pub async fn start_front(
    kind: FrontKind,
    dir: &Path,
    pki: &Pki,
    relay: SocketAddr,
    timeout: Duration,
    tunnels: usize,
) -> anyhow::Result<Front> {
    start_balancer(kind, dir, pki, &[relay], timeout, tunnels).await
}

/// [`start_front`] in front of several relays: HAProxy or nginx sends each request to the relay
/// of the server named in its path (consistent hashing), leaving out relays that fail (HAProxy
/// checks `/v1/health` every second; nginx leaves a relay out for 2 s after a failed
/// connection), as docs/scale-out.md configures them.
pub async fn start_balancer(
    kind: FrontKind,
    dir: &Path,
    pki: &Pki,
    relays: &[SocketAddr],
    timeout: Duration,
    tunnels: usize,
) -> anyhow::Result<Front> {
    if relays.is_empty()
        || (relays.len() > 1 && !matches!(kind, FrontKind::Haproxy | FrontKind::Nginx))
    {
        bail!("{kind:?} cannot balance among {} relays", relays.len());
    }
    let mut failures = Vec::new();
    for attempt in 1..=4 {
        let sub = dir.join(format!("{kind:?}-{attempt}"));
        std::fs::create_dir_all(&sub)?;
        match start_once(kind, &sub, pki, relays, timeout, tunnels).await {
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
    relays: &[SocketAddr],
    timeout: Duration,
    tunnels: usize,
) -> anyhow::Result<Front> {
    let addr = crate::process::free_port()?;
    let port = addr.port();
    let token = probe_token();
    let site = Site {
        port,
        relays,
        t: secs(timeout),
        probe: PROBE_PATH,
        token: &token,
        tunnels,
    };
    let out = std::fs::File::create(dir.join("stdio.log"))?;
    let mut cmd = match kind {
        FrontKind::Nginx | FrontKind::NginxBuffering => {
            let nginx = ensure_installed("nginx", "nginx")?;
            let conf = dir.join("nginx.conf");
            let buffering = kind == FrontKind::NginxBuffering;
            std::fs::write(&conf, nginx::config(buffering, dir, pki, &site))?;
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
            std::fs::write(&conf, caddy::config(dir, pki, &site))?;
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
            std::fs::write(&conf, haproxy::config(pki, &site))?;
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
    let probe = crate::http_client_builder(Some(&pki.ca))?
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
