//! Channels at the relay, and the tunnels that join them.
//!
//! An endpoint's **channel** is a pair of long-lived requests under an ID the endpoint chose: a
//! client's `connect` (its download) and `upstream` (its upload), or a server's `listen` and
//! `downstream`. A channel carries one connection at a time, and then the next. For each
//! connection the relay joins a client channel with a server channel of the same port in a
//! [`Tunnel`]: each channel's upload is lent to the other channel's download, from the upload's
//! `OPEN` to its `END`, and given back (see `pipe.rs`).
//!
//! Here: the channel and what its download is told, the tunnel, and the table of channels with
//! its limits and the reaper that frees each entry.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use ptth_common::audit::Audit;
use ptth_common::config::Name;
use ptth_common::mailbox::Mailbox;
use ptth_common::protocol::ChannelId;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, TunnelLabels, TunnelMeters};

/// Which endpoint a channel belongs to, by its index in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// A client's channel (`connect` and `upstream`).
    Client(usize),
    /// A server's channel (`listen` and `downstream`).
    Server,
}

/// What a channel's download is told, in order.
#[derive(Debug)]
pub(crate) enum ToDownload {
    /// The channel's own upload has arrived: send `ATTACHED`.
    Attached,
    /// A client's connection has been asked for: unless the server's answer comes before this
    /// time, the connection fails.
    Pending(Instant),
    /// The other channel's upload, for one direction of a connection.
    Feed(Feed),
    /// The connection could not be made: send `FAILED` with this reason, and end.
    Fail(String),
    /// The endpoint retired the channel: end.
    Retired,
}

/// One channel's upload lent to the other channel's download, for one direction of a
/// connection: from its `OPEN` frame to its `END`.
#[derive(Debug)]
pub(crate) struct Feed {
    /// What followed the `OPEN` frame in the chunk that held it (not yet checked).
    pub after_open: Bytes,
    /// The upload's request body.
    pub body: axum::body::Body,
    /// Where the body goes back at the `END`, with whatever followed it.
    pub back: oneshot::Sender<Returned>,
    /// The connection.
    pub tunnel: Arc<Tunnel>,
}

/// An upload given back after its `END`.
#[derive(Debug)]
pub(crate) struct Returned {
    /// The request body, to be read on by the upload's handler.
    pub body: axum::body::Body,
    /// What followed the `END` frame in the chunk that held it.
    pub rest: Bytes,
}

/// A channel (see the module documentation).
#[derive(Debug)]
pub(crate) struct Channel {
    /// The ID its endpoint chose.
    pub id: ChannelId,
    /// Whose it is.
    pub side: Side,
    /// The server it belongs to (a server's) or leads to (a client's), by index.
    pub server: usize,
    /// The port it serves or leads to.
    pub port: Name,
    /// The address of the endpoint that opened it (behind trusted proxies, the one they
    /// name).
    pub peer: Option<IpAddr>,
    /// Cancelled when the channel ends, for whatever reason: its download then ends with an
    /// error, and its upload is answered `410`.
    pub cancel: CancellationToken,
    /// What its download is told.
    inbox: Mailbox<ToDownload>,
    upload_taken: AtomicBool,
    /// Set, under the `tunnel` lock, when the relay retires it: it takes no connection.
    retiring: AtomicBool,
    /// The connection it carries now.
    tunnel: Mutex<Option<Arc<Tunnel>>>,
    started: Instant,
    activity_ms: AtomicU64,
}

/// How many messages a download's inbox holds; a channel gets at most four in a row
/// (`ATTACHED`, pending, a feed, a failure or its retirement) before its download has read
/// them.
const INBOX: usize = 4;

impl Channel {
    /// A new channel, of an endpoint whose address is unknown.
    #[cfg(test)]
    pub fn new(
        id: ChannelId,
        side: Side,
        server: usize,
        port: Name,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        Self::opened_from(id, side, server, port, cancel, None)
    }

    /// A new channel, opened by the endpoint at `peer`.
    pub fn opened_from(
        id: ChannelId,
        side: Side,
        server: usize,
        port: Name,
        cancel: CancellationToken,
        peer: Option<IpAddr>,
    ) -> Arc<Self> {
        Arc::new(Self {
            id,
            side,
            server,
            port,
            peer,
            cancel,
            inbox: Mailbox::new(INBOX),
            upload_taken: AtomicBool::new(false),
            retiring: AtomicBool::new(false),
            tunnel: Mutex::new(None),
            started: Instant::now(),
            activity_ms: AtomicU64::new(0),
        })
    }

