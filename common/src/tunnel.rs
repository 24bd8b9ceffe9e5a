//! The endpoint side of a tunnel (feature `endpoint`), shared by `ptth_server` and
//! `ptth_proxy`: [`carry`] joins a local TCP socket to the relay with an upload (TCP bytes into
//! frames, the request body of `upstream` or `downstream`) and a download (frames into TCP
//! bytes, the answer body of `connect` or `listen`). Both directions of the tunnel end live
//! here.
//!
//! Half-close is kept: when the local peer shuts down its write side, an `END` frame is sent and
//! the upload ends; when an `END` frame arrives, the local socket's write side is shut down. An
//! abort anywhere (a body error, a missing `END`, a local socket error, silence past the dead
//! peer limit) ends the tunnel as a failure: the upload body is cancelled and the local socket
//! reset.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use parking_lot::{Mutex, MutexGuard};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::client::{self, RelayClient, Signed};
use crate::frame::{self, Decoder, FrameError, Item};
use crate::protocol::TUNNEL_CONTENT_TYPE;

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

/// What to check when uploads do not reach the relay.
const BUFFERING_ADVICE: &str = "a reverse proxy between here and the relay is holding \
the upload back (buffering request bodies), buffering answers, or at its limit of concurrent \
streams or connections. nginx: `proxy_request_buffering off; \
proxy_buffering off; proxy_http_version 1.1; client_max_body_size 0;`; HAProxy: remove \
`option http-buffer-request`; Caddy: remove `request_buffers`/`response_buffers` (see docs/deploy.md)";

/// What to check when streams break.
const TIMEOUT_ADVICE: &str = "if tunnels break after the same idle time, a reverse proxy's \
timeout is shorter than heartbeat_interval (nginx: proxy_read_timeout, proxy_send_timeout, \
client_body_timeout, send_timeout; HAProxy: timeout client/server; Caddy: remove transport read_timeout/write_timeout, which \
cut uploads the relay answers only at their end)";

/// Why a tunnel ended other than cleanly.
#[derive(Debug, thiserror::Error)]
enum TunnelError {
    /// The local TCP socket failed.
    #[error("local socket: {0}")]
    Local(std::io::Error),
    /// The HTTP stream from or to the relay failed.
    #[error("relay stream: {0} ({TIMEOUT_ADVICE})")]
    Remote(String),
    /// The peer sent bytes that are not valid frames.
    #[error("bad frame from relay: {0}")]
    Frame(#[from] FrameError),
    /// The download body ended without an `END` frame: the far side aborted.
    #[error("the far side aborted the connection")]
    Aborted,
    /// Nothing arrived, heartbeats included, for the dead-peer limit.
    #[error("no data or heartbeat from the relay for {0:?}; {TIMEOUT_ADVICE}")]
    Silent(Duration),
    /// The relay did not confirm our upload in time.
    #[error("the relay did not receive our upload within {0:?}: {BUFFERING_ADVICE}")]
    NotAttached(Duration),
    /// The download broke before the relay confirmed our upload.
    #[error(
        "the tunnel broke ({0}) before the relay confirmed our upload; if this repeats, {BUFFERING_ADVICE}"
    )]
    BrokeBeforeAttached(String),
    /// The tunnel was cancelled (shutdown, or the other direction failed).
    #[error("cancelled")]
    Cancelled,
    /// The download could not be opened; the caller has said why.
    #[error("not opened")]
    NotOpened,
}

/// A local socket whose tunnel is not open yet. Dropped so, it is reset (RST): its peer must
/// see a connection that could not be carried as a failure, not as a service that closed
/// without a word. [`carry`] takes it over.
#[derive(Debug)]
pub struct LocalSocket(Option<TcpStream>);

