//! Test and demo harness: starts a relay, server proxies and client proxies in-process on
//! port 0, with keys and configuration files written to a temporary folder exactly as a user
//! would write them, plus small TCP services to forward to, and what every test file shares:
//! [`within`] (the time limit of a test), [`Logs`] (captured log lines) and
//! [`transfer_each_way`] (a SHA-checked transfer through a tunnel).
//!
//! * [`fronts`]: nginx, Caddy and HAProxy in front of a relay, with a private CA.
//! * [`cluster`]: several relays behind HAProxy or nginx, balanced by server name.
//! * [`taps`]: a counting TCP forwarder and an HTTP/1.1-only TLS bridge.
#![warn(missing_docs)]

pub mod cluster;
pub mod fronts;
pub mod process;
pub mod taps;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use parking_lot::Mutex;
use ptth_common::config::{ProxyConfig, RelayConfig, ServerConfig};
use ptth_common::keys::PrivateKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// Runs a test body, failing it if it takes longer than `limit`.
pub async fn within<F: Future<Output = ()>>(limit: Duration, body: F) {
    tokio::time::timeout(limit, body)
        .await
        .expect("test timed out");
}

/// Log lines captured from one component (what it would print on stderr).
#[derive(Debug, Clone)]
pub struct Logs(Arc<Mutex<Vec<u8>>>, Arc<tokio::sync::watch::Sender<usize>>);

impl Default for Logs {
    fn default() -> Self {
        Self(Arc::default(), Arc::new(tokio::sync::watch::Sender::new(0)))
    }
}

