//! The endpoint side of a channel (feature `endpoint`), shared by `ptth_server` and
//! `ptth_proxy`.
//!
//! A [`Channel`] is an endpoint's pair of long-lived requests to the relay under an ID it chose:
//! its **upload** (the request body of `upstream` or `downstream`, which carries the local
//! socket's bytes as frames) and its **download** (the answer to `connect` or `listen`, whose
//! frames go into the local socket). Idle, both carry heartbeats; a channel carries one
//! connection at a time ([`Channel::carry`]), and then the next.
//!
//! Half-close is kept: when the local peer shuts down its write side, an `END` frame is sent;
//! when an `END` frame arrives, the local socket's write side is shut down. Once both
//! directions have ended, the connection is over and the channel idle again. An abort anywhere
//! (a body error, a frame out of place, a local socket error, silence past the dead peer limit)
//! ends the connection as a failure, and the channel with it: the upload body is cancelled and
//! the local socket reset.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use parking_lot::{Mutex, MutexGuard};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::client::{self, BoxError, CallError, RelayClient, Response, channel_id};
use crate::frame::{self, Decoder, FrameError, Item};
use crate::mailbox::Mailbox;
use crate::metrics::ChannelMeters;
use crate::protocol::{CHANNEL_ID_HEADER, ChannelId, TUNNEL_CONTENT_TYPE};

/// The first read of a burst from the local socket: a small buffer, since most messages are
/// small. Each read that fills its buffer doubles the next one, up to [`MAX_READ`]; an idle
/// socket starts over.
const FIRST_READ: usize = 16 * 1024;
/// The largest read from the local socket: one data frame of the largest size.
const MAX_READ: usize = frame::MAX_FRAME_PAYLOAD;
/// Reads up to this size are copied into a frame of their own size, so that a queued small
/// frame does not hold a whole read buffer, and the buffer is reused.
const SMALL_READ: usize = 4 * 1024;
/// Shortest dead-peer limit, whatever our own heartbeat interval.
const MIN_DEAD_AFTER: Duration = Duration::from_secs(45);
/// How long the relay may take to confirm that it holds our upload (the `ATTACHED` frame),
/// counted from the download's answer headers. Over HTTP/1.1 the upload may need a new
/// connection (and TLS handshake) first; a healthy path confirms in milliseconds.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(7);
/// Upper bound on waiting for the answer headers of `connect` or `listen` (the relay answers
/// at once).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a channel being given up (refused or retired) may take to say so to the relay.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes a channel uploads before it is better retired once idle: its upload is one request
/// body for all its connections, and some fronts cap a request body's size (Cloudflare's free
/// plans at 100 MB).
const WORN_AFTER: u64 = 64 << 20;

/// What to check when uploads do not reach the relay.
const BUFFERING_ADVICE: &str = "a reverse proxy between here and the relay is holding \
the upload back (buffering request bodies), buffering answers, or at its limit of concurrent \
streams or connections. nginx: `proxy_request_buffering off; \
proxy_buffering off; proxy_http_version 1.1; client_max_body_size 0;`; HAProxy: remove \
`option http-buffer-request`; Caddy: remove `request_buffers`/`response_buffers` (see docs/deploy.md)";

/// What to check when streams break.
const TIMEOUT_ADVICE: &str = "if channels break after the same idle time, a reverse proxy's \
timeout is shorter than heartbeat_interval (nginx: proxy_read_timeout, proxy_send_timeout, \
client_body_timeout, send_timeout; HAProxy: timeout client/server; Caddy: remove transport read_timeout/write_timeout, which \
cut uploads the relay answers only at their end)";

