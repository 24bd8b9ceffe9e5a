//! The admin listener that each program serves on its optional `admin_listen` address, apart
//! from the relay's public listener: `GET /metrics` (Prometheus text, from the program's
//! [`Registry`]) and the pages the program adds (the relay's status page and its JSON).
//!
//! It is meant for operators and their monitoring, on loopback or a private network: it
//! answers without authentication, but shows no secret and takes no command. It is bounded
//! like the rest: [`MAX_ADMIN_CONNECTIONS`] connections, a deadline on each request's head,
//! `GET` and `HEAD` only. It answers only requests addressed to an IP address or `localhost`
//! (by their `Host`), so that a web page cannot read it through a name rebound to the
//! operator's loopback (DNS rebinding).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

/// Admin connections served at once; more wait in the kernel's accept queue.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// Time a client of the admin listener has to send a request's head, and that an idle
/// keep-alive connection is kept.
const ADMIN_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// An answer of the admin listener: a content type and a body.
#[derive(Debug, Clone)]
pub struct Page {
    /// The `Content-Type` of `body`.
    pub content_type: &'static str,
    /// The whole body.
    pub body: Bytes,
}

/// The pages a program serves on its admin listener besides `/metrics`.
pub trait Pages: Send + Sync + 'static {
    /// The page at `path` (without query), or `None` for a 404.
    fn page(&self, path: &str) -> Option<Page>;
}

/// What an admin listener serves: the program's metrics and its own pages.
pub struct Admin {
    registry: Registry,
    pages: Option<Arc<dyn Pages>>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("pages", &self.pages.is_some())
            .finish_non_exhaustive()
    }
}

/// The labels of the `build_info` metric.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

impl Admin {
    /// Serves `registry` (to which a `build_info` metric with this crate's version is added)
    /// and `pages`.
    pub fn new(mut registry: Registry, pages: Option<Arc<dyn Pages>>) -> Self {
        registry.register(
            "build",
            "The program's version",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        Self { registry, pages }
    }

    /// The metrics in the Prometheus text format (version 0.0.4).
    pub fn metrics_text(&self) -> String {
        let mut text = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
        {
            warn!(error = %e, "cannot encode the metrics");
        }
        text
    }

    /// The answer to `req`.
    fn answer<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        let (method, path) = (req.method(), req.uri().path());
        if !addressed_by_ip_or_localhost(req) {
            return plain(
                StatusCode::MISDIRECTED_REQUEST,
                "the admin listener answers requests to an IP address or localhost only\n",
            );
        }
        if method != Method::GET && method != Method::HEAD {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
        }
        let page = if path == "/metrics" {
            Some(Page {
                content_type: prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                body: Bytes::from(self.metrics_text()),
            })
        } else {
            self.pages.as_ref().and_then(|p| p.page(path))
        };
        match page {
            Some(page) => {
                let mut r = Response::new(Full::new(page.body));
                let h = r.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(page.content_type),
                );
                h.insert(
                    header::CACHE_CONTROL,
                    header::HeaderValue::from_static("no-store"),
                );
                h.insert(
                    "x-content-type-options",
                    header::HeaderValue::from_static("nosniff"),
                );
                r
            }
            None => plain(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

/// Whether `req`'s `Host` (or, without one, its URI's authority) names an IP address or
/// `localhost`: a name that a web page's origin could have rebound to this listener does not.
/// A request with no host at all (HTTP/1.0) comes from no browser and is answered.
fn addressed_by_ip_or_localhost<B>(req: &Request<B>) -> bool {
    let host = match req.headers().get(header::HOST) {
        Some(h) => match h.to_str() {
            Ok(h) => h,
            Err(_) => return false,
        },
        None => match req.uri().host() {
            Some(h) => h,
            None => return true,
        },
    };
    let Ok(authority) = host.parse::<http::uri::Authority>() else {
        return false;
    };
    let name = authority.host();
    let name = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
}

/// A plain-text answer.
fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Serves `admin` on `listener` (HTTP/1.1) until `shutdown` is cancelled. Logs a warning when
/// the listener is not on a loopback address: what it shows is meant for operators only.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: CancellationToken) {
    match listener.local_addr() {
        Ok(a) if a.ip().is_loopback() => info!(address = %a, "admin listener ready"),
        Ok(a) => warn!(
            address = %a,
            "admin listener ready on a non-loopback address: anyone who can reach it sees the \
             metrics and status; keep it on loopback or a private network"
        ),
        Err(e) => warn!(error = %e, "admin listener address unknown"),
    }
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let tasks = TaskTracker::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HEAD_TIMEOUT)
        .max_buf_size(16 * 1024);
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let answer = admin.answer(&req);
            async move { Ok::<_, Infallible>(answer) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let shutdown = shutdown.clone();
        tasks.spawn(
            async move {
                let _permit = permit;
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            debug!(error = %e, "admin connection ended with an error");
                        }
                    }
                    () = shutdown.cancelled() => {}
                }
            }
            .instrument(info_span!("admin", %peer)),
        );
    }
    tasks.close();
    tasks.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(host: Option<&str>, path: &str) -> StatusCode {
        let mut req = Request::get(path);
        if let Some(host) = host {
            req = req.header(header::HOST, host);
        }
        let admin = Admin::new(Registry::default(), None);
        admin.answer(&req.body(()).expect("request")).status()
    }

    #[test]
    fn only_requests_to_an_ip_address_or_localhost_are_answered() {
        for host in [
            "127.0.0.1:9100",
            "10.1.2.3",
            "[::1]:9100",
            "localhost:9100",
            "LOCALHOST",
            "admin.localhost:1",
        ] {
            assert_eq!(status(Some(host), "/metrics"), StatusCode::OK, "{host}");
        }
        assert_eq!(status(None, "/metrics"), StatusCode::OK, "no Host");
        assert_eq!(status(None, "http://[::1]:9/metrics"), StatusCode::OK);
        for host in [
            "evil.example:9100",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "bad host",
        ] {
            assert_eq!(
                status(Some(host), "/metrics"),
                StatusCode::MISDIRECTED_REQUEST,
                "{host}"
            );
        }
        assert_eq!(
            status(Some("evil.example"), "http://127.0.0.1/metrics"),
            StatusCode::MISDIRECTED_REQUEST,
            "the Host header decides"
        );
    }
}
