//! Names shared by the relay and the endpoints: routes and paths, headers, names, channel IDs.
//!
//! See `docs/protocol.md` for the full description.

use std::fmt;
use std::str::FromStr;

/// Header carrying the ID an endpoint chose for a channel: on its `connect` or `listen`
/// request, and on the answer.
pub const CHANNEL_ID_HEADER: &str = "ptth-channel-id";
/// Header on every answer written by the relay itself, so that the proxies can tell those
/// from answers made up by a reverse proxy in front of it (a 502, 504 or 413 of nginx, say).
pub const RELAY_ANSWER_HEADER: &str = "ptth-relay";
/// Content type of every channel body.
pub const TUNNEL_CONTENT_TYPE: &str = "application/octet-stream";

/// HTTP/2 flow-control window of each stream, both ways, at the relay and the endpoints: the
/// most a stream's receiver buffers unread (one stopped reader costs at most this), and enough
/// for bulk transfers over long paths.
pub const HTTP2_STREAM_WINDOW: u32 = 1024 * 1024;
/// HTTP/2 flow-control window of each connection: the largest HTTP/2 allows. Every channel of
/// an endpoint shares its connection, so a smaller window would let a few streams whose
/// readers have stopped (their unread bytes count against it) stall all the others, heartbeats
/// included; this one takes over 2,000 of them. The memory bound is the streams' own windows.
pub const HTTP2_CONNECTION_WINDOW: u32 = (1 << 31) - 1;
/// Largest HTTP/2 frame accepted, both ways (measured best for bulk: docs/benchmarks.md).
pub const HTTP2_MAX_FRAME: u32 = 64 * 1024;
/// Streams an HTTP/2 peer may make the relay or an endpoint reset for its protocol errors
/// before the connection is closed (`ENHANCE_YOUR_CALM`; "MadeYouReset"). The count never
/// decreases, and honest peers add to it: data sent before learning that the other side had
/// answered and closed a stream (a refused upload, an aborted tunnel's) is answered with a
/// reset. The library's 1,024 would end an endpoint's connection, and every tunnel on it,
/// after as many aborted tunnels.
pub const HTTP2_MAX_LOCAL_ERROR_RESETS: usize = 65_536;

/// Route of `listen` (server: a channel for connections to this port; the answer's body is its
/// download), as a path template whose `{placeholders}` the relay's router matches and
/// [`listen_path`] fills in.
pub const LISTEN_ROUTE: &str = "/v1/servers/{server}/ports/{port}/listen";
/// Route of `connect` (client: a channel for connections to this port; the answer's body is
/// its download).
pub const CONNECT_ROUTE: &str = "/v1/servers/{server}/ports/{port}/connect";
/// Route of `downstream` (server: the upload of a channel; its body carries the service's
/// bytes).
pub const DOWNSTREAM_ROUTE: &str = "/v1/servers/{server}/channels/{id}/downstream";
/// Route of `upstream` (client: the upload of a channel; its body carries the user's bytes).
pub const UPSTREAM_ROUTE: &str = "/v1/servers/{server}/channels/{id}/upstream";
/// Path of the relay's health check for load balancers (`GET` or `HEAD`, unauthenticated):
/// `200` while the relay takes new channels, `503` while it drains.
pub const HEALTH_PATH: &str = "/v1/health";

/// In-band `FAILED` reason: the server has no channel open on any port.
pub const SERVER_OFFLINE: &str = "server offline";
/// In-band `FAILED` reason: the server is online but has no channel open on the port.
pub const PORT_NOT_OFFERED: &str = "server does not offer this port";
/// In-band `FAILED` reason: the port's queue of connections waiting for a server is full.
pub const QUEUE_FULL: &str = "too many pending connections";
/// In-band `FAILED` reason (and the reason of its `503`): the relay is draining.
pub const DRAINING: &str = "relay draining or shutting down, retry";
/// In-band `FAILED` reason, followed by the server's own in parentheses: the server answered
/// the connection with `FAILED`.
pub const TARGET_UNREACHABLE: &str = "the server could not reach its target";
/// In-band `FAILED` reason: no server channel answered within `accept_timeout`.
pub const NOT_TAKEN: &str = "the server did not take the connection in time";

