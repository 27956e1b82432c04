//! Helpers shared by the fuzz targets in `fuzz_targets/`.
//!
//! A random 64-bit checksum guards every frame, so arbitrary bytes almost never get past
//! [`memferry::wire::Frame::parse`]'s checksum test to the checks behind it. [`fix_checksums`]
//! rewrites the checksums of the frames an input lays out, keeping every other byte as the
//! fuzzer chose it, so those checks are fuzzed too. [`Input`] reads fuzz bytes as numbers, and
//! [`layout`] is the two-region guest every stateful target migrates.

use memferry::page::{MemoryLayout, PageSize, Region};
use memferry::wire::{peek_frame_len, FLAG_UNCHECKED, FRAME_OVERHEAD, TRAILER_LEN};
use xxhash_rust::xxh3::xxh3_64;

/// The wire checksum of a frame's bytes up to its trailer (xxh3-64, as `memferry::wire` computes
/// it; `frame_decode` panics if the two ever disagree).
pub fn frame_checksum(covered: &[u8]) -> u64 {
    xxh3_64(covered)
}

/// Rewrites the checksum of each frame laid out back to back from the start of `stream`,
/// stopping at the first length that is out of bounds or runs past the end. Frames marked
/// unchecked ([`FLAG_UNCHECKED`]) carry no trailer and are left as they are. Returns the number
/// of bytes covered: every checked frame within them has a valid checksum.
pub fn fix_checksums(stream: &mut [u8]) -> usize {
    let mut at = 0;
    while let Ok(Some(len)) = peek_frame_len(&stream[at..]) {
        if stream.len() - at < len {
            break;
        }
        let frame = &mut stream[at..at + len];
        if frame.len() > 5 && frame[5] & FLAG_UNCHECKED == 0 {
            if len < FRAME_OVERHEAD {
                break;
            }
            let (covered, trailer) = frame.split_at_mut(len - TRAILER_LEN);
            trailer.copy_from_slice(&frame_checksum(covered).to_le_bytes());
        }
        at += len;
    }
    at
}

/// Fuzz bytes read front to back as numbers; reads past the end give zeroes.
pub struct Input<'a> {
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Input { bytes }
    }

    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// What is left.
    pub fn rest(&self) -> &'a [u8] {
        self.bytes
    }

    /// The next byte (0 at the end).
    pub fn byte(&mut self) -> u8 {
        let (&first, rest) = self.bytes.split_first().unwrap_or((&0, &[]));
        self.bytes = rest;
        first
    }

    /// The next `n` bytes, or fewer at the end.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.bytes.split_at(n.min(self.bytes.len()));
        self.bytes = rest;
        taken
    }

    /// The next little-endian u64 (zero-padded at the end).
    pub fn u64(&mut self) -> u64 {
        let mut le = [0u8; 8];
        let taken = self.bytes(8);
        le[..taken.len()].copy_from_slice(taken);
        u64::from_le_bytes(le)
    }

    /// The next little-endian u128 (zero-padded at the end).
    pub fn u128(&mut self) -> u128 {
        u128::from(self.u64()) | (u128::from(self.u64()) << 64)
    }
}

/// Pages of 4 KiB.
pub const PAGE: usize = 4096;

/// The regions of the guest the stateful targets migrate: two KVM-like memslots with a hole
/// between them, `pages_each` pages each (dense indices `0..2 * pages_each`).
pub fn regions(pages_each: u64) -> [Region; 2] {
    [
        Region {
            id: 0,
            guest_base: 0,
            pages: pages_each,
        },
        Region {
            id: 3,
            guest_base: 1 << 32,
            pages: pages_each,
        },
    ]
}

/// The layout of [`regions`].
pub fn layout(pages_each: u64) -> MemoryLayout {
    MemoryLayout::new(PageSize::DEFAULT, regions(pages_each).to_vec()).expect("a valid layout")
}