impl Logs {
    /// Waits until the logs satisfy `pred` (checked after every write); `false` on timeout.
    pub async fn wait_for(&self, limit: Duration, pred: impl Fn(&str) -> bool) -> bool {
        let mut changes = self.1.subscribe();
        tokio::time::timeout(limit, async {
            loop {
                if pred(&self.text()) {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .is_ok()
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock()).into_owned()
    }

    /// Lines at WARN or ERROR level.
    pub fn problems(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(str::to_owned)
            .collect()
    }

    /// A subscriber writing into these logs, at INFO and above.
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + 'static {
        let sink = self.clone();
        tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        self.1.send_modify(|n| *n += 1);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A program running on its own runtime, so that it can be stopped cleanly or killed
/// abruptly (every task and socket dropped at once, as when a process dies). Its log lines
/// are captured in [`Component::logs`].
#[derive(Debug)]
pub struct Component {
    rt: Option<Runtime>,
    token: CancellationToken,
    done: Option<tokio::task::JoinHandle<()>>,
    logs: Logs,
}

impl Component {
    /// Starts `f(token)` on a new two-thread runtime.
    pub fn spawn<F, Fut>(f: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let logs = Logs::default();
        // One subscriber for all the runtime's threads: spans move between threads.
        let dispatch = tracing::Dispatch::new(logs.subscriber());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || {
                let guard = tracing::dispatcher::set_default(&dispatch);
                // The runtime's threads live as long as the runtime: keep the default for good.
                std::mem::forget(guard);
            })
            .build()
            .expect("runtime");
        let token = CancellationToken::new();
        let done = rt.spawn(f(token.clone()));
        Self {
            rt: Some(rt),
            token,
            done: Some(done),
            logs,
        }
    }

    /// What the component logged.
    pub fn logs(&self) -> &Logs {
        &self.logs
    }

    /// Cancels the component and waits (at most 10 s) for it to return: whether it did.
    pub async fn stop(mut self) -> bool {
        self.token.cancel();
        match self.done.take() {
            Some(done) => tokio::time::timeout(Duration::from_secs(10), done)
                .await
                .is_ok(),
            None => true,
        }
    }

    /// Drops every task and socket of the component at once.
    pub fn kill(mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        self.token.cancel();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Keys and configuration files of one test setup.
#[derive(Debug)]
pub struct Setup {
    /// Folder holding key and configuration files.
    pub dir: tempfile::TempDir,
    /// Key of server `db`.
    pub server_key: PrivateKey,
    /// Key of client `alice` (allowed `db/*`).
    pub alice_key: PrivateKey,
    /// Key of client `bob` (allowed only `db/other`).
    pub bob_key: PrivateKey,
    /// Key of server `web` (configured, allowed nowhere special).
    pub web_key: PrivateKey,
    /// Extra relay.toml lines (timeouts and so on).
    pub relay_extra: String,
}

impl Setup {
    /// Fresh keys, written as files with mode 0600.
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let server_key = PrivateKey::generate()?;
        let alice_key = PrivateKey::generate()?;
        let bob_key = PrivateKey::generate()?;
        let web_key = PrivateKey::generate()?;
        server_key.write_new(&dir.path().join("db.key"))?;
        alice_key.write_new(&dir.path().join("alice.key"))?;
        bob_key.write_new(&dir.path().join("bob.key"))?;
        web_key.write_new(&dir.path().join("web.key"))?;
        Ok(Self {
            dir,
            server_key,
            alice_key,
            bob_key,
            web_key,
            relay_extra: String::new(),
        })
    }

    /// The folder of the files.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    }

    /// relay.toml text for `listen`.
    pub fn relay_toml(&self, listen: SocketAddr) -> String {
        format!(
            "listen = \"{listen}\"\n{extra}\n\
             [[servers]]\nname = \"db\"\npublic_key = \"{db}\"\n\n\
             [[servers]]\nname = \"web\"\npublic_key = \"{web}\"\n\n\
             [[clients]]\nname = \"alice\"\npublic_key = \"{alice}\"\nallow = [\"db/*\", \"web/*\"]\n\n\
             [[clients]]\nname = \"bob\"\npublic_key = \"{bob}\"\nallow = [\"db/other\"]\n",
            extra = self.relay_extra,
            db = self.server_key.public(),
            web = self.web_key.public(),
            alice = self.alice_key.public(),
            bob = self.bob_key.public(),
        )
    }

    /// Starts a relay on a fresh loopback port, with this setup's relay.toml.
    pub fn start_relay(&self) -> anyhow::Result<RelayHandle> {
        start_relay(bind_any()?, self.relay_config("127.0.0.1:0".parse()?)?)
    }

    /// Writes and loads relay.toml.
    pub fn relay_config(&self, listen: SocketAddr) -> anyhow::Result<RelayConfig> {
        let p = self.write("relay.toml", &self.relay_toml(listen))?;
        Ok(RelayConfig::load(&p)?)
    }

    /// Writes and loads server.toml for server `db` offering `ports` (name, target).
    pub fn server_config(
        &self,
        relay: SocketAddr,
        ports: &[(&str, String)],
        extra: &str,
    ) -> anyhow::Result<ServerConfig> {
        self.server_config_url(&format!("http://{relay}"), ports, extra)
    }

    /// Like [`Setup::server_config`] with any relay URL.
    pub fn server_config_url(
        &self,
        url: &str,
        ports: &[(&str, String)],
        extra: &str,
    ) -> anyhow::Result<ServerConfig> {
        let mut text = format!(
            "relay_url = \"{url}\"\nname = \"db\"\nkey_file = \"db.key\"\nmax_backoff = \"500ms\"\n{extra}\n[ports]\n"
        );
        for (name, target) in ports {
            text.push_str(&format!("{name} = \"{target}\"\n"));
        }
        let p = self.write("server.toml", &text)?;
        Ok(ServerConfig::load(&p)?)
    }

    /// Writes and loads proxy.toml for client `client` forwarding each (server, port) to a
    /// port-0 listener; returns the config with the real listen addresses.
    pub fn proxy_config(
        &self,
        relay: SocketAddr,
        client: &str,
        forwards: &[(&str, &str)],
        extra: &str,
    ) -> anyhow::Result<ProxyConfig> {
        self.proxy_config_url(&format!("http://{relay}"), client, forwards, extra)
    }

    /// Like [`Setup::proxy_config`] with any relay URL.
    pub fn proxy_config_url(
        &self,
        url: &str,
        client: &str,
        forwards: &[(&str, &str)],
        extra: &str,
    ) -> anyhow::Result<ProxyConfig> {
        let mut text = format!("relay_url = \"{url}\"\nkey_file = \"{client}.key\"\n{extra}\n");
        for (server, port) in forwards {
            text.push_str(&format!(
                "[[forwards]]\nlisten = \"127.0.0.1:0\"\nserver = \"{server}\"\nport = \"{port}\"\n"
            ));
        }
        let p = self.write(&format!("proxy-{client}.toml"), &text)?;
        Ok(ProxyConfig::load(&p)?)
    }
}

/// A running relay.
#[derive(Debug)]
pub struct RelayHandle {
    /// Its address.
    pub addr: SocketAddr,
    /// Number of channels it holds.
    pub channels: tokio::sync::watch::Receiver<usize>,
    /// Number of channels opened so far.
    pub channels_opened: tokio::sync::watch::Receiver<u64>,
    /// Number of tunnels (connections in progress).
    pub tunnels: tokio::sync::watch::Receiver<usize>,
    /// Number of server channels ready for a connection.
    pub ready_server_channels: tokio::sync::watch::Receiver<usize>,
    /// The program.
    pub component: Component,
}

/// Starts a relay on `listener` with `config`.
pub fn start_relay(
    listener: std::net::TcpListener,
    config: RelayConfig,
) -> anyhow::Result<RelayHandle> {
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let component = Component::spawn(move |token| async move {
        let started = TcpListener::from_std(listener)
            .map_err(|e| e.to_string())
            .and_then(|l| ptth_relay::run(l, config, token).map_err(|e| e.to_string()));
        match started {
            Ok(relay) => {
                let watches = (
                    relay.channels(),
                    relay.channels_opened(),
                    relay.tunnels(),
                    relay.ready_server_channels(),
                );
                let _ = tx.send(Ok(watches));
                relay.await;
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        }
    });
    let (channels, channels_opened, tunnels, ready_server_channels) = rx
        .recv_timeout(Duration::from_secs(10))
        .context("relay did not start")?
        .map_err(anyhow::Error::msg)?;
    Ok(RelayHandle {
        addr,
        channels,
        channels_opened,
        tunnels,
        ready_server_channels,
        component,
    })
}

impl RelayHandle {
    /// Waits at most `limit` until no tunnel is in progress at the relay; fails the test with
    /// `what` otherwise.
    pub async fn expect_no_tunnels(&self, limit: Duration, what: &str) {
        let mut t = self.tunnels.clone();
        tokio::time::timeout(limit, t.wait_for(|n| *n == 0))
            .await
            .expect(what)
            .expect("relay running");
    }

    /// Waits at most `limit` until at least `n` server channels are ready at the relay;
    /// fails the test with `what` otherwise.
    pub async fn expect_server_channels(&self, n: usize, limit: Duration, what: &str) {
        let mut r = self.ready_server_channels.clone();
        tokio::time::timeout(limit, r.wait_for(|c| *c >= n))
            .await
            .expect(what)
            .expect("relay running");
    }

    /// Waits at most `limit` until the relay holds exactly `n` channels; fails the test with
    /// `what` otherwise.
    pub async fn expect_channels(&self, n: usize, limit: Duration, what: &str) {
        let mut c = self.channels.clone();
        if tokio::time::timeout(limit, c.wait_for(|c| *c == n))
            .await
            .is_err()
        {
            panic!("{what}: {} channels, not {n}", *c.borrow());
        }
    }
}

/// Binds 127.0.0.1:0 (std listener, so it can move to another runtime).
pub fn bind_any() -> anyhow::Result<std::net::TcpListener> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?)
}

/// Starts a server proxy.
pub fn start_server(config: ServerConfig, key: PrivateKey) -> Component {
    Component::spawn(move |token| async move {
        match ptth_server::run(config, key, token) {
            Ok(server) => server.await,
            Err(e) => tracing::error!(error = %e, "server proxy failed"),
        }
    })
}

/// Starts a client proxy, binding each forward (port 0 allowed); returns the bound addresses
/// in forward order.
pub fn start_proxy(
    config: ProxyConfig,
    key: PrivateKey,
) -> anyhow::Result<(Component, Vec<SocketAddr>)> {
    let mut listeners = Vec::new();
    let mut addrs = Vec::new();
    for f in &config.forwards {
        let l = std::net::TcpListener::bind(f.listen)?;
        l.set_nonblocking(true)?;
        addrs.push(l.local_addr()?);
        listeners.push(l);
    }
    let component = Component::spawn(move |token| async move {
        let listeners: std::io::Result<Vec<TcpListener>> =
            listeners.into_iter().map(TcpListener::from_std).collect();
        let started = listeners
            .map_err(|e| e.to_string())
            .and_then(|ls| ptth_proxy::run(ls, config, key, token).map_err(|e| e.to_string()));
        match started {
            Ok(proxy) => proxy.await,
            Err(e) => tracing::error!(error = %e, "client proxy failed"),
        }
    });
    Ok((component, addrs))
}

/// Starts an echo service (each connection: bytes back as they come; FIN after EOF) on the
/// current runtime. Returns its address.
pub async fn echo_service() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    Ok(addr)
}

/// A loopback port where connections are refused: bound but never listening, for the whole
/// test process, so that no other test can be given the port meanwhile.
pub fn closed_port() -> anyhow::Result<SocketAddr> {
    static CLOSED: std::sync::OnceLock<std::io::Result<(socket2::Socket, SocketAddr)>> =
        std::sync::OnceLock::new();
    let bound = CLOSED.get_or_init(|| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        s.bind(&any.into())?;
        let addr = s
            .local_addr()?
            .as_socket()
            .ok_or(std::io::ErrorKind::Unsupported)?;
        Ok((s, addr))
    });
    match bound {
        Ok((_, addr)) => Ok(*addr),
        Err(e) => Err(anyhow::anyhow!("closed port: {e}")),
    }
}

/// Connects to `addr`, writes `msg`, half-closes and reads the whole answer.
pub async fn round_trip(addr: SocketAddr, msg: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(msg).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(out)
}

/// Sends `len` pseudo-random bytes (from `seed`) through the tunnel at `local` to an echo
/// service while reading the echo, half-closes, and checks that exactly those bytes came back
/// (length and SHA-256) before EOF.
pub async fn transfer_each_way(local: SocketAddr, len: usize, seed: u64) {
    if let Err(e) = try_transfer_each_way(local, len, seed).await {
        panic!("transfer of {len} bytes each way: {e:#}");
    }
}

/// [`transfer_each_way`], saying what went wrong instead of failing the test.
pub async fn try_transfer_each_way(local: SocketAddr, len: usize, seed: u64) -> anyhow::Result<()> {
    use sha2::{Digest, Sha256};
    let data = random_bytes(len, seed);
    let want = Sha256::digest(&data);
    let s = TcpStream::connect(local).await.context("connect")?;
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await
    });
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await.context("read")?;
        if n == 0 {
            break;
        }
        total += n;
        hasher.update(&buf[..n]);
    }
    writer.await?.context("write")?;
    anyhow::ensure!(total == len, "{total} bytes came back");
    anyhow::ensure!(hasher.finalize() == want, "SHA-256 differs");
    Ok(())
}

