//! A channel's upload at the relay: the body of `upstream` or `downstream`, read by its
//! request's handler for as long as the channel lives.
//!
//! While the channel is idle the relay reads the upload itself: heartbeats, or `END` to retire
//! the channel (unless, for a server's channel, the relay has just given it a connection,
//! which the server then serves). A client's `OPEN` asks for a connection: the relay joins the channel with a
//! server channel of its port (`state.rs`) and lends the upload, from that `OPEN`, to the
//! server channel's download, which gives it back at the upload's `END`. A server's `OPEN`
//! answers the connection it was given and lends its upload to the client's download the same
//! way; its `FAILED` refuses it.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use ptth_common::frame::{Decoder, Item};
use ptth_common::protocol;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::debug;

use crate::channel::{Channel, Feed, ToDownload, Tunnel};
use crate::state::{Offer, Shared};

/// Why an upload ended.
#[derive(Debug)]
pub(crate) enum UploadEnd {
    /// The endpoint retired its idle channel (`END` while idle, then, once the download has
    /// ended, the end of the body).
    Retired,
    /// The channel ended otherwise: an abort, a failure, a protocol error, or shutdown.
    Closed,
}

/// An upload read by the relay while its channel is idle.
struct Reader {
    body: axum::body::Body,
    /// What is left of the last chunk.
    pending: Bytes,
    frames: Decoder,
}

impl Reader {
    fn new(body: axum::body::Body, pending: Bytes) -> Self {
        Self {
            body,
            pending,
            frames: Decoder::new(),
        }
    }

    /// The next item; `None` at the end of the body.
    async fn next(&mut self) -> Result<Option<Item>, String> {
        loop {
            if let Some(item) = self
                .frames
                .decode(&mut self.pending)
                .map_err(|e| e.to_string())?
            {
                return Ok(Some(item));
            }
            match self.body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.pending = data;
                    }
                }
                Some(Err(e)) => return Err(e.to_string()),
                None => {
                    self.frames.finish().map_err(|e| e.to_string())?;
                    return Ok(None);
                }
            }
        }
    }
}

/// Reads the upload of `channel` until the channel ends.
pub(crate) async fn run(
    shared: Arc<Shared>,
    channel: Arc<Channel>,
    body: axum::body::Body,
) -> UploadEnd {
    let mut reader = Reader::new(body, Bytes::new());
    let end = tokio::select! {
        biased;
        () = channel.cancel.cancelled() => UploadEnd::Closed,
        end = serve(&shared, &channel, &mut reader) => end,
    };
    // The channel is over with its upload. (A retired channel's download has ended already:
    // it was told before.)
    channel.close();
    end
}

/// The upload's life: idle, connections, idle again.
async fn serve(shared: &Shared, channel: &Arc<Channel>, reader: &mut Reader) -> UploadEnd {
    // Tell the endpoint, on its download, that its upload is here.
    if !channel.tell(ToDownload::Attached) {
        return UploadEnd::Closed;
    }
    if channel.is_server() {
        shared.ready(channel);
    }
    loop {
        let item = match reader.next().await {
            Ok(Some(item)) => item,
            Ok(None) => {
                debug!(channel = %channel.id, "upload ended without END");
                return UploadEnd::Closed;
            }
            Err(e) => {
                debug!(channel = %channel.id, error = %e, "upload failed");
                return UploadEnd::Closed;
            }
        };
        channel.touch();
        let busy = channel.tunnel();
        let next = match (item, busy, channel.is_server()) {
            (Item::Heartbeat, _, _) => continue,
            (Item::End, None, _) => {
                // A server channel the relay has just given a connection is not retired: the
                // server serves that connection.
                if channel.is_server() && !shared.retire(channel) {
                    continue;
                }
                return retire(channel, reader).await;
            }
            (Item::End, Some(tunnel), true) if !tunnel.is_answered() => continue,
            (Item::Open, None, false) => connect(shared, channel, reader).await,
            (Item::Open, Some(tunnel), true) if tunnel.answer() => {
                lend(channel, reader, &tunnel.client, &tunnel)
                    .await
                    .map(|()| tunnel)
            }
            (Item::Failed(reason), Some(tunnel), true) if tunnel.answer() => {
                debug!(channel = %channel.id, %reason, "server refused a connection");
                shared
                    .metrics
                    .connect_failed(502, protocol::TARGET_UNREACHABLE);
                let reason = format!("{} ({reason})", protocol::TARGET_UNREACHABLE);
                tunnel.client.tell(ToDownload::Fail(reason));
                return UploadEnd::Closed;
            }
            (item, busy, server) => {
                debug!(channel = %channel.id, ?item, busy = busy.is_some(), server, "unexpected frame in an upload");
                Err(())
            }
        };
        // This channel's direction of a connection has ended.
        let Ok(tunnel) = next else {
            return UploadEnd::Closed;
        };
        match after_connection(shared, channel, reader, &tunnel).await {
            Ok(Idle::Ready) => {}
            Ok(Idle::Retired) => return retire(channel, reader).await,
            Err(()) => return UploadEnd::Closed,
        }
    }
}

