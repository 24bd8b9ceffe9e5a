//! TCP helpers that sit between an endpoint and the relay: a forwarder that counts the
//! connections made through it, one that can go silent, and a bridge that carries plain TCP
//! over TLS with ALPN `http/1.1` only.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};

use crate::fronts::ensure_installed;

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

/// A TCP forwarder that can go silent: once frozen, it passes nothing more either way and
/// closes nothing, as a network path that dies without FIN or RST (a cable pulled, a NAT
/// mapping dropped, a host gone) looks to both ends.
#[derive(Debug, Clone)]
pub struct FreezableForwarder {
    /// Where it listens.
    pub addr: SocketAddr,
    frozen: Arc<tokio::sync::watch::Sender<bool>>,
}

impl FreezableForwarder {
    /// Forwards every connection to `target` until frozen.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let me = Self {
            addr: l.local_addr()?,
            frozen: Arc::new(tokio::sync::watch::Sender::new(false)),
        };
        let frozen = me.frozen.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = l.accept().await {
                let frozen = frozen.clone();
                tokio::spawn(async move {
                    let Ok(out) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = out.set_nodelay(true);
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = out.into_split();
                    tokio::join!(
                        pass_until_frozen(ri, wo, frozen.subscribe()),
                        pass_until_frozen(ro, wi, frozen.subscribe())
                    );
                });
            }
        });
        Ok(me)
    }

    /// From now on nothing passes, and every connection stays open.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }
}

/// Copies `from` to `to` until either ends, or for good once `frozen` is set: then it holds
/// both sockets open, passing nothing, until the test ends.
async fn pass_until_frozen(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = frozen.wait_for(|f| *f) => break,
        };
        if *frozen.borrow() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    if *frozen.borrow() {
        // Silent for good: neither FIN nor RST.
        std::future::pending::<()>().await;
    }
    let _ = to.shutdown().await;
}

/// A plain-TCP listener that carries each connection it accepts over TLS to `target` with
/// `openssl s_client`, offering ALPN `http/1.1` only and checking the certificate against a
/// given CA. Clients given `http://` its address thus reach a TLS relay over HTTP/1.1, as a
/// client without HTTP/2 would (the proxies' own TLS configuration always offers h2).
#[derive(Debug, Clone)]
pub struct TlsBridge {
    /// Where it listens (plain TCP).
    pub addr: SocketAddr,
    request_lines: Arc<parking_lot::Mutex<Vec<String>>>,
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
        self.request_lines.lock().clone()
    }
}

async fn bridge_one(
    inbound: TcpStream,
    mut cmd: tokio::process::Command,
    lines: Arc<parking_lot::Mutex<Vec<String>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut child) = cmd.spawn() else {
        return;
    };
    let (Some(mut to_tls), Some(mut from_tls)) = (child.stdin.take(), child.stdout.take()) else {
        return;
    };
    let (mut r, mut w) = inbound.into_split();
    let requests = async {
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
                lines.lock().push(line);
            }
            if to_tls.write_all(&buf[..n]).await.is_err() || to_tls.flush().await.is_err() {
                return;
            }
        }
    };
    let answers = async {
        let _ = tokio::io::copy(&mut from_tls, &mut w).await;
        let _ = w.shutdown().await;
    };
    // An HTTP/1.1 client never half-closes: when either side ends, the connection is over
    // (and s_client, which ignores the end of its input, is killed on drop).
    tokio::select! {
        () = requests => {}
        () = answers => {}
    }
}
