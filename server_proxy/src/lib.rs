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
//! let key = PrivateKey::generate()?; // in real use: key_file, PTTH_KEY or --key-fd (cli::EndpointArgs::load_key)
//! let shutdown = CancellationToken::new();
//! let server = ptth_server::run(config, key, shutdown.clone())?;
//! let serving = tokio::spawn(server.into_future()); // retries until the relay answers
//! shutdown.cancel();
//! serving.await?;
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use ptth_common::channel::{Channel, ChannelError, LocalSocket};
use ptth_common::client::{Backoff, RelayClient, SetupError};
use ptth_common::config::{Name, ServerConfig, Target};
use ptth_common::keys::PrivateKey;
use ptth_common::metrics::{EndpointMetrics, PortLabels};
use ptth_common::protocol::{downstream_path, listen_path};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
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
            draining: shutdown.child_token(),
            config,
            shutdown,
            tasks,
            metrics: EndpointMetrics::default(),
            pools: Mutex::new(Pools::default()),
        }),
        admin: None,
    })
}

/// A server proxy ready to run. Awaiting it keeps the ports' channels open and carries
/// connections until shutdown, then closes the channels and waits (boundedly) for its tasks.
#[must_use = "a server proxy runs only when awaited"]
#[derive(Debug)]
pub struct Server {
    ctx: Arc<Ctx>,
    admin: Option<TcpListener>,
}

impl Server {
    /// Also serves, on `listener`, the admin listener: `/metrics` (see
    /// `ptth_common::admin`).
    pub fn with_admin(mut self, listener: TcpListener) -> Self {
        self.admin = Some(listener);
        self
    }

    /// A handle to drain or reload the server proxy while it runs.
    pub fn control(&self) -> Control {
        Control {
            ctx: self.ctx.clone(),
        }
    }

    /// Watches the number of tunnels open.
    pub fn tunnels(&self) -> watch::Receiver<usize> {
        self.ctx.metrics.tunnels_now()
    }
}

impl IntoFuture for Server {
    type Output = ();
    type IntoFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(serve(self.ctx, self.admin))
    }
}

/// Drains or reloads a running server proxy (see [`Server::control`]).
#[derive(Debug, Clone)]
pub struct Control {
    ctx: Arc<Ctx>,
}

impl Control {
    /// Drains, then shuts down: no new channel is opened and idle ones are retired; open
    /// tunnels go on until they end, for at most `drain_grace`; then the server proxy shuts
    /// down as when its shutdown token is cancelled. Resolves once shutdown has begun.
    pub async fn drain(&self) {
        let ctx = &self.ctx;
        ctx.draining.cancel();
        ptth_common::wait_for_tunnels(ctx.metrics.tunnels_now(), ctx.config.drain_grace).await;
        ctx.shutdown.cancel();
    }

    /// Reads the configuration file `path` again and applies its ports (see
    /// [`Control::reload`]); a file that does not load is logged, with its line, and the
    /// configuration in force stays.
    pub fn reload_from(&self, path: &Path) {
        match ServerConfig::load(path) {
            Ok(config) => self.reload(config),
            Err(e) => error!(
                error = %e,
                "configuration not reloaded; the one in force stays"
            ),
        }
    }

