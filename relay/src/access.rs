//! Who is calling, and what they may touch: every request's signature is verified first, then
//! the principal it names is checked against the path (a server acts only as itself, a client
//! only within its allow list and on its own connections).
//!
//! Nothing is allocated for a caller whose signature has not verified.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::Request;
use http::{HeaderValue, header};
use ptth_common::auth::{
    AuthError, ReceivedHeaders, SIGNATURE, SIGNATURE_INPUT, SIGNED_AUTHORITY, unix_now,
};
use ptth_common::config::Name;
use ptth_common::protocol::ChannelId;
use tracing::{info, warn};

use crate::channel::{Channel, Side};
use crate::state::{Directory, Principal, Shared};

/// The TCP peer of the HTTP connection a request came on (a request extension).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub SocketAddr);

/// Why a request may not do what it asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Denied {
    /// The signature did not verify.
    Auth {
        /// Why.
        error: AuthError,
        /// The authority the signature was checked against, when that is the request's own
        /// (`authorities` unset), for the answer: the caller may compare it with the one it
        /// signed for. It depends on the request and the configuration only, never on the key.
        relay_authority: Option<HeaderValue>,
    },
    /// A server key used with another server's name in the path.
    OtherServer,
    /// A client key on a server's endpoint.
    NotAServer,
    /// A server key on `connect`.
    NotAClient,
    /// The client's allow list does not grant the port.
    NotAllowed,
    /// The channel does not exist, is not the caller's, or has ended. The same answer for all
    /// three, so that IDs stay secret.
    NoSuchChannel,
}

/// The address of the real client: the TCP peer, or, when the peer is a trusted reverse
/// proxy, the rightmost `X-Forwarded-For` entry that is not itself a trusted proxy.
pub(crate) fn client_addr<B>(shared: &Shared, req: &http::Request<B>) -> Option<IpAddr> {
    let peer = req.extensions().get::<Peer>()?.0.ip();
    let trusted = |ip: IpAddr| shared.config.trusted_proxies.iter().any(|c| c.contains(ip));
    if !trusted(peer) {
        return Some(peer);
    }
    let mut addr = peer;
    let values: Vec<&str> = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    for hop in values.iter().rev().flat_map(|v| v.rsplit(',')) {
        let Ok(ip) = hop.trim().parse::<IpAddr>() else {
            break;
        };
        addr = ip;
        if !trusted(ip) {
            break;
        }
    }
    Some(addr)
}

/// The request's own authority: the HTTP/2 `:authority`, or the `Host` header.
fn authority_of(req: &Request) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

/// Longest authority a `401` repeats or the relay tries a signature over: a DNS name (253)
/// and a port.
const LONGEST_AUTHORITY: usize = 253 + ":65535".len();

/// Verifies the request's signature: who signed it. Refusals are logged with the client's
/// address, the cause and what to do.
pub(crate) fn authenticate(
    shared: &Shared,
    dir: &Directory,
    req: &Request,
) -> Result<Principal, Denied> {
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let own;
    let authorities: Vec<&str> = if dir.authorities.is_empty() {
        own = authority_of(req).unwrap_or_default().to_ascii_lowercase();
        vec![own.as_str()]
    } else {
        dir.authorities.iter().map(String::as_str).collect()
    };
    let received = ReceivedHeaders {
        input: header(SIGNATURE_INPUT),
        signature: header(SIGNATURE),
        signed_for: header(SIGNED_AUTHORITY).filter(|a| a.len() <= LONGEST_AUTHORITY),
    };
    let result = shared
        .verifier
        .verify(
            req.method().as_str(),
            &authorities,
            req.uri().path(),
            received,
            unix_now(),
        )
        // A key a reload has just removed or replaced: unknown now.
        .and_then(|(principal, key)| match dir.holds(principal, &key) {
            true => Ok(principal),
            false => Err(AuthError::UnknownKey(Some(key))),
        });
    result.map_err(|error| {
        if let Some(left_out) = shared.refusal_logs.auth.admit() {
            let client = client_addr(shared, req)
                .map(|a| a.to_string())
                .unwrap_or_default();
            let why = Refusal {
                error,
                checked: &authorities,
                configured: !dir.authorities.is_empty(),
                signed_for: received.signed_for.unwrap_or_default(),
            };
            info!(path = req.uri().path(), %client, left_out, "request refused: {why}");
        }
        let relay_authority = match authorities[..] {
            [own]
                if dir.authorities.is_empty()
                    && !own.is_empty()
                    && own.len() <= LONGEST_AUTHORITY =>
            {
                HeaderValue::from_str(own).ok()
            }
            _ => None,
        };
        Denied::Auth {
            error,
            relay_authority,
        }
    })
}

