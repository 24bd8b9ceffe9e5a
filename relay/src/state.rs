//! The relay's in-memory state: who is listening on which port, and open connections.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ptth_common::auth::Verifier;
use ptth_common::config::{Grant, Name, RelayConfig};
use ptth_common::protocol::ConnId;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::pipe::Upload;

/// Who signed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Principal {
    Server(usize),
    Client(usize),
}

/// Most distinct ports remembered per server.
pub(crate) const MAX_PORTS_PER_SERVER: usize = 256;
/// Most connects queued for one port while no `listen` is waiting.
pub(crate) const MAX_QUEUED_CONNECTS: usize = 1024;
/// A port counts as offered for this long after a `listen` on it was answered, while the
/// server re-issues it. A listen that dies unanswered (its server went away) gives no grace,
/// so that connects to a dead server are refused at once.
pub(crate) const PORT_GRACE: Duration = Duration::from_secs(5);

/// Listening state of one (server, port).
#[derive(Debug)]
pub(crate) struct PortState {
    pub listeners: VecDeque<oneshot::Sender<ConnId>>,
    pub queued: VecDeque<ConnId>,
    /// When a listen on this port was last answered (a client, or an empty answer).
    pub answered: Option<Instant>,
}

impl PortState {
    pub fn prune(&mut self) {
        self.listeners.retain(|l| !l.is_closed());
    }

    fn in_grace(&self, now: Instant) -> bool {
        self.answered
            .is_some_and(|t| now.duration_since(t) < PORT_GRACE)
    }

    /// Whether the server offers this port now (without pruning).
    pub fn live_ro(&self, now: Instant) -> bool {
        self.listeners.iter().any(|l| !l.is_closed()) || self.in_grace(now)
    }

    /// Whether the server offers this port now.
    pub fn live(&mut self, now: Instant) -> bool {
        self.prune();
        !self.listeners.is_empty() || self.in_grace(now)
    }
}

/// How the server answered an offered connection.
#[derive(Debug)]
pub(crate) enum AcceptOutcome {
    Accepted,
    Refused,
}

/// One-time hand-over points of a connection, each taken once.
#[derive(Debug, Default)]
pub(crate) struct Slots {
    pub accept: Option<oneshot::Sender<AcceptOutcome>>,
    /// Upstream request body goes to the `accept` response.
    pub up_tx: Option<oneshot::Sender<Upload>>,
    pub up_rx: Option<oneshot::Receiver<Upload>>,
    /// Downstream request body goes to the `connect` response.
    pub down_tx: Option<oneshot::Sender<Upload>>,
    /// Fired when the upstream request arrives (the `connect` response then says ATTACHED).
    pub up_attached: Option<oneshot::Sender<()>>,
    /// Fired when the downstream request arrives (the `accept` response then says ATTACHED).
    pub down_attached: Option<oneshot::Sender<()>>,
    /// The `accept` response's half of `down_attached`.
    pub down_attached_rx: Option<oneshot::Receiver<()>>,
    pub accepted: bool,
}

/// An open or pending connection.
#[derive(Debug)]
pub(crate) struct Conn {
    pub id: ConnId,
    pub server: usize,
    pub client: usize,
    pub cancel: CancellationToken,
    pub slots: Mutex<Slots>,
    started: Instant,
    activity_ms: AtomicU64,
    done: AtomicU8,
    pub finished: Notify,
}

impl Conn {
    pub fn new(
        id: ConnId,
        server: usize,
        client: usize,
        cancel: CancellationToken,
        slots: Slots,
    ) -> Self {
        Self {
            id,
            server,
            client,
            cancel,
            slots: Mutex::new(slots),
            started: Instant::now(),
            activity_ms: AtomicU64::new(0),
            done: AtomicU8::new(0),
            finished: Notify::new(),
        }
    }

