//! Hash-first transfer (paper 002, after Sapuntzakis et al.): pages whose content the
//! destination already holds go as a 16-byte hash instead of the page.
//!
//! The destination may hold content from earlier: the image a VM left behind on this host
//! (memory reuse on return, paper 003), images of VMs of the same application (paper 000),
//! or a store both hosts reach. It offers that content through a [`ContentSource`]. When both
//! sides agree on `FEATURE_HASH_FIRST`, right after its `Accept` the destination hashes every
//! non-zero page of its content with the session's keyed hash ([`ContentHasher`] seeded with the
//! session id: a guest cannot know the key, so it cannot craft a page that collides with one
//! of the destination's) and sends the hashes in `Have` frames, ending with an empty one. The
//! source waits for the end before round 1, then sends every page of round 1 whose hash is in
//! that set as an [`Encoding::KNOWN`] entry (payload: the u128 hash). The destination copies the
//! content, checks it hashes to the entry, and applies it like any page; content it cannot
//! find or that does not match is an error, never a silent wrong page.
//!
//! Only round 1 uses hashes: it is the round that sends every page, and a page sent as a hash
//! is never seen by a stateful encoder (a delta must not build on a copy it did not send).

use alloc::boxed::Box;
use alloc::vec::Vec;

use hashbrown::{HashMap, HashSet};

use crate::codec::dedup::ContentHasher;
use crate::codec::is_zero_page;
use crate::error::HostError;
use crate::wire::Encoding;

impl Encoding {
    /// Hash-first: content the destination said it holds (`Have`); the payload is the u128 hash
    /// under the session's keyed hash.
    pub const KNOWN: Encoding = Encoding(6);
}

/// Content a destination holds from earlier, page by page (an image file, a store).
pub trait ContentSource: Send {
    /// How many pages it offers.
    fn page_count(&self) -> u64;
    /// Copies its page `index` (below [`ContentSource::page_count`]) into `buf` (one page).
    fn read_content(&mut self, index: u64, buf: &mut [u8]) -> Result<(), HostError>;
}

/// A [`ContentSource`] over pages in memory (tests, small images).
impl ContentSource for Vec<Vec<u8>> {
    fn page_count(&self) -> u64 {
        self.len() as u64
    }
    fn read_content(&mut self, index: u64, buf: &mut [u8]) -> Result<(), HostError> {
        let page = self
            .get(index as usize)
            .filter(|p| p.len() == buf.len())
            .ok_or_else(|| HostError::new("content page missing or of another size"))?;
        buf.copy_from_slice(page);
        Ok(())
    }
}

/// The destination's side: its content indexed by keyed hash.
pub struct ContentIndex {
    source: Box<dyn ContentSource>,
    hasher: ContentHasher,
    by_hash: HashMap<u128, u64>,
}

impl ContentIndex {
    /// Hashes every non-zero page of `source` with the session's key. Zero pages are left out:
    /// they already travel as a header only.
    pub fn build(
        mut source: Box<dyn ContentSource>,
        session_id: u64,
        page_size: usize,
    ) -> Result<Self, HostError> {
        let hasher = ContentHasher::new(session_id);
        let mut by_hash = HashMap::new();
        let mut page = alloc::vec![0u8; page_size];
        for index in 0..source.page_count() {
            source.read_content(index, &mut page)?;
            if !is_zero_page(&page) {
                by_hash.entry(hasher.hash(&page)).or_insert(index);
            }
        }
        Ok(ContentIndex {
            source,
            hasher,
            by_hash,
        })
    }

    /// The hashes to announce, in no particular order.
    pub fn hashes(&self) -> impl Iterator<Item = u128> + '_ {
        self.by_hash.keys().copied()
    }

    /// How many distinct pages of content it holds.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// Resolves a [`Encoding::KNOWN`] payload into `out` (one page), checked against the hash.
    pub fn resolve(&mut self, payload: &[u8], out: &mut [u8]) -> Result<(), &'static str> {
        let hash: [u8; 16] = payload
            .try_into()
            .map_err(|_| "a known-content entry is not 16 bytes")?;
        let hash = u128::from_le_bytes(hash);
        let &index = self
            .by_hash
            .get(&hash)
            .ok_or("a known-content entry names content this destination never announced")?;
        self.source
            .read_content(index, out)
            .map_err(|_| "the destination's content source failed to read a page")?;
        if self.hasher.hash(out) != hash {
            return Err("the destination's content changed since it was announced (hash mismatch)");
        }
        Ok(())
    }
}

/// The source's side: the hashes the destination announced.
pub struct KnownContent {
    hasher: ContentHasher,
    hashes: HashSet<u128>,
    limit: usize,
}

