//! Configuration files of the three programs (TOML).
//!
//! Unknown fields and bad values are errors naming the file and the line. Relative `key_file`
//! (and `ca_file`) paths resolve against the folder of the configuration file.
//! Every field is documented in `docs/configuration.md`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::keys::PublicKey;
use crate::protocol::valid_name;

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong, with the line where known.
    pub message: String,
}

/// Largest configuration file read.
const MAX_CONFIG_FILE: u64 = 4 * 1024 * 1024;

fn read(path: &Path) -> Result<String, ConfigError> {
    let err = |message: String| ConfigError {
        path: path.to_owned(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.len() > MAX_CONFIG_FILE {
        return Err(err("file too large".into()));
    }
    std::fs::read_to_string(path).map_err(|e| err(e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError {
        path: path.to_owned(),
        message: e.to_string().trim_end().replace('\n', "\n  "),
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn at_line<T>(path: &Path, text: &str, spanned: &Spanned<T>, message: String) -> ConfigError {
    ConfigError {
        path: path.to_owned(),
        message: format!("line {}: {message}", line_of(text, spanned.span().start)),
    }
}

/// A server, client or port name (validated).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl TryFrom<String> for Name {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if valid_name(&s) {
            Ok(Self(s))
        } else {
            Err(format!(
                "invalid name {s:?}: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with a dot)"
            ))
        }
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Name::try_from(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

fn positive_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let v: Duration = humantime_serde::deserialize(d)?;
    if v.is_zero() {
        return Err(serde::de::Error::custom("duration must be above zero"));
    }
    if v > Duration::from_secs(24 * 3600) {
        return Err(serde::de::Error::custom("duration must be at most 24h"));
    }
    Ok(v)
}

/// A count limit: above zero and at most 2^24 (16777216).
fn positive_usize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let v = usize::deserialize(d)?;
    if v == 0 {
        return Err(serde::de::Error::custom("must be above zero"));
    }
    if v > 1 << 24 {
        return Err(serde::de::Error::custom("must be at most 16777216"));
    }
    Ok(v)
}

fn pool_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let v = usize::deserialize(d)?;
    if !(1..=16).contains(&v) {
        return Err(serde::de::Error::custom("must be between 1 and 16"));
    }
    Ok(v)
}

/// `listen_timeout` and `accept_timeout`: the proxies wait at most 90 s for these answers.
fn relay_wait_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let v = positive_duration(d)?;
    if v > Duration::from_secs(60) {
        return Err(serde::de::Error::custom("must be at most 60s"));
    }
    Ok(v)
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

/// A local TCP service to forward to: `host:port`.
#[derive(Clone, PartialEq, Eq)]
pub struct Target(String);

impl Target {
    /// The `host:port` text, as given to `TcpStream::connect`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        check_target(&s).map_err(serde::de::Error::custom)?;
        Ok(Self(s))
    }
}

/// An IP address or network (`127.0.0.1`, `10.0.0.0/8`, `::1`, `fd00::/8`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr` or `addr/prefix`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = a.parse().map_err(|_| format!("invalid IP address {a:?}"))?;
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
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
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

/// An HTTP(S) base URL of a relay, without path, query or credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct RelayUrl(reqwest::Url);

impl RelayUrl {
    /// Parses and checks a relay URL.
    pub fn parse(s: &str) -> Result<Self, String> {
        let url = reqwest::Url::parse(s).map_err(|e| format!("invalid URL {s:?}: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "relay URL {s:?} must start with http:// or https://"
            ));
        }
        if url.host_str().is_none() {
            return Err(format!("relay URL {s:?} has no host"));
        }
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "relay URL {s:?} must not have a path, query or fragment (the relay serves /v1/ at its root)"
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!("relay URL {s:?} must not contain credentials"));
        }
        Ok(Self(url))
    }

    /// The URL.
    pub fn url(&self) -> &reqwest::Url {
        &self.0
    }

    /// The `@authority` signed in requests: host, plus `:port` when not the scheme's default
    /// (what an HTTP client sends as `Host`).
    pub fn authority(&self) -> String {
        let host = self.0.host_str().unwrap_or_default();
        match self.0.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        }
    }

    /// Joins a protocol path (starting with `/`).
    pub fn join(&self, path: &str) -> String {
        let base = self.0.as_str().trim_end_matches('/');
        format!("{base}{path}")
    }
}

impl fmt::Display for RelayUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl fmt::Debug for RelayUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl<'de> Deserialize<'de> for RelayUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RelayUrl::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
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

