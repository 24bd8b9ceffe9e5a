//! The relay's shared state: who is who (keys, names, allow lists), the ports each server
//! offers with their idle server channels and the client connections waiting for one, and the
//! table of channels (`channel.rs`). Joining a client's connection with a server channel happens
//! here.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use ptth_common::auth::Verifier;
use ptth_common::config::{Grant, Name, RelayConfig};
use ptth_common::keys::PublicKey;
use ptth_common::protocol::{self, ChannelId};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, warn};

use ptth_common::audit::Audit;

use crate::channel::{Channel, Channels, TableRefusal, ToDownload, Tunnel, TunnelBook};
use crate::handlers::Refused;
use crate::log_limit::RefusalLogs;
use crate::metrics::{CauseLabels, FailureLabels, Metrics, OutcomeLabels, TunnelLabels};

/// Who signed a request, and with which key (its 32 bytes).
pub(crate) type Signed = (Principal, [u8; 32]);

/// Who signed a request: a server or a client, by its slot (see [`Directory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Principal {
    Server(usize),
    Client(usize),
}

/// A port as the status page shows it.
#[derive(Debug, serde::Serialize)]
pub(crate) struct PortView {
    /// Its name.
    pub name: String,
    /// Server channels alive on it.
    pub channels: usize,
    /// Of those, ready for a connection.
    pub ready: usize,
    /// Client connections waiting for one.
    pub waiting: usize,
}

/// Requests refused lately, as the status page shows them.
pub(crate) const RECENT_REJECTIONS: usize = 50;

/// A request refused, as the status page shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Rejection {
    /// When (RFC 3339, UTC).
    pub time: String,
    /// Why: the one-line reason answered.
    pub reason: &'static str,
    /// For a refused signature, its exact cause (see `AuthError::cause`).
    pub auth_cause: Option<&'static str>,
    /// The HTTP status answered.
    pub status: u16,
    /// The caller's address, if known.
    pub client_ip: Option<std::net::IpAddr>,
}

/// Most distinct ports remembered per server.
pub(crate) const MAX_PORTS_PER_SERVER: usize = 256;

/// A client connection waiting for a server channel: its channel, and where the tunnel goes.
type Waiting = (Arc<Channel>, oneshot::Sender<Arc<Tunnel>>);

/// The ports of one server, behind a lock of their own: a client's connection locks only the
/// server it goes to.
#[derive(Debug, Default)]
struct ServerPorts {
    ports: HashMap<Name, PortState>,
    /// Server channels alive on all its ports: the server is online while there is one.
    live: usize,
}

/// Channels of one (server, port).
#[derive(Debug, Default)]
struct PortState {
    /// Idle server channels whose upload has arrived, oldest first: ready for a connection.
    ready: VecDeque<Arc<Channel>>,
    /// Server channels that carry no connection (ready, or still without their upload).
    idle: HashSet<ChannelId>,
    /// Server channels alive, idle or not: the port is offered while there is one.
    live: usize,
    /// Client connections waiting for a server channel.
    waiting: Queue,
}

/// Client connections waiting for a server channel, oldest first, shared fairly between
/// clients: when it is full, a client with fewer than its share (the capacity divided by the
/// clients waiting) takes the place of the newest connection of the client with the most.
#[derive(Debug, Default)]
struct Queue {
    /// By order of arrival.
    entries: BTreeMap<u64, Waiting>,
    /// The number of the next arrival.
    next: u64,
    /// Entries per client (by index), for those that have any.
    per_client: HashMap<usize, usize>,
}

impl Queue {
    /// Whether no connection waits.
    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Queues `client`'s connection, in a queue of `capacity`: its number, or `None` when the
    /// queue is full and the client has its share already. A connection pushed out is failed.
    fn push(
        &mut self,
        client: &Arc<Channel>,
        to: oneshot::Sender<Arc<Tunnel>>,
        capacity: usize,
    ) -> Option<u64> {
        let who = client.client()?;
        let own = self.per_client.get(&who).copied().unwrap_or(0);
        if self.entries.len() >= capacity {
            let clients = self.per_client.len() + usize::from(own == 0);
            let (&most, &theirs) = self.per_client.iter().max_by_key(|(_, n)| **n)?;
            if own >= capacity / clients || theirs <= own + 1 {
                return None;
            }
            let newest = self
                .entries
                .iter()
                .rev()
                .find(|(_, (c, _))| c.client() == Some(most))
                .map(|(n, _)| *n)?;
            if let Some((pushed_out, _)) = self.remove(newest) {
                pushed_out.tell(ToDownload::Fail(PortRefusal::QueueFull.reason().to_owned()));
            }
        }
        let number = self.next;
        self.next += 1;
        self.entries.insert(number, (client.clone(), to));
        *self.per_client.entry(who).or_insert(0) += 1;
        Some(number)
    }

    /// The number and channel of the oldest connection still waiting, left in the queue;
    /// connections whose channel or waiter has gone are dropped on the way.
    fn oldest(&mut self) -> Option<(u64, Arc<Channel>)> {
        while let Some((&number, (client, to))) = self.entries.first_key_value() {
            if !client.cancel.is_cancelled() && !to.is_closed() {
                return Some((number, client.clone()));
            }
            self.remove(number);
        }
        None
    }

    /// Takes connection `number` out, if it is still there.
    fn remove(&mut self, number: u64) -> Option<Waiting> {
        let waiting = self.entries.remove(&number)?;
        self.forget(&waiting);
        Some(waiting)
    }

    /// Takes connection `number` of channel `id` out, if it is still there (a queue made anew
    /// numbers its connections from 0 again).
    fn leave(&mut self, number: u64, id: ChannelId) {
        if let Some(waiting) = self.entries.remove(&number) {
            if waiting.0.id == id {
                self.forget(&waiting);
            } else {
                self.entries.insert(number, waiting);
            }
        }
    }

    /// Uncounts a connection taken out of the queue.
    fn forget(&mut self, waiting: &Waiting) {
        if let Some(who) = waiting.0.client()
            && let Some(n) = self.per_client.get_mut(&who)
        {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&who);
            }
        }
    }
}

/// Why a `listen` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListenRefusal {
    /// The server already uses [`MAX_PORTS_PER_SERVER`] port names.
    PortNames,
    /// `max_listens_per_port` idle channels are open on this port already.
    PortListens,
    /// `max_listens_per_server` idle channels of this server are open already.
    ServerListens,
}