/// A client's `OPEN`: its connection is joined with a server channel (at once, or once one is
/// ready), and the upload is lent to that channel's download until its `END`.
async fn connect(
    shared: &Shared,
    channel: &Arc<Channel>,
    reader: &mut Reader,
) -> Result<Arc<Tunnel>, ()> {
    if shared.is_draining() {
        let refusal = ptth_common::protocol::DRAINING;
        shared.metrics.connect_failed(503, refusal);
        channel.tell(ToDownload::Fail(refusal.to_owned()));
        return Err(());
    }
    // The server must answer within accept_timeout; the client's download enforces it.
    let deadline = Instant::now() + shared.config.accept_timeout;
    if !channel.tell(ToDownload::Pending(deadline)) {
        return Err(());
    }
    let tunnel = match shared.offer(channel) {
        Ok(Offer::Joined(tunnel)) => tunnel,
        Ok(Offer::Waiting(rx, place)) => {
            let tunnel = rx.await;
            drop(place);
            tunnel.map_err(|_| ())?
        }
        Ok(Offer::Closed) => return Err(()),
        Err(refusal) => {
            debug!(channel = %channel.id, reason = refusal.reason(), "connection refused");
            let status = refusal.status().as_u16();
            shared.metrics.connect_failed(status, refusal.reason());
            channel.tell(ToDownload::Fail(refusal.reason().to_owned()));
            return Err(());
        }
    };
    shared.announce(&tunnel);
    lend(channel, reader, &tunnel.server, &tunnel).await?;
    Ok(tunnel)
}

/// Lends the upload, from the `OPEN` just read, to `to`'s download, and takes it back at its
/// `END`.
async fn lend(
    channel: &Channel,
    reader: &mut Reader,
    to: &Channel,
    tunnel: &Arc<Tunnel>,
) -> Result<(), ()> {
    let (back, returned) = oneshot::channel();
    let body = std::mem::take(&mut reader.body);
    let feed = Feed {
        after_open: std::mem::take(&mut reader.pending),
        body,
        back,
        tunnel: tunnel.clone(),
    };
    if !to.tell(ToDownload::Feed(feed)) {
        debug!(channel = %channel.id, "the other channel's download is gone");
        tunnel.fail();
        return Err(());
    }
    // Dropped without an answer: the download failed, and the tunnel with it.
    let returned = returned.await.map_err(|_| ())?;
    *reader = Reader::new(returned.body, returned.rest);
    Ok(())
}

/// What a channel is once its connection has ended.
enum Idle {
    /// Idle, for the next connection (a server's is ready for one).
    Ready,
    /// Its endpoint retired it (`END`) as the connection ended, or the relay drains.
    Retired,
}

/// Once the channel's own direction of a connection has ended, waits (reading its idle
/// upload) for the other direction to end too: then the channel is idle. A server's is ready
/// for the next connection; on a draining relay, the channel is retired instead. An `END` that comes before the other direction
/// has ended (the endpoint retires the channel as soon as it has seen the whole connection
/// end) retires the channel once it has.
async fn after_connection(
    shared: &Shared,
    channel: &Arc<Channel>,
    reader: &mut Reader,
    tunnel: &Tunnel,
) -> Result<Idle, ()> {
    loop {
        tokio::select! {
            biased;
            () = tunnel.finished() => break,
            item = reader.next() => match item {
                Ok(Some(Item::Heartbeat)) => channel.touch(),
                Ok(Some(Item::End)) => {
                    tunnel.finished().await;
                    return Ok(Idle::Retired);
                }
                _ => return Err(()),
            },
        }
    }
    if shared.is_draining() {
        // Retired as if by its endpoint: its upload is answered only once the endpoint has
        // ended it, after it has read the whole connection from its download.
        return Ok(Idle::Retired);
    }
    if channel.is_server() {
        shared.ready(channel);
    }
    Ok(Idle::Ready)
}

/// The endpoint retires its idle channel: its download ends, and then its upload.
async fn retire(channel: &Channel, reader: &mut Reader) -> UploadEnd {
    channel.tell(ToDownload::Retired);
    // The endpoint, seeing its download end, ends its upload.
    match reader.next().await {
        Ok(None) => UploadEnd::Retired,
        _ => UploadEnd::Closed,
    }
}
