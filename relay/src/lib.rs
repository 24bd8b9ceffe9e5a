//! `ptth_relay`: pairs clients with servers and splices their streaming HTTP bodies.
//!
//! * [`run`] serves the relay on an already bound listener until a cancellation token fires.
//! * `handlers`: the five endpoints (`listen`, `accept`, `downstream`, `connect`, `upstream`).
//! * `pipe`: the body that hands an upload request body to a download response, unchanged.
//! * `state`: listening ports, open connections, and the per-connection reaper task.
//! * `tls`: optional HTTPS termination (rustls with the `ring` provider, ALPN h2 and http/1.1).
//!
//! The relay never opens a TCP connection to a service: it only answers HTTP.

mod handlers;
mod pipe;
mod state;
mod tls;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use ptth_common::config::RelayConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::state::Shared;

/// Time allowed for a TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time given to open HTTP connections to finish after shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Builds the router of the relay's HTTP API.
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/v1/servers/{server}/ports/{port}/listen",
            post(handlers::listen),
        )
        .route(
            "/v1/servers/{server}/ports/{port}/connect",
            post(handlers::connect),
        )
        .route(
            "/v1/servers/{server}/connections/{id}/accept",
            post(handlers::accept),
        )
        .route(
            "/v1/servers/{server}/connections/{id}/downstream",
            post(handlers::downstream),
        )
        .route(
            "/v1/servers/{server}/connections/{id}/upstream",
            post(handlers::upstream),
        )
        .with_state(shared)
}

/// A relay: its state, ready to serve on a listener.
pub struct Relay {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a relay cannot start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The TLS certificate or key is unusable.
    #[error("{0}")]
    Tls(String),
    /// The listener failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Relay {
    /// A relay with `config`, stopping when `shutdown` is cancelled. Fails if the TLS
    /// certificate or key cannot be used.
    pub fn new(config: RelayConfig, shutdown: CancellationToken) -> Result<Self, RelayError> {
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
            _ => None,
        };
        let shared = Arc::new(Shared::new(config, shutdown.child_token()));
        Ok(Self {
            shared,
            shutdown,
            tls,
        })
    }

    /// Watches the number of connections (pending or open) the relay holds state for.
    pub fn connections(&self) -> tokio::sync::watch::Receiver<usize> {
        self.shared.conn_count.subscribe()
    }

    /// Watches the number of `listen` requests waiting for a client.
    pub fn listens(&self) -> tokio::sync::watch::Receiver<usize> {
        self.shared.listen_count.subscribe()
    }

    /// Serves on `listener` until the shutdown token is cancelled, then closes every tunnel,
    /// gives open HTTP connections a short grace period and returns.
    pub async fn serve(self, listener: TcpListener) -> Result<(), RelayError> {
        serve(self.shared, listener, self.shutdown, self.tls).await
    }
}

/// Serves a relay with `config` on `listener` until `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    config: RelayConfig,
    shutdown: CancellationToken,
) -> Result<(), RelayError> {
    Relay::new(config, shutdown)?.serve(listener).await
}

async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    shutdown: CancellationToken,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Result<(), RelayError> {
    let local = listener.local_addr()?;
    let config = &shared.config;
    info!(
        address = %local,
        servers = config.servers.len(),
        clients = config.clients.len(),
        tls = tls.is_some(),
        "relay listening"
    );
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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(256 * 1024)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .max_concurrent_streams(65_536)
        .max_header_list_size(16 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    let tracker = TaskTracker::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(config.max_http_connections));
    let per_ip_counts: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> =
        Arc::default();
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
            debug!(%peer, "too many HTTP connections from this address; refused");
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "set_nodelay failed");
        }
        let builder = builder.clone();
        let service = TowerToHyperService::new(router.clone().map_request(
            move |mut req: http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(handlers::Peer(peer));
                req
            },
        ));
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        tracker.spawn(
            async move {
                let _permit = permit;
                let _per_ip = per_ip;
                match tls {
                    None => {
                        // A client that connects and stays silent holds a slot: it gets the
                        // same time to start as a TLS client gets for its handshake.
                        let mut first = [0u8; 1];
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, stream.peek(&mut first))
                            .await
                        {
                            Ok(Ok(n)) if n > 0 => {
                                serve_http(builder, TokioIo::new(stream), service, shutdown).await
                            }
                            Ok(_) => {}
                            Err(_) => debug!("no request within the first-byte timeout"),
                        }
                    }
                    Some(tls) => {
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(stream)).await
                        {
                            Ok(Ok(s)) => {
                                serve_http(builder, TokioIo::new(s), service, shutdown).await
                            }
                            Ok(Err(e)) => debug!(error = %e, "TLS handshake failed"),
                            Err(_) => debug!("TLS handshake timed out"),
                        }
                    }
                }
            }
            .instrument(info_span!("http", %peer)),
        );
    }
    info!("relay shutting down");
    shared.shutdown.cancel();
    tracker.close();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE * 2, tracker.wait()).await;
    Ok(())
}

/// Serves one HTTP connection (HTTP/1.1 or HTTP/2) until it ends or shutdown is requested.
async fn serve_http<I, S>(
    builder: auto::Builder<TokioExecutor>,
    io: I,
    service: S,
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
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(error = %e, "HTTP connection ended with an error");
            }
        }
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
    }
}

/// Counts one HTTP connection from an untrusted address for as long as it lives.
struct PerIp {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: Option<std::net::IpAddr>,
}

impl PerIp {
    /// Takes a place for `ip`, or `None` at its limit. Trusted proxies are not counted.
    fn enter(
        counts: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        shared: &Shared,
        ip: std::net::IpAddr,
    ) -> Option<Self> {
        if shared.config.trusted_proxies.iter().any(|c| c.contains(ip)) {
            return Some(Self {
                counts: counts.clone(),
                ip: None,
            });
        }
        let mut map = state::lock(counts);
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
            let mut map = state::lock(&self.counts);
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
    }
}
