//! Framing of tunnel bodies.
//!
//! Every streaming body of a tunnel (`connect` and `listen` answers, `upstream` and
//! `downstream` requests) is a sequence of frames:
//!
//! ```text
//! +--------+----------------------+-------------------+
//! | type u8| length u32 big-endian| payload (length)  |
//! +--------+----------------------+-------------------+
//! ```
//!
//! * `DATA` (1) carries TCP bytes, 1..=[`MAX_FRAME_PAYLOAD`] of them.
//! * `HEARTBEAT` (2) has no payload; it keeps idle streams alive through reverse proxies.
//! * `END` (3) has no payload and means a clean TCP half-close of this direction. It must be
//!   the last frame; the HTTP body then ends.
//! * `ATTACHED` (4) has no payload; the relay sends it once on a download body, between two
//!   frames, as soon as it holds the same endpoint's upload request (the other side's data may
//!   come before it). An endpoint that does not see it soon knows that something between it
//!   and the relay holds its upload back.
//!
//! A body that ends (or fails) without `END` is an abort. The [`Decoder`] is streaming: it never
//! buffers a payload, it hands out zero-copy slices of the chunks it is given.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Frame type of a data frame.
pub const TYPE_DATA: u8 = 1;
/// Frame type of a heartbeat frame.
pub const TYPE_HEARTBEAT: u8 = 2;
/// Frame type of the end-of-stream frame.
pub const TYPE_END: u8 = 3;
/// Frame type of the "your upload has reached the relay" frame.
pub const TYPE_ATTACHED: u8 = 4;
/// Size of a frame header in bytes.
pub const HEADER_LEN: usize = 5;
/// Largest payload a frame may carry; larger frames are a protocol error.
pub const MAX_FRAME_PAYLOAD: usize = 1024 * 1024;

/// What a decoded piece of a body means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// Bytes to write to the TCP socket (possibly a part of one frame's payload).
    Data(Bytes),
    /// The peer is alive; nothing to write.
    Heartbeat,
    /// Clean half-close: no more bytes will come in this direction.
    End,
    /// The relay holds this endpoint's upload.
    Attached,
}

/// Errors found while decoding frames.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The frame type byte is not one of the known types.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// A frame announced a payload above [`MAX_FRAME_PAYLOAD`].
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_PAYLOAD}")]
    TooLarge(u32),
    /// A data frame had no payload, or a control frame had one.
    #[error("frame type {kind} with invalid length {len}")]
    BadLength {
        /// frame type
        kind: u8,
        /// announced length
        len: u32,
    },
    /// Bytes followed the `END` frame.
    #[error("data after end of stream")]
    AfterEnd,
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