/// Why a channel, or the connection it carried, ended other than cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The relay refused the channel (or could not be reached).
    #[error(transparent)]
    Refused(#[from] CallError),
    /// The connection could not be made, and why (the relay's or the server's reason).
    #[error("{0}")]
    Failed(String),
    /// The local TCP socket failed.
    #[error("local socket: {0}")]
    Local(std::io::Error),
    /// The HTTP stream from or to the relay failed.
    #[error("relay stream: {0} ({TIMEOUT_ADVICE})")]
    Remote(String),
    /// The relay sent bytes that are not valid frames, or a frame out of place.
    #[error("bad frame from relay: {0}")]
    Frame(#[from] FrameError),
    /// The download ended: the relay closed the channel.
    #[error("the relay closed the channel")]
    Closed,
    /// Nothing arrived, heartbeats included, for the dead-peer limit.
    #[error("no data or heartbeat from the relay for {0:?}; {TIMEOUT_ADVICE}")]
    Silent(Duration),
    /// The relay did not confirm our upload in time.
    #[error("the relay did not receive our upload within {0:?}: {BUFFERING_ADVICE}")]
    NotAttached(Duration),
    /// The download broke before the relay confirmed our upload.
    #[error(
        "the channel broke ({0}) before the relay confirmed our upload; if this repeats, {BUFFERING_ADVICE}"
    )]
    BrokeBeforeAttached(String),
    /// Shutdown.
    #[error("cancelled")]
    Cancelled,
}

impl ChannelError {
    /// Whether the user must act: something between us and the relay is in the way.
    pub fn is_front_problem(&self) -> bool {
        matches!(self, Self::NotAttached(_) | Self::BrokeBeforeAttached(_))
    }
}

/// A local socket whose connection is not carried yet. Dropped so, it is reset (RST): its peer
/// must see a connection that could not be carried as a failure, not as a service that closed
/// without a word. [`Channel::start`] takes it over.
#[derive(Debug)]
pub struct LocalSocket(Option<TcpStream>);

impl LocalSocket {
    /// Takes `stream` in charge, to be reset unless a channel takes it over.
    pub fn new(stream: TcpStream) -> Self {
        Self(Some(stream))
    }
}

impl Drop for LocalSocket {
    fn drop(&mut self) {
        if let Some(stream) = &self.0 {
            reset(stream);
        }
    }
}

/// A connection handed to a channel's upload ([`Channel::start`]), to be carried with
/// [`Channel::carry`].
#[derive(Debug)]
pub struct Started {
    stream: Arc<TcpStream>,
    local_failed: Arc<LocalFailed>,
}

/// Future of an HTTP answer.
type Answer = Pin<Box<dyn Future<Output = Result<Response, CallError>> + Send>>;

/// An endpoint's channel (see the module documentation).
pub struct Channel {
    id: ChannelId,
    download: Download,
    /// The upload request in flight; the relay answers it only once the channel has ended.
    upload: UploadRequest,
    /// What it shares with its upload body.
    link: Arc<UploadLink>,
    /// When it was opened, less a random part of `max_age` (see [`Channel::old_at`]).
    born: Instant,
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.link.cancel();
    }
}

/// What a channel and its upload body share.
#[derive(Debug)]
struct UploadLink {
    /// Tells the upload body what to do; closing it fails the body.
    commands: Mailbox<Command>,
    /// Told each time the upload body has sent `END`.
    ended: Notify,
    /// Bytes the upload body has sent in `DATA` frames so far.
    uploaded: AtomicU64,
    /// Where the channel's bytes are counted.
    meters: ChannelMeters,
}

