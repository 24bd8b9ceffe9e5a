//! `ptth_proxy`: forwards local TCP ports to services offered through a relay.
//!
//! The entry point is [`run`]: give it one bound listener per `[[forwards]]` entry, the
//! configuration, the client's key and a cancellation token, and await the [`Proxy`] it
//! returns. For each forward it keeps a channel open to the relay, ready (`connect` and
//! `upstream`, see `ptth_common::channel`); each accepted local connection is carried on an
//! idle channel, or on a new one when none is idle, and the channel stays open for the next.
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
//! let key = PrivateKey::generate()?; // in real use: key_file, PTTH_KEY or --key-fd (cli::EndpointArgs::load_key)
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

use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::StatusCode;
use parking_lot::Mutex;
use ptth_common::channel::{Channel, ChannelError, LocalSocket};
use ptth_common::client::{Backoff, CallError, RelayClient, SetupError};
use ptth_common::config::{Forward, ProxyConfig};
use ptth_common::keys::PrivateKey;
use ptth_common::metrics::{EndpointMetrics, PortLabels, TunnelGuard};
use ptth_common::protocol::{self, connect_path, upstream_path};
use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

/// Idle channels each forward keeps open, ready for the next local connection.
const READY_CHANNELS: usize = 1;
/// How long a local connection may wait for a channel while channels to its server fail: the
/// relay answers `server offline` (the server is moving to another relay behind a load
/// balancer), a balancer answers 502 or 503, or the relay cannot be reached. The connection is
/// not read meanwhile, so no byte is lost; past this, it is reset.
const CONNECT_RETRY: Duration = Duration::from_secs(5);
/// Longest wait between two attempts within [`CONNECT_RETRY`].
const CONNECT_RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// Local connections of one forward that may wait so at once; those beyond are not held (their
/// channel is opened at once, and they are reset when it is refused).
const MAX_WAITING: usize = 256;
/// Most idle channels a forward keeps: a channel whose connection ended stays open up to this
/// many (so that connections one after another reuse channels instead of opening new ones),
/// and is retired beyond.
const MAX_IDLE_CHANNELS: usize = 2 * READY_CHANNELS;

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
    let tasks = TaskTracker::new();
    let relay = RelayClient::new(
        config.relay_url.clone(),
        config.ca_file.as_deref(),
        key,
        tasks.clone(),
    )?;
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
            draining: shutdown.child_token(),
            shutdown,
            tasks,
            metrics: EndpointMetrics::default(),
        }),
        admin: None,
    })
}

/// A proxy ready to forward. Awaiting it accepts local connections and carries them until
/// shutdown, then closes the channels and waits (boundedly) for its tasks.
#[must_use = "a proxy forwards only when awaited"]
#[derive(Debug)]
pub struct Proxy {
    forwards: Vec<(TcpListener, SocketAddr, Forward)>,
    ctx: Arc<Ctx>,
    admin: Option<TcpListener>,
}

impl Proxy {
    /// Also serves, on `listener`, the admin listener: `/metrics` (see
    /// `ptth_common::admin`).
    pub fn with_admin(mut self, listener: TcpListener) -> Self {
        self.admin = Some(listener);
        self
    }

    /// A handle to drain the proxy while it runs.
    pub fn control(&self) -> Control {
        Control {
            ctx: self.ctx.clone(),
        }
    }

    /// Watches the number of tunnels open.
    pub fn tunnels(&self) -> watch::Receiver<usize> {
        self.ctx.metrics.tunnels_now()
    }

    /// The local address of each forward, in the order of `config.forwards`.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.forwards.iter().map(|(_, local, _)| *local).collect()
    }
}

impl IntoFuture for Proxy {
    type Output = ();
    type IntoFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(serve(self.ctx, self.forwards, self.admin))
    }
}

/// Drains a running proxy (see [`Proxy::control`]).
#[derive(Debug, Clone)]
pub struct Control {
    ctx: Arc<Ctx>,
}

impl Control {
    /// Drains, then shuts down: the local ports close (new connections are refused) and idle
    /// channels are retired; open tunnels go on until they end, for at most `drain_grace`;
    /// then the proxy shuts down as when its shutdown token is cancelled. Resolves once
    /// shutdown has begun.
    pub async fn drain(&self) {
        let ctx = &self.ctx;
        ctx.draining.cancel();
        ptth_common::wait_for_tunnels(ctx.metrics.tunnels_now(), ctx.config.drain_grace).await;
        ctx.shutdown.cancel();
    }
}