fn default_relay_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4000))
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(15)
}
fn default_listen_timeout() -> Duration {
    Duration::from_secs(25)
}
fn default_accept_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_connections() -> usize {
    100_000
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
fn default_listen_pool() -> usize {
    2
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(10)
}

/// A server allowed to offer ports through the relay.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerEntry {
    /// Its name (in every path it uses).
    pub name: Spanned<Name>,
    /// Its ed25519 public key, base64.
    pub public_key: Spanned<PublicKey>,
}

/// A client allowed to connect to some ports.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientEntry {
    /// Its name (for logs).
    pub name: Spanned<Name>,
    /// Its ed25519 public key, base64.
    pub public_key: Spanned<PublicKey>,
    /// What it may connect to.
    #[serde(default)]
    pub allow: Vec<Grant>,
}

/// `relay.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Address to listen on.
    #[serde(default = "default_relay_listen")]
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
    /// A connection with no bytes (heartbeats included) for this long is closed.
    #[serde(
        default = "default_idle_timeout",
        deserialize_with = "positive_duration"
    )]
    pub idle_timeout: Duration,
    /// Heartbeat period on a `connect` or `accept` answer still waiting for its other half.
    #[serde(default = "default_heartbeat", deserialize_with = "positive_duration")]
    pub heartbeat_interval: Duration,
    /// A `listen` with nothing to hand out is answered empty after this long.
    #[serde(
        default = "default_listen_timeout",
        deserialize_with = "relay_wait_duration"
    )]
    pub listen_timeout: Duration,
    /// A `connect` not accepted by the server within this long is answered 504.
    #[serde(
        default = "default_accept_timeout",
        deserialize_with = "relay_wait_duration"
    )]
    pub accept_timeout: Duration,
    /// Most connections (pending or open) at once; more are answered 503.
    #[serde(
        default = "default_max_connections",
        deserialize_with = "positive_usize"
    )]
    pub max_connections: usize,
    /// Most connections (pending or open) of one client at once; more are answered 503.
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
    /// Most `listen` requests waiting at once per server and port; more get 429.
    #[serde(default = "default_max_listens", deserialize_with = "positive_usize")]
    pub max_listens_per_port: usize,
    /// Servers.
    #[serde(default)]
    pub servers: Vec<ServerEntry>,
    /// Clients.
    #[serde(default)]
    pub clients: Vec<ClientEntry>,
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
            return Err(ConfigError {
                path: path.to_owned(),
                message: "tls_cert and tls_key go together: set both or neither".into(),
            });
        }
        config.tls_cert = config.tls_cert.map(|p| resolve(folder(path), &p));
        config.tls_key = config.tls_key.map(|p| resolve(folder(path), &p));
        let mut names = HashSet::new();
        let mut keys = HashSet::new();
        for s in &config.servers {
            if !names.insert(("server", s.name.get_ref().clone())) {
                return Err(at_line(
                    path,
                    text,
                    &s.name,
                    format!("server {} is listed twice", s.name.get_ref()),
                ));
            }
            if !keys.insert(*s.public_key.get_ref()) {
                return Err(at_line(
                    path,
                    text,
                    &s.public_key,
                    "public key is used twice".into(),
                ));
            }
        }
        for c in &config.clients {
            if !names.insert(("client", c.name.get_ref().clone())) {
                return Err(at_line(
                    path,
                    text,
                    &c.name,
                    format!("client {} is listed twice", c.name.get_ref()),
                ));
            }
            if !keys.insert(*c.public_key.get_ref()) {
                return Err(at_line(
                    path,
                    text,
                    &c.public_key,
                    "public key is used twice".into(),
                ));
            }
        }
        Ok(config)
    }
}

/// `server.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The relay's base URL.
    pub relay_url: RelayUrl,
    /// This server's name, as configured at the relay.
    pub name: Name,
    /// Private key file (PKCS#8 PEM, mode 0600).
    pub key_file: PathBuf,
    /// Extra CA certificate(s) (PEM) to trust for the relay's TLS, beside the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Ports offered: name = "host:port" of the local TCP service.
    pub ports: BTreeMap<Name, Target>,
    /// `listen` requests kept waiting per port.
    #[serde(default = "default_listen_pool", deserialize_with = "pool_size")]
    pub listen_pool: usize,
    /// Heartbeat period on idle `downstream` bodies.
    #[serde(default = "default_heartbeat", deserialize_with = "positive_duration")]
    pub heartbeat_interval: Duration,
    /// Time allowed to connect to a local service.
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "positive_duration"
    )]
    pub connect_timeout: Duration,
    /// Longest wait between reconnection attempts to the relay.
    #[serde(
        default = "default_max_backoff",
        deserialize_with = "positive_duration"
    )]
    pub max_backoff: Duration,
    /// Most tunnels open at once; further offers are refused.
    #[serde(
        default = "default_max_connections",
        deserialize_with = "positive_usize"
    )]
    pub max_connections: usize,
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