/// A reqwest client builder for tests that call the relay or a front themselves, trusting
/// `ca` beside the system roots (the TLS settings of the endpoints).
pub fn http_client_builder(ca: Option<&Path>) -> anyhow::Result<reqwest::ClientBuilder> {
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(ptth_common::client::tls_config(ca)?)
        .no_proxy())
}

/// Calls to a relay signed by hand, as the endpoints sign theirs, for tests that speak the
/// protocol themselves (over reqwest, not the endpoints' client).
#[derive(Debug, Clone)]
pub struct SignedClient {
    http: reqwest::Client,
    url: ptth_common::config::RelayUrl,
    signer: ptth_common::auth::Signer,
}

impl SignedClient {
    /// Signs with `key` for the relay at `http://{addr}`.
    pub fn new(addr: SocketAddr, key: &PrivateKey) -> Self {
        let url = ptth_common::config::RelayUrl::parse(&format!("http://{addr}")).expect("url");
        let http = http_client_builder(None)
            .expect("builder")
            .build()
            .expect("client");
        Self {
            http,
            url,
            signer: ptth_common::auth::Signer::new(key.clone()),
        }
    }

    /// The same, over HTTP/2 without TLS (prior knowledge).
    pub fn h2c(self) -> Self {
        let http = http_client_builder(None)
            .expect("builder")
            .http2_prior_knowledge()
            .build()
            .expect("client");
        Self { http, ..self }
    }

