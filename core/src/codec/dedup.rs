//! Deduplication within a migration: a page whose content was already sent goes as a
//! *reference* to the page that carried it, and the destination copies it from its own memory.
//!
//! Why: a whole VM holds duplicate pages (shared libraries loaded twice, copies, fills), and a
//! page that is dirtied but rewritten with the same bytes is a duplicate of itself. A reference is
//! 24 bytes instead of a page.
//!
//! # Index
//! [`DedupIndex`] maps the xxh3-128 hash of content already sent to the first page index that
//! carried it (a hashbrown map bounded to a number of entries, oldest dropped first), and each
//! such page to its hash, so that a page sent again with other content stops being referenced.
//!
//! # The hash and its seed
//! The hash is xxh3-128 with the secret xxh3 derives from a 64-bit seed ([`ContentHasher`]; for
//! inputs over 240 bytes, every page, it equals `xxh3_128_with_seed(page, seed)`). The secret is
//! derived once, not per page as `xxh3_128_with_seed` does. The seed is the caller's, the same
//! on both sides (the session can derive it from the session id). A seed of 0 is plain xxh3-128. A per-migration random seed is recommended: xxh3 is not cryptographic, and with a
//! known seed a guest could build two pages with one hash so that one replaces the other on the
//! destination (the guest corrupts only itself, but a secret seed makes it hard to do at all).
//! Seeding costs nothing (`codec/hash` bench). This is not the digest's hash, which is seeded by
//! the page *index* so equal pages hash differently there; here equal content must hash equal.
//!
//! # Payload of [`Encoding::REFERENCE`] (24 bytes)
//! ```text
//! source page index  u64 LE   a page of the destination's memory that holds the content
//! hash               u128 LE  content_hash of the page's content
//! ```
//! The decoder ([`resolve`]) reads the source page from the destination's own memory and copies
//! it only if its bytes hash to `hash`: a stale index, a reference sent before its target landed,
//! or a hash collision is an error, never a silently wrong page.
//!
//! # Order
//! A reference is only right if its target page holds that content at the destination when the
//! reference is applied: the index holds only pages this encoder sent, and each page must always
//! go through the same encoder, in order, on one channel (as for XBZRLE).

use alloc::collections::VecDeque;
use core::fmt;

use hashbrown::HashMap;
use xxhash_rust::const_xxh3::const_custom_default_secret;
use xxhash_rust::xxh3::xxh3_128_with_secret;

use super::{PageDecoder, PageEncoder};
use crate::bitmap::DirtyBitmap;
use crate::wire::Encoding;

/// Length of a reference payload.
pub const REFERENCE_LEN: usize = 24;

/// While full dedup does not pay, one page in `1 << SAMPLE_SHIFT` ([`in_sample`]) is still
/// hashed and looked up: enough to measure how many pages are duplicates, at a sixteenth of the
/// hashing.
pub const SAMPLE_SHIFT: u32 = 4;

/// Words [`in_sample`] reads.
const SAMPLE_WORDS: usize = 8;

/// Whether `page` is in the content-defined sample of about one page in `1 << shift`. Decided by
/// eight of its words spread over the page, so pages with equal content are in or out together
/// and the share of duplicates in the sample is the share among all pages. (Pages that agree on
/// those eight words, such as sparse pages zero there, are in or out as a class.)
#[inline]
pub fn in_sample(page: &[u8], shift: u32) -> bool {
    let words = page.len() / 8;
    if shift == 0 || words == 0 {
        return true;
    }
    let step = (words / SAMPLE_WORDS).max(1);
    let mut x = 0u64;
    for w in page.chunks_exact(8).step_by(step).take(SAMPLE_WORDS) {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        x = (x ^ u64::from_le_bytes(a)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^= x >> 29;
    }
    x >> (64 - shift.min(63)) == 0
}

/// The content hash under one seed: xxh3-128 with the secret derived from the seed once.
#[derive(Clone)]
pub struct ContentHasher {
    seed: u64,
    secret: [u8; 192],
}

impl ContentHasher {
    /// The hasher for `seed`.
    pub fn new(seed: u64) -> Self {
        ContentHasher {
            seed,
            secret: const_custom_default_secret(seed),
        }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The hash of `page` (for inputs over 240 bytes, `xxh3_128_with_seed(page, seed)`).
    #[inline]
    pub fn hash(&self, page: &[u8]) -> u128 {
        xxh3_128_with_secret(page, &self.secret)
    }
}

impl fmt::Debug for ContentHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContentHasher")
            .field("seed", &self.seed)
            .finish()
    }
}

