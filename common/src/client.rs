//! The endpoints' HTTP client to the relay (feature `endpoint`): hyper's connection API with
//! rustls (the `ring` provider, system roots plus an optional private CA), request signing,
//! the checks every answer goes through, and the reconnect backoff.
//!
//! Every request shares one HTTP/2 connection when the relay speaks HTTP/2 (`h2c://`, or TLS
//! where ALPN picks `h2`); over HTTP/1.1 each request has a connection of its own, since every
//! request of a channel lasts as long as the channel. A general-purpose client (reqwest, over
//! hyper-util's pool) keeps its redirect, retry and pool state beside each request in flight:
//! about 7.6 KB for each channel's upload, whose answer comes only when the channel ends,
//! and half of a tunnel's memory budget (docs/benchmarks.md).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HOST, HeaderName, HeaderValue};
use http::{Request, StatusCode, Uri};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::task::TaskTracker;

use crate::TrackedExecutor;
use crate::auth::{
    MAX_SKEW_SECS, RELAY_AUTHORITY, SIGNATURE, SIGNATURE_INPUT, SIGNED_AUTHORITY, Signer, reason,
};
use crate::config::RelayUrl;
use crate::keys::PrivateKey;
use crate::protocol::{
    CHANNEL_ID_HEADER, ChannelId, HTTP2_CONNECTION_WINDOW, HTTP2_MAX_FRAME,
    HTTP2_MAX_LOCAL_ERROR_RESETS, HTTP2_STREAM_WINDOW, RELAY_ANSWER_HEADER,
};

/// The error type of request bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a request to the relay.
pub type RequestBody = BoxBody<Bytes, BoxError>;

/// An answer from the relay (or from a front in its place).
pub type Response = http::Response<hyper::body::Incoming>;