/// Why a channel could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenRefusal {
    /// The channel table refused it.
    Table(TableRefusal),
    /// Its port refused a server channel.
    Listen(ListenRefusal),
    /// The configuration was reloaded while it was being opened.
    Reloaded,
}

/// Why a client cannot have a connection to a port now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PortRefusal {
    /// The server has no channel open on any port.
    ServerOffline,
    /// The server is online but has no channel open on this port.
    PortNotOffered,
    /// `max_pending_connects` connections already wait for a server channel of this port, and
    /// this client has its share of them.
    QueueFull,
}

impl PortRefusal {
    /// The reason given to the client.
    pub fn reason(self) -> &'static str {
        match self {
            Self::ServerOffline => protocol::SERVER_OFFLINE,
            Self::PortNotOffered => protocol::PORT_NOT_OFFERED,
            Self::QueueFull => protocol::QUEUE_FULL,
        }
    }

    /// The HTTP status of the refusal.
    pub fn status(self) -> http::StatusCode {
        match self {
            Self::PortNotOffered => http::StatusCode::NOT_FOUND,
            Self::ServerOffline | Self::QueueFull => http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// What a client's connection gets.
#[derive(Debug)]
pub(crate) enum Offer<'a> {
    /// A server channel at once.
    Joined(Arc<Tunnel>),
    /// A place in the port's queue: the tunnel comes when a server channel is ready. Dropping
    /// the place leaves the queue.
    Waiting(oneshot::Receiver<Arc<Tunnel>>, Place<'a>),
    /// The client's channel ended (or retired) meanwhile: no connection.
    Closed,
}

/// A client connection's place in a port's queue; dropped, it leaves the queue (if a server
/// channel has not taken it already).
#[derive(Debug)]
pub(crate) struct Place<'a> {
    shared: &'a Shared,
    server: usize,
    port: Name,
    number: u64,
    channel: ChannelId,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let server = self.shared.ports(self.server);
        let mut server = server.lock();
        if let Some(entry) = server.ports.get_mut(&self.port) {
            entry.waiting.leave(self.number, self.channel);
        }
    }
}

/// Who is who, by the configuration in force: the servers and clients, their keys, the
/// clients' allow lists and the relay's authorities. A reload makes a new one.
///
/// Each server and client has a slot (its index) for the relay's life: a reload keeps each
/// name's slot, gives new names new slots, and leaves a removed name's slot without a key, so
/// that the channels and tunnels that refer to slots stay meaningful.
#[derive(Debug)]
pub(crate) struct Directory {
    /// Changes with each reload.
    pub generation: u64,
    server_index: HashMap<String, usize>,
    /// Every server named since start, by slot.
    pub server_names: Vec<Name>,
    /// Each server's key, by slot; `None`: removed.
    server_keys: Vec<Option<PublicKey>>,
    /// Every client named since start, by slot.
    pub client_names: Vec<Name>,
    /// Each client's key, by slot; `None`: removed.
    client_keys: Vec<Option<PublicKey>>,
    /// What each client may connect to, by slot (nothing for a removed one).
    pub client_allow: Vec<Vec<Grant>>,
    /// The configured `authorities`, lowercased, each `host:443` and `host:80` also as `host`.
    pub authorities: Vec<String>,
}

impl Directory {
    /// The directory of `config`, keeping the slots of `before` (if any).
    fn new(config: &RelayConfig, before: Option<&Directory>) -> Self {
        let mut d = match before {
            Some(b) => Self {
                generation: b.generation + 1,
                server_index: b.server_index.clone(),
                server_names: b.server_names.clone(),
                server_keys: vec![None; b.server_keys.len()],
                client_names: b.client_names.clone(),
                client_keys: vec![None; b.client_keys.len()],
                client_allow: vec![Vec::new(); b.client_allow.len()],
                authorities: Vec::new(),
            },
            None => Self {
                generation: 0,
                server_index: HashMap::new(),
                server_names: Vec::new(),
                server_keys: Vec::new(),
                client_names: Vec::new(),
                client_keys: Vec::new(),
                client_allow: Vec::new(),
                authorities: Vec::new(),
            },
        };
        for s in &config.servers {
            let slot = match d.server_index.get(s.name.as_str()) {
                Some(&slot) => slot,
                None => {
                    d.server_index
                        .insert(s.name.as_str().to_owned(), d.server_names.len());
                    d.server_names.push(s.name.clone());
                    d.server_keys.push(None);
                    d.server_names.len() - 1
                }
            };
            d.server_keys[slot] = Some(s.public_key);
        }
        for c in &config.clients {
            let slot = match d.client_names.iter().position(|n| *n == c.name) {
                Some(slot) => slot,
                None => {
                    d.client_names.push(c.name.clone());
                    d.client_keys.push(None);
                    d.client_allow.push(Vec::new());
                    d.client_names.len() - 1
                }
            };
            d.client_keys[slot] = Some(c.public_key);
            d.client_allow[slot] = c.allow.clone();
        }
        // Clients leave a scheme's default port out of what they sign: `host:443` and
        // `host:80` also stand for the bare host.
        for a in &config.authorities {
            let a = a.to_ascii_lowercase();
            let bare = a
                .strip_suffix(":443")
                .or_else(|| a.strip_suffix(":80"))
                .map(str::to_owned);
            for name in std::iter::once(a).chain(bare) {
                if !d.authorities.contains(&name) {
                    d.authorities.push(name);
                }
            }
        }
        d
    }

    /// The keys the verifier knows, with whom each stands for.
    fn keys(&self) -> Vec<(PublicKey, Signed)> {
        let servers = self.server_keys.iter().enumerate();
        let clients = self.client_keys.iter().enumerate();
        let signed = |k: &PublicKey, by| (*k, (by, k.to_bytes()));
        servers
            .filter_map(|(i, k)| Some(signed(k.as_ref()?, Principal::Server(i))))
            .chain(clients.filter_map(|(i, k)| Some(signed(k.as_ref()?, Principal::Client(i)))))
            .collect()
    }

    /// Whether `key` is, in this directory, the key of `principal`. (The verifier and the
    /// directory are replaced one after the other on a reload: a request checked by one may
    /// meet the other.)
    pub fn holds(&self, principal: Principal, key: &[u8; 32]) -> bool {
        let slot = match principal {
            Principal::Server(i) => self.server_keys.get(i),
            Principal::Client(i) => self.client_keys.get(i),
        };
        slot.copied()
            .flatten()
            .is_some_and(|k| k.to_bytes() == *key)
    }