    /// A POST to a protocol path, signed now.
    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let signed = self.signer.sign("POST", &self.url.authority(), path);
        self.http
            .post(self.url.join(path))
            .header(ptth_common::auth::SIGNATURE_INPUT, signed.input)
            .header(ptth_common::auth::SIGNATURE, signed.signature)
    }
}

/// A request body written by hand: each chunk sent on its sender goes out as it comes, an
/// `Err` fails the body, and dropping the sender ends it.
#[derive(Debug)]
pub struct HandBody {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>,
}

impl HandBody {
    /// A body and the sender that writes it.
    pub fn channel() -> (
        tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
        reqwest::Body,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        (tx, reqwest::Body::wrap(Self { rx }))
    }
}

impl http_body::Body for HandBody {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::io::Result<http_body::Frame<bytes::Bytes>>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| c.map(http_body::Frame::data)))
    }
}

/// Deterministic pseudo-random bytes (xorshift), fast enough for hundreds of MiB.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// What a [`World`] starts.
#[derive(Debug, Clone)]
pub struct WorldOptions {
    /// Extra relay.toml lines.
    pub relay_extra: String,
    /// Extra server.toml lines.
    pub server_extra: String,
    /// Extra proxy.toml lines.
    pub proxy_extra: String,
    /// Ports offered by server `db`: (name, target). None: no server proxy.
    pub ports: Vec<(String, SocketAddr)>,
    /// Forwards of the client proxy: (server, port).
    pub forwards: Vec<(String, String)>,
    /// The client the proxy runs as.
    pub client: String,
}

