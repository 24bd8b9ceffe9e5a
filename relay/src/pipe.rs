//! A channel's download: the body of the answer to `connect` or `listen`.
//!
//! While the channel is idle it sends heartbeats. For each connection it carries, the other
//! channel's upload is lent to it (a [`Feed`]), and it passes that upload on unchanged from its
//! `OPEN` frame to its `END`, then gives the upload back. The relay never copies or buffers
//! channel bytes; HTTP flow control carries backpressure from one side to the other.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use ptth_common::{frame, protocol};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::channel::{Channel, Feed, Returned, ToDownload};
use crate::metrics::Metrics;
use crate::state::Shared;

/// What a body's `poll_frame` returns.
type PollFrame = Poll<Option<Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>>>;

enum State {
    /// No connection: heartbeats.
    Idle,
    /// Passing an upload of the other channel on.
    Streaming(Box<Streaming>),
    /// Sending `FAILED`; the body ends after it.
    Failing(Bytes),
    /// The body has ended (or ends now: the endpoint retired the idle channel).
    Done,
}

/// An upload being passed on.
struct Streaming {
    feed: Feed,
    /// The `OPEN` frame still to send.
    open: bool,
    /// Follows frame boundaries only, to find the `END` and where `ATTACHED` may go.
    frames: frame::Decoder,
}

/// The body of a download answer (see the module documentation).
pub(crate) struct PipeBody {
    channel: Arc<Channel>,
    state: State,
    /// `ATTACHED` is due, at the next frame boundary.
    attach: bool,
    /// A client's connection must be answered by the server before this fires.
    deadline: Option<Pin<Box<Sleep>>>,
    heartbeat: Pin<Box<Sleep>>,
    interval: Duration,
    cancel: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Where a connection the server did not take in time is counted.
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for PipeBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipeBody")
            .field("channel", &self.channel.id)
            .finish_non_exhaustive()
    }
}

impl PipeBody {
    /// The download of `channel` of the relay `shared`, with a heartbeat every
    /// `heartbeat_interval` of idleness.
    pub(crate) fn new(channel: Arc<Channel>, shared: &Shared) -> Self {
        let interval = shared.config.heartbeat_interval;
        let cancel = Box::pin(channel.cancel.clone().cancelled_owned());
        Self {
            channel,
            state: State::Idle,
            attach: false,
            deadline: None,
            // The first heartbeat goes out at once: nginx over HTTP/2 holds a streaming
            // answer's headers back until its first body byte.
            heartbeat: Box::pin(tokio::time::sleep(Duration::ZERO)),
            interval,
            cancel,
            metrics: shared.metrics.clone(),
        }
    }

    /// Whether the body is between two frames (where `ATTACHED` may go).
    fn at_boundary(&self) -> bool {
        match &self.state {
            State::Streaming(s) => !s.open && s.frames.at_boundary(),
            State::Idle | State::Failing(_) | State::Done => true,
        }
    }