impl core::fmt::Debug for KnownContent {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("KnownContent")
            .field("seed", &self.hasher.seed())
            .field("hashes", &self.hashes.len())
            .finish()
    }
}

impl PartialEq for KnownContent {
    fn eq(&self, other: &Self) -> bool {
        self.hasher.seed() == other.hasher.seed() && self.hashes == other.hashes
    }
}

impl Eq for KnownContent {}

impl KnownContent {
    /// An empty set for session `session_id`, holding at most `limit` hashes.
    pub fn new(session_id: u64, limit: usize) -> Self {
        KnownContent {
            hasher: ContentHasher::new(session_id),
            hashes: HashSet::new(),
            limit,
        }
    }

    /// Takes in announced hashes. Errors past the limit (a destination that announces more
    /// content than it could sensibly hold).
    pub fn extend(&mut self, hashes: impl Iterator<Item = u128>) -> Result<(), &'static str> {
        for h in hashes {
            if self.hashes.len() >= self.limit {
                return Err("the destination announced more content than the limit");
            }
            self.hashes.insert(h);
        }
        Ok(())
    }

    /// How many hashes are known.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// If the destination holds `page`'s content, writes its [`Encoding::KNOWN`] payload
    /// (16 bytes) into `out` and returns its length.
    pub fn encode(&self, page: &[u8], out: &mut [u8]) -> Option<usize> {
        if self.hashes.is_empty() || out.len() < 16 {
            return None;
        }
        let hash = self.hasher.hash(page);
        if !self.hashes.contains(&hash) {
            return None;
        }
        out[..16].copy_from_slice(&hash.to_le_bytes());
        Some(16)
    }
}

/// Writes page `index` (its copy `page`) into `writer` as a [`Encoding::KNOWN`] entry if the
/// destination holds its content; `None` otherwise (nothing is written then; zero pages are
/// left to the zero check).
pub fn encode_known(
    writer: &mut crate::wire::PagesWriter<'_>,
    index: u64,
    page: &[u8],
    known: &KnownContent,
) -> Option<crate::codec::Encoded> {
    if is_zero_page(page) {
        return None;
    }
    let slot = writer.begin_page(index, 16)?;
    let n = known.encode(page, slot)?;
    let wire_bytes = writer.commit_page(Encoding::KNOWN, n);
    Some(crate::codec::Encoded {
        encoding: Encoding::KNOWN,
        wire_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        let mut p = alloc::vec![fill; 4096];
        p[7] = fill.wrapping_add(1);
        p
    }

    #[test]
    fn known_content_resolves_only_what_was_announced_and_checks_it() {
        let content: Vec<Vec<u8>> = alloc::vec![page(1), alloc::vec![0; 4096], page(2)];
        let mut index = ContentIndex::build(Box::new(content), 42, 4096).unwrap();
        assert_eq!(index.len(), 2, "zero pages are not announced");
        let mut known = KnownContent::new(42, 10);
        known.extend(index.hashes()).unwrap();
        let mut payload = [0u8; 16];
        assert_eq!(known.encode(&page(2), &mut payload), Some(16));
        assert_eq!(known.encode(&page(3), &mut payload[..]), None);
        let mut out = alloc::vec![0u8; 4096];
        known.encode(&page(1), &mut payload).unwrap();
        index.resolve(&payload, &mut out).unwrap();
        assert_eq!(out, page(1));
        // Another session's key: nothing matches.
        let mut other = KnownContent::new(43, 10);
        other.extend(index.hashes()).unwrap();
        assert_eq!(other.encode(&page(1), &mut payload), None);
        // Unknown hash, wrong length.
        assert!(index.resolve(&[0u8; 16], &mut out).is_err());
        assert!(index.resolve(&[0u8; 15], &mut out).is_err());
        // The limit.
        let mut small = KnownContent::new(42, 1);
        assert!(small.extend(index.hashes()).is_err());
    }

    /// Content that changes after it was announced is caught, not applied.
    #[test]
    fn changed_content_is_caught() {
        struct Liar(u8);
        impl ContentSource for Liar {
            fn page_count(&self) -> u64 {
                1
            }
            fn read_content(&mut self, _: u64, buf: &mut [u8]) -> Result<(), HostError> {
                buf.fill(self.0);
                self.0 += 1;
                Ok(())
            }
        }
        let mut index = ContentIndex::build(Box::new(Liar(5)), 1, 4096).unwrap();
        let mut known = KnownContent::new(1, 10);
        known.extend(index.hashes()).unwrap();
        let mut payload = [0u8; 16];
        known.encode(&[5u8; 4096], &mut payload).unwrap();
        let mut out = alloc::vec![0u8; 4096];
        assert!(index
            .resolve(&payload, &mut out)
            .unwrap_err()
            .contains("changed"));
    }
}