    /// Records that bytes crossed the connection.
    pub fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.activity_ms.store(ms, Ordering::Relaxed);
    }

    /// When bytes last crossed.
    pub fn last_activity(&self) -> Instant {
        self.started + Duration::from_millis(self.activity_ms.load(Ordering::Relaxed))
    }

    /// One direction ended cleanly; after both, the connection is finished.
    pub fn direction_done(&self) {
        if self.done.fetch_add(1, Ordering::AcqRel) + 1 >= 2 {
            self.finished.notify_one();
        }
    }

    pub fn slots(&self) -> MutexGuard<'_, Slots> {
        lock(&self.slots)
    }
}

/// Locks a mutex, recovering from poisoning (state stays consistent per operation).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Shared state of one relay.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: RelayConfig,
    pub verifier: Verifier<Principal>,
    pub server_index: HashMap<String, usize>,
    pub server_names: Vec<Name>,
    pub client_names: Vec<Name>,
    pub client_allow: Vec<Vec<Grant>>,
    pub authorities: Vec<String>,
    pub ports: Mutex<HashMap<(usize, String), PortState>>,
    pub conns: Mutex<HashMap<ConnId, Arc<Conn>>>,
    /// Connections per client (index as in `client_names`).
    pub client_conns: Vec<AtomicUsize>,
    /// Number of entries in `conns`, observable from outside (tests, metrics).
    pub conn_count: tokio::sync::watch::Sender<usize>,
    /// Number of `listen` requests waiting, observable from outside.
    pub listen_count: tokio::sync::watch::Sender<usize>,
    pub shutdown: CancellationToken,
}

impl Shared {
    pub fn new(config: RelayConfig, shutdown: CancellationToken) -> Self {
        let mut keys = Vec::new();
        let mut server_index = HashMap::new();
        let mut server_names = Vec::new();
        for (i, s) in config.servers.iter().enumerate() {
            keys.push((*s.public_key.get_ref(), Principal::Server(i)));
            server_index.insert(s.name.get_ref().as_str().to_owned(), i);
            server_names.push(s.name.get_ref().clone());
        }
        let mut client_names = Vec::new();
        let mut client_allow = Vec::new();
        for (i, c) in config.clients.iter().enumerate() {
            keys.push((*c.public_key.get_ref(), Principal::Client(i)));
            client_names.push(c.name.get_ref().clone());
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
            conns: Mutex::new(HashMap::new()),
            client_conns: (0..config.clients.len())
                .map(|_| AtomicUsize::new(0))
                .collect(),
            conn_count: tokio::sync::watch::Sender::new(0),
            listen_count: tokio::sync::watch::Sender::new(0),
            shutdown,
            config,
        }
    }

    pub fn conn(&self, id: ConnId) -> Option<Arc<Conn>> {
        lock(&self.conns).get(&id).cloned()
    }

    /// Adds a connection unless a limit is reached: the relay's, or the client's share.
    pub fn insert_conn(&self, conn: Arc<Conn>) -> Result<(), &'static str> {
        let mut conns = lock(&self.conns);
        if conns.len() >= self.config.max_connections {
            return Err("relay at connection limit");
        }
        let per_client = &self.client_conns[conn.client];
        if per_client.load(Ordering::Relaxed) >= self.config.max_connections_per_client {
            return Err("too many connections for this client");
        }
        per_client.fetch_add(1, Ordering::Relaxed);
        conns.insert(conn.id, conn);
        self.conn_count.send_replace(conns.len());
        Ok(())
    }

    pub fn remove_conn(&self, id: ConnId) {
        let mut conns = lock(&self.conns);
        if let Some(c) = conns.remove(&id) {
            self.client_conns[c.client].fetch_sub(1, Ordering::Relaxed);
        }
        self.conn_count.send_replace(conns.len());
    }
}

/// Counts a waiting `listen` for as long as it lives.
pub(crate) struct ListenGuard<'a>(&'a Shared);

impl<'a> ListenGuard<'a> {
    pub fn new(shared: &'a Shared) -> Self {
        shared.listen_count.send_modify(|n| *n += 1);
        Self(shared)
    }
}

impl Drop for ListenGuard<'_> {
    fn drop(&mut self) {
        self.0
            .listen_count
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}
