//! The relay's shared state: who is who (keys, names, allow lists), which ports each server
//! offers with the `listen`s waiting on them and the connections queued for them, and a handle
//! on the table of connections (`conn.rs`). Offering a connection to a server and handing it to a `listen` happen
//! here.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use ptth_common::auth::Verifier;
use ptth_common::config::{Grant, Name, RelayConfig};
use ptth_common::protocol::ConnId;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::conn::{Conn, Connections, TableRefusal};

/// Who signed a request: a server or a client, by its index in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Principal {
    Server(usize),
    Client(usize),
}

/// Most distinct ports remembered per server.
pub(crate) const MAX_PORTS_PER_SERVER: usize = 256;
/// Most connections queued for one port while no `listen` is waiting.
pub(crate) const MAX_QUEUED_CONNECTS: usize = 16 * 1024;
/// A port counts as offered for this long after a `listen` on it was answered, while the
/// server re-issues it. A listen that dies unanswered (its server went away) gives no grace,
/// so that connects to a dead server are refused at once.
pub(crate) const PORT_GRACE: Duration = Duration::from_secs(5);

/// A server (by index) and one of its port names.
type PortKey = (usize, String);

/// Listening state of one (server, port).
#[derive(Debug, Default)]
struct PortState {
    /// Waiting `listen`s, oldest first.
    listeners: VecDeque<oneshot::Sender<ConnId>>,
    /// Connections offered while no `listen` was waiting, oldest first.
    queued: VecDeque<ConnId>,
    /// When a listen on this port was last answered (a client, or an empty answer).
    answered: Option<Instant>,
}

impl PortState {
    fn prune(&mut self) {
        self.listeners.retain(|l| !l.is_closed());
    }

    fn in_grace(&self, now: Instant) -> bool {
        self.answered
            .is_some_and(|t| now.duration_since(t) < PORT_GRACE)
    }

    /// Whether the server offers this port now.
    fn live(&mut self, now: Instant) -> bool {
        self.prune();
        !self.listeners.is_empty() || self.in_grace(now)
    }
}

/// Why a `listen` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListenRefusal {
    /// The server already uses [`MAX_PORTS_PER_SERVER`] port names.
    TooManyPorts,
    /// `max_listens_per_port` listens already wait on this port.
    TooManyListens,
}

/// Why a connection could not be offered to its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OfferRefusal {
    /// No port of the server is offered.
    ServerOffline,
    /// The server is online but does not offer this port.
    PortNotOffered,
    /// The table of connections refused it (a limit, or its ID is in use).
    Table(TableRefusal),
    /// [`MAX_QUEUED_CONNECTS`] connections already wait for a `listen` on this port.
    QueueFull,
}

/// What a new `listen` gets.
#[derive(Debug)]
pub(crate) enum ListenStart<'a> {
    /// A connection that was queued for the port.
    Handed(ConnId),
    /// Nothing yet: wait for a connection.
    Waiting(PendingListen<'a>),
}