    /// Whether it is a server's channel.
    pub fn is_server(&self) -> bool {
        self.side == Side::Server
    }

    /// The client whose channel it is (by index); `None` for a server's.
    pub fn client(&self) -> Option<usize> {
        match self.side {
            Side::Client(i) => Some(i),
            Side::Server => None,
        }
    }

    /// Tells the download; `false` if the download is gone or its inbox is full (which only a
    /// misbehaving endpoint causes).
    pub fn tell(&self, message: ToDownload) -> bool {
        self.inbox.send(message).is_ok()
    }

    /// The next message for the download; when there is none, the download is woken when one
    /// comes. (Pending for good once the download has gone.)
    pub fn poll_message(&self, cx: &mut Context<'_>) -> Poll<ToDownload> {
        match self.inbox.poll_recv(cx) {
            Poll::Ready(Some(message)) => Poll::Ready(message),
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }

    /// The download has gone: later messages are refused, and those unread dropped.
    pub fn close_inbox(&self) {
        self.inbox.close_and_clear();
    }

    /// Claims the upload, once.
    pub fn take_upload(&self) -> bool {
        !self.upload_taken.swap(true, Ordering::AcqRel)
    }

    /// The connection it carries now, if any.
    pub fn tunnel(&self) -> Option<Arc<Tunnel>> {
        self.tunnel.lock().clone()
    }

    /// Records that bytes crossed the channel.
    pub fn touch(&self) {
        self.touch_at(Instant::now());
    }

    /// Records that bytes crossed the channel at `now` (one clock read for both channels of a
    /// tunnel).
    pub fn touch_at(&self, now: Instant) {
        let since = now.saturating_duration_since(self.started);
        let ms = u64::try_from(since.as_millis()).unwrap_or(u64::MAX);
        self.activity_ms.store(ms, Ordering::Relaxed);
    }

    /// Ends the channel and, if it carries a connection, that connection's tunnel, and with
    /// it the other channel.
    pub fn close(&self) {
        if let Some(tunnel) = self.tunnel() {
            tunnel.fail();
        }
        self.cancel.cancel();
    }

    /// Retires the channel if it carries no connection (the relay drains): it takes none
    /// from now on, and its download ends after what it has passed on; its endpoint, seeing
    /// that, ends its upload.
    pub fn retire_if_idle(&self) {
        let slot = self.tunnel.lock();
        if slot.is_none() && !self.cancel.is_cancelled() {
            self.retiring.store(true, Ordering::Release);
            self.tell(ToDownload::Retired);
        }
    }

    /// Whether the channel could take a connection now: it carries none, and is neither
    /// retiring nor closed.
    pub fn is_free(&self) -> bool {
        self.tunnel.lock().is_none()
            && !self.retiring.load(Ordering::Acquire)
            && !self.cancel.is_cancelled()
    }

    /// Ends an idle channel cleanly: its download ends after what it has passed on (rather
    /// than with an error, which may cut what is still on its way), then the channel closes.
    pub fn end_idle(&self) {
        self.tell(ToDownload::Retired);
        self.cancel.cancel();
    }

    /// When bytes last crossed.
    fn last_activity(&self) -> Instant {
        self.started + Duration::from_millis(self.activity_ms.load(Ordering::Relaxed))
    }
}

/// One connection: a client channel joined with a server channel until both directions have
/// ended (`END` each way), or until it fails, which ends both channels.
#[derive(Debug)]
pub(crate) struct Tunnel {
    /// The client's channel.
    pub client: Arc<Channel>,
    /// The server's channel.
    pub server: Arc<Channel>,
    /// Directions that have ended cleanly.
    ended: AtomicU8,
    /// Whether the server has answered (`OPEN` or `FAILED`).
    answered: AtomicBool,
    /// For each channel's upload (the client's, the server's): whether the relay holds it
    /// back, because the other channel's download has not taken the last chunk passed on yet
    /// (its reader is slow, or its path is full). The upload's silence is then not its
    /// endpoint's.
    held: [AtomicBool; 2],
    /// Cancelled once both directions have ended.
    finished: CancellationToken,
    /// Where it is counted and recorded.
    book: Arc<TunnelBook>,
    /// When it was joined.
    pub opened: Instant,
    /// Bytes passed on so far: upstream (the client's upload), downstream (the server's).
    bytes: [AtomicU64; 2],
    /// Set once the tunnel is announced (see [`Tunnel::announce`]).
    announced: OnceLock<Announced>,
}

/// A tunnel's names and counters, once it is announced.
#[derive(Debug)]
pub(crate) struct Announced {
    /// Who it joins.
    pub labels: TunnelLabels,
    meters: TunnelMeters,
}

/// Where tunnels are counted and recorded: the count the embedding program watches, the
/// metrics and the audit log.
#[derive(Debug)]
pub(crate) struct TunnelBook {
    /// Tunnels open now.
    pub count: watch::Sender<usize>,
    /// The relay's metrics.
    pub metrics: Arc<Metrics>,
    /// The relay's audit log.
    pub audit: Arc<Audit>,
}

impl TunnelBook {
    /// A book with its own metrics, recording to the log.
    #[cfg(test)]
    pub fn for_test() -> Arc<Self> {
        Arc::new(Self {
            count: watch::Sender::new(0),
            metrics: Arc::default(),
            audit: Arc::new(Audit::to_log("ptth_relay")),
        })
    }
}

impl Tunnel {
    /// Joins `client` and `server` for a connection, counted in `book`; `None` if either
    /// carries one already, or is retiring or closed. Cheap: it runs under the port's lock;
    /// the tunnel's names, metrics and audit line come with [`Tunnel::announce`].
    pub fn join(
        client: &Arc<Channel>,
        server: &Arc<Channel>,
        book: &Arc<TunnelBook>,
    ) -> Option<Arc<Self>> {
        let mut client_slot = client.tunnel.lock();
        let mut server_slot = server.tunnel.lock();
        let open = |c: &Channel| !c.retiring.load(Ordering::Acquire) && !c.cancel.is_cancelled();
        if client_slot.is_some() || server_slot.is_some() || !open(client) || !open(server) {
            return None;
        }
        book.count.send_modify(|n| *n += 1);
        let tunnel = Arc::new(Self {
            client: client.clone(),
            server: server.clone(),
            ended: AtomicU8::new(0),
            answered: AtomicBool::new(false),
            held: [AtomicBool::new(false), AtomicBool::new(false)],
            finished: CancellationToken::new(),
            book: book.clone(),
            opened: Instant::now(),
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            announced: OnceLock::new(),
        });
        *client_slot = Some(tunnel.clone());
        *server_slot = Some(tunnel.clone());
        Some(tunnel)
    }