impl LocalSocket {
    /// Takes `stream` in charge, to be reset unless [`carry`] takes it over.
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

/// Carries a tunnel until both directions end: the local socket's bytes are sent at once as
/// the streaming body of `upload` (a POST to `upstream` or `downstream`), and the frames of
/// the `download` (the answer to `connect` or `listen`, when `download` resolves; `None` if it
/// could not be had, which the caller reports) go into the socket. The upload does not wait
/// for the download: the client's first bytes travel while its `connect` is answered.
/// Dead-peer limit: three heartbeat intervals (at least 45 s) without anything from the relay:
/// the heartbeats we receive come from the far endpoint, whose interval may be longer. Logs how
/// the tunnel ended. A clean end closes the socket with a FIN, an abort resets it.
pub async fn carry<D>(
    relay: &RelayClient,
    upload: Signed,
    download: D,
    mut socket: LocalSocket,
    heartbeat: Duration,
    shutdown: &CancellationToken,
) where
    D: Future<Output = Option<reqwest::Response>>,
{
    let Some(stream) = socket.0.take() else {
        return;
    };
    let stream = Arc::new(stream);
    let cancel = CancellationToken::new();
    let local_failed = Arc::new(LocalFailed::default());
    let body = UploadBody::new(
        stream.clone(),
        local_failed.clone(),
        heartbeat,
        cancel.clone(),
    );
    // Whether the download has opened (`None` until it is known): an upload that fails before
    // then most likely failed because the download was refused, and the refusal is the reason
    // the caller reports.
    let (opened_tx, mut opened) = tokio::sync::watch::channel(None);
    let upload = async {
        let answer = relay
            .post_signed(upload)
            .header(reqwest::header::CONTENT_TYPE, TUNNEL_CONTENT_TYPE)
            .body(reqwest::Body::wrap(body))
            .send()
            .await;
        let checked = client::check(answer, &[reqwest::StatusCode::OK]).await;
        if let Err(e) = checked {
            let opened = opened.wait_for(Option::is_some).await.ok().and_then(|o| *o);
            return Err(match opened {
                Some(false) => TunnelError::NotOpened,
                _ => TunnelError::Remote(e.to_string()),
            });
        }
        Ok(())
    };
    let download = async {
        let answer = download.await;
        opened_tx.send_replace(Some(answer.is_some()));
        let answer = answer.ok_or(TunnelError::NotOpened)?;
        pump_download(
            http::Response::from(answer).into_body(),
            &stream,
            &local_failed,
            ATTACH_TIMEOUT,
            (heartbeat * 3).max(MIN_DEAD_AFTER),
        )
        .await
    };
    let (upload, download) = (std::pin::pin!(upload), std::pin::pin!(download));
    let ended = run(&stream, &local_failed, upload, download, &cancel, shutdown).await;
    match ended {
        Ok(()) => tracing::debug!("tunnel closed"),
        Err(TunnelError::Cancelled) => tracing::debug!("tunnel closed by shutdown"),
        Err(TunnelError::NotOpened) => tracing::debug!("tunnel not opened"),
        // Something between us and the relay is in the way: the user must act.
        Err(e @ (TunnelError::NotAttached(_) | TunnelError::BrokeBeforeAttached(_))) => {
            tracing::warn!(error = %e, "tunnel aborted")
        }
        Err(e) => tracing::info!(error = %e, "tunnel aborted"),
    }
}

/// Error type of [`UploadBody`].
type BoxError = Box<dyn std::error::Error + Send + Sync>;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UploadState {
    Open,
    EndSent,
    Done,
}

/// An upload body that reads the local socket and yields frames: data as it comes, a heartbeat
/// after `interval` of silence, `END` at EOF. No bytes are copied: each read lands after a
/// reserved header and is split off as one frame. An idle body holds no buffer.
struct UploadBody {
    stream: Arc<TcpStream>,
    local_failed: Arc<LocalFailed>,
    buf: BytesMut,
    /// How much the next read may take.
    read_size: usize,
    /// Fires at the earliest time a heartbeat may be due; moved on lazily (a timer is not
    /// re-armed for every frame).
    heartbeat: Pin<Box<Sleep>>,
    /// When the last frame was sent.
    sent_at: Instant,
    interval: Duration,
    state: UploadState,
    cancel: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl std::fmt::Debug for UploadBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadBody")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl UploadBody {
    /// A body reading `stream`, sending heartbeats every `interval` of silence, failing once
    /// `cancel` fires.
    ///
    /// `local_failed` is set by the download side when writing to the socket failed: a read
    /// that then returns EOF is the aftermath of a reset, not a half-close, and must not be
    /// sent on as `END`.
    fn new(
        stream: Arc<TcpStream>,
        local_failed: Arc<LocalFailed>,
        interval: Duration,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            stream,
            local_failed,
            buf: BytesMut::new(),
            read_size: FIRST_READ,
            heartbeat: Box::pin(tokio::time::sleep(interval)),
            sent_at: Instant::now(),
            interval,
            state: UploadState::Open,
            cancel: Box::pin(cancel.cancelled_owned()),
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
}

impl Body for UploadBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.cancel.as_mut().poll(cx).is_ready() {
            this.state = UploadState::Done;
            return Poll::Ready(Some(Err("tunnel cancelled".into())));
        }
        match this.state {
            UploadState::Open => {}
            UploadState::EndSent | UploadState::Done => {
                this.state = UploadState::Done;
                return Poll::Ready(None);
            }
        }
        loop {
            match this.stream.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Pending => break,
            }
            frame::begin_data_frame(&mut this.buf, this.read_size);
            let mut limited = bytes::BufMut::limit(&mut this.buf, this.read_size);
            match this.stream.try_read_buf(&mut limited) {
                Ok(0) => {
                    this.buf = BytesMut::new();
                    // After a reset, the write that saw it consumed the error and reads
                    // return EOF: that is an abort, not a half-close.
                    let failed = this.local_failed.get()
                        || matches!(this.stream.take_error(), Ok(Some(_)) | Err(_));
                    if failed {
                        this.state = UploadState::Done;
                        return Poll::Ready(Some(Err("local socket failed".into())));
                    }
                    this.state = UploadState::EndSent;
                    return Poll::Ready(Some(Ok(Frame::data(frame::end()))));
                }
                Ok(n) if n <= SMALL_READ => {
                    // Copy a small read out and keep the buffer for the next one.
                    let mut small = BytesMut::with_capacity(this.buf.len());
                    small.extend_from_slice(&this.buf);
                    this.buf.clear();
                    let f = frame::finish_data_frame(&mut small);
                    this.sent();
                    return Poll::Ready(Some(Ok(Frame::data(f))));
                }
                Ok(n) => {
                    if n == this.read_size {
                        this.read_size = (this.read_size * 2).min(MAX_READ);
                    }
                    let f = frame::finish_data_frame(&mut this.buf);
                    this.sent();
                    return Poll::Ready(Some(Ok(Frame::data(f))));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    this.buf.clear();
                }
                Err(e) => {
                    this.state = UploadState::Done;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
        // Idle: release the read buffer so that idle tunnels cost no buffer memory.
        if this.buf.capacity() > 0 {
            this.buf = BytesMut::new();
        }
        this.read_size = FIRST_READ;
        ready!(this.poll_heartbeat(cx));
        Poll::Ready(Some(Ok(Frame::data(frame::heartbeat()))))
    }

    fn is_end_stream(&self) -> bool {
        self.state == UploadState::Done
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

/// Copies a download body of frames into `stream`. `ATTACHED` must come once, within
/// `attach_timeout` (data may come before it); the body ends `Ok` after an `END` frame and the
/// end of the body, and fails on anything else. `dead_after` bounds the silence between two
/// chunks.
async fn pump_download<B>(
    mut body: B,
    stream: &TcpStream,
    local_failed: &LocalFailed,
    attach_timeout: Duration,
    dead_after: Duration,
) -> Result<(), TunnelError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    use http_body_util::BodyExt;
    let mut decoder = Decoder::new();
    let attach_deadline = Instant::now() + attach_timeout;
    let mut attached = false;
    // One timer for the whole download, moved on lazily when it fires early: arming one per
    // chunk would cost more than the chunk.
    let mut heard = Instant::now();
    let silence = tokio::time::sleep_until(attach_deadline.min(heard + dead_after));
    tokio::pin!(silence);
    loop {
        let next = tokio::select! {
            biased;
            f = body.frame() => Some(f),
            () = &mut silence => None,
        };
        let Some(next) = next else {
            let now = Instant::now();
            if !attached && now >= attach_deadline {
                return Err(TunnelError::NotAttached(attach_timeout));
            }
            if now >= heard + dead_after {
                return Err(TunnelError::Silent(dead_after));
            }
            let until = if attached {
                heard + dead_after
            } else {
                attach_deadline.min(heard + dead_after)
            };
            silence.as_mut().reset(until);
            continue;
        };
        heard = Instant::now();
        let frame = match next {
            None if !attached => {
                return Err(TunnelError::BrokeBeforeAttached(
                    "the relay ended the stream".into(),
                ));
            }
            None => {
                decoder.finish()?;
                return if decoder.ended() {
                    Ok(())
                } else {
                    Err(TunnelError::Aborted)
                };
            }
            Some(Err(e)) if !attached => {
                return Err(TunnelError::BrokeBeforeAttached(e.to_string()));
            }
            Some(Err(e)) => return Err(TunnelError::Remote(e.to_string())),
            Some(Ok(f)) => f,
        };
        let Ok(mut chunk) = frame.into_data() else {
            continue;
        };
        while let Some(item) = decoder.decode(&mut chunk)? {
            match item {
                Item::Heartbeat => {}
                Item::Attached if !attached => attached = true,
                Item::Attached => return Err(FrameError::Unexpected("second ATTACHED").into()),
                Item::Data(d) => {
                    if let Err(e) = local_failed.write_all(stream, &d).await {
                        return Err(TunnelError::Local(e));
                    }
                }
                Item::End => shutdown_write(stream).map_err(TunnelError::Local)?,
            }
        }
    }
}

/// Runs both directions of a tunnel to completion. On the first failure, on an error of the
/// local socket, or when `shutdown` fires, cancels `body_cancel` (which fails the upload body)
/// and resets the local socket.
///
/// The socket is watched for errors on its own, because neither direction may be looking at
/// it: an upload that waits for HTTP flow control is not polled, and an idle download only
/// touches the socket when data arrives. A reset from the local peer must still close the
/// tunnel at once.
///
/// The two directions are borrowed, pinned where the caller keeps them, rather than moved in:
/// a future moved into another keeps its space in both, and this one lives as long as the
/// tunnel (its size is memory per tunnel).
async fn run<U, D>(
    stream: &TcpStream,
    local_failed: &LocalFailed,
    upload: Pin<&mut U>,
    download: Pin<&mut D>,
    body_cancel: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<(), TunnelError>
where
    U: Future<Output = Result<(), TunnelError>>,
    D: Future<Output = Result<(), TunnelError>>,
{
    let result = tokio::select! {
        r = async { tokio::try_join!(upload, download) } => r.map(|_| ()),
        e = local_error(stream, local_failed) => Err(TunnelError::Local(e)),
        () = shutdown.cancelled() => Err(TunnelError::Cancelled),
    };
    if result.is_err() {
        body_cancel.cancel();
        reset(stream);
    }
    result
}

/// Resolves when `stream` reports an error (a reset from the peer, say); pending otherwise.
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    #[tokio::test]
    async fn upload_body_frames_data_heartbeat_and_end() {
        tokio::time::timeout(Duration::from_secs(10), async {
            let (mut a, b) = pair().await;
            let mut body = UploadBody::new(
                Arc::new(b),
                Arc::default(),
                Duration::from_millis(50),
                CancellationToken::new(),
            );
            a.write_all(b"hello").await.expect("write");
            let f = body
                .frame()
                .await
                .expect("frame")
                .expect("ok")
                .into_data()
                .expect("data");
            assert_eq!(f, frame::data(b"hello"));
            let f = body
                .frame()
                .await
                .expect("frame")
                .expect("ok")
                .into_data()
                .expect("data");
            assert_eq!(f, frame::heartbeat());
            a.shutdown().await.expect("shutdown");
            let f = body
                .frame()
                .await
                .expect("frame")
                .expect("ok")
                .into_data()
                .expect("data");
            assert_eq!(f, frame::end());
            assert!(body.frame().await.is_none());
        })
        .await
        .expect("timeout");
    }

    #[tokio::test]
    async fn upload_body_fails_when_cancelled() {
        tokio::time::timeout(Duration::from_secs(10), async {
            let (_a, b) = pair().await;
            let cancel = CancellationToken::new();
            let mut body = UploadBody::new(
                Arc::new(b),
                Arc::default(),
                Duration::from_secs(60),
                cancel.clone(),
            );
            cancel.cancel();
            assert!(body.frame().await.expect("frame").is_err());
        })
        .await
        .expect("timeout");
    }

    #[tokio::test]
    async fn download_requires_attached_once_and_in_time() {
        tokio::time::timeout(Duration::from_secs(10), async {
            let (a, mut b) = pair().await;
            // Data may come before ATTACHED...
            let mut early = BytesMut::new();
            early.extend_from_slice(&frame::data(b"early"));
            early.extend_from_slice(&frame::attached());
            early.extend_from_slice(&frame::end());
            let body = http_body_util::Full::new(early.freeze());
            pump_download(
                body,
                &a,
                &LocalFailed::default(),
                Duration::from_secs(5),
                Duration::from_secs(5),
            )
            .await
            .expect("data before ATTACHED");
            let mut got = [0u8; 5];
            tokio::io::AsyncReadExt::read_exact(&mut b, &mut got)
                .await
                .expect("read");
            assert_eq!(&got, b"early");
            // ...but the body may not end without it, nor carry it twice.
            let mut never = BytesMut::new();
            never.extend_from_slice(&frame::data(b"x"));
            never.extend_from_slice(&frame::end());
            let (a, _b) = pair().await;
            let r = pump_download(
                http_body_util::Full::new(never.freeze()),
                &a,
                &LocalFailed::default(),
                Duration::from_secs(5),
                Duration::from_secs(5),
            )
            .await;
            assert!(
                matches!(r, Err(TunnelError::BrokeBeforeAttached(_))),
                "{r:?}"
            );
            let mut twice = BytesMut::new();
            twice.extend_from_slice(&frame::attached());
            twice.extend_from_slice(&frame::attached());
            let r = pump_download(
                http_body_util::Full::new(twice.freeze()),
                &a,
                &LocalFailed::default(),
                Duration::from_secs(5),
                Duration::from_secs(5),
            )
            .await;
            assert!(
                matches!(r, Err(TunnelError::Frame(FrameError::Unexpected(_)))),
                "{r:?}"
            );
            // A body that sends one heartbeat and then nothing: the attach deadline fires.
            let r = pump_download(
                OneHeartbeat(false),
                &a,
                &LocalFailed::default(),
                Duration::from_millis(200),
                Duration::from_secs(5),
            )
            .await;
            assert!(matches!(r, Err(TunnelError::NotAttached(_))), "{r:?}");
            assert!(
                r.expect_err("err")
                    .to_string()
                    .contains("proxy_request_buffering off")
            );
        })
        .await
        .expect("timeout");
    }

    struct OneHeartbeat(bool);

    impl Body for OneHeartbeat {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.0 {
                Poll::Pending
            } else {
                self.0 = true;
                Poll::Ready(Some(Ok(Frame::data(frame::heartbeat()))))
            }
        }
    }

    #[tokio::test]
    async fn download_requires_end_frame() {
        tokio::time::timeout(Duration::from_secs(10), async {
            let (a, mut b) = pair().await;
            let body = http_body_util::Full::new(frame::heartbeat());
            let r = pump_download(
                body,
                &a,
                &LocalFailed::default(),
                Duration::from_secs(5),
                Duration::from_secs(5),
            )
            .await;
            assert!(
                matches!(r, Err(TunnelError::BrokeBeforeAttached(_))),
                "{r:?}"
            );
            let mut first = BytesMut::new();
            first.extend_from_slice(&frame::attached());
            first.extend_from_slice(&frame::data(b"x"));
            let body = http_body_util::Full::new(first.freeze());
            let r = pump_download(
                body,
                &a,
                &LocalFailed::default(),
                Duration::from_secs(5),
                Duration::from_secs(5),
            )
            .await;
            assert!(matches!(r, Err(TunnelError::Aborted)), "{r:?}");
            let mut got = [0u8; 1];
            tokio::io::AsyncReadExt::read_exact(&mut b, &mut got)
                .await
                .expect("read");
            assert_eq!(&got, b"x");

            let mut both = BytesMut::new();
            both.extend_from_slice(&frame::attached());
            both.extend_from_slice(&frame::data(b"yz"));
            both.extend_from_slice(&frame::end());
            let body = http_body_util::Full::new(both.freeze());
            pump_download(
                body,
                &a,
                &LocalFailed::default(),
                Duration::from_secs(5),
                Duration::from_secs(5),
            )
            .await
            .expect("clean");
            let mut rest = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut b, &mut rest)
                .await
                .expect("eof");
            assert_eq!(rest, b"yz");
        })
        .await
        .expect("timeout");
    }

