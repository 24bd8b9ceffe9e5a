//! One connection (a tunnel) at the relay, from `connect` to its end: the one-time hand-over
//! slots through which its four requests meet, and the table of connections with its limits
//! and the reaper task that frees each entry.
//!
//! The two directions meet here. `upstream` hands its request body through the upstream slot
//! to the `accept` answer, and `downstream` hands its body through the downstream slot to the
//! `connect` answer (see `pipe.rs`). Each upload's arrival is also signalled to its own
//! endpoint's download, which then sends `ATTACHED`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use ptth_common::protocol::ConnId;
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info};

/// How the server answered an offered connection.
#[derive(Debug)]
pub(crate) enum AcceptOutcome {
    Accepted,
    Refused,
}

/// How an upload ended, reported to the handler that waits to answer it.
pub(crate) type UploadEnd = Result<(), String>;

/// An upload request body handed to the download that carries it on.
#[derive(Debug)]
pub(crate) struct Upload {
    pub body: axum::body::Body,
    /// Told how the body ended, so that the upload's own request can be answered.
    pub done: oneshot::Sender<UploadEnd>,
}

/// The two directions of a connection, named after the upload that carries each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// The client's bytes: `upstream` upload, `accept` download.
    Upstream,
    /// The service's bytes: `downstream` upload, `connect` download.
    Downstream,
}

/// Where an upload hands over its body, and how it tells its own endpoint's download that it
/// has arrived.
#[derive(Debug)]
pub(crate) struct UploadSlot {
    pub body: oneshot::Sender<Upload>,
    pub attached: oneshot::Sender<()>,
}

/// What the `accept` download needs: the upstream upload's body when it comes, and the signal
/// that the server's own (downstream) upload has arrived.
#[derive(Debug)]
pub(crate) struct AcceptDownload {
    pub upstream: oneshot::Receiver<Upload>,
    pub attached: oneshot::Receiver<()>,
}

/// What the `connect` handler keeps of a new connection: the server's answer to the offer,
/// and what its download needs (the downstream upload's body, and the signal that the
/// client's own upstream upload has arrived).
#[derive(Debug)]
pub(crate) struct ConnectSide {
    pub accepted: oneshot::Receiver<AcceptOutcome>,
    pub downstream: oneshot::Receiver<Upload>,
    pub attached: oneshot::Receiver<()>,
}

/// One-time hand-over points of a connection, each taken once.
#[derive(Debug)]
struct Slots {
    accept: Option<oneshot::Sender<AcceptOutcome>>,
    accept_download: Option<AcceptDownload>,
    upstream: Option<UploadSlot>,
    downstream: Option<UploadSlot>,
    /// Whether the server accepted (uploads are refused before).
    accepted: bool,
}

/// An open or pending connection.
#[derive(Debug)]
pub(crate) struct Conn {
    pub id: ConnId,
    /// Index of its server in the relay's configuration.
    pub server: usize,
    /// Index of its client in the relay's configuration.
    pub client: usize,
    /// Cancelled when the connection ends, for whatever reason: every stream then fails.
    pub cancel: CancellationToken,
    slots: Mutex<Slots>,
    started: Instant,
    activity_ms: AtomicU64,
    done: AtomicU8,
    finished: Notify,
}

impl Conn {
    /// A new connection of `client` to `server`, and the `connect` handler's side of it.
    pub fn new(
        id: ConnId,
        server: usize,
        client: usize,
        cancel: CancellationToken,
    ) -> (Arc<Self>, ConnectSide) {
        let (accept, accepted) = oneshot::channel();
        let (upstream_tx, upstream_rx) = oneshot::channel();
        let (downstream_tx, downstream_rx) = oneshot::channel();
        let (upstream_attached, upstream_attached_rx) = oneshot::channel();
        let (downstream_attached, downstream_attached_rx) = oneshot::channel();
        let slots = Slots {
            accept: Some(accept),
            accept_download: Some(AcceptDownload {
                upstream: upstream_rx,
                attached: downstream_attached_rx,
            }),
            upstream: Some(UploadSlot {
                body: upstream_tx,
                attached: upstream_attached,
            }),
            downstream: Some(UploadSlot {
                body: downstream_tx,
                attached: downstream_attached,
            }),
            accepted: false,
        };
        let conn = Arc::new(Self {
            id,
            server,
            client,
            cancel,
            slots: Mutex::new(slots),
            started: Instant::now(),
            activity_ms: AtomicU64::new(0),
            done: AtomicU8::new(0),
            finished: Notify::new(),
        });
        let side = ConnectSide {
            accepted,
            downstream: downstream_rx,
            attached: upstream_attached_rx,
        };
        (conn, side)
    }