/// The content hash of a page under `seed` ([`ContentHasher`]; derives the secret each call).
pub fn content_hash(seed: u64, page: &[u8]) -> u128 {
    ContentHasher::new(seed).hash(page)
}

/// A content hash function `(seed, page) -> hash` to use instead of [`ContentHasher`]: only for
/// tests that force collisions.
pub type Hasher = fn(u64, &[u8]) -> u128;

/// Writes a reference payload into `out` (at least [`REFERENCE_LEN`] bytes); returns its length.
pub fn write_reference(out: &mut [u8], source: u64, hash: u128) -> Option<usize> {
    let out = out.get_mut(..REFERENCE_LEN)?;
    out[..8].copy_from_slice(&source.to_le_bytes());
    out[8..].copy_from_slice(&hash.to_le_bytes());
    Some(REFERENCE_LEN)
}

/// Reads a reference payload: the source page index and the content hash.
pub fn parse_reference(payload: &[u8]) -> Result<(u64, u128), ReferenceError> {
    if payload.len() != REFERENCE_LEN {
        return Err(ReferenceError::BadLength { len: payload.len() });
    }
    let mut index = [0u8; 8];
    index.copy_from_slice(&payload[..8]);
    let mut hash = [0u8; 16];
    hash.copy_from_slice(&payload[8..]);
    Ok((u64::from_le_bytes(index), u128::from_le_bytes(hash)))
}

/// Why a reference was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReferenceError {
    /// The payload is not 24 bytes.
    BadLength {
        /// Its length.
        len: usize,
    },
    /// The destination could not read the source page (out of range, not received, I/O).
    Unreadable {
        /// The source page.
        source: u64,
        /// The reader's reason.
        reason: &'static str,
    },
    /// The source page's bytes do not hash to the reference's hash: not copied.
    HashMismatch {
        /// The source page.
        source: u64,
    },
}

impl ReferenceError {
    /// A fixed description (what [`PageDecoder::decode`] returns).
    pub fn as_str(&self) -> &'static str {
        match self {
            ReferenceError::BadLength { .. } => "reference payload is not 24 bytes",
            ReferenceError::Unreadable { .. } => "reference to a page the destination cannot read",
            ReferenceError::HashMismatch { .. } => {
                "referenced page does not hash to the reference (stale or colliding)"
            }
        }
    }
}

impl fmt::Display for ReferenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ReferenceError::BadLength { len } => write!(f, "{} ({len} bytes)", self.as_str()),
            ReferenceError::Unreadable { source, reason } => {
                write!(f, "{} (page {source}: {reason})", self.as_str())
            }
            ReferenceError::HashMismatch { source } => {
                write!(f, "{} (page {source})", self.as_str())
            }
        }
    }
}

impl core::error::Error for ReferenceError {}

/// Read access to the destination's own memory, for resolving references.
pub trait ReadDestination {
    /// Copies page `index` as the destination holds it now into `buf` (one page).
    fn read_page(&mut self, index: u64, buf: &mut [u8]) -> Result<(), &'static str>;
}

impl<F: FnMut(u64, &mut [u8]) -> Result<(), &'static str>> ReadDestination for F {
    fn read_page(&mut self, index: u64, buf: &mut [u8]) -> Result<(), &'static str> {
        self(index, buf)
    }
}

/// Resolves a reference `payload`: reads the source page through `read` into `out` (one page)
/// and checks it hashes to the reference with `hasher` (made once per migration from the agreed
/// seed). On an error `out` must not be used (it may hold the unverified bytes). Never panics.
pub fn resolve<R: ReadDestination + ?Sized>(
    payload: &[u8],
    hasher: &ContentHasher,
    read: &mut R,
    out: &mut [u8],
) -> Result<(), ReferenceError> {
    let (source, hash) = parse_reference(payload)?;
    read.read_page(source, out)
        .map_err(|reason| ReferenceError::Unreadable { source, reason })?;
    if hasher.hash(out) != hash {
        return Err(ReferenceError::HashMismatch { source });
    }
    Ok(())
}