    /// Applies `config`'s ports: a port no longer offered is closed with its tunnels, a new
    /// one is offered, a port whose target changed sends its next connections to the new
    /// target (open tunnels go on). Other settings take effect at the next start (a warning
    /// names those that changed).
    pub fn reload(&self, config: ServerConfig) {
        let ctx = &self.ctx;
        let old = &ctx.config;
        let restart_needed: Vec<&str> = [
            (
                "relay_url",
                old.relay_url.to_string() != config.relay_url.to_string(),
            ),
            ("name", old.name != config.name),
            ("key_file", old.key_file != config.key_file),
            ("ca_file", old.ca_file != config.ca_file),
            ("listen_pool", old.listen_pool != config.listen_pool),
            (
                "channel_max_age",
                old.channel_max_age != config.channel_max_age,
            ),
            (
                "heartbeat_interval",
                old.heartbeat_interval != config.heartbeat_interval,
            ),
            (
                "connect_timeout",
                old.connect_timeout != config.connect_timeout,
            ),
            ("max_backoff", old.max_backoff != config.max_backoff),
            (
                "max_connections",
                old.max_connections != config.max_connections,
            ),
            ("admin_listen", old.admin_listen != config.admin_listen),
            ("drain_grace", old.drain_grace != config.drain_grace),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect();
        if !restart_needed.is_empty() {
            warn!(settings = ?restart_needed, "these settings changed; they take effect at the next start");
        }
        let (mut added, mut removed, mut retargeted) = (Vec::new(), Vec::new(), Vec::new());
        {
            let mut pools = ctx.pools.lock();
            let pools = pools.offered(ctx);
            pools.retain(|port, pool| {
                if config.ports.contains_key(port) {
                    return true;
                }
                let tunnels = ctx.metrics.tunnels_of(&pool.labels);
                warn!(port = %port, tunnels, "port no longer offered: closing it and its tunnels");
                pool.closed.cancel();
                removed.push(port.to_string());
                false
            });
            for (port, target) in &config.ports {
                match pools.get(port) {
                    Some(pool) => {
                        let mut current = pool.target.lock();
                        if *current != *target {
                            info!(port = %port, from = %current, to = %target, "port retargeted: new connections go to the new target");
                            *current = target.clone();
                            retargeted.push(port.to_string());
                        }
                    }
                    None => {
                        added.push(port.to_string());
                        pools.insert(port.clone(), offer(ctx, port, target));
                    }
                }
            }
        }
        info!(?added, ?removed, ?retargeted, "configuration reloaded");
    }
}

/// What every task of the server proxy shares.
#[derive(Debug)]
struct Ctx {
    relay: RelayClient,
    /// The configuration it started with (a reload changes only the ports, in `pools`).
    config: ServerConfig,
    shutdown: CancellationToken,
    /// Cancelled when the server proxy drains: no new channel, idle ones retired.
    draining: CancellationToken,
    tasks: TaskTracker,
    /// One per open tunnel, at most `max_connections`.
    slots: Arc<Semaphore>,
    metrics: EndpointMetrics,
    /// The ports offered now.
    pools: Mutex<Pools>,
}

/// The ports offered, by name, once the configured ones have been.
#[derive(Debug, Default)]
struct Pools {
    by_port: BTreeMap<Name, Arc<Pool>>,
    /// Whether the configured ports have been offered (a reload that comes first offers them
    /// before it applies its own).
    started: bool,
}

impl Pools {
    /// The pools, after offering the configured ports if that has not been done.
    fn offered(&mut self, ctx: &Arc<Ctx>) -> &mut BTreeMap<Name, Arc<Pool>> {
        if !self.started {
            self.started = true;
            for (port, target) in &ctx.config.ports {
                self.by_port.insert(port.clone(), offer(ctx, port, target));
            }
        }
        &mut self.by_port
    }
}

/// One port's idle channels.
#[derive(Debug)]
struct Pool {
    port: Name,
    /// Where its next connections go (a reload may change it).
    target: Mutex<Target>,
    /// Its labels in the metrics.
    labels: PortLabels,
    /// Channels open and carrying no connection.
    idle: AtomicUsize,
    /// Told when the pool may be short of idle channels.
    short: Notify,
    /// Told when the pool has one more idle channel (a new one, or one whose connection ended).
    refilled: Notify,
    /// Cancelled when the port is no longer offered (or at shutdown): its channels and
    /// tunnels end.
    closed: CancellationToken,
}

/// Starts offering `port` (connections go to `target`): its pool and the task that fills it.
fn offer(ctx: &Arc<Ctx>, port: &Name, target: &Target) -> Arc<Pool> {
    let pool = Arc::new(Pool {
        port: port.clone(),
        target: Mutex::new(target.clone()),
        labels: PortLabels {
            server: ctx.config.name.to_string(),
            port: port.to_string(),
        },
        idle: AtomicUsize::new(0),
        short: Notify::new(),
        refilled: Notify::new(),
        closed: ctx.shutdown.child_token(),
    });
    let span = info_span!("port", port = %port);
    ctx.tasks
        .spawn(fill(ctx.clone(), pool.clone()).instrument(span));
    pool
}

async fn serve(ctx: Arc<Ctx>, admin: Option<TcpListener>) {
    info!(
        relay = %ctx.config.relay_url,
        server = %ctx.config.name,
        ports = ?ctx.config.ports.keys().collect::<Vec<_>>(),
        "server proxy started"
    );
    if let Some(admin) = admin {
        let mut registry = prometheus_client::registry::Registry::with_prefix("ptth_server");
        ctx.metrics.register(&mut registry, ctx.relay.dials());
        let admin_state = Arc::new(ptth_common::admin::Admin::new(registry, None));
        ctx.tasks.spawn(ptth_common::admin::serve(
            admin,
            admin_state,
            ctx.shutdown.clone(),
        ));
    }
    ctx.pools.lock().offered(&ctx);
    ctx.shutdown.cancelled().await;
    info!("server proxy shutting down");
    ctx.relay.close().await;
    ptth_common::wait_for_tasks(&ctx.tasks).await;
}

/// Keeps `listen_pool` idle channels open for the port, retrying with backoff while the relay
/// cannot be reached or refuses them.
async fn fill(ctx: Arc<Ctx>, pool: Arc<Pool>) {
    let mut backoff = Backoff::new(ctx.config.max_backoff);
    loop {
        while pool.idle.load(Ordering::Acquire) >= ctx.config.listen_pool {
            tokio::select! {
                () = pool.closed.cancelled() => return,
                () = ctx.draining.cancelled() => return,
                () = pool.short.notified() => {}
            }
        }
        if ctx.draining.is_cancelled() {
            return;
        }
        let opened = match open_channel(&ctx, &pool) {
            Some(mut channel) => channel.ready(&pool.closed).await.map(|()| channel),
            None => return,
        };
        match opened {
            Ok(channel) => {
                backoff.succeeded();
                count(&ctx, &pool);
                let span = info_span!("channel", channel = %channel.id());
                ctx.tasks
                    .spawn(run_channel(ctx.clone(), pool.clone(), channel).instrument(span));
            }
            Err(ChannelError::Cancelled) => return,
            Err(problem) => {
                ctx.metrics.failed(&pool.labels, &problem);
                ctx.metrics.reconnects.inc();
                if !backoff.retry_after(&problem, &pool.closed).await {
                    return;
                }
            }
        }
    }
}

/// A new channel for `port`: its `listen` and `downstream` (not sent before it is polled);
/// `None` if the random source fails.
fn open_channel(ctx: &Ctx, pool: &Pool) -> Option<Channel> {
    let name = ctx.config.name.as_str();
    let opened = Channel::open(
        &ctx.relay,
        &listen_path(name, pool.port.as_str()),
        |id| downstream_path(name, id),
        ctx.config.heartbeat_interval,
        ctx.metrics.channel(&pool.labels, false),
    );
    opened
        .inspect_err(|e| error!(error = %e, "no channel id: the random source failed"))
        .ok()
}

/// Serves the connections the relay gives `channel`, one after the other, until it breaks, the
/// pool has idle channels enough or the channel is older than `channel_max_age` (then it is
/// retired, once idle), or the server proxy drains. `channel` is counted idle.
async fn run_channel(ctx: Arc<Ctx>, pool: Arc<Pool>, mut channel: Channel) {
    let closed = &pool.closed;
    let old_at = channel.old_at(ctx.config.channel_max_age);
    let mut given_already = false;
    // Whether `channel` counts among the pool's idle channels.
    let mut counted = true;
    loop {
        let given = if given_already {
            Ok(())
        } else {
            // Boxed, as `carry` below: a task's future is as large as the largest it awaits in
            // place, for as long as the task lives.
            tokio::select! {
                r = Box::pin(channel.idle(closed)) => r,
                () = ctx.draining.cancelled() => retire(&mut channel, closed).await,
                () = tokio::time::sleep_until(old_at) => {
                    uncount(&ctx, &pool);
                    counted = false;
                    Box::pin(replace(&ctx, &pool, &mut channel)).await
                }
            }
        };
        given_already = false;
        if counted {
            uncount(&ctx, &pool);
        }
        counted = true;
        match given {
            Ok(()) => {}
            Err(ChannelError::Cancelled) => return,
            Err(e) if e.is_front_problem() => {
                ctx.metrics.failed(&pool.labels, &e);
                warn!(error = %e, "channel closed");
                return;
            }
            Err(e) => {
                ctx.metrics.failed(&pool.labels, &e);
                debug!(error = %e, "channel closed");
                return;
            }
        }
        let Ok(_permit) = ctx.slots.clone().try_acquire_owned() else {
            warn!("too many open tunnels (max_connections); refusing");
            channel.refuse("the server is at its max_connections").await;
            return;
        };
        let tunnel = ctx.metrics.tunnel(&pool.labels);
        let target = pool.target.lock().clone();
        let connect = tokio::time::timeout(
            ctx.config.connect_timeout,
            TcpStream::connect(target.as_str()),
        );
        let connected = tokio::select! {
            () = closed.cancelled() => return,
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
        match Box::pin(channel.carry(started, false, closed)).await {
            Ok(()) => debug!("connection closed"),
            Err(ChannelError::Cancelled) => return,
            Err(e) if e.is_front_problem() => {
                ctx.metrics.failed(&pool.labels, &e);
                warn!(error = %e, "connection aborted");
                return;
            }
            Err(e) => {
                ctx.metrics.failed(&pool.labels, &e);
                info!(error = %e, "connection aborted");
                return;
            }
        }
        if ctx.draining.is_cancelled() {
            // The tunnel counts as open until the channel has retired, once the relay has read
            // the connection's last bytes: the drain ends with the last tunnel, and the exit
            // that follows would cut bytes still on their way.
            channel.retire(closed).await;
            drop(tunnel);
            return;
        }
        drop(tunnel);
        // Idle again: kept unless the pool has idle channels enough (twice `listen_pool`, so
        // that connections one after another reuse channels instead of opening new ones).
        count(&ctx, &pool);
        if channel.worn()
            || pool.idle.load(Ordering::Acquire) > 2 * ctx.config.listen_pool
            || tokio::time::Instant::now() >= old_at
        {
            // The relay may have given it a connection just before: then it serves that one.
            given_already = channel.retire(closed).await;
            if !given_already {
                uncount(&ctx, &pool);
                return;
            }
        }
    }
}

/// One more idle channel counted in the pool (a new one, or one whose connection ended): an
/// old channel being replaced, which waits for the pool to be full again, is told.
fn count(ctx: &Ctx, pool: &Pool) {
    pool.idle.fetch_add(1, Ordering::AcqRel);
    pool.refilled.notify_waiters();
    ctx.metrics.idle_channels.get_or_create(&pool.labels).inc();
}

/// An idle channel no longer counted in the pool: the pool is told it may be short.
fn uncount(ctx: &Ctx, pool: &Pool) {
    pool.idle.fetch_sub(1, Ordering::AcqRel);
    ctx.metrics.idle_channels.get_or_create(&pool.labels).dec();
    pool.short.notify_one();
}

/// Replaces the idle `channel`, older than `channel_max_age` and no longer counted in the pool:
/// the pool, short of it, opens another, which goes where a load balancer in front of several
/// relays sends it now (a relay that came back, say); once the pool is full again, `channel`
/// retires. Until then it stays open and takes connections, so that the port stays offered at
/// its relay: `Ok` when it is given one (it serves it), as from [`retire`].
async fn replace(ctx: &Ctx, pool: &Pool, channel: &mut Channel) -> Result<(), ChannelError> {
    let full = async {
        loop {
            let refilled = pool.refilled.notified();
            tokio::pin!(refilled);
            refilled.as_mut().enable();
            if pool.idle.load(Ordering::Acquire) >= ctx.config.listen_pool {
                return;
            }
            refilled.await;
        }
    };
    tokio::select! {
        r = Box::pin(channel.idle(&pool.closed)) => return r,
        () = ctx.draining.cancelled() => {}
        () = full => {}
    }
    retire(channel, &pool.closed).await
}

/// Retires the idle `channel`: `Ok` if the relay gave it a connection just before (it then
/// serves that one), else `Cancelled`.
async fn retire(channel: &mut Channel, closed: &CancellationToken) -> Result<(), ChannelError> {
    if channel.retire(closed).await {
        Ok(())
    } else {
        Err(ChannelError::Cancelled)
    }
}