/// The relay is shutting down.
#[derive(Debug)]
pub(crate) struct ShuttingDown;

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
    pub conns: Arc<Connections>,
    /// Number of `listen`s waiting, observable from outside.
    listen_count: watch::Sender<usize>,
    /// Cancelled when the relay shuts down; every connection's token is a child.
    pub shutdown: CancellationToken,
    /// Every task the relay starts.
    pub tasks: TaskTracker,
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
            conns: Arc::new(Connections::new(
                config.clients.len(),
                config.max_connections,
                config.max_connections_per_client,
            )),
            listen_count: watch::Sender::new(0),
            shutdown,
            tasks: TaskTracker::new(),
            config,
        }
    }

    /// The index of the server named `name`.
    pub fn server(&self, name: &str) -> Option<usize> {
        self.server_index.get(name).copied()
    }

    /// Watches the number of `listen`s waiting.
    pub fn listens(&self) -> watch::Receiver<usize> {
        self.listen_count.subscribe()
    }

    /// A `listen` of `server` on `port`: a queued connection at once, or a place in the port's
    /// queue of waiting listens.
    pub fn listen(&self, server: usize, port: &str) -> Result<ListenStart<'_>, ListenRefusal> {
        let (tx, rx) = oneshot::channel();
        let key = (server, port.to_owned());
        let mut ports = self.ports.lock();
        let full = |ports: &HashMap<PortKey, PortState>| {
            ports.keys().filter(|(s, _)| *s == server).count() >= MAX_PORTS_PER_SERVER
        };
        if !ports.contains_key(&key) && full(&ports) {
            // Forget this server's ports that nobody listens on any more.
            let now = Instant::now();
            ports.retain(|(s, _), p| *s != server || p.live(now) || !p.queued.is_empty());
        }
        if !ports.contains_key(&key) && full(&ports) {
            return Err(ListenRefusal::TooManyPorts);
        }
        let entry = ports.entry(key.clone()).or_default();
        // A client already waiting gets this listen at once.
        while let Some(id) = entry.queued.pop_front() {
            if self.conns.get(id).is_some_and(|c| !c.cancel.is_cancelled()) {
                entry.answered = Some(Instant::now());
                return Ok(ListenStart::Handed(id));
            }
        }
        entry.prune();
        if entry.listeners.len() >= self.config.max_listens_per_port {
            return Err(ListenRefusal::TooManyListens);
        }
        entry.listeners.push_back(tx);
        drop(ports);
        self.listen_count.send_modify(|n| *n += 1);
        Ok(ListenStart::Waiting(PendingListen {
            shared: self,
            key,
            rx,
            answered: false,
        }))
    }

    /// Offers the new connection `conn` to its server's `port`: hands it to the oldest waiting
    /// `listen`, or queues it for the next one. The connection joins the table here, within
    /// its limits.
    pub fn offer(&self, conn: &Arc<Conn>, port: &str) -> Result<(), OfferRefusal> {
        let server = conn.server;
        // Lock order: ports, then the connection table.
        let mut ports = self.ports.lock();
        let now = Instant::now();
        let online = ports
            .iter_mut()
            .filter(|((s, _), _)| *s == server)
            .fold(false, |any, (_, p)| p.live(now) || any);
        if !online {
            return Err(OfferRefusal::ServerOffline);
        }
        // `live` above pruned every listener of this server.
        let Some(entry) = ports
            .get_mut(&(server, port.to_owned()))
            .filter(|p| !p.listeners.is_empty() || p.in_grace(now))
        else {
            return Err(OfferRefusal::PortNotOffered);
        };
        self.conns
            .insert(conn.clone())
            .map_err(OfferRefusal::Table)?;
        while let Some(l) = entry.listeners.pop_front() {
            if l.send(conn.id).is_ok() {
                // The listen just answered is about to be re-issued: the port stays offered
                // meanwhile.
                entry.answered = Some(now);
                return Ok(());
            }
        }
        if entry.queued.len() >= MAX_QUEUED_CONNECTS {
            self.conns.remove(conn.id);
            return Err(OfferRefusal::QueueFull);
        }
        entry.queued.push_back(conn.id);
        Ok(())
    }
}

/// A `listen` waiting at its port. Dropped unanswered (its HTTP connection went away), it ends
/// the port's grace: the server is then most likely gone, and connects to it must get `503` at
/// once rather than wait in the queue. A server that is still there re-issues its listen,
/// which makes the port live again.
#[derive(Debug)]
pub(crate) struct PendingListen<'a> {
    shared: &'a Shared,
    key: PortKey,
    rx: oneshot::Receiver<ConnId>,
    answered: bool,
}

impl PendingListen<'_> {
    /// Waits for a connection: `Ok(None)` after `listen_timeout`, an error if the relay shuts
    /// down first.
    pub async fn wait(mut self) -> Result<Option<ConnId>, ShuttingDown> {
        let shared = self.shared;
        let answer = tokio::select! {
            r = &mut self.rx => r.ok(),
            () = tokio::time::sleep(shared.config.listen_timeout) => {
                // Closed and marked answered at once, under the lock that offers take: an
                // offer never sees this port with its listen closed and no grace yet.
                let mut ports = shared.ports.lock();
                self.rx.close();
                if let Some(e) = ports.get_mut(&self.key) {
                    e.answered = Some(Instant::now());
                }
                self.rx.try_recv().ok()
            }
            () = shared.shutdown.cancelled() => {
                self.rx.close();
                Some(self.rx.try_recv().map_err(|_| ShuttingDown)?)
            }
        };
        // Answered: an offer marked the port when it handed over its ID, the timeout arm above
        // when it closed the listen.
        self.answered = true;
        Ok(answer)
    }
}

