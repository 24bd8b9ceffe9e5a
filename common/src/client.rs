//! The endpoints' HTTP client to the relay (feature `endpoint`): one `reqwest` client (rustls
//! with the `ring` provider, system roots plus an optional private CA), request signing, the
//! checks every answer goes through, and the reconnect backoff.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::{RequestBuilder, Response, StatusCode};
use tokio_util::sync::CancellationToken;

use crate::auth::{SIGNATURE, SIGNATURE_INPUT, SignedHeaders, Signer};
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

/// How long a signature made ahead of time ([`RelayClient::sign`]) is used before it is made
/// again: well inside the 60 s for which the relay accepts it, with room for clock skew and for
/// the time the request takes to arrive.
const SIGNED_FRESH_FOR: Duration = Duration::from_secs(30);

/// A call to a protocol path, signed ahead of time ([`RelayClient::sign`]), so that the
/// signing is not on the way of the call that needs it; [`RelayClient::post_signed`] sends it.
#[derive(Debug, Clone)]
pub struct Signed {
    path: String,
    headers: SignedHeaders,
    at: Instant,
}

impl Signed {
    /// The protocol path it is signed for.
    pub fn path(&self) -> &str {
        &self.path
    }
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
        self.post_signed(self.sign(path.to_owned()))
    }

    /// Signs a POST to the protocol path `path` now, for [`RelayClient::post_signed`] to send
    /// later.
    pub fn sign(&self, path: String) -> Signed {
        Signed {
            headers: self.signer.sign("POST", &self.authority, &path),
            path,
            at: Instant::now(),
        }
    }

    /// A POST with a signature made ahead of time, or made again now if it is no longer
    /// fresh (older than 30 s).
    pub fn post_signed(&self, signed: Signed) -> RequestBuilder {
        let signed = if signed.at.elapsed() < SIGNED_FRESH_FOR {
            signed
        } else {
            self.sign(signed.path)
        };
        self.http
            .post(self.url.join(&signed.path))
            .header(SIGNATURE_INPUT, signed.headers.input)
            .header(SIGNATURE, signed.headers.signature)
    }
}

/// Why a call to the relay did not get the answer it needed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The program is shutting down.
    #[error("cancelled by shutdown")]
    Cancelled,
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

/// Sends `request` (made by [`RelayClient::post`]) and waits at most `limit` for the answer's
/// headers, then checks the answer: it must have one of the `expected` statuses and come from
/// the relay itself (it carries `ptth-relay`, which a reverse proxy's own 502 or 413 does not);
/// a refusal's reason is read from the body. Fails with [`CallError::Cancelled`] as soon as
/// `shutdown` fires.
pub async fn call(
    request: RequestBuilder,
    expected: &[StatusCode],
    limit: Duration,
    shutdown: &CancellationToken,
) -> Result<Response, CallError> {
    let sent = tokio::select! {
        () = shutdown.cancelled() => return Err(CallError::Cancelled),
        r = tokio::time::timeout(limit, request.send()) => r,
    };
    match sent {
        Ok(answer) => check(answer, expected).await,
        Err(_) => Err(CallError::Timeout(limit)),
    }
}

/// The answer to a call, if it is one of the `expected` statuses and came from the relay
/// itself (see [`call`]). A refusal's reason is read from the body (bounded).
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
    Err(CallError::Refused {
        status,
        reason: reason(answer).await,
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
/// jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at 100 ms.
    pub fn new(max: Duration) -> Self {
        Self {
            next: Duration::from_millis(100).min(max),
            max,
        }
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
