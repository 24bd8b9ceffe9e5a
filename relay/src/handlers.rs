//! The five endpoints, HTTP in and out: each handler checks the caller (`access.rs`), asks the
//! shared state (`state.rs`, `conn.rs`) and turns the outcome into an answer. Errors are a
//! status and a one-line reason; downloads (the answers to `listen` and `connect`) stream a
//! [`PipeBody`].

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use ptth_common::auth::AuthError;
use ptth_common::protocol::{
    CONNECTION_ID_HEADER, ConnId, RELAY_ANSWER_HEADER, TUNNEL_CONTENT_TYPE, valid_name,
};
use tokio::sync::oneshot;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::access::{self, Denied, client_addr};
use crate::conn::{AcceptOutcome, Conn, TableRefusal, Upload, UploadSlot};
use crate::pipe::PipeBody;
use crate::state::{ListenRefusal, ListenStart, OfferRefusal, Shared};

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

const NO_SUCH_CONNECTION: ApiError = ApiError(StatusCode::NOT_FOUND, "no such connection");
const SHUTTING_DOWN: ApiError = ApiError(StatusCode::SERVICE_UNAVAILABLE, "relay shutting down");
const CONNECTION_CLOSED: ApiError = ApiError(StatusCode::GONE, "connection closed");

impl From<Denied> for ApiError {
    fn from(d: Denied) -> Self {
        use StatusCode as S;
        match d {
            Denied::Auth(AuthError::Busy) => ApiError(S::SERVICE_UNAVAILABLE, "relay busy, retry"),
            Denied::Auth(AuthError::Stale) => ApiError(
                S::UNAUTHORIZED,
                "signature expired or not yet valid: check the clocks",
            ),
            Denied::Auth(AuthError::Replay) => ApiError(S::UNAUTHORIZED, "replayed request"),
            Denied::Auth(AuthError::Malformed(_)) => {
                ApiError(S::UNAUTHORIZED, "missing or malformed signature")
            }
            Denied::Auth(AuthError::BadSignature) => ApiError(S::UNAUTHORIZED, "invalid signature"),
            Denied::OtherServer => ApiError(S::FORBIDDEN, "this key may not act as that server"),
            Denied::NotAServer => ApiError(S::FORBIDDEN, "clients may not do this"),
            Denied::NotAClient => ApiError(S::FORBIDDEN, "servers may not connect"),
            Denied::NotAllowed => ApiError(S::FORBIDDEN, "not allowed to connect to this port"),
            Denied::NoSuchConnection => NO_SUCH_CONNECTION,
        }
    }
}

impl From<ListenRefusal> for ApiError {
    fn from(r: ListenRefusal) -> Self {
        match r {
            ListenRefusal::TooManyPorts => ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                "too many ports for this server",
            ),
            ListenRefusal::TooManyListens => {
                ApiError(StatusCode::TOO_MANY_REQUESTS, "too many listens waiting")
            }
        }
    }
}

impl From<OfferRefusal> for ApiError {
    fn from(r: OfferRefusal) -> Self {
        use StatusCode as S;
        match r {
            OfferRefusal::ServerOffline => ApiError(S::SERVICE_UNAVAILABLE, "server offline"),
            OfferRefusal::PortNotOffered => {
                ApiError(S::NOT_FOUND, "server does not offer this port")
            }
            OfferRefusal::Table(TableRefusal::IdInUse) => {
                ApiError(S::CONFLICT, "connection id in use")
            }
            OfferRefusal::Table(TableRefusal::RelayFull) => {
                ApiError(S::SERVICE_UNAVAILABLE, "relay at connection limit")
            }
            OfferRefusal::Table(TableRefusal::ClientFull) => ApiError(
                S::SERVICE_UNAVAILABLE,
                "too many connections for this client",
            ),
            OfferRefusal::QueueFull => {
                ApiError(S::SERVICE_UNAVAILABLE, "too many pending connections")
            }
        }
    }
}