    /// The server's answer to the offer, once: `None` if `accept` was already called. A
    /// refusal takes the slot without opening the uploads.
    pub fn take_accept(
        &self,
        refused: bool,
    ) -> Option<(oneshot::Sender<AcceptOutcome>, Option<AcceptDownload>)> {
        let mut slots = self.slots.lock();
        let outcome = slots.accept.take()?;
        slots.accepted = !refused;
        Some((outcome, slots.accept_download.take()))
    }

    /// The slot of `direction`'s upload, once, and only after the server accepted.
    pub fn take_upload(&self, direction: Direction) -> Option<UploadSlot> {
        let mut slots = self.slots.lock();
        if !slots.accepted {
            return None;
        }
        match direction {
            Direction::Upstream => slots.upstream.take(),
            Direction::Downstream => slots.downstream.take(),
        }
    }

    /// Records that bytes crossed the connection.
    pub fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.activity_ms.store(ms, Ordering::Relaxed);
    }

    /// When bytes last crossed.
    fn last_activity(&self) -> Instant {
        self.started + Duration::from_millis(self.activity_ms.load(Ordering::Relaxed))
    }

    /// One direction ended cleanly; after both, the connection is finished.
    pub fn direction_done(&self) {
        if self.done.fetch_add(1, Ordering::AcqRel) + 1 >= 2 {
            self.finished.notify_one();
        }
    }
}

/// A limit that refused a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnLimit {
    /// `max_connections`.
    Relay,
    /// `max_connections_per_client`.
    Client,
}

/// The relay's connections (pending and open), by ID, within their limits.
#[derive(Debug)]
pub(crate) struct Connections {
    map: Mutex<HashMap<ConnId, Arc<Conn>>>,
    /// Connections per client (index as in the configuration).
    per_client: Vec<AtomicUsize>,
    max: usize,
    max_per_client: usize,
    /// Number of entries, observable from outside (tests, the embedding program).
    count: watch::Sender<usize>,
}

