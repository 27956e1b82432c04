//! The whole-memory digest both sides agree on, order-independent so it can be kept up to date
//! as pages land (in any order, on any channel) and never folded during the downtime.
//!
//! A page's contribution is `xxh3-128(content, seed = dense page index)`: 128 bits, so two
//! different pages colliding is not a practical concern even over 2^28 pages and many
//! migrations (64 bits would collide about once in 500 migrations of that size). The digest is
//! the wrapping sum of the contributions; rewriting a page subtracts its old contribution and
//! adds the new one ([`MemoryDigest::replace`]). Including the index makes the digest see pages
//! swapped between places.
//!
//! [`content_hash`] is content identity alone (no index), for dedup and hash-first transfer.

use xxhash_rust::xxh3::{xxh3_128, xxh3_128_with_seed};

/// The contribution of page `index` holding `data`.
#[inline]
pub fn page_hash(index: u64, data: &[u8]) -> u128 {
    xxh3_128_with_seed(data, index)
}

/// The identity of `data` wherever it lies (xxh3-128).
#[inline]
pub fn content_hash(data: &[u8]) -> u128 {
    xxh3_128(data)
}

/// An order-independent digest of a set of pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MemoryDigest {
    sum: u128,
}

impl MemoryDigest {
    /// The digest of no pages.
    pub const fn new() -> Self {
        MemoryDigest { sum: 0 }
    }

    /// Adds a page's contribution ([`page_hash`]).
    #[inline]
    pub fn add(&mut self, hash: u128) {
        self.sum = self.sum.wrapping_add(hash);
    }

    /// Replaces a page's contribution `old` with `new` (the page was rewritten).
    #[inline]
    pub fn replace(&mut self, old: u128, new: u128) {
        self.sum = self.sum.wrapping_sub(old).wrapping_add(new);
    }

    /// Adds page `index` holding `data`.
    #[inline]
    pub fn add_page(&mut self, index: u64, data: &[u8]) {
        self.add(page_hash(index, data));
    }

    /// The digest value.
    pub const fn value(&self) -> u128 {
        self.sum
    }
}

/// The digest of `memory` cut into pages of `page_size`, page `i` at dense index `i`.
pub fn memory_digest(memory: &[u8], page_size: usize) -> u128 {
    let mut d = MemoryDigest::new();
    for (i, page) in memory.chunks(page_size).enumerate() {
        d.add_page(i as u64, page);
    }
    d.value()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_sees_every_page_and_place_but_not_order_of_arrival() {
        let a: std::vec::Vec<u8> = (0..4 * 4096).map(|i| (i / 4096) as u8).collect();
        let mut b = a.clone();
        b[3 * 4096 + 17] ^= 1;
        assert_ne!(memory_digest(&a, 4096), memory_digest(&b, 4096));
        let mut swapped = a.clone();
        swapped.rotate_left(4096);
        assert_ne!(memory_digest(&a, 4096), memory_digest(&swapped, 4096));
        // Pages added in another order, and a page rewritten, give the same digest.
        let mut d = MemoryDigest::new();
        for i in (0..4).rev() {
            d.add_page(i, &b[i as usize * 4096..][..4096]);
        }
        d.replace(page_hash(3, &b[3 * 4096..]), page_hash(3, &a[3 * 4096..]));
        assert_eq!(d.value(), memory_digest(&a, 4096));
    }
}
