//! `ptth_relay`: the HTTP server in the middle of every tunnel. It pairs clients with servers
//! and splices their streaming HTTP bodies; it never opens a TCP connection to a service.
//!
//! The entry point is [`run`]: give it a bound listener, the configuration and a cancellation
//! token, and await the [`Relay`] it returns. A byte of a tunnel crosses these files in turn:
//!
//! * `lib.rs` (here): accepts TCP connections (TLS with `tls.rs` when configured) and serves
//!   HTTP/1.1 and HTTP/2 on them, one task per connection, routing the four endpoints;
//! * `handlers.rs`: the endpoints, HTTP in and out, and the health check for load balancers;
//!   `access.rs` checks each caller first; `log_limit.rs` keeps a flood of refusals from
//!   flooding the logs;
//! * `upload.rs`: a channel's upload, read while the channel is idle; its `OPEN` starts a
//!   connection and lends the upload to the other channel's download;
//! * `state.rs`: the ports servers offer, their idle channels and the connections waiting for
//!   one: where a client's connection is joined with a server channel;
//! * `channel.rs`: channels, the tunnel that joins two of them for one connection, the table of
//!   channels and its reaper;
//! * `pipe.rs`: a channel's download, which passes the lent upload on unchanged.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use ptth_common::config::RelayConfig;
//! use tokio_util::sync::CancellationToken;
//!
//! let config = RelayConfig::from_str("relay.toml".as_ref(), "listen = \"127.0.0.1:0\"\n")?;
//! let listener = tokio::net::TcpListener::bind(config.listen).await?;
//! let shutdown = CancellationToken::new();
//! let relay = ptth_relay::run(listener, config, shutdown.clone())?;
//! let ready = relay.ready_server_channels(); // 0: no server yet
//! let serving = tokio::spawn(relay.into_future());
//! assert_eq!(*ready.borrow(), 0);
//! shutdown.cancel();
//! serving.await?;
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod access;
mod channel;
mod handlers;
mod log_limit;
mod metrics;
mod pipe;
mod state;
mod status;
mod tls;
mod upload;

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use ptth_common::TrackedExecutor;
use ptth_common::audit::Audit;
use ptth_common::config::RelayConfig;
use ptth_common::protocol::{
    CONNECT_ROUTE, DOWNSTREAM_ROUTE, HEALTH_PATH, HTTP2_CONNECTION_WINDOW, HTTP2_MAX_FRAME,
    HTTP2_MAX_LOCAL_ERROR_RESETS, HTTP2_STREAM_WINDOW, LISTEN_ROUTE, UPSTREAM_ROUTE,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::access::Peer;
use crate::state::Shared;

/// Most streams open at once on one HTTP/2 connection. An endpoint carries every channel on one
/// connection, two streams each: 16,384 channels per endpoint (10,000 tunnels and their idle
/// channels, as the benchmark holds). Each stream is also bounded by the limits on channels
/// and, before its signature has verified, by its handler ending at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 32_768;
/// Streams the peer may reset before the relay has taken them up, on one HTTP/2 connection;
/// past that, the connection is closed with `ENHANCE_YOUR_CALM` (rapid reset,
/// CVE-2023-44487).
const MAX_PENDING_RESETS: usize = 20;
/// How the path of a `connect` ends (see `CONNECT_ROUTE`): its refusals are also counted as
/// connections that could not be made.
const CONNECT_SUFFIX: &str = "/connect";
/// Time given to the audit log's last lines to reach the disk at shutdown.
const AUDIT_FLUSH_GRACE: Duration = Duration::from_secs(2);
/// Time given to open HTTP connections to finish after shutdown starts.
const HTTP_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Why a relay cannot start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The TLS certificate or key is unusable.
    #[error("{0}")]
    Tls(String),
    /// The listener is unusable.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The audit log file cannot be opened.
    #[error("cannot open the audit log {path}")]
    AuditLog {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Prepares a relay with `config` on `listener`, serving until `shutdown` is cancelled: await
/// the returned [`Relay`] to serve. Fails at once if the TLS certificate or key cannot be
/// used.
pub fn run(
    listener: TcpListener,
    config: RelayConfig,
    shutdown: CancellationToken,
) -> Result<Relay, RelayError> {
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key).map_err(RelayError::Tls)?),
        _ => None,
    };
    let local = listener.local_addr()?;
    let audit = match &config.audit_log {
        Some(path) => {
            Audit::to_file("ptth_relay", path).map_err(|source| RelayError::AuditLog {
                path: path.clone(),
                source,
            })?
        }
        None => Audit::to_log("ptth_relay"),
    };
    let shared = Arc::new(Shared::with_audit(
        config,
        shutdown.child_token(),
        Arc::new(audit),
    ));
    Ok(Relay {
        shared,
        listener,
        local,
        shutdown,
        tls,
        admin: None,
    })
}

