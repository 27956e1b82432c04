//! LZ4 page compression (lz4_flex's block format), for pages with redundancy that were not sent
//! before: heaps of small integers and pointers, text, tables. Measured per-page ratios on real
//! programs are 1.6–2.6 (issue 17).
//!
//! The payload is one LZ4 block with **no size prefix**: the size is the page size both sides
//! agreed on. lz4_flex's size-prefixed decoder trusts the prefix (five bytes were measured to
//! request a 3.5 GB allocation), so untrusted payloads are decompressed only with
//! `decompress_into` into the fixed page buffer, and anything but exactly one page out is an
//! error. lz4_flex is built with `safe-encode` and `safe-decode` (no unsafe code, no_std).
//!
//! Also here: **LZ4 on delta output** ([`Encoding::XBZRLE_LZ4`]): an XBZRLE payload compressed
//! again, for pages whose changes themselves repeat (a counter in every record, a fill); see
//! [`DeltaLz4Encoder`] for when it is tried.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

use lz4_flex::block::{
    compress_into_with_table, decompress_into, get_maximum_output_size, CompressTable,
};

use super::xbzrle::{self, DeltaEncoder, DeltaError};
use super::{PageDecoder, PageEncoder};
use crate::wire::Encoding;

/// Why an LZ4 page payload was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lz4Error {
    /// Not a valid LZ4 block, or one that decompresses to more than a page.
    Malformed,
    /// A valid block that decompresses to fewer bytes than the page.
    Short {
        /// Bytes it decompressed to.
        got: usize,
        /// The page size.
        page: usize,
    },
    /// The XBZRLE payload inside an [`Encoding::XBZRLE_LZ4`] payload is malformed.
    Delta(DeltaError),
}

impl Lz4Error {
    /// A fixed description (what [`PageDecoder::decode`] returns).
    pub fn as_str(&self) -> &'static str {
        match self {
            Lz4Error::Malformed => "lz4 payload is not a block of at most one page",
            Lz4Error::Short { .. } => "lz4 payload decompresses to less than one page",
            Lz4Error::Delta(e) => e.as_str(),
        }
    }
}

impl fmt::Display for Lz4Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lz4Error::Short { got, page } => {
                write!(f, "{} ({got} of {page} bytes)", self.as_str())
            }
            Lz4Error::Delta(e) => write!(f, "in lz4-compressed delta: {e}"),
            Lz4Error::Malformed => f.write_str(self.as_str()),
        }
    }
}

impl core::error::Error for Lz4Error {}

/// Decompresses `payload` into `page`, which it must fill exactly. Never panics and never
/// allocates.
pub fn decompress_page(payload: &[u8], page: &mut [u8]) -> Result<(), Lz4Error> {
    match decompress_into(payload, page) {
        Ok(n) if n == page.len() => Ok(()),
        Ok(n) => Err(Lz4Error::Short {
            got: n,
            page: page.len(),
        }),
        Err(_) => Err(Lz4Error::Malformed),
    }
}

/// A reusable compressor: lz4_flex's hash table and an output buffer of the worst-case size
/// (lz4_flex refuses to compress into less, so the result is copied out when it is short).
#[derive(Default)]
pub struct Lz4Compressor {
    table: Box<CompressTable>,
    buf: Vec<u8>,
}

impl Lz4Compressor {
    /// Compresses `input` into `out` if the block is at most `out.len()` bytes; returns its
    /// length.
    pub fn compress(&mut self, input: &[u8], out: &mut [u8]) -> Option<usize> {
        let max = get_maximum_output_size(input.len());
        if self.buf.len() < max {
            self.buf.resize(max, 0);
        }
        let n = compress_into_with_table(input, &mut self.buf, &mut self.table).ok()?;
        let dst = out.get_mut(..n)?;
        dst.copy_from_slice(&self.buf[..n]);
        Some(n)
    }
}

/// Compresses pages with LZ4 ([`Encoding::LZ4`]); a page that does not shrink goes raw.
#[derive(Default)]
pub struct Lz4Encoder {
    compressor: Lz4Compressor,
}

impl PageEncoder for Lz4Encoder {
    fn name(&self) -> &'static str {
        "lz4"
    }

    fn encode(&mut self, _index: u64, page: &[u8], out: &mut [u8]) -> Option<(Encoding, usize)> {
        let limit = out.len().min(page.len().saturating_sub(1));
        let n = self.compressor.compress(page, &mut out[..limit])?;
        Some((Encoding::LZ4, n))
    }
}

