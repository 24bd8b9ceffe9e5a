//! Names shared by the relay and the proxies: paths, headers, identifiers, status meanings.
//!
//! See `docs/protocol.md` for the full description.

use std::fmt;
use std::str::FromStr;

/// Header carrying the connection ID on `listen` and `connect` answers.
pub const CONNECTION_ID_HEADER: &str = "ptth-connection-id";
/// Header on `accept` with which a server reports that it could not reach its target.
pub const ACCEPT_ERROR_HEADER: &str = "ptth-accept-error";
/// Value of [`ACCEPT_ERROR_HEADER`] when the target refused or could not be reached.
pub const ACCEPT_ERROR_REFUSED: &str = "refused";
/// Header on every answer written by the relay itself, so that the proxies can tell those
/// from answers made up by a reverse proxy in front of it (a 502, 504 or 413 of nginx, say).
pub const RELAY_ANSWER_HEADER: &str = "ptth-relay";
/// Content type of every tunnel body.
pub const TUNNEL_CONTENT_TYPE: &str = "application/octet-stream";

/// Path of `listen` for `server` and `port`.
pub fn listen_path(server: &str, port: &str) -> String {
    format!("/v1/servers/{server}/ports/{port}/listen")
}

/// Path of `connect` for `server` and `port`.
pub fn connect_path(server: &str, port: &str) -> String {
    format!("/v1/servers/{server}/ports/{port}/connect")
}

/// Path of `accept` for a connection.
pub fn accept_path(server: &str, id: ConnId) -> String {
    format!("/v1/servers/{server}/connections/{id}/accept")
}

/// Path of `downstream` for a connection.
pub fn downstream_path(server: &str, id: ConnId) -> String {
    format!("/v1/servers/{server}/connections/{id}/downstream")
}

/// Path of `upstream` for a connection.
pub fn upstream_path(server: &str, id: ConnId) -> String {
    format!("/v1/servers/{server}/connections/{id}/upstream")
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

/// A connection ID: 128 bits from the operating system's random source, written as 32
/// lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(uuid::Uuid);

impl ConnId {
    /// A fresh random ID.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b)?;
        Ok(Self(uuid::Uuid::from_bytes(b)))
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.simple(), f)
    }
}

impl fmt::Debug for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A connection ID that is not 32 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("malformed connection id")]
pub struct BadConnId;

impl FromStr for ConnId {
    type Err = BadConnId;
    fn from_str(s: &str) -> Result<Self, BadConnId> {
        if s.len() != 32 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(BadConnId);
        }
        uuid::Uuid::try_parse(s).map(Self).map_err(|_| BadConnId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_id_round_trips_and_rejects_junk() {
        let id = ConnId::random().expect("random");
        let s = id.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(s.parse::<ConnId>().expect("parse"), id);
        assert!("".parse::<ConnId>().is_err());
        assert!("zz".repeat(16).parse::<ConnId>().is_err());
        assert!(format!("{s}0").parse::<ConnId>().is_err());
        assert!(
            "A".repeat(32).parse::<ConnId>().is_err(),
            "IDs are lowercase"
        );
        let dashed = "67e55044-10b1-426f-9247-bb680e5fe0c8";
        assert!(dashed.parse::<ConnId>().is_err());
        assert_ne!(ConnId::random().expect("random"), id);
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
