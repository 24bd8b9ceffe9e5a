//! `ptth_server`: offers local TCP services through a relay, dialing out only.
//!
//! The entry point is [`run`]: give it the configuration, the server's key and a cancellation
//! token, and await the [`Server`] it returns. For each configured port it keeps a pool of
//! `listen` long-polls open at the relay. When one is answered with a connection, its answer's
//! body is the upstream (the client's bytes); a task connects to the local service and carries
//! the tunnel with `ptth_common::tunnel::carry`, which sends the service's bytes as the
//! `downstream` upload (whose arrival tells the relay that the server took the connection), or
//! calls `refuse` if it cannot connect.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use ptth_common::config::ServerConfig;
//! use ptth_common::keys::PrivateKey;
//! use tokio_util::sync::CancellationToken;
//!
//! let text = "relay_url = \"http://127.0.0.1:4000\"\nname = \"db\"\nkey_file = \"db.key\"\n\
//!             [ports]\npostgres = \"127.0.0.1:5432\"\n";
//! let config = ServerConfig::from_str("server.toml".as_ref(), text)?;
//! let key = PrivateKey::generate()?; // PrivateKey::load(&config.key_file) in real use
//! let shutdown = CancellationToken::new();
//! let server = ptth_server::run(config, key, shutdown.clone())?;
//! let serving = tokio::spawn(server.into_future()); // retries until the relay answers
//! shutdown.cancel();
//! serving.await?;
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ptth_common::client::{
    Backoff, CallError, RelayClient, SetupError, Signed, call, connection_id, http_client,
};
use ptth_common::config::ServerConfig;
use ptth_common::keys::PrivateKey;
use ptth_common::protocol::{ConnId, downstream_path, listen_path, refuse_path};
use ptth_common::tunnel::{self, LocalSocket};
use reqwest::{Response, StatusCode};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

/// Upper bound on waiting for a `listen` answer, above any relay `listen_timeout` (at most
/// 60 s), so that a relay that vanished without closing the connection is noticed.
const LISTEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(90);
/// Upper bound on waiting for the answer to `refuse`.
const REFUSE_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Prepares the server proxy: await the returned [`Server`] to offer the configured ports
/// until `shutdown` is cancelled. Fails at once if the HTTP client cannot be set up (a bad
/// `ca_file`, say).
pub fn run(
    config: ServerConfig,
    key: PrivateKey,
    shutdown: CancellationToken,
) -> Result<Server, SetupError> {
    let http = http_client(&config.relay_url, config.ca_file.as_deref())?;
    let relay = RelayClient::new(http, config.relay_url.clone(), key);
    Ok(Server {
        ctx: Arc::new(Ctx {
            relay,
            slots: Arc::new(Semaphore::new(config.max_connections)),
            config,
            shutdown,
            tasks: TaskTracker::new(),
        }),
    })
}

/// A server proxy ready to run. Awaiting it keeps the `listen` pools open and serves tunnels
/// until shutdown, then closes the tunnels and waits (boundedly) for its tasks.
#[must_use = "a server proxy runs only when awaited"]
#[derive(Debug)]
pub struct Server {
    ctx: Arc<Ctx>,
}

impl IntoFuture for Server {
    type Output = ();
    type IntoFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(serve(self.ctx))
    }
}

/// What every task of the server proxy shares.
#[derive(Debug)]
struct Ctx {
    relay: RelayClient,
    config: ServerConfig,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// One per open tunnel, at most `max_connections`.
    slots: Arc<Semaphore>,
}

async fn serve(ctx: Arc<Ctx>) {
    info!(
        relay = %ctx.config.relay_url,
        server = %ctx.config.name,
        ports = ?ctx.config.ports.keys().collect::<Vec<_>>(),
        "server proxy started"
    );
    for (port, target) in &ctx.config.ports {
        for slot in 0..ctx.config.listen_pool {
            let span = info_span!("listen", port = %port, slot);
            ctx.tasks.spawn(
                listen_loop(
                    ctx.clone(),
                    port.as_str().to_owned(),
                    target.as_str().to_owned(),
                )
                .instrument(span),
            );
        }
    }
    ctx.shutdown.cancelled().await;
    info!("server proxy shutting down");
    ptth_common::drain(&ctx.tasks).await;
}

