//! The four endpoints, HTTP in and out (and the health check for load balancers): each
//! handler checks the caller (`access.rs`), asks the shared state (`state.rs`, `channel.rs`)
//! and turns the outcome into an answer. Errors are a status and a one-line reason; the answers
//! to `connect` and `listen` are channel downloads that stream a [`PipeBody`]; `upstream` and
//! `downstream` hand their body to `upload.rs`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use ptth_common::auth::{AuthError, RELAY_AUTHORITY, reason};
use ptth_common::config::Name;
use ptth_common::protocol::{
    CHANNEL_ID_HEADER, ChannelId, RELAY_ANSWER_HEADER, TUNNEL_CONTENT_TYPE,
};
use tracing::{info_span, warn};

use crate::access::{self, Denied, client_addr};
use crate::channel::{Channel, Side, TableRefusal};
use crate::pipe::PipeBody;
use crate::state::{ListenRefusal, OpenRefusal, PortRefusal, Shared};
use crate::upload::{self, UploadEnd};

/// An error answer: a status and a one-line reason in plain text.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    reason: &'static str,
    /// On a refused signature: the authority it was checked against, when that is the
    /// request's own (sent as `ptth-relay-authority`).
    relay_authority: Option<HeaderValue>,
    /// On a refused signature: its exact cause, for the operator only (never answered).
    auth_cause: Option<&'static str>,
}

impl ApiError {
    /// An answer of `status` with `reason`.
    const fn new(status: StatusCode, reason: &'static str) -> Self {
        Self {
            status,
            reason,
            relay_authority: None,
            auth_cause: None,
        }
    }
}

/// The reason of an error answer, and for a refused signature its exact cause, as an extension
/// of the response: what `lib.rs` counts and records for every refused request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Refused {
    /// The one-line reason answered.
    pub reason: &'static str,
    /// A refused signature's exact cause ([`AuthError::cause`]).
    pub auth_cause: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, format!("{}\n", self.reason)).into_response();
        r.extensions_mut().insert(Refused {
            reason: self.reason,
            auth_cause: self.auth_cause,
        });
        let h = r.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(RELAY_ANSWER_HEADER, HeaderValue::from_static("1"));
        if let Some(authority) = self.relay_authority {
            h.insert(RELAY_AUTHORITY, authority);
        }
        r
    }
}

type Result<T> = std::result::Result<T, ApiError>;

const NO_SUCH_CHANNEL: ApiError = ApiError::new(StatusCode::NOT_FOUND, "no such channel");
/// Why the relay takes no new channel or connection.
const SHUTTING_DOWN: ApiError = ApiError::new(
    StatusCode::SERVICE_UNAVAILABLE,
    ptth_common::protocol::DRAINING,
);
const CHANNEL_CLOSED: ApiError = ApiError::new(StatusCode::GONE, "channel closed");

impl From<Denied> for ApiError {
    fn from(d: Denied) -> Self {
        use StatusCode as S;
        match d {
            Denied::Auth {
                error,
                relay_authority,
            } => {
                let reason = match error {
                    AuthError::Busy => {
                        return ApiError {
                            auth_cause: Some(error.cause()),
                            ..ApiError::new(S::SERVICE_UNAVAILABLE, "relay busy, retry")
                        };
                    }
                    AuthError::Malformed(_) => reason::MALFORMED,
                    // One answer: a caller must not learn which keys are configured.
                    AuthError::UnknownKey(_)
                    | AuthError::BadSignature(_)
                    | AuthError::OtherAuthority(_) => reason::INVALID,
                    AuthError::Stale(_) => reason::STALE,
                    AuthError::Replay => reason::REPLAYED,
                };
                ApiError {
                    status: S::UNAUTHORIZED,
                    reason,
                    relay_authority,
                    auth_cause: Some(error.cause()),
                }
            }
            Denied::OtherServer => {
                ApiError::new(S::FORBIDDEN, "this key may not act as that server")
            }
            Denied::NotAServer => ApiError::new(S::FORBIDDEN, "clients may not do this"),
            Denied::NotAClient => ApiError::new(S::FORBIDDEN, "servers may not connect"),
            Denied::NotAllowed => {
                ApiError::new(S::FORBIDDEN, "not allowed to connect to this port")
            }
            Denied::NoSuchChannel => NO_SUCH_CHANNEL,
        }
    }
}

