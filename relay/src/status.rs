//! The relay's pages on its admin listener: the status page at `/` (`status.html`, which
//! fetches `/api/status` every second and redraws itself) and the same facts as JSON at
//! `/api/status`: servers online and their ports, clients connected, open tunnels with their
//! age and bytes, and the requests refused lately.
//!
//! Only names, addresses and counts appear: no key, signature or channel ID (a channel ID
//! lets its endpoint's requests through the relay, with their signatures).

use std::sync::Arc;

use bytes::Bytes;
use ptth_common::admin::{Page, Pages};
use serde::Serialize;
use tokio::time::Instant;

use crate::state::{PortView, Rejection, Shared};

/// Most tunnels listed on the status page (all are counted).
pub(crate) const MAX_TUNNELS_SHOWN: usize = 500;

/// The page itself: static, it draws what `/api/status` says.
const STATUS_HTML: &str = include_str!("status.html");

/// The relay's admin pages.
#[derive(Debug)]
pub(crate) struct StatusPages {
    shared: Arc<Shared>,
    started: Instant,
}

impl StatusPages {
    /// The pages of the relay whose state is `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            started: Instant::now(),
        }
    }
}

impl Pages for StatusPages {
    fn page(&self, path: &str) -> Option<Page> {
        match path {
            "/" => Some(Page {
                content_type: "text/html; charset=utf-8",
                body: Bytes::from_static(STATUS_HTML.as_bytes()),
            }),
            "/api/status" => {
                let status = status(&self.shared, self.started);
                let body = serde_json::to_vec(&status).unwrap_or_default();
                Some(Page {
                    content_type: "application/json",
                    body: Bytes::from(body),
                })
            }
            _ => None,
        }
    }
}

/// `/api/status`.
#[derive(Debug, Serialize)]
struct Status {
    version: &'static str,
    uptime_secs: u64,
    draining: bool,
    servers: Vec<ServerView>,
    clients: Vec<ClientView>,
    tunnels_open: usize,
    tunnels: Vec<TunnelView>,
    rejections: Vec<Rejection>,
}

#[derive(Debug, Serialize)]
struct ServerView {
    name: String,
    online: bool,
    ports: Vec<PortView>,
}

#[derive(Debug, Serialize)]
struct ClientView {
    name: String,
    /// Channels open (idle or carrying a connection): connected while there is one.
    channels: usize,
}

#[derive(Debug, Serialize)]
struct TunnelView {
    server: String,
    port: String,
    client: String,
    client_ip: Option<std::net::IpAddr>,
    age_secs: f64,
    bytes_upstream: u64,
    bytes_downstream: u64,
}

fn status(shared: &Shared, started: Instant) -> Status {
    let dir = shared.directory();
    let servers = (0..dir.server_names.len())
        .filter_map(|i| {
            Some((
                dir.server(dir.server_names[i].as_str())?,
                &dir.server_names[i],
            ))
        })
        .map(|(i, name)| {
            let (online, ports) = shared.server_view(i);
            ServerView {
                name: name.to_string(),
                online,
                ports,
            }
        })
        .collect();
    let clients = dir
        .client_names
        .iter()
        .enumerate()
        .filter(|(i, _)| dir.is_client(*i))
        .map(|(i, name)| ClientView {
            name: name.to_string(),
            channels: shared.channels.client_channels(i),
        })
        .collect();
    let mut tunnels: Vec<TunnelView> = shared
        .channels
        .open_tunnels(MAX_TUNNELS_SHOWN)
        .iter()
        .filter_map(|t| {
            let labels = t.labels()?;
            let [up, down] = t.bytes();
            Some(TunnelView {
                server: labels.server.clone(),
                port: labels.port.clone(),
                client: labels.client.clone(),
                client_ip: t.client.peer,
                age_secs: t.opened.elapsed().as_secs_f64(),
                bytes_upstream: up,
                bytes_downstream: down,
            })
        })
        .collect();
    tunnels.sort_by(|a, b| a.age_secs.total_cmp(&b.age_secs));
    Status {
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: started.elapsed().as_secs(),
        draining: shared.is_draining(),
        servers,
        clients,
        tunnels_open: *shared.channels.tunnels.count.borrow(),
        tunnels,
        rejections: shared.recent_rejections(),
    }
}