/// A relay ready to serve on its listener. Awaiting it serves until shutdown, then closes every
/// tunnel, gives open HTTP connections a short grace period, waits (boundedly) for its tasks
/// and returns.
#[must_use = "a relay serves only when awaited"]
pub struct Relay {
    shared: Arc<Shared>,
    listener: TcpListener,
    local: SocketAddr,
    shutdown: CancellationToken,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// The admin listener, if any.
    admin: Option<TcpListener>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("local", &self.local)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Also serves, on `listener`, the admin listener: `/metrics`, the status page at `/`
    /// and its JSON at `/api/status` (see `ptth_common::admin`).
    pub fn with_admin(mut self, listener: TcpListener) -> Self {
        self.admin = Some(listener);
        self
    }

    /// A handle to drain the relay while it serves.
    pub fn control(&self) -> Control {
        Control {
            shared: self.shared.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Watches the number of channels (clients' and servers', idle or carrying a connection)
    /// the relay holds.
    pub fn channels(&self) -> watch::Receiver<usize> {
        self.shared.channels.count()
    }

    /// Watches the number of channels opened so far.
    pub fn channels_opened(&self) -> watch::Receiver<u64> {
        self.shared.channels.opened()
    }

    /// Watches the number of tunnels: connections in progress.
    pub fn tunnels(&self) -> watch::Receiver<usize> {
        self.shared.channels.tunnels.count.subscribe()
    }

    /// Watches the number of server channels ready for a connection.
    pub fn ready_server_channels(&self) -> watch::Receiver<usize> {
        self.shared.ready_server_channels()
    }
}

impl IntoFuture for Relay {
    type Output = ();
    type IntoFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(serve(self))
    }
}

/// Drains a serving relay (see [`Relay::control`]).
#[derive(Debug, Clone)]
pub struct Control {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

impl Control {
    /// Drains the relay, then shuts it down: from now on `listen` and `connect` are answered
    /// 503, connections waiting for a server channel fail, and idle channels are retired;
    /// open tunnels go on until they end, for at most
    /// `drain_grace`; then the relay shuts down as when its shutdown token is cancelled.
    /// Resolves once shutdown has begun.
    pub async fn drain(&self) {
        let tunnels = self.shared.channels.tunnels.count.subscribe();
        self.shared.drain();
        ptth_common::wait_for_tunnels(tunnels, self.shared.config.drain_grace).await;
        self.shutdown.cancel();
    }

    /// Reads the configuration file `path` again and applies it (see [`Control::reload`]);
    /// a file that does not load is logged, with its line, and the configuration in force
    /// stays. The audit log's file is opened again first (for log rotation).
    pub fn reload_from(&self, path: &std::path::Path) {
        // After a log rotation, the audit log goes on in a new file.
        self.shared.audit.reopen();
        match RelayConfig::load(path) {
            Ok(config) => self.reload(config),
            Err(e) => self.shared.reload_rejected(&e.to_string()),
        }
    }