    /// Names the tunnel (`labels`), counts it in the metrics and writes its `tunnel_opened`
    /// audit line, once; done by the client's upload, outside every lock, before the
    /// connection's bytes flow.
    pub fn announce(&self, labels: TunnelLabels) {
        let book = &self.book;
        let meters = book.metrics.tunnel_opened(&labels);
        book.audit.record("tunnel_opened", || {
            serde_json::json!({
                "server": labels.server,
                "port": labels.port,
                "client": labels.client,
                "client_ip": self.client.peer,
                "server_ip": self.server.peer,
                "channel": self.client.id.to_string(),
            })
        });
        let _ = self.announced.set(Announced { labels, meters });
    }

    /// Its names, once announced.
    pub fn labels(&self) -> Option<&TunnelLabels> {
        self.announced.get().map(|a| &a.labels)
    }

    /// Records the server's answer, once: `false` if it had answered already.
    pub fn answer(&self) -> bool {
        !self.answered.swap(true, Ordering::AcqRel)
    }

    /// Whether the server has answered.
    pub fn is_answered(&self) -> bool {
        self.answered.load(Ordering::Acquire)
    }

    /// One direction has ended cleanly; after both, the channels are free again.
    pub fn direction_ended(&self) {
        if self.ended.fetch_add(1, Ordering::AcqRel) + 1 == 2 {
            self.release();
            self.finished.cancel();
        }
    }

    /// Resolves once both directions have ended.
    pub async fn finished(&self) {
        self.finished.cancelled().await
    }