    /// The name of server slot `server`, if it has one.
    pub fn server_name(&self, server: usize) -> Option<&Name> {
        self.server_names.get(server)
    }

    /// The slot of the server named `name`, if it is configured.
    pub fn server(&self, name: &str) -> Option<usize> {
        self.server_index
            .get(name)
            .copied()
            .filter(|&i| self.server_keys[i].is_some())
    }

    /// Whether client slot `client` is configured now.
    pub fn is_client(&self, client: usize) -> bool {
        self.client_keys.get(client).is_some_and(Option::is_some)
    }

    /// Whether `channel`, allowed by `before`, is still allowed by this directory: its server
    /// (and its client, for a client's) still configured with the same key, and the port
    /// still in the client's allow list.
    fn still_allows(&self, before: &Directory, channel: &Channel) -> bool {
        let same_key = |now: &[Option<PublicKey>], then: &[Option<PublicKey>], i: usize| {
            now.get(i).copied().flatten().is_some()
                && now.get(i).copied().flatten() == then.get(i).copied().flatten()
        };
        match channel.client() {
            None => same_key(&self.server_keys, &before.server_keys, channel.server),
            Some(c) => {
                self.server_keys
                    .get(channel.server)
                    .is_some_and(Option::is_some)
                    && same_key(&self.client_keys, &before.client_keys, c)
                    && self.client_allow[c].iter().any(|g| {
                        g.allows(
                            self.server_names[channel.server].as_str(),
                            channel.port.as_str(),
                        )
                    })
            }
        }
    }
}

/// What a reload changed, for the log and the audit log.
#[derive(Debug, Default, serde::Serialize)]
struct ReloadSummary {
    servers_added: Vec<String>,
    servers_removed: Vec<String>,
    clients_added: Vec<String>,
    clients_removed: Vec<String>,
    /// Clients whose key or allow list changed.
    clients_changed: Vec<String>,
    /// Channels (with their tunnels) the new configuration no longer allows.
    channels_closed: usize,
}

/// Shared state of one relay.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The configuration it started with (a reload changes only the [`Directory`]).
    pub config: RelayConfig,
    pub verifier: Verifier<Signed>,
    /// Who is who now.
    directory: RwLock<Arc<Directory>>,
    /// Held while a reload is applied.
    reloading: Mutex<()>,
    /// The ports of each server (by slot).
    servers: RwLock<Vec<Arc<Mutex<ServerPorts>>>>,
    pub channels: Channels,
    /// Server channels ready for a connection, observable from outside.
    ready_count: watch::Sender<usize>,
    /// Cancelled when the relay shuts down; every channel's token is a child.
    pub shutdown: CancellationToken,
    /// Set when the relay drains: no new channel, and none stays once idle.
    draining: std::sync::atomic::AtomicBool,
    /// Every task the relay starts.
    pub tasks: TaskTracker,
    /// The rate limits of the refusals the relay logs.
    pub refusal_logs: RefusalLogs,
    /// What the relay counts.
    pub metrics: Arc<Metrics>,
    /// Requests refused lately, newest last (at most [`RECENT_REJECTIONS`]).
    recent_rejections: Mutex<VecDeque<Rejection>>,
    /// The audit log.
    pub audit: Arc<Audit>,
}

impl Shared {
    /// State for `config`, ending with `shutdown`, with the audit log in the log.
    #[cfg(test)]
    pub fn new(config: RelayConfig, shutdown: CancellationToken) -> Self {
        Self::with_audit(config, shutdown, Arc::new(Audit::to_log("ptth_relay")))
    }

    /// State for `config`, ending with `shutdown`, recording to `audit`.
    pub fn with_audit(config: RelayConfig, shutdown: CancellationToken, audit: Arc<Audit>) -> Self {
        let directory = Directory::new(&config, None);
        let metrics = Arc::new(Metrics::default());
        Self {
            verifier: Verifier::new(directory.keys(), config.max_nonces),
            servers: RwLock::new(
                (0..directory.server_names.len())
                    .map(|_| Arc::default())
                    .collect(),
            ),
            directory: RwLock::new(Arc::new(directory)),
            reloading: Mutex::new(()),
            channels: Channels::new(
                config.clients.len(),
                config.max_connections,
                config.max_connections_per_client,
                Arc::new(TunnelBook {
                    count: watch::Sender::new(0),
                    metrics: metrics.clone(),
                    audit: audit.clone(),
                }),
            ),
            ready_count: watch::Sender::new(0),
            shutdown,
            draining: std::sync::atomic::AtomicBool::new(false),
            tasks: TaskTracker::new(),
            refusal_logs: RefusalLogs::default(),
            metrics,
            recent_rejections: Mutex::new(VecDeque::with_capacity(RECENT_REJECTIONS)),
            audit,
            config,
        }
    }

    /// Who is who now.
    pub fn directory(&self) -> Arc<Directory> {
        self.directory.read().clone()
    }

    /// The ports of server `server` (by slot).
    fn ports(&self, server: usize) -> Arc<Mutex<ServerPorts>> {
        self.servers.read()[server].clone()
    }

    /// Applies `config`'s servers, clients, keys, allow lists and authorities: channels (and
    /// their tunnels) it no longer allows are closed; the rest goes on. Other settings need a
    /// restart: a warning names those that changed.
    pub fn reload(&self, config: RelayConfig) {
        // One reload at a time: each builds on the directory before it.
        let _one = self.reloading.lock();
        let before = self.directory();
        let after = Arc::new(Directory::new(&config, Some(&before)));
        {
            let mut servers = self.servers.write();
            while servers.len() < after.server_names.len() {
                servers.push(Arc::default());
            }
        }
        self.channels.count_clients(after.client_names.len());
        // The new directory, then the new keys (a request checked by the old keys is held to
        // the new directory: `Directory::holds`), then the sweep: a channel opened meanwhile
        // under the old directory is refused when it is entered (see `open_channel`).
        *self.directory.write() = after.clone();
        self.verifier.replace_keys(after.keys());
        let closed = self
            .channels
            .close_where(|c| !after.still_allows(&before, c));
        let summary = reload_summary(&before, &after, closed);
        let restart = restart_needed(&self.config, &config);
        if !restart.is_empty() {
            warn!(settings = ?restart, "these settings changed; they take effect at the next start");
        }
        if closed > 0 {
            warn!(
                channels = closed,
                "closed the channels (and their tunnels) the new configuration no longer allows"
            );
        }
        info!(
            servers_added = ?summary.servers_added,
            servers_removed = ?summary.servers_removed,
            clients_added = ?summary.clients_added,
            clients_removed = ?summary.clients_removed,
            clients_changed = ?summary.clients_changed,
            "configuration reloaded"
        );
        self.metrics
            .reloads
            .get_or_create(&OutcomeLabels { outcome: "applied" })
            .inc();
        self.audit.record("config_reloaded", || {
            serde_json::to_value(&summary).unwrap_or_default()
        });
    }

