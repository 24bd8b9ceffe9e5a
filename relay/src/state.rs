//! The relay's shared state: who is who (keys, names, allow lists), the ports each server
//! offers with their idle server channels and the client connections waiting for one, and the
//! table of channels (`channel.rs`). Joining a client's connection with a server channel happens
//! here.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use ptth_common::auth::Verifier;
use ptth_common::config::{Grant, Name, RelayConfig};
use ptth_common::protocol::ChannelId;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug};

use crate::channel::{Channel, Channels, TableRefusal, Tunnel};
use crate::log_limit::RefusalLogs;

/// Who signed a request: a server or a client, by its index in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Principal {
    Server(usize),
    Client(usize),
}

/// Most distinct ports remembered per server.
pub(crate) const MAX_PORTS_PER_SERVER: usize = 256;
/// Most client connections waiting on one port for a server channel.
pub(crate) const MAX_QUEUED_CONNECTS: usize = 16 * 1024;

/// A server (by index) and one of its port names.
type PortKey = (usize, Name);

/// A client connection waiting for a server channel: its channel, and where the tunnel goes.
type Waiting = (Arc<Channel>, oneshot::Sender<Arc<Tunnel>>);

/// Channels of one (server, port).
#[derive(Debug, Default)]
struct PortState {
    /// Idle server channels whose upload has arrived, oldest first: ready for a connection.
    ready: VecDeque<Arc<Channel>>,
    /// Server channels that carry no connection (ready, or still without their upload).
    idle: HashSet<ChannelId>,
    /// Server channels alive, idle or not: the port is offered while there is one.
    live: usize,
    /// Client connections waiting for a server channel, oldest first.
    waiting: VecDeque<Waiting>,
}

/// Why a `listen` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListenRefusal {
    /// The server already uses [`MAX_PORTS_PER_SERVER`] port names.
    TooManyPorts,
    /// `max_listens_per_port` idle channels are open on this port already.
    TooManyListens,
}

/// Why a channel could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenRefusal {
    /// The channel table refused it.
    Table(TableRefusal),
    /// Its port refused a server channel.
    Listen(ListenRefusal),
}

/// Why a client cannot have a connection to a port now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PortRefusal {
    /// The server has no channel open on any port.
    ServerOffline,
    /// The server is online but has no channel open on this port.
    PortNotOffered,
    /// [`MAX_QUEUED_CONNECTS`] connections already wait for a server channel of this port.
    QueueFull,
}

impl PortRefusal {
    /// The reason given to the client.
    pub fn reason(self) -> &'static str {
        match self {
            Self::ServerOffline => "server offline",
            Self::PortNotOffered => "server does not offer this port",
            Self::QueueFull => "too many pending connections",
        }
    }
}

/// What a client's connection gets.
#[derive(Debug)]
pub(crate) enum Offer {
    /// A server channel at once.
    Joined(Arc<Tunnel>),
    /// A place in the port's queue: the tunnel comes when a server channel is ready.
    Waiting(oneshot::Receiver<Arc<Tunnel>>),
}

/// Shared state of one relay.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: RelayConfig,
    pub verifier: Verifier<Principal>,
    server_index: HashMap<String, usize>,
    pub server_names: Vec<Name>,
    pub client_names: Vec<Name>,
    pub client_allow: Vec<Vec<Grant>>,
    /// The configured `authorities`, lowercased, each `host:443` and `host:80` also as `host`.
    pub authorities: Vec<String>,
    ports: Mutex<HashMap<PortKey, PortState>>,
    pub channels: Channels,
    /// Server channels ready for a connection, observable from outside.
    ready_count: watch::Sender<usize>,
    /// Cancelled when the relay shuts down; every channel's token is a child.
    pub shutdown: CancellationToken,
    /// Every task the relay starts.
    pub tasks: TaskTracker,
    /// The rate limits of the refusals the relay logs.
    pub refusal_logs: RefusalLogs,
}

