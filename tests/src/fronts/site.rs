//! What every front's configuration is made from.

use std::net::SocketAddr;

/// Where a front listens and what it proxies to.
#[derive(Debug, Clone, Copy)]
pub(super) struct Site<'a> {
    /// Its loopback port (TLS).
    pub port: u16,
    /// The relay behind it.
    pub relay: SocketAddr,
    /// Its inactivity timeouts, in seconds.
    pub t: u64,
    /// The path that the front itself answers, with `token`, to show that it is up.
    pub probe: &'a str,
    /// What it answers on `probe`.
    pub token: &'a str,
}