/// A refused signature, for the relay's log: the cause and what to do about it.
struct Refusal<'a> {
    error: AuthError,
    /// The authorities the signature was checked against.
    checked: &'a [&'a str],
    /// Whether those are `authorities` of relay.toml (else the request's own).
    configured: bool,
    /// The authority the caller says it signed for (empty if it does not say).
    signed_for: &'a str,
}

impl std::fmt::Display for Refusal<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            error,
            checked,
            configured,
            signed_for,
        } = self;
        write!(f, "{error}")?;
        match error {
            AuthError::Malformed(_) => f.write_str(
                ": not a ptth endpoint (a scan?), or a front in between drops or alters the \
                 Signature and Signature-Input headers",
            ),
            AuthError::UnknownKey(_) => f.write_str(
                ": if this caller is yours, add its public key to relay.toml, under [[servers]] \
                 or [[clients]]",
            ),
            AuthError::BadSignature(_) => write!(
                f,
                " over {checked:?}: a front in between may rewrite the path (it must pass /v1/ \
                 on unchanged), the caller may sign for another authority without saying \
                 which, or the request is forged"
            ),
            AuthError::OtherAuthority(_) if *configured => write!(
                f,
                ": {signed_for:?}, which is not in `authorities` {checked:?}: add it there in \
                 relay.toml if this relay answers to that name (or give the caller a relay_url \
                 with one of those)"
            ),
            AuthError::OtherAuthority(_) => write!(
                f,
                ": {signed_for:?}, but the request arrived as {:?}: a front in between changes \
                 the Host; set `authorities = [{signed_for:?}]` in relay.toml (or make the \
                 front pass the Host on unchanged)",
                checked.first().copied().unwrap_or_default()
            ),
            AuthError::Stale(skew) if *skew > 0 => {
                write!(f, ": the clocks differ by {skew} s: sync them (NTP)")
            }
            AuthError::Stale(skew) => write!(
                f,
                ": the clocks differ by {} s, or the request took that long to come: sync the \
                 clocks (NTP)",
                skew.unsigned_abs()
            ),
            AuthError::Replay => f.write_str(
                ": the same signed request came twice: a front in between that retries \
                 requests, or a replay by someone who saw it (use TLS)",
            ),
            AuthError::Busy => f.write_str(
                ": this key has its share of the nonce cache: raise `max_nonces` in relay.toml \
                 if this caller is legitimate",
            ),
        }
    }
}

/// Authenticates a server acting as the server named `server` in the path; its index.
pub(crate) fn server(
    shared: &Shared,
    dir: &Directory,
    req: &Request,
    server: &Name,
) -> Result<usize, Denied> {
    match authenticate(shared, dir, req)? {
        Principal::Server(i) if dir.server_name(i) == Some(server) => Ok(i),
        Principal::Server(i) => {
            if let Some(left_out) = shared.refusal_logs.other_server.admit() {
                let key_of = dir.server_name(i).map(Name::as_str).unwrap_or_default();
                warn!(key_of, path_server = %server, left_out, "server key used for another server name");
            }
            Err(Denied::OtherServer)
        }
        Principal::Client(_) => Err(Denied::NotAServer),
    }
}

/// Authenticates a client allowed to connect to `server`/`port`; its index.
pub(crate) fn connecting_client(
    shared: &Shared,
    dir: &Directory,
    req: &Request,
    server: &Name,
    port: &Name,
) -> Result<usize, Denied> {
    let Principal::Client(i) = authenticate(shared, dir, req)? else {
        return Err(Denied::NotAClient);
    };
    if !dir.client_allow[i]
        .iter()
        .any(|g| g.allows(server.as_str(), port.as_str()))
    {
        if let Some(left_out) = shared.refusal_logs.not_allowed.admit() {
            let client = &dir.client_names[i];
            info!(%client, %server, %port, left_out, "connect denied by allow list");
        }
        return Err(Denied::NotAllowed);
    }
    Ok(i)
}

/// The channel ID in a path; a malformed one is no such channel.
pub(crate) fn channel_id(id: &str) -> Result<ChannelId, Denied> {
    id.parse().map_err(|_| Denied::NoSuchChannel)
}

/// `channel` if it is live and a channel of the server `server` (by index).
pub(crate) fn servers_channel(
    channel: Option<Arc<Channel>>,
    server: usize,
) -> Result<Arc<Channel>, Denied> {
    let channel = channel.ok_or(Denied::NoSuchChannel)?;
    if !channel.is_server() || channel.server != server || channel.cancel.is_cancelled() {
        return Err(Denied::NoSuchChannel);
    }
    Ok(channel)
}