impl Shared {
    /// State for `config`, ending with `shutdown`.
    pub fn new(config: RelayConfig, shutdown: CancellationToken) -> Self {
        let mut keys = Vec::new();
        let mut server_index = HashMap::new();
        let mut server_names = Vec::new();
        for (i, s) in config.servers.iter().enumerate() {
            keys.push((s.public_key, Principal::Server(i)));
            server_index.insert(s.name.as_str().to_owned(), i);
            server_names.push(s.name.clone());
        }
        let mut client_names = Vec::new();
        let mut client_allow = Vec::new();
        for (i, c) in config.clients.iter().enumerate() {
            keys.push((c.public_key, Principal::Client(i)));
            client_names.push(c.name.clone());
            client_allow.push(c.allow.clone());
        }
        // Clients leave a scheme's default port out of what they sign: `host:443` and
        // `host:80` also stand for the bare host.
        let mut authorities: Vec<String> = Vec::new();
        for a in &config.authorities {
            let a = a.to_ascii_lowercase();
            let bare = a
                .strip_suffix(":443")
                .or_else(|| a.strip_suffix(":80"))
                .map(str::to_owned);
            for name in std::iter::once(a).chain(bare) {
                if !authorities.contains(&name) {
                    authorities.push(name);
                }
            }
        }
        Self {
            verifier: Verifier::new(keys, config.max_nonces),
            server_index,
            server_names,
            client_names,
            client_allow,
            authorities,
            ports: Mutex::new(HashMap::new()),
            channels: Channels::new(
                config.clients.len(),
                config.max_connections,
                config.max_connections_per_client,
            ),
            ready_count: watch::Sender::new(0),
            shutdown,
            tasks: TaskTracker::new(),
            refusal_logs: RefusalLogs::default(),
            config,
        }
    }

    /// The index of the server named `name`.
    pub fn server(&self, name: &str) -> Option<usize> {
        self.server_index.get(name).copied()
    }

    /// Watches the number of server channels ready for a connection.
    pub fn ready_server_channels(&self) -> watch::Receiver<usize> {
        self.ready_count.subscribe()
    }

    /// Whether `server` offers `port` now: online (a channel open on some port), and with a
    /// channel open on this one.
    pub fn port_status(&self, server: usize, port: &Name) -> Result<(), PortRefusal> {
        let ports = self.ports.lock();
        let offered = |(s, _): &PortKey, p: &PortState| *s == server && p.live > 0;
        if !ports.iter().any(|(k, p)| offered(k, p)) {
            return Err(PortRefusal::ServerOffline);
        }
        match ports.get(&(server, port.clone())) {
            Some(p) if p.live > 0 => Ok(()),
            _ => Err(PortRefusal::PortNotOffered),
        }
    }

    /// Opens `channel`: enters it in the table and, a server's, counts it on its port; then
    /// starts the task, in `span`, that frees it once it ends (`Channels::reap`).
    pub fn open_channel(
        self: &Arc<Self>,
        channel: &Arc<Channel>,
        span: tracing::Span,
    ) -> Result<(), OpenRefusal> {
        self.channels
            .insert(channel.clone())
            .map_err(OpenRefusal::Table)?;
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
        let key = (channel.server, channel.port.clone());
        let mut ports = self.ports.lock();
        let full = |ports: &HashMap<PortKey, PortState>| {
            ports.keys().filter(|(s, _)| *s == channel.server).count() >= MAX_PORTS_PER_SERVER
        };
        if !ports.contains_key(&key) && full(&ports) {
            // Forget this server's ports that have no channel and no waiting client.
            ports.retain(|(s, _), p| *s != channel.server || p.live > 0 || !p.waiting.is_empty());
        }
        if !ports.contains_key(&key) && full(&ports) {
            return Err(ListenRefusal::TooManyPorts);
        }
        let entry = ports.entry(key).or_default();
        if entry.idle.len() >= self.config.max_listens_per_port {
            return Err(ListenRefusal::TooManyListens);
        }
        entry.live += 1;
        entry.idle.insert(channel.id);
        Ok(())
    }

    /// Forgets a server channel that has ended.
    fn remove_server_channel(&self, channel: &Channel) {
        let mut ports = self.ports.lock();
        let Some(entry) = ports.get_mut(&(channel.server, channel.port.clone())) else {
            return;
        };
        entry.live = entry.live.saturating_sub(1);
        entry.idle.remove(&channel.id);
        self.unready(entry, channel.id);
    }

    /// Takes server channel `id` out of `entry`'s ready queue: whether it was there.
    fn unready(&self, entry: &mut PortState, id: ChannelId) -> bool {
        let before = entry.ready.len();
        entry.ready.retain(|c| c.id != id);
        let was_ready = entry.ready.len() != before;
        if was_ready {
            self.ready_count.send_modify(|n| *n = n.saturating_sub(1));
        }
        was_ready
    }