    /// Applies `config`'s servers, clients, allow lists and authorities to the serving relay:
    /// channels (and their tunnels) that it no longer allows are closed, the others go on.
    /// Other settings take effect at the next start (a warning names those that changed).
    pub fn reload(&self, config: RelayConfig) {
        self.shared.reload(config);
    }
}

/// The router of the relay's HTTP API.
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(LISTEN_ROUTE, post(handlers::listen))
        .route(CONNECT_ROUTE, post(handlers::connect))
        .route(DOWNSTREAM_ROUTE, post(handlers::downstream))
        .route(UPSTREAM_ROUTE, post(handlers::upstream))
        .route(HEALTH_PATH, get(handlers::health))
        .with_state(shared)
}

async fn serve(relay: Relay) {
    let Relay {
        shared,
        listener,
        local,
        shutdown,
        tls,
        admin,
    } = relay;
    if let Some(admin) = admin {
        let mut registry = prometheus_client::registry::Registry::with_prefix("ptth_relay");
        shared.metrics.register(&mut registry);
        registry.register(
            "audit_lines_dropped",
            "Audit log lines dropped because the file could not keep up",
            shared.audit.dropped(),
        );
        let pages = Arc::new(status::StatusPages::new(shared.clone()));
        let admin_state = Arc::new(ptth_common::admin::Admin::new(registry, Some(pages)));
        shared.tasks.spawn(ptth_common::admin::serve(
            admin,
            admin_state,
            shared.shutdown.clone(),
        ));
    }
    let config = &shared.config;
    info!(
        address = %local,
        servers = config.servers.len(),
        clients = config.clients.len(),
        tls = tls.is_some(),
        "relay listening"
    );
    if config.listen_timeout.is_some() {
        warn!(
            "listen_timeout in relay.toml is no longer used (a server's channels are answered at \
             once and kept open by heartbeats); remove it"
        );
    }
    if config.authorities.is_empty() {
        if local.ip().is_loopback() {
            debug!("no `authorities` configured: signatures are checked against the Host header");
        } else {
            warn!(
                "no `authorities` configured: signatures are checked against the Host header; \
                 set `authorities` to the relay's public name(s) so that a request signed for \
                 another relay is refused"
            );
        }
    }
    let router = router(shared.clone());
    let mut builder = auto::Builder::new(TrackedExecutor(shared.tasks.clone()));
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.http_idle_timeout)
        .max_buf_size(256 * 1024)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .max_frame_size(HTTP2_MAX_FRAME)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(16 * 1024)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(HTTP2_MAX_LOCAL_ERROR_RESETS)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    let slots = Arc::new(tokio::sync::Semaphore::new(config.max_http_connections));
    let per_ip_counts = Arc::new(PerIpCounts::default());
    loop {
        // At the HTTP connection limit, stop accepting until one closes.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Usually EMFILE: back off briefly rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // A few addresses must not take every connection slot: cap each untrusted address.
        let Some(per_ip) = PerIp::enter(&per_ip_counts, &shared, peer.ip()) else {
            if let Some(left_out) = shared.refusal_logs.per_ip.admit() {
                debug!(%peer, left_out, "too many HTTP connections from this address; refused");
            }
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "set_nodelay failed");
        }
        let connection = serve_connection(
            shared.clone(),
            builder.clone(),
            stream,
            peer,
            router.clone(),
            tls.clone(),
            shutdown.clone(),
        );
        let open = shared.metrics.http_connections.clone();
        open.inc();
        shared.tasks.spawn(
            async move {
                let _permit = permit;
                let _per_ip = per_ip;
                connection.await;
                open.dec();
            }
            .instrument(info_span!("http", %peer)),
        );
    }
    info!("relay shutting down");
    shared.shutdown.cancel();
    ptth_common::wait_for_tasks(&shared.tasks).await;
    // The tunnels' last lines, written before the program exits.
    let audit = shared.audit.clone();
    let _ = tokio::task::spawn_blocking(move || audit.flush(AUDIT_FLUSH_GRACE)).await;
}