/// One slot of a port's `listen` pool: listens again at once after each answer, with backoff
/// after failures.
async fn listen_loop(ctx: Arc<Ctx>, port: String, target: String) {
    let path = listen_path(ctx.config.name.as_str(), &port);
    let mut backoff = Backoff::new(ctx.config.max_backoff);
    let mut failing = false;
    let mut need_warm_up = true;
    // The next listen, signed while this one waits.
    let mut next = ctx.relay.sign(path.clone());
    loop {
        let problem = match listen_once(&ctx, &mut next, need_warm_up).await {
            Ok(handed) => {
                if failing {
                    info!("connected to the relay again");
                }
                failing = false;
                need_warm_up = false;
                backoff.reset();
                if let Some((id, download)) = handed {
                    spawn_tunnel(&ctx, &port, &target, id, download);
                    // The new tunnel starts first; the next listen waits its turn.
                    tokio::task::yield_now().await;
                }
                continue;
            }
            Err(CallError::Cancelled) => return,
            Err(problem) => problem,
        };
        need_warm_up = true;
        let delay = backoff.next_delay();
        if failing {
            debug!(retry_in = ?delay, "{problem}");
        } else {
            warn!(retry_in = ?delay, "{problem}");
            failing = true;
        }
        tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One `listen` (after opening the connection to the relay first when `warm_up`), sent with
/// the signature in `next`, which is replaced by the next listen's while this one waits: a
/// connection for a client (its ID, and the answer that streams its upstream), or `None` for an
/// empty answer.
async fn listen_once(
    ctx: &Ctx,
    next: &mut Signed,
    warm_up: bool,
) -> Result<Option<(ConnId, Response)>, CallError> {
    if warm_up {
        // One connection first, then every listen shares it (HTTP/2).
        tokio::select! {
            () = ctx.shutdown.cancelled() => return Err(CallError::Cancelled),
            r = ctx.relay.warm_up() => r.map_err(CallError::Unreachable)?,
        }
    }
    let answer = call(
        ctx.relay.post_signed(next.clone()),
        &[StatusCode::OK, StatusCode::NO_CONTENT],
        LISTEN_REQUEST_TIMEOUT,
        &ctx.shutdown,
    );
    // Signed once this listen is on its way (the yield lets the HTTP client send it).
    let sign_next = async {
        tokio::task::yield_now().await;
        ctx.relay.sign(next.path().to_owned())
    };
    let (answer, after) = tokio::join!(biased; answer, sign_next);
    *next = after;
    let answer = answer?;
    if answer.status() == StatusCode::NO_CONTENT {
        return Ok(None);
    }
    match connection_id(&answer) {
        Some(id) => Ok(Some((id, answer))),
        None => Err(CallError::Refused {
            status: answer.status(),
            reason: "a listen answer without a valid connection id".to_owned(),
        }),
    }
}

/// Starts the task of one connection handed over by a `listen`, within `max_connections`.
fn spawn_tunnel(ctx: &Arc<Ctx>, port: &str, target: &str, id: ConnId, download: Response) {
    let span = info_span!("conn", conn = %id, port = %port);
    let permit = ctx.slots.clone().try_acquire_owned();
    let task_ctx = ctx.clone();
    let target = target.to_owned();
    ctx.tasks.spawn(
        async move {
            let Ok(_permit) = permit else {
                warn!("too many open tunnels (max_connections); refusing");
                refuse(&task_ctx, id).await;
                return;
            };
            serve_connection(&task_ctx, id, &target, download).await;
        }
        .instrument(span),
    );
}

/// Tells the relay that this connection cannot be served (`refuse`).
async fn refuse(ctx: &Ctx, id: ConnId) {
    let request = ctx.relay.post(&refuse_path(ctx.config.name.as_str(), id));
    let answer = call(
        request,
        &[StatusCode::NO_CONTENT],
        REFUSE_REQUEST_TIMEOUT,
        &ctx.shutdown,
    );
    if let Err(e) = answer.await {
        debug!(error = %e, "could not report the refusal to the relay");
    }
}

/// Connects to the local service, then carries the tunnel: `download` (the `listen` answer)
/// brings the upstream, and the `downstream` upload, which tells the relay that the connection
/// is taken, starts at once.
async fn serve_connection(ctx: &Arc<Ctx>, id: ConnId, target: &str, download: Response) {
    let connect = tokio::time::timeout(ctx.config.connect_timeout, TcpStream::connect(target));
    // The `downstream` is signed while the TCP handshake is under way: the connect is polled
    // (and its SYN sent) first.
    let sign = async {
        ctx.relay
            .sign(downstream_path(ctx.config.name.as_str(), id))
    };
    let opening = async { tokio::join!(biased; connect, sign) };
    let (connected, upload) = tokio::select! {
        () = ctx.shutdown.cancelled() => return,
        r = opening => r,
    };
    let stream = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!(%target, error = %e, "cannot connect to the local service");
            return refuse(ctx, id).await;
        }
        Err(_) => {
            warn!(%target, timeout = ?ctx.config.connect_timeout, "connecting to the local service timed out");
            return refuse(ctx, id).await;
        }
    };
    let _ = stream.set_nodelay(true);
    // Until the tunnel is open, any way out is a failure: the service then sees a reset, not a
    // client that connected and said nothing.
    let socket = LocalSocket::new(stream);
    debug!("tunnel open");
    tunnel::carry(
        &ctx.relay,
        upload,
        std::future::ready(Some(download)),
        socket,
        ctx.config.heartbeat_interval,
        &ctx.shutdown,
    )
    .await;
}
