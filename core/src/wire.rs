//! The wire format: a versioned stream of self-delimiting, checksummed frames.
//!
//! Every frame is
//! ```text
//! 0      4     5     6        8                  len-8       len
//! | len  | kind| flag| reserved| body ...         | xxh3-64    |
//! | u32  | u8  | u8  | u16 = 0 |                  | of [0,len-8)|
//! ```
//! little-endian throughout; `len` counts the whole frame, header and checksum included, and is
//! at most [`MAX_FRAME_LEN`]. Bodies by kind:
//!
//! | kind | direction | body |
//! | --- | --- | --- |
//! | `Hello` | source → destination | magic `MFRY`, version u16, page shift u8, 0 u8, page count u64, features u64 |
//! | `Accept` | destination → source | version u16, 6 × 0, features u64 |
//! | `Page` | source → destination | page index u64, encoding u8, payload |
//! | `RoundEnd` | source → destination | round u32, 0 u32, pages sent in the round u64 |
//! | `DeviceState` | source → destination | opaque bytes |
//! | `Switchover` | source → destination | rounds u32, flags u32 (bit 0: a `Complete` digest follows) |
//! | `Ready` | destination → source | empty: the destination has everything and runs |
//! | `Complete` | source → destination | memory digest u64 |
//! | `Verified` | destination → source | verdict u8 (0 mismatch, 1 match, 2 not checked), 7 × 0, destination digest u64 |
//! | `Abort` | either | code u16, UTF-8 message |
//!
//! Decoding ([`Frame::parse`]) is a checked view over `&[u8]` in smoltcp's style: it never
//! panics, never allocates, and returns a typed [`WireError`] for every malformed input.
//! Encoding appends to a `Vec<u8>`; a page frame can be filled in place ([`PageFrameWriter`])
//! so a page is copied once, from guest memory straight into the output buffer.

use alloc::vec::Vec;
use core::fmt;
use xxhash_rust::xxh3::xxh3_64;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// The magic at the start of a hello body.
pub const MAGIC: [u8; 4] = *b"MFRY";
/// Bytes before the body.
pub const HEADER_LEN: usize = 8;
/// Bytes after the body (the checksum).
pub const TRAILER_LEN: usize = 8;
/// Header plus checksum: the fixed cost of every frame.
pub const FRAME_OVERHEAD: usize = HEADER_LEN + TRAILER_LEN;
/// The fixed part of a page frame's body (index and encoding).
pub const PAGE_BODY_FIXED: usize = 9;
/// The largest body a frame may carry: a 2 MiB page plus its fixed fields, or device state.
pub const MAX_BODY_LEN: usize = 4 * 1024 * 1024;
/// The largest frame, header and checksum included. Readers refuse to buffer more.
pub const MAX_FRAME_LEN: usize = MAX_BODY_LEN + FRAME_OVERHEAD;
/// The longest abort message carried (longer messages are cut at a character boundary).
pub const MAX_ABORT_MESSAGE: usize = 1024;

/// The wire cost of one page frame carrying `payload` bytes.
pub const fn page_frame_len(payload: usize) -> usize {
    FRAME_OVERHEAD + PAGE_BODY_FIXED + payload
}

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Source opens the stream.
    Hello = 1,
    /// Destination accepts the hello.
    Accept = 2,
    /// One page.
    Page = 3,
    /// End of a pre-copy round.
    RoundEnd = 4,
    /// CPU and device state.
    DeviceState = 5,
    /// All memory and state sent: the destination may start the guest.
    Switchover = 6,
    /// Destination runs.
    Ready = 7,
    /// Source's memory digest.
    Complete = 8,
    /// Destination's verdict on the digest.
    Verified = 9,
    /// Either side gives up.
    Abort = 10,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<FrameKind> {
        Some(match v {
            1 => FrameKind::Hello,
            2 => FrameKind::Accept,
            3 => FrameKind::Page,
            4 => FrameKind::RoundEnd,
            5 => FrameKind::DeviceState,
            6 => FrameKind::Switchover,
            7 => FrameKind::Ready,
            8 => FrameKind::Complete,
            9 => FrameKind::Verified,
            10 => FrameKind::Abort,
            _ => return None,
        })
    }
}