    /// Reads the inbox; `Err` on a message that cannot come now (a relay bug).
    fn read_inbox(&mut self, cx: &mut Context<'_>) -> Result<(), &'static str> {
        while let Poll::Ready(message) = self.channel.poll_message(cx) {
            match message {
                ToDownload::Attached => self.attach = true,
                ToDownload::Pending(at) => {
                    self.deadline = Some(Box::pin(tokio::time::sleep_until(at)));
                }
                ToDownload::Feed(feed) => {
                    if !matches!(self.state, State::Idle) {
                        return Err("a second connection on a busy channel");
                    }
                    self.deadline = None;
                    self.state = State::Streaming(Box::new(Streaming {
                        feed,
                        open: true,
                        frames: frame::Decoder::new(),
                    }));
                }
                ToDownload::Fail(reason) => {
                    self.deadline = None;
                    self.state = State::Failing(frame::failed(&reason));
                }
                ToDownload::Retired => {
                    if !matches!(self.state, State::Idle) {
                        return Err("a busy channel retired");
                    }
                    self.state = State::Done;
                }
            }
        }
        Ok(())
    }

    /// While there is nothing else to send: a heartbeat every interval.
    fn poll_heartbeat(&mut self, cx: &mut Context<'_>) -> PollFrame {
        if self.heartbeat.as_mut().poll(cx).is_ready() {
            let next = Instant::now() + self.interval;
            self.heartbeat.as_mut().reset(next);
            return Poll::Ready(Some(Ok(Frame::data(frame::heartbeat()))));
        }
        Poll::Pending
    }

    /// Sends `failed` (a `FAILED` frame) as the body's last frame: the connection and the
    /// channel end, and so does the other channel of the tunnel, if any.
    fn send_failed(&mut self, failed: Bytes) -> PollFrame {
        self.state = State::Done;
        self.channel.close();
        Poll::Ready(Some(Ok(Frame::data(failed))))
    }

    /// The channel's connection failed: it ends, with its tunnel and the other channel.
    fn fail(&mut self, why: &str) -> PollFrame {
        tracing::debug!(channel = %self.channel.id, reason = why, "download failed");
        self.state = State::Done;
        self.channel.close();
        Poll::Ready(Some(Err(why.to_owned().into())))
    }

    /// Passes on what the lent upload brings, up to its `END`.
    fn poll_stream(&mut self, cx: &mut Context<'_>) -> PollFrame {
        let State::Streaming(s) = &mut self.state else {
            return Poll::Pending;
        };
        if s.open {
            s.open = false;
            return Poll::Ready(Some(Ok(Frame::data(frame::open()))));
        }
        // Asked for more: whatever was passed on has been taken.
        let sender = s.feed.tunnel.other(&self.channel);
        s.feed.tunnel.hold(sender, false);
        loop {
            let chunk = if s.feed.after_open.is_empty() {
                match Pin::new(&mut s.feed.body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(f))) => match f.into_data() {
                        Ok(data) => data,
                        Err(_) => continue,
                    },
                    Poll::Ready(Some(Err(e))) => return self.fail(&format!("upload failed: {e}")),
                    Poll::Ready(None) => return self.fail("upload ended inside a connection"),
                    Poll::Pending => return Poll::Pending,
                }
            } else {
                std::mem::take(&mut s.feed.after_open)
            };
            // An upload's end can come as an empty DATA frame. Passed on, it counts against
            // the peer's limit on empty frames (h2 closes the whole connection after 100), so
            // it is dropped here.
            if chunk.is_empty() {
                continue;
            }
            let end = match s.frames.check(&chunk) {
                Ok(end) => end,
                Err(e) => return self.fail(&format!("bad upload: {e}")),
            };
            // Bytes from the upload's endpoint: that endpoint is alive. (Not this channel's:
            // writes to its download succeed while its path has room for them, even when the
            // path has died without a word.)
            sender.touch_at(Instant::now());
            s.feed.tunnel.carried(sender, s.frames.take_data_len());
            let Some(at) = end else {
                // Held back until this download asks for more.
                s.feed.tunnel.hold(sender, true);
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            };
            // The direction has ended: the upload goes back with what followed its END.
            let mut head = chunk;
            let rest = head.split_off(at);
            let State::Streaming(s) = std::mem::replace(&mut self.state, State::Idle) else {
                return Poll::Pending;
            };
            let Feed {
                body, back, tunnel, ..
            } = s.feed;
            // Counted before the upload goes back: its handler may read the channel's next
            // `OPEN` at once, which needs the connection over.
            tunnel.direction_ended();
            if back.send(Returned { body, rest }).is_err() {
                return self.fail("the upload's handler has gone");
            }
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
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
        if let Err(why) = this.read_inbox(cx) {
            return this.fail(why);
        }
        // A failure is told before the channel is cancelled: it goes out first.
        match std::mem::replace(&mut this.state, State::Done) {
            State::Failing(failed) => return this.send_failed(failed),
            State::Done => return Poll::Ready(None),
            other => this.state = other,
        }
        if this.cancel.as_mut().poll(cx).is_ready() {
            return this.fail("channel closed");
        }
        if this.attach && this.at_boundary() {
            this.attach = false;
            return Poll::Ready(Some(Ok(Frame::data(frame::attached()))));
        }
        if let State::Streaming(_) = this.state {
            return this.poll_stream(cx);
        }
        if let Some(deadline) = &mut this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            this.deadline = None;
            this.metrics.connect_failed(504, protocol::NOT_TAKEN);
            return this.send_failed(frame::failed(protocol::NOT_TAKEN));
        }
        this.poll_heartbeat(cx)
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }
}

impl Drop for PipeBody {
    fn drop(&mut self) {
        self.channel.close_inbox();
        // Dropped before the end: the endpoint's download went away, so the channel is broken.
        if !matches!(self.state, State::Done) {
            self.channel.close();
        }
    }
}
