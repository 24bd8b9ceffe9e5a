//! `proxy.toml`: the relay to reach, this client's key, and the local ports it forwards.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::shared::{
    ConfigError, Name, RelayUrl, at_line, default_channel_max_age, default_drain_grace,
    default_heartbeat, default_max_connections, parse, positive_duration, positive_usize, read,
    resolve, whole_file,
};

/// `proxy.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// The relay's base URL.
    pub relay_url: RelayUrl,
    /// Private key file (PKCS#8 PEM, mode 0600). Optional: the key may come from the
    /// environment or a file descriptor instead (see [`crate::cli::EndpointArgs::load_key`]).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Extra CA certificate(s) (PEM) to trust for the relay's TLS, beside the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Heartbeat period on idle `upstream` bodies.
    #[serde(default = "default_heartbeat", deserialize_with = "positive_duration")]
    pub heartbeat_interval: Duration,
    /// An idle channel older than this is retired and replaced by a new one, which the
    /// load balancer in front of several relays may send to another relay: so a relay that
    /// comes back gets its share of channels back (docs/scale-out.md). Tunnels are never cut.
    #[serde(
        default = "default_channel_max_age",
        deserialize_with = "positive_duration"
    )]
    pub channel_max_age: Duration,
    /// Most tunnels open at once; further local connections are closed at once.
    #[serde(
        default = "default_max_connections",
        deserialize_with = "positive_usize"
    )]
    pub max_connections: usize,
    /// Address of the admin listener (`/metrics`); off when absent. Meant for loopback or a
    /// private network: it answers without authentication.
    #[serde(default)]
    pub admin_listen: Option<std::net::SocketAddr>,
    /// On SIGTERM, how long open tunnels may go on before the program exits (a second
    /// signal exits at once).
    #[serde(default = "default_drain_grace", with = "humantime_serde")]
    pub drain_grace: Duration,
    /// Ports to forward.
    pub forwards: Vec<Forward>,
}

/// One local port forwarded by `ptth_proxy`.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "ForwardFields")]
pub struct Forward {
    /// Local address to listen on.
    pub listen: SocketAddr,
    /// Server name at the relay.
    pub server: Name,
    /// Port name offered by that server.
    pub port: Name,
    /// Where `listen` stands in the file.
    listen_span: Range<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForwardFields {
    listen: Spanned<SocketAddr>,
    server: Name,
    port: Name,
}

impl From<ForwardFields> for Forward {
    fn from(f: ForwardFields) -> Self {
        Self {
            listen_span: f.listen.span(),
            listen: f.listen.into_inner(),
            server: f.server,
            port: f.port,
        }
    }
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
        if config.forwards.is_empty() {
            return Err(whole_file(
                path,
                "at least one [[forwards]] entry is needed",
            ));
        }
        let mut seen = HashSet::new();
        for f in &config.forwards {
            if f.listen.port() != 0 && !seen.insert(f.listen) {
                let message = format!("listen address {} is used twice", f.listen);
                return Err(at_line(path, text, &f.listen_span, message));
            }
        }
        config.key_file = config.key_file.map(|p| resolve(path, &p));
        config.ca_file = config.ca_file.map(|p| resolve(path, &p));
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_config_needs_forwards() {
        let text = "relay_url = \"https://relay.example\"\nkey_file = \"a.key\"\nforwards = []\n";
        assert!(ProxyConfig::from_str(Path::new("p.toml"), text).is_err());
        let text = "relay_url = \"https://relay.example\"\nkey_file = \"a.key\"\n[[forwards]]\nlisten = \"127.0.0.1:6432\"\nserver = \"db\"\nport = \"postgres\"\n";
        let c = ProxyConfig::from_str(Path::new("p.toml"), text).expect("parse");
        assert_eq!(c.relay_url.authority(), "relay.example");
        assert_eq!(c.key_file, Some(PathBuf::from("./a.key")));
        // The key may come from elsewhere (the environment, a file descriptor).
        let keyless = text.replace("key_file = \"a.key\"\n", "");
        let c = ProxyConfig::from_str(Path::new("p.toml"), &keyless).expect("no key_file");
        assert_eq!(c.key_file, None);
    }

    #[test]
    fn a_listen_address_used_twice_names_the_second_line() {
        let forward = "[[forwards]]\nlisten = \"127.0.0.1:6432\"\nserver = \"db\"\nport = \"pg\"\n";
        let text = format!(
            "relay_url = \"https://relay.example\"\nkey_file = \"a.key\"\n{forward}{forward}"
        );
        let msg = ProxyConfig::from_str(Path::new("p.toml"), &text)
            .expect_err("twice")
            .to_string();
        assert_eq!(
            msg,
            "p.toml: line 8: listen address 127.0.0.1:6432 is used twice"
        );
        // Port 0 (any free port) may appear more than once.
        let any = forward.replace(":6432", ":0");
        let text =
            format!("relay_url = \"https://relay.example\"\nkey_file = \"a.key\"\n{any}{any}");
        assert_eq!(
            ProxyConfig::from_str(Path::new("p.toml"), &text)
                .expect("port 0 twice")
                .forwards
                .len(),
            2
        );
    }
}
