//! One connection (a tunnel) at the relay, from `connect` to its end: the one-time hand-over
//! slots through which its requests meet, and the table of connections with its limits and
//! the reaper task that frees each entry.
//!
//! The two directions meet here. `upstream` hands its request body through the upstream slot
//! to the answer of the `listen` that took the connection, and `downstream` hands its body
//! through the downstream slot to the `connect` answer (see `pipe.rs`). Each upload's arrival
//! is also signalled to its own endpoint's download, which then sends `ATTACHED`.

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

/// How the server answered a connection it was given.
#[derive(Debug)]
pub(crate) enum AcceptOutcome {
    /// It reached its target: its `downstream` has arrived.
    Accepted,
    /// It could not (or it is at its limit): it called `refuse`.
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

/// Where an upload hands over its body, and how it tells its own endpoint's download that it
/// has arrived.
#[derive(Debug)]
pub(crate) struct UploadSlot {
    pub body: oneshot::Sender<Upload>,
    pub attached: oneshot::Sender<()>,
}

/// What a download needs: the other side's upload when it comes, and the signal that its own
/// endpoint's upload has arrived.
#[derive(Debug)]
pub(crate) struct DownloadSlot {
    pub upload: oneshot::Receiver<Upload>,
    pub attached: oneshot::Receiver<()>,
}

/// What the `connect` handler keeps of a new connection: the server's answer, and its download
/// (the downstream).
#[derive(Debug)]
pub(crate) struct ConnectSide {
    pub accepted: oneshot::Receiver<AcceptOutcome>,
    pub download: DownloadSlot,
}

/// One-time hand-over points of a connection, each taken once.
#[derive(Debug)]
struct Slots {
    /// The server's answer, given by its `downstream` or its `refuse`.
    outcome: Option<oneshot::Sender<AcceptOutcome>>,
    /// The download of the `listen` that takes the connection (the upstream).
    listen_download: Option<DownloadSlot>,
    upstream: Option<UploadSlot>,
    downstream: Option<UploadSlot>,
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
        let (outcome, accepted) = oneshot::channel();
        let (upstream_tx, upstream_rx) = oneshot::channel();
        let (downstream_tx, downstream_rx) = oneshot::channel();
        let (upstream_attached, upstream_attached_rx) = oneshot::channel();
        let (downstream_attached, downstream_attached_rx) = oneshot::channel();
        let slots = Slots {
            outcome: Some(outcome),
            listen_download: Some(DownloadSlot {
                upload: upstream_rx,
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
            download: DownloadSlot {
                upload: downstream_rx,
                attached: upstream_attached_rx,
            },
        };
        (conn, side)
    }

    /// The download of the `listen` that takes the connection, once.
    pub fn take_listen_download(&self) -> Option<DownloadSlot> {
        self.slots.lock().listen_download.take()
    }

    /// The slot of the client's upload, once; it may come before the server has the
    /// connection.
    pub fn take_upstream(&self) -> Option<UploadSlot> {
        self.slots.lock().upstream.take()
    }

    /// Whether the client's upload has arrived.
    pub fn upstream_arrived(&self) -> bool {
        self.slots.lock().upstream.is_none()
    }

    /// The slot of the server's upload and the server's answer to send with it (the
    /// `downstream` is the acceptance), once, and only after a `listen` took the connection.
    pub fn take_downstream(&self) -> Option<(UploadSlot, oneshot::Sender<AcceptOutcome>)> {
        let mut slots = self.slots.lock();
        if slots.listen_download.is_some() || slots.outcome.is_none() {
            return None;
        }
        let upload = slots.downstream.take()?;
        Some((upload, slots.outcome.take()?))
    }

    /// The server's refusal to send (`refuse`), once, and only after a `listen` took the
    /// connection and before its `downstream`. It closes the downstream's slot.
    pub fn take_refusal(&self) -> Option<oneshot::Sender<AcceptOutcome>> {
        let mut slots = self.slots.lock();
        if slots.listen_download.is_some() {
            return None;
        }
        slots.downstream = None;
        slots.outcome.take()
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

/// An `upstream` waiting for its `connect`; it leaves the table's list of waiters however its
/// wait ends (found, timed out, or its request gone).
struct EarlyWaiter<'a> {
    early: &'a Mutex<HashMap<ConnId, oneshot::Sender<Arc<Conn>>>>,
    id: ConnId,
    found: Option<oneshot::Receiver<Arc<Conn>>>,
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

/// Why the table refused a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TableRefusal {
    /// `max_connections`.
    RelayFull,
    /// `max_connections_per_client`.
    ClientFull,
    /// The client chose an ID that the relay holds already.
    IdInUse,
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
    /// `upstream` requests that arrived before their `connect`, each waiting for it (at most
    /// `max`).
    early: Mutex<HashMap<ConnId, oneshot::Sender<Arc<Conn>>>>,
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
            early: Mutex::new(HashMap::new()),
        }
    }