/// How a page's payload encodes its contents. Values above those listed are reserved for the
/// content pipeline (LZ4, delta, dedup reference) and rejected by this version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageEncoding {
    /// The payload is the page, byte for byte.
    Raw = 0,
    /// The page is all zeroes; the payload is empty.
    Zero = 1,
}

impl PageEncoding {
    fn from_u8(v: u8) -> Option<PageEncoding> {
        match v {
            0 => Some(PageEncoding::Raw),
            1 => Some(PageEncoding::Zero),
            _ => None,
        }
    }
}

/// Why a side aborted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[repr(u16)]
pub enum AbortCode {
    /// No reason given (or a code this version does not know).
    Unspecified = 0,
    /// A frame could not be decoded.
    BadFrame = 1,
    /// The peers cannot migrate this guest.
    Incompatible = 2,
    /// The host failed.
    HostFailure = 3,
    /// The digests differ.
    DigestMismatch = 4,
    /// An operator or the transport ended the migration.
    Cancelled = 5,
    /// A frame arrived out of order or named something invalid.
    ProtocolViolation = 6,
}

impl AbortCode {
    fn from_u16(v: u16) -> AbortCode {
        match v {
            1 => AbortCode::BadFrame,
            2 => AbortCode::Incompatible,
            3 => AbortCode::HostFailure,
            4 => AbortCode::DigestMismatch,
            5 => AbortCode::Cancelled,
            6 => AbortCode::ProtocolViolation,
            _ => AbortCode::Unspecified,
        }
    }
}

/// Why bytes are not a valid frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// More bytes are needed: the frame is `needed` bytes long in all (or at least that long, if
    /// even the header is incomplete). Not an error on a stream; wait for more input.
    Incomplete {
        /// Bytes the frame needs in all.
        needed: usize,
    },
    /// The length field is below the minimum or above [`MAX_FRAME_LEN`].
    BadLength(u32),
    /// The checksum does not match the bytes.
    BadChecksum {
        /// The checksum in the frame.
        carried: u64,
        /// The checksum of the bytes received.
        computed: u64,
    },
    /// The kind byte names no frame.
    UnknownKind(u8),
    /// Reserved header bits are set.
    ReservedBitsSet,
    /// The body is the wrong size for its kind.
    BadBodyLength {
        /// The frame's kind.
        kind: FrameKind,
        /// The body's length.
        len: usize,
    },
    /// The hello does not start with [`MAGIC`]: not a memferry stream.
    BadMagic,
    /// A page encoding this version does not know.
    UnknownEncoding(u8),
    /// A page shift outside 12..=21.
    BadPageShift(u8),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Incomplete { needed } => write!(f, "incomplete frame: {needed} bytes needed"),
            WireError::BadLength(l) => write!(
                f,
                "frame length {l} is outside {}..={MAX_FRAME_LEN}",
                FRAME_OVERHEAD
            ),
            WireError::BadChecksum { carried, computed } => write!(
                f,
                "checksum mismatch (frame says {carried:#018x}, bytes hash to {computed:#018x}): corrupted in transit"
            ),
            WireError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            WireError::ReservedBitsSet => write!(f, "reserved header bits are set"),
            WireError::BadBodyLength { kind, len } => {
                write!(f, "a {kind:?} frame cannot have a {len}-byte body")
            }
            WireError::BadMagic => write!(f, "not a memferry stream (bad magic in hello)"),
            WireError::UnknownEncoding(e) => write!(f, "unknown page encoding {e}"),
            WireError::BadPageShift(s) => write!(f, "page shift {s} is outside 12..=21"),
        }
    }
}