impl UploadLink {
    /// Fails the upload body, whatever it is doing.
    fn cancel(&self) {
        self.commands.close();
    }
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Channel {
    /// Opens a channel under a fresh ID: its download request (a POST to `download_path`,
    /// `connect` or `listen`, with the ID in its header) and its upload (a POST to
    /// `upload_path(id)`, `upstream` or `downstream`) go out together as soon as the channel is
    /// polled ([`Channel::ready`] or [`Channel::carry`]). Heartbeats every `heartbeat` of
    /// silence; the relay is taken for dead after three heartbeat intervals (at least 45 s) of
    /// silence, since the heartbeats we receive come from the far endpoint, whose interval may
    /// be longer. Fails only if the random source does.
    pub fn open(
        relay: &RelayClient,
        download_path: &str,
        upload_path: impl FnOnce(ChannelId) -> String,
        heartbeat: Duration,
        meters: ChannelMeters,
    ) -> std::io::Result<Self> {
        let id = ChannelId::random()?;
        let id_header = HeaderValue::try_from(id.to_string()).map_err(std::io::Error::other)?;
        let download = relay.post(
            download_path,
            (HeaderName::from_static(CHANNEL_ID_HEADER), id_header),
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed(),
        );
        let link = Arc::new(UploadLink {
            commands: Mailbox::new(1),
            ended: Notify::new(),
            uploaded: AtomicU64::new(0),
            meters,
        });
        let body = UploadBody::new(link.clone(), heartbeat);
        let upload = relay.post(
            &upload_path(id),
            (CONTENT_TYPE, HeaderValue::from_static(TUNNEL_CONTENT_TYPE)),
            body.boxed(),
        );
        Ok(Self {
            id,
            download: Download::new(Box::pin(download), (heartbeat * 3).max(MIN_DEAD_AFTER)),
            upload: UploadRequest {
                answer: Some(Box::pin(upload)),
            },
            link,
            born: Instant::now(),
        })
    }

    /// When the channel is older than `max_age` (`channel_max_age`), less up to 25 % at
    /// random (drawn anew by each call: call it once per channel), so that channels opened
    /// together are not retired together: an idle channel is then retired, and its
    /// replacement goes wherever a load balancer in front of several relays sends it now
    /// (docs/scale-out.md).
    pub fn old_at(&self, max_age: Duration) -> Instant {
        self.born + client::jittered(max_age)
    }

    /// The channel's ID.
    pub fn id(&self) -> ChannelId {
        self.id
    }

    /// Whether the channel has uploaded enough bytes that it is better retired once idle
    /// (some fronts cap the size of a request body, which the upload is).
    pub fn worn(&self) -> bool {
        self.link.uploaded.load(Ordering::Relaxed) > WORN_AFTER
    }

    /// Waits for the relay's answer to the download request: the channel is then open (`Ok`),
    /// or refused.
    pub async fn ready(&mut self, shutdown: &CancellationToken) -> Result<(), ChannelError> {
        let Some(answer) = self.download.answer.as_mut() else {
            return Ok(());
        };
        let waiting = tokio::time::timeout(ANSWER_TIMEOUT, answer);
        tokio::pin!(waiting);
        // The upload may fail first (when the relay cannot be reached, both do): the answer,
        // or its failure, says more.
        let mut upload_failed = None;
        let answer = loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Err(ChannelError::Cancelled),
                r = &mut waiting => match r {
                    Ok(answer) => break answer,
                    Err(_) => return Err(CallError::Timeout(ANSWER_TIMEOUT).into()),
                },
                e = self.upload.ended() => upload_failed = Some(e),
            }
        };
        let answer = Box::pin(client::check(answer, &[StatusCode::OK])).await?;
        if channel_id(&answer) != Some(self.id) {
            return Err(CallError::Refused {
                status: answer.status(),
                reason: "the answer does not carry our channel id".to_owned(),
            }
            .into());
        }
        self.download.opened(answer);
        // Closed already: the download may say why.
        match upload_failed {
            Some(e) => Err(self.reason().await.unwrap_or(e)),
            None if self.upload.is_over() => {
                Err(self.reason().await.unwrap_or(ChannelError::Closed))
            }
            None => Ok(()),
        }
    }

    /// Waits while the channel is idle, until the relay gives it a connection (a server's
    /// channel: `OPEN` on the download). Errors when the channel breaks; a client's channel,
    /// whose connections start with its own `OPEN`, only ever gets errors here.
    pub async fn idle(&mut self, shutdown: &CancellationToken) -> Result<(), ChannelError> {
        self.ready(shutdown).await?;
        let next = tokio::select! {
            () = shutdown.cancelled() => Err(ChannelError::Cancelled),
            r = self.download.next() => r,
            e = self.upload.ended() => Err(e),
        };
        match next {
            Ok(Item::Open) => Ok(()),
            Ok(_) => Err(FrameError::Unexpected("a frame on an idle channel").into()),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Hands `socket` to the upload, which sends `OPEN` (with the socket's first bytes, if
    /// any) and then what the socket reads; [`Channel::carry`] then carries the connection.
    /// A client starts its connections so; a server answers the relay's `OPEN` so.
    pub fn start(&mut self, mut socket: LocalSocket) -> Option<Started> {
        let stream = Arc::new(socket.0.take()?);
        let local_failed = Arc::new(LocalFailed::default());
        let command = Command::Start(Arc::downgrade(&stream), local_failed.clone());
        if self.link.commands.send(command).is_err() {
            reset(&stream);
            return None;
        }
        Some(Started {
            stream,
            local_failed,
        })
    }

    /// Carries the connection `started` until both directions have ended: `Ok` leaves the
    /// channel idle, ready for another; an error ends it, and the local socket is reset. A
    /// client (`client`) first waits for the server's `OPEN`, or a `FAILED` with the reason
    /// the connection could not be made.
    pub async fn carry(
        &mut self,
        started: Started,
        client: bool,
        shutdown: &CancellationToken,
    ) -> Result<(), ChannelError> {
        // Boxed (the rare, large parts of this future are): a carried connection holds this
        // future for as long as it lasts.
        if self.download.answer.is_some()
            && let Err(e) = Box::pin(self.ready(shutdown)).await
        {
            reset(&started.stream);
            return Err(self.fail(e));
        }
        let Started {
            stream,
            local_failed,
        } = started;
        let download = &mut self.download;
        // The download's bytes go to the socket; the upload reads the socket on its own and
        // tells when it has sent the socket's end.
        let from_download = async {
            if client {
                match download.next().await? {
                    Item::Open => {}
                    Item::Failed(reason) => return Err(ChannelError::Failed(reason)),
                    _ => return Err(FrameError::Unexpected("data before OPEN").into()),
                }
            }
            loop {
                match download.next().await? {
                    Item::Data(d) => {
                        local_failed
                            .write_all(&stream, &d)
                            .await
                            .map_err(ChannelError::Local)?;
                        self.link.meters.downloaded.inc_by(d.len() as u64);
                    }
                    Item::End => {
                        shutdown_write(&stream).map_err(ChannelError::Local)?;
                        return Ok(());
                    }
                    _ => {
                        return Err(
                            FrameError::Unexpected("OPEN or FAILED inside a connection").into()
                        );
                    }
                }
            }
        };
        let upload_sent_end = async {
            self.link.ended.notified().await;
            Ok::<(), ChannelError>(())
        };
        let upload = self.upload.ended();
        let result = tokio::select! {
            r = async { tokio::try_join!(from_download, upload_sent_end) } => r.map(drop),
            e = upload => Err(e),
            e = local_error(&stream, &local_failed) => Err(ChannelError::Local(e)),
            () = shutdown.cancelled() => Err(ChannelError::Cancelled),
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                reset(&stream);
                let e = match e {
                    // The relay closes a channel's upload and download at once: a reason on
                    // the download says more than the upload's answer.
                    ChannelError::Remote(_) | ChannelError::Closed => {
                        Box::pin(self.reason()).await.unwrap_or(e)
                    }
                    e => e,
                };
                Err(self.fail(e))
            }
        }
    }

    /// The reason the relay gives on the download, if it gives one now (a `FAILED` frame
    /// already sent, say).
    async fn reason(&mut self) -> Option<ChannelError> {
        const GRACE: Duration = Duration::from_millis(500);
        match tokio::time::timeout(GRACE, self.download.next()).await {
            Ok(Ok(Item::Failed(reason))) => Some(ChannelError::Failed(reason)),
            _ => None,
        }
    }

    /// Refuses the connection the relay gave this server channel: `FAILED` with `reason`. The
    /// channel ends.
    pub async fn refuse(mut self, reason: &str) {
        if self
            .link
            .commands
            .send(Command::Refuse(reason.to_owned()))
            .is_ok()
        {
            let _ = tokio::time::timeout(GOODBYE_TIMEOUT, self.upload.ended()).await;
        }
        self.link.cancel();
    }

    /// Retires the idle channel: `END` on its upload; the relay ends the download, and then
    /// the upload ends too. Returns `true` if, instead, a connection comes for this server
    /// channel (the relay had given it one just before): serve it as after [`Channel::idle`].
    pub async fn retire(&mut self, shutdown: &CancellationToken) -> bool {
        if self.link.commands.send(Command::Retire).is_err() {
            self.link.cancel();
            return false;
        }
        let verdict = tokio::select! {
            () = shutdown.cancelled() => None,
            r = tokio::time::timeout(GOODBYE_TIMEOUT, self.download.next()) => r.ok(),
        };
        match verdict {
            Some(Ok(Item::Open)) => return true,
            // The download ended cleanly: retired. The upload ends too, and is answered.
            Some(Err(ChannelError::Closed)) if self.link.commands.send(Command::Finish).is_ok() => {
                let _ = tokio::time::timeout(GOODBYE_TIMEOUT, self.upload.ended()).await;
            }
            _ => {}
        }
        self.link.cancel();
        false
    }

    /// The channel breaks with `e`: its upload fails too.
    fn fail(&mut self, e: ChannelError) -> ChannelError {
        self.link.cancel();
        if !self.download.attached && !matches!(e, ChannelError::Cancelled) {
            return match e {
                ChannelError::Remote(why) => ChannelError::BrokeBeforeAttached(why),
                ChannelError::Closed => {
                    ChannelError::BrokeBeforeAttached("the relay ended the stream".to_owned())
                }
                other => other,
            };
        }
        e
    }
}

/// A channel's upload request in flight.
struct UploadRequest {
    /// Its answer to come; `None` once it has come.
    answer: Option<Answer>,
}

impl UploadRequest {
    /// Resolves when the relay has answered the upload, which it does only when the channel
    /// ends: the error to report. Cancel safe; never resolves again once it has.
    async fn ended(&mut self) -> ChannelError {
        let Some(answer) = self.answer.as_mut() else {
            return std::future::pending().await;
        };
        let answer = answer.await;
        self.answer = None;
        // Boxed: checked once, at the end, and this future is part of every channel's.
        match Box::pin(client::check(answer, &[StatusCode::OK])).await {
            Ok(_) => ChannelError::Closed,
            Err(e) => ChannelError::Remote(e.to_string()),
        }
    }

    /// Whether the relay has answered the upload.
    fn is_over(&self) -> bool {
        self.answer.is_none()
    }
}

/// A channel's download body, read frame by frame.
struct Download {
    /// The answer, until it has come.
    answer: Option<Answer>,
    body: Option<hyper::body::Incoming>,
    /// What is left of the last chunk.
    pending: Bytes,
    frames: Decoder,
    attached: bool,
    attach_deadline: Instant,
    /// When something last arrived.
    heard: Instant,
    /// One timer for the whole download, moved on lazily when it fires early: arming one per
    /// chunk would cost more than the chunk.
    silence: Pin<Box<Sleep>>,
    dead_after: Duration,
}

impl Download {
    fn new(answer: Answer, dead_after: Duration) -> Self {
        let now = Instant::now();
        Self {
            answer: Some(answer),
            body: None,
            pending: Bytes::new(),
            frames: Decoder::new(),
            attached: false,
            attach_deadline: now + ATTACH_TIMEOUT,
            heard: now,
            silence: Box::pin(tokio::time::sleep_until(now + ATTACH_TIMEOUT)),
            dead_after,
        }
    }

    /// The answer has come: its body is the download. `ATTACHED` is due within
    /// [`ATTACH_TIMEOUT`] from now.
    fn opened(&mut self, answer: Response) {
        let now = Instant::now();
        self.answer = None;
        self.body = Some(answer.into_body());
        self.heard = now;
        self.attach_deadline = now + ATTACH_TIMEOUT;
        self.silence
            .as_mut()
            .reset(self.attach_deadline.min(now + self.dead_after));
    }

    /// The next item that means something to the channel: `DATA`, `END`, `OPEN` or `FAILED`.
    /// Heartbeats and `ATTACHED` are taken care of here, and so are the deadlines.
    async fn next(&mut self) -> Result<Item, ChannelError> {
        loop {
            while let Some(item) = self.frames.decode(&mut self.pending)? {
                match item {
                    Item::Heartbeat => {}
                    Item::Attached if !self.attached => self.attached = true,
                    Item::Attached => return Err(FrameError::Unexpected("second ATTACHED").into()),
                    other => return Ok(other),
                }
            }
            let Some(body) = self.body.as_mut() else {
                return Err(ChannelError::Closed);
            };
            let next = tokio::select! {
                biased;
                f = body.frame() => Some(f),
                () = &mut self.silence => None,
            };
            let Some(next) = next else {
                let now = Instant::now();
                if !self.attached && now >= self.attach_deadline {
                    return Err(ChannelError::NotAttached(ATTACH_TIMEOUT));
                }
                if now >= self.heard + self.dead_after {
                    return Err(ChannelError::Silent(self.dead_after));
                }
                let until = if self.attached {
                    self.heard + self.dead_after
                } else {
                    self.attach_deadline.min(self.heard + self.dead_after)
                };
                self.silence.as_mut().reset(until);
                continue;
            };
            self.heard = Instant::now();
            match next {
                None => {
                    self.frames.finish()?;
                    return Err(ChannelError::Closed);
                }
                Some(Err(e)) => return Err(ChannelError::Remote(e.to_string())),
                Some(Ok(f)) => {
                    if let Ok(chunk) = f.into_data() {
                        self.pending = chunk;
                    }
                }
            }
        }
    }
}

/// Whether writing to the local socket has failed, kept in step with those writes.
///
/// A reset from the local peer is reported once, to whichever call sees it first; a read after
/// a write consumed it returns plain EOF. The upload side must not take that EOF for a
/// half-close, so writes hold this lock until their failure is recorded, and the upload side
/// checks it under the same lock when it reads EOF.
#[derive(Debug, Default)]
struct LocalFailed(Mutex<bool>);

impl LocalFailed {
    fn lock(&self) -> MutexGuard<'_, bool> {
        self.0.lock()
    }

    /// Whether a write to the local socket has failed.
    fn get(&self) -> bool {
        *self.lock()
    }

    /// One non-blocking write, recording a failure before anyone can read EOF after it.
    fn try_write(&self, stream: &TcpStream, data: &[u8]) -> std::io::Result<usize> {
        let mut failed = self.lock();
        let r = stream.try_write(data);
        if let Err(e) = &r
            && e.kind() != std::io::ErrorKind::WouldBlock
        {
            *failed = true;
        }
        r
    }

    /// Writes all of `data` to `stream`.
    async fn write_all(&self, stream: &TcpStream, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            stream.writable().await?;
            match self.try_write(stream, data) {
                Ok(0) => {
                    *self.lock() = true;
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// What the upload body is told to do.
#[derive(Debug)]
enum Command {
    /// Carry a connection: `OPEN`, then this socket's bytes. The socket is the connection's
    /// ([`Started`]): when the connection ends, it closes, whether or not the upload body is
    /// being polled then (HTTP flow control may keep it waiting for good).
    Start(Weak<TcpStream>, Arc<LocalFailed>),
    /// Refuse the connection given by the relay: `FAILED`, then end.
    Refuse(String),
    /// Retire the idle channel: `END` (the relay then ends the download).
    Retire,
    /// End the body, after the relay has ended the download of a retired channel.
    Finish,
}

/// What the upload body is doing.
enum UploadState {
    /// No connection: heartbeats, and commands.
    Idle,
    /// Carrying a connection.
    Open(Open),
    /// Its last frame is out: the body ends.
    Done,
}

/// The connection an upload carries.
struct Open {
    /// Its socket, held by the connection ([`Started`]).
    stream: Weak<TcpStream>,
    local_failed: Arc<LocalFailed>,
    /// `OPEN` has not been sent yet.
    announce: bool,
}

/// A channel's upload body: heartbeats while idle; for each connection, `OPEN`, then the local
/// socket's bytes as they come, then `END` at EOF. No bytes are copied: each read lands after a
/// reserved header and is split off as one frame. An idle body holds no buffer.
struct UploadBody {
    link: Arc<UploadLink>,
    state: UploadState,
    buf: BytesMut,
    /// How much the next read may take.
    read_size: usize,
    /// Fires at the earliest time a heartbeat may be due; moved on lazily (a timer is not
    /// re-armed for every frame).
    heartbeat: Pin<Box<Sleep>>,
    /// When the last frame was sent.
    sent_at: Instant,
    interval: Duration,
}

impl Drop for UploadBody {
    fn drop(&mut self) {
        // Gone: the channel's commands can no longer be carried out.
        self.link.commands.close_and_clear();
    }
}

impl std::fmt::Debug for UploadBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadBody").finish_non_exhaustive()
    }
}

impl UploadBody {
    /// The upload body of `link`'s channel, sending heartbeats every `interval` of silence.
    fn new(link: Arc<UploadLink>, interval: Duration) -> Self {
        // The first heartbeat goes out at once, so that the request's head does not wait for
        // the body's first bytes anywhere on the way.
        let now = Instant::now();
        Self {
            link,
            state: UploadState::Idle,
            buf: BytesMut::new(),
            read_size: FIRST_READ,
            heartbeat: Box::pin(tokio::time::sleep_until(now)),
            sent_at: now.checked_sub(interval).unwrap_or(now),
            interval,
        }
    }

    /// A frame leaves now: the next heartbeat is due an interval later.
    fn sent(&mut self) {
        self.sent_at = Instant::now();
    }

    /// Whether a heartbeat is due; if not, the timer is moved to when it will be.
    fn poll_heartbeat(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            ready!(self.heartbeat.as_mut().poll(cx));
            let due = self.sent_at + self.interval;
            if due <= Instant::now() {
                self.sent();
                self.heartbeat.as_mut().reset(self.sent_at + self.interval);
                return Poll::Ready(());
            }
            self.heartbeat.as_mut().reset(due);
        }
    }

    /// Reads the socket of the connection in progress into frames.
    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let UploadState::Open(mut open) = std::mem::replace(&mut self.state, UploadState::Done)
        else {
            return Poll::Pending;
        };
        match self.read(&mut open, cx) {
            Read::Frame(f) => {
                self.state = UploadState::Open(open);
                self.sent();
                Poll::Ready(Some(Ok(Frame::data(f))))
            }
            Read::End(f) => {
                // The connection's upload is over; the socket is its connection's again.
                self.state = UploadState::Idle;
                self.read_size = FIRST_READ;
                self.sent();
                self.link.ended.notify_one();
                Poll::Ready(Some(Ok(Frame::data(f))))
            }
            Read::Failed(e) => Poll::Ready(Some(Err(e))),
            Read::Pending => {
                self.state = UploadState::Open(open);
                Poll::Pending
            }
        }
    }

    /// What `open`'s socket has: `OPEN` and data frames, `END` at EOF, or a heartbeat when it
    /// has been quiet for an interval.
    fn read(&mut self, open: &mut Open, cx: &mut Context<'_>) -> Read {
        // `OPEN` goes out just before the connection's first bytes.
        let open_frame = frame::open();
        let prefix: &[u8] = if open.announce { &open_frame } else { &[] };
        let Some(stream) = open.stream.upgrade() else {
            return Read::Failed("the connection has ended".into());
        };
        loop {
            match stream.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Read::Failed(e.into()),
                Poll::Pending if open.announce => {
                    // Nothing to read yet: `OPEN` goes out alone.
                    open.announce = false;
                    return Read::Frame(frame::open());
                }
                Poll::Pending => break,
            }
            frame::begin_data_frame(&mut self.buf, prefix, self.read_size);
            let mut limited = bytes::BufMut::limit(&mut self.buf, self.read_size);
            match stream.try_read_buf(&mut limited) {
                Ok(0) => {
                    self.buf = BytesMut::new();
                    // After a reset, the write that saw it consumed the error and reads
                    // return EOF: that is an abort, not a half-close.
                    let failed = open.local_failed.get()
                        || matches!(stream.take_error(), Ok(Some(_)) | Err(_));
                    if failed {
                        return Read::Failed("local socket failed".into());
                    }
                    if !open.announce {
                        return Read::End(frame::end());
                    }
                    let mut both = BytesMut::with_capacity(2 * frame::HEADER_LEN);
                    both.extend_from_slice(&open_frame);
                    both.extend_from_slice(&frame::end());
                    return Read::End(both.freeze());
                }
                Ok(n) => {
                    open.announce = false;
                    self.link.uploaded.fetch_add(n as u64, Ordering::Relaxed);
                    self.link.meters.uploaded.inc_by(n as u64);
                    if n <= SMALL_READ {
                        // Copy a small read out and keep the buffer for the next one.
                        let mut small = BytesMut::with_capacity(self.buf.len());
                        small.extend_from_slice(&self.buf);
                        self.buf.clear();
                        return Read::Frame(frame::finish_data_frame(&mut small, prefix.len()));
                    }
                    if n == self.read_size {
                        self.read_size = (self.read_size * 2).min(MAX_READ);
                    }
                    return Read::Frame(frame::finish_data_frame(&mut self.buf, prefix.len()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.buf.clear();
                }
                Err(e) => return Read::Failed(e.into()),
            }
        }
        // Quiet: release the read buffer so that idle connections cost no buffer memory.
        if self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
        self.read_size = FIRST_READ;
        match self.poll_heartbeat(cx) {
            Poll::Ready(()) => Read::Frame(frame::heartbeat()),
            Poll::Pending => Read::Pending,
        }
    }
}

/// What one read of a connection's socket gives its upload.
enum Read {
    /// Frames to send.
    Frame(Bytes),
    /// Frames ending with `END`: the socket has reached EOF.
    End(Bytes),
    /// The socket failed.
    Failed(BoxError),
    /// Nothing yet.
    Pending,
}

impl Body for UploadBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if matches!(this.state, UploadState::Done) {
            return Poll::Ready(None);
        }
        // Commands come to an idle body only; a closed mailbox fails the body, whatever it does.
        let command = match this.link.commands.poll_recv(cx) {
            Poll::Ready(None) => {
                this.state = UploadState::Done;
                return Poll::Ready(Some(Err("channel cancelled".into())));
            }
            Poll::Ready(Some(command)) => Some(command),
            Poll::Pending => None,
        };
        if let UploadState::Open(_) = this.state {
            if command.is_some() {
                this.state = UploadState::Done;
                return Poll::Ready(Some(Err("a command while carrying a connection".into())));
            }
            return this.poll_open(cx);
        }
        match command {
            Some(Command::Start(stream, local_failed)) => {
                this.state = UploadState::Open(Open {
                    stream,
                    local_failed,
                    announce: true,
                });
                return this.poll_open(cx);
            }
            Some(Command::Refuse(reason)) => {
                this.state = UploadState::Done;
                return Poll::Ready(Some(Ok(Frame::data(frame::failed(&reason)))));
            }
            Some(Command::Retire) => {
                this.sent();
                return Poll::Ready(Some(Ok(Frame::data(frame::end()))));
            }
            Some(Command::Finish) => {
                this.state = UploadState::Done;
                return Poll::Ready(None);
            }
            None => {}
        }
        ready!(this.poll_heartbeat(cx));
        Poll::Ready(Some(Ok(Frame::data(frame::heartbeat()))))
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, UploadState::Done)
    }
}