/// Authenticates a client calling about its channel `id` (`upstream`): the client's index
/// and the ID. A server key, or a malformed ID, is no such channel.
pub(crate) fn client_of(
    shared: &Shared,
    dir: &Directory,
    req: &Request,
    id: &str,
) -> Result<(usize, ChannelId), Denied> {
    let Principal::Client(i) = authenticate(shared, dir, req)? else {
        return Err(Denied::NoSuchChannel);
    };
    Ok((i, channel_id(id)?))
}

/// `channel` if it is live, the client's (by index), and leads to the server named `server`.
pub(crate) fn clients_channel(
    dir: &Directory,
    channel: Option<Arc<Channel>>,
    client: usize,
    server: &str,
) -> Result<Arc<Channel>, Denied> {
    let channel = channel.ok_or(Denied::NoSuchChannel)?;
    if channel.side != Side::Client(client)
        || channel.cancel.is_cancelled()
        || dir.server_name(channel.server).map(Name::as_str) != Some(server)
    {
        return Err(Denied::NoSuchChannel);
    }
    Ok(channel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ptth_common::config::RelayConfig;
    use ptth_common::keys::PrivateKey;
    use tokio_util::sync::CancellationToken;

    fn shared() -> Shared {
        let key = || PrivateKey::generate().expect("key").public();
        let text = format!(
            "trusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\"]\n\
             [[servers]]\nname = \"db\"\npublic_key = \"{}\"\n\
             [[servers]]\nname = \"web\"\npublic_key = \"{}\"\n\
             [[clients]]\nname = \"alice\"\npublic_key = \"{}\"\nallow = [\"db/*\"]\n",
            key(),
            key(),
            key()
        );
        let config = RelayConfig::from_str("relay.toml".as_ref(), &text).expect("config");
        Shared::new(config, CancellationToken::new())
    }

    fn request(peer: &str, forwarded_for: &[&str]) -> Request {
        let mut req = Request::new(axum::body::Body::empty());
        req.extensions_mut()
            .insert(Peer(peer.parse().expect("socket address")));
        for v in forwarded_for {
            req.headers_mut()
                .append("x-forwarded-for", v.parse().expect("header value"));
        }
        req
    }

    #[test]
    fn forwarded_for_is_believed_from_trusted_proxies_only() {
        let s = shared();
        let addr = |peer, xff: &[&str]| client_addr(&s, &request(peer, xff)).map(|a| a.to_string());
        // An untrusted peer is the client, whatever it claims.
        assert_eq!(
            addr("198.51.100.1:5000", &["203.0.113.9"]).as_deref(),
            Some("198.51.100.1")
        );
        // Through trusted proxies: the rightmost entry that is not one of them.
        assert_eq!(
            addr("127.0.0.1:5000", &["198.51.100.7, 203.0.113.9", "10.0.0.2"]).as_deref(),
            Some("203.0.113.9")
        );
        // A malformed entry ends the walk at the last address that parsed.
        assert_eq!(
            addr("127.0.0.1:5000", &["203.0.113.9, junk, 10.1.2.3"]).as_deref(),
            Some("10.1.2.3")
        );
        assert_eq!(addr("127.0.0.1:5000", &[]).as_deref(), Some("127.0.0.1"));
    }

    #[test]
    fn a_channel_is_found_only_by_its_own_endpoint() {
        let s = shared();
        let channel = |side, server| {
            Channel::new(
                ChannelId::random().expect("id"),
                side,
                server,
                ptth_common::config::Name::try_from("pg".to_owned()).expect("name"),
                CancellationToken::new(),
            )
        };
        let db = channel(Side::Server, 0);
        assert!(servers_channel(Some(db.clone()), 0).is_ok());
        assert_eq!(
            servers_channel(Some(db.clone()), 1).map(drop),
            Err(Denied::NoSuchChannel),
            "another server"
        );
        assert_eq!(
            clients_channel(&s.directory(), Some(db.clone()), 0, "db").map(drop),
            Err(Denied::NoSuchChannel),
            "a server's channel is no client's"
        );
        let alice = channel(Side::Client(0), 0);
        assert!(clients_channel(&s.directory(), Some(alice.clone()), 0, "db").is_ok());
        assert_eq!(
            clients_channel(&s.directory(), Some(alice.clone()), 0, "web").map(drop),
            Err(Denied::NoSuchChannel),
            "the path names another server"
        );
        assert_eq!(
            servers_channel(Some(alice.clone()), 0).map(drop),
            Err(Denied::NoSuchChannel)
        );
        assert_eq!(
            servers_channel(None, 0).map(drop),
            Err(Denied::NoSuchChannel)
        );
        assert_eq!(channel_id("not-an-id"), Err(Denied::NoSuchChannel));
        alice.cancel.cancel();
        assert_eq!(
            clients_channel(&s.directory(), Some(alice), 0, "db").map(drop),
            Err(Denied::NoSuchChannel),
            "an ended channel is gone"
        );
    }
}