/// A decoded frame, borrowing its payload from the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Source opens the stream.
    Hello(Hello),
    /// Destination accepts.
    Accept {
        /// The destination's protocol version.
        version: u16,
        /// Features the destination accepted.
        features: u64,
    },
    /// One page.
    Page {
        /// Page index (not yet checked against the guest).
        index: u64,
        /// How the payload encodes the page.
        encoding: PageEncoding,
        /// The payload.
        payload: &'a [u8],
    },
    /// End of a round.
    RoundEnd {
        /// Round number, from 1.
        round: u32,
        /// Page frames the source sent in this round.
        pages: u64,
    },
    /// CPU and device state.
    DeviceState(&'a [u8]),
    /// Everything sent.
    Switchover {
        /// Rounds sent, stop-and-copy included.
        rounds: u32,
        /// Whether a `Complete` frame with the source's digest follows.
        digest_follows: bool,
    },
    /// Destination runs.
    Ready,
    /// Source's digest.
    Complete {
        /// Memory digest (see [`crate::digest`]).
        digest: u64,
    },
    /// Destination's verdict.
    Verified {
        /// Whether the digests match, or whether the destination checked at all.
        verdict: Verdict,
        /// The destination's digest (zero when not checked).
        digest: u64,
    },
    /// A side gives up.
    Abort {
        /// Why.
        code: AbortCode,
        /// Message bytes (UTF-8 from this crate; treat as untrusted).
        message: &'a [u8],
    },
}

/// The destination's verdict on the source's digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Verdict {
    /// The digests differ.
    Mismatch = 0,
    /// The digests match.
    Match = 1,
    /// The destination keeps no page hashes and did not check.
    NotChecked = 2,
}

/// The hello that opens a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The source's protocol version.
    pub version: u16,
    /// log2 of the page size.
    pub page_shift: u8,
    /// Pages in the guest.
    pub page_count: u64,
    /// Features the source will use (none are defined in version 1).
    pub features: u64,
}

const HELLO_BODY: usize = 4 + 2 + 1 + 1 + 8 + 8;

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Reads the length of the frame at the start of `buf` without checking its checksum:
/// `Ok(None)` if fewer than 4 bytes are there. Errors if the length is out of bounds, so a reader
/// can refuse to buffer a hostile length before allocating for it.
pub fn peek_frame_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = le_u32(buf, 0);
    if (len as usize) < FRAME_OVERHEAD || len as usize > MAX_FRAME_LEN {
        return Err(WireError::BadLength(len));
    }
    Ok(Some(len as usize))
}

impl<'a> Frame<'a> {
    /// Decodes the frame at the start of `buf`, returning it and its length in bytes.
    /// Returns [`WireError::Incomplete`] if `buf` holds only part of it.
    pub fn parse(buf: &'a [u8]) -> Result<(Frame<'a>, usize), WireError> {
        let len = match peek_frame_len(buf)? {
            None => {
                return Err(WireError::Incomplete {
                    needed: FRAME_OVERHEAD,
                })
            }
            Some(len) => len,
        };
        if buf.len() < len {
            return Err(WireError::Incomplete { needed: len });
        }
        let frame = &buf[..len];
        let carried = le_u64(frame, len - TRAILER_LEN);
        let computed = xxh3_64(&frame[..len - TRAILER_LEN]);
        if carried != computed {
            return Err(WireError::BadChecksum { carried, computed });
        }
        let kind = FrameKind::from_u8(frame[4]).ok_or(WireError::UnknownKind(frame[4]))?;
        if frame[5] != 0 || le_u16(frame, 6) != 0 {
            return Err(WireError::ReservedBitsSet);
        }
        let body = &frame[HEADER_LEN..len - TRAILER_LEN];
        Ok((Self::parse_body(kind, body)?, len))
    }

