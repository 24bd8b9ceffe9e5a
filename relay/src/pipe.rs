//! Splicing: the download of `listen` (or `connect`) *is* the upload of `upstream` (or
//! `downstream`), handed over whole. The relay never copies or buffers tunnel bytes; HTTP flow
//! control carries backpressure from one side to the other.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use ptth_common::frame;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::conn::{Conn, DownloadSlot, Upload, UploadEnd};

/// What a body's `poll_frame` returns.
type PollFrame = Poll<Option<Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>>>;

enum State {
    /// The upload has not arrived yet; heartbeats keep the download alive meanwhile.
    Waiting(oneshot::Receiver<Upload>),
    /// Passing the upload through.
    Streaming(Streaming),
    Done,
}

/// An upload being passed through.
struct Streaming {
    body: axum::body::Body,
    /// Told how the upload ended; `None` once told.
    done: Option<oneshot::Sender<UploadEnd>>,
    /// Follows frame boundaries only, to tell a body that ends with `END` from one that was
    /// cut short, and to find where `ATTACHED` may go.
    frames: frame::Decoder,
    /// The upload's `END`, held back until `ATTACHED` has gone out (`END` is the last frame).
    held_end: bool,
    /// Whether the upload's body has ended.
    over: bool,
}

/// The body of a download response (`connect` or `listen`).
///
/// It sends heartbeats until the other endpoint's upload has arrived, then passes that upload
/// through unchanged. Between two frames, as soon as the same endpoint's own upload has
/// arrived, it sends `ATTACHED`, and it does not end before it has.
pub(crate) struct PipeBody {
    conn: Arc<Conn>,
    /// Fires when this endpoint's upload reached the relay; `None` once `ATTACHED` is sent.
    attach: Option<oneshot::Receiver<()>>,
    state: State,
    heartbeat: Pin<Box<Sleep>>,
    interval: Duration,
    cancel: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl std::fmt::Debug for PipeBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipeBody")
            .field("conn", &self.conn.id)
            .finish_non_exhaustive()
    }
}

impl PipeBody {
    /// The download of `conn` that carries the upload the slot brings, with a heartbeat every
    /// `interval` until it comes, and `ATTACHED` once the slot says this endpoint's own upload
    /// has arrived.
    pub(crate) fn new(conn: Arc<Conn>, slot: DownloadSlot, interval: Duration) -> Self {
        let cancel = Box::pin(conn.cancel.clone().cancelled_owned());
        Self {
            conn,
            attach: Some(slot.attached),
            state: State::Waiting(slot.upload),
            // The first heartbeat goes out at once: nginx over HTTP/2 holds a streaming
            // answer's headers back until its first body byte.
            heartbeat: Box::pin(tokio::time::sleep(Duration::ZERO)),
            interval,
            cancel,
        }
    }

    /// Whether the body is between two frames of the upload it passes on (where `ATTACHED`
    /// may go).
    fn at_boundary(&self) -> bool {
        match &self.state {
            State::Streaming(s) => s.frames.at_boundary(),
            State::Waiting(_) | State::Done => true,
        }
    }

    /// While this body has nothing of its own to send: a heartbeat every interval.
    fn poll_heartbeat(&mut self, cx: &mut Context<'_>) -> PollFrame {
        if self.heartbeat.as_mut().poll(cx).is_ready() {
            let next = Instant::now() + self.interval;
            self.heartbeat.as_mut().reset(next);
            return Poll::Ready(Some(Ok(Frame::data(frame::heartbeat()))));
        }
        Poll::Pending
    }

    fn fail(&mut self, why: &str) {
        if let State::Streaming(s) = &mut self.state
            && let Some(done) = s.done.take()
        {
            let _ = done.send(Err(why.to_owned()));
        }
        self.state = State::Done;
        self.conn.cancel.cancel();
    }
}

impl Body for PipeBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if matches!(this.state, State::Done) {
            return Poll::Ready(None);
        }
        if this.cancel.as_mut().poll(cx).is_ready() {
            this.fail("connection closed");
            return Poll::Ready(Some(Err("connection closed".into())));
        }
        if this.at_boundary()
            && let Some(attach) = &mut this.attach
        {
            match Pin::new(attach).poll(cx) {
                Poll::Ready(Ok(())) => {
                    this.attach = None;
                    return Poll::Ready(Some(Ok(Frame::data(frame::attached()))));
                }
                Poll::Ready(Err(_)) => {
                    this.fail("connection closed");
                    return Poll::Ready(Some(Err("connection closed".into())));
                }
                Poll::Pending => {}
            }
        }
        loop {
            match &mut this.state {
                State::Waiting(rx) => match Pin::new(rx).poll(cx) {
                    Poll::Ready(Ok(upload)) => {
                        this.state = State::Streaming(Streaming {
                            body: upload.body,
                            done: Some(upload.done),
                            frames: frame::Decoder::new(),
                            held_end: false,
                            over: false,
                        });
                    }
                    Poll::Ready(Err(_)) => {
                        this.fail("connection closed");
                        return Poll::Ready(Some(Err("connection closed".into())));
                    }
                    Poll::Pending => return this.poll_heartbeat(cx),
                },
                State::Streaming(s) if s.held_end && this.attach.is_none() => {
                    s.held_end = false;
                    return Poll::Ready(Some(Ok(Frame::data(frame::end()))));
                }
                // All passed on but the held `END`: waiting for `ATTACHED`, alive meanwhile.
                State::Streaming(s) if s.over && s.held_end => return this.poll_heartbeat(cx),
                State::Streaming(s) if s.over => {
                    this.state = State::Done;
                    this.conn.direction_done();
                    return Poll::Ready(None);
                }
                State::Streaming(s) => match Pin::new(&mut s.body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(f))) => match f.into_data() {
                        // An upload's end can come as an empty DATA frame. Passed on, it
                        // counts against the peer's limit on empty frames (h2 closes the
                        // whole connection after 100), so it is dropped here.
                        Ok(data) if data.is_empty() => continue,
                        Ok(mut data) => {
                            if let Err(e) = s.frames.check(&data) {
                                let why = format!("bad upload: {e}");
                                this.fail(&why);
                                return Poll::Ready(Some(Err(why.into())));
                            }
                            this.conn.touch();
                            if s.frames.ended() && this.attach.is_some() {
                                // `END` closes the chunk: it waits for `ATTACHED`.
                                data.truncate(data.len() - frame::HEADER_LEN);
                                s.held_end = true;
                                if data.is_empty() {
                                    continue;
                                }
                            }
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Err(_) => continue,
                    },
                    Poll::Ready(Some(Err(e))) => {
                        let why = format!("upload failed: {e}");
                        this.fail(&why);
                        return Poll::Ready(Some(Err(why.into())));
                    }
                    Poll::Ready(None) if !s.frames.ended() => {
                        let why = "upload ended without END";
                        this.fail(why);
                        return Poll::Ready(Some(Err(why.into())));
                    }
                    Poll::Ready(None) => {
                        if let Some(done) = s.done.take() {
                            let _ = done.send(Ok(()));
                        }
                        s.over = true;
                    }
                    Poll::Pending => return Poll::Pending,
                },
                State::Done => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }
}

impl Drop for PipeBody {
    fn drop(&mut self) {
        // Dropped before the end: the downloading side went away, so the tunnel is broken.
        if !matches!(self.state, State::Done) {
            self.fail("download closed");
        }
    }
}
