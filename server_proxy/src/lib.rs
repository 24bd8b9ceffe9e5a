//! `ptth_server`: offers local TCP services through a relay, dialing out only.
//!
//! The entry point is [`run`]: give it the configuration, the server's key and a cancellation
//! token, and await the [`Server`] it returns. For each configured port it keeps `listen_pool`
//! idle channels open at the relay (`listen` and `downstream`, see `ptth_common::channel`).
//! When the relay gives a channel a connection (`OPEN` on its download, followed by the
//! client's bytes), the server connects to the local service and carries the connection on
//! that channel, or refuses it (`FAILED`) if it cannot connect; another channel is opened
//! meanwhile, and the channel stays open for the next connection.
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
use std::sync::atomic::{AtomicUsize, Ordering};

use ptth_common::channel::{Channel, ChannelError, LocalSocket};
use ptth_common::client::{Backoff, RelayClient, SetupError};
use ptth_common::config::{Name, ServerConfig, Target};
use ptth_common::keys::PrivateKey;
use ptth_common::protocol::{downstream_path, listen_path};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

/// Prepares the server proxy: await the returned [`Server`] to offer the configured ports
/// until `shutdown` is cancelled. Fails at once if the HTTP client cannot be set up (a bad
/// `ca_file`, say).
pub fn run(
    config: ServerConfig,
    key: PrivateKey,
    shutdown: CancellationToken,
) -> Result<Server, SetupError> {
    let tasks = TaskTracker::new();
    let relay = RelayClient::new(
        config.relay_url.clone(),
        config.ca_file.as_deref(),
        key,
        tasks.clone(),
    )?;
    Ok(Server {
        ctx: Arc::new(Ctx {
            relay,
            slots: Arc::new(Semaphore::new(config.max_connections)),
            config,
            shutdown,
            tasks,
        }),
    })
}

/// A server proxy ready to run. Awaiting it keeps the ports' channels open and carries
/// connections until shutdown, then closes the channels and waits (boundedly) for its tasks.
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

/// One port's idle channels.
#[derive(Debug)]
struct Pool {
    port: Name,
    target: Target,
    /// Channels open and carrying no connection.
    idle: AtomicUsize,
    /// Told when the pool may be short of idle channels.
    short: Notify,
}

async fn serve(ctx: Arc<Ctx>) {
    info!(
        relay = %ctx.config.relay_url,
        server = %ctx.config.name,
        ports = ?ctx.config.ports.keys().collect::<Vec<_>>(),
        "server proxy started"
    );
    for (port, target) in &ctx.config.ports {
        let pool = Arc::new(Pool {
            port: port.clone(),
            target: target.clone(),
            idle: AtomicUsize::new(0),
            short: Notify::new(),
        });
        let span = info_span!("port", port = %port);
        ctx.tasks.spawn(fill(ctx.clone(), pool).instrument(span));
    }
    ctx.shutdown.cancelled().await;
    info!("server proxy shutting down");
    ctx.relay.close().await;
    ptth_common::drain(&ctx.tasks).await;
}

/// Keeps `listen_pool` idle channels open for the port, retrying with backoff while the relay
/// cannot be reached or refuses them.
async fn fill(ctx: Arc<Ctx>, pool: Arc<Pool>) {
    let mut backoff = Backoff::new(ctx.config.max_backoff);
    loop {
        while pool.idle.load(Ordering::Acquire) >= ctx.config.listen_pool {
            tokio::select! {
                () = ctx.shutdown.cancelled() => return,
                () = pool.short.notified() => {}
            }
        }
        let opened = match open_channel(&ctx, &pool.port) {
            Some(mut channel) => channel.ready(&ctx.shutdown).await.map(|()| channel),
            None => return,
        };
        match opened {
            Ok(channel) => {
                backoff.succeeded();
                pool.idle.fetch_add(1, Ordering::AcqRel);
                let span = info_span!("channel", channel = %channel.id());
                ctx.tasks
                    .spawn(run_channel(ctx.clone(), pool.clone(), channel).instrument(span));
            }
            Err(ChannelError::Cancelled) => return,
            Err(problem) => {
                if !backoff.retry_after(&problem, &ctx.shutdown).await {
                    return;
                }
            }
        }
    }
}