    /// A server channel is ready for a connection (its upload has arrived, or its last
    /// connection has ended): it takes the oldest waiting client connection, or waits for one.
    pub fn ready(&self, server: &Arc<Channel>) {
        let mut ports = self.ports.lock();
        if server.cancel.is_cancelled() {
            return;
        }
        let Some(entry) = ports.get_mut(&(server.server, server.port.clone())) else {
            return;
        };
        entry.idle.insert(server.id);
        while let Some((client, to)) = entry.waiting.pop_front() {
            if client.cancel.is_cancelled() || to.is_closed() {
                continue;
            }
            let Some(tunnel) = Tunnel::join(&client, server, &self.channels.tunnels) else {
                continue;
            };
            entry.idle.remove(&server.id);
            if let Err(tunnel) = to.send(tunnel) {
                // The client gave up just now.
                tunnel.fail();
            }
            return;
        }
        entry.ready.push_back(server.clone());
        self.ready_count.send_modify(|n| *n += 1);
    }

    /// The server retires its idle channel `server`: it leaves the port's ready queue, unless
    /// a connection took it already (`false`).
    pub fn retire(&self, server: &Channel) -> bool {
        let mut ports = self.ports.lock();
        let Some(entry) = ports.get_mut(&(server.server, server.port.clone())) else {
            return true;
        };
        self.unready(entry, server.id) || server.tunnel().is_none()
    }

    /// A client's connection on `client`: joined with the oldest ready server channel of its
    /// port, or queued for the next one.
    pub fn offer(&self, client: &Arc<Channel>) -> Result<Offer, PortRefusal> {
        self.port_status(client.server, &client.port)?;
        let mut ports = self.ports.lock();
        let Some(entry) = ports.get_mut(&(client.server, client.port.clone())) else {
            return Err(PortRefusal::PortNotOffered);
        };
        while let Some(server) = entry.ready.pop_front() {
            self.ready_count.send_modify(|n| *n = n.saturating_sub(1));
            if server.cancel.is_cancelled() {
                continue;
            }
            let Some(tunnel) = Tunnel::join(client, &server, &self.channels.tunnels) else {
                continue;
            };
            entry.idle.remove(&server.id);
            return Ok(Offer::Joined(tunnel));
        }
        entry
            .waiting
            .retain(|(c, to)| !c.cancel.is_cancelled() && !to.is_closed());
        if entry.waiting.len() >= MAX_QUEUED_CONNECTS {
            return Err(PortRefusal::QueueFull);
        }
        let (to, rx) = oneshot::channel();
        entry.waiting.push_back((client.clone(), to));
        Ok(Offer::Waiting(rx))
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
        let Ok(Offer::Waiting(rx)) = s.offer(&c2) else {
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
        let Ok(Offer::Waiting(rx)) = s.offer(&client) else {
            panic!("waiting")
        };
        let taken = server_channel(&s, "pg");
        let tunnel = rx.await.expect("tunnel");
        assert_eq!(tunnel.server.id, taken.id);
        assert!(!s.retire(&taken));
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
        assert_eq!(s.add_server_channel(&c), Err(ListenRefusal::TooManyListens));
        let mut held = Vec::new();
        for i in 1..MAX_PORTS_PER_SERVER {
            held.push(server_channel(&s, &format!("p{i}")));
        }
        let more = new_channel(&s, Side::Server, 0, "one-more");
        assert_eq!(
            s.add_server_channel(&more),
            Err(ListenRefusal::TooManyPorts)
        );
        // Ports without channels are forgotten to make room.
        let gone = held.pop().expect("one");
        s.remove_server_channel(&gone);
        assert_eq!(s.add_server_channel(&more), Ok(()));
        // Other servers have their own share.
        let web = new_channel(&s, Side::Server, 1, "pg");
        assert_eq!(s.add_server_channel(&web), Ok(()));
    }

    #[test]
    fn the_queue_of_a_port_is_bounded() {
        let s = shared("max_connections = 20000");
        let busy = server_channel(&s, "pg");
        let first = new_channel(&s, Side::Client(0), 0, "pg");
        assert!(matches!(s.offer(&first), Ok(Offer::Joined(_))));
        let mut queued = Vec::new();
        for _ in 0..MAX_QUEUED_CONNECTS {
            let c = new_channel(&s, Side::Client(0), 0, "pg");
            match s.offer(&c) {
                Ok(Offer::Waiting(rx)) => queued.push(rx),
                other => panic!("{other:?}"),
            }
        }
        let over = new_channel(&s, Side::Client(0), 0, "pg");
        assert_eq!(s.offer(&over).map(drop), Err(PortRefusal::QueueFull));
        // Waiters that gave up make room.
        queued.pop();
        assert!(matches!(s.offer(&over), Ok(Offer::Waiting(_))));
        drop(busy);
    }
}