    /// Watches the number of server channels ready for a connection.
    pub fn ready_server_channels(&self) -> watch::Receiver<usize> {
        self.ready_count.subscribe()
    }

    /// Whether `server` offers `port` now: online (a channel open on some port), and with a
    /// channel open on this one.
    pub fn port_status(&self, server: usize, port: &Name) -> Result<(), PortRefusal> {
        self.ports(server).lock().port(port).map(drop)
    }

    /// Opens `channel`, which directory `generation` allowed: enters it in the table and, a
    /// server's, counts it on its port; then starts the task, in `span`, that frees it once it
    /// ends (`Channels::reap`). Refused if a reload has come since `generation`: the endpoint
    /// asks again, under the new directory.
    pub fn open_channel(
        self: &Arc<Self>,
        channel: &Arc<Channel>,
        generation: u64,
        span: tracing::Span,
    ) -> Result<(), OpenRefusal> {
        self.channels
            .insert(channel.clone())
            .map_err(OpenRefusal::Table)?;
        if self.directory().generation != generation {
            self.channels.remove(channel.id);
            return Err(OpenRefusal::Reloaded);
        }
        if channel.is_server()
            && let Err(refusal) = self.add_server_channel(channel)
        {
            self.channels.remove(channel.id);
            return Err(OpenRefusal::Listen(refusal));
        }
        let shared = self.clone();
        let channel = channel.clone();
        let idle = self.config.idle_timeout;
        self.tasks.spawn(
            async move {
                debug!("channel open");
                shared.channels.reap(&channel, idle).await;
                if channel.is_server() {
                    shared.remove_server_channel(&channel);
                }
                debug!("channel closed");
            }
            .instrument(span),
        );
        Ok(())
    }

    /// Counts a new server channel on its port, within the limits.
    fn add_server_channel(&self, channel: &Channel) -> Result<(), ListenRefusal> {
        let server = self.ports(channel.server);
        let mut server = server.lock();
        let ports = &mut server.ports;
        if !ports.contains_key(&channel.port) && ports.len() >= MAX_PORTS_PER_SERVER {
            // Forget the ports that have no channel and no waiting client.
            ports.retain(|_, p| p.live > 0 || !p.waiting.is_empty());
            if ports.len() >= MAX_PORTS_PER_SERVER {
                return Err(ListenRefusal::PortNames);
            }
        }
        if ports.values().map(|p| p.idle.len()).sum::<usize>() >= self.config.max_listens_per_server
        {
            return Err(ListenRefusal::ServerListens);
        }
        let entry = ports.entry(channel.port.clone()).or_default();
        if entry.idle.len() >= self.config.max_listens_per_port {
            return Err(ListenRefusal::PortListens);
        }
        entry.live += 1;
        entry.idle.insert(channel.id);
        server.live += 1;
        Ok(())
    }

    /// Forgets a server channel that has ended.
    fn remove_server_channel(&self, channel: &Channel) {
        let server = self.ports(channel.server);
        let mut server = server.lock();
        let Some(entry) = server.ports.get_mut(&channel.port) else {
            return;
        };
        entry.live = entry.live.saturating_sub(1);
        entry.idle.remove(&channel.id);
        self.unready(entry, channel.id);
        // Connections still waiting keep their channels: a server channel may come yet.
        let unoffered = entry.live == 0 && entry.waiting.is_empty();
        server.live = server.live.saturating_sub(1);
        drop(server);
        if unoffered && !self.is_draining() {
            // The port's clients learn it now rather than at their next connection, which
            // would fail: their idle channels are retired, and those they open instead go
            // where a load balancer in front of several relays sends them now (the server
            // moved to another relay, say; docs/scale-out.md).
            self.channels.retire_idle_where(|c| {
                !c.is_server() && c.server == channel.server && c.port == channel.port
            });
        }
    }

    /// Takes server channel `id` out of `entry`'s ready queue: whether it was there.
    fn unready(&self, entry: &mut PortState, id: ChannelId) -> bool {
        let before = entry.ready.len();
        entry.ready.retain(|c| c.id != id);
        let was_ready = entry.ready.len() != before;
        if was_ready {
            self.ready_count.send_modify(|n| *n = n.saturating_sub(1));
            self.metrics.listens_ready.dec();
        }
        was_ready
    }

    /// A server channel is ready for a connection (its upload has arrived, or its last
    /// connection has ended): it takes the oldest waiting client connection, or waits for one.
    pub fn ready(&self, server: &Arc<Channel>) {
        if self.is_draining() {
            server.end_idle();
            return;
        }
        let ports = self.ports(server.server);
        let mut ports = ports.lock();
        if server.cancel.is_cancelled() {
            return;
        }
        let Some(entry) = ports.ports.get_mut(&server.port) else {
            return;
        };
        entry.idle.insert(server.id);
        while let Some((number, client)) = entry.waiting.oldest() {
            let Some(tunnel) = self.join(&client, server) else {
                if !server.is_free() {
                    // It is retiring or ended: the connection waits for another channel.
                    return;
                }
                // The client's channel ended or took another connection.
                entry.waiting.remove(number);
                continue;
            };
            entry.idle.remove(&server.id);
            let Some((_, to)) = entry.waiting.remove(number) else {
                return;
            };
            if let Err(tunnel) = to.send(tunnel) {
                // The client gave up just now.
                tunnel.fail();
            }
            return;
        }
        entry.ready.push_back(server.clone());
        self.ready_count.send_modify(|n| *n += 1);
        self.metrics.listens_ready.inc();
    }

    /// Starts draining: new channels are refused from now on, idle ones are retired now, and
    /// the others once their connection has ended.
    pub fn drain(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // Connections waiting for a server channel get no more: they are failed with the
        // reason, so that their channels are idle (and retired) below.
        let servers: Vec<_> = self.servers.read().clone();
        for server in servers {
            for port in server.lock().ports.values_mut() {
                while let Some((number, client)) = port.waiting.oldest() {
                    port.waiting.remove(number);
                    self.metrics.connect_failed(503, protocol::DRAINING);
                    client.tell(ToDownload::Fail(protocol::DRAINING.to_owned()));
                }
            }
        }
        self.channels.retire_idle();
    }

