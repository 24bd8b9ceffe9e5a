//! Framing of channel bodies.
//!
//! Every streaming body of a channel (the answers to `connect` and `listen`, the `upstream` and
//! `downstream` requests) is a sequence of frames:
//!
//! ```text
//! +--------+----------------------+-------------------+
//! | type u8| length u32 big-endian| payload (length)  |
//! +--------+----------------------+-------------------+
//! ```
//!
//! * `DATA` (1) carries TCP bytes, 1..=[`MAX_FRAME_PAYLOAD`] of them.
//! * `HEARTBEAT` (2) has no payload; it keeps idle bodies alive through reverse proxies.
//! * `END` (3) has no payload and means a clean TCP half-close of this direction of the
//!   connection in progress.
//! * `ATTACHED` (4) has no payload; the relay sends it once on a download body, between two
//!   frames, as soon as it holds the same channel's upload. An endpoint that does not see it
//!   soon knows that something between it and the relay holds its upload back.
//! * `OPEN` (5) has no payload and starts a connection on a channel: from the client, "a
//!   connection has arrived"; from the server, "I have reached my target". The relay passes
//!   each on to the other end's download.
//! * `FAILED` (6) carries a reason (UTF-8 text, 1..=[`MAX_REASON_LEN`] bytes): the connection
//!   could not be made. From the server, instead of `OPEN`; from the relay, on a client's
//!   download. The body ends after it, and so does the channel.
//!
//! Which frame may come when is the business of the channel's state (see `docs/protocol.md`);
//! the [`Decoder`] only splits and bounds frames. It is streaming: it never buffers a `DATA`
//! payload, it hands out zero-copy slices of the chunks it is given.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Frame type of a data frame.
pub const TYPE_DATA: u8 = 1;
/// Frame type of a heartbeat frame.
pub const TYPE_HEARTBEAT: u8 = 2;
/// Frame type of the end-of-direction frame.
pub const TYPE_END: u8 = 3;
/// Frame type of the "your upload has reached the relay" frame.
pub const TYPE_ATTACHED: u8 = 4;
/// Frame type of the frame that starts a connection.
pub const TYPE_OPEN: u8 = 5;
/// Frame type of the frame that says why a connection could not be made.
pub const TYPE_FAILED: u8 = 6;
/// Size of a frame header in bytes.
pub const HEADER_LEN: usize = 5;
/// Largest payload a frame may carry; larger frames are a protocol error.
pub const MAX_FRAME_PAYLOAD: usize = 1024 * 1024;
/// Longest reason a `FAILED` frame may carry.
pub const MAX_REASON_LEN: usize = 256;

/// What a decoded piece of a body means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// Bytes to write to the TCP socket (possibly a part of one frame's payload).
    Data(Bytes),
    /// The peer is alive; nothing to write.
    Heartbeat,
    /// Clean half-close: no more bytes will come in this direction of this connection.
    End,
    /// The relay holds this channel's upload.
    Attached,
    /// A connection starts (see the module documentation).
    Open,
    /// The connection could not be made, and why.
    Failed(String),
}

/// Errors found while decoding frames.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The frame type byte is not one of the known types.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// A frame announced a payload above its type's limit.
    #[error("frame of type {kind} with {len} bytes exceeds its limit")]
    TooLarge {
        /// frame type
        kind: u8,
        /// announced length
        len: u32,
    },
    /// A data or failed frame had no payload, or a control frame had one.
    #[error("frame type {kind} with invalid length {len}")]
    BadLength {
        /// frame type
        kind: u8,
        /// announced length
        len: u32,
    },
    /// A frame came where the protocol does not allow it.
    #[error("unexpected frame: {0}")]
    Unexpected(&'static str),
    /// The body ended in the middle of a frame.
    #[error("body ended inside a frame")]
    Truncated,
}

/// Encodes a heartbeat frame.
pub fn heartbeat() -> Bytes {
    Bytes::from_static(&[TYPE_HEARTBEAT, 0, 0, 0, 0])
}

/// Encodes an attached frame.
pub fn attached() -> Bytes {
    Bytes::from_static(&[TYPE_ATTACHED, 0, 0, 0, 0])
}

/// Encodes an end-of-direction frame.
pub fn end() -> Bytes {
    Bytes::from_static(&[TYPE_END, 0, 0, 0, 0])
}

