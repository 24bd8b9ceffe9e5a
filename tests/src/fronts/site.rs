//! What every front's configuration is made from.

use std::net::SocketAddr;

/// Where a front listens and what it proxies to.
#[derive(Debug, Clone, Copy)]
pub(super) struct Site<'a> {
    /// Its loopback port (TLS).
    pub port: u16,
    /// The relays behind it: one, or several among which it balances by server name (see
    /// docs/scale-out.md).
    pub relays: &'a [SocketAddr],
    /// Its inactivity timeouts, in seconds.
    pub t: u64,
    /// The path that the front itself answers, with `token`, to show that it is up.
    pub probe: &'a str,
    /// What it answers on `probe`.
    pub token: &'a str,
    /// How many tunnels it must carry at once.
    pub tunnels: usize,
}

impl Site<'_> {
    /// Connections the front must hold at once: each tunnel may take up to 4 to the relay
    /// (HTTP/1.1) and some from the proxies, and listens take more; at most half as many as
    /// the front may open files (HAProxy sets aside two per connection, and refuses to start
    /// beyond its limit).
    pub fn connections(&self) -> usize {
        (self.tunnels * 10)
            .max(4096)
            .min(open_files_limit().saturating_sub(64) / 2)
    }

    /// HTTP/2 streams one proxy's connection must carry at once (2 per tunnel, plus listens).
    pub fn streams(&self) -> usize {
        (self.tunnels * 3).max(1024)
    }
}

/// The hard limit on open files, which the fronts inherit.
pub(super) fn open_files_limit() -> usize {
    rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(4096, |(_, hard)| {
        usize::try_from(hard).unwrap_or(usize::MAX)
    })
}
