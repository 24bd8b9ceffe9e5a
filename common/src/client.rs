//! The endpoints' HTTP client to the relay (feature `endpoint`): one `reqwest` client (rustls
//! with the `ring` provider, system roots plus an optional private CA), request signing, the
//! checks every answer goes through, and the reconnect backoff.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::{RequestBuilder, Response, StatusCode};

use crate::auth::{SIGNATURE, SIGNATURE_INPUT, Signer};
use crate::config::RelayUrl;
use crate::keys::PrivateKey;
use crate::protocol::{CHANNEL_ID_HEADER, ChannelId, RELAY_ANSWER_HEADER};

/// Why `ptth_server` or `ptth_proxy` cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The CA file could not be read or holds no certificate.
    #[error("ca_file {path}: {message}")]
    CaFile {
        /// the file
        path: String,
        /// what went wrong
        message: String,
    },
    /// TLS or HTTP client setup failed.
    #[error("HTTP client setup: {0}")]
    Client(String),
    /// A listener given to the proxy is unusable.
    #[error("listener: {0}")]
    Listener(std::io::Error),
    /// The proxy was given another number of listeners than it has forwards.
    #[error(
        "{listeners} listeners for {forwards} forwards: give one per [[forwards]] entry, in order"
    )]
    Listeners {
        /// `[[forwards]]` entries in the configuration
        forwards: usize,
        /// listeners given
        listeners: usize,
    },
}

fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, SetupError> {
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
        let err = |message: String| SetupError::CaFile {
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
        .map_err(|e| SetupError::Client(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Builds the HTTP client used for every call to `relay`, trusting `ca_file` beside the system
/// roots, and speaking HTTP/2 from the start when the URL says `h2c://`. No total timeout is
/// set: tunnel requests live as long as their TCP connection.
pub fn http_client(
    relay: &RelayUrl,
    ca_file: Option<&Path>,
) -> Result<reqwest::Client, SetupError> {
    let mut builder = http_client_builder(ca_file)?;
    if relay.h2c() {
        builder = builder.http2_prior_knowledge();
    }
    builder
        .build()
        .map_err(|e| SetupError::Client(e.to_string()))
}

/// The builder behind [`http_client`] (without `h2c`), for callers that need one more setting.
pub fn http_client_builder(ca_file: Option<&Path>) -> Result<reqwest::ClientBuilder, SetupError> {
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls_config(ca_file)?)
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(50))
        .http2_initial_stream_window_size(Some(1024 * 1024))
        .http2_max_frame_size(Some(64 * 1024))
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
    warm_attempts: Arc<AtomicU64>,
}

/// The last warm-up.
#[derive(Debug)]
struct WarmUp {
    /// Its number, counting attempts from 1.
    attempt: u64,
    /// When it ended.
    at: Instant,
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
            Err(e) => Err(CallError::Unreachable(error_chain(&e)).to_string()),
        };
        let attempt = self.warm_attempts.fetch_add(1, Ordering::AcqRel) + 1;
        *last = Some(WarmUp {
            attempt,
            at: Instant::now(),
            outcome: outcome.clone(),
        });
        outcome
    }

    /// A POST to a protocol path, signed now.
    pub fn post(&self, path: &str) -> RequestBuilder {
        let h = self.signer.sign("POST", &self.authority, path);
        self.http
            .post(self.url.join(path))
            .header(SIGNATURE_INPUT, h.input)
            .header(SIGNATURE, h.signature)
    }
}

/// Why a call to the relay did not get the answer it needed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No answer headers within the time allowed.
    #[error("the relay did not answer within {0:?}")]
    Timeout(Duration),
    /// No HTTP answer at all: the connection (TCP, TLS, HTTP) failed.
    #[error("cannot reach the relay: {0}")]
    Unreachable(String),
    /// A reverse proxy in front of the relay answered instead of the relay.
    #[error("{}", front_problem(*.0))]
    Front(StatusCode),
    /// The relay answered with another status, and this reason.
    #[error("relay answered {status}: {reason}")]
    Refused {
        /// the status
        status: StatusCode,
        /// the one-line reason in the answer's body
        reason: String,
    },
}

