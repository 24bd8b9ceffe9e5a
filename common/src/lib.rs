//! Code shared by `ptth_relay`, `ptth_server` and `ptth_proxy`.
//!
//! * [`protocol`]: paths, header names, connection IDs.
//! * [`frame`]: the frames inside every tunnel body (data, heartbeat, end).
//! * [`auth`]: request signing and verification (an RFC 9421 profile with ed25519).
//! * [`keys`]: key files and public key encoding.
//! * [`config`]: the three TOML configuration files.
//! * [`tunnel`]: the endpoint side of a tunnel (TCP socket to and from frames).
//! * [`client`]: the signed HTTP client used by the two proxies.
//! * [`cli`]: logging and signal handling for the binaries.

pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod frame;
pub mod keys;
pub mod protocol;
pub mod tunnel;

/// Backoff schedule for reconnecting: doubles from 100 ms up to `max`, with jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: std::time::Duration,
    max: std::time::Duration,
}

impl Backoff {
    /// Starts at 100 ms.
    pub fn new(max: std::time::Duration) -> Self {
        Self {
            next: std::time::Duration::from_millis(100).min(max),
            max,
        }
    }

    /// The next delay (with up to 25% random jitter subtracted), doubling the one after.
    pub fn next_delay(&mut self) -> std::time::Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let mut b = [0u8; 1];
        let _ = getrandom::fill(&mut b);
        base - base.mul_f64(f64::from(b[0]) / 1024.0)
    }

    /// Back to the first delay after a success.
    pub fn reset(&mut self) {
        self.next = std::time::Duration::from_millis(100).min(self.max);
    }
}
