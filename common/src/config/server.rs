//! `server.toml`: the relay to reach, this server's name and key, and the ports it offers.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::shared::{
    ConfigError, Name, RelayUrl, default_channel_max_age, default_drain_grace, default_heartbeat,
    default_max_connections, parse, positive_duration, positive_usize, read, resolve, whole_file,
};

/// `server.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The relay's base URL.
    pub relay_url: RelayUrl,
    /// This server's name, as configured at the relay.
    pub name: Name,
    /// Private key file (PKCS#8 PEM, mode 0600). Optional: the key may come from the
    /// environment or a file descriptor instead (see [`crate::cli::EndpointArgs::load_key`]).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
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
    /// An idle channel older than this is retired and replaced by a new one, which the
    /// load balancer in front of several relays may send to another relay: so a relay that
    /// comes back gets its share of channels back (docs/scale-out.md). Tunnels are never cut.
    #[serde(
        default = "default_channel_max_age",
        deserialize_with = "positive_duration"
    )]
    pub channel_max_age: Duration,
    /// Most tunnels open at once; further offers are refused.
    #[serde(
        default = "default_max_connections",
        deserialize_with = "positive_usize"
    )]
    pub max_connections: usize,
    /// Address of the admin listener (`/metrics`); off when absent. Meant for
    /// loopback or a private network: it answers without authentication.
    #[serde(default)]
    pub admin_listen: Option<std::net::SocketAddr>,
    /// On SIGTERM, how long open tunnels may go on before the program exits (a second
    /// signal exits at once).
    #[serde(default = "default_drain_grace", with = "humantime_serde")]
    pub drain_grace: Duration,
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

fn pool_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let v = usize::deserialize(d)?;
    if !(1..=16).contains(&v) {
        return Err(serde::de::Error::custom("must be between 1 and 16"));
    }
    Ok(v)
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
        if config.ports.is_empty() {
            return Err(whole_file(path, "[ports] must offer at least one port"));
        }
        config.key_file = config.key_file.map(|p| resolve(path, &p));
        config.ca_file = config.ca_file.map(|p| resolve(path, &p));
        Ok(config)
    }
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
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| serde::de::Error::custom(format!("target {s:?} must be host:port")))?;
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(serde::de::Error::custom(format!(
                "target {s:?} must be host:port with a port from 1 to 65535"
            )));
        }
        Ok(Self(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_config_resolves_key_relative_to_file() {
        let text = "relay_url = \"http://127.0.0.1:4000\"\nname = \"db\"\nkey_file = \"db.key\"\n[ports]\npostgres = \"127.0.0.1:5432\"\n";
        let c = ServerConfig::from_str(Path::new("/etc/ptth/server.toml"), text).expect("parse");
        assert_eq!(c.key_file, Some(PathBuf::from("/etc/ptth/db.key")));
        // The key may come from elsewhere (the environment, a file descriptor).
        let keyless = text.replace("key_file = \"db.key\"\n", "");
        let c = ServerConfig::from_str(Path::new("s.toml"), &keyless).expect("no key_file");
        assert_eq!(c.key_file, None);
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
    fn targets_need_a_port() {
        let text = |target: &str| {
            format!(
                "relay_url = \"http://127.0.0.1:4000\"\nname = \"db\"\nkey_file = \"db.key\"\n[ports]\npg = \"{target}\"\n"
            )
        };
        for bad in ["localhost", ":5432", "localhost:0", "localhost:65536"] {
            let msg = ServerConfig::from_str(Path::new("s.toml"), &text(bad))
                .expect_err(bad)
                .to_string();
            assert!(msg.contains("line 5") && msg.contains("host:port"), "{msg}");
        }
        let ok = ServerConfig::from_str(Path::new("s.toml"), &text("[::1]:5432")).expect("v6");
        assert_eq!(
            ok.ports.values().next().map(Target::as_str),
            Some("[::1]:5432")
        );
        let none = "relay_url = \"http://127.0.0.1:4000\"\nname = \"db\"\nkey_file = \"db.key\"\n[ports]\n";
        let msg = ServerConfig::from_str(Path::new("s.toml"), none)
            .expect_err("no ports")
            .to_string();
        assert_eq!(msg, "s.toml: [ports] must offer at least one port");
    }
}