/// Serves one TCP connection: its TLS handshake if configured, then HTTP until it ends or
/// shutdown is requested. The connection is closed once it has had no request in flight for
/// `http_idle_timeout`, counted from now: its first byte, its TLS handshake and its first request's
/// headers must all come within that time, whatever the protocol (a few bytes of the HTTP/2
/// preface, or an HTTP/2 connection that opens no stream, hold a slot no longer than silence).
///
/// The handshake and the HTTP connection are boxed, each in its own allocation: a connection
/// over HTTP/1.1 without TLS, for as long as it lasts, then holds only what that needs, rather
/// than room for the largest of the four (with and without TLS, before and after it).
async fn serve_connection(
    shared: Arc<Shared>,
    builder: auto::Builder<TrackedExecutor>,
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let idle_timeout = shared.config.http_idle_timeout;
    let activity = Activity::new();
    let first_deadline = tokio::time::Instant::now() + idle_timeout;
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(Peer(peer));
            let busy = activity.busy();
            let client_ip = access::client_addr(&shared, &req);
            let connect = req.uri().path().ends_with(CONNECT_SUFFIX);
            let answer = router.clone().oneshot(req);
            let shared = shared.clone();
            async move {
                let response = answer.await?;
                if let Some(refused) = response.extensions().get::<handlers::Refused>() {
                    shared.refused(response.status().as_u16(), refused, connect, client_ip);
                }
                Ok::<_, std::convert::Infallible>(
                    response.map(|body| Body::new(BusyBody::new(body, busy))),
                )
            }
        })
    };
    match tls {
        None => {
            let mut first = [0u8; 1];
            let started = tokio::select! {
                () = shutdown.cancelled() => return,
                r = tokio::time::timeout_at(first_deadline, stream.peek(&mut first)) => r,
            };
            match started {
                Ok(Ok(n)) if n > 0 => {
                    let io = TokioIo::new(stream);
                    Box::pin(serve_http(
                        builder,
                        io,
                        service,
                        &activity,
                        idle_timeout,
                        shutdown,
                    ))
                    .await
                }
                Ok(_) => {}
                Err(_) => debug!("nothing received within http_idle_timeout"),
            }
        }
        Some(tls) => {
            let handshake = tokio::select! {
                () = shutdown.cancelled() => return,
                r = tokio::time::timeout_at(first_deadline, Box::pin(tls.accept(stream))) => r,
            };
            match handshake {
                Ok(Ok(s)) => {
                    let io = TokioIo::new(s);
                    Box::pin(serve_http(
                        builder,
                        io,
                        service,
                        &activity,
                        idle_timeout,
                        shutdown,
                    ))
                    .await
                }
                Ok(Err(e)) => debug!(error = %e, "TLS handshake failed"),
                Err(_) => debug!("TLS handshake not done within http_idle_timeout"),
            }
        }
    }
}

/// Serves HTTP (HTTP/1.1 or HTTP/2) on `io` until it ends, shutdown is requested, or it has
/// had no request in flight for `idle_timeout`; the last two close it gracefully.
async fn serve_http<I, S>(
    builder: auto::Builder<TrackedExecutor>,
    io: I,
    service: S,
    activity: &Activity,
    idle_timeout: Duration,
    shutdown: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<axum::body::Body>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let idle = tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(error = %e, "HTTP connection ended with an error");
            }
            return;
        }
        () = shutdown.cancelled() => false,
        () = activity.idle_for(idle_timeout) => true,
    };
    conn.as_mut().graceful_shutdown();
    if idle {
        // No new request is taken from now on; one that came just before is served to its
        // end (a channel), and the connection ends with it.
        debug!("no request within http_idle_timeout; closing");
        activity.restart_idle();
        tokio::select! {
            _ = conn.as_mut() => {}
            () = activity.idle_for(HTTP_CLOSE_GRACE) => {}
        }
    } else {
        let _ = tokio::time::timeout(HTTP_CLOSE_GRACE, conn).await;
    }
}

