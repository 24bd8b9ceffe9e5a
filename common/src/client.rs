//! The HTTP client side shared by `ptth_server` and `ptth_proxy`: one `reqwest` client (rustls
//! with the `ring` provider, system roots plus an optional private CA) and request signing.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::auth::{SIGNATURE, SIGNATURE_INPUT, Signer};
use crate::config::RelayUrl;
use crate::keys::PrivateKey;
use crate::protocol::TUNNEL_CONTENT_TYPE;
use crate::tunnel::{self, TcpUploadBody, TunnelError};

/// Why the HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The CA file could not be read or holds no certificate.
    #[error("ca_file {path}: {message}")]
    CaFile {
        /// the file
        path: String,
        /// what went wrong
        message: String,
    },
    /// TLS or client setup failed.
    #[error("HTTP client setup: {0}")]
    Setup(String),
}

fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!(error = %e, "while loading system root certificates");
    }
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(added, "system root certificates");
    if let Some(path) = ca_file {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let err = |message: String| ClientError::CaFile {
            path: path.display().to_string(),
            message,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| err(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no PEM certificate found".into()));
        }
        for c in certs {
            roots.add(c).map_err(|e| err(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Builds the HTTP client used for every call to the relay. No total timeout is set: tunnel
/// requests live as long as their TCP connection.
pub fn http_client(ca_file: Option<&Path>) -> Result<reqwest::Client, ClientError> {
    http_client_builder(ca_file)?
        .build()
        .map_err(|e| ClientError::Setup(e.to_string()))
}

/// The builder behind [`http_client`], for callers that need one more setting.
pub fn http_client_builder(ca_file: Option<&Path>) -> Result<reqwest::ClientBuilder, ClientError> {
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls_config(ca_file)?)
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(50))
        .http2_initial_stream_window_size(Some(1024 * 1024))
        .http2_initial_connection_window_size(Some(16 * 1024 * 1024))
        .http2_keep_alive_interval(Some(Duration::from_secs(20)))
        .http2_keep_alive_timeout(Duration::from_secs(20))
        .http2_keep_alive_while_idle(true)
        .no_proxy())
}

/// A relay endpoint plus the key that signs every call to it.
#[derive(Debug, Clone)]
pub struct RelayClient {
    http: reqwest::Client,
    url: RelayUrl,
    authority: String,
    signer: Signer,
    warm: Arc<tokio::sync::Mutex<Option<WarmUp>>>,
    /// Number of warm-up attempts made so far.
    warm_attempts: Arc<std::sync::atomic::AtomicU64>,
}

/// The last warm-up.
#[derive(Debug)]
struct WarmUp {
    /// Its number, counting attempts from 1.
    attempt: u64,
    /// When it ended.
    at: std::time::Instant,
    outcome: Result<(), String>,
}

impl RelayClient {
    /// A client for `url` signing with `key`.
    pub fn new(http: reqwest::Client, url: RelayUrl, key: PrivateKey) -> Self {
        let authority = url.authority();
        Self {
            http,
            url,
            authority,
            signer: Signer::new(key),
            warm: Arc::default(),
            warm_attempts: Arc::default(),
        }
    }

    /// Opens (or confirms) the pooled connection to the relay with one cheap unsigned request
    /// (the relay answers 404), so that requests sent at once afterwards share one HTTP/2
    /// connection instead of racing to open one each. Calls are serialised: callers that
    /// waited while an attempt was made share its outcome, success or failure, rather than
    /// queueing one attempt each; a success less than a second old is reused by anyone. Any
    /// HTTP answer counts as success.
    pub async fn warm_up(&self) -> Result<(), String> {
        use std::sync::atomic::Ordering;
        let attempts_before = self.warm_attempts.load(Ordering::Acquire);
        let mut last = self.warm.lock().await;
        if let Some(w) = &*last {
            let made_while_waiting = w.attempt > attempts_before;
            let fresh_success = w.outcome.is_ok() && w.at.elapsed() < Duration::from_secs(1);
            if made_while_waiting || fresh_success {
                return w.outcome.clone();
            }
        }
        let r = self
            .http
            .get(self.url.join("/v1/"))
            .timeout(Duration::from_secs(30))
            .send()
            .await;
        let outcome = match r {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("cannot reach the relay: {}", error_chain(&e))),
        };
        let attempt = self.warm_attempts.fetch_add(1, Ordering::AcqRel) + 1;
        *last = Some(WarmUp {
            attempt,
            at: std::time::Instant::now(),
            outcome: outcome.clone(),
        });
        outcome
    }

    /// A signed POST to a protocol path.
    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let h = self.signer.sign("POST", &self.authority, path);
        self.http
            .post(self.url.join(path))
            .header(SIGNATURE_INPUT, h.input)
            .header(SIGNATURE, h.signature)
    }

    /// The relay URL.
    pub fn url(&self) -> &RelayUrl {
        &self.url
    }
}

