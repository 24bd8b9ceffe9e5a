//! `ptth_relay`: pairs clients with servers and splices their streaming HTTP bodies.
//!
//! * [`run`] serves the relay on an already bound listener until a cancellation token fires.
//! * `handlers`: the five endpoints (`listen`, `accept`, `downstream`, `connect`, `upstream`).
//! * `pipe`: the body that hands an upload request body to a download response, unchanged.
//! * `state`: listening ports, open connections, and the per-connection reaper task.
//!
//! The relay never opens a TCP connection to a service: it only answers HTTP.

mod handlers;
mod pipe;
mod state;

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
use tracing::{Instrument, debug, info, info_span, warn};

use crate::state::Shared;

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
#[derive(Debug)]
pub struct Relay {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

impl Relay {
    /// A relay with `config`, stopping when `shutdown` is cancelled.
    pub fn new(config: RelayConfig, shutdown: CancellationToken) -> Self {
        let shared = Arc::new(Shared::new(config, shutdown.child_token()));
        Self { shared, shutdown }
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
    pub async fn serve(self, listener: TcpListener) -> std::io::Result<()> {
        serve(self.shared, listener, self.shutdown).await
    }
}

/// Serves a relay with `config` on `listener` until `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    config: RelayConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    Relay::new(config, shutdown).serve(listener).await
}

async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let config = &shared.config;
    info!(
        address = %local,
        servers = config.servers.len(),
        clients = config.clients.len(),
        "relay listening"
    );
    if config.authorities.is_empty() {
        debug!("no `authorities` configured: signatures are checked against the Host header");
    }
    let service = TowerToHyperService::new(router(shared.clone()));
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
    loop {
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
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "set_nodelay failed");
        }
        let builder = builder.clone();
        let service = service.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(
            async move {
                let conn = builder.serve_connection(TokioIo::new(stream), service);
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
            .instrument(info_span!("http", %peer)),
        );
    }
    info!("relay shutting down");
    shared.shutdown.cancel();
    tracker.close();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE * 2, tracker.wait()).await;
    Ok(())
}
