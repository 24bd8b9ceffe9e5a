//! The admin listener that each program serves on its optional `admin_listen` address, apart
//! from the relay's public listener: `GET /metrics` (Prometheus text, from the program's
//! [`Registry`]) and the pages the program adds (the relay's status page and its JSON).
//!
//! It is meant for operators and their monitoring, on loopback or a private network: it
//! answers without authentication, but shows no secret and takes no command. It is bounded
//! like the rest: [`MAX_ADMIN_CONNECTIONS`] connections, a deadline on each request's head,
//! `GET` and `HEAD` only.

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

    /// The answer to `path`.
    fn answer(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
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
            let answer = admin.answer(req.method(), req.uri().path());
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
