//! Helpers shared by the fuzz targets in `fuzz_targets/`.
//!
//! A random 64-bit checksum guards every frame, so arbitrary bytes almost never get past
//! [`memferry::wire::Frame::parse`]'s checksum test to the checks behind it. [`fix_checksums`]
//! rewrites the checksums of the frames an input lays out, keeping every other byte as the
//! fuzzer chose it, so those checks are fuzzed too.

use memferry::digest::page_hash;
use memferry::wire::{peek_frame_len, TRAILER_LEN};

/// Rewrites the checksum of each frame laid out back to back from the start of `stream`,
/// stopping at the first length that is out of bounds or runs past the end. Returns the number
/// of bytes covered: every frame within them has a valid checksum.
///
/// The frame checksum is xxh3-64 of the frame up to its trailer, which is the same function as
/// memferry's page hash; `frame_decode` panics if that ever stops being true.
pub fn fix_checksums(stream: &mut [u8]) -> usize {
    let mut at = 0;
    while let Ok(Some(len)) = peek_frame_len(&stream[at..]) {
        if stream.len() - at < len {
            break;
        }
        let frame = &mut stream[at..at + len];
        let (covered, trailer) = frame.split_at_mut(len - TRAILER_LEN);
        trailer.copy_from_slice(&page_hash(covered).to_le_bytes());
        at += len;
    }
    at
}