    #[tokio::test]
    async fn a_local_socket_dropped_before_its_tunnel_opens_is_reset() {
        tokio::time::timeout(Duration::from_secs(10), async {
            let (a, mut b) = pair().await;
            drop(LocalSocket::new(a));
            let mut buf = [0u8; 8];
            let r = tokio::io::AsyncReadExt::read(&mut b, &mut buf).await;
            assert!(
                matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
                "{r:?}"
            );
        })
        .await
        .expect("timeout");
    }

    /// A reset that the download's write consumed must not be read as a half-close by the
    /// upload, which then only sees EOF. (This checks the outcome in one order of events; the
    /// lock in `LocalFailed` is what makes every interleaving end the same way.)
    #[tokio::test]
    async fn eof_after_a_failed_write_is_an_abort_not_an_end() {
        tokio::time::timeout(Duration::from_secs(10), async {
            let (a, b) = pair().await;
            let a = Arc::new(a);
            b.set_zero_linger().expect("linger");
            drop(b);
            let failed = Arc::new(LocalFailed::default());
            // The write meets the reset and consumes the error.
            let mut wrote = Ok(());
            for _ in 0..100 {
                wrote = failed.write_all(&a, b"after the reset").await;
                if wrote.is_err() {
                    break;
                }
            }
            assert!(wrote.is_err(), "writes kept succeeding after a reset");
            assert!(failed.get());
            let mut body = UploadBody::new(
                a.clone(),
                failed.clone(),
                Duration::from_secs(60),
                CancellationToken::new(),
            );
            let first = body.frame().await.expect("a frame or an error");
            assert!(first.is_err(), "EOF after a reset was sent on: {first:?}");
        })
        .await
        .expect("timeout");
    }
}
