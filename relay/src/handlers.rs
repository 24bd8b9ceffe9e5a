//! The five endpoints. Every handler authenticates first and allocates nothing for a caller
//! whose signature has not verified.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use ptth_common::auth::{AuthError, SIGNATURE, SIGNATURE_INPUT, unix_now};
use ptth_common::protocol::{
    ACCEPT_ERROR_HEADER, ACCEPT_ERROR_REFUSED, CONNECTION_ID_HEADER, ConnId, RELAY_ANSWER_HEADER,
    TUNNEL_CONTENT_TYPE, valid_name,
};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::pipe::{PipeBody, Upload};
use crate::state::{
    AcceptOutcome, Conn, ListenGuard, MAX_PORTS_PER_SERVER, MAX_QUEUED_CONNECTS, PortState,
    Principal, Shared, Slots, lock,
};

/// The TCP peer of the HTTP connection a request came on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub std::net::SocketAddr);

/// The address of the real client: the TCP peer, or, when the peer is a trusted reverse
/// proxy, the rightmost `X-Forwarded-For` entry that is not itself a trusted proxy.
pub(crate) fn client_addr(shared: &Shared, req: &Request) -> Option<std::net::IpAddr> {
    let peer = req.extensions().get::<Peer>()?.0.ip();
    let trusted =
        |ip: std::net::IpAddr| shared.config.trusted_proxies.iter().any(|c| c.contains(ip));
    if !trusted(peer) {
        return Some(peer);
    }
    let mut addr = peer;
    let values: Vec<&str> = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    for hop in values.iter().rev().flat_map(|v| v.rsplit(',')) {
        let Ok(ip) = hop.trim().parse::<std::net::IpAddr>() else {
            break;
        };
        addr = ip;
        if !trusted(ip) {
            break;
        }
    }
    Some(addr)
}

/// An error answer: a status and a one-line reason in plain text.
#[derive(Debug)]
pub(crate) struct ApiError(StatusCode, &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, format!("{}\n", self.1)).into_response();
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r.headers_mut()
            .insert(RELAY_ANSWER_HEADER, HeaderValue::from_static("1"));
        r
    }
}

type Result<T> = std::result::Result<T, ApiError>;

const NOT_FOUND_CONN: ApiError = ApiError(StatusCode::NOT_FOUND, "no such connection");

fn authority_of(req: &Request) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

fn authenticate(shared: &Shared, req: &Request) -> Result<Principal> {
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let host;
    let authorities: Vec<&str> = if shared.authorities.is_empty() {
        host = authority_of(req).unwrap_or_default().to_ascii_lowercase();
        vec![host.as_str()]
    } else {
        shared.authorities.iter().map(String::as_str).collect()
    };
    let result = shared.verifier.verify_any(
        req.method().as_str(),
        &authorities,
        req.uri().path(),
        header(SIGNATURE_INPUT),
        header(SIGNATURE),
        unix_now(),
    );
    match result {
        Ok(p) => Ok(*p),
        Err(e) => {
            let client = client_addr(shared, req)
                .map(|a| a.to_string())
                .unwrap_or_default();
            info!(path = req.uri().path(), %client, error = %e, "request refused");
            Err(match e {
                AuthError::Busy => ApiError(StatusCode::SERVICE_UNAVAILABLE, "relay busy, retry"),
                AuthError::Stale => ApiError(
                    StatusCode::UNAUTHORIZED,
                    "signature expired or not yet valid: check the clocks",
                ),
                AuthError::Replay => ApiError(StatusCode::UNAUTHORIZED, "replayed request"),
                AuthError::Malformed(_) => {
                    ApiError(StatusCode::UNAUTHORIZED, "missing or malformed signature")
                }
                AuthError::BadSignature => ApiError(StatusCode::UNAUTHORIZED, "invalid signature"),
            })
        }
    }
}