    /// Whether the relay drains (or shuts down): no new channel is taken.
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst) || self.shutdown.is_cancelled()
    }

    /// A configuration reload failed: logged and recorded; the configuration in force stays.
    pub fn reload_rejected(&self, error: &str) {
        error!(error, "configuration not reloaded; the one in force stays");
        self.metrics
            .reloads
            .get_or_create(&OutcomeLabels {
                outcome: "rejected",
            })
            .inc();
        self.audit.record(
            "config_reload_rejected",
            || serde_json::json!({ "error": error }),
        );
    }

    /// Records a refused request (`status`, `refused`) from `client_ip`: counted (a `connect`
    /// refused after its signature verified also as a connection that could not be made; a
    /// refused signature by its exact cause), kept for the status page and written to the audit log.
    pub fn refused(
        &self,
        status: u16,
        refused: &Refused,
        connect: bool,
        client_ip: Option<std::net::IpAddr>,
    ) {
        let Refused { reason, auth_cause } = *refused;
        self.metrics
            .rejections
            .get_or_create(&FailureLabels { status, reason })
            .inc();
        if let Some(cause) = auth_cause {
            self.metrics
                .auth_failures
                .get_or_create(&CauseLabels { cause })
                .inc();
        }
        // A refused signature is an authentication failure, not a connection refused.
        if connect && auth_cause.is_none() {
            self.metrics.connect_failed(status, reason);
        }
        // In the log, refusals are rate-limited as its other refusal lines are (a flood of
        // strangers must not flood it); a file of its own gets every one.
        let left_out = if self.audit.is_file() {
            Some(0)
        } else {
            self.refusal_logs.audit.admit()
        };
        if let Some(left_out) = left_out {
            self.audit.record("request_refused", || {
                serde_json::json!({
                    "status": status,
                    "reason": reason,
                    "auth_cause": auth_cause,
                    "client_ip": client_ip,
                    "left_out": left_out,
                })
            });
        }
        let mut recent = self.recent_rejections.lock();
        if recent.len() >= RECENT_REJECTIONS {
            recent.pop_front();
        }
        recent.push_back(Rejection {
            time: ptth_common::audit::rfc3339_now(),
            reason,
            auth_cause,
            status,
            client_ip,
        });
    }

    /// Requests refused lately, newest last.
    pub fn recent_rejections(&self) -> Vec<Rejection> {
        self.recent_rejections.lock().iter().cloned().collect()
    }

    /// The ports of server `server` (by index) and whether it is online.
    pub fn server_view(&self, server: usize) -> (bool, Vec<PortView>) {
        let ports = self.ports(server);
        let ports = ports.lock();
        let mut view: Vec<PortView> = ports
            .ports
            .iter()
            .filter(|(_, p)| p.live > 0)
            .map(|(name, p)| PortView {
                name: name.to_string(),
                channels: p.live,
                ready: p.ready.len(),
                waiting: p.waiting.entries.len(),
            })
            .collect();
        view.sort_by(|a, b| a.name.cmp(&b.name));
        (ports.live > 0, view)
    }

    /// Joins `client`'s connection with `server` (see [`Tunnel::join`]).
    fn join(&self, client: &Arc<Channel>, server: &Arc<Channel>) -> Option<Arc<Tunnel>> {
        Tunnel::join(client, server, &self.channels.tunnels)
    }

    /// Announces `tunnel` (see [`Tunnel::announce`]) under the names of the directory in
    /// force.
    pub fn announce(&self, tunnel: &Tunnel) {
        let directory = self.directory();
        let name = |names: &[Name], i: usize| names.get(i).map(Name::to_string).unwrap_or_default();
        tunnel.announce(TunnelLabels {
            server: name(&directory.server_names, tunnel.server.server),
            port: tunnel.server.port.to_string(),
            client: tunnel
                .client
                .client()
                .map(|c| name(&directory.client_names, c))
                .unwrap_or_default(),
        });
    }

    /// The server retires its idle channel `server`: it leaves the port's ready queue, unless
    /// a connection took it already (`false`).
    pub fn retire(&self, server: &Channel) -> bool {
        let ports = self.ports(server.server);
        let mut ports = ports.lock();
        let Some(entry) = ports.ports.get_mut(&server.port) else {
            return true;
        };
        self.unready(entry, server.id) || server.tunnel().is_none()
    }

    /// A client's connection on `client`: joined with the oldest ready server channel of its
    /// port, or queued for the next one.
    pub fn offer(&self, client: &Arc<Channel>) -> Result<Offer<'_>, PortRefusal> {
        let server = self.ports(client.server);
        let mut server = server.lock();
        let entry = server.port(&client.port)?;
        while let Some(server) = entry.ready.front().cloned() {
            let tunnel = self.join(client, &server);
            if tunnel.is_none() && !client.is_free() {
                // The client's channel ended meanwhile; the server channel stays ready.
                return Ok(Offer::Closed);
            }
            entry.ready.pop_front();
            self.ready_count.send_modify(|n| *n = n.saturating_sub(1));
            self.metrics.listens_ready.dec();
            // Otherwise the server channel was retiring or had ended: the next one.
            if let Some(tunnel) = tunnel {
                entry.idle.remove(&server.id);
                return Ok(Offer::Joined(tunnel));
            }
        }
        let (to, rx) = oneshot::channel();
        let capacity = self.config.max_pending_connects;
        let number = entry
            .waiting
            .push(client, to, capacity)
            .ok_or(PortRefusal::QueueFull)?;
        let place = Place {
            shared: self,
            server: client.server,
            port: client.port.clone(),
            number,
            channel: client.id,
        };
        Ok(Offer::Waiting(rx, place))
    }
}