/// Reads the plain-text reason a relay put in an error answer (bounded).
pub async fn error_text(resp: reqwest::Response) -> String {
    const MAX: usize = 512;
    let mut resp = resp;
    let mut out = Vec::new();
    while out.len() < MAX {
        match tokio::time::timeout(Duration::from_secs(2), resp.chunk()).await {
            Ok(Ok(Some(c))) => out.extend_from_slice(&c[..c.len().min(MAX - out.len())]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).trim().to_owned()
}

/// Whether an answer was written by the relay itself rather than by a reverse proxy in front.
pub fn from_relay(r: &reqwest::Response) -> bool {
    r.headers()
        .contains_key(crate::protocol::RELAY_ANSWER_HEADER)
}

/// Explains an error status that a reverse proxy in front of the relay made up.
pub fn front_problem(status: reqwest::StatusCode) -> String {
    let hint = match status.as_u16() {
        413 => "it caps request bodies: nginx `client_max_body_size 0;`",
        502 | 503 => {
            "it cannot reach the relay: is ptth_relay running at the address it proxies to?"
        }
        504 => {
            "it timed out waiting for the relay: its timeouts must exceed the relay's \
             listen_timeout and heartbeat_interval (nginx proxy_read_timeout, HAProxy timeout server)"
        }
        404 | 405 => "it does not pass /v1/ through to the relay unchanged",
        _ => "check its configuration (docs/deploy.md)",
    };
    format!("a reverse proxy in front of the relay answered {status}: {hint}")
}

/// The error and its sources on one line (reqwest hides the useful part in the sources).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    if s.contains("certificate") || s.contains("UnknownIssuer") {
        s.push_str(
            " (TLS: the relay's certificate is not trusted or does not match its name; \
             set ca_file to the PEM of the CA that signed it, and use the name it was issued for)",
        );
    }
    s
}

/// Carries an open tunnel until both directions end: the local socket's bytes go up as the
/// streaming body of a POST to `upload_path` (`upstream` or `downstream`), and the frames of
/// `download` (the `connect` or `accept` answer) go into the socket. Dead-peer limit: three
/// heartbeat intervals (at least [`tunnel::MIN_DEAD_AFTER`]) without anything from the relay:
/// the heartbeats we receive come from the far endpoint, whose interval may be longer.
/// Logs how the tunnel ended.
///
/// The proxies make `stream` reset on close (see [`tunnel::reset`]) while they open the tunnel;
/// from here on a clean end closes it with a FIN again, and an abort resets it.
pub async fn carry(
    relay: &RelayClient,
    upload_path: &str,
    download: reqwest::Response,
    stream: TcpStream,
    heartbeat: Duration,
    shutdown: &CancellationToken,
) {
    match carry_inner(relay, upload_path, download, stream, heartbeat, shutdown).await {
        Ok(()) => tracing::debug!("tunnel closed"),
        Err(TunnelError::Cancelled) => tracing::debug!("tunnel closed by shutdown"),
        // Something between us and the relay is in the way: the user must act.
        Err(e @ (TunnelError::NotAttached(_) | TunnelError::BrokeBeforeAttached(_))) => {
            tracing::warn!(error = %e, "tunnel aborted")
        }
        Err(e) => tracing::info!(error = %e, "tunnel aborted"),
    }
}

async fn carry_inner(
    relay: &RelayClient,
    upload_path: &str,
    download: reqwest::Response,
    stream: TcpStream,
    heartbeat: Duration,
    shutdown: &CancellationToken,
) -> Result<(), TunnelError> {
    if let Err(e) = tunnel::set_reset_on_close(&stream, false) {
        tracing::debug!(error = %e, "cannot restore SO_LINGER");
    }
    let stream = Arc::new(stream);
    let cancel = CancellationToken::new();
    let local_failed = Arc::new(tunnel::LocalFailed::default());
    let body = TcpUploadBody::new(
        stream.clone(),
        local_failed.clone(),
        heartbeat,
        cancel.clone(),
    );
    let upload = async {
        let r = relay
            .post(upload_path)
            .header(reqwest::header::CONTENT_TYPE, TUNNEL_CONTENT_TYPE)
            .body(reqwest::Body::wrap(body))
            .send()
            .await
            .map_err(|e| TunnelError::Remote(error_chain(&e)))?;
        match r.status() {
            reqwest::StatusCode::OK => Ok(()),
            status if !from_relay(&r) => Err(TunnelError::Remote(front_problem(status))),
            status => Err(TunnelError::Remote(format!(
                "relay answered {status} to the upload"
            ))),
        }
    };
    let download = tunnel::pump_download(
        http::Response::from(download).into_body(),
        &stream,
        &local_failed,
        tunnel::ATTACH_TIMEOUT,
        (heartbeat * 3).max(tunnel::MIN_DEAD_AFTER),
    );
    tunnel::run(&stream, &local_failed, upload, download, &cancel, shutdown).await
}