/// Longest wait for a connection to the relay: TCP, TLS and the HTTP handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The TLS client settings for the relay: system roots plus `ca_file`, ALPN `h2` then
/// `http/1.1`.
pub fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, SetupError> {
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

/// A relay endpoint, its connection, and the key that signs every call to it. Cheap to clone:
/// clones share the connection.
#[derive(Debug, Clone)]
pub struct RelayClient {
    inner: Arc<Inner>,
}

struct Inner {
    url: RelayUrl,
    /// The signed `@authority`, sent as `Host` over HTTP/1.1.
    authority: String,
    /// Where to dial: host (an IP address without brackets, or a name) and port.
    host: String,
    port: u16,
    /// For `https://`: the TLS settings and the name the certificate must carry.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    signer: Signer,
    /// The connection every request shares when the relay speaks HTTP/2.
    shared: tokio::sync::Mutex<Shared>,
    /// The relay speaks HTTP/1.1 only (`http://`, or TLS where ALPN picked `http/1.1`): each
    /// request dials a connection of its own.
    http1: AtomicBool,
    /// Attempts to open the shared connection so far.
    attempts: AtomicU64,
    /// The program's tasks: each connection's driver, and HTTP/2's stream tasks, run there.
    tasks: TaskTracker,
    /// Set by [`RelayClient::close`]: no connection is dialled any more.
    closed: AtomicBool,
    /// Connections dialled so far (TCP connects attempted), for the metrics.
    dials: prometheus_client::metrics::counter::Counter,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayClient")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// The shared HTTP/2 connection, or how the last attempt to open it failed.
#[derive(Debug, Default)]
struct Shared {
    sender: Option<http2::SendRequest<RequestBody>>,
    /// The last failed attempt: its number, counting from 1, and its error.
    failure: Option<(u64, String)>,
}

/// A connection ready for a request.
enum Sender {
    Http1(http1::SendRequest<RequestBody>),
    Http2(http2::SendRequest<RequestBody>),
}

impl RelayClient {
    /// A client for `url`, trusting `ca_file` beside the system roots for `https://`, signing
    /// with `key`, running its connections' tasks on `tasks`. Nothing is dialled before the
    /// first request.
    pub fn new(
        url: RelayUrl,
        ca_file: Option<&Path>,
        key: PrivateKey,
        tasks: TaskTracker,
    ) -> Result<Self, SetupError> {
        let (host, port, https) = url.dial_address();
        let tls = if https {
            let name = ServerName::try_from(host.clone())
                .map_err(|e| SetupError::Client(format!("relay host {host}: {e}")))?;
            let connector = TlsConnector::from(Arc::new(tls_config(ca_file)?));
            Some((connector, name))
        } else {
            None
        };
        let http1 = !https && !url.h2c();
        Ok(Self {
            inner: Arc::new(Inner {
                authority: url.authority(),
                url,
                host,
                port,
                tls,
                signer: Signer::new(key),
                shared: tokio::sync::Mutex::default(),
                http1: AtomicBool::new(http1),
                attempts: AtomicU64::new(0),
                tasks,
                closed: AtomicBool::new(false),
                dials: Default::default(),
            }),
        })
    }

    /// The count of connections dialled to the relay so far (a handle that follows it).
    pub fn dials(&self) -> prometheus_client::metrics::counter::Counter {
        self.inner.dials.clone()
    }

    /// Dials no more, and lets go of the shared HTTP/2 connection, which then closes once its
    /// requests have ended: called at shutdown, so that the connection's tasks end with the
    /// channels' instead of keeping the program's task tracker waiting.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.shared.lock().await.sender = None;
    }

    /// A POST to a protocol path, signed now, with one `header` beside the signature and
    /// `body`; sent when first polled. Resolves to the answer's head (its body streams on).
    pub fn post(
        &self,
        path: &str,
        header: (HeaderName, HeaderValue),
        body: RequestBody,
    ) -> impl Future<Output = Result<Response, CallError>> + Send + 'static {
        let signed = self.inner.signer.sign("POST", &self.inner.authority, path);
        let client = self.clone();
        let path = path.to_owned();
        async move {
            let unreachable = |e: hyper::Error| CallError::Unreachable(error_chain(&e));
            let signature_input = HeaderValue::try_from(signed.input)
                .map_err(|e| CallError::Unreachable(e.to_string()))?;
            let signature = HeaderValue::try_from(signed.signature)
                .map_err(|e| CallError::Unreachable(e.to_string()))?;
            let signed_for = HeaderValue::try_from(signed.authority.as_str())
                .map_err(|e| CallError::Unreachable(e.to_string()))?;
            let request = |absolute: bool| -> Result<Request<RequestBody>, CallError> {
                // HTTP/2 takes the authority from the URI; HTTP/1.1 from `Host`.
                let uri: Uri = if absolute {
                    client.inner.url.join(&path).as_str().parse()
                } else {
                    path.parse()
                }
                .map_err(|e: http::uri::InvalidUri| CallError::Unreachable(e.to_string()))?;
                let mut builder = Request::post(uri)
                    .header(SIGNATURE_INPUT, signature_input.clone())
                    .header(SIGNATURE, signature.clone())
                    .header(SIGNED_AUTHORITY, signed_for.clone())
                    .header(header.0.clone(), header.1.clone());
                if !absolute {
                    builder = builder.header(HOST, client.inner.authority.as_str());
                }
                builder
                    .body(body)
                    .map_err(|e| CallError::Unreachable(e.to_string()))
            };
            let mut answer = match Box::pin(client.connection()).await? {
                Sender::Http1(mut sender) => {
                    let request = request(false)?;
                    sender.ready().await.map_err(unreachable)?;
                    sender.send_request(request).await.map_err(unreachable)?
                }
                Sender::Http2(mut sender) => {
                    let request = request(true)?;
                    sender.send_request(request).await.map_err(unreachable)?
                }
            };
            if answer.status() == StatusCode::UNAUTHORIZED {
                answer.extensions_mut().insert(SignedAs {
                    authority: signed.authority,
                    keyid: client.inner.signer.keyid().to_owned(),
                });
            }
            Ok(answer)
        }
    }

    /// A connection for one request: the shared HTTP/2 connection (opened now if there is
    /// none), or a new HTTP/1.1 connection.
    async fn connection(&self) -> Result<Sender, CallError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(CallError::Unreachable("the client is shutting down".into()));
        }
        if self.inner.http1.load(Ordering::Acquire) {
            return Box::pin(self.dial()).await;
        }
        let attempts_before = self.inner.attempts.load(Ordering::Acquire);
        let mut shared = self.inner.shared.lock().await;
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(CallError::Unreachable("the client is shutting down".into()));
        }
        if let Some(sender) = &shared.sender
            && !sender.is_closed()
        {
            return Ok(Sender::Http2(sender.clone()));
        }
        if let Some((attempt, e)) = &shared.failure
            && *attempt > attempts_before
        {
            return Err(CallError::Unreachable(e.clone()));
        }
        let dialled = Box::pin(self.dial()).await;
        let attempt = self.inner.attempts.fetch_add(1, Ordering::AcqRel) + 1;
        match dialled {
            Ok(Sender::Http2(sender)) => {
                shared.sender = Some(sender.clone());
                shared.failure = None;
                Ok(Sender::Http2(sender))
            }
            Ok(Sender::Http1(sender)) => {
                // TLS chose HTTP/1.1: so will every later connection.
                self.inner.http1.store(true, Ordering::Release);
                Ok(Sender::Http1(sender))
            }
            Err(CallError::Unreachable(e)) => {
                shared.failure = Some((attempt, e.clone()));
                Err(CallError::Unreachable(e))
            }
            Err(e) => Err(e),
        }
    }

    /// Dials a new connection to the relay, within [`CONNECT_TIMEOUT`]. Its driver runs in a
    /// tracked task of its own, which ends with the connection.
    async fn dial(&self) -> Result<Sender, CallError> {
        let inner = &self.inner;
        let unreachable = |e: &dyn std::error::Error| CallError::Unreachable(error_chain(e));
        inner.dials.inc();
        let dial = async {
            let tcp = TcpStream::connect((inner.host.as_str(), inner.port))
                .await
                .map_err(|e| unreachable(&e))?;
            let _ = tcp.set_nodelay(true);
            match &inner.tls {
                None if inner.url.h2c() => http2_handshake(tcp, &inner.tasks).await,
                None => http1_handshake(tcp, &inner.tasks).await,
                Some((connector, name)) => {
                    let tls = connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|e| unreachable(&e))?;
                    if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                        http2_handshake(tls, &inner.tasks).await
                    } else {
                        http1_handshake(tls, &inner.tasks).await
                    }
                }
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, dial).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Unreachable(format!(
                "no connection within {CONNECT_TIMEOUT:?}"
            ))),
        }
    }
}