/// What every task of the proxy shares.
#[derive(Debug)]
struct Ctx {
    relay: RelayClient,
    config: ProxyConfig,
    shutdown: CancellationToken,
    /// Cancelled when the proxy drains: the local ports close, idle channels are retired.
    draining: CancellationToken,
    tasks: TaskTracker,
    /// One per open tunnel, at most `max_connections`.
    slots: Arc<Semaphore>,
    metrics: EndpointMetrics,
}

/// A local connection on its way to a channel, with its place among `max_connections`, and
/// counted as a tunnel from its accept (a drain waits for it).
type Handoff = (LocalSocket, OwnedSemaphorePermit, TunnelGuard);

/// One forward's idle channels.
#[derive(Debug)]
struct Pool {
    fwd: Forward,
    /// Its labels in the metrics.
    labels: PortLabels,
    /// Where each idle channel waits for a local connection, oldest first. A channel that
    /// broke while idle leaves a closed sender behind.
    idle: Mutex<VecDeque<oneshot::Sender<Handoff>>>,
    /// Told when the pool may be short of idle channels.
    short: Notify,
    /// Whether the last channel the pool opened was refused, or could not reach the relay.
    failing: AtomicBool,
    /// Local connections waiting for a channel while channels fail, at most [`MAX_WAITING`].
    waiting: Arc<Semaphore>,
}

impl Pool {
    /// How many idle channels wait (dropping those that broke).
    fn idle_count(&self) -> usize {
        let mut idle = self.idle.lock();
        idle.retain(|tx| !tx.is_closed());
        idle.len()
    }

