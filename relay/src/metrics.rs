//! What the relay counts, for `/metrics` on its admin listener (names in docs/operations.md).
//!
//! Counting costs the hot path one relaxed atomic add per chunk passed on: a tunnel resolves its
//! labelled counters once, when it is joined.

use std::collections::HashSet;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Distinct `(server, port, client)` label sets the tunnel metrics keep. Servers name their
/// ports at will (a client granted `server/*` may reach any), so past this many, a new set is
/// counted with the port [`OTHER_PORTS`]: the series stay bounded whatever the names.
const MAX_TUNNEL_SERIES: usize = 4096;
/// The port label of the tunnels counted past [`MAX_TUNNEL_SERIES`].
const OTHER_PORTS: &str = "(other)";

/// Who a tunnel joins: the labels of the tunnel metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TunnelLabels {
    /// The server's name.
    pub server: String,
    /// The port's name.
    pub port: String,
    /// The client's name.
    pub client: String,
}

/// A tunnel's labels and the direction of its bytes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ByteLabels {
    server: String,
    port: String,
    client: String,
    /// `upstream` (the client's bytes, towards the service) or `downstream`.
    direction: &'static str,
}

/// Why something was refused or failed: the labels of the failure counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct FailureLabels {
    /// The HTTP status, or the status the protocol gives an in-band failure (502, 503, 504).
    pub status: u16,
    /// The one-line reason the relay answers with.
    pub reason: &'static str,
}

/// The exact cause of a refused signature: the label of `auth_failures`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CauseLabels {
    /// `malformed`, `unknown_key`, `bad_signature`, `other_authority`, `stale`, `replay`,
    /// `busy`.
    pub cause: &'static str,
}

/// The outcome of a configuration reload: the label of the reload counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabels {
    /// `applied` or `rejected`.
    pub outcome: &'static str,
}

/// The relay's metrics.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    /// Tunnels open now, by server, port and client.
    pub tunnels_open: Family<TunnelLabels, Gauge>,
    /// Tunnels opened so far.
    pub tunnels: Family<TunnelLabels, Counter>,
    /// Bytes passed on, by tunnel labels and direction.
    pub tunnel_bytes: Family<ByteLabels, Counter>,
    /// Client connections that could not be made: `connect` refused, or failed in-band.
    pub connect_failures: Family<FailureLabels, Counter>,
    /// Requests refused (signatures, permissions, limits), by status and reason.
    pub rejections: Family<FailureLabels, Counter>,
    /// Refused signatures by their exact cause (the answer gives one reason for several).
    pub auth_failures: Family<CauseLabels, Counter>,
    /// Server channels ready for a connection: the servers' outstanding listens.
    pub listens_ready: Gauge,
    /// Channels held (clients' and servers', idle or carrying a connection).
    pub channels: Gauge,
    /// HTTP connections open on the public listener.
    pub http_connections: Gauge,
    /// Channels closed because nothing, heartbeats included, crossed them for `idle_timeout`.
    pub idle_channels_closed: Counter,
    /// Configuration reloads, by outcome.
    pub reloads: Family<OutcomeLabels, Counter>,
    /// The tunnel label sets counted so far, at most [`MAX_TUNNEL_SERIES`].
    tunnel_series: Mutex<HashSet<TunnelLabels>>,
}

/// The counters a tunnel updates while it lives.
#[derive(Debug)]
pub(crate) struct TunnelMeters {
    /// `tunnels_open` of its labels.
    pub open: Gauge,
    /// `tunnel_bytes` of its labels: upstream, downstream.
    pub bytes: [Counter; 2],
}

impl Metrics {
    /// Registers every metric in `registry`, which carries the prefix `ptth_relay`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tunnels_open",
            "Tunnels open now",
            self.tunnels_open.clone(),
        );
        registry.register("tunnels", "Tunnels opened", self.tunnels.clone());
        registry.register(
            "tunnel_bytes",
            "Bytes passed on through tunnels",
            self.tunnel_bytes.clone(),
        );
        registry.register(
            "connect_failures",
            "Client connections that could not be made",
            self.connect_failures.clone(),
        );
        registry.register("rejections", "Requests refused", self.rejections.clone());
        registry.register(
            "auth_failures",
            "Refused signatures by exact cause",
            self.auth_failures.clone(),
        );
        registry.register(
            "listens_ready",
            "Server channels ready for a connection",
            self.listens_ready.clone(),
        );
        registry.register(
            "channels",
            "Channels held, idle or carrying a connection",
            self.channels.clone(),
        );
        registry.register(
            "http_connections",
            "HTTP connections open on the public listener",
            self.http_connections.clone(),
        );
        registry.register(
            "idle_channels_closed",
            "Channels closed after idle_timeout without a byte or heartbeat",
            self.idle_channels_closed.clone(),
        );
        registry.register(
            "reloads",
            "Configuration reloads by outcome",
            self.reloads.clone(),
        );
    }

    /// A new tunnel of `labels`: counted (under [`OTHER_PORTS`] once [`MAX_TUNNEL_SERIES`]
    /// label sets are taken), and its meters.
    pub fn tunnel_opened(&self, labels: &TunnelLabels) -> TunnelMeters {
        let labels = &self.series_of(labels);
        self.tunnels.get_or_create(labels).inc();
        let open = self.tunnels_open.get_or_create_owned(labels);
        open.inc();
        let bytes = ["upstream", "downstream"].map(|direction| {
            self.tunnel_bytes.get_or_create_owned(&ByteLabels {
                server: labels.server.clone(),
                port: labels.port.clone(),
                client: labels.client.clone(),
                direction,
            })
        });
        TunnelMeters { open, bytes }
    }

    /// The label set `labels` are counted under.
    fn series_of(&self, labels: &TunnelLabels) -> TunnelLabels {
        let mut series = self.tunnel_series.lock();
        if series.len() < MAX_TUNNEL_SERIES {
            series.insert(labels.clone());
        }
        if series.contains(labels) {
            labels.clone()
        } else {
            TunnelLabels {
                port: OTHER_PORTS.to_owned(),
                ..labels.clone()
            }
        }
    }

    /// Counts a client connection that could not be made.
    pub fn connect_failed(&self, status: u16, reason: &'static str) {
        self.connect_failures
            .get_or_create(&FailureLabels { status, reason })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_series_are_bounded_whatever_the_port_names() {
        let metrics = Metrics::default();
        let labels = |port: usize| TunnelLabels {
            server: "db".into(),
            port: format!("p{port}"),
            client: "alice".into(),
        };
        for port in 0..MAX_TUNNEL_SERIES + 10 {
            drop(metrics.tunnel_opened(&labels(port)));
        }
        drop(metrics.tunnel_opened(&labels(0)));
        let count = |l: &TunnelLabels| metrics.tunnels.get(l).map(|c| c.get());
        assert_eq!(count(&labels(0)), Some(2), "a known set keeps its series");
        assert_eq!(count(&labels(MAX_TUNNEL_SERIES - 1)), Some(1));
        assert_eq!(count(&labels(MAX_TUNNEL_SERIES)), None, "past the bound");
        let other = TunnelLabels {
            port: OTHER_PORTS.into(),
            ..labels(0)
        };
        assert_eq!(count(&other), Some(10));
    }
}