/// Authenticates a server and checks that it acts as the server named in the path.
fn server_principal(shared: &Shared, req: &Request, server: &str) -> Result<usize> {
    match authenticate(shared, req)? {
        Principal::Server(i) if shared.server_names[i].as_str() == server => Ok(i),
        Principal::Server(i) => {
            warn!(key_of = %shared.server_names[i], path_server = server, "server key used for another server name");
            Err(ApiError(
                StatusCode::FORBIDDEN,
                "this key may not act as that server",
            ))
        }
        Principal::Client(_) => Err(ApiError(StatusCode::FORBIDDEN, "clients may not do this")),
    }
}

fn streaming_response(body: PipeBody, id: Option<ConnId>) -> Response {
    let mut r = Response::new(Body::new(body));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(TUNNEL_CONTENT_TYPE),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    h.insert(RELAY_ANSWER_HEADER, HeaderValue::from_static("1"));
    if let Some(v) = id.and_then(|id| HeaderValue::from_str(&id.to_string()).ok()) {
        h.insert(CONNECTION_ID_HEADER, v);
    }
    r
}

fn id_response(status: StatusCode, id: Option<ConnId>) -> Response {
    let mut r = plain(status);
    if let Some(v) = id.and_then(|id| HeaderValue::from_str(&id.to_string()).ok()) {
        r.headers_mut().insert(CONNECTION_ID_HEADER, v);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// An empty answer marked as the relay's own.
fn plain(status: StatusCode) -> Response {
    let mut r = status.into_response();
    r.headers_mut()
        .insert(RELAY_ANSWER_HEADER, HeaderValue::from_static("1"));
    r
}

/// `POST /v1/servers/{server}/ports/{port}/listen`: long-poll for the next client.
pub(crate) async fn listen(
    State(shared): State<Arc<Shared>>,
    Path((server, port)): Path<(String, String)>,
    req: Request,
) -> Result<Response> {
    let sidx = server_principal(&shared, &req, &server)?;
    if !valid_name(&port) {
        return Err(ApiError(StatusCode::BAD_REQUEST, "invalid port name"));
    }
    if shared.shutdown.is_cancelled() {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "relay shutting down",
        ));
    }
    let (tx, mut rx) = oneshot::channel();
    {
        let mut ports = lock(&shared.ports);
        let key = (sidx, port.clone());
        let full = |ports: &std::collections::HashMap<(usize, String), PortState>| {
            ports.keys().filter(|(s, _)| *s == sidx).count() >= MAX_PORTS_PER_SERVER
        };
        if !ports.contains_key(&key) && full(&ports) {
            // Forget this server's ports that nobody listens on any more.
            let now = Instant::now();
            ports.retain(|(s, _), p| *s != sidx || p.live(now) || !p.queued.is_empty());
        }
        if !ports.contains_key(&key) && full(&ports) {
            return Err(ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                "too many ports for this server",
            ));
        }
        let entry = ports.entry(key).or_insert_with(|| PortState {
            listeners: Default::default(),
            queued: Default::default(),
            answered: None,
        });
        // A client already waiting gets this listen at once.
        while let Some(id) = entry.queued.pop_front() {
            let live = shared.conn(id).is_some_and(|c| !c.cancel.is_cancelled());
            if live {
                entry.answered = Some(Instant::now());
                debug!(conn = %id, "handing queued connection to listen");
                return Ok(id_response(StatusCode::OK, Some(id)));
            }
        }
        entry.prune();
        if entry.listeners.len() >= shared.config.max_listens_per_port {
            return Err(ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                "too many listens waiting",
            ));
        }
        entry.listeners.push_back(tx);
    }
    let _counted = ListenGuard::new(&shared);
    let key = (sidx, port);
    let mut unanswered = ForgetGraceOnDrop {
        shared: &shared,
        key: &key,
        armed: true,
    };
    let answer = tokio::select! {
        r = &mut rx => r.ok(),
        () = tokio::time::sleep(shared.config.listen_timeout) => {
            // Closed and marked answered at once, under the lock that connects take: a connect
            // never sees this port with its listen closed and no grace yet.
            let mut ports = lock(&shared.ports);
            rx.close();
            if let Some(e) = ports.get_mut(&key) {
                e.answered = Some(Instant::now());
            }
            rx.try_recv().ok()
        }
        () = shared.shutdown.cancelled() => {
            rx.close();
            match rx.try_recv() {
                Ok(id) => Some(id),
                Err(_) => return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, "relay shutting down")),
            }
        }
    };
    // Answered: a client's connect marked the port when it handed over its ID, the timeout
    // arm above when it closed the listen.
    unanswered.armed = false;
    Ok(match answer {
        Some(id) => id_response(StatusCode::OK, Some(id)),
        None => id_response(StatusCode::NO_CONTENT, None),
    })
}