/// Encodes an open frame.
pub fn open() -> Bytes {
    Bytes::from_static(&[TYPE_OPEN, 0, 0, 0, 0])
}

/// Encodes a failed frame with `reason`, cut to [`MAX_REASON_LEN`] bytes (at a character
/// boundary); an empty reason becomes `failed`.
pub fn failed(reason: &str) -> Bytes {
    let reason = if reason.is_empty() { "failed" } else { reason };
    let mut cut = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let reason = &reason.as_bytes()[..cut];
    let mut buf = BytesMut::with_capacity(HEADER_LEN + reason.len());
    buf.put_u8(TYPE_FAILED);
    buf.put_u32(payload_len(reason.len()));
    buf.put_slice(reason);
    buf.freeze()
}

/// Encodes `payload` as `DATA` frames by copying it: one frame, or several when it exceeds
/// [`MAX_FRAME_PAYLOAD`]; nothing at all when it is empty (a `DATA` frame is never empty). For
/// small messages, other implementations and tests; the tunnel reads into frames in place.
pub fn data(payload: &[u8]) -> Bytes {
    let frames = payload.len().div_ceil(MAX_FRAME_PAYLOAD);
    let mut buf = BytesMut::with_capacity(frames * HEADER_LEN + payload.len());
    for part in payload.chunks(MAX_FRAME_PAYLOAD) {
        buf.put_u8(TYPE_DATA);
        buf.put_u32(payload_len(part.len()));
        buf.put_slice(part);
    }
    buf.freeze()
}