impl WorldOptions {
    /// Server `db` offers `echo` → `target`; alice forwards one port to `db/echo`.
    pub fn echo(target: SocketAddr) -> Self {
        Self {
            relay_extra: String::new(),
            server_extra: String::new(),
            proxy_extra: String::new(),
            ports: vec![("echo".into(), target)],
            forwards: vec![("db".into(), "echo".into())],
            client: "alice".into(),
        }
    }
}

/// A relay, a server proxy and a client proxy, all started and ready.
#[derive(Debug)]
pub struct World {
    /// Keys and files.
    pub setup: Setup,
    /// The relay.
    pub relay: RelayHandle,
    /// The server proxy, if ports were offered.
    pub server: Option<Component>,
    /// The client proxy.
    pub proxy: Component,
    /// Local addresses of the forwards, in order.
    pub forwards: Vec<SocketAddr>,
}

impl World {
    /// Starts everything and waits until the server proxy's channels are ready at the relay.
    pub async fn start(opts: WorldOptions) -> anyhow::Result<Self> {
        let mut setup = Setup::new()?;
        setup.relay_extra = opts.relay_extra.clone();
        let relay = setup.start_relay()?;
        let server = if opts.ports.is_empty() {
            None
        } else {
            let ports: Vec<(&str, String)> = opts
                .ports
                .iter()
                .map(|(n, a)| (n.as_str(), a.to_string()))
                .collect();
            let config = setup.server_config(relay.addr, &ports, &opts.server_extra)?;
            let want = config.listen_pool * config.ports.len();
            let server = start_server(config, setup.server_key.clone());
            let mut ready = relay.ready_server_channels.clone();
            tokio::time::timeout(Duration::from_secs(20), ready.wait_for(|n| *n >= want))
                .await
                .context("server proxy did not open its channels")??;
            Some(server)
        };
        let forwards: Vec<(&str, &str)> = opts
            .forwards
            .iter()
            .map(|(s, p)| (s.as_str(), p.as_str()))
            .collect();
        let key = match opts.client.as_str() {
            "alice" => setup.alice_key.clone(),
            _ => setup.bob_key.clone(),
        };
        let config = setup.proxy_config(relay.addr, &opts.client, &forwards, &opts.proxy_extra)?;
        let want = *relay.channels.borrow() + forwards.len();
        let (proxy, forwards) = start_proxy(config, key)?;
        // The client proxy's channels too, one per forward (without a server, the relay
        // refuses them).
        if server.is_some() {
            let mut channels = relay.channels.clone();
            tokio::time::timeout(Duration::from_secs(20), channels.wait_for(|n| *n >= want))
                .await
                .context("client proxy did not open its channels")??;
        }
        Ok(Self {
            setup,
            relay,
            server,
            proxy,
            forwards,
        })
    }

    /// The first forward's local address.
    pub fn local(&self) -> SocketAddr {
        self.forwards[0]
    }
}

/// Reads from `s` until EOF or error; returns the bytes and whether it ended in an error.
pub async fn read_until_closed(s: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return (out, false),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, true),
        }
    }
}