    /// The connection failed: both channels end.
    pub fn fail(&self) {
        self.release();
        self.client.cancel.cancel();
        self.server.cancel.cancel();
    }

    /// Records whether the relay holds `channel`'s upload back (see `held`).
    pub fn hold(&self, channel: &Channel, held: bool) {
        self.held[usize::from(channel.is_server())].store(held, Ordering::Relaxed);
    }

    /// Whether the relay holds `channel`'s upload back.
    pub fn holds(&self, channel: &Channel) -> bool {
        self.held[usize::from(channel.is_server())].load(Ordering::Relaxed)
    }

    /// `n` bytes of `sender`'s upload (`DATA` payload) were passed on.
    pub fn carried(&self, sender: &Channel, n: u64) {
        let direction = usize::from(sender.is_server());
        self.bytes[direction].fetch_add(n, Ordering::Relaxed);
        if let Some(a) = self.announced.get() {
            a.meters.bytes[direction].inc_by(n);
        }
    }

    /// Bytes passed on so far: upstream, downstream.
    pub fn bytes(&self) -> [u64; 2] {
        [0, 1].map(|d| self.bytes[d].load(Ordering::Relaxed))
    }

    /// How it ended (or is ending): both directions closed, refused before the server
    /// answered, or aborted.
    fn outcome(&self) -> &'static str {
        if self.ended.load(Ordering::Acquire) >= 2 {
            "closed"
        } else if !self.is_answered() {
            "not_answered"
        } else {
            "aborted"
        }
    }

    /// The channel of this tunnel that is not `channel`.
    pub fn other(&self, channel: &Channel) -> &Arc<Channel> {
        if channel.is_server() {
            &self.client
        } else {
            &self.server
        }
    }

    /// Frees both channels of this tunnel.
    fn release(&self) {
        for channel in [&self.client, &self.server] {
            let mut slot = channel.tunnel.lock();
            if slot.as_ref().is_some_and(|t| std::ptr::eq(&**t, self)) {
                *slot = None;
            }
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.book.count.send_modify(|n| *n = n.saturating_sub(1));
        // A tunnel never announced (its client gave up first) was never counted or recorded.
        let Some(announced) = self.announced.get() else {
            return;
        };
        announced.meters.open.dec();
        let [upstream, downstream] = self.bytes();
        let labels = &announced.labels;
        self.book.audit.record("tunnel_closed", || {
            serde_json::json!({
                "server": labels.server,
                "port": labels.port,
                "client": labels.client,
                "client_ip": self.client.peer,
                "channel": self.client.id.to_string(),
                "bytes_upstream": upstream,
                "bytes_downstream": downstream,
                "duration_ms": u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX),
                "outcome": self.outcome(),
            })
        });
    }
}

/// An upload waiting for its channel's download request; it leaves the table's list of waiters
/// however its wait ends (found, timed out, or its request gone).
struct EarlyWaiter<'a> {
    early: &'a Mutex<HashMap<ChannelId, oneshot::Sender<Arc<Channel>>>>,
    id: ChannelId,
    found: Option<oneshot::Receiver<Arc<Channel>>>,
}

impl Drop for EarlyWaiter<'_> {
    fn drop(&mut self) {
        // Closed first, so that the entry is known to be this waiter's and not a new one's.
        drop(self.found.take());
        let mut early = self.early.lock();
        if early.get(&self.id).is_some_and(|tx| tx.is_closed()) {
            early.remove(&self.id);
        }
    }
}

/// Uploads that may wait for their channel at once, however low `max_connections`: the
/// upload of a channel the relay refused waits out its time, and must not stop others.
const MIN_EARLY: usize = 1024;

/// Why the table refused a new channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TableRefusal {
    /// `max_connections` client channels.
    RelayFull,
    /// `max_connections_per_client`.
    ClientFull,
    /// The endpoint chose an ID that the relay holds already.
    IdInUse,
}

