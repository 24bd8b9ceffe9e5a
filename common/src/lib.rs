//! Code shared by `ptth_relay`, `ptth_server` and `ptth_proxy`: the protocol and the pieces of a
//! tunnel that more than one program needs.
//!
//! A tunnel carries one TCP connection between a user's application and a service through the
//! relay. Its two **endpoints** are `ptth_proxy` (at the user) and `ptth_server` (at the
//! service). Each endpoint keeps **channels** open to the relay: pairs of long-lived requests
//! under an ID the endpoint chose, each carrying one connection at a time, and then the next.
//! A channel has an **upload** (the streaming request body of `upstream` or `downstream`) and
//! a **download** (the streaming answer body of `connect` or `listen`). A connection has two
//! **directions**, named after the uploads that carry them: **upstream** (the user's bytes,
//! towards the service) and **downstream** (the service's bytes, towards the user). For each
//! connection the relay joins a client channel with a server channel and lends each upload to
//! the other channel's download.
//!
//! * [`protocol`]: routes and paths, header names, names, channel IDs.
//! * [`frame`]: the frames inside every channel body (`DATA`, `HEARTBEAT`, `END`, `ATTACHED`,
//!   `OPEN`, `FAILED`).
//! * [`auth`]: request signing and verification (an RFC 9421 profile with ed25519).
//! * [`keys`]: key files and public key encoding.
//! * [`config`]: the three TOML configuration files.
//! * [`admin`]: the admin listener (`/metrics` and the relay's status page); [`audit`]: the
//!   audit log.
//! * [`cli`]: logging, signals, error reports and key commands for the binaries.
//! * [`mailbox`]: the small queue each channel is told what to do through.
//! * With the `endpoint` feature (what the two endpoints use, and the relay does not):
//!   [`client`], the signed HTTP client to the relay, and [`channel`], an endpoint's channel,
//!   which carries connections between a local TCP socket and the relay
//!   ([`channel::Channel`]), and [`metrics`], what they count.
//!
//! Every call to the relay is signed; the relay verifies it before anything else:
//!
//! ```
//! use ptth_common::auth::{Signer, Verifier, unix_now};
//! use ptth_common::keys::PrivateKey;
//! use ptth_common::protocol::connect_path;
//!
//! let alice = PrivateKey::generate()?;
//! let relay = Verifier::new([(alice.public(), "alice")], 1000);
//! let path = connect_path("db", "postgres");
//! let signed = Signer::new(alice).sign("POST", "relay.example.com", &path);
//! let who = relay.verify(
//!     "POST",
//!     &["relay.example.com"],
//!     &path,
//!     signed.as_received(),
//!     unix_now(),
//! );
//! assert_eq!(who, Ok("alice"));
//! # Ok::<(), ptth_common::keys::KeyError>(())
//! ```
#![warn(missing_docs)]

pub mod admin;
pub mod audit;
pub mod auth;
#[cfg(feature = "endpoint")]
pub mod channel;
pub mod cli;
#[cfg(feature = "endpoint")]
pub mod client;
pub mod config;
pub mod frame;
pub mod keys;
pub mod mailbox;
#[cfg(feature = "endpoint")]
pub mod metrics;
pub mod protocol;

use std::time::Duration;

use tokio_util::task::TaskTracker;

/// How long a program waits, once its shutdown has begun, for the tasks it started to end.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Closes `tracker` to new tasks and waits at most [`SHUTDOWN_GRACE`] for its tasks to end;
/// logs how many were left behind.
pub async fn wait_for_tasks(tracker: &TaskTracker) {
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            tasks = tracker.len(),
            grace = ?SHUTDOWN_GRACE,
            "tasks still running after the shutdown grace period; leaving them"
        );
    }
}

/// Waits until `tunnels` (the open tunnels of a draining program) is zero, for at most
/// `grace`, and logs how it ended.
pub async fn wait_for_tunnels(mut tunnels: tokio::sync::watch::Receiver<usize>, grace: Duration) {
    let open = *tunnels.borrow();
    tracing::info!(tunnels = open, grace = ?grace, "draining: taking no new connections; open tunnels may finish");
    let all_ended = tokio::time::timeout(grace, tunnels.wait_for(|n| *n == 0))
        .await
        .is_ok();
    if all_ended {
        tracing::info!("drained: every tunnel has ended");
    } else {
        let left = *tunnels.borrow();
        tracing::warn!(
            tunnels = left,
            "drain_grace is over; closing the tunnels still open"
        );
    }
}

/// Runs hyper's background tasks (connections, HTTP/2 streams) on a program's task tracker,
/// so that [`wait_for_tasks`] waits for them too.
#[derive(Debug, Clone)]
pub struct TrackedExecutor(pub TaskTracker);

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}