/// Ends a port's grace when a `listen` on it dies unanswered (its HTTP connection went away):
/// the server is then most likely gone, and connects to it must get `503` at once rather
/// than wait in the queue. A server that is still there re-issues its listen, which makes
/// the port live again.
struct ForgetGraceOnDrop<'a> {
    shared: &'a Shared,
    key: &'a (usize, String),
    armed: bool,
}

impl Drop for ForgetGraceOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed
            && let Some(e) = lock(&self.shared.ports).get_mut(self.key)
        {
            e.answered = None;
        }
    }
}

/// Cancels a connection if the `connect` handler is dropped before it answers.
struct CancelOnDrop(Option<Arc<Conn>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.cancel.cancel();
        }
    }
}

/// `POST /v1/servers/{server}/ports/{port}/connect`: open a connection to a server's port.
pub(crate) async fn connect(
    State(shared): State<Arc<Shared>>,
    Path((server, port)): Path<(String, String)>,
    req: Request,
) -> Result<Response> {
    let cidx = match authenticate(&shared, &req)? {
        Principal::Client(i) => i,
        Principal::Server(_) => {
            return Err(ApiError(StatusCode::FORBIDDEN, "servers may not connect"));
        }
    };
    let client = &shared.client_names[cidx];
    if !shared.client_allow[cidx]
        .iter()
        .any(|g| g.allows(&server, &port))
    {
        info!(%client, %server, %port, "connect denied by allow list");
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "not allowed to connect to this port",
        ));
    }
    let Some(&sidx) = shared.server_index.get(&server) else {
        return Err(ApiError(StatusCode::NOT_FOUND, "unknown server"));
    };
    if shared.shutdown.is_cancelled() {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "relay shutting down",
        ));
    }
    let id = ConnId::random()
        .map_err(|_| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "random source failed"))?;
    let client_ip = client_addr(&shared, &req)
        .map(|a| a.to_string())
        .unwrap_or_default();
    let span = info_span!("conn", conn = %id, %client, %client_ip, %server, %port);
    connect_inner(shared.clone(), sidx, cidx, port, id)
        .instrument(span)
        .await
}