/// An HTTP/1.1 connection over `io`, its driver spawned on `tasks`.
async fn http1_handshake<T>(io: T, tasks: &TaskTracker) -> Result<Sender, CallError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| CallError::Unreachable(error_chain(&e)))?;
    tasks.spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %error_chain(&e), "HTTP/1.1 connection to the relay ended");
        }
    });
    Ok(Sender::Http1(sender))
}

/// An HTTP/2 connection over `io`, its driver and stream tasks spawned on `tasks`: large
/// windows and frames for bulk transfers, and pings that find a dead relay within 40 s even
/// when idle.
async fn http2_handshake<T>(io: T, tasks: &TaskTracker) -> Result<Sender, CallError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = http2::Builder::new(TrackedExecutor(tasks.clone()))
        .timer(TokioTimer::new())
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .max_frame_size(HTTP2_MAX_FRAME)
        .max_local_error_reset_streams(HTTP2_MAX_LOCAL_ERROR_RESETS)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| CallError::Unreachable(error_chain(&e)))?;
    tasks.spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %error_chain(&e), "HTTP/2 connection to the relay ended");
        }
    });
    Ok(Sender::Http2(sender))
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
    /// The relay refused our signature (`401`).
    #[error("relay answered 401 Unauthorized: {reason}: {advice}")]
    SignatureRefused {
        /// the one-line reason in the answer's body
        reason: String,
        /// what to do, from what the answer tells of the relay's view
        advice: String,
    },
    /// The relay answered with another status, and this reason.
    #[error("relay answered {status}: {reason}")]
    Refused {
        /// the status
        status: StatusCode,
        /// the one-line reason in the answer's body
        reason: String,
    },
}

/// What a request was signed as, kept on a `401` answer for [`check`] to explain it.
#[derive(Debug, Clone)]
struct SignedAs {
    /// The authority signed for.
    authority: String,
    /// Our public key.
    keyid: String,
}

/// The answer to a call, if it is one of the `expected` statuses and came from the relay
/// itself: it carries `ptth-relay`, which a reverse proxy's own 502 or 413 does not. A
/// refusal's reason is read from the body (bounded); a refused signature is explained.
pub(crate) async fn check(
    answer: Result<Response, CallError>,
    expected: &[StatusCode],
) -> Result<Response, CallError> {
    let answer = answer?;
    let status = answer.status();
    // Checked first: a front that answers 200 to anything must not pass for the relay.
    if !answer.headers().contains_key(RELAY_ANSWER_HEADER) {
        return Err(CallError::Front(status));
    }
    if expected.contains(&status) {
        return Ok(answer);
    }
    let relay_view = (status == StatusCode::UNAUTHORIZED).then(|| RelayView::of(&answer));
    // Boxed: reading the reason takes a large future, which every channel would otherwise
    // carry inline for its whole life while waiting for its upload's answer.
    let reason = Box::pin(reason(answer)).await;
    Err(match relay_view {
        Some(view) => CallError::SignatureRefused {
            advice: view.advice(&reason),
            reason,
        },
        None => CallError::Refused { status, reason },
    })
}