/// A download answer: `body` streams, and reverse proxies are asked not to buffer or
/// transform it.
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

/// An empty answer marked as the relay's own.
fn plain(status: StatusCode) -> Response {
    let mut r = status.into_response();
    r.headers_mut()
        .insert(RELAY_ANSWER_HEADER, HeaderValue::from_static("1"));
    r
}

/// `POST /v1/servers/{server}/ports/{port}/listen`: long-poll for the next client. The answer
/// is `204` when none came in time; otherwise it hands over the connection and streams its
/// upstream.
pub(crate) async fn listen(
    State(shared): State<Arc<Shared>>,
    Path((server, port)): Path<(String, String)>,
    req: Request,
) -> Result<Response> {
    let server = access::server(&shared, &req, &server)?;
    if !valid_name(&port) {
        return Err(ApiError(StatusCode::BAD_REQUEST, "invalid port name"));
    }
    if shared.shutdown.is_cancelled() {
        return Err(SHUTTING_DOWN);
    }
    let id = match shared.listen(server, &port)? {
        ListenStart::Handed(id) => {
            debug!(conn = %id, "handing queued connection to listen");
            Some(id)
        }
        ListenStart::Waiting(pending) => pending.wait().await.map_err(|_| SHUTTING_DOWN)?,
    };
    // A connection that ended meanwhile leaves nothing to hand out.
    let handed = id
        .and_then(|id| shared.conns.get(id))
        .filter(|c| !c.cancel.is_cancelled())
        .and_then(|c| c.take_listen_download().map(|d| (c, d)));
    let Some((conn, download)) = handed else {
        let mut r = plain(StatusCode::NO_CONTENT);
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return Ok(r);
    };
    conn.touch();
    let id = conn.id;
    let body = PipeBody::new(conn, download, shared.config.heartbeat_interval);
    Ok(streaming_response(body, Some(id)))
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

/// `POST /v1/servers/{server}/ports/{port}/connect`: open a connection, with the ID the client
/// chose, to a server's port; answered once the server has reached its target, with the
/// downstream.
pub(crate) async fn connect(
    State(shared): State<Arc<Shared>>,
    Path((server, port)): Path<(String, String)>,
    req: Request,
) -> Result<Response> {
    let client = access::connecting_client(&shared, &req, &server, &port)?;
    let Some(server_index) = shared.server(&server) else {
        return Err(ApiError(StatusCode::NOT_FOUND, "unknown server"));
    };
    let id = req
        .headers()
        .get(CONNECTION_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<ConnId>().ok())
        .ok_or(ApiError(
            StatusCode::BAD_REQUEST,
            "missing or malformed connection id",
        ))?;
    if shared.shutdown.is_cancelled() {
        return Err(SHUTTING_DOWN);
    }
    let client_ip = client_addr(&shared, &req)
        .map(|a| a.to_string())
        .unwrap_or_default();
    let client_name = &shared.client_names[client];
    let span = info_span!("conn", conn = %id, client = %client_name, %client_ip, %server, %port);
    open(shared.clone(), server_index, client, port, id)
        .instrument(span)
        .await
}

/// Offers a new connection to the server and answers `connect` with the server's answer.
async fn open(
    shared: Arc<Shared>,
    server: usize,
    client: usize,
    port: String,
    id: ConnId,
) -> Result<Response> {
    let (conn, side) = Conn::new(id, server, client, shared.shutdown.child_token());
    if let Err(refusal) = shared.offer(&conn, &port) {
        match refusal {
            OfferRefusal::ServerOffline => info!("server offline"),
            OfferRefusal::PortNotOffered => info!("server does not offer this port"),
            OfferRefusal::Table(_) | OfferRefusal::QueueFull => {
                warn!("{}", ApiError::from(refusal).1)
            }
        }
        return Err(refusal.into());
    }
    shared
        .conns
        .spawn_reaper(conn.clone(), shared.config.idle_timeout, &shared.tasks);
    let mut guard = CancelOnDrop(Some(conn.clone()));
    debug!("offered to server");
    let outcome = tokio::select! {
        biased;
        r = side.accepted => r.ok(),
        () = tokio::time::sleep(shared.config.accept_timeout) => None,
        () = conn.cancel.cancelled() => None,
    };
    match outcome {
        Some(AcceptOutcome::Accepted) => {
            guard.0 = None;
            info!("connection open");
            let body = PipeBody::new(conn, side.download, shared.config.heartbeat_interval);
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
        // Without its upstream, the likely cause is in front of the client, not the server.
        None if !conn.upstream_arrived() => {
            warn!("neither the client's upstream nor the server's downstream arrived in time");
            Err(ApiError(
                StatusCode::GATEWAY_TIMEOUT,
                "your upstream did not reach the relay: a reverse proxy on the way holds request \
                 bodies back (nginx: proxy_request_buffering off)",
            ))
        }
        None => {
            info!("server did not accept in time");
            Err(ApiError(
                StatusCode::GATEWAY_TIMEOUT,
                "the server did not take the connection in time",
            ))
        }
    }
}

/// `POST /v1/servers/{server}/connections/{id}/refuse`: the server cannot serve a connection
/// it was given (its target refused, or it is at its `max_connections`); the client's `connect`
/// gets `502`.
pub(crate) async fn refuse(
    State(shared): State<Arc<Shared>>,
    Path((server, id)): Path<(String, String)>,
    req: Request,
) -> Result<Response> {
    let conn = access::servers_connection(&shared, &req, &server, &id)?;
    let answer = conn.take_refusal().ok_or(NO_SUCH_CONNECTION)?;
    // The connect handler answers 502 and its guard closes the connection; if it has gone
    // already, the connection is closed as well.
    let _ = answer.send(AcceptOutcome::Refused);
    Ok(plain(StatusCode::NO_CONTENT))
}

/// `POST /v1/servers/{server}/connections/{id}/downstream`: the service's bytes. Its arrival
/// is the server's acceptance: the client's `connect` is answered now, and its body streams
/// this upload.
pub(crate) async fn downstream(
    State(shared): State<Arc<Shared>>,
    Path((server, id)): Path<(String, String)>,
    req: Request,
) -> Result<Response> {
    let conn = access::servers_connection(&shared, &req, &server, &id)?;
    let (slot, answer) = conn.take_downstream().ok_or(NO_SUCH_CONNECTION)?;
    if answer.send(AcceptOutcome::Accepted).is_err() {
        conn.cancel.cancel();
        return Err(ApiError(StatusCode::GONE, "the client has gone"));
    }
    upload(conn, slot, req).await
}

/// `POST /v1/servers/{server}/connections/{id}/upstream`: the client's bytes, which may come
/// before the `connect` they go with has reached the relay.
pub(crate) async fn upstream(
    State(shared): State<Arc<Shared>>,
    Path((server, id)): Path<(String, String)>,
    req: Request,
) -> Result<Response> {
    let (client, id) = access::client_of(&shared, &req, &id)?;
    let wait = shared.config.accept_timeout;
    let found = shared.conns.find_or_wait(id, wait).await;
    let conn = access::clients_connection(&shared, found, client, &server)?;
    let slot = conn.take_upstream().ok_or(NO_SUCH_CONNECTION)?;
    upload(conn, slot, req).await
}

/// Hands the request body of an upload to the download that carries it on, and answers once
/// that body has ended.
async fn upload(conn: Arc<Conn>, slot: UploadSlot, req: Request) -> Result<Response> {
    let (done_tx, done_rx) = oneshot::channel();
    let handed = slot.body.send(Upload {
        body: req.into_body(),
        done: done_tx,
    });
    if handed.is_err() {
        conn.cancel.cancel();
        return Err(CONNECTION_CLOSED);
    }
    // Tell this endpoint (on its download) that its upload has arrived.
    let _ = slot.attached.send(());
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
            Err(CONNECTION_CLOSED)
        }
    }
}
