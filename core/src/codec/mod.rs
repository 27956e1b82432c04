//! A place for codecs: how a page's bytes become a payload and back.
//!
//! [`PageEncoder`] and [`PageDecoder`] are the seams the content pipeline (LZ4, XBZRLE delta,
//! dedup references) plugs into. Two rules keep them safe:
//! - an encoder works on a **private copy** of the page (a codec that read live guest memory
//!   twice could disagree with itself: compress one version, checksum another);
//! - a decoder writes into a **scratch page** that the receiver then checks and writes to guest
//!   memory; untrusted input never lands in guest memory straight from the wire.
//!
//! Built in: [`Raw`] (the page as is) and zero detection ([`is_zero_page`]), which every
//! encode tries first. [`encode_page`] is the whole encoding step as a pure function of the
//! page copy and the codec's state, so N worker threads with N encoders can run it in parallel
//! while the engine alone decides which pages go.
//!
//! The codecs, one module each:
//!
//! | module | encoder | decoder | [`Encoding`] | the decoder needs |
//! | --- | --- | --- | --- | --- |
//! | [`zero`] | (every encode) | (built in) | `ZERO` (1) | nothing |
//! | [`lz4`] | [`lz4::Lz4Encoder`] | [`lz4::Lz4Decoder`] | [`Encoding::LZ4`] (2) | nothing |
//! | [`xbzrle`] | [`xbzrle::DeltaEncoder`] | [`xbzrle::DeltaDecoder`] | [`Encoding::XBZRLE`] (3) | the destination's current copy in the scratch page |
//! | [`lz4`] | [`lz4::DeltaLz4Encoder`] | [`lz4::DeltaLz4Decoder`] | [`Encoding::XBZRLE_LZ4`] (4) | the same |
//! | [`dedup`] | [`dedup::DedupEncoder`] | [`dedup::ReferenceDecoder`] / [`dedup::resolve`] | [`Encoding::REFERENCE`] (5) | reads of the destination's memory |
//! | [`adaptive`] | [`adaptive::Adaptive`] | all of the above | 2–5 | all of the above |
//!
//! Stateful encoders (delta, dedup, adaptive) keep a picture of what the destination holds, so:
//! the session tells them each new round ([`PageEncoder::begin_generation`]); every page sent
//! through [`encode_page`] is reported to the encoder, zero pages too ([`PageEncoder::sent_zero`],
//! which [`encode_page`] calls, also for pages the host knows are zero: pass the real encoder
//! there, not [`Raw`]); and a page always goes through the same encoder, in order, over one
//! channel, so the destination applies a delta or a reference after the copy it builds on.

pub mod adaptive;
pub mod dedup;
pub mod lz4;
pub mod xbzrle;
pub mod zero;

pub use zero::is_zero_page;

use crate::wire::{Encoding, PagesWriter};

/// The encodings of this module's codecs (the wire numbers; `RAW` = 0 and `ZERO` = 1 are in
/// [`crate::wire`]).
impl Encoding {
    /// One LZ4 block (lz4_flex), no size prefix; decompresses to exactly one page.
    pub const LZ4: Encoding = Encoding(2);
    /// An XBZRLE delta (QEMU's format) against the destination's current copy.
    pub const XBZRLE: Encoding = Encoding(3);
    /// An XBZRLE delta compressed with LZ4 (no size prefix; at most one page once decompressed).
    pub const XBZRLE_LZ4: Encoding = Encoding(4);
    /// A reference: (source page index u64 LE, xxh3-128 content hash u128 LE), 24 bytes.
    pub const REFERENCE: Encoding = Encoding(5);
}

/// Turns a page into a payload.
pub trait PageEncoder: Send {
    /// A short name for reports.
    fn name(&self) -> &'static str;
    /// Encodes `page` (a private copy; its length is the page size) of dense index `index`
    /// into `out` (at least as long as the page). Returns the encoding used and the payload
    /// length, or `None` to send the page raw (the encoding would not save anything).
    fn encode(&mut self, index: u64, page: &[u8], out: &mut [u8]) -> Option<(Encoding, usize)>;

    /// A new round starts: the pages encoded from now on go in `Pages` frames of `generation`.
    /// Stateful encoders (deltas) need it; the default ignores it.
    fn begin_generation(&mut self, generation: u32) {
        let _ = generation;
    }

    /// Page `index` was sent as a zero page (header only) without [`PageEncoder::encode`]
    /// seeing it; [`encode_page`] calls this. Stateful encoders forget or zero what they held
    /// for the page; the default ignores it.
    fn sent_zero(&mut self, index: u64) {
        let _ = index;
    }

    /// Whether the encoder keeps a picture of what the destination holds (a delta cache, a
    /// dedup index): then every version of a page must go through this same encoder, in order,
    /// and over one connection. With one such encoder per channel, the session must deal pages
    /// to channels by [`crate::session::SessionConfig::channel_affinity`]. Default: no.
    fn keeps_state(&self) -> bool {
        false
    }
}

/// Turns a payload back into a page.
pub trait PageDecoder: Send {
    /// The encoding this decoder reads.
    fn encoding(&self) -> Encoding;
    /// Decodes `payload` for page `index` into `scratch` (one page). Must not panic on any
    /// input; returns a reason on a payload that does not decode to exactly one page.
    fn decode(
        &mut self,
        index: u64,
        payload: &[u8],
        scratch: &mut [u8],
    ) -> Result<(), &'static str>;