/// What changed between `before` and `after`, and how many channels were closed.
fn reload_summary(before: &Directory, after: &Directory, closed: usize) -> ReloadSummary {
    let mut summary = ReloadSummary {
        channels_closed: closed,
        ..ReloadSummary::default()
    };
    let slot = |v: &[Option<PublicKey>], i: usize| v.get(i).copied().flatten();
    for (i, name) in after.server_names.iter().enumerate() {
        match (slot(&before.server_keys, i), slot(&after.server_keys, i)) {
            (None, Some(_)) => summary.servers_added.push(name.to_string()),
            (Some(_), None) => summary.servers_removed.push(name.to_string()),
            _ => {}
        }
    }
    for (i, name) in after.client_names.iter().enumerate() {
        let allow_before = before.client_allow.get(i);
        match (slot(&before.client_keys, i), slot(&after.client_keys, i)) {
            (None, Some(_)) => summary.clients_added.push(name.to_string()),
            (Some(_), None) => summary.clients_removed.push(name.to_string()),
            (Some(a), Some(b)) if a != b || allow_before != Some(&after.client_allow[i]) => {
                summary.clients_changed.push(name.to_string())
            }
            _ => {}
        }
    }
    summary
}

/// The settings that differ between `running` and `loaded` and that a reload does not apply.
fn restart_needed(running: &RelayConfig, loaded: &RelayConfig) -> Vec<&'static str> {
    let (a, b) = (running, loaded);
    [
        ("listen", a.listen != b.listen),
        (
            "trusted_proxies",
            format!("{:?}", a.trusted_proxies) != format!("{:?}", b.trusted_proxies),
        ),
        ("tls_cert", a.tls_cert != b.tls_cert),
        ("tls_key", a.tls_key != b.tls_key),
        ("idle_timeout", a.idle_timeout != b.idle_timeout),
        (
            "http_idle_timeout",
            a.http_idle_timeout != b.http_idle_timeout,
        ),
        (
            "heartbeat_interval",
            a.heartbeat_interval != b.heartbeat_interval,
        ),
        ("accept_timeout", a.accept_timeout != b.accept_timeout),
        ("max_connections", a.max_connections != b.max_connections),
        (
            "max_connections_per_client",
            a.max_connections_per_client != b.max_connections_per_client,
        ),
        (
            "max_http_connections",
            a.max_http_connections != b.max_http_connections,
        ),
        (
            "max_http_connections_per_ip",
            a.max_http_connections_per_ip != b.max_http_connections_per_ip,
        ),
        ("max_nonces", a.max_nonces != b.max_nonces),
        (
            "max_listens_per_port",
            a.max_listens_per_port != b.max_listens_per_port,
        ),
        (
            "max_listens_per_server",
            a.max_listens_per_server != b.max_listens_per_server,
        ),
        (
            "max_pending_connects",
            a.max_pending_connects != b.max_pending_connects,
        ),
        ("admin_listen", a.admin_listen != b.admin_listen),
        ("audit_log", a.audit_log != b.audit_log),
        ("drain_grace", a.drain_grace != b.drain_grace),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

impl ServerPorts {
    /// `port`, if the server offers it now: online (a channel open on some port), and with a
    /// channel open on this one.
    fn port(&mut self, port: &Name) -> Result<&mut PortState, PortRefusal> {
        if self.live == 0 {
            return Err(PortRefusal::ServerOffline);
        }
        match self.ports.get_mut(port) {
            Some(p) if p.live > 0 => Ok(p),
            _ => Err(PortRefusal::PortNotOffered),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::Side;
    use ptth_common::keys::PrivateKey;

    fn shared(extra: &str) -> Shared {
        let key = || PrivateKey::generate().expect("key").public();
        let text = format!(
            "{extra}\n[[servers]]\nname = \"db\"\npublic_key = \"{}\"\n\
             [[servers]]\nname = \"web\"\npublic_key = \"{}\"\n\
             [[clients]]\nname = \"alice\"\npublic_key = \"{}\"\nallow = [\"db/*\"]\n",
            key(),
            key(),
            key()
        );
        let config =
            RelayConfig::from_str(std::path::Path::new("relay.toml"), &text).expect("config");
        Shared::new(config, CancellationToken::new())
    }

    fn name(n: &str) -> Name {
        Name::try_from(n.to_owned()).expect("name")
    }

    fn new_channel(s: &Shared, side: Side, server: usize, port: &str) -> Arc<Channel> {
        Channel::new(
            ChannelId::random().expect("id"),
            side,
            server,
            name(port),
            s.shutdown.child_token(),
        )
    }

    /// A server channel of `db` on `port`, counted and ready.
    fn server_channel(s: &Shared, port: &str) -> Arc<Channel> {
        let c = new_channel(s, Side::Server, 0, port);
        s.add_server_channel(&c).expect("added");
        s.ready(&c);
        c
    }

    #[test]
    fn a_connection_takes_the_oldest_ready_server_channel() {
        let s = shared("");
        let first = server_channel(&s, "pg");
        let _second = server_channel(&s, "pg");
        assert_eq!(*s.ready_server_channels().borrow(), 2);
        let client = new_channel(&s, Side::Client(0), 0, "pg");
        match s.offer(&client) {
            Ok(Offer::Joined(t)) => assert_eq!(t.server.id, first.id),
            other => panic!("{other:?}"),
        }
        assert_eq!(*s.ready_server_channels().borrow(), 1);
    }

    #[tokio::test]
    async fn a_connection_waits_for_the_next_ready_server_channel() {
        let s = shared("");
        let busy = server_channel(&s, "pg");
        let c1 = new_channel(&s, Side::Client(0), 0, "pg");
        let Ok(Offer::Joined(t1)) = s.offer(&c1) else {
            panic!("joined")
        };
        let c2 = new_channel(&s, Side::Client(0), 0, "pg");
        let Ok(Offer::Waiting(rx, _place)) = s.offer(&c2) else {
            panic!("waiting")
        };
        // The busy channel's connection ends: it is ready again and takes the waiting one.
        t1.direction_ended();
        t1.direction_ended();
        s.ready(&busy);
        let t2 = rx.await.expect("tunnel");
        assert_eq!((t2.client.id, t2.server.id), (c2.id, busy.id));
        assert_eq!(*s.ready_server_channels().borrow(), 0);
    }

    #[tokio::test]
    async fn a_retired_channel_leaves_the_ready_queue_unless_a_connection_took_it() {
        let s = shared("");
        let idle = server_channel(&s, "pg");
        assert!(s.retire(&idle));
        assert_eq!(*s.ready_server_channels().borrow(), 0);
        // Still open, so the port is offered: the next connection waits.
        let client = new_channel(&s, Side::Client(0), 0, "pg");
        let Ok(Offer::Waiting(rx, _place)) = s.offer(&client) else {
            panic!("waiting")
        };
        let taken = server_channel(&s, "pg");
        let tunnel = rx.await.expect("tunnel");
        assert_eq!(tunnel.server.id, taken.id);
        assert!(!s.retire(&taken));
    }

    #[tokio::test]
    async fn a_closed_channel_on_one_side_never_costs_the_other_side_its_place() {
        let s = shared("");
        let (first, second) = (server_channel(&s, "pg"), server_channel(&s, "pg"));
        // A client channel closed just before its connection is offered: the server
        // channels stay ready, in their order.
        let closed = new_channel(&s, Side::Client(0), 0, "pg");
        closed.close();
        assert!(matches!(s.offer(&closed), Ok(Offer::Closed)));
        assert_eq!(*s.ready_server_channels().borrow(), 2);
        let client = new_channel(&s, Side::Client(0), 0, "pg");
        let Ok(Offer::Joined(t)) = s.offer(&client) else {
            panic!("joined")
        };
        assert_eq!(t.server.id, first.id);
        let Ok(Offer::Joined(_)) = s.offer(&new_channel(&s, Side::Client(0), 0, "pg")) else {
            panic!("joined")
        };
        // A connection waits; a server channel that retires as it comes ready leaves it
        // waiting for the next one, which takes it.
        let waiting = new_channel(&s, Side::Client(0), 0, "pg");
        let Ok(Offer::Waiting(mut rx, _place)) = s.offer(&waiting) else {
            panic!("waiting")
        };
        let retiring = new_channel(&s, Side::Server, 0, "pg");
        s.add_server_channel(&retiring).expect("added");
        retiring.retire_if_idle();
        s.ready(&retiring);
        assert!(rx.try_recv().is_err(), "not joined with a retiring channel");
        let next = server_channel(&s, "pg");
        let tunnel = rx.await.expect("tunnel");
        assert_eq!((tunnel.client.id, tunnel.server.id), (waiting.id, next.id));
        assert_ne!(tunnel.server.id, second.id);
    }

    #[tokio::test]
    async fn a_port_left_by_its_last_server_channel_keeps_the_connections_waiting_on_it() {
        let s = shared("");
        let busy = server_channel(&s, "pg");
        let c1 = new_channel(&s, Side::Client(0), 0, "pg");
        let Ok(Offer::Joined(_)) = s.offer(&c1) else {
            panic!("joined")
        };
        let waiting = new_channel(&s, Side::Client(0), 0, "pg");
        s.channels.insert(waiting.clone()).expect("inserted");
        let Ok(Offer::Waiting(rx, _place)) = s.offer(&waiting) else {
            panic!("waiting")
        };
        // The server's last channel of the port ends (its server restarts, say) while a
        // connection waits: the port's client channels are kept, and a server channel that
        // comes takes the connection.
        busy.close();
        s.remove_server_channel(&busy);
        assert!(
            waiting.is_free(),
            "the waiting connection's channel is not retired"
        );
        let fresh = server_channel(&s, "pg");
        let tunnel = rx.await.expect("the waiting connection is served");
        assert_eq!((tunnel.client.id, tunnel.server.id), (waiting.id, fresh.id));
        // With no connection waiting, the port's idle client channels are retired.
        let idle = new_channel(&s, Side::Client(0), 0, "pg");
        s.channels.insert(idle.clone()).expect("inserted");
        tunnel.fail();
        fresh.close();
        s.remove_server_channel(&fresh);
        assert!(
            !idle.is_free(),
            "an idle client channel of an unoffered port retires"
        );
    }

    #[test]
    fn connections_are_refused_for_an_offline_server_and_an_unknown_port() {
        let s = shared("");
        let client = new_channel(&s, Side::Client(0), 0, "pg");
        assert_eq!(s.offer(&client).map(drop), Err(PortRefusal::ServerOffline));
        let server = server_channel(&s, "pg");
        let other = new_channel(&s, Side::Client(0), 0, "other");
        assert_eq!(s.offer(&other).map(drop), Err(PortRefusal::PortNotOffered));
        assert_eq!(
            s.port_status(1, &name("pg")),
            Err(PortRefusal::ServerOffline)
        );
        // Its last channel gone, the server is offline at once.
        server.cancel.cancel();
        s.remove_server_channel(&server);
        assert_eq!(
            s.port_status(0, &name("pg")),
            Err(PortRefusal::ServerOffline)
        );
        assert_eq!(*s.ready_server_channels().borrow(), 0);
    }

    #[test]
    fn idle_server_channels_and_ports_are_bounded() {
        let s = shared("max_listens_per_port = 2");
        let _a = server_channel(&s, "pg");
        let _b = server_channel(&s, "pg");
        let c = new_channel(&s, Side::Server, 0, "pg");
        assert_eq!(s.add_server_channel(&c), Err(ListenRefusal::PortListens));
        let mut held = Vec::new();
        for i in 1..MAX_PORTS_PER_SERVER {
            held.push(server_channel(&s, &format!("p{i}")));
        }
        let more = new_channel(&s, Side::Server, 0, "one-more");
        assert_eq!(s.add_server_channel(&more), Err(ListenRefusal::PortNames));
        // Ports without channels are forgotten to make room.
        let gone = held.pop().expect("one");
        s.remove_server_channel(&gone);
        assert_eq!(s.add_server_channel(&more), Ok(()));
        // Other servers have their own share.
        let web = new_channel(&s, Side::Server, 1, "pg");
        assert_eq!(s.add_server_channel(&web), Ok(()));
    }

    /// A connection to one server never waits on another server's ports (each has its own
    /// lock; with one lock for all, this test waits for good).
    #[test]
    fn a_connection_to_one_server_does_not_wait_on_another() {
        let s = Arc::new(shared(""));
        let _db = server_channel(&s, "pg");
        let web = new_channel(&s, Side::Server, 1, "pg");
        s.add_server_channel(&web).expect("added");
        s.ready(&web);
        // Server db's ports are busy (locked) for as long as this test runs.
        let db = s.ports(0);
        let _busy = db.lock();
        let (done, finished) = std::sync::mpsc::channel();
        let s2 = s.clone();
        std::thread::spawn(move || {
            let client = new_channel(&s2, Side::Client(0), 1, "pg");
            let joined = matches!(s2.offer(&client), Ok(Offer::Joined(_)));
            let _ = done.send(joined);
        });
        let joined = finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("a connection to web waited on db's lock");
        assert!(joined, "joined with web's ready channel");
    }

    #[test]
    fn idle_server_channels_are_bounded_per_server() {
        let s = shared("max_listens_per_server = 3");
        let _held: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|p| server_channel(&s, p))
            .collect();
        let d = new_channel(&s, Side::Server, 0, "d");
        assert_eq!(s.add_server_channel(&d), Err(ListenRefusal::ServerListens));
        // Another server is not held back by this one.
        let web = new_channel(&s, Side::Server, 1, "d");
        assert_eq!(s.add_server_channel(&web), Ok(()));
    }

    /// Counts the connections waiting on `port` of server `db`.
    fn queued(s: &Shared, port: &str) -> usize {
        s.ports(0).lock().ports[&name(port)].waiting.entries.len()
    }

    /// The size of the ports' queues in the tests below.
    const QUEUE: usize = 100;

    #[test]
    fn the_queue_of_a_port_is_bounded_and_empties_as_its_connections_leave() {
        let s = shared(&format!("max_pending_connects = {QUEUE}"));
        let busy = server_channel(&s, "pg");
        let first = new_channel(&s, Side::Client(0), 0, "pg");
        assert!(matches!(s.offer(&first), Ok(Offer::Joined(_))));
        let mut waiting = Vec::new();
        for _ in 0..QUEUE {
            let c = new_channel(&s, Side::Client(0), 0, "pg");
            match s.offer(&c) {
                Ok(Offer::Waiting(rx, place)) => waiting.push((rx, place)),
                other => panic!("{other:?}"),
            }
        }
        let over = new_channel(&s, Side::Client(0), 0, "pg");
        assert_eq!(s.offer(&over).map(drop), Err(PortRefusal::QueueFull));
        // Connections that gave up (their deadline passed, or their channel ended) leave.
        waiting.pop();
        assert_eq!(queued(&s, "pg"), QUEUE - 1);
        let Ok(Offer::Waiting(_rx, place)) = s.offer(&over) else {
            panic!("room for one more")
        };
        drop(place);
        waiting.clear();
        assert_eq!(queued(&s, "pg"), 0, "the queue empties");
        drop(busy);
    }

    #[test]
    fn one_client_cannot_take_a_port_queue_from_the_others() {
        let s = shared(&format!("max_pending_connects = {QUEUE}"));
        let _busy = server_channel(&s, "pg");
        let first = new_channel(&s, Side::Client(0), 0, "pg");
        assert!(matches!(s.offer(&first), Ok(Offer::Joined(_))));
        // Client 0 fills the queue alone: that is its share while no one else waits.
        let mut hog = Vec::new();
        for _ in 0..QUEUE {
            let c = new_channel(&s, Side::Client(0), 0, "pg");
            let Ok(Offer::Waiting(rx, place)) = s.offer(&c) else {
                panic!("waiting")
            };
            hog.push((c, rx, place));
        }
        // Client 1 still gets in: client 0's newest connection is pushed out, and fails.
        let other = new_channel(&s, Side::Client(1), 0, "pg");
        let Ok(Offer::Waiting(_rx, _place)) = s.offer(&other) else {
            panic!("the other client waits too")
        };
        let (newest, mut pushed_out, _) = hog.pop().expect("one");
        assert!(pushed_out.try_recv().is_err(), "its place is gone");
        match newest.poll_message(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
            std::task::Poll::Ready(ToDownload::Fail(reason)) => {
                assert_eq!(reason, "too many pending connections");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(queued(&s, "pg"), QUEUE);
        // Client 0 has more than its half now: it waits its turn.
        let more = new_channel(&s, Side::Client(0), 0, "pg");
        assert_eq!(s.offer(&more).map(drop), Err(PortRefusal::QueueFull));
        // The oldest connection is still served first.
        let _next = server_channel(&s, "pg");
        let (oldest, rx, _) = &mut hog[0];
        let tunnel = rx
            .try_recv()
            .expect("the oldest waiting connection is served");
        assert_eq!(tunnel.client.id, oldest.id);
    }

    #[test]
    fn a_reload_closes_only_the_channels_it_no_longer_allows_and_keeps_slots() {
        let key = || PrivateKey::generate().expect("key").public();
        let (db, web, alice, bob) = (key(), key(), key(), key());
        let text = |alice_allow: &str, with_web: bool| {
            let mut t = format!(
                "[[servers]]\nname = \"db\"\npublic_key = \"{db}\"\n\
                 [[clients]]\nname = \"alice\"\npublic_key = \"{alice}\"\nallow = [{alice_allow}]\n\
                 [[clients]]\nname = \"bob\"\npublic_key = \"{bob}\"\nallow = [\"db/*\"]\n"
            );
            if with_web {
                t.push_str(&format!(
                    "[[servers]]\nname = \"web\"\npublic_key = \"{web}\"\n"
                ));
            }
            RelayConfig::from_str(std::path::Path::new("relay.toml"), &t).expect("config")
        };
        let s = Arc::new(Shared::new(
            text("\"db/*\"", true),
            CancellationToken::new(),
        ));
        let open = |side, server, port: &str| {
            let c = new_channel(&s, side, server, port);
            s.channels.insert(c.clone()).expect("inserted");
            c
        };
        let (db_pg, web_pg) = (open(Side::Server, 0, "pg"), open(Side::Server, 1, "pg"));
        let (alice_pg, alice_ssh) = (
            open(Side::Client(0), 0, "pg"),
            open(Side::Client(0), 0, "ssh"),
        );
        let bob_pg = open(Side::Client(1), 0, "pg");
        let before = s.directory();
        // alice keeps db/pg only; web goes away.
        s.reload(text("\"db/pg\"", false));
        let after = s.directory();
        assert_eq!(after.generation, before.generation + 1);
        assert!(web_pg.cancel.is_cancelled(), "a removed server's channel");
        assert!(alice_ssh.cancel.is_cancelled(), "a port no longer allowed");
        for kept in [&db_pg, &alice_pg, &bob_pg] {
            assert!(!kept.cancel.is_cancelled(), "still allowed");
        }
        assert_eq!(after.server("web"), None);
        assert_eq!(after.server("db"), Some(0));
        // Back again: web gets its old slot.
        s.reload(text("\"db/pg\"", true));
        assert_eq!(s.directory().server("web"), Some(1));
        // A channel allowed under an older directory is refused when it is entered.
        let late = new_channel(&s, Side::Client(1), 0, "pg");
        let refused = s.open_channel(&late, before.generation, tracing::Span::none());
        assert!(matches!(refused, Err(OpenRefusal::Reloaded)));
        assert!(s.channels.get(late.id).is_none());
    }
}
