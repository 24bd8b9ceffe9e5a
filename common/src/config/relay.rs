//! `relay.toml`: where the relay listens, its limits, and the servers and clients it knows.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::shared::{
    ConfigError, Name, at_line, default_drain_grace, default_heartbeat, default_max_connections,
    parse, positive_duration, positive_usize, read, resolve, whole_file,
};
use crate::keys::PublicKey;

/// `relay.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Address to listen on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Names under which clients reach the relay (`host` or `host:port`, as in their
    /// `relay_url`). Signatures must name one of them. Empty: the request's `Host`.
    #[serde(default, deserialize_with = "authority_list")]
    pub authorities: Vec<String>,
    /// Reverse proxies whose `X-Forwarded-For` is believed (addresses or networks).
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
    /// Certificate chain (PEM) to serve HTTPS directly; needs `tls_key`.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// A channel with no bytes (heartbeats included) for this long is closed.
    #[serde(
        default = "default_idle_timeout",
        deserialize_with = "positive_duration"
    )]
    pub idle_timeout: Duration,
    /// An HTTP connection with no request in flight for this long is closed: from its accept
    /// (TLS handshake included) to its first request's headers, and between requests.
    #[serde(
        default = "default_http_idle_timeout",
        deserialize_with = "positive_duration"
    )]
    pub http_idle_timeout: Duration,
    /// Heartbeat period on a channel's download while it has nothing else to send.
    #[serde(default = "default_heartbeat", deserialize_with = "positive_duration")]
    pub heartbeat_interval: Duration,
    /// No longer used: channels are answered at once and kept open by heartbeats. Accepted so
    /// that older configuration files still load (the relay warns).
    #[serde(default, with = "humantime_serde")]
    pub listen_timeout: Option<Duration>,
    /// How long a client's connection may wait for a server channel and the server's answer
    /// (then it fails), and how long an upload may wait for its channel's download request.
    #[serde(
        default = "default_accept_timeout",
        deserialize_with = "relay_wait_duration"
    )]
    pub accept_timeout: Duration,
    /// Most client channels (idle or carrying a connection) at once; more are answered 503.
    #[serde(
        default = "default_max_connections",
        deserialize_with = "positive_usize"
    )]
    pub max_connections: usize,
    /// Most client channels of one client at once; more are answered 503.
    #[serde(
        default = "default_max_connections_per_client",
        deserialize_with = "positive_usize"
    )]
    pub max_connections_per_client: usize,
    /// Most HTTP connections served at once; past that, new ones wait to be accepted.
    #[serde(
        default = "default_max_http_connections",
        deserialize_with = "positive_usize"
    )]
    pub max_http_connections: usize,
    /// Most HTTP connections at once from one address (trusted proxies excepted); more are
    /// closed at once.
    #[serde(
        default = "default_max_http_connections_per_ip",
        deserialize_with = "positive_usize"
    )]
    pub max_http_connections_per_ip: usize,
    /// Most nonces remembered for replay protection; past that, requests get 503.
    #[serde(default = "default_max_nonces", deserialize_with = "positive_usize")]
    pub max_nonces: usize,
    /// Most idle server channels (`listen`s) at once per server and port; more get 429.
    #[serde(default = "default_max_listens", deserialize_with = "positive_usize")]
    pub max_listens_per_port: usize,
    /// Most idle server channels at once per server, all its ports together; more get 429.
    #[serde(
        default = "default_max_listens_per_server",
        deserialize_with = "positive_usize"
    )]
    pub max_listens_per_server: usize,
    /// Most client connections waiting at once on one port for a server channel, all clients
    /// together (shared fairly between them); more fail with `too many pending connections`.
    #[serde(
        default = "default_max_pending_connects",
        deserialize_with = "positive_usize"
    )]
    pub max_pending_connects: usize,
    /// Address of the admin listener (`/metrics`, the status page at `/` and its JSON at `/api/status`); off when absent. Meant for
    /// loopback or a private network: it answers without authentication.
    #[serde(default)]
    pub admin_listen: Option<std::net::SocketAddr>,
    /// On SIGTERM, how long open tunnels may go on before the program exits (a second
    /// signal exits at once).
    #[serde(default = "default_drain_grace", with = "humantime_serde")]
    pub drain_grace: Duration,
    /// File the audit log is appended to (JSON lines, see docs/operations.md); when absent,
    /// its lines go to the log under the target `ptth_audit`.
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// Servers.
    #[serde(default)]
    pub servers: Vec<ServerEntry>,
    /// Clients.
    #[serde(default)]
    pub clients: Vec<ClientEntry>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4000))
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_http_idle_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_accept_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_http_connections() -> usize {
    65_536
}
fn default_max_http_connections_per_ip() -> usize {
    1024
}
fn default_max_connections_per_client() -> usize {
    20_000
}
fn default_max_nonces() -> usize {
    1_000_000
}
fn default_max_listens() -> usize {
    64
}
fn default_max_listens_per_server() -> usize {
    1024
}
fn default_max_pending_connects() -> usize {
    16 * 1024
}