/// The answer to a call, if it is one of the `expected` statuses and came from the relay
/// itself: it carries `ptth-relay`, which a reverse proxy's own 502 or 413 does not. A
/// refusal's reason is read from the body (bounded).
pub(crate) async fn check(
    answer: reqwest::Result<Response>,
    expected: &[StatusCode],
) -> Result<Response, CallError> {
    let answer = answer.map_err(|e| CallError::Unreachable(error_chain(&e)))?;
    let status = answer.status();
    // Checked first: a front that answers 200 to anything must not pass for the relay.
    if !answer.headers().contains_key(RELAY_ANSWER_HEADER) {
        return Err(CallError::Front(status));
    }
    if expected.contains(&status) {
        return Ok(answer);
    }
    // Boxed: reading the reason takes a large future, which every channel would otherwise
    // carry inline for its whole life while waiting for its upload's answer.
    Err(CallError::Refused {
        status,
        reason: Box::pin(reason(answer)).await,
    })
}

/// The channel ID that a `listen` or `connect` answer carries, if it is valid.
pub fn channel_id(answer: &Response) -> Option<ChannelId> {
    answer
        .headers()
        .get(CHANNEL_ID_HEADER)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Reads the plain-text reason a relay put in an error answer (bounded in size and time).
async fn reason(mut answer: Response) -> String {
    const MAX: usize = 512;
    let mut out = Vec::new();
    while out.len() < MAX {
        match tokio::time::timeout(Duration::from_secs(2), answer.chunk()).await {
            Ok(Ok(Some(c))) => out.extend_from_slice(&c[..c.len().min(MAX - out.len())]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).trim().to_owned()
}

/// Explains an error status that a reverse proxy in front of the relay made up.
fn front_problem(status: StatusCode) -> String {
    let hint = match status.as_u16() {
        413 => "it caps request bodies: nginx `client_max_body_size 0;`",
        502 | 503 => {
            "it cannot reach the relay: is ptth_relay running at the address it proxies to?"
        }
        504 => {
            "it timed out waiting for the relay: its timeouts must exceed heartbeat_interval \
             (nginx proxy_read_timeout, HAProxy timeout server), and it must pass request \
             bodies on as they come (nginx: proxy_request_buffering off)"
        }
        404 | 405 => "it does not pass /v1/ through to the relay unchanged",
        _ => "check its configuration (docs/deploy.md)",
    };
    format!("a reverse proxy in front of the relay answered {status}: {hint}")
}

/// The error and its sources on one line (reqwest hides the useful part in the sources), with
/// advice when TLS did not trust the relay.
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

/// Backoff schedule for retrying calls to the relay: doubles from 100 ms up to `max`, with
/// jitter; with the logging of a run of failures.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
    /// Whether the last call failed.
    failing: bool,
}

impl Backoff {
    /// Starts at 100 ms.
    pub fn new(max: Duration) -> Self {
        Self {
            next: Duration::from_millis(100).min(max),
            max,
            failing: false,
        }
    }

    /// A call failed with `problem`: logs it (a warning the first time in a run, at debug
    /// level after) and waits the next delay. `false` if `shutdown` fired meanwhile.
    pub async fn retry_after(
        &mut self,
        problem: &(dyn std::fmt::Display + Sync),
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> bool {
        let delay = self.next_delay();
        if self.failing {
            tracing::debug!(retry_in = ?delay, "{problem}");
        } else {
            tracing::warn!(retry_in = ?delay, "{problem}");
            self.failing = true;
        }
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }

    /// A call succeeded: back to the first delay, and, after failures, logs
    /// `connected to the relay again`.
    pub fn succeeded(&mut self) {
        if self.failing {
            tracing::info!("connected to the relay again");
        }
        self.failing = false;
        self.reset();
    }

    /// The next delay (with up to 25% random jitter subtracted), doubling the one after.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let mut b = [0u8; 1];
        let _ = getrandom::fill(&mut b);
        base - base.mul_f64(f64::from(b[0]) / 1024.0)
    }

    /// Back to the first delay after a success.
    pub fn reset(&mut self) {
        self.next = Duration::from_millis(100).min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_max_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500));
        let within = |d: Duration, base: u64| {
            let base = Duration::from_millis(base);
            d <= base && d >= base * 3 / 4
        };
        for base in [100, 200, 400, 500, 500] {
            let d = b.next_delay();
            assert!(within(d, base), "{d:?} for {base} ms");
        }
        b.reset();
        assert!(within(b.next_delay(), 100));
    }

    #[test]
    fn front_answers_are_explained() {
        let e = CallError::Front(StatusCode::PAYLOAD_TOO_LARGE).to_string();
        assert!(
            e.contains("413") && e.contains("client_max_body_size 0"),
            "{e}"
        );
        let e = CallError::Front(StatusCode::GATEWAY_TIMEOUT).to_string();
        assert!(
            e.contains("proxy_read_timeout") && e.contains("proxy_request_buffering off"),
            "{e}"
        );
    }
}