/// Counters of a [`DedupIndex`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DedupStats {
    /// Lookups that found the content.
    pub hits: u64,
    /// Lookups that did not.
    pub misses: u64,
    /// Entries dropped because the index was full.
    pub evicted: u64,
    /// Entries dropped because their page was sent again with other content.
    pub invalidated: u64,
}

/// The content index: hash → first page that carried it, bounded to `capacity` entries (the
/// oldest is dropped first). About 100 bytes per entry, and a bit per page index up to the
/// highest indexed (page indices are the guest's dense ones: 32 KiB per GiB of 4 KiB pages).
pub struct DedupIndex {
    hasher: ContentHasher,
    capacity: usize,
    by_hash: HashMap<u128, u64>,
    by_page: HashMap<u64, u128>,
    /// One bit per page index: set while `by_page` holds the page. Most pages sent are not in
    /// the index (all of them but a sample while full dedup is off), and a bit test saves them
    /// a probe of a map too large for the cache.
    in_page_map: DirtyBitmap,
    order: VecDeque<(u128, u64)>,
    stats: DedupStats,
}

impl DedupIndex {
    /// An index of at most `capacity` contents, hashed with `seed`.
    pub fn new(seed: u64, capacity: usize) -> Self {
        DedupIndex {
            hasher: ContentHasher::new(seed),
            capacity,
            by_hash: HashMap::new(),
            by_page: HashMap::new(),
            in_page_map: DirtyBitmap::new(0),
            order: VecDeque::new(),
            stats: DedupStats::default(),
        }
    }

    /// The hasher (and its seed).
    pub fn hasher(&self) -> &ContentHasher {
        &self.hasher
    }

    /// Contents indexed now.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The counters.
    pub fn stats(&self) -> DedupStats {
        self.stats
    }

    fn page_indexed(&self, index: u64) -> bool {
        self.in_page_map.get(index)
    }

    fn mark_page(&mut self, index: u64, on: bool) {
        if on {
            self.in_page_map.grow(index + 1);
            self.in_page_map.set(index);
        } else if self.in_page_map.get(index) {
            self.in_page_map.unset(index);
        }
    }

    /// The page that carried content `hash`, if indexed.
    pub fn lookup(&mut self, hash: u128) -> Option<u64> {
        let hit = self.by_hash.get(&hash).copied();
        if hit.is_some() {
            self.stats.hits += 1;
        } else {
            self.stats.misses += 1;
        }
        hit
    }

    /// Page `index` no longer holds the content it was indexed with (sent again as zero, or
    /// with content not indexed).
    pub fn forget(&mut self, index: u64) {
        if !self.page_indexed(index) {
            return;
        }
        self.mark_page(index, false);
        if let Some(old) = self.by_page.remove(&index) {
            if self.by_hash.get(&old) == Some(&index) {
                self.by_hash.remove(&old);
                self.stats.invalidated += 1;
            }
        }
    }

    /// Page `index` was sent with content `hash` (not as a reference): index it, unless that
    /// content is already indexed under another page.
    pub fn record(&mut self, index: u64, hash: u128) {
        if self.page_indexed(index) && self.by_page.get(&index) == Some(&hash) {
            return;
        }
        self.forget(index);
        if self.capacity == 0 || self.by_hash.contains_key(&hash) {
            return;
        }
        while self.by_hash.len() >= self.capacity {
            let Some((h, i)) = self.order.pop_front() else {
                break;
            };
            if self.by_hash.get(&h) == Some(&i) {
                self.by_hash.remove(&h);
                self.by_page.remove(&i);
                self.mark_page(i, false);
                self.stats.evicted += 1;
            }
        }
        self.by_hash.insert(hash, index);
        self.by_page.insert(index, hash);
        self.mark_page(index, true);
        self.order.push_back((hash, index));
        // Entries invalidated in place leave their order records behind; drop them when they
        // outnumber the live ones, so memory stays bounded.
        if self.order.len() > 2 * self.capacity.max(16) {
            let by_hash = &self.by_hash;
            self.order.retain(|(h, i)| by_hash.get(h) == Some(i));
        }
    }
}