    /// Counts the idle channels in the metrics (`idle_channels`).
    fn count_idle(&self, metrics: &EndpointMetrics) {
        let n = self.idle_count();
        metrics
            .idle_channels
            .get_or_create(&self.labels)
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Hands a local connection to an idle channel; gives it back if none is idle.
    fn hand_over(&self, mut handoff: Handoff) -> Result<(), Handoff> {
        loop {
            let Some(tx) = self.idle.lock().pop_front() else {
                return Err(handoff);
            };
            match tx.send(handoff) {
                Ok(()) => return Ok(()),
                Err(back) => handoff = back,
            }
        }
    }

    /// Registers an idle channel: the receiver gets its next local connection.
    fn wait_idle(&self) -> oneshot::Receiver<Handoff> {
        let (tx, rx) = oneshot::channel();
        self.idle.lock().push_back(tx);
        rx
    }
}

async fn serve(
    ctx: Arc<Ctx>,
    forwards: Vec<(TcpListener, SocketAddr, Forward)>,
    admin: Option<TcpListener>,
) {
    if let Some(admin) = admin {
        let mut registry = prometheus_client::registry::Registry::with_prefix("ptth_proxy");
        ctx.metrics.register(&mut registry, ctx.relay.dials());
        let admin_state = Arc::new(ptth_common::admin::Admin::new(registry, None));
        ctx.tasks.spawn(ptth_common::admin::serve(
            admin,
            admin_state,
            ctx.shutdown.clone(),
        ));
    }
    for (listener, local, fwd) in forwards {
        info!(listen = %local, server = %fwd.server, port = %fwd.port, relay = %ctx.config.relay_url, "forwarding");
        let span = info_span!("forward", listen = %local, server = %fwd.server, port = %fwd.port);
        let pool = Arc::new(Pool {
            labels: PortLabels {
                server: fwd.server.to_string(),
                port: fwd.port.to_string(),
            },
            fwd,
            idle: Mutex::new(VecDeque::new()),
            short: Notify::new(),
            failing: AtomicBool::new(false),
            waiting: Arc::new(Semaphore::new(MAX_WAITING)),
        });
        ctx.tasks
            .spawn(fill(ctx.clone(), pool.clone()).instrument(span.clone()));
        ctx.tasks
            .spawn(accept_loop(ctx.clone(), listener, pool).instrument(span));
    }
    ctx.shutdown.cancelled().await;
    info!("proxy shutting down");
    ctx.relay.close().await;
    ptth_common::wait_for_tasks(&ctx.tasks).await;
}

/// Accepts local connections of one forward, within `max_connections`, and hands each to an
/// idle channel, or to a new channel when none is idle.
async fn accept_loop(ctx: Arc<Ctx>, listener: TcpListener, pool: Arc<Pool>) {
    loop {
        let (stream, peer) = tokio::select! {
            () = ctx.draining.cancelled() => {
                info!("draining: local port closed");
                return;
            }
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        // Until a channel carries it, any way out is a failure: the socket is then reset, as
        // a refused connection would be, rather than closed as if the service had nothing to
        // say.
        let socket = LocalSocket::new(stream);
        let Ok(permit) = ctx.slots.clone().try_acquire_owned() else {
            warn!(%peer, "too many open tunnels (max_connections); resetting the new connection");
            continue;
        };
        debug!(%peer, "local connection");
        let tunnel = ctx.metrics.tunnel(&pool.labels);
        if let Err(handoff) = pool.hand_over((socket, permit, tunnel)) {
            let place = pool
                .failing
                .load(Ordering::Acquire)
                .then(|| pool.waiting.clone().try_acquire_owned().ok())
                .flatten();
            if let Some(place) = place {
                // Channels fail now: the connection waits, unread, for one that opens.
                let task = wait_for_channel(ctx.clone(), pool.clone(), handoff, place);
                ctx.tasks.spawn(task.in_current_span());
            } else if let Some(channel) = open_channel(&ctx, &pool) {
                // No idle channel: a new one, which carries this connection from its first
                // request.
                spawn_channel(&ctx, &pool, channel, First::Connection(handoff));
            }
        }
        pool.short.notify_one();
    }
}

/// A new channel for `fwd`: its `connect` and `upstream` (not sent before it is polled);
/// `None` if the random source fails.
fn open_channel(ctx: &Ctx, pool: &Pool) -> Option<Channel> {
    let (server, port) = (pool.fwd.server.as_str(), pool.fwd.port.as_str());
    let opened = Channel::open(
        &ctx.relay,
        &connect_path(server, port),
        |id| upstream_path(server, id),
        ctx.config.heartbeat_interval,
        ctx.metrics.channel(&pool.labels, true),
    );
    opened
        .inspect_err(|e| error!(error = %e, "no channel id: the random source failed"))
        .ok()
}

/// Keeps [`READY_CHANNELS`] idle channels open for the forward, retrying with backoff while the
/// relay refuses them.
async fn fill(ctx: Arc<Ctx>, pool: Arc<Pool>) {
    let mut backoff = Backoff::new(Duration::from_secs(10));
    loop {
        pool.count_idle(&ctx.metrics);
        while pool.idle_count() >= READY_CHANNELS {
            tokio::select! {
                () = ctx.draining.cancelled() => return,
                () = pool.short.notified() => pool.count_idle(&ctx.metrics),
            }
        }
        if ctx.draining.is_cancelled() {
            return;
        }
        let Some(mut channel) = open_channel(&ctx, &pool) else {
            return;
        };
        // Counted idle from now on: a local connection that comes while the relay answers
        // takes this channel rather than opening another.
        let mut idle = pool.wait_idle();
        let opened = tokio::select! {
            r = channel.ready(&ctx.draining) => r,
            handoff = &mut idle => {
                if let Ok(handoff) = handoff {
                    spawn_channel(&ctx, &pool, channel, First::Connection(handoff));
                }
                continue;
            }
        };
        match opened {
            Ok(()) => {
                backoff.succeeded();
                pool.failing.store(false, Ordering::Release);
                spawn_channel(&ctx, &pool, channel, First::Idle(idle));
            }
            Err(ChannelError::Cancelled) => return,
            Err(problem) => {
                pool.failing.store(true, Ordering::Release);
                rescue_handoff(&ctx, &pool, idle);
                ctx.metrics.failed(&pool.labels, &problem);
                ctx.metrics.reconnects.inc();
                let (server, port) = (&pool.fwd.server, &pool.fwd.port);
                let problem = format!("no channel to {server}/{port}: {problem}");
                if !backoff.retry_after(&problem, &ctx.draining).await {
                    return;
                }
            }
        }
    }
}

/// Carries `handoff`, a local connection that came while the pool's channels fail, on a
/// channel opened for it once the relay has taken the channel: it is not read before, so that
/// it can wait, whole, while the channel is refused for a reason that passes (see
/// [`CONNECT_RETRY`]), retried with backoff. It is reset if the channel is refused otherwise,
/// or has not been taken within [`CONNECT_RETRY`]. `_place` is its place among the waiting.
async fn wait_for_channel(
    ctx: Arc<Ctx>,
    pool: Arc<Pool>,
    handoff: Handoff,
    _place: OwnedSemaphorePermit,
) {
    let deadline = tokio::time::Instant::now() + CONNECT_RETRY;
    let mut backoff = Backoff::new(CONNECT_RETRY_BACKOFF);
    let (server, port) = (&pool.fwd.server, &pool.fwd.port);
    // The refusal met last: what the connection failed of, if the wait ends.
    let mut last: Option<ChannelError> = None;
    loop {
        let Some(mut channel) = open_channel(&ctx, &pool) else {
            return;
        };
        let Ok(taken) = tokio::time::timeout_at(deadline, channel.ready(&ctx.draining)).await
        else {
            match last {
                Some(e) => {
                    ctx.metrics.failed(&pool.labels, &e);
                    report(&pool.fwd, &e);
                }
                None => error!(
                    "connect to {server}/{port} failed: the relay did not answer within \
                     {CONNECT_RETRY:?}"
                ),
            }
            return;
        };
        match taken {
            Ok(()) => {
                pool.failing.store(false, Ordering::Release);
                spawn_channel(&ctx, &pool, channel, First::Connection(handoff));
                return;
            }
            Err(ChannelError::Cancelled) => return,
            Err(e) if passes(&e) => {
                let problem = format!("connect to {server}/{port}: {e}; the connection waits");
                let retry = backoff.retry_after(&problem, &ctx.draining);
                let retried = tokio::time::timeout_at(deadline, retry).await;
                last = Some(e);
                if retried == Ok(false) {
                    return;
                }
            }
            Err(e) => {
                ctx.metrics.failed(&pool.labels, &e);
                report(&pool.fwd, &e);
                return;
            }
        }
    }
}

/// Whether a refused channel is worth another try soon: the server is offline at the relay
/// that has its name now (it may be moving there), the relay drains, a load balancer found no
/// relay, or the relay could not be reached (but for a certificate it does not trust). A full
/// queue is no reason to add to it, and a port the server does not offer (a `404`, most often
/// a mistake in a configuration) fails at once.
fn passes(e: &ChannelError) -> bool {
    match e {
        ChannelError::Refused(CallError::Refused { status, reason }) => {
            *status == StatusCode::SERVICE_UNAVAILABLE && reason != protocol::QUEUE_FULL
        }
        ChannelError::Refused(CallError::Front(status)) => matches!(
            *status,
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        ),
        ChannelError::Refused(e @ CallError::Unreachable(_)) => !e.is_certificate_problem(),
        _ => false,
    }
}

/// How a channel's task begins.
enum First {
    /// With this local connection: the channel was opened for it.
    Connection(Handoff),
    /// Idle, registered in the pool.
    Idle(oneshot::Receiver<Handoff>),
}

/// A channel that was counted idle failed: it is counted no longer, and a connection handed
/// over to it just as it failed goes on a new channel.
fn rescue_handoff(ctx: &Arc<Ctx>, pool: &Arc<Pool>, mut idle: oneshot::Receiver<Handoff>) {
    idle.close();
    if let Ok(handoff) = idle.try_recv()
        && let Some(channel) = open_channel(ctx, pool)
    {
        spawn_channel(ctx, pool, channel, First::Connection(handoff));
    }
}

/// Starts the task of `channel`, in a span of its own.
fn spawn_channel(ctx: &Arc<Ctx>, pool: &Arc<Pool>, channel: Channel, first: First) {
    let span = info_span!("channel", channel = %channel.id());
    let task = run_channel(ctx.clone(), pool.clone(), channel, first);
    ctx.tasks.spawn(task.instrument(span));
}

/// Carries local connections on `channel`, one after the other, until it breaks, or the pool
/// has idle channels enough or the channel is older than `channel_max_age` (then it is
/// retired, once idle).
async fn run_channel(ctx: Arc<Ctx>, pool: Arc<Pool>, mut channel: Channel, first: First) {
    let old_at = channel.old_at(ctx.config.channel_max_age);
    let mut next = first;
    loop {
        let (socket, permit, tunnel) = match next {
            First::Connection(handoff) => handoff,
            First::Idle(mut idle) => {
                let broke = tokio::select! {
                    handoff = &mut idle => match handoff {
                        Ok(handoff) => Ok(handoff),
                        Err(_) => return,
                    },
                    e = Box::pin(channel.idle(&ctx.shutdown)) => Err(e),
                    () = ctx.draining.cancelled() => {
                        // The relay never gives a client's channel a connection.
                        rescue_handoff(&ctx, &pool, idle);
                        channel.retire(&ctx.shutdown).await;
                        return;
                    }
                    // Its replacement goes where a load balancer sends it now (a relay that
                    // came back, say).
                    () = tokio::time::sleep_until(old_at) => {
                        rescue_handoff(&ctx, &pool, idle);
                        pool.short.notify_one();
                        channel.retire(&ctx.shutdown).await;
                        return;
                    }
                };
                match broke {
                    Ok(handoff) => handoff,
                    Err(e) => {
                        match e {
                            Ok(()) | Err(ChannelError::Cancelled) => {}
                            Err(e) => debug!(error = %e, "idle channel closed"),
                        }
                        pool.short.notify_one();
                        rescue_handoff(&ctx, &pool, idle);
                        return;
                    }
                }
            }
        };
        let Some(started) = channel.start(socket) else {
            return;
        };
        // Boxed, as the idle wait above: a task's future is as large as the largest it awaits
        // in place, for as long as the task lives.
        let carried = Box::pin(channel.carry(started, true, &ctx.shutdown)).await;
        drop(permit);
        if let Err(e) = carried {
            drop(tunnel);
            ctx.metrics.failed(&pool.labels, &e);
            report(&pool.fwd, &e);
            pool.short.notify_one();
            return;
        }
        debug!("connection closed");
        if ctx.draining.is_cancelled() {
            // The tunnel counts as open until the channel has retired, once the relay has read
            // the connection's last bytes: the drain ends with the last tunnel, and the exit
            // that follows would cut bytes still on their way.
            channel.retire(&ctx.shutdown).await;
            drop(tunnel);
            pool.short.notify_one();
            return;
        }
        drop(tunnel);
        // Idle again: kept unless the pool has idle channels enough, or the channel has carried
        // many bytes.
        if channel.worn()
            || pool.idle_count() >= MAX_IDLE_CHANNELS
            || tokio::time::Instant::now() >= old_at
        {
            // The relay never gives a client's channel a connection.
            channel.retire(&ctx.shutdown).await;
            pool.short.notify_one();
            return;
        }
        next = First::Idle(pool.wait_idle());
    }
}

/// Logs why a connection of `fwd` failed.
fn report(fwd: &Forward, e: &ChannelError) {
    let (server, port) = (&fwd.server, &fwd.port);
    match e {
        ChannelError::Cancelled => debug!("connection closed by shutdown"),
        ChannelError::Refused(CallError::Refused { status, reason }) => {
            error!(%status, %reason, "connect to {server}/{port} failed: {}", explain(*status));
        }
        ChannelError::Refused(e) => error!("connect to {server}/{port} failed: {e}"),
        ChannelError::Failed(reason) => error!("connect to {server}/{port} failed: {reason}"),
        // Something between us and the relay is in the way: the user must act.
        e if e.is_front_problem() => warn!(error = %e, "connection aborted"),
        e => info!(error = %e, "connection aborted"),
    }
}

/// What a refused `connect` most likely means, for the user.
fn explain(status: StatusCode) -> &'static str {
    match status {
        StatusCode::SERVICE_UNAVAILABLE => "server offline (or relay busy)",
        StatusCode::NOT_FOUND => "unknown port: the server does not offer it",
        StatusCode::FORBIDDEN => "not allowed: this client's allow list does not grant the port",
        _ => "unexpected answer from the relay",
    }
}