impl From<ListenRefusal> for ApiError {
    fn from(r: ListenRefusal) -> Self {
        match r {
            ListenRefusal::PortNames => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too many ports for this server",
            ),
            ListenRefusal::PortListens => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too many idle channels on this port",
            ),
            ListenRefusal::ServerListens => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too many idle channels for this server",
            ),
        }
    }
}

impl From<PortRefusal> for ApiError {
    fn from(r: PortRefusal) -> Self {
        ApiError::new(r.status(), r.reason())
    }
}

impl From<OpenRefusal> for ApiError {
    fn from(r: OpenRefusal) -> Self {
        match r {
            OpenRefusal::Table(r) => r.into(),
            OpenRefusal::Listen(r) => r.into(),
            OpenRefusal::Reloaded => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "relay reloaded its configuration, retry",
            ),
        }
    }
}

impl From<TableRefusal> for ApiError {
    fn from(r: TableRefusal) -> Self {
        use StatusCode as S;
        match r {
            TableRefusal::IdInUse => ApiError::new(S::CONFLICT, "channel id in use"),
            TableRefusal::RelayFull => {
                ApiError::new(S::SERVICE_UNAVAILABLE, "relay at channel limit")
            }
            TableRefusal::ClientFull => {
                ApiError::new(S::SERVICE_UNAVAILABLE, "too many channels for this client")
            }
        }
    }
}

/// A download answer: `body` streams, and reverse proxies are asked not to buffer or
/// transform it.
fn streaming_response(body: PipeBody, id: ChannelId) -> Response {
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
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        h.insert(CHANNEL_ID_HEADER, v);
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

/// A `{server}` or `{port}` segment of a path, checked before anything else: a name, or `400`
/// with `refusal`. (What is not a name is neither used nor logged.)
fn name(segment: String, refusal: &'static str) -> Result<Name> {
    Name::try_from(segment).map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, refusal))
}

const INVALID_SERVER: &str = "invalid server name";
const INVALID_PORT: &str = "invalid port name";

/// The channel ID a `connect` or `listen` request carries.
fn channel_id(req: &Request) -> Result<ChannelId> {
    req.headers()
        .get(CHANNEL_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<ChannelId>().ok())
        .ok_or(ApiError::new(
            StatusCode::BAD_REQUEST,
            "missing or malformed channel id",
        ))
}

/// `listen` and `connect` take no body: one that has data is refused (413) at once if its
/// length says so, else as soon as data comes; one of unknown length must end within
/// `http_idle_timeout`. Nothing of it is kept.
async fn expect_no_body(shared: &Shared, req: &mut Request) -> Result<()> {
    const TAKES_NO_BODY: ApiError =
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "this request takes no body");
    let body = req.body_mut();
    if body.is_end_stream() {
        return Ok(());
    }
    if body.size_hint().lower() > 0 {
        return Err(TAKES_NO_BODY);
    }
    // Chunked, or HTTP/2 without END_STREAM on its headers: it must end, empty.
    let deadline = tokio::time::Instant::now() + shared.config.http_idle_timeout;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(None) => return Ok(()),
            Ok(Some(Ok(frame))) if frame.data_ref().is_none_or(|d| d.is_empty()) => {}
            Ok(Some(_)) | Err(_) => return Err(TAKES_NO_BODY),
        }
    }
}

/// `GET /v1/health` (and `HEAD`, which axum answers from it): for a load balancer in front of
/// several relays. `200` `ok` while the relay takes new channels, `503` `draining` once it
/// drains or shuts down, so that the balancer sends new channels elsewhere. Unauthenticated,
/// it says nothing else, and is no refusal (not counted, audited or listed).
pub(crate) async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let (status, body) = if shared.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        (StatusCode::OK, "ok\n")
    };
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(RELAY_ANSWER_HEADER, HeaderValue::from_static("1"));
    r
}

/// `POST /v1/servers/{server}/ports/{port}/listen`: a server's channel for connections to
/// `port`. Answered at once; the body is its download.
pub(crate) async fn listen(
    State(shared): State<Arc<Shared>>,
    Path((server, port)): Path<(String, String)>,
    mut req: Request,
) -> Result<Response> {
    let (server, port) = (name(server, INVALID_SERVER)?, name(port, INVALID_PORT)?);
    let dir = shared.directory();
    let server = access::server(&shared, &dir, &req, &server)?;
    let id = channel_id(&req)?;
    expect_no_body(&shared, &mut req).await?;
    if shared.is_draining() {
        return Err(SHUTTING_DOWN);
    }
    let channel = Channel::opened_from(
        id,
        Side::Server,
        server,
        port,
        shared.shutdown.child_token(),
        client_addr(&shared, &req),
    );
    let span = info_span!("channel", channel = %id, server = %dir.server_names[server], port = %channel.port);
    shared.open_channel(&channel, dir.generation, span)?;
    let body = PipeBody::new(channel, &shared);
    Ok(streaming_response(body, id))
}