fn folder(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

impl ServerConfig {
    /// Reads and validates a server configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        Self::from_str(path, &text)
    }

    /// Parses and validates configuration text; relative paths resolve against `path`'s folder.
    pub fn from_str(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut config: Self = parse(path, text)?;
        let err = |message: String| ConfigError {
            path: path.to_owned(),
            message,
        };
        if config.ports.is_empty() {
            return Err(err("[ports] must offer at least one port".into()));
        }
        config.key_file = resolve(folder(path), &config.key_file);
        config.ca_file = config.ca_file.map(|p| resolve(folder(path), &p));
        Ok(config)
    }
}

fn check_target(target: &str) -> Result<(), String> {
    let (host, port) = target
        .rsplit_once(':')
        .ok_or_else(|| format!("target {target:?} must be host:port"))?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!(
            "target {target:?} must be host:port with a port from 1 to 65535"
        ));
    }
    Ok(())
}

/// One local port forwarded by `ptth_proxy`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    /// Local address to listen on.
    pub listen: Spanned<SocketAddr>,
    /// Server name at the relay.
    pub server: Name,
    /// Port name offered by that server.
    pub port: Name,
}

/// `proxy.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// The relay's base URL.
    pub relay_url: RelayUrl,
    /// Private key file (PKCS#8 PEM, mode 0600).
    pub key_file: PathBuf,
    /// Extra CA certificate(s) (PEM) to trust for the relay's TLS, beside the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Heartbeat period on idle `upstream` bodies.
    #[serde(default = "default_heartbeat", deserialize_with = "positive_duration")]
    pub heartbeat_interval: Duration,
    /// Most tunnels open at once; further local connections are closed at once.
    #[serde(
        default = "default_max_connections",
        deserialize_with = "positive_usize"
    )]
    pub max_connections: usize,
    /// Ports to forward.
    pub forwards: Vec<Forward>,
}

impl ProxyConfig {
    /// Reads and validates a proxy configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        Self::from_str(path, &text)
    }

    /// Parses and validates configuration text; relative paths resolve against `path`'s folder.
    pub fn from_str(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut config: Self = parse(path, text)?;
        let err = |message: String| ConfigError {
            path: path.to_owned(),
            message,
        };
        if config.forwards.is_empty() {
            return Err(err("at least one [[forwards]] entry is needed".into()));
        }
        let mut seen = HashSet::new();
        for f in &config.forwards {
            let addr = *f.listen.get_ref();
            if addr.port() != 0 && !seen.insert(addr) {
                return Err(at_line(
                    path,
                    text,
                    &f.listen,
                    format!("listen address {addr} is used twice"),
                ));
            }
        }
        config.key_file = resolve(folder(path), &config.key_file);
        config.ca_file = config.ca_file.map(|p| resolve(folder(path), &p));
        Ok(config)
    }
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
    fn server_config_resolves_key_relative_to_file() {
        let text = "relay_url = \"http://127.0.0.1:4000\"\nname = \"db\"\nkey_file = \"db.key\"\n[ports]\npostgres = \"127.0.0.1:5432\"\n";
        let c = ServerConfig::from_str(Path::new("/etc/ptth/server.toml"), text).expect("parse");
        assert_eq!(c.key_file, PathBuf::from("/etc/ptth/db.key"));
        assert_eq!(c.relay_url.authority(), "127.0.0.1:4000");
        let bad = text.replace("127.0.0.1:5432", "nowhere");
        assert!(ServerConfig::from_str(Path::new("s.toml"), &bad).is_err());
        let bad = text.replace("http://127.0.0.1:4000", "http://127.0.0.1:4000/prefix");
        let msg = ServerConfig::from_str(Path::new("s.toml"), &bad)
            .expect_err("path")
            .to_string();
        assert!(msg.contains("line 1"), "{msg}");
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

    #[test]
    fn proxy_config_needs_forwards() {
        let text = "relay_url = \"https://relay.example\"\nkey_file = \"a.key\"\nforwards = []\n";
        assert!(ProxyConfig::from_str(Path::new("p.toml"), text).is_err());
        let text = "relay_url = \"https://relay.example\"\nkey_file = \"a.key\"\n[[forwards]]\nlisten = \"127.0.0.1:6432\"\nserver = \"db\"\nport = \"postgres\"\n";
        let c = ProxyConfig::from_str(Path::new("p.toml"), text).expect("parse");
        assert_eq!(c.relay_url.authority(), "relay.example");
        assert_eq!(c.key_file, PathBuf::from("./a.key"));
    }
}