/// The status a connection's in-band `FAILED` stands for (docs/protocol.md, "In-band
/// failures"): what the relay would have answered had it known before the channel opened.
pub fn failure_status(reason: &str) -> u16 {
    if reason.starts_with(TARGET_UNREACHABLE) {
        502
    } else if reason.starts_with(NOT_TAKEN) {
        504
    } else if reason == PORT_NOT_OFFERED {
        404
    } else {
        503
    }
}

/// `route` with its two placeholders replaced by `first` and `second`, in order.
fn fill(route: &str, first: &str, second: &str) -> String {
    let mut out = String::with_capacity(route.len() + first.len() + second.len());
    let mut values = [first, second].into_iter();
    let mut rest = route;
    while let Some(open) = rest.find('{')
        && let Some(len) = rest[open..].find('}')
    {
        out.push_str(&rest[..open]);
        out.push_str(values.next().unwrap_or_default());
        rest = &rest[open + len + 1..];
    }
    out.push_str(rest);
    out
}

/// Path of `listen` for `server` and `port`.
pub fn listen_path(server: &str, port: &str) -> String {
    fill(LISTEN_ROUTE, server, port)
}

/// Path of `connect` for `server` and `port`.
pub fn connect_path(server: &str, port: &str) -> String {
    fill(CONNECT_ROUTE, server, port)
}

/// Path of `downstream` for a channel.
pub fn downstream_path(server: &str, id: ChannelId) -> String {
    fill(DOWNSTREAM_ROUTE, server, &id.to_string())
}

/// Path of `upstream` for a channel.
pub fn upstream_path(server: &str, id: ChannelId) -> String {
    fill(UPSTREAM_ROUTE, server, &id.to_string())
}

/// Longest server, client or port name.
pub const MAX_NAME_LEN: usize = 64;

/// Whether `name` is a valid server, client or port name: 1 to 64 of `A-Z a-z 0-9 . _ -`,
/// not starting with a dot.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A channel ID: 128 bits from the operating system's random source, written as 32 lowercase
/// hex digits. Each endpoint chooses the IDs of its own channels.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(uuid::Uuid);

impl ChannelId {
    /// A fresh random ID; fails only if the operating system's random source does.
    pub fn random() -> Result<Self, std::io::Error> {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Self(uuid::Uuid::from_bytes(b)))
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.simple(), f)
    }
}

impl fmt::Debug for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A channel ID that is not 32 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("malformed channel id")]
pub struct BadChannelId;

impl FromStr for ChannelId {
    type Err = BadChannelId;
    fn from_str(s: &str) -> Result<Self, BadChannelId> {
        if s.len() != 32 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(BadChannelId);
        }
        uuid::Uuid::try_parse(s).map(Self).map_err(|_| BadChannelId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_id_round_trips_and_rejects_junk() {
        let id = ChannelId::random().expect("random");
        let s = id.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(s.parse::<ChannelId>().expect("parse"), id);
        assert!("".parse::<ChannelId>().is_err());
        assert!("zz".repeat(16).parse::<ChannelId>().is_err());
        assert!(format!("{s}0").parse::<ChannelId>().is_err());
        assert!(
            "A".repeat(32).parse::<ChannelId>().is_err(),
            "IDs are lowercase"
        );
        let dashed = "67e55044-10b1-426f-9247-bb680e5fe0c8";
        assert!(dashed.parse::<ChannelId>().is_err());
        assert_ne!(ChannelId::random().expect("random"), id);
    }

    #[test]
    fn paths_fill_the_routes() {
        let id: ChannelId = "0123456789abcdef0123456789abcdef".parse().expect("id");
        assert_eq!(listen_path("db", "pg"), "/v1/servers/db/ports/pg/listen");
        assert_eq!(connect_path("db", "pg"), "/v1/servers/db/ports/pg/connect");
        assert_eq!(
            downstream_path("db", id),
            format!("/v1/servers/db/channels/{id}/downstream")
        );
        assert_eq!(
            upstream_path("db", id),
            format!("/v1/servers/db/channels/{id}/upstream")
        );
    }

    #[test]
    fn names() {
        assert!(valid_name("db"));
        assert!(valid_name("web-1.prod_x"));
        assert!(!valid_name(""));
        assert!(!valid_name(".."));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("a b"));
        assert!(!valid_name(&"a".repeat(65)));
    }
}