/// `POST /v1/servers/{server}/ports/{port}/connect`: a client's channel for connections to a
/// server's `port`. Answered at once; the body is its download.
pub(crate) async fn connect(
    State(shared): State<Arc<Shared>>,
    Path((server, port)): Path<(String, String)>,
    mut req: Request,
) -> Result<Response> {
    let (server, port) = (name(server, INVALID_SERVER)?, name(port, INVALID_PORT)?);
    let dir = shared.directory();
    let client = access::connecting_client(&shared, &dir, &req, &server, &port)?;
    let Some(server_index) = dir.server(server.as_str()) else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "unknown server"));
    };
    let id = channel_id(&req)?;
    expect_no_body(&shared, &mut req).await?;
    if shared.is_draining() {
        return Err(SHUTTING_DOWN);
    }
    shared.port_status(server_index, &port)?;
    let channel = Channel::opened_from(
        id,
        Side::Client(client),
        server_index,
        port,
        shared.shutdown.child_token(),
        client_addr(&shared, &req),
    );
    let client_ip = channel.peer.map(|a| a.to_string()).unwrap_or_default();
    let span = info_span!("channel", channel = %id, client = %dir.client_names[client], %client_ip, %server, port = %channel.port);
    if let Err(refusal) = shared.open_channel(&channel, dir.generation, span) {
        let refusal = ApiError::from(refusal);
        if let Some(left_out) = shared.refusal_logs.connect.admit() {
            warn!(channel = %id, left_out, "{}", refusal.reason);
        }
        return Err(refusal);
    }
    let body = PipeBody::new(channel, &shared);
    Ok(streaming_response(body, id))
}

/// `POST /v1/servers/{server}/channels/{id}/downstream`: the upload of a server's channel,
/// which may come before its `listen` has reached the relay.
pub(crate) async fn downstream(
    State(shared): State<Arc<Shared>>,
    Path((server, id)): Path<(String, String)>,
    req: Request,
) -> Result<Response> {
    let dir = shared.directory();
    let server = access::server(&shared, &dir, &req, &name(server, INVALID_SERVER)?)?;
    let id = access::channel_id(&id)?;
    let found = shared
        .channels
        .find_or_wait(id, shared.config.accept_timeout)
        .await;
    let channel = access::servers_channel(found, server)?;
    upload(shared, channel, req).await
}

/// `POST /v1/servers/{server}/channels/{id}/upstream`: the upload of a client's channel,
/// which may come before its `connect` has reached the relay.
pub(crate) async fn upstream(
    State(shared): State<Arc<Shared>>,
    Path((server, id)): Path<(String, String)>,
    req: Request,
) -> Result<Response> {
    let server = name(server, INVALID_SERVER)?;
    let dir = shared.directory();
    let (client, id) = access::client_of(&shared, &dir, &req, &id)?;
    let found = shared
        .channels
        .find_or_wait(id, shared.config.accept_timeout)
        .await;
    let channel = access::clients_channel(&dir, found, client, server.as_str())?;
    upload(shared, channel, req).await
}

/// Reads the upload of `channel` for as long as the channel lives. No answer before the body
/// has ended: reverse proxies stop forwarding an upload once they have seen the answer's
/// headers.
async fn upload(shared: Arc<Shared>, channel: Arc<Channel>, req: Request) -> Result<Response> {
    if !channel.take_upload() {
        return Err(NO_SUCH_CHANNEL);
    }
    match upload::run(shared, channel, req.into_body()).await {
        UploadEnd::Retired => Ok(plain(StatusCode::OK)),
        UploadEnd::Closed => {
            // The end of an upload the relay took (its tunnel failed or was aborted), not a
            // refusal: not counted, audited or listed as one.
            let mut r = CHANNEL_CLOSED.into_response();
            r.extensions_mut().remove::<Refused>();
            Ok(r)
        }
    }
}
