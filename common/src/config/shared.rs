//! What the three configuration files share: the error type, reading and parsing with line
//! numbers, path resolution, names, durations and counts, and the relay URL of the endpoints.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

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

/// Reads a configuration file (at most [`MAX_CONFIG_FILE`] bytes).
pub(super) fn read(path: &Path) -> Result<String, ConfigError> {
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

/// Parses TOML text; errors carry the line and column, indented under the file name.
pub(super) fn parse<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError {
        path: path.to_owned(),
        message: e.to_string().trim_end().replace('\n', "\n  "),
    })
}

/// An error about the value found at `span` of `text`, naming its line.
pub(super) fn at_line(
    path: &Path,
    text: &str,
    span: &Range<usize>,
    message: String,
) -> ConfigError {
    let line = text.as_bytes()[..span.start.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1;
    ConfigError {
        path: path.to_owned(),
        message: format!("line {line}: {message}"),
    }
}

/// An error about the file as a whole.
pub(super) fn whole_file(path: &Path, message: &str) -> ConfigError {
    ConfigError {
        path: path.to_owned(),
        message: message.to_owned(),
    }
}

/// `p`, resolved against the folder of the configuration file `config` when relative.
pub(super) fn resolve(config: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_owned();
    }
    match config.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => folder.join(p),
        _ => Path::new(".").join(p),
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

/// A duration above zero and at most 24 h.
pub(super) fn positive_duration<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Duration, D::Error> {
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
pub(super) fn positive_usize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let v = usize::deserialize(d)?;
    if v == 0 {
        return Err(serde::de::Error::custom("must be above zero"));
    }
    if v > 1 << 24 {
        return Err(serde::de::Error::custom("must be at most 16777216"));
    }
    Ok(v)
}

/// Time open tunnels get to end on SIGTERM: 30 s.
pub(super) fn default_drain_grace() -> Duration {
    Duration::from_secs(30)
}

/// `channel_max_age` of `ptth_server` and `ptth_proxy`.
pub(super) fn default_channel_max_age() -> Duration {
    Duration::from_secs(60)
}

/// `heartbeat_interval` of all three programs.
pub(super) fn default_heartbeat() -> Duration {
    Duration::from_secs(15)
}

/// `max_connections` of all three programs.
pub(super) fn default_max_connections() -> usize {
    100_000
}

/// The base URL of a relay (`relay_url` of `server.toml` and `proxy.toml`): `https://`,
/// `http://`, or `h2c://` for HTTP/2 without TLS (prior knowledge), with a host and optional
/// port and nothing else.
#[derive(Clone, PartialEq, Eq)]
pub struct RelayUrl {
    /// The URL as HTTP sees it (`h2c://` becomes `http://`).
    url: url::Url,
    /// Whether HTTP/2 is spoken in cleartext from the first byte.
    h2c: bool,
}

impl RelayUrl {
    /// Parses and checks a relay URL.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (h2c, http) = match s.strip_prefix("h2c://") {
            Some(rest) => (true, format!("http://{rest}")),
            None => (false, s.to_owned()),
        };
        let url = url::Url::parse(&http).map_err(|e| format!("invalid URL {s:?}: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "relay URL {s:?} must start with http:// or https:// (or h2c:// for HTTP/2 \
                 without TLS)"
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
        Ok(Self { url, h2c })
    }

    /// Whether requests go as HTTP/2 without TLS (`h2c://`): every request then shares one
    /// TCP connection, as over TLS with ALPN `h2`.
    pub fn h2c(&self) -> bool {
        self.h2c
    }

    /// The `@authority` signed in requests: host, plus `:port` when not the scheme's default
    /// (what an HTTP client sends as `Host`).
    pub fn authority(&self) -> String {
        let host = self.url.host_str().unwrap_or_default();
        match self.url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        }
    }

    /// Where to dial the relay: its host (an IP address without brackets, or a name), its
    /// port (the scheme's default when none is given), and whether it speaks TLS.
    pub fn dial_address(&self) -> (String, u16, bool) {
        let host = match self.url.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(host) => host.to_string(),
            None => String::new(),
        };
        let https = self.url.scheme() == "https";
        let port = self
            .url
            .port_or_known_default()
            .unwrap_or(if https { 443 } else { 80 });
        (host, port, https)
    }

    /// Joins a protocol path (starting with `/`): the URL to send the request to. (The base
    /// is parsed once; a request's URL is not parsed again.)
    pub fn join(&self, path: &str) -> url::Url {
        let mut url = self.url.clone();
        url.set_path(path);
        url
    }
}

impl fmt::Display for RelayUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.url.as_str().strip_prefix("http://") {
            Some(rest) if self.h2c => write!(f, "h2c://{rest}"),
            _ => f.write_str(self.url.as_str()),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_urls_give_the_address_to_dial() {
        let dial = |s: &str| RelayUrl::parse(s).expect("parse").dial_address();
        assert_eq!(
            dial("https://relay.example.com"),
            ("relay.example.com".into(), 443, true)
        );
        assert_eq!(
            dial("http://127.0.0.1:4000"),
            ("127.0.0.1".into(), 4000, false)
        );
        assert_eq!(dial("h2c://[::1]:4000"), ("::1".into(), 4000, false));
        assert_eq!(dial("h2c://relay"), ("relay".into(), 80, false));
    }

    #[test]
    fn relay_urls() {
        let u = RelayUrl::parse("https://Relay.Example.com/").expect("parse");
        assert_eq!(u.authority(), "relay.example.com");
        assert_eq!(
            u.join("/v1/x").as_str(),
            "https://relay.example.com/v1/x",
            "a lone trailing / is fine"
        );
        assert_eq!(
            RelayUrl::parse("http://127.0.0.1:4000")
                .expect("parse")
                .authority(),
            "127.0.0.1:4000"
        );
        let h2c = RelayUrl::parse("h2c://127.0.0.1:4000").expect("h2c");
        assert!(h2c.h2c());
        assert_eq!(h2c.authority(), "127.0.0.1:4000");
        assert_eq!(h2c.join("/v1/x").as_str(), "http://127.0.0.1:4000/v1/x");
        assert_eq!(h2c.to_string(), "h2c://127.0.0.1:4000/");
        assert!(!u.h2c());
        for bad in [
            "h2c://relay.example.com/prefix",
            "ftp://relay.example.com",
            "https://relay.example.com/prefix",
            "https://relay.example.com/?q",
            "https://user:pw@relay.example.com",
            "relay.example.com",
        ] {
            assert!(RelayUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let p = Path::new("k.key");
        assert_eq!(
            resolve(Path::new("/etc/ptth/s.toml"), p),
            PathBuf::from("/etc/ptth/k.key")
        );
        assert_eq!(resolve(Path::new("s.toml"), p), PathBuf::from("./k.key"));
        assert_eq!(
            resolve(Path::new("/etc/s.toml"), Path::new("/k")),
            PathBuf::from("/k")
        );
    }
}