/// A payload length as the header writes it; callers keep payloads within
/// [`MAX_FRAME_PAYLOAD`], which fits a `u32`.
fn payload_len(len: usize) -> u32 {
    debug_assert!(len <= MAX_FRAME_PAYLOAD);
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Prepares `buf` to receive the payload of one data frame read in place: reserves room for
/// `prefix` (control frames that go out just before it, such as `OPEN`), the header and
/// `capacity` (at most [`MAX_FRAME_PAYLOAD`]) payload bytes.
///
/// The caller reads at most `capacity` bytes after the header room and then calls
/// [`finish_data_frame`], which writes the header and splits the frames off without copying.
#[cfg(feature = "endpoint")]
pub(crate) fn begin_data_frame(buf: &mut BytesMut, prefix: &[u8], capacity: usize) {
    debug_assert!(buf.is_empty());
    debug_assert!(capacity <= MAX_FRAME_PAYLOAD);
    buf.reserve(prefix.len() + HEADER_LEN + capacity);
    buf.put_slice(prefix);
    buf.put_bytes(0, HEADER_LEN);
}

/// Completes a frame started by [`begin_data_frame`] with `prefix_len` bytes of prefix: `buf`
/// holds the prefix, header room and 0 to `capacity` payload bytes (with none, only the prefix
/// is taken).
#[cfg(feature = "endpoint")]
pub(crate) fn finish_data_frame(buf: &mut BytesMut, prefix_len: usize) -> Bytes {
    let len = buf.len() - prefix_len - HEADER_LEN;
    if len == 0 {
        buf.truncate(prefix_len);
        return buf.split().freeze();
    }
    buf[prefix_len] = TYPE_DATA;
    buf[prefix_len + 1..prefix_len + HEADER_LEN].copy_from_slice(&payload_len(len).to_be_bytes());
    buf.split().freeze()
}

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Header {
    Data(usize),
    Heartbeat,
    End,
    Attached,
    Open,
    Failed(usize),
}

fn parse_header(h: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    let kind = h[0];
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
    let limit = match kind {
        TYPE_DATA => MAX_FRAME_PAYLOAD,
        TYPE_FAILED => MAX_REASON_LEN,
        _ => 0,
    };
    match kind {
        TYPE_DATA | TYPE_FAILED if len as usize > limit => Err(FrameError::TooLarge { kind, len }),
        TYPE_DATA | TYPE_FAILED if len == 0 => Err(FrameError::BadLength { kind, len }),
        TYPE_DATA => Ok(Header::Data(len as usize)),
        TYPE_FAILED => Ok(Header::Failed(len as usize)),
        TYPE_HEARTBEAT | TYPE_END | TYPE_ATTACHED | TYPE_OPEN if len != 0 => {
            Err(FrameError::BadLength { kind, len })
        }
        TYPE_HEARTBEAT => Ok(Header::Heartbeat),
        TYPE_ATTACHED => Ok(Header::Attached),
        TYPE_END => Ok(Header::End),
        TYPE_OPEN => Ok(Header::Open),
        other => Err(FrameError::UnknownType(other)),
    }
}

/// The payload being read.
#[derive(Debug, Default)]
enum Payload {
    /// Between frames, or reading a header.
    #[default]
    None,
    /// Bytes of a `DATA` frame still to come.
    Data(usize),
    /// A `FAILED` frame's reason: bytes still to come, and those read.
    Reason(usize, Vec<u8>),
}

/// What one [`Decoder::step`] consumed.
enum Step {
    /// Payload bytes of the current `DATA` frame.
    Payload,
    /// Part of a header or of a reason, not yet complete.
    Partial,
    /// A complete frame with no payload, or the header of a `DATA` frame.
    Header(Header),
    /// A complete `FAILED` frame.
    Failed(Vec<u8>),
}

/// Streaming frame decoder.
#[derive(Debug, Default)]
pub struct Decoder {
    header: [u8; HEADER_LEN],
    header_len: usize,
    payload: Payload,
    /// `DATA` payload bytes announced by the headers [`Decoder::check`] has passed since
    /// [`Decoder::take_data_len`] was last called.
    data_len: u64,
}

impl Decoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the decoder is between frames (a body may end here).
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && matches!(self.payload, Payload::None)
    }

    /// One step over `chunk`: how many bytes of it were consumed, and what they were. The
    /// shared core of [`Decoder::decode`] and [`Decoder::check`].
    fn step(&mut self, chunk: &[u8]) -> Result<(usize, Step), FrameError> {
        match &mut self.payload {
            Payload::Data(remaining) => {
                let n = (*remaining).min(chunk.len());
                *remaining -= n;
                if *remaining == 0 {
                    self.payload = Payload::None;
                }
                return Ok((n, Step::Payload));
            }
            Payload::Reason(remaining, reason) => {
                let n = (*remaining).min(chunk.len());
                reason.extend_from_slice(&chunk[..n]);
                *remaining -= n;
                if *remaining > 0 {
                    return Ok((n, Step::Partial));
                }
                let reason = std::mem::take(reason);
                self.payload = Payload::None;
                return Ok((n, Step::Failed(reason)));
            }
            Payload::None => {}
        }
        let n = (HEADER_LEN - self.header_len).min(chunk.len());
        self.header[self.header_len..self.header_len + n].copy_from_slice(&chunk[..n]);
        self.header_len += n;
        if self.header_len < HEADER_LEN {
            return Ok((n, Step::Partial));
        }
        self.header_len = 0;
        let header = parse_header(&self.header)?;
        match header {
            Header::Data(len) => self.payload = Payload::Data(len),
            Header::Failed(len) => {
                self.payload = Payload::Reason(len, Vec::with_capacity(len));
                return Ok((n, Step::Partial));
            }
            Header::Heartbeat | Header::End | Header::Attached | Header::Open => {}
        }
        Ok((n, Step::Header(header)))
    }

    /// Takes the next item from `chunk`, advancing it. Returns `Ok(None)` when `chunk` is
    /// exhausted without completing an item. Data items borrow `chunk`'s buffer (no copy).
    pub fn decode(&mut self, chunk: &mut Bytes) -> Result<Option<Item>, FrameError> {
        while !chunk.is_empty() {
            let (n, step) = self.step(chunk)?;
            if let Step::Payload = step {
                return Ok(Some(Item::Data(chunk.split_to(n))));
            }
            chunk.advance(n);
            match step {
                Step::Header(Header::Heartbeat) => return Ok(Some(Item::Heartbeat)),
                Step::Header(Header::Attached) => return Ok(Some(Item::Attached)),
                Step::Header(Header::End) => return Ok(Some(Item::End)),
                Step::Header(Header::Open) => return Ok(Some(Item::Open)),
                Step::Failed(reason) => {
                    let reason = String::from_utf8_lossy(&reason).into_owned();
                    return Ok(Some(Item::Failed(reason)));
                }
                Step::Header(Header::Data(_) | Header::Failed(_))
                | Step::Partial
                | Step::Payload => {}
            }
        }
        Ok(None)
    }

    /// Follows the frames of one direction of a connection in progress (`DATA`, `HEARTBEAT`,
    /// `END`) in `chunk` without taking anything out of it: the relay passes chunks on
    /// unchanged and only needs to know that they are well formed and where the direction
    /// ends. Returns the length of the part of `chunk` up to and including an `END` frame, if
    /// one ends in it (what follows belongs to the channel again, not to this connection).
    pub fn check(&mut self, chunk: &[u8]) -> Result<Option<usize>, FrameError> {
        let mut at = 0;
        while at < chunk.len() {
            let (n, step) = self.step(&chunk[at..])?;
            at += n;
            match step {
                Step::Header(Header::End) => return Ok(Some(at)),
                Step::Header(Header::Attached) => {
                    return Err(FrameError::Unexpected("ATTACHED in an upload"));
                }
                Step::Header(Header::Open) => {
                    return Err(FrameError::Unexpected("OPEN inside a connection"));
                }
                Step::Failed(_) => {
                    return Err(FrameError::Unexpected("FAILED inside a connection"));
                }
                Step::Header(Header::Data(len)) => self.data_len += len as u64,
                Step::Header(Header::Heartbeat | Header::Failed(_))
                | Step::Partial
                | Step::Payload => {}
            }
        }
        Ok(None)
    }

    /// The `DATA` payload bytes whose headers [`Decoder::check`] has passed since the last
    /// call: what a connection carried, without the framing.
    pub fn take_data_len(&mut self) -> u64 {
        std::mem::take(&mut self.data_len)
    }

    /// Checks that the body may end here.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.at_boundary() {
            Ok(())
        } else {
            Err(FrameError::Truncated)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[Bytes]) -> Result<Vec<Item>, FrameError> {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for c in input {
            let mut c = c.clone();
            while let Some(item) = d.decode(&mut c)? {
                out.push(item);
            }
        }
        d.finish()?;
        Ok(out)
    }

    /// Items with the data of consecutive `DATA` frames joined, for comparisons that do not
    /// depend on where chunks were cut.
    fn joined(items: Vec<Item>) -> Vec<Item> {
        let mut out: Vec<Item> = Vec::new();
        for i in items {
            match (out.last_mut(), i) {
                (Some(Item::Data(prev)), Item::Data(d)) => {
                    let mut b = BytesMut::from(&prev[..]);
                    b.extend_from_slice(&d);
                    *prev = b.freeze();
                }
                (_, i) => out.push(i),
            }
        }
        out
    }

    #[test]
    fn round_trip_split_at_every_byte() {
        let mut all = BytesMut::new();
        for f in [
            attached(),
            open(),
            data(b"hello"),
            heartbeat(),
            data(b"world!"),
            end(),
            open(),
            failed("no way"),
        ] {
            all.extend_from_slice(&f);
        }
        let all = all.freeze();
        let want = vec![
            Item::Attached,
            Item::Open,
            Item::Data(Bytes::from_static(b"hello")),
            Item::Heartbeat,
            Item::Data(Bytes::from_static(b"world!")),
            Item::End,
            Item::Open,
            Item::Failed("no way".into()),
        ];
        for split in 0..=all.len() {
            let items = decode_all(&[all.slice(..split), all.slice(split..)]).expect("decode");
            assert_eq!(joined(items), want, "split at {split}");
        }
    }

    #[test]
    fn data_splits_large_payloads_and_encodes_nothing_for_none() {
        assert!(data(b"").is_empty());
        let big = vec![9u8; MAX_FRAME_PAYLOAD * 2 + 3];
        let encoded = data(&big);
        assert_eq!(encoded.len(), big.len() + 3 * HEADER_LEN);
        let items = decode_all(&[encoded]).expect("valid frames");
        let mut payload = Vec::new();
        for item in items {
            match item {
                Item::Data(d) => payload.extend_from_slice(&d),
                other => panic!("{other:?}"),
            }
        }
        assert!(payload == big);
    }

    #[test]
    fn failed_reasons_are_bounded_and_never_empty() {
        let long = "é".repeat(MAX_REASON_LEN);
        let f = failed(&long);
        assert_eq!(f.len(), HEADER_LEN + MAX_REASON_LEN);
        let items = decode_all(&[f]).expect("valid");
        assert_eq!(items, [Item::Failed("é".repeat(MAX_REASON_LEN / 2))]);
        assert_eq!(
            decode_all(&[failed("")]).expect("valid"),
            [Item::Failed("failed".into())]
        );
    }

    #[cfg(feature = "endpoint")]
    #[test]
    fn in_place_frame_matches_copying_encoder() {
        let mut buf = BytesMut::new();
        begin_data_frame(&mut buf, &[], 16);
        buf.extend_from_slice(b"abc");
        assert_eq!(finish_data_frame(&mut buf, 0), data(b"abc"));
        assert!(buf.is_empty());
        // With a prefix, and with no payload: the prefix alone.
        begin_data_frame(&mut buf, &open(), 16);
        buf.extend_from_slice(b"abc");
        let mut want = BytesMut::from(&open()[..]);
        want.extend_from_slice(&data(b"abc"));
        assert_eq!(finish_data_frame(&mut buf, HEADER_LEN), want.freeze());
        begin_data_frame(&mut buf, &open(), 16);
        assert_eq!(finish_data_frame(&mut buf, HEADER_LEN), open());
    }

    #[test]
    fn rejects_bad_frames() {
        let cases: [(&[u8], FrameError); 7] = [
            (&[9, 0, 0, 0, 0], FrameError::UnknownType(9)),
            (
                &[TYPE_DATA, 0, 0x10, 0, 1],
                FrameError::TooLarge {
                    kind: TYPE_DATA,
                    len: 0x0010_0001,
                },
            ),
            (
                &[TYPE_FAILED, 0, 0, 1, 1],
                FrameError::TooLarge {
                    kind: TYPE_FAILED,
                    len: 257,
                },
            ),
            (
                &[TYPE_DATA, 0, 0, 0, 0],
                FrameError::BadLength { kind: 1, len: 0 },
            ),
            (
                &[TYPE_FAILED, 0, 0, 0, 0],
                FrameError::BadLength { kind: 6, len: 0 },
            ),
            (
                &[TYPE_END, 0, 0, 0, 1],
                FrameError::BadLength { kind: 3, len: 1 },
            ),
            (
                &[TYPE_OPEN, 0, 0, 0, 2],
                FrameError::BadLength { kind: 5, len: 2 },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(decode_all(&[Bytes::copy_from_slice(input)]), Err(want));
        }
    }

    #[test]
    fn check_finds_the_end_of_a_direction_split_at_every_byte() {
        let mut conn = BytesMut::new();
        conn.extend_from_slice(&data(b"hello"));
        conn.extend_from_slice(&heartbeat());
        conn.extend_from_slice(&data(&[7u8; 300]));
        conn.extend_from_slice(&end());
        let end_at = conn.len();
        // What follows END belongs to the channel: here, the next connection's OPEN.
        conn.extend_from_slice(&open());
        for split in 0..=conn.len() {
            let mut d = Decoder::new();
            let found = match d.check(&conn[..split]).expect("first part") {
                Some(at) => at,
                // Not yet: the rest of the chunk, which then holds the END.
                None => split + d.check(&conn[split..]).expect("second").expect("END"),
            };
            assert_eq!(found, end_at, "split {split}");
            assert!(d.at_boundary());
        }
        let mut d = Decoder::new();
        assert_eq!(d.check(&conn[..end_at - 1]), Ok(None));
        assert_eq!(d.finish(), Err(FrameError::Truncated));
    }

    #[test]
    fn check_refuses_what_a_connection_may_not_carry() {
        let cases: [(Bytes, FrameError); 5] = [
            (attached(), FrameError::Unexpected("ATTACHED in an upload")),
            (open(), FrameError::Unexpected("OPEN inside a connection")),
            (
                failed("x"),
                FrameError::Unexpected("FAILED inside a connection"),
            ),
            (
                Bytes::from_static(&[TYPE_DATA, 0, 0x10, 0, 1]),
                FrameError::TooLarge {
                    kind: TYPE_DATA,
                    len: 0x0010_0001,
                },
            ),
            (
                Bytes::from_static(&[0, 0, 0, 0, 0]),
                FrameError::UnknownType(0),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(Decoder::new().check(&input), Err(want));
        }
    }

    #[test]
    fn truncated_body_is_an_error() {
        assert_eq!(
            decode_all(&[Bytes::from_static(&[TYPE_DATA, 0, 0, 0, 4, b'a'])]),
            Err(FrameError::Truncated)
        );
        assert_eq!(
            decode_all(&[Bytes::from_static(&[TYPE_FAILED, 0, 0, 0, 4, b'a'])]),
            Err(FrameError::Truncated)
        );
    }
}