/// `accept_timeout`: at most 60 s.
fn relay_wait_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let v = positive_duration(d)?;
    if v > Duration::from_secs(60) {
        return Err(serde::de::Error::custom("must be at most 60s"));
    }
    Ok(v)
}

impl RelayConfig {
    /// Reads and validates a relay configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        Self::from_str(path, &text)
    }

    /// Parses and validates configuration text; relative paths resolve against `path`'s folder.
    pub fn from_str(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut config: Self = parse(path, text)?;
        if config.tls_cert.is_some() != config.tls_key.is_some() {
            return Err(whole_file(
                path,
                "tls_cert and tls_key go together: set both or neither",
            ));
        }
        config.tls_cert = config.tls_cert.map(|p| resolve(path, &p));
        config.tls_key = config.tls_key.map(|p| resolve(path, &p));
        config.audit_log = config.audit_log.map(|p| resolve(path, &p));
        let mut names = HashSet::new();
        let mut keys = HashSet::new();
        let entries = config
            .servers
            .iter()
            .map(|s| ("server", &s.name, &s.public_key, &s.spans))
            .chain(
                config
                    .clients
                    .iter()
                    .map(|c| ("client", &c.name, &c.public_key, &c.spans)),
            );
        for (kind, name, key, spans) in entries {
            if !names.insert((kind, name)) {
                let message = format!("{kind} {name} is listed twice");
                return Err(at_line(path, text, &spans.name, message));
            }
            if !keys.insert(*key) {
                let message = "public key is used twice".to_owned();
                return Err(at_line(path, text, &spans.public_key, message));
            }
        }
        Ok(config)
    }
}

/// Where an entry's fields stand in the file, for errors found after parsing.
#[derive(Debug, Clone)]
struct EntrySpans {
    name: Range<usize>,
    public_key: Range<usize>,
}

/// A server allowed to offer ports through the relay.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "ServerFields")]
pub struct ServerEntry {
    /// Its name (in every path it uses).
    pub name: Name,
    /// Its ed25519 public key, base64.
    pub public_key: PublicKey,
    spans: EntrySpans,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerFields {
    name: Spanned<Name>,
    public_key: Spanned<PublicKey>,
}

impl From<ServerFields> for ServerEntry {
    fn from(f: ServerFields) -> Self {
        Self {
            spans: EntrySpans {
                name: f.name.span(),
                public_key: f.public_key.span(),
            },
            name: f.name.into_inner(),
            public_key: f.public_key.into_inner(),
        }
    }
}

/// A client allowed to connect to some ports.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "ClientFields")]
pub struct ClientEntry {
    /// Its name (for logs).
    pub name: Name,
    /// Its ed25519 public key, base64.
    pub public_key: PublicKey,
    /// What it may connect to.
    pub allow: Vec<Grant>,
    spans: EntrySpans,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFields {
    name: Spanned<Name>,
    public_key: Spanned<PublicKey>,
    #[serde(default)]
    allow: Vec<Grant>,
}

impl From<ClientFields> for ClientEntry {
    fn from(f: ClientFields) -> Self {
        Self {
            spans: EntrySpans {
                name: f.name.span(),
                public_key: f.public_key.span(),
            },
            name: f.name.into_inner(),
            public_key: f.public_key.into_inner(),
            allow: f.allow,
        }
    }
}

/// One entry of a client's `allow` list: `server/port` or `server/*`.
#[derive(Clone, PartialEq, Eq)]
pub struct Grant {
    /// The server.
    pub server: Name,
    /// The port, or `None` for every port of the server.
    pub port: Option<Name>,
}

impl Grant {
    /// Whether this grant covers `server`/`port`.
    pub fn allows(&self, server: &str, port: &str) -> bool {
        self.server.as_str() == server && self.port.as_ref().is_none_or(|p| p.as_str() == port)
    }
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.port {
            Some(p) => write!(f, "{}/{}", self.server, p),
            None => write!(f, "{}/*", self.server),
        }
    }
}

impl<'de> Deserialize<'de> for Grant {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let (server, port) = s.split_once('/').ok_or_else(|| {
            serde::de::Error::custom(format!(
                "allow entry {s:?} must be \"server/port\" or \"server/*\""
            ))
        })?;
        let server = Name::try_from(server.to_owned()).map_err(serde::de::Error::custom)?;
        let port = match port {
            "*" => None,
            p => Some(Name::try_from(p.to_owned()).map_err(serde::de::Error::custom)?),
        };
        Ok(Self { server, port })
    }
}