/// Sends pages whose content was sent before as references ([`Encoding::REFERENCE`]); other
/// pages go raw and are indexed.
pub struct DedupEncoder {
    index: DedupIndex,
    forced: Option<Hasher>,
}

impl DedupEncoder {
    /// An encoder over `index`, hashing with [`content_hash`].
    pub fn new(index: DedupIndex) -> Self {
        DedupEncoder {
            index,
            forced: None,
        }
    }

    /// The same with another hash function (a test forcing collisions).
    pub fn with_hasher(index: DedupIndex, hasher: Hasher) -> Self {
        DedupEncoder {
            index,
            forced: Some(hasher),
        }
    }

    /// The index.
    pub fn index(&self) -> &DedupIndex {
        &self.index
    }

    fn hash(&self, page: &[u8]) -> u128 {
        match self.forced {
            Some(f) => f(self.index.hasher.seed, page),
            None => self.index.hasher.hash(page),
        }
    }

    /// Hashes `page`; if its content is indexed, writes a reference into `out` and returns its
    /// length; else indexes the page (it will be sent another way) and returns `None`.
    pub fn encode_reference(&mut self, index: u64, page: &[u8], out: &mut [u8]) -> Option<usize> {
        let hash = self.hash(page);
        match self.index.lookup(hash) {
            Some(source) if out.len() >= REFERENCE_LEN && page.len() > REFERENCE_LEN => {
                if source != index {
                    // The destination's page `index` now holds a copy: not the first carrier.
                    self.index.forget(index);
                }
                write_reference(out, source, hash)
            }
            _ => {
                self.index.record(index, hash);
                None
            }
        }
    }

    /// Page `index` is sent with content the index is not told about (not hashed): what the
    /// index held for it is stale.
    pub fn forget(&mut self, index: u64) {
        self.index.forget(index);
    }

    /// Notes that `page` was sent for `index` by other means.
    pub fn record(&mut self, index: u64, page: &[u8]) {
        let hash = self.hash(page);
        self.index.record(index, hash);
    }
}

impl PageEncoder for DedupEncoder {
    fn name(&self) -> &'static str {
        "dedup"
    }

    fn keeps_state(&self) -> bool {
        true
    }

    fn encode(&mut self, index: u64, page: &[u8], out: &mut [u8]) -> Option<(Encoding, usize)> {
        let n = self.encode_reference(index, page, out)?;
        Some((Encoding::REFERENCE, n))
    }

    fn sent_zero(&mut self, index: u64) {
        self.index.forget(index);
    }
}

/// Decodes [`Encoding::REFERENCE`] pages by reading the destination's memory through `R`.
///
/// A receiver that cannot lend its memory to a decoder calls [`resolve`] itself with a closure
/// over its host (`|i, buf| host.read_back(PageIndex(i), buf)`).
pub struct ReferenceDecoder<R> {
    hasher: ContentHasher,
    read: R,
}

impl<R: ReadDestination + Send> ReferenceDecoder<R> {
    /// A decoder for references hashed with `seed`, reading pages with `read`.
    pub fn new(seed: u64, read: R) -> Self {
        ReferenceDecoder {
            hasher: ContentHasher::new(seed),
            read,
        }
    }
}

impl<R: ReadDestination + Send> PageDecoder for ReferenceDecoder<R> {
    fn encoding(&self) -> Encoding {
        Encoding::REFERENCE
    }

    fn decode(
        &mut self,
        _index: u64,
        payload: &[u8],
        scratch: &mut [u8],
    ) -> Result<(), &'static str> {
        resolve(payload, &self.hasher, &mut self.read, scratch).map_err(|e| e.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xxhash_rust::xxh3::xxh3_128_with_seed;

    #[test]
    fn the_hash_is_seeded_xxh3_128_on_pages() {
        let page: alloc::vec::Vec<u8> = (0..4096u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for seed in [0, 1, 0x5eed_5eed_5eed_5eed] {
            let h = ContentHasher::new(seed);
            assert_eq!(h.hash(&page), xxh3_128_with_seed(&page, seed));
            assert_eq!(h.hash(&page[..241]), xxh3_128_with_seed(&page[..241], seed));
        }
    }
}