/// The relay's channels by ID, within their limits, and the count of tunnels.
#[derive(Debug)]
pub(crate) struct Channels {
    map: Mutex<HashMap<ChannelId, Arc<Channel>>>,
    /// Client channels, all clients together.
    clients: AtomicUsize,
    /// Client channels per client (by slot, see `state::Directory`).
    per_client: RwLock<Vec<AtomicUsize>>,
    max: usize,
    max_per_client: usize,
    /// Channels held, observable from outside (tests, the embedding program).
    count: watch::Sender<usize>,
    /// Channels opened so far, observable from outside.
    opened: watch::Sender<u64>,
    /// Where tunnels are counted and recorded.
    pub tunnels: Arc<TunnelBook>,
    /// Uploads that arrived before their channel's download request, each waiting for it (at
    /// most `max`, or [`MIN_EARLY`]).
    early: Mutex<HashMap<ChannelId, oneshot::Sender<Arc<Channel>>>>,
}

impl Channels {
    /// An empty table for `clients` clients, with at most `max` client channels, and
    /// `max_per_client` per client.
    pub fn new(
        clients: usize,
        max: usize,
        max_per_client: usize,
        tunnels: Arc<TunnelBook>,
    ) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            clients: AtomicUsize::new(0),
            per_client: RwLock::new((0..clients).map(|_| AtomicUsize::new(0)).collect()),
            max,
            max_per_client,
            count: watch::Sender::new(0),
            opened: watch::Sender::new(0),
            tunnels,
            early: Mutex::new(HashMap::new()),
        }
    }

    /// The channel `id`, if the relay holds it.
    #[cfg(test)]
    pub fn get(&self, id: ChannelId) -> Option<Arc<Channel>> {
        self.map.lock().get(&id).cloned()
    }

    /// The channel `id`, waiting at most `limit` for its download request if it has not come
    /// yet (an upload sent at once beside it may overtake it). `None` if it does not come, or if
    /// too many wait already, or another waits for the same ID.
    pub async fn find_or_wait(&self, id: ChannelId, limit: Duration) -> Option<Arc<Channel>> {
        let mut waiter = {
            let map = self.map.lock();
            if let Some(c) = map.get(&id) {
                return Some(c.clone());
            }
            let mut early = self.early.lock();
            if early.len() >= self.max.max(MIN_EARLY) || early.contains_key(&id) {
                return None;
            }
            let (tx, rx) = oneshot::channel();
            early.insert(id, tx);
            EarlyWaiter {
                early: &self.early,
                id,
                found: Some(rx),
            }
        };
        let found = waiter.found.as_mut()?;
        tokio::time::timeout(limit, found).await.ok()?.ok()
    }

    /// Adds a channel unless its ID is in use or, for a client's, a limit is reached; hands it
    /// to an upload waiting for it.
    pub fn insert(&self, channel: Arc<Channel>) -> Result<(), TableRefusal> {
        let mut map = self.map.lock();
        if map.contains_key(&channel.id) {
            return Err(TableRefusal::IdInUse);
        }
        if let Side::Client(client) = channel.side {
            if self.clients.load(Ordering::Relaxed) >= self.max {
                return Err(TableRefusal::RelayFull);
            }
            let per_client = self.per_client.read();
            let Some(own) = per_client.get(client) else {
                return Err(TableRefusal::ClientFull);
            };
            if own.load(Ordering::Relaxed) >= self.max_per_client {
                return Err(TableRefusal::ClientFull);
            }
            own.fetch_add(1, Ordering::Relaxed);
            self.clients.fetch_add(1, Ordering::Relaxed);
        }
        map.insert(channel.id, channel.clone());
        self.count.send_replace(map.len());
        self.tunnels.metrics.channels.set(map.len() as i64);
        self.opened.send_modify(|n| *n += 1);
        if let Some(waiter) = self.early.lock().remove(&channel.id) {
            let _ = waiter.send(channel);
        }
        Ok(())
    }

    /// Forgets the channel `id`.
    pub fn remove(&self, id: ChannelId) {
        let mut map = self.map.lock();
        if let Some(c) = map.remove(&id)
            && let Side::Client(client) = c.side
        {
            if let Some(own) = self.per_client.read().get(client) {
                own.fetch_sub(1, Ordering::Relaxed);
            }
            self.clients.fetch_sub(1, Ordering::Relaxed);
        }
        self.count.send_replace(map.len());
        self.tunnels.metrics.channels.set(map.len() as i64);
    }

    /// The tunnels open now, at most `limit` of them (in no particular order).
    pub fn open_tunnels(&self, limit: usize) -> Vec<Arc<Tunnel>> {
        let map = self.map.lock();
        map.values()
            .filter(|c| !c.is_server())
            .filter_map(|c| c.tunnel())
            .take(limit)
            .collect()
    }

    /// Retires every channel that carries no connection (see [`Channel::retire_if_idle`]).
    pub fn retire_idle(&self) {
        self.retire_idle_where(|_| true);
    }

    /// Retires every channel for which `chosen` holds and that carries no connection.
    pub fn retire_idle_where(&self, chosen: impl Fn(&Channel) -> bool) {
        for channel in self.matching(chosen) {
            channel.retire_if_idle();
        }
    }

    /// The channels for which `chosen` holds, taken from the table under its lock, to be
    /// acted on after it.
    fn matching(&self, chosen: impl Fn(&Channel) -> bool) -> Vec<Arc<Channel>> {
        self.map
            .lock()
            .values()
            .filter(|c| chosen(c))
            .cloned()
            .collect()
    }

    /// Client channels of client `client` (by slot).
    pub fn client_channels(&self, client: usize) -> usize {
        self.per_client
            .read()
            .get(client)
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// Makes room to count the channels of `clients` clients (a reload added some).
    pub fn count_clients(&self, clients: usize) {
        let mut per_client = self.per_client.write();
        while per_client.len() < clients {
            per_client.push(AtomicUsize::new(0));
        }
    }

    /// Closes every channel for which `condemned` holds, with its tunnel: how many.
    pub fn close_where(&self, condemned: impl Fn(&Channel) -> bool) -> usize {
        let doomed = self.matching(condemned);
        for channel in &doomed {
            channel.close();
        }
        doomed.len()
    }

    /// Watches the number of channels held.
    pub fn count(&self) -> watch::Receiver<usize> {
        self.count.subscribe()
    }

    /// Watches the number of channels opened so far.
    pub fn opened(&self) -> watch::Receiver<u64> {
        self.opened.subscribe()
    }

    /// Frees `channel` once it ends: when it is cancelled, or when it stays idle past `idle`
    /// (no bytes, heartbeats included). A connection it carries then fails.
    pub async fn reap(&self, channel: &Channel, idle: Duration) {
        channel.touch();
        loop {
            let deadline = channel.last_activity() + idle;
            tokio::select! {
                () = channel.cancel.cancelled() => break,
                () = tokio::time::sleep_until(deadline) => {
                    if channel.last_activity() + idle > Instant::now() {
                        continue;
                    }
                    // Its upload unread because the other side is slow: not its silence.
                    if channel.tunnel().is_some_and(|t| t.holds(channel)) {
                        channel.touch();
                        continue;
                    }
                    tracing::info!(idle_timeout = ?idle, "closing idle channel");
                    self.tunnels.metrics.idle_channels_closed.inc();
                    break;
                }
            }
        }
        channel.close();
        self.remove(channel.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(side: Side) -> Arc<Channel> {
        Channel::new(
            ChannelId::random().expect("id"),
            side,
            0,
            Name::try_from("pg".to_owned()).expect("name"),
            CancellationToken::new(),
        )
    }

    #[test]
    fn a_tunnel_joins_free_channels_only_and_frees_them_when_both_directions_end() {
        let book = TunnelBook::for_test();
        let count = book.count.subscribe();
        let (c, s) = (channel(Side::Client(0)), channel(Side::Server));
        let t = Tunnel::join(&c, &s, &book).expect("joined");
        assert_eq!(*count.borrow(), 1);
        assert!(Tunnel::join(&c, &channel(Side::Server), &book).is_none());
        assert!(t.answer(), "first answer");
        assert!(!t.answer(), "second answer");
        t.direction_ended();
        assert!(c.tunnel().is_some() && s.tunnel().is_some());
        t.direction_ended();
        assert!(c.tunnel().is_none() && s.tunnel().is_none());
        assert!(t.finished.is_cancelled());
        assert!(!c.cancel.is_cancelled() && !s.cancel.is_cancelled());
        drop(t);
        assert_eq!(*count.borrow(), 0);
        // A failed one ends both channels.
        let t = Tunnel::join(&c, &s, &book).expect("joined again");
        t.fail();
        assert!(c.cancel.is_cancelled() && s.cancel.is_cancelled());
        assert!(c.tunnel().is_none());
    }

    #[test]
    fn a_download_reads_its_inbox_in_order_and_a_full_or_closed_inbox_refuses() {
        let c = channel(Side::Client(0));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(c.poll_message(&mut cx).is_pending());
        assert!(c.tell(ToDownload::Attached));
        assert!(c.tell(ToDownload::Fail("one".into())));
        assert!(c.tell(ToDownload::Retired));
        assert!(c.tell(ToDownload::Fail("two".into())));
        assert!(!c.tell(ToDownload::Retired), "full");
        assert!(matches!(
            c.poll_message(&mut cx),
            Poll::Ready(ToDownload::Attached)
        ));
        assert!(matches!(c.poll_message(&mut cx), Poll::Ready(ToDownload::Fail(r)) if r == "one"));
        assert!(matches!(
            c.poll_message(&mut cx),
            Poll::Ready(ToDownload::Retired)
        ));
        c.close_inbox();
        assert!(
            c.poll_message(&mut cx).is_pending(),
            "unread messages dropped"
        );
        assert!(!c.tell(ToDownload::Attached), "closed");
    }

    #[tokio::test]
    async fn an_upload_may_wait_for_its_channel() {
        let table = Channels::new(1, 10, 10, TunnelBook::for_test());
        let c = channel(Side::Client(0));
        let (waited, ()) = tokio::join!(table.find_or_wait(c.id, Duration::from_secs(10)), async {
            tokio::task::yield_now().await;
            table.insert(c.clone()).expect("insert");
        });
        assert_eq!(waited.map(|w| w.id), Some(c.id));
        // One that never comes: nothing, and no waiter left behind.
        let other = ChannelId::random().expect("id");
        assert!(
            table
                .find_or_wait(other, Duration::from_millis(10))
                .await
                .is_none()
        );
        assert!(table.early.lock().is_empty());
        assert_eq!(table.insert(c), Err(TableRefusal::IdInUse));
    }

    #[test]
    fn the_table_limits_client_channels_and_counts_all() {
        let table = Channels::new(2, 3, 2, TunnelBook::for_test());
        let count = table.count();
        let a = channel(Side::Client(0));
        table.insert(a.clone()).expect("a");
        table.insert(channel(Side::Client(0))).expect("b");
        assert_eq!(
            table.insert(channel(Side::Client(0))),
            Err(TableRefusal::ClientFull)
        );
        table
            .insert(channel(Side::Client(1)))
            .expect("another client");
        assert_eq!(
            table.insert(channel(Side::Client(1))),
            Err(TableRefusal::RelayFull)
        );
        // Server channels are bounded per port elsewhere.
        table.insert(channel(Side::Server)).expect("server");
        assert_eq!(*count.borrow(), 4);
        assert!(table.get(a.id).is_some());
        table.remove(a.id);
        assert!(table.get(a.id).is_none());
        assert_eq!(*count.borrow(), 3);
        table
            .insert(channel(Side::Client(0)))
            .expect("room again for client 0");
    }

    #[tokio::test(start_paused = true)]
    async fn the_reaper_frees_idle_and_cancelled_channels_and_fails_their_tunnel() {
        let table = Channels::new(1, 10, 10, TunnelBook::for_test());
        let idle = Duration::from_secs(60);
        let (c, s) = (channel(Side::Client(0)), channel(Side::Server));
        table.insert(c.clone()).expect("c");
        table.insert(s.clone()).expect("s");
        let t = Tunnel::join(&c, &s, &table.tunnels).expect("joined");
        let mut count = table.count();
        s.cancel.cancel();
        table.reap(&s, idle).await;
        assert_eq!(*count.borrow_and_update(), 1);
        assert!(
            c.cancel.is_cancelled(),
            "the tunnel failed with its server channel"
        );
        drop(t);
        assert_eq!(*table.tunnels.count.borrow(), 0);
        let lone = channel(Side::Client(0));
        table.insert(lone.clone()).expect("lone");
        // Paused time advances to the idle deadline once everything waits.
        table.reap(&lone, idle).await;
        assert!(lone.cancel.is_cancelled());
        table.reap(&c, idle).await;
        assert_eq!(*count.borrow(), 0);
    }
}