impl Connections {
    /// An empty table for `clients` clients.
    pub fn new(clients: usize, max: usize, max_per_client: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            per_client: (0..clients).map(|_| AtomicUsize::new(0)).collect(),
            max,
            max_per_client,
            count: watch::Sender::new(0),
        }
    }

    /// The connection `id`, if the relay holds it.
    pub fn get(&self, id: ConnId) -> Option<Arc<Conn>> {
        self.map.lock().get(&id).cloned()
    }

    /// Adds a connection unless a limit is reached: the relay's, or the client's share.
    pub fn insert(&self, conn: Arc<Conn>) -> Result<(), ConnLimit> {
        let mut map = self.map.lock();
        if map.len() >= self.max {
            return Err(ConnLimit::Relay);
        }
        let per_client = &self.per_client[conn.client];
        if per_client.load(Ordering::Relaxed) >= self.max_per_client {
            return Err(ConnLimit::Client);
        }
        per_client.fetch_add(1, Ordering::Relaxed);
        map.insert(conn.id, conn);
        self.count.send_replace(map.len());
        Ok(())
    }

    /// Forgets the connection `id`.
    pub fn remove(&self, id: ConnId) {
        let mut map = self.map.lock();
        if let Some(c) = map.remove(&id) {
            self.per_client[c.client].fetch_sub(1, Ordering::Relaxed);
        }
        self.count.send_replace(map.len());
    }

    /// Watches the number of connections held.
    pub fn count(&self) -> watch::Receiver<usize> {
        self.count.subscribe()
    }

    /// Starts the reaper of `conn` on `tasks`: one task per connection that frees its entry
    /// when it finishes, is cancelled, or stays idle past `idle`. The task runs in the current
    /// span (the connection's).
    pub fn spawn_reaper(self: &Arc<Self>, conn: Arc<Conn>, idle: Duration, tasks: &TaskTracker) {
        let table = self.clone();
        tasks.spawn(
            async move {
                conn.touch();
                loop {
                    let deadline = conn.last_activity() + idle;
                    tokio::select! {
                        () = conn.cancel.cancelled() => {
                            debug!("connection closed");
                            break;
                        }
                        () = conn.finished.notified() => {
                            info!("connection finished");
                            break;
                        }
                        () = tokio::time::sleep_until(deadline) => {
                            if conn.last_activity() + idle <= Instant::now() {
                                info!(idle_timeout = ?idle, "closing idle connection");
                                break;
                            }
                        }
                    }
                }
                conn.cancel.cancel();
                table.remove(conn.id);
            }
            .instrument(tracing::Span::current()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(client: usize) -> (Arc<Conn>, ConnectSide) {
        Conn::new(
            ConnId::random().expect("id"),
            0,
            client,
            CancellationToken::new(),
        )
    }

    #[test]
    fn each_slot_is_taken_once_and_uploads_only_after_accept() {
        let (c, _side) = conn(0);
        assert!(
            c.take_upload(Direction::Upstream).is_none(),
            "before accept"
        );
        let (_outcome, download) = c.take_accept(false).expect("first accept");
        assert!(download.is_some());
        assert!(c.take_accept(false).is_none(), "second accept");
        assert!(c.take_upload(Direction::Upstream).is_some());
        assert!(
            c.take_upload(Direction::Upstream).is_none(),
            "second upstream"
        );
        assert!(c.take_upload(Direction::Downstream).is_some());
        assert!(c.take_upload(Direction::Downstream).is_none());
    }

    #[test]
    fn a_refused_connection_opens_no_upload() {
        let (c, _side) = conn(0);
        assert!(c.take_accept(true).is_some());
        assert!(c.take_upload(Direction::Downstream).is_none());
        assert!(c.take_upload(Direction::Upstream).is_none());
    }

    #[test]
    fn the_table_keeps_both_limits_and_counts() {
        let table = Connections::new(2, 3, 2);
        let count = table.count();
        let (a, _) = conn(0);
        let (b, _) = conn(0);
        let (c, _) = conn(0);
        table.insert(a.clone()).expect("a");
        table.insert(b).expect("b");
        assert_eq!(table.insert(c), Err(ConnLimit::Client));
        let (d, _) = conn(1);
        table.insert(d).expect("another client");
        let (e, _) = conn(1);
        assert_eq!(table.insert(e), Err(ConnLimit::Relay));
        assert_eq!(*count.borrow(), 3);
        assert!(table.get(a.id).is_some());
        table.remove(a.id);
        assert!(table.get(a.id).is_none());
        assert_eq!(*count.borrow(), 2);
        let (f, _) = conn(0);
        table.insert(f).expect("room again for client 0");
    }

    #[tokio::test(start_paused = true)]
    async fn the_reaper_frees_idle_finished_and_cancelled_connections() {
        let table = Arc::new(Connections::new(1, 10, 10));
        let tasks = TaskTracker::new();
        let idle = Duration::from_secs(60);
        let (idle_conn, _) = conn(0);
        let (finished, _) = conn(0);
        let (cancelled, _) = conn(0);
        for c in [&idle_conn, &finished, &cancelled] {
            table.insert(c.clone()).expect("insert");
            table.spawn_reaper(c.clone(), idle, &tasks);
        }
        let mut count = table.count();
        finished.direction_done();
        finished.direction_done();
        cancelled.cancel.cancel();
        count.wait_for(|n| *n == 1).await.expect("two freed");
        assert!(table.get(idle_conn.id).is_some());
        assert!(!idle_conn.cancel.is_cancelled());
        // Paused time advances to the idle deadline once everything waits.
        count.wait_for(|n| *n == 0).await.expect("idle freed");
        assert!(idle_conn.cancel.is_cancelled());
        tasks.close();
        tasks.wait().await;
    }
}