async fn connect_inner(
    shared: Arc<Shared>,
    sidx: usize,
    cidx: usize,
    port: String,
    id: ConnId,
) -> Result<Response> {
    let (accept_tx, accept_rx) = oneshot::channel();
    let (up_tx, up_rx) = oneshot::channel();
    let (down_tx, down_rx) = oneshot::channel();
    let (up_attached, up_attached_rx) = oneshot::channel();
    let (down_attached, down_attached_rx) = oneshot::channel();
    let conn = Arc::new(Conn::new(
        id,
        sidx,
        cidx,
        shared.shutdown.child_token(),
        Slots {
            accept: Some(accept_tx),
            up_tx: Some(up_tx),
            up_rx: Some(up_rx),
            down_tx: Some(down_tx),
            up_attached: Some(up_attached),
            down_attached: Some(down_attached),
            down_attached_rx: Some(down_attached_rx),
            accepted: false,
        },
    ));
    {
        // Lock order: ports, then conns.
        let mut ports = lock(&shared.ports);
        let now = Instant::now();
        let online = ports
            .iter_mut()
            .filter(|((s, _), _)| *s == sidx)
            .fold(false, |any, (_, p)| p.live(now) || any);
        if !online {
            info!("server offline");
            return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, "server offline"));
        }
        let Some(entry) = ports.get_mut(&(sidx, port)).filter(|p| p.live_ro(now)) else {
            info!("server does not offer this port");
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                "server does not offer this port",
            ));
        };
        if let Err(why) = shared.insert_conn(conn.clone()) {
            warn!("{why}");
            return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, why));
        }
        let mut delivered = false;
        while let Some(l) = entry.listeners.pop_front() {
            if l.send(id).is_ok() {
                delivered = true;
                // The listen just answered is about to be re-issued: the port stays offered
                // meanwhile.
                entry.answered = Some(now);
                break;
            }
        }
        if !delivered {
            if entry.queued.len() >= MAX_QUEUED_CONNECTS {
                shared.remove_conn(id);
                return Err(ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many pending connections",
                ));
            }
            entry.queued.push_back(id);
        }
    }
    spawn_reaper(shared.clone(), conn.clone());
    let guard = CancelOnDrop(Some(conn.clone()));
    debug!("offered to server");
    let outcome = tokio::select! {
        biased;
        r = accept_rx => r.ok(),
        () = tokio::time::sleep(shared.config.accept_timeout) => None,
        () = conn.cancel.cancelled() => None,
    };
    match outcome {
        Some(AcceptOutcome::Accepted) => {
            let mut guard = guard;
            guard.0 = None;
            info!("connection open");
            let body = PipeBody::new(
                conn.clone(),
                up_attached_rx,
                down_rx,
                shared.config.heartbeat_interval,
            );
            Ok(streaming_response(body, Some(id)))
        }
        Some(AcceptOutcome::Refused) => {
            info!("target refused the connection");
            Err(ApiError(
                StatusCode::BAD_GATEWAY,
                "the server could not reach its target",
            ))
        }
        None if conn.cancel.is_cancelled() => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "connection closed",
        )),
        None => {
            info!("server did not accept in time");
            Err(ApiError(
                StatusCode::GATEWAY_TIMEOUT,
                "the server did not take the connection in time",
            ))
        }
    }
}

/// One task per connection: frees its state when it finishes, is cancelled, or stays idle
/// past `idle_timeout`.
fn spawn_reaper(shared: Arc<Shared>, conn: Arc<Conn>) {
    let idle = shared.config.idle_timeout;
    let span = tracing::Span::current();
    tokio::spawn(
        async move {
            conn.touch();
            loop {
                let deadline = conn.last_activity() + idle;
                tokio::select! {
                    () = conn.cancel.cancelled() => {
                        debug!("connection closed");
                        break;
                    }
                    () = conn.finished.notified() => {
                        info!("connection finished");
                        break;
                    }
                    () = tokio::time::sleep_until(deadline) => {
                        if conn.last_activity() + idle <= Instant::now() {
                            info!(idle_timeout = ?idle, "closing idle connection");
                            break;
                        }
                    }
                }
            }
            conn.cancel.cancel();
            shared.remove_conn(conn.id);
        }
        .instrument(span),
    );
}

fn owned_conn(shared: &Shared, id: &str, who: Principal) -> Result<Arc<Conn>> {
    let id: ConnId = id.parse().map_err(|_| NOT_FOUND_CONN)?;
    let conn = shared.conn(id).ok_or(NOT_FOUND_CONN)?;
    let owner = match who {
        Principal::Server(s) => conn.server == s,
        Principal::Client(c) => conn.client == c,
    };
    if !owner || conn.cancel.is_cancelled() {
        return Err(NOT_FOUND_CONN);
    }
    Ok(conn)
}