    fn parse_body(kind: FrameKind, body: &'a [u8]) -> Result<Frame<'a>, WireError> {
        let bad_len = || WireError::BadBodyLength {
            kind,
            len: body.len(),
        };
        let exact = |n: usize| {
            if body.len() == n {
                Ok(())
            } else {
                Err(bad_len())
            }
        };
        Ok(match kind {
            FrameKind::Hello => {
                exact(HELLO_BODY)?;
                if body[..4] != MAGIC {
                    return Err(WireError::BadMagic);
                }
                let page_shift = body[6];
                if !(12..=21).contains(&page_shift) {
                    return Err(WireError::BadPageShift(page_shift));
                }
                if body[7] != 0 {
                    return Err(WireError::ReservedBitsSet);
                }
                Frame::Hello(Hello {
                    version: le_u16(body, 4),
                    page_shift,
                    page_count: le_u64(body, 8),
                    features: le_u64(body, 16),
                })
            }
            FrameKind::Accept => {
                exact(16)?;
                if body[2..8].iter().any(|&b| b != 0) {
                    return Err(WireError::ReservedBitsSet);
                }
                Frame::Accept {
                    version: le_u16(body, 0),
                    features: le_u64(body, 8),
                }
            }
            FrameKind::Page => {
                if body.len() < PAGE_BODY_FIXED {
                    return Err(bad_len());
                }
                let encoding =
                    PageEncoding::from_u8(body[8]).ok_or(WireError::UnknownEncoding(body[8]))?;
                Frame::Page {
                    index: le_u64(body, 0),
                    encoding,
                    payload: &body[PAGE_BODY_FIXED..],
                }
            }
            FrameKind::RoundEnd => {
                exact(16)?;
                if le_u32(body, 4) != 0 {
                    return Err(WireError::ReservedBitsSet);
                }
                Frame::RoundEnd {
                    round: le_u32(body, 0),
                    pages: le_u64(body, 8),
                }
            }
            FrameKind::DeviceState => Frame::DeviceState(body),
            FrameKind::Switchover => {
                exact(8)?;
                let flags = le_u32(body, 4);
                if flags & !1 != 0 {
                    return Err(WireError::ReservedBitsSet);
                }
                Frame::Switchover {
                    rounds: le_u32(body, 0),
                    digest_follows: flags & 1 != 0,
                }
            }
            FrameKind::Ready => {
                exact(0)?;
                Frame::Ready
            }
            FrameKind::Complete => {
                exact(8)?;
                Frame::Complete {
                    digest: le_u64(body, 0),
                }
            }
            FrameKind::Verified => {
                exact(16)?;
                let verdict = match body[0] {
                    0 => Verdict::Mismatch,
                    1 => Verdict::Match,
                    2 => Verdict::NotChecked,
                    _ => return Err(WireError::ReservedBitsSet),
                };
                if body[1..8].iter().any(|&b| b != 0) {
                    return Err(WireError::ReservedBitsSet);
                }
                Frame::Verified {
                    verdict,
                    digest: le_u64(body, 8),
                }
            }
            FrameKind::Abort => {
                if body.len() < 2 {
                    return Err(bad_len());
                }
                Frame::Abort {
                    code: AbortCode::from_u16(le_u16(body, 0)),
                    message: &body[2..],
                }
            }
        })
    }

    /// The kind of this frame.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Hello(_) => FrameKind::Hello,
            Frame::Accept { .. } => FrameKind::Accept,
            Frame::Page { .. } => FrameKind::Page,
            Frame::RoundEnd { .. } => FrameKind::RoundEnd,
            Frame::DeviceState(_) => FrameKind::DeviceState,
            Frame::Switchover { .. } => FrameKind::Switchover,
            Frame::Ready => FrameKind::Ready,
            Frame::Complete { .. } => FrameKind::Complete,
            Frame::Verified { .. } => FrameKind::Verified,
            Frame::Abort { .. } => FrameKind::Abort,
        }
    }

    /// Appends this frame's encoding to `out` and returns its length. Panics if the body would
    /// exceed [`MAX_BODY_LEN`] (device state that large must be split by the caller).
    pub fn emit(&self, out: &mut Vec<u8>) -> usize {
        let start = begin_frame(out, self.kind());
        match *self {
            Frame::Hello(h) => {
                out.extend_from_slice(&MAGIC);
                out.extend_from_slice(&h.version.to_le_bytes());
                out.push(h.page_shift);
                out.push(0);
                out.extend_from_slice(&h.page_count.to_le_bytes());
                out.extend_from_slice(&h.features.to_le_bytes());
            }
            Frame::Accept { version, features } => {
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(&[0; 6]);
                out.extend_from_slice(&features.to_le_bytes());
            }
            Frame::Page {
                index,
                encoding,
                payload,
            } => {
                out.extend_from_slice(&index.to_le_bytes());
                out.push(encoding as u8);
                out.extend_from_slice(payload);
            }
            Frame::RoundEnd { round, pages } => {
                out.extend_from_slice(&round.to_le_bytes());
                out.extend_from_slice(&[0; 4]);
                out.extend_from_slice(&pages.to_le_bytes());
            }
            Frame::DeviceState(bytes) => out.extend_from_slice(bytes),
            Frame::Switchover {
                rounds,
                digest_follows,
            } => {
                out.extend_from_slice(&rounds.to_le_bytes());
                out.extend_from_slice(&(digest_follows as u32).to_le_bytes());
            }
            Frame::Ready => {}
            Frame::Complete { digest } => out.extend_from_slice(&digest.to_le_bytes()),
            Frame::Verified { verdict, digest } => {
                out.push(verdict as u8);
                out.extend_from_slice(&[0; 7]);
                out.extend_from_slice(&digest.to_le_bytes());
            }
            Frame::Abort { code, message } => {
                out.extend_from_slice(&(code as u16).to_le_bytes());
                out.extend_from_slice(&message[..message.len().min(MAX_ABORT_MESSAGE)]);
            }
        }
        finish_frame(out, start)
    }
}