/// What a `401` answer tells of how the relay saw our request, beside its reason.
#[derive(Debug)]
struct RelayView {
    /// What we signed as.
    signed: Option<SignedAs>,
    /// The authority the relay checked our signature against, if it says.
    authority: Option<String>,
    /// Our clock minus the relay's (its answer's `Date`), in seconds.
    our_clock_ahead: Option<i64>,
}

impl RelayView {
    fn of(answer: &Response) -> Self {
        let header = |name: &str| answer.headers().get(name)?.to_str().ok();
        let our_clock_ahead = header(http::header::DATE.as_str())
            .and_then(|date| httpdate::parse_http_date(date).ok())
            .map(
                |relay| match std::time::SystemTime::now().duration_since(relay) {
                    Ok(ahead) => ahead.as_secs() as i64,
                    Err(behind) => -(behind.duration().as_secs() as i64),
                },
            );
        Self {
            signed: answer.extensions().get::<SignedAs>().cloned(),
            authority: header(RELAY_AUTHORITY).map(str::to_owned),
            our_clock_ahead,
        }
    }

    /// What to do about a refusal for `relay_reason` (the answer's body).
    fn advice(&self, relay_reason: &str) -> String {
        match relay_reason {
            reason::STALE => self.clock_advice(),
            reason::REPLAYED => "the relay had seen this signed request before: a front in \
                between may send requests twice"
                .to_owned(),
            reason::MALFORMED => "a front in between may drop or alter the Signature and \
                Signature-Input headers"
                .to_owned(),
            _ => self.key_advice(),
        }
    }

    /// For a signature refused as expired or not yet valid: how far the clocks differ.
    fn clock_advice(&self) -> String {
        match self.our_clock_ahead {
            Some(ahead) if ahead.unsigned_abs() >= 5 => {
                let way = if ahead > 0 { "ahead of" } else { "behind" };
                format!(
                    "our clock is {} s {way} the relay's (the clocks may differ by at most \
                     {MAX_SKEW_SECS} s): sync the clocks (NTP)",
                    ahead.unsigned_abs()
                )
            }
            Some(_) => "our clock agrees with the relay's: the request took over a minute to \
                reach it"
                .to_owned(),
            None => "the clocks differ: sync the clocks (NTP)".to_owned(),
        }
    }

    /// For an invalid signature: the authority the relay saw, if it differs from ours; else
    /// the key.
    fn key_advice(&self) -> String {
        let Some(signed) = &self.signed else {
            return "is our public key in relay.toml?".to_owned();
        };
        match &self.authority {
            Some(seen) if !seen.eq_ignore_ascii_case(&signed.authority) => format!(
                "the relay saw this request as `{seen}`, but we signed it for `{}`: a front \
                 in between changes the Host; set `authorities = [\"{}\"]` in relay.toml (or \
                 make the front keep the Host)",
                signed.authority, signed.authority
            ),
            _ => format!(
                "is our public key ({}) in relay.toml, under [[servers]] or [[clients]] with \
                 our name? If relay.toml sets `authorities`, it must include `{}`",
                signed.keyid, signed.authority
            ),
        }
    }
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
async fn reason(answer: Response) -> String {
    const MAX: usize = 512;
    let mut body = answer.into_body();
    let mut out = Vec::new();
    while out.len() < MAX {
        match tokio::time::timeout(Duration::from_secs(2), body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(c) = frame.into_data() {
                    out.extend_from_slice(&c[..c.len().min(MAX - out.len())]);
                }
            }
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

/// The error and its sources on one line (hyper hides the useful part in the sources), with
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
        s.push_str(CERTIFICATE_ADVICE);
    }
    s
}

/// What [`error_chain`] adds when TLS did not trust the relay.
const CERTIFICATE_ADVICE: &str = " (TLS: the relay's certificate is not trusted or does not \
match its name; set ca_file to the PEM of the CA that signed it, and use the name it was issued \
for)";

impl CallError {
    /// Whether the relay could not be reached because TLS did not trust it: trying again
    /// changes nothing.
    pub fn is_certificate_problem(&self) -> bool {
        matches!(self, Self::Unreachable(e) if e.contains(CERTIFICATE_ADVICE))
    }
}

/// `d` less up to 25 % at random, so that timers set together do not all fire together.
pub(crate) fn jittered(d: Duration) -> Duration {
    let mut b = [0u8; 1];
    let _ = getrandom::fill(&mut b);
    d - d.mul_f64(f64::from(b[0]) / 1024.0)
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
    fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        jittered(base)
    }

    /// Back to the first delay after a success.
    fn reset(&mut self) {
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
