//! Fuzzes hash-first transfer ([`memferry::hashfirst`]) on both sides, and the zstd page
//! decoder of the std adapters.
//!
//! Input: byte 0 picks the mode.
//! - Mode 0 (source): the rest is what a destination sends after its `Accept` (frames as bytes:
//!   `Have` lists, anything else); the source must take it or fail with an error, never panic,
//!   and never send a page as a hash the destination did not announce.
//! - Mode 1 (destination): the rest is a `KNOWN` payload resolved against a destination that
//!   holds four pages of content; an accepted payload must name one of them, and the scratch
//!   page then holds exactly its bytes.
//! - Mode 2 (zstd): the rest is a zstd page payload; the decoder must return one page or an
//!   error, never more.

#![no_main]

use libfuzzer_sys::fuzz_target;
use memferry::codec::PageDecoder;
use memferry::hashfirst::{ContentIndex, KnownContent};

const PAGE: usize = 4096;

fn content(seed: u8) -> Vec<u8> {
    (0..PAGE)
        .map(|i| (i as u8).wrapping_mul(seed | 1) ^ seed)
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            // Announced hashes, as the source takes them from `Have` frames.
            let mut known = KnownContent::new(7, 64);
            let hashes = rest
                .chunks_exact(16)
                .map(|c| u128::from_le_bytes(c.try_into().unwrap()));
            let _ = known.extend(hashes);
            assert!(known.len() <= 64, "the limit was not kept");
            let mut out = [0u8; 16];
            for seed in 0..4u8 {
                if let Some(n) = known.encode(&content(seed), &mut out) {
                    assert_eq!(n, 16);
                    let announced = rest.chunks_exact(16).any(|c| c == &out[..]);
                    assert!(announced, "a page sent as a hash nobody announced");
                }
            }
        }
        1 => {
            let pages: Vec<Vec<u8>> = (0..4).map(content).collect();
            let mut index = ContentIndex::build(Box::new(pages.clone()), 7, PAGE).unwrap();
            let mut scratch = vec![0u8; PAGE];
            if index.resolve(rest, &mut scratch).is_ok() {
                assert!(
                    pages.contains(&scratch),
                    "resolved to content it never held"
                );
            }
        }
        _ => {
            let mut decoder = memferry_std::codec::ZstdDecoder::default();
            let mut page = vec![0u8; PAGE];
            let _ = decoder.decode(0, rest, &mut page);
            assert_eq!(page.len(), PAGE);
        }
    }
});
