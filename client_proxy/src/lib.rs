//! `ptth_proxy`: forwards local TCP ports to services offered through a relay.
//!
//! The entry point is [`run`]: give it one bound listener per `[[forwards]]` entry, the
//! configuration, the client's key and a cancellation token, and await the [`Proxy`] it
//! returns. Each accepted local connection gets a fresh connection ID and becomes a `connect`
//! (its answer brings the downstream, the service's bytes) and, at the same time, an
//! `upstream` upload of the user's bytes: `ptth_common::tunnel::carry` runs both.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use ptth_common::config::ProxyConfig;
//! use ptth_common::keys::PrivateKey;
//! use tokio::net::TcpListener;
//! use tokio_util::sync::CancellationToken;
//!
//! let text = "relay_url = \"http://127.0.0.1:4000\"\nkey_file = \"alice.key\"\n\
//!             [[forwards]]\nlisten = \"127.0.0.1:0\"\nserver = \"db\"\nport = \"postgres\"\n";
//! let config = ProxyConfig::from_str("proxy.toml".as_ref(), text)?;
//! let key = PrivateKey::generate()?; // PrivateKey::load(&config.key_file) in real use
//! let listener = TcpListener::bind(config.forwards[0].listen).await?;
//! let shutdown = CancellationToken::new();
//! let proxy = ptth_proxy::run(vec![listener], config, key, shutdown.clone())?;
//! let local = proxy.local_addrs()[0]; // where to point psql
//! let serving = tokio::spawn(proxy.into_future());
//! assert_ne!(local.port(), 0);
//! shutdown.cancel();
//! serving.await?;
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ptth_common::client::{
    CallError, RelayClient, SetupError, Signed, call, connection_id, http_client,
};
use ptth_common::config::{Forward, ProxyConfig};
use ptth_common::keys::PrivateKey;
use ptth_common::protocol::{CONNECTION_ID_HEADER, ConnId, connect_path, upstream_path};
use ptth_common::tunnel::{self, LocalSocket};
use reqwest::StatusCode;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

/// Upper bound on waiting for the answer headers of `connect` (the relay answers within its
/// `accept_timeout`, at most 60 s).
const CONNECT_REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

/// Prepares the proxy on `listeners`, one per entry of `config.forwards` and in the same
/// order: await the returned [`Proxy`] to forward until `shutdown` is cancelled. Fails at once
/// if the counts differ or the HTTP client cannot be set up (a bad `ca_file`, say).
pub fn run(
    listeners: Vec<TcpListener>,
    config: ProxyConfig,
    key: PrivateKey,
    shutdown: CancellationToken,
) -> Result<Proxy, SetupError> {
    if listeners.len() != config.forwards.len() {
        return Err(SetupError::Listeners {
            forwards: config.forwards.len(),
            listeners: listeners.len(),
        });
    }
    let http = http_client(&config.relay_url, config.ca_file.as_deref())?;
    let relay = RelayClient::new(http, config.relay_url.clone(), key);
    let forwards = listeners
        .into_iter()
        .zip(config.forwards.iter().cloned())
        .map(|(listener, forward)| {
            let local = listener.local_addr()?;
            Ok((listener, local, forward))
        })
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(SetupError::Listener)?;
    Ok(Proxy {
        forwards,
        ctx: Arc::new(Ctx {
            relay,
            slots: Arc::new(Semaphore::new(config.max_connections)),
            config,
            shutdown,
            tasks: TaskTracker::new(),
        }),
    })
}

/// A proxy ready to forward. Awaiting it accepts local connections and carries their tunnels
/// until shutdown, then closes the tunnels and waits (boundedly) for its tasks.
#[must_use = "a proxy forwards only when awaited"]
#[derive(Debug)]
pub struct Proxy {
    forwards: Vec<(TcpListener, SocketAddr, Forward)>,
    ctx: Arc<Ctx>,
}

impl Proxy {
    /// The local address of each forward, in the order of `config.forwards`.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.forwards.iter().map(|(_, local, _)| *local).collect()
    }
}

impl IntoFuture for Proxy {
    type Output = ();
    type IntoFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(serve(self.ctx, self.forwards))
    }
}

/// What every task of the proxy shares.
#[derive(Debug)]
struct Ctx {
    relay: RelayClient,
    config: ProxyConfig,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// One per open tunnel, at most `max_connections`.
    slots: Arc<Semaphore>,
}

async fn serve(ctx: Arc<Ctx>, forwards: Vec<(TcpListener, SocketAddr, Forward)>) {
    // Open the connection to the relay before the first user does, so that tunnels opened
    // at once share it (HTTP/2); a failure here is only logged: each connect retries.
    let warm = ctx.clone();
    ctx.tasks.spawn(async move {
        tokio::select! {
            () = warm.shutdown.cancelled() => {}
            r = warm.relay.warm_up() => if let Err(problem) = r {
                warn!("{problem}");
            }
        }
    });
    for (listener, local, fwd) in forwards {
        info!(listen = %local, server = %fwd.server, port = %fwd.port, relay = %ctx.config.relay_url, "forwarding");
        let span = info_span!("forward", listen = %local, server = %fwd.server, port = %fwd.port);
        ctx.tasks
            .spawn(accept_loop(ctx.clone(), listener, fwd).instrument(span));
    }
    ctx.shutdown.cancelled().await;
    info!("proxy shutting down");
    ptth_common::drain(&ctx.tasks).await;
}