/// An IP address or network (`127.0.0.1`, `10.0.0.0/8`, `::1`, `fd00::/8`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr` or `addr/prefix`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| format!("invalid IP address {a:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("invalid prefix length in {s:?}"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }

    /// Whether `ip` is in this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Debug for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Cidr::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// Most entries in `authorities` (each is tried on a failing signature).
const MAX_AUTHORITIES: usize = 16;

/// `authorities`: each `host` or `host:port` exactly as a client's `relay_url` names the relay.
fn authority_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    if list.len() > MAX_AUTHORITIES {
        return Err(serde::de::Error::custom(format!(
            "at most {MAX_AUTHORITIES} authorities"
        )));
    }
    for a in &list {
        check_authority(a).map_err(|why| {
            serde::de::Error::custom(format!(
                "{a:?} is not an authority ({why}); write the host, and `:port` when it is not \
                 the scheme's default, as in relay_url: e.g. \"relay.example.com\" or \
                 \"relay.example.com:8443\" (an internationalised name in its xn-- form)"
            ))
        })?;
    }
    Ok(list)
}

fn check_authority(a: &str) -> Result<(), &'static str> {
    if a.contains("://") {
        return Err("no scheme");
    }
    if a.is_empty() || a.len() > 255 {
        return Err("1 to 255 characters");
    }
    if a.contains('/') || a.contains('@') {
        return Err("no path or user");
    }
    let (host, port) = match a.strip_prefix('[') {
        Some(v6) => {
            let (host, rest) = v6.split_once(']').ok_or("unclosed [")?;
            host.parse::<std::net::Ipv6Addr>()
                .map_err(|_| "bad IPv6 address")?;
            match rest {
                "" => (host, None),
                r => (host, Some(r.strip_prefix(':').ok_or("junk after ]")?)),
            }
        }
        None => match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        },
    };
    if !a.starts_with('[')
        && (host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')))
    {
        return Err("bad host name");
    }
    if let Some(p) = port
        && (p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.parse::<u16>().is_err())
    {
        return Err("bad port");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    fn key() -> String {
        PrivateKey::generate().expect("gen").public().to_base64()
    }

    #[test]
    fn relay_example_parses() {
        let text = format!(
            "listen = \"127.0.0.1:4000\"\n[[servers]]\nname = \"db\"\npublic_key = \"{}\"\n[[clients]]\nname = \"alice\"\npublic_key = \"{}\"\nallow = [\"db/postgres\", \"web/*\"]\n",
            key(),
            key()
        );
        let c = RelayConfig::from_str(Path::new("relay.toml"), &text).expect("parse");
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.http_idle_timeout, Duration::from_secs(10));
        let allow = &c.clients[0].allow;
        assert!(allow[0].allows("db", "postgres"));
        assert!(!allow[0].allows("db", "other"));
        assert!(allow[1].allows("web", "anything"));
    }

    #[test]
    fn errors_name_file_and_line() {
        let cases = [
            ("listen = \"127.0.0.1:4000\"\nbogus = 1\n", "line 2"),
            ("idle_timeout = \"soon\"\n", "line 1"),
            (
                "[[servers]]\nname = \"db\"\npublic_key = \"nope\"\n",
                "line 3",
            ),
            (
                "[[clients]]\nname = \"a\"\npublic_key = \"K\"\nallow = [\"db\"]\n",
                "line 4",
            ),
            (
                "[[servers]]\nname = \"a/b\"\npublic_key = \"K\"\n",
                "line 2",
            ),
            (
                "[[servers]]\nname = \"a\"\npublic_key = \"K\"\nport = 1\n",
                "line 4",
            ),
        ];
        for (text, want) in cases {
            let text = text.replace('K', &key());
            let err = RelayConfig::from_str(Path::new("/etc/relay.toml"), &text)
                .expect_err(text.as_str());
            let msg = err.to_string();
            assert!(msg.starts_with("/etc/relay.toml: "), "{msg}");
            assert!(msg.contains(want), "{text} -> {msg}");
        }
    }

    #[test]
    fn authorities_are_host_and_optional_port() {
        for good in [
            "relay.example.com",
            "relay.example.com:8443",
            "RELAY.example.com.",
            "xn--bcher-kva.example",
            "ptth_relay:4000",
            "127.0.0.1:4000",
            "[::1]:4000",
            "[fd00::1]",
        ] {
            let text = format!("authorities = [\"{good}\"]\n");
            let c = RelayConfig::from_str(Path::new("/etc/relay.toml"), &text).expect(good);
            assert_eq!(c.authorities, [good]);
        }
        for bad in [
            "https://relay.example.com",
            "relay.example.com/",
            "relay.example.com:http",
            "relay.example.com:99999",
            "user@relay.example.com",
            "relay example",
            "",
            "[::1",
            "[nope]:1",
        ] {
            let text = format!("\nauthorities = [\"{bad}\"]\n");
            let err = RelayConfig::from_str(Path::new("/etc/relay.toml"), &text)
                .expect_err(bad)
                .to_string();
            assert!(err.contains("line 2"), "{bad}: {err}");
            assert!(err.contains("is not an authority"), "{bad}: {err}");
        }
        let many = vec!["\"a\""; 17].join(", ");
        let text = format!("authorities = [{many}]\n");
        let err = RelayConfig::from_str(Path::new("/etc/relay.toml"), &text)
            .expect_err("17 authorities")
            .to_string();
        assert!(err.contains("at most 16"), "{err}");
    }

    #[test]
    fn duplicate_server_names_point_at_the_line() {
        let text = format!(
            "[[servers]]\nname = \"db\"\npublic_key = \"{}\"\n[[servers]]\nname = \"db\"\npublic_key = \"{}\"\n",
            key(),
            key()
        );
        let msg = RelayConfig::from_str(Path::new("r.toml"), &text)
            .expect_err("dup")
            .to_string();
        assert!(msg.contains("line 5") && msg.contains("twice"), "{msg}");
    }

    #[test]
    fn duplicate_keys_point_at_the_line_of_the_second() {
        let k = key();
        let text = format!(
            "[[servers]]\nname = \"db\"\npublic_key = \"{k}\"\n[[clients]]\nname = \"db\"\npublic_key = \"{k}\"\n"
        );
        let msg = RelayConfig::from_str(Path::new("r.toml"), &text)
            .expect_err("dup")
            .to_string();
        assert_eq!(msg, "r.toml: line 6: public key is used twice");
    }

    #[test]
    fn cidr() {
        let net = Cidr::parse("10.1.0.0/16").expect("parse");
        assert!(net.contains("10.1.200.3".parse().expect("ip")));
        assert!(!net.contains("10.2.0.1".parse().expect("ip")));
        let one = Cidr::parse("127.0.0.1").expect("parse");
        assert!(one.contains("::ffff:127.0.0.1".parse().expect("ip")));
        assert!(!one.contains("127.0.0.2".parse().expect("ip")));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .expect("all")
                .contains("8.8.8.8".parse().expect("ip"))
        );
        assert!(
            Cidr::parse("fd00::/8")
                .expect("v6")
                .contains("fd12::1".parse().expect("ip"))
        );
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope").is_err());
    }
}