/// Encodes an end-of-stream frame.
pub fn end() -> Bytes {
    Bytes::from_static(&[TYPE_END, 0, 0, 0, 0])
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
/// the header and for `capacity` (at most [`MAX_FRAME_PAYLOAD`]) payload bytes.
///
/// The caller reads at most `capacity` bytes after the header room and then calls
/// [`finish_data_frame`], which writes the header and splits the frame off without copying.
#[cfg(feature = "endpoint")]
pub(crate) fn begin_data_frame(buf: &mut BytesMut, capacity: usize) {
    debug_assert!(buf.is_empty());
    debug_assert!(capacity <= MAX_FRAME_PAYLOAD);
    buf.reserve(HEADER_LEN + capacity);
    buf.put_bytes(0, HEADER_LEN);
}

/// Completes a frame started by [`begin_data_frame`]: `buf` holds header room plus 1 to
/// `capacity` payload bytes.
#[cfg(feature = "endpoint")]
pub(crate) fn finish_data_frame(buf: &mut BytesMut) -> Bytes {
    let len = buf.len() - HEADER_LEN;
    buf[0] = TYPE_DATA;
    buf[1..HEADER_LEN].copy_from_slice(&payload_len(len).to_be_bytes());
    buf.split().freeze()
}

/// A validated frame header.
enum Header {
    Data(usize),
    Heartbeat,
    End,
    Attached,
}

fn parse_header(h: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    let kind = h[0];
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
    match kind {
        TYPE_DATA if len as usize > MAX_FRAME_PAYLOAD => Err(FrameError::TooLarge(len)),
        TYPE_DATA if len == 0 => Err(FrameError::BadLength { kind, len }),
        TYPE_DATA => Ok(Header::Data(len as usize)),
        TYPE_HEARTBEAT | TYPE_END | TYPE_ATTACHED if len != 0 => {
            Err(FrameError::BadLength { kind, len })
        }
        TYPE_HEARTBEAT => Ok(Header::Heartbeat),
        TYPE_ATTACHED => Ok(Header::Attached),
        TYPE_END => Ok(Header::End),
        other => Err(FrameError::UnknownType(other)),
    }
}

/// What one [`Decoder::step`] consumed.
enum Step {
    /// Payload bytes of the current `DATA` frame.
    Payload,
    /// Part of a header, not yet complete.
    Partial,
    /// The rest of a header, now complete.
    Header(Header),
}

/// Streaming frame decoder.
#[derive(Debug, Default)]
pub struct Decoder {
    header: [u8; HEADER_LEN],
    header_len: usize,
    remaining: usize,
    ended: bool,
}

impl Decoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the `END` frame has been seen.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Whether the decoder is between frames (a body may end here).
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.remaining == 0
    }

    /// One step over `chunk`: how many bytes of it were consumed, and what they were. The
    /// shared core of [`Decoder::decode`] and [`Decoder::check`].
    fn step(&mut self, chunk: &[u8]) -> Result<(usize, Step), FrameError> {
        if self.ended {
            return Err(FrameError::AfterEnd);
        }
        if self.remaining > 0 {
            let n = self.remaining.min(chunk.len());
            self.remaining -= n;
            return Ok((n, Step::Payload));
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
            Header::Data(len) => self.remaining = len,
            Header::End => self.ended = true,
            Header::Heartbeat | Header::Attached => {}
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
                Step::Header(Header::Data(_)) | Step::Partial | Step::Payload => {}
            }
        }
        Ok(None)
    }

    /// Checks the frames of an upload body (`DATA`, `HEARTBEAT`, `END`) in `chunk` without
    /// taking anything out of it: the relay passes chunks on unchanged and only needs to know
    /// that they are well formed and where the body ends.
    pub fn check(&mut self, mut chunk: &[u8]) -> Result<(), FrameError> {
        while !chunk.is_empty() {
            let (n, step) = self.step(chunk)?;
            if matches!(step, Step::Header(Header::Attached)) {
                return Err(FrameError::Unexpected("ATTACHED in an upload"));
            }
            chunk = &chunk[n..];
        }
        Ok(())
    }

    /// Checks that the body may end here; an end without `END` is still an abort, which the
    /// caller detects through [`Decoder::ended`].
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

    #[test]
    fn round_trip_split_at_every_byte() {
        let mut all = BytesMut::new();
        all.extend_from_slice(&attached());
        all.extend_from_slice(&data(b"hello"));
        all.extend_from_slice(&heartbeat());
        all.extend_from_slice(&data(b"world!"));
        all.extend_from_slice(&end());
        let all = all.freeze();
        for split in 0..=all.len() {
            let items = decode_all(&[all.slice(..split), all.slice(split..)]).expect("decode");
            let mut bytes = Vec::new();
            let mut beats = 0;
            let mut ends = 0;
            for i in items {
                match i {
                    Item::Data(d) => bytes.extend_from_slice(&d),
                    Item::Heartbeat => beats += 1,
                    Item::End => ends += 1,
                    Item::Attached => beats += 10,
                }
            }
            assert_eq!(bytes, b"helloworld!");
            assert_eq!((beats, ends), (11, 1));
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

    #[cfg(feature = "endpoint")]
    #[test]
    fn in_place_frame_matches_copying_encoder() {
        let mut buf = BytesMut::new();
        begin_data_frame(&mut buf, 16);
        buf.extend_from_slice(b"abc");
        assert_eq!(finish_data_frame(&mut buf), data(b"abc"));
        assert!(buf.is_empty());
    }

    #[test]
    fn rejects_oversized_frame() {
        let mut c = Bytes::from_static(&[TYPE_DATA, 0x00, 0x10, 0x00, 0x01]);
        assert_eq!(
            Decoder::new().decode(&mut c),
            Err(FrameError::TooLarge(0x0010_0001))
        );
    }

    #[test]
    fn rejects_bad_frames() {
        let cases: [(&[u8], FrameError); 4] = [
            (&[9, 0, 0, 0, 0], FrameError::UnknownType(9)),
            (
                &[TYPE_DATA, 0, 0, 0, 0],
                FrameError::BadLength { kind: 1, len: 0 },
            ),
            (
                &[TYPE_END, 0, 0, 0, 1],
                FrameError::BadLength { kind: 3, len: 1 },
            ),
            (&[TYPE_END, 0, 0, 0, 0, 1], FrameError::AfterEnd),
        ];
        for (input, want) in cases {
            assert_eq!(decode_all(&[Bytes::copy_from_slice(input)]), Err(want));
        }
    }

    #[test]
    fn check_follows_uploads_split_at_every_byte() {
        let mut all = BytesMut::new();
        all.extend_from_slice(&data(b"hello"));
        all.extend_from_slice(&heartbeat());
        all.extend_from_slice(&data(&[7u8; 300]));
        all.extend_from_slice(&end());
        for split in 0..=all.len() {
            let mut d = Decoder::new();
            d.check(&all[..split]).expect("first part");
            assert!(!d.ended() || split == all.len());
            d.check(&all[split..]).expect("second part");
            assert!(d.ended());
            d.finish().expect("at a boundary");
        }
        let mut d = Decoder::new();
        d.check(&all[..all.len() - 1])
            .expect("all but the last byte");
        assert!(!d.ended(), "END is not complete yet");
        assert_eq!(d.finish(), Err(FrameError::Truncated));
    }

    #[test]
    fn check_refuses_what_an_upload_may_not_carry() {
        let mut after = BytesMut::new();
        after.extend_from_slice(&end());
        after.extend_from_slice(&heartbeat());
        let cases: [(&[u8], FrameError); 4] = [
            (&attached(), FrameError::Unexpected("ATTACHED in an upload")),
            (
                &[TYPE_DATA, 0, 0x10, 0, 1],
                FrameError::TooLarge(0x0010_0001),
            ),
            (&[0, 0, 0, 0, 0], FrameError::UnknownType(0)),
            (&after, FrameError::AfterEnd),
        ];
        for (input, want) in cases {
            assert_eq!(Decoder::new().check(input), Err(want));
        }
    }

    #[test]
    fn truncated_body_is_an_error() {
        assert_eq!(
            decode_all(&[Bytes::from_static(&[TYPE_DATA, 0, 0, 0, 4, b'a'])]),
            Err(FrameError::Truncated)
        );
    }
}