    /// The connection `id`, if the relay holds it.
    pub fn get(&self, id: ConnId) -> Option<Arc<Conn>> {
        self.map.lock().get(&id).cloned()
    }

    /// The connection `id`, waiting at most `limit` for its `connect` if it has not come yet
    /// (an `upstream` sent at once beside its `connect` may overtake it). `None` if it does not
    /// come, or if too many wait already, or another waits for the same ID.
    pub async fn find_or_wait(&self, id: ConnId, limit: Duration) -> Option<Arc<Conn>> {
        let mut waiter = {
            let map = self.map.lock();
            if let Some(c) = map.get(&id) {
                return Some(c.clone());
            }
            let mut early = self.early.lock();
            if early.len() >= self.max || early.contains_key(&id) {
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

    /// Adds a connection unless a limit is reached (the relay's, or the client's share) or its
    /// ID is in use; hands it to an `upstream` waiting for it.
    pub fn insert(&self, conn: Arc<Conn>) -> Result<(), TableRefusal> {
        let mut map = self.map.lock();
        if map.contains_key(&conn.id) {
            return Err(TableRefusal::IdInUse);
        }
        if map.len() >= self.max {
            return Err(TableRefusal::RelayFull);
        }
        let per_client = &self.per_client[conn.client];
        if per_client.load(Ordering::Relaxed) >= self.max_per_client {
            return Err(TableRefusal::ClientFull);
        }
        per_client.fetch_add(1, Ordering::Relaxed);
        map.insert(conn.id, conn.clone());
        self.count.send_replace(map.len());
        if let Some(waiter) = self.early.lock().remove(&conn.id) {
            let _ = waiter.send(conn);
        }
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
    fn each_slot_is_taken_once_and_the_server_answers_only_after_a_listen() {
        let (c, _side) = conn(0);
        assert!(c.take_upstream().is_some(), "the upstream may come first");
        assert!(c.take_upstream().is_none(), "second upstream");
        assert!(
            c.take_downstream().is_none(),
            "no listen has the connection"
        );
        assert!(c.take_refusal().is_none(), "no listen has the connection");
        assert!(c.take_listen_download().is_some());
        assert!(c.take_listen_download().is_none(), "second listen");
        assert!(c.take_downstream().is_some());
        assert!(c.take_downstream().is_none(), "second downstream");
        assert!(c.take_refusal().is_none(), "a refusal after the downstream");
    }

    #[test]
    fn a_refused_connection_takes_no_downstream() {
        let (c, _side) = conn(0);
        assert!(c.take_listen_download().is_some());
        assert!(c.take_refusal().is_some());
        assert!(c.take_refusal().is_none(), "second refusal");
        assert!(c.take_downstream().is_none());
    }

    #[tokio::test]
    async fn an_upstream_may_wait_for_its_connect() {
        let table = Connections::new(1, 10, 10);
        let (c, _side) = conn(0);
        let (waited, ()) = tokio::join!(table.find_or_wait(c.id, Duration::from_secs(10)), async {
            tokio::task::yield_now().await;
            table.insert(c.clone()).expect("insert");
        });
        assert_eq!(waited.map(|w| w.id), Some(c.id));
        // One that never comes: nothing, and no waiter left behind.
        let other = ConnId::random().expect("id");
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
    fn the_table_keeps_both_limits_and_counts() {
        let table = Connections::new(2, 3, 2);
        let count = table.count();
        let (a, _) = conn(0);
        let (b, _) = conn(0);
        let (c, _) = conn(0);
        table.insert(a.clone()).expect("a");
        table.insert(b).expect("b");
        assert_eq!(table.insert(c), Err(TableRefusal::ClientFull));
        let (d, _) = conn(1);
        table.insert(d).expect("another client");
        let (e, _) = conn(1);
        assert_eq!(table.insert(e), Err(TableRefusal::RelayFull));
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