/// A new channel for `port`: its `listen` and `downstream` (not sent before it is polled);
/// `None` if the random source fails.
fn open_channel(ctx: &Ctx, port: &Name) -> Option<Channel> {
    let name = ctx.config.name.as_str();
    let opened = Channel::open(
        &ctx.relay,
        &listen_path(name, port.as_str()),
        |id| downstream_path(name, id),
        ctx.config.heartbeat_interval,
    );
    opened
        .inspect_err(|e| error!(error = %e, "no channel id: the random source failed"))
        .ok()
}

/// Serves the connections the relay gives `channel`, one after the other, until it breaks or
/// the pool has idle channels enough (then it is retired). `channel` is counted idle.
async fn run_channel(ctx: Arc<Ctx>, pool: Arc<Pool>, mut channel: Channel) {
    let mut given_already = false;
    loop {
        let given = if given_already {
            Ok(())
        } else {
            // Boxed, as `carry` below: a task's future is as large as the largest it awaits in
            // place, for as long as the task lives.
            Box::pin(channel.idle(&ctx.shutdown)).await
        };
        given_already = false;
        pool.idle.fetch_sub(1, Ordering::AcqRel);
        pool.short.notify_one();
        match given {
            Ok(()) => {}
            Err(ChannelError::Cancelled) => return,
            Err(e) if e.is_front_problem() => {
                warn!(error = %e, "channel closed");
                return;
            }
            Err(e) => {
                debug!(error = %e, "channel closed");
                return;
            }
        }
        let Ok(_permit) = ctx.slots.clone().try_acquire_owned() else {
            warn!("too many open tunnels (max_connections); refusing");
            channel.refuse("the server is at its max_connections").await;
            return;
        };
        let target = pool.target.as_str();
        let connect = tokio::time::timeout(ctx.config.connect_timeout, TcpStream::connect(target));
        let connected = tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            r = connect => r,
        };
        let stream = match connected {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                warn!(%target, error = %e, "cannot connect to the local service");
                channel.refuse(&format!("{target}: {e}")).await;
                return;
            }
            Err(_) => {
                warn!(%target, timeout = ?ctx.config.connect_timeout, "connecting to the local service timed out");
                channel
                    .refuse(&format!(
                        "{target}: no answer within {:?}",
                        ctx.config.connect_timeout
                    ))
                    .await;
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        // Until it is carried, any way out is a failure: the service then sees a reset, not a
        // client that connected and said nothing.
        let Some(started) = channel.start(LocalSocket::new(stream)) else {
            return;
        };
        debug!("connection open");
        match Box::pin(channel.carry(started, false, &ctx.shutdown)).await {
            Ok(()) => debug!("connection closed"),
            Err(ChannelError::Cancelled) => return,
            Err(e) if e.is_front_problem() => {
                warn!(error = %e, "connection aborted");
                return;
            }
            Err(e) => {
                info!(error = %e, "connection aborted");
                return;
            }
        }
        // Idle again: kept unless the pool has idle channels enough (twice `listen_pool`, so
        // that connections one after another reuse channels instead of opening new ones).
        pool.idle.fetch_add(1, Ordering::AcqRel);
        if channel.worn() || pool.idle.load(Ordering::Acquire) > 2 * ctx.config.listen_pool {
            // The relay may have given it a connection just before: then it serves that one.
            given_already = channel.retire(&ctx.shutdown).await;
            if !given_already {
                pool.idle.fetch_sub(1, Ordering::AcqRel);
                pool.short.notify_one();
                return;
            }
        }
    }
}