/// What a tunnel needs from the proxy before its local connection arrives: a connection ID and
/// its `connect` and `upstream` calls, signed ahead of time, so that a new connection waits
/// for no signing.
#[derive(Debug)]
struct Prepared {
    id: ConnId,
    connect: Signed,
    upstream: Signed,
}

impl Prepared {
    /// A fresh ID and both calls signed for it; fails only if the random source does.
    fn new(relay: &RelayClient, fwd: &Forward) -> std::io::Result<Self> {
        let id = ConnId::random()?;
        Ok(Self {
            id,
            connect: relay.sign(connect_path(fwd.server.as_str(), fwd.port.as_str())),
            upstream: relay.sign(upstream_path(fwd.server.as_str(), id)),
        })
    }
}

/// Accepts local connections of one forward, one task each, within `max_connections`. The
/// next tunnel's calls are signed while the loop waits.
async fn accept_loop(ctx: Arc<Ctx>, listener: TcpListener, fwd: Forward) {
    let fwd = Arc::new(fwd);
    let mut next = None;
    loop {
        if next.is_none() {
            next = match Prepared::new(&ctx.relay, &fwd) {
                Ok(p) => Some(p),
                Err(e) => {
                    error!(error = %e, "no connection id: the random source failed");
                    None
                }
            };
        }
        let (stream, peer) = tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Until its tunnel is open, any way out is a failure: the socket is then reset, as a
        // refused connection would be, rather than closed as if the service had nothing to
        // say.
        let _ = stream.set_nodelay(true);
        let socket = LocalSocket::new(stream);
        let Ok(permit) = ctx.slots.clone().try_acquire_owned() else {
            warn!(%peer, "too many open tunnels (max_connections); resetting the new connection");
            continue;
        };
        let Some(prepared) = next.take() else {
            continue;
        };
        let span = info_span!("conn", %peer, conn = %prepared.id);
        let task_ctx = ctx.clone();
        let task_fwd = fwd.clone();
        ctx.tasks.spawn(
            async move {
                let _permit = permit;
                serve_connection(&task_ctx, &task_fwd, socket, prepared).await;
            }
            .instrument(span),
        );
        // The new tunnel sends its calls first; the next one's are signed after.
        tokio::task::yield_now().await;
    }
}

/// What a refused `connect` most likely means, for the user.
fn explain(status: StatusCode) -> &'static str {
    match status {
        StatusCode::SERVICE_UNAVAILABLE => "server offline (or relay busy)",
        StatusCode::NOT_FOUND => "unknown port: the server does not offer it",
        StatusCode::BAD_GATEWAY => "the server could not connect to its target (refused)",
        StatusCode::FORBIDDEN => "not allowed: this client's allow list does not grant the port",
        StatusCode::GATEWAY_TIMEOUT => "the server did not take the connection in time",
        StatusCode::UNAUTHORIZED => {
            "the relay refused our signature (key not configured there, or clocks differ)"
        }
        _ => "unexpected answer from the relay",
    }
}

/// Opens a tunnel for one local connection and carries it: the `upstream` goes out at once,
/// beside the `connect` whose answer brings the downstream.
async fn serve_connection(ctx: &Ctx, fwd: &Forward, socket: LocalSocket, prepared: Prepared) {
    let (server, port) = (fwd.server.as_str(), fwd.port.as_str());
    let Prepared {
        id,
        connect,
        upstream,
    } = prepared;
    let request = ctx
        .relay
        .post_signed(connect)
        .header(CONNECTION_ID_HEADER, id.to_string());
    let connected = async {
        let answer = call(
            request,
            &[StatusCode::OK],
            CONNECT_REQUEST_TIMEOUT,
            &ctx.shutdown,
        );
        match answer.await {
            Ok(download) if connection_id(&download) == Some(id) => {
                debug!("tunnel open");
                Some(download)
            }
            Ok(_) => {
                error!("relay answered connect without our connection id");
                None
            }
            Err(CallError::Cancelled) => None,
            Err(CallError::Refused { status, reason }) => {
                error!(%status, %reason, "connect to {server}/{port} failed: {}", explain(status));
                None
            }
            Err(e) => {
                error!("connect to {server}/{port} failed: {e}");
                None
            }
        }
    };
    tunnel::carry(
        &ctx.relay,
        upstream,
        connected,
        socket,
        ctx.config.heartbeat_interval,
        &ctx.shutdown,
    )
    .await;
}