impl Drop for PendingListen<'_> {
    fn drop(&mut self) {
        if !self.answered
            && let Some(e) = self.shared.ports.lock().get_mut(&self.key)
        {
            e.answered = None;
        }
        self.shared
            .listen_count
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    fn new_conn(s: &Shared, server: usize) -> Arc<Conn> {
        Conn::new(
            ConnId::random().expect("id"),
            server,
            0,
            s.shutdown.child_token(),
        )
        .0
    }

    fn waiting<'a>(start: Result<ListenStart<'a>, ListenRefusal>) -> PendingListen<'a> {
        match start {
            Ok(ListenStart::Waiting(p)) => p,
            other => panic!("expected a waiting listen, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_offer_goes_to_the_waiting_listen() {
        let s = shared("");
        let listen = waiting(s.listen(0, "pg"));
        assert_eq!(*s.listens().borrow(), 1);
        let c = new_conn(&s, 0);
        s.offer(&c, "pg").expect("offered");
        assert_eq!(listen.wait().await.expect("not shut down"), Some(c.id));
        assert_eq!(*s.listens().borrow(), 0);
        assert!(s.conns.get(c.id).is_some());
    }

    #[tokio::test]
    async fn offers_are_refused_for_an_offline_server_and_an_unknown_port() {
        let s = shared("");
        let c = new_conn(&s, 0);
        assert_eq!(s.offer(&c, "pg"), Err(OfferRefusal::ServerOffline));
        let _listen = waiting(s.listen(0, "pg"));
        assert_eq!(s.offer(&c, "other"), Err(OfferRefusal::PortNotOffered));
        let web = new_conn(&s, 1);
        assert_eq!(s.offer(&web, "pg"), Err(OfferRefusal::ServerOffline));
        assert!(s.conns.get(c.id).is_none(), "refused offers leave no state");
    }

    #[tokio::test]
    async fn an_answered_port_stays_offered_and_queues_until_the_next_listen() {
        let s = shared("");
        let first = waiting(s.listen(0, "pg"));
        let a = new_conn(&s, 0);
        s.offer(&a, "pg").expect("a");
        assert_eq!(first.wait().await.expect("not shutting down"), Some(a.id));
        // No listen waits, but the port is in its grace: the next offer is queued...
        let b = new_conn(&s, 0);
        s.offer(&b, "pg").expect("queued");
        // ...and handed to the next listen at once.
        match s.listen(0, "pg") {
            Ok(ListenStart::Handed(id)) => assert_eq!(id, b.id),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_listen_dropped_unanswered_ends_the_grace() {
        let s = shared("");
        let first = waiting(s.listen(0, "pg"));
        let a = new_conn(&s, 0);
        s.offer(&a, "pg").expect("a");
        assert_eq!(first.wait().await.expect("not shutting down"), Some(a.id));
        // The server re-issues its listen and then goes away without an answer.
        drop(waiting(s.listen(0, "pg")));
        let b = new_conn(&s, 0);
        assert_eq!(s.offer(&b, "pg"), Err(OfferRefusal::ServerOffline));
    }

    #[tokio::test(start_paused = true)]
    async fn a_listen_times_out_empty_and_keeps_the_port_offered() {
        let s = shared("listen_timeout = \"1s\"");
        let listen = waiting(s.listen(0, "pg"));
        assert_eq!(listen.wait().await.expect("not shutting down"), None);
        let c = new_conn(&s, 0);
        s.offer(&c, "pg").expect("queued during the grace");
        tokio::time::advance(PORT_GRACE).await;
        let d = new_conn(&s, 0);
        assert_eq!(s.offer(&d, "pg"), Err(OfferRefusal::ServerOffline));
    }

    #[tokio::test]
    async fn shutdown_refuses_a_waiting_listen() {
        let s = shared("");
        let listen = waiting(s.listen(0, "pg"));
        s.shutdown.cancel();
        assert!(listen.wait().await.is_err());
    }

    #[tokio::test]
    async fn listens_and_ports_are_bounded() {
        let s = shared("max_listens_per_port = 2");
        let _a = waiting(s.listen(0, "pg"));
        let _b = waiting(s.listen(0, "pg"));
        assert_eq!(
            s.listen(0, "pg").map(drop),
            Err(ListenRefusal::TooManyListens)
        );
        let mut held = Vec::new();
        for i in 1..MAX_PORTS_PER_SERVER {
            held.push(waiting(s.listen(0, &format!("p{i}"))));
        }
        assert_eq!(
            s.listen(0, "one-more").map(drop),
            Err(ListenRefusal::TooManyPorts)
        );
        // Ports nobody listens on any more are forgotten to make room.
        drop(held.pop());
        assert!(matches!(
            s.listen(0, "one-more"),
            Ok(ListenStart::Waiting(_))
        ));
        // Other servers have their own share.
        assert!(matches!(s.listen(1, "pg"), Ok(ListenStart::Waiting(_))));
    }

    #[tokio::test]
    async fn the_queue_of_a_port_is_bounded_and_limits_apply() {
        let s = shared("max_connections = 20000");
        let first = waiting(s.listen(0, "pg"));
        let a = new_conn(&s, 0);
        s.offer(&a, "pg").expect("a");
        assert_eq!(first.wait().await.expect("not shutting down"), Some(a.id));
        for _ in 0..MAX_QUEUED_CONNECTS {
            s.offer(&new_conn(&s, 0), "pg").expect("queued");
        }
        let over = new_conn(&s, 0);
        assert_eq!(s.offer(&over, "pg"), Err(OfferRefusal::QueueFull));
        assert!(s.conns.get(over.id).is_none());

        let s = shared("max_connections = 1");
        let _listen = waiting(s.listen(0, "pg"));
        s.offer(&new_conn(&s, 0), "pg").expect("first");
        assert_eq!(
            s.offer(&new_conn(&s, 0), "pg"),
            Err(OfferRefusal::Table(TableRefusal::RelayFull))
        );
    }
}
