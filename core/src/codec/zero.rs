//! Zero-page detection, the cheapest saving there is.
//!
//! A whole VM's free memory is mostly zero, and a zero page goes as an entry header only. Every
//! page the engine sends is checked first, so the check must cost far less than sending the page:
//! [`is_zero_page`] ORs the page together 256 bytes at a time as 64-bit words (a reduction the
//! compiler turns into SIMD: SSE2 on any x86-64, AVX2 with `-C target-cpu=native`) and stops at
//! the first block with a set bit, so a data page is usually rejected after its first block.
//! A byte-at-a-time `iter().all(|b| *b == 0)` reads one byte per step and is not vectorised
//! because of its early exit; the bench `codec/zero_check` compares the two.
//!
//! Safe code only: the word loads are `from_ne_bytes` on `chunks_exact` pieces, whose length
//! checks the compiler removes.

/// Bytes checked between two early-exit tests: long enough for the OR reduction to run on whole
/// vector registers, short enough that a data page is rejected after a few nanoseconds.
pub const BLOCK: usize = 256;

/// Whether `data` is all zero bytes. Any length; word-wide over [`BLOCK`]-byte blocks.
#[inline]
pub fn is_zero_page(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(BLOCK);
    for block in &mut blocks {
        if or_words(block) != 0 {
            return false;
        }
    }
    let rest = blocks.remainder();
    let mut words = rest.chunks_exact(8);
    let acc = (&mut words).fold(0u64, |acc, w| acc | word(w));
    acc == 0 && words.remainder().iter().all(|&b| b == 0)
}

/// The OR of `block`'s 8-byte words (`block.len()` a multiple of 8).
#[inline(always)]
fn or_words(block: &[u8]) -> u64 {
    block.chunks_exact(8).fold(0u64, |acc, w| acc | word(w))
}

/// An 8-byte piece as a native-endian word (zero is zero in any byte order).
#[inline(always)]
fn word(w: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(w);
    u64::from_ne_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_position_counts() {
        for len in [0usize, 1, 7, 8, 9, 255, 256, 257, 4095, 4096, 4100] {
            let mut p = alloc::vec![0u8; len];
            assert!(is_zero_page(&p), "len {len}");
            for i in 0..len {
                p[i] = 0x80;
                assert!(!is_zero_page(&p), "len {len} byte {i}");
                p[i] = 0;
            }
        }
    }
}