/// Decodes [`Encoding::LZ4`] pages into the scratch page.
#[derive(Clone, Copy, Debug, Default)]
pub struct Lz4Decoder;

impl PageDecoder for Lz4Decoder {
    fn encoding(&self) -> Encoding {
        Encoding::LZ4
    }

    fn decode(
        &mut self,
        _index: u64,
        payload: &[u8],
        scratch: &mut [u8],
    ) -> Result<(), &'static str> {
        decompress_page(payload, scratch).map_err(|e| e.as_str())
    }
}

/// An XBZRLE delta compressed again with LZ4 when that makes it shorter
/// ([`Encoding::XBZRLE_LZ4`]; otherwise plain [`Encoding::XBZRLE`]). LZ4 is tried only on deltas
/// of at least [`DeltaLz4Encoder::MIN_DELTA`] bytes: shorter ones have too little to find.
pub struct DeltaLz4Encoder {
    delta: DeltaEncoder,
    compressor: Lz4Compressor,
    tmp: Vec<u8>,
}

impl DeltaLz4Encoder {
    /// Deltas shorter than this are sent as they are.
    pub const MIN_DELTA: usize = 128;

    /// Wraps `delta`.
    pub fn new(delta: DeltaEncoder) -> Self {
        DeltaLz4Encoder {
            delta,
            compressor: Lz4Compressor::default(),
            tmp: Vec::new(),
        }
    }

    /// The delta encoder inside.
    pub fn delta(&self) -> &DeltaEncoder {
        &self.delta
    }

    /// Compresses the delta in `out[..n]` if that helps; returns the encoding and length.
    pub(crate) fn squeeze(
        compressor: &mut Lz4Compressor,
        tmp: &mut Vec<u8>,
        out: &mut [u8],
        n: usize,
    ) -> (Encoding, usize) {
        if n < Self::MIN_DELTA {
            return (Encoding::XBZRLE, n);
        }
        if tmp.len() < n {
            tmp.resize(n, 0);
        }
        match compressor.compress(&out[..n], &mut tmp[..n - 1]) {
            Some(m) => {
                out[..m].copy_from_slice(&tmp[..m]);
                (Encoding::XBZRLE_LZ4, m)
            }
            None => (Encoding::XBZRLE, n),
        }
    }
}

impl PageEncoder for DeltaLz4Encoder {
    fn name(&self) -> &'static str {
        "xbzrle+lz4"
    }

    fn keeps_state(&self) -> bool {
        true
    }

    fn encode(&mut self, index: u64, page: &[u8], out: &mut [u8]) -> Option<(Encoding, usize)> {
        let limit = out.len().min(page.len().saturating_sub(1));
        let n = self.delta.encode_delta(index, page, &mut out[..limit])?;
        Some(Self::squeeze(
            &mut self.compressor,
            &mut self.tmp,
            &mut out[..limit],
            n,
        ))
    }

    fn begin_generation(&mut self, generation: u32) {
        self.delta.begin_generation(generation);
    }

    fn sent_zero(&mut self, index: u64) {
        self.delta.sent_zero(index);
    }
}

/// Decodes an [`Encoding::XBZRLE_LZ4`] payload onto `page` (the destination's current copy),
/// using `tmp` (any length; grown to a page) for the delta. `page` is unchanged on an error.
pub fn decode_delta_lz4(
    payload: &[u8],
    page: &mut [u8],
    tmp: &mut Vec<u8>,
) -> Result<(), Lz4Error> {
    if tmp.len() < page.len() {
        tmp.resize(page.len(), 0);
    }
    let tmp = &mut tmp[..page.len()];
    let n = decompress_into(payload, tmp).map_err(|_| Lz4Error::Malformed)?;
    xbzrle::decode(&tmp[..n], page).map_err(Lz4Error::Delta)
}

/// Decodes [`Encoding::XBZRLE_LZ4`] pages: like [`super::xbzrle::DeltaDecoder`], the scratch page
/// must hold the destination's current copy on entry.
#[derive(Clone, Debug, Default)]
pub struct DeltaLz4Decoder {
    tmp: Vec<u8>,
}

impl PageDecoder for DeltaLz4Decoder {
    fn encoding(&self) -> Encoding {
        Encoding::XBZRLE_LZ4
    }

    fn decode(
        &mut self,
        _index: u64,
        payload: &[u8],
        scratch: &mut [u8],
    ) -> Result<(), &'static str> {
        decode_delta_lz4(payload, scratch, &mut self.tmp).map_err(|e| e.as_str())
    }

    fn needs_current_page(&self) -> bool {
        true
    }
}