    /// Whether `scratch` must hold the destination's current copy of the page when
    /// [`PageDecoder::decode`] is called (deltas apply onto it). Default: no, the decoder
    /// writes the whole page.
    fn needs_current_page(&self) -> bool {
        false
    }
}

/// The identity encoder: every page goes raw (after the zero check).
#[derive(Clone, Copy, Debug, Default)]
pub struct Raw;

impl PageEncoder for Raw {
    fn name(&self) -> &'static str {
        "raw"
    }
    fn encode(&mut self, _index: u64, _page: &[u8], _out: &mut [u8]) -> Option<(Encoding, usize)> {
        None
    }
}

/// What [`encode_page`] did with a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// The encoding chosen.
    pub encoding: Encoding,
    /// Bytes the entry takes in the frame (entry header and payload).
    pub wire_bytes: usize,
}

/// Encodes one page into the open `Pages` frame `writer`: zero pages as a header only, then
/// `encoder`'s choice, else raw. `page` is the private copy (`None` when the host knows the page
/// is zero). Returns `None` if the entry does not fit (nothing is written then). A zero page is
/// reported to `encoder` ([`PageEncoder::sent_zero`]).
pub fn encode_page(
    writer: &mut PagesWriter<'_>,
    index: u64,
    page: Option<&[u8]>,
    page_size: usize,
    encoder: &mut dyn PageEncoder,
) -> Option<Encoded> {
    let slot = writer.begin_page(index, page_size)?;
    let (encoding, len) = match page {
        None => (Encoding::ZERO, 0),
        Some(p) if is_zero_page(p) => (Encoding::ZERO, 0),
        Some(p) => match encoder.encode(index, p, slot) {
            Some((e, n)) if n < page_size && e != Encoding::RAW && e != Encoding::ZERO => (e, n),
            _ => {
                slot.copy_from_slice(p);
                (Encoding::RAW, page_size)
            }
        },
    };
    if encoding == Encoding::ZERO {
        encoder.sent_zero(index);
    }
    let wire_bytes = writer.commit_page(encoding, len);
    Some(Encoded {
        encoding,
        wire_bytes,
    })
}

/// The raw path in one copy: `fill` copies the page from guest memory straight into its slot in
/// the frame (the slot is the private copy), then the zero check runs on it. Returns `Ok(None)`
/// if the entry does not fit, or `fill`'s error (the entry is dropped). No encoder sees the page:
/// for sessions without one (a stateful encoder must see every page, through [`encode_page`]).
pub fn encode_page_raw<E>(
    writer: &mut PagesWriter<'_>,
    index: u64,
    page_size: usize,
    fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
) -> Result<Option<Encoded>, E> {
    let Some(slot) = writer.begin_page(index, page_size) else {
        return Ok(None);
    };
    fill(slot)?;
    let encoding = if is_zero_page(slot) {
        Encoding::ZERO
    } else {
        Encoding::RAW
    };
    let len = if encoding == Encoding::RAW {
        page_size
    } else {
        0
    };
    let wire_bytes = writer.commit_page(encoding, len);
    Ok(Some(Encoded {
        encoding,
        wire_bytes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Frame;

    /// A toy run-length encoder for one repeated byte, to exercise the seam.
    struct Fill;
    impl PageEncoder for Fill {
        fn name(&self) -> &'static str {
            "fill"
        }
        fn encode(&mut self, _: u64, page: &[u8], out: &mut [u8]) -> Option<(Encoding, usize)> {
            page.iter().all(|&b| b == page[0]).then(|| {
                out[0] = page[0];
                (Encoding(9), 1)
            })
        }
    }

    #[test]
    fn zero_custom_and_raw_choices() {
        let mut buf = vec![0u8; 4 * 4096];
        let mut w = PagesWriter::new(&mut buf, 1, true).unwrap();
        let zero = [0u8; 4096];
        let same = [7u8; 4096];
        let mut mixed = [7u8; 4096];
        mixed[5] = 1;
        let e = encode_page(&mut w, 0, Some(&zero), 4096, &mut Fill).unwrap();
        assert_eq!(e.encoding, Encoding::ZERO);
        let e = encode_page(&mut w, 1, Some(&same), 4096, &mut Fill).unwrap();
        assert_eq!((e.encoding, e.wire_bytes), (Encoding(9), 17));
        let e = encode_page(&mut w, 2, Some(&mixed), 4096, &mut Fill).unwrap();
        assert_eq!(e.encoding, Encoding::RAW);
        let e = encode_page_raw::<()>(&mut w, 3, 4096, |s| {
            s.fill(0);
            Ok(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(e.encoding, Encoding::ZERO);
        let len = w.finish();
        let (Frame::Pages { entries, .. }, _) = Frame::parse(&buf[..len]).unwrap() else {
            panic!()
        };
        let got: Vec<_> = entries.iter().map(|e| e.unwrap()).collect();
        assert_eq!(got.len(), 4);
        assert_eq!(got[2].payload, &mixed[..]);
    }
}