/// Whether an HTTP connection has requests in flight (from their headers to the end of their
/// answer), and since when it has had none.
struct Activity {
    state: Mutex<ActivityState>,
    changed: Notify,
}

struct ActivityState {
    in_flight: usize,
    idle_since: tokio::time::Instant,
}

impl Activity {
    /// A connection accepted now, with no request yet.
    fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                idle_since: tokio::time::Instant::now(),
            }),
            changed: Notify::new(),
        })
    }

    /// A request has come: in flight until the returned guard is dropped.
    fn busy(self: &Arc<Self>) -> BusyGuard {
        self.state.lock().in_flight += 1;
        self.changed.notify_one();
        BusyGuard(self.clone())
    }

    /// Counts the time without a request in flight from now on.
    fn restart_idle(&self) {
        self.state.lock().idle_since = tokio::time::Instant::now();
        self.changed.notify_one();
    }

    /// Resolves once no request has been in flight for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let idle_since = {
                let state = self.state.lock();
                (state.in_flight == 0).then_some(state.idle_since)
            };
            match idle_since {
                None => changed.await,
                Some(since) => tokio::select! {
                    () = tokio::time::sleep_until(since + limit) => {
                        // A request may have come as the time ran out.
                        let state = self.state.lock();
                        if state.in_flight == 0 && state.idle_since == since {
                            return;
                        }
                    }
                    () = changed => {}
                },
            }
        }
    }
}

/// A request in flight on its connection (see [`Activity`]).
struct BusyGuard(Arc<Activity>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            state.idle_since = tokio::time::Instant::now();
        }
        drop(state);
        self.0.changed.notify_one();
    }
}

/// An answer's body, which keeps its request in flight until the body is done with.
struct BusyBody {
    body: Body,
    _busy: BusyGuard,
}

impl BusyBody {
    /// `body`, keeping `busy`'s request in flight.
    fn new(body: Body, busy: BusyGuard) -> Self {
        Self { body, _busy: busy }
    }
}

impl http_body::Body for BusyBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// HTTP connections open per untrusted source (see [`source`]).
type PerIpCounts = Mutex<HashMap<IpAddr, usize>>;

/// What an address's connections are counted under: an IPv4 address itself (IPv4-mapped IPv6
/// too), an IPv6 address by its /64 prefix, since one host (or one site) is usually given a
/// whole /64.
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u128::from(u64::MAX)))),
        },
    }
}

/// Counts one HTTP connection from an untrusted address for as long as it lives.
struct PerIp {
    counts: Arc<PerIpCounts>,
    ip: Option<IpAddr>,
}

impl PerIp {
    /// Takes a place for `ip`'s source, or `None` at its limit. Trusted proxies are not
    /// counted.
    fn enter(counts: &Arc<PerIpCounts>, shared: &Shared, ip: IpAddr) -> Option<Self> {
        if shared.config.trusted_proxies.iter().any(|c| c.contains(ip)) {
            return Some(Self {
                counts: counts.clone(),
                ip: None,
            });
        }
        let ip = source(ip);
        let mut map = counts.lock();
        let n = map.entry(ip).or_insert(0);
        if *n >= shared.config.max_http_connections_per_ip {
            return None;
        }
        *n += 1;
        Some(Self {
            counts: counts.clone(),
            ip: Some(ip),
        })
    }
}

impl Drop for PerIp {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut map = self.counts.lock();
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_count_by_their_64_prefix() {
        let source = |a: &str| source(a.parse().expect("address")).to_string();
        assert_eq!(source("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(source("2001:db8:1:2:ffff:ffff:ffff:ffff"), "2001:db8:1:2::");
        assert_eq!(source("2001:db8:1:3::1"), "2001:db8:1:3::");
        assert_eq!(source("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(source("192.0.2.7"), "192.0.2.7");
        assert_eq!(source("::1"), "::");
    }
}