/// Shuts down the write side of `stream` (TCP FIN), keeping the read side open.
fn shutdown_write(stream: &TcpStream) -> std::io::Result<()> {
    socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write)
}

/// Makes the close of `stream` a reset (RST) instead of a FIN, so that the local peer sees an
/// abort as an abort (a clean FIN would pass truncated data off as complete). The reset goes
/// out when the last handle to the socket is dropped; nothing may shut it down before that,
/// since `shutdown` would send a FIN.
fn reset(stream: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "cannot set SO_LINGER for a reset");
    }
}

/// Resolves when `stream` reports an error (a reset from the peer, say); pending otherwise.
///
/// The socket is watched for errors on its own, because neither direction may be looking at
/// it: an upload that waits for HTTP flow control is not polled, and an idle download only
/// touches the socket when data arrives. A reset from the local peer must still end the
/// connection at once.
///
/// Reading the error clears it, so that a read after it returns plain EOF: the failure is
/// recorded in `local_failed` under its lock first, as a failed write records it, so that the
/// upload never takes that EOF for a half-close.
async fn local_error(stream: &TcpStream, local_failed: &LocalFailed) -> std::io::Error {
    if let Err(e) = stream.ready(Interest::ERROR).await {
        return e;
    }
    let mut failed = local_failed.lock();
    *failed = true;
    match stream.take_error() {
        Ok(Some(e)) => e,
        // A read or write consumed the error first.
        Ok(None) => std::io::ErrorKind::ConnectionReset.into(),
        Err(e) => e,
    }
}