fn begin_frame(out: &mut Vec<u8>, kind: FrameKind) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, kind as u8, 0, 0, 0]);
    start
}

fn finish_frame(out: &mut Vec<u8>, start: usize) -> usize {
    let len = out.len() - start + TRAILER_LEN;
    assert!(
        len <= MAX_FRAME_LEN,
        "frame of {len} bytes exceeds MAX_FRAME_LEN"
    );
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    let sum = xxh3_64(&out[start..]);
    out.extend_from_slice(&sum.to_le_bytes());
    len
}

/// Cuts `message` to at most [`MAX_ABORT_MESSAGE`] bytes at a UTF-8 character boundary.
pub fn abort_message(message: &str) -> &[u8] {
    let mut end = message.len().min(MAX_ABORT_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message.as_bytes()[..end]
}

/// Writes a page frame whose payload is filled in place, so a page goes from guest memory to
/// the output buffer in one copy.
pub struct PageFrameWriter;

impl PageFrameWriter {
    /// Appends a page frame for `index` to `out`: `fill` receives the `page_size`-byte payload
    /// area to copy the page into. An all-zero page is sent as [`PageEncoding::Zero`] with no
    /// payload. Returns the frame's length and encoding, or `fill`'s error (with `out` restored).
    pub fn write<E>(
        out: &mut Vec<u8>,
        index: u64,
        page_size: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(usize, PageEncoding), E> {
        let start = begin_frame(out, FrameKind::Page);
        out.extend_from_slice(&index.to_le_bytes());
        out.push(PageEncoding::Raw as u8);
        let payload_at = out.len();
        out.resize(payload_at + page_size, 0);
        if let Err(e) = fill(&mut out[payload_at..]) {
            out.truncate(start);
            return Err(e);
        }
        let encoding = if is_zero(&out[payload_at..]) {
            out.truncate(payload_at);
            out[payload_at - 1] = PageEncoding::Zero as u8;
            PageEncoding::Zero
        } else {
            PageEncoding::Raw
        };
        Ok((finish_frame(out, start), encoding))
    }
}

/// Whether `data` is all zero bytes (16 bytes at a time, which the compiler vectorises).
pub fn is_zero(data: &[u8]) -> bool {
    let mut chunks = data.chunks_exact(16);
    let mut acc = 0u128;
    for c in &mut chunks {
        let mut a = [0u8; 16];
        a.copy_from_slice(c);
        acc |= u128::from_ne_bytes(a);
    }
    acc == 0 && chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all_frames(payload: &[u8]) -> Vec<Frame<'_>> {
        vec![
            Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                page_shift: 12,
                page_count: 1 << 28,
                features: 0,
            }),
            Frame::Accept {
                version: 1,
                features: 0,
            },
            Frame::Page {
                index: 42,
                encoding: PageEncoding::Raw,
                payload,
            },
            Frame::Page {
                index: 7,
                encoding: PageEncoding::Zero,
                payload: &[],
            },
            Frame::RoundEnd {
                round: 3,
                pages: 99,
            },
            Frame::DeviceState(payload),
            Frame::Switchover {
                rounds: 4,
                digest_follows: true,
            },
            Frame::Ready,
            Frame::Complete {
                digest: 0xdead_beef,
            },
            Frame::Verified {
                verdict: Verdict::Match,
                digest: 5,
            },
            Frame::Abort {
                code: AbortCode::DigestMismatch,
                message: b"nope",
            },
        ]
    }

    #[test]
    fn every_frame_round_trips_back_to_back() {
        let payload: Vec<u8> = (0..4096).map(|i| i as u8).collect();
        let frames = all_frames(&payload);
        let mut out = Vec::new();
        for f in &frames {
            f.emit(&mut out);
        }
        let mut at = 0;
        for f in &frames {
            let (parsed, len) = Frame::parse(&out[at..]).unwrap();
            assert_eq!(&parsed, f);
            at += len;
        }
        assert_eq!(at, out.len());
    }

    #[test]
    fn truncation_is_incomplete_and_corruption_is_caught() {
        let payload = [9u8; 4096];
        let mut out = Vec::new();
        let len = Frame::Page {
            index: 1,
            encoding: PageEncoding::Raw,
            payload: &payload,
        }
        .emit(&mut out);
        for cut in [0, 3, 4, 100, len - 1] {
            assert!(matches!(
                Frame::parse(&out[..cut]),
                Err(WireError::Incomplete { .. })
            ));
        }
        for flip in [4, 8, 20, len - 9, len - 1] {
            let mut bad = out.clone();
            bad[flip] ^= 0x10;
            assert!(matches!(
                Frame::parse(&bad),
                Err(WireError::BadChecksum { .. })
            ));
        }
        let mut huge = out.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Frame::parse(&huge), Err(WireError::BadLength(u32::MAX)));
    }

    #[test]
    fn page_writer_fills_in_place_and_detects_zero() {
        let mut out = Vec::new();
        let (len, enc) = PageFrameWriter::write::<()>(&mut out, 5, 4096, |buf| {
            buf[100] = 1;
            Ok(())
        })
        .unwrap();
        assert_eq!((len, enc), (page_frame_len(4096), PageEncoding::Raw));
        let (zlen, zenc) = PageFrameWriter::write::<()>(&mut out, 6, 4096, |_| Ok(())).unwrap();
        assert_eq!((zlen, zenc), (page_frame_len(0), PageEncoding::Zero));
        let (f, used) = Frame::parse(&out).unwrap();
        assert!(
            matches!(f, Frame::Page { index: 5, encoding: PageEncoding::Raw, payload } if payload[100] == 1)
        );
        let (f, _) = Frame::parse(&out[used..]).unwrap();
        assert_eq!(
            f,
            Frame::Page {
                index: 6,
                encoding: PageEncoding::Zero,
                payload: &[]
            }
        );
        let before = out.len();
        assert_eq!(
            PageFrameWriter::write(&mut out, 7, 4096, |_| Err("io")),
            Err("io")
        );
        assert_eq!(out.len(), before);
    }

    #[test]
    fn abort_message_is_cut_at_char_boundary() {
        let long = "é".repeat(1000);
        let cut = abort_message(&long);
        assert!(cut.len() <= MAX_ABORT_MESSAGE);
        assert!(core::str::from_utf8(cut).is_ok());
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Frame::parse(&bytes);
        }

        #[test]
        fn parse_never_panics_on_valid_checksums(kind in 0u8..14, body in proptest::collection::vec(any::<u8>(), 0..64)) {
            // Random bodies behind a correct checksum reach the per-kind parsers.
            let mut out = vec![0, 0, 0, 0, kind, 0, 0, 0];
            out.extend_from_slice(&body);
            let len = (out.len() + TRAILER_LEN) as u32;
            out[..4].copy_from_slice(&len.to_le_bytes());
            let sum = xxh3_64(&out);
            out.extend_from_slice(&sum.to_le_bytes());
            if let Ok((frame, used)) = Frame::parse(&out) {
                prop_assert_eq!(used, out.len());
                // Unknown abort codes decode as Unspecified, so only other frames re-encode exactly.
                if frame.kind() == FrameKind::Abort {
                    return Ok(());
                }
                let mut again = Vec::new();
                frame.emit(&mut again);
                prop_assert_eq!(again, out);
            }
        }
    }
}
