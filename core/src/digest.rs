//! The whole-memory digest that source and destination compare at completion.
//!
//! Defined as xxh3-64 over the sequence of per-page xxh3-64 hashes (little-endian `u64`s) in
//! page order. The per-page form lets the destination keep a page's hash as it writes the page
//! (one pass over bytes already in cache) and fold the digest at the end in O(pages × 8 bytes),
//! while the source, whose memory is frozen after switchover, hashes its memory afresh.

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// The hash of one page's contents.
#[inline]
pub fn page_hash(data: &[u8]) -> u64 {
    xxh3_64(data)
}

/// Folds per-page hashes, in page order, into the memory digest.
#[derive(Clone, Default)]
pub struct DigestBuilder {
    state: Xxh3,
    pages: u64,
}

impl DigestBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next page's hash (pages must come in order 0, 1, 2, …).
    #[inline]
    pub fn push_page_hash(&mut self, hash: u64) {
        self.state.update(&hash.to_le_bytes());
        self.pages += 1;
    }

    /// Adds the next page's contents.
    #[inline]
    pub fn push_page(&mut self, data: &[u8]) {
        self.push_page_hash(page_hash(data));
    }

    /// How many pages have been added.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The digest of the pages added so far.
    pub fn finish(&self) -> u64 {
        self.state.digest()
    }
}

/// The digest of memory given as one slice of `page_size`-byte pages.
pub fn memory_digest(memory: &[u8], page_size: usize) -> u64 {
    let mut b = DigestBuilder::new();
    for page in memory.chunks(page_size) {
        b.push_page(page);
    }
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_sees_every_page_and_order() {
        let a: std::vec::Vec<u8> = (0..4 * 4096).map(|i| (i / 4096) as u8).collect();
        let mut b = a.clone();
        b[3 * 4096 + 17] ^= 1;
        assert_ne!(memory_digest(&a, 4096), memory_digest(&b, 4096));
        let mut swapped = a.clone();
        swapped.rotate_left(4096);
        assert_ne!(memory_digest(&a, 4096), memory_digest(&swapped, 4096));
        assert_eq!(memory_digest(&a, 4096), memory_digest(&a.clone(), 4096));
    }
}