/// `POST /v1/servers/{server}/connections/{id}/accept`: the server takes the connection; the
/// answer's body is the client's bytes.
pub(crate) async fn accept(
    State(shared): State<Arc<Shared>>,
    Path((server, id)): Path<(String, String)>,
    req: Request,
) -> Result<Response> {
    let sidx = server_principal(&shared, &req, &server)?;
    let conn = owned_conn(&shared, &id, Principal::Server(sidx))?;
    let refused = req
        .headers()
        .get(ACCEPT_ERROR_HEADER)
        .is_some_and(|v| v.as_bytes() == ACCEPT_ERROR_REFUSED.as_bytes());
    let (tx, up_rx, attached_rx) = {
        let mut slots = conn.slots();
        let tx = slots.accept.take().ok_or(NOT_FOUND_CONN)?;
        slots.accepted = !refused;
        (tx, slots.up_rx.take(), slots.down_attached_rx.take())
    };
    if refused {
        // The connect handler answers 502 and its guard closes the connection.
        let _ = tx.send(AcceptOutcome::Refused);
        return Ok(plain(StatusCode::NO_CONTENT));
    }
    let (Some(up_rx), Some(attached_rx)) = (up_rx, attached_rx) else {
        return Err(NOT_FOUND_CONN);
    };
    if tx.send(AcceptOutcome::Accepted).is_err() {
        conn.cancel.cancel();
        return Err(ApiError(StatusCode::GONE, "the client has gone"));
    }
    conn.touch();
    let body = PipeBody::new(
        conn.clone(),
        attached_rx,
        up_rx,
        shared.config.heartbeat_interval,
    );
    Ok(streaming_response(body, None))
}

async fn upload(
    conn: Arc<Conn>,
    slots: (Option<oneshot::Sender<Upload>>, Option<oneshot::Sender<()>>),
    req: Request,
) -> Result<Response> {
    let (Some(tx), Some(attached)) = slots else {
        return Err(NOT_FOUND_CONN);
    };
    let (done_tx, done_rx) = oneshot::channel();
    if tx
        .send(Upload {
            body: req.into_body(),
            done: done_tx,
        })
        .is_err()
    {
        conn.cancel.cancel();
        return Err(ApiError(StatusCode::GONE, "connection closed"));
    }
    // Tell this endpoint (on its download) that its upload has arrived.
    let _ = attached.send(());
    // No answer before the body has ended: reverse proxies stop forwarding an upload once
    // they have seen the answer's headers.
    // Biased: when the connection finishes, the reaper cancels it right after this upload
    // completed; the completion must win, or a clean end would be answered as an abort.
    let r = tokio::select! {
        biased;
        r = done_rx => r.unwrap_or_else(|_| Err("connection closed".into())),
        () = conn.cancel.cancelled() => Err("connection closed".into()),
    };
    match r {
        Ok(()) => Ok(plain(StatusCode::OK)),
        Err(why) => {
            debug!(conn = %conn.id, reason = %why, "upload ended badly");
            conn.cancel.cancel();
            Err(ApiError(StatusCode::GONE, "connection closed"))
        }
    }
}

/// `POST /v1/servers/{server}/connections/{id}/downstream`: the server's bytes.
pub(crate) async fn downstream(
    State(shared): State<Arc<Shared>>,
    Path((server, id)): Path<(String, String)>,
    req: Request,
) -> Result<Response> {
    let sidx = server_principal(&shared, &req, &server)?;
    let conn = owned_conn(&shared, &id, Principal::Server(sidx))?;
    let tx = {
        let mut s = conn.slots();
        if !s.accepted {
            return Err(NOT_FOUND_CONN);
        }
        (s.down_tx.take(), s.down_attached.take())
    };
    upload(conn, tx, req).await
}

/// `POST /v1/servers/{server}/connections/{id}/upstream`: the client's bytes.
pub(crate) async fn upstream(
    State(shared): State<Arc<Shared>>,
    Path((server, id)): Path<(String, String)>,
    req: Request,
) -> Result<Response> {
    let cidx = match authenticate(&shared, &req)? {
        Principal::Client(i) => i,
        Principal::Server(_) => return Err(NOT_FOUND_CONN),
    };
    let conn = owned_conn(&shared, &id, Principal::Client(cidx))?;
    if shared.server_names[conn.server].as_str() != server {
        return Err(NOT_FOUND_CONN);
    }
    let tx = {
        let mut s = conn.slots();
        if !s.accepted {
            return Err(NOT_FOUND_CONN);
        }
        (s.up_tx.take(), s.up_attached.take())
    };
    upload(conn, tx, req).await
}
