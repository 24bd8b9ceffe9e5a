//! What `ptth_server` and `ptth_proxy` count (feature `endpoint`), for `/metrics` on their
//! admin listener (names in docs/operations.md). A channel resolves its labelled counters
//! once, when it opens: counting a chunk is one relaxed atomic add.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A server's port: the labels of most endpoint metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabels {
    /// The server's name.
    pub server: String,
    /// The port's name.
    pub port: String,
}

/// A port and the direction of its bytes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByteLabels {
    server: String,
    port: String,
    /// `upstream` (towards the service) or `downstream` (towards the user).
    direction: &'static str,
}

/// A port and why a connection to it could not be made.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// The server's name.
    pub server: String,
    /// The port's name.
    pub port: String,
    /// The HTTP status the relay answered, or the protocol's status of an in-band failure
    /// (502 the server could not reach its service, 503, 504 not taken in time), or 0 when
    /// the relay could not be reached.
    pub status: u16,
}

/// The status of a relay's refusal.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: u16,
}

/// An endpoint's metrics, and its count of open tunnels (which its drain waits on).
#[derive(Debug)]
pub struct EndpointMetrics {
    /// Tunnels open now, all ports together.
    open: std::sync::Arc<tokio::sync::watch::Sender<usize>>,
    /// Tunnels open now, by port.
    pub tunnels_open: Family<PortLabels, Gauge>,
    /// Tunnels opened so far, by port.
    pub tunnels: Family<PortLabels, Counter>,
    bytes: Family<ByteLabels, Counter>,
    /// Connections that could not be made, by port and status.
    pub connect_failures: Family<FailureLabels, Counter>,
    /// Requests the relay refused (401 for signatures), by status.
    relay_refusals: Family<StatusLabels, Counter>,
    /// Idle channels open now, by port: a server's outstanding listens, a proxy's channels
    /// ready for the next local connection.
    pub idle_channels: Family<PortLabels, Gauge>,
    /// Channels ended because nothing, heartbeats included, came from the relay for the
    /// dead-peer limit.
    pub silent_channels: Counter,
    /// Retries after the relay could not be reached or refused a channel.
    pub reconnects: Counter,
}

impl Default for EndpointMetrics {
    fn default() -> Self {
        Self {
            open: std::sync::Arc::new(tokio::sync::watch::Sender::new(0)),
            tunnels_open: Family::default(),
            tunnels: Family::default(),
            bytes: Family::default(),
            connect_failures: Family::default(),
            relay_refusals: Family::default(),
            idle_channels: Family::default(),
            silent_channels: Counter::default(),
            reconnects: Counter::default(),
        }
    }
}

/// The counters a channel updates while it lives.
#[derive(Debug, Clone, Default)]
pub struct ChannelMeters {
    /// Bytes read from the local socket and uploaded.
    pub uploaded: Counter,
    /// Bytes downloaded and written to the local socket.
    pub downloaded: Counter,
}

impl EndpointMetrics {
    /// Registers every metric, and `connections` (HTTP connections dialed to the relay), in
    /// `registry`, which carries the program's prefix (`ptth_server` or `ptth_proxy`).
    pub fn register(&self, registry: &mut Registry, connections: Counter) {
        registry.register(
            "tunnels_open",
            "Tunnels open now",
            self.tunnels_open.clone(),
        );
        registry.register("tunnels", "Tunnels opened", self.tunnels.clone());
        registry.register(
            "tunnel_bytes",
            "Bytes carried through tunnels",
            self.bytes.clone(),
        );
        registry.register(
            "connect_failures",
            "Connections that could not be made",
            self.connect_failures.clone(),
        );
        registry.register(
            "relay_refusals",
            "Requests the relay refused, by status",
            self.relay_refusals.clone(),
        );
        registry.register(
            "idle_channels",
            "Idle channels open to the relay",
            self.idle_channels.clone(),
        );
        registry.register(
            "silent_channels",
            "Channels ended after the relay fell silent (no heartbeat)",
            self.silent_channels.clone(),
        );
        registry.register(
            "reconnects",
            "Retries after the relay could not be reached or refused a channel",
            self.reconnects.clone(),
        );
        registry.register(
            "relay_connections",
            "HTTP connections dialed to the relay",
            connections,
        );
    }

    /// The meters of a channel of `port`. `uploaded` is `upstream` at a proxy and
    /// `downstream` at a server.
    pub fn channel(&self, port: &PortLabels, uploaded_is_upstream: bool) -> ChannelMeters {
        let meter = |direction| {
            self.bytes.get_or_create_owned(&ByteLabels {
                server: port.server.clone(),
                port: port.port.clone(),
                direction,
            })
        };
        let (up, down) = (meter("upstream"), meter("downstream"));
        if uploaded_is_upstream {
            ChannelMeters {
                uploaded: up,
                downloaded: down,
            }
        } else {
            ChannelMeters {
                uploaded: down,
                downloaded: up,
            }
        }
    }

    /// Counts what a channel's or connection's failure says: a refusal by the relay, a
    /// connection that could not be made, a silent relay.
    pub fn failed(&self, port: &PortLabels, error: &crate::channel::ChannelError) {
        use crate::channel::ChannelError;
        use crate::client::CallError;
        let failure = |status| {
            self.connect_failures
                .get_or_create(&FailureLabels {
                    server: port.server.clone(),
                    port: port.port.clone(),
                    status,
                })
                .inc();
        };
        match error {
            ChannelError::Refused(CallError::Refused { status, .. }) => {
                self.relay_refusals
                    .get_or_create(&StatusLabels {
                        status: status.as_u16(),
                    })
                    .inc();
                failure(status.as_u16());
            }
            ChannelError::Refused(_) => failure(0),
            ChannelError::Failed(reason) => failure(crate::protocol::failure_status(reason)),
            ChannelError::Silent(_) => {
                self.silent_channels.inc();
            }
            _ => {}
        }
    }

    /// A tunnel of `port` opens: counted until the returned guard is dropped.
    pub fn tunnel(&self, port: &PortLabels) -> TunnelGuard {
        self.tunnels.get_or_create(port).inc();
        let gauge = self.tunnels_open.get_or_create_owned(port);
        gauge.inc();
        self.open.send_modify(|n| *n += 1);
        TunnelGuard {
            gauge,
            open: self.open.clone(),
        }
    }

    /// Watches the number of tunnels open, all ports together.
    pub fn tunnels_now(&self) -> tokio::sync::watch::Receiver<usize> {
        self.open.subscribe()
    }

    /// Tunnels of `port` open now.
    pub fn tunnels_of(&self, port: &PortLabels) -> i64 {
        self.tunnels_open.get(port).map_or(0, |g| g.get())
    }
}

/// An open tunnel, counted (in `tunnels_open` and the endpoint's count) until dropped.
#[derive(Debug)]
pub struct TunnelGuard {
    gauge: Gauge,
    open: std::sync::Arc<tokio::sync::watch::Sender<usize>>,
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.gauge.dec();
        self.open.send_modify(|n| *n = n.saturating_sub(1));
    }
}
