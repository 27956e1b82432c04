//! XBZRLE delta encoding (paper 001; QEMU's `migration/xbzrle.c` format), for pages that are
//! sent again after changing a little.
//!
//! Why: most pages a guest dirties between two rounds differ from the copy sent before in a few
//! bytes (the median changed page of real programs differs in 4–67 bytes, issue 17), so sending
//! the difference instead of the page saves most of the bytes of rounds 2 and on.
//!
//! # Format (QEMU's, byte for byte)
//! A payload is a sequence of pairs, each an *unchanged run* then a *changed run*:
//! ```text
//! zrun_len  (ULEB128, 1 or 2 bytes, at most 0x3fff)   bytes equal to the old copy: skipped
//! nzrun_len (ULEB128, 1 or 2 bytes, 1..=0x3fff)       bytes that differ,
//! nzrun_len bytes                                     given verbatim
//! ```
//! Only the first unchanged run may be empty (a page whose first byte changed); a changed run is
//! never empty; an unchanged run at the end of the page is left out. An empty payload means
//! "unchanged". The decoder applies the runs onto the destination's current copy of the page,
//! which must be the version the source encoded against (the [`XbzrleCache`] entry).
//!
//! The encoder returns `None` when the payload would exceed its output limit (the page then goes
//! raw, as in QEMU) or when a run is longer than 0x3fff bytes, which the two-byte lengths cannot
//! say (pages above 16 KiB with long runs: they go raw).
//!
//! # Speed
//! Runs are found a word at a time: unchanged runs by XORing 32 bytes (four words) per step and
//! locating the first set bit; changed runs with the "has a zero byte" trick on the XOR of one
//! word per step (as QEMU does). The decoder checks the whole payload before it writes a byte,
//! so a malformed payload leaves the page untouched.
//!
//! # The source's cache
//! [`XbzrleCache`] keeps the last version sent of some pages, bounded in bytes: a power of two of
//! page slots, a page going to slot `index mod slots` (direct-mapped, as QEMU's `page_cache.c`),
//! and a slot holding another page is taken over only if that page was last sent at least
//! [`XbzrleCache::DEFAULT_LIFETIME`] generations ago (QEMU's `CACHED_PAGE_LIFETIME`), so pages
//! that keep being dirtied stay cached. [`DeltaEncoder`] encodes against it and keeps it equal to
//! what the destination holds.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use super::{PageDecoder, PageEncoder};
use crate::wire::Encoding;

/// The longest run a two-byte ULEB128 length can say.
pub const MAX_RUN: usize = 0x3fff;

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

#[inline(always)]
fn half(s: &[u8], at: usize) -> u128 {
    let mut a = [0u8; 16];
    a.copy_from_slice(&s[at..at + 16]);
    u128::from_le_bytes(a)
}

#[inline(always)]
fn word(s: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&s[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The first position at or after `i` where `old` and `new` differ, or their length.
#[inline(always)]
fn skip_equal(old: &[u8], new: &[u8], i: usize) -> usize {
    let (Some(o), Some(n)) = (old.get(i..), new.get(i..)) else {
        return i;
    };
    let mut at = i;
    let mut oc = o.chunks_exact(32);
    let mut nc = n.chunks_exact(32);
    for (a, b) in (&mut oc).zip(&mut nc) {
        let lo = half(a, 0) ^ half(b, 0);
        let hi = half(a, 16) ^ half(b, 16);
        if (lo | hi) != 0 {
            // Little-endian loads: the lowest set bit is in the first differing byte. Both
            // halves' counts are taken and one is selected (a conditional move, not a branch:
            // where a run ends is random, and a chain of tests mispredicted once a run).
            let (tl, th) = (lo.trailing_zeros(), 128 + hi.trailing_zeros());
            let bit = if lo != 0 { tl } else { th };
            return at + (bit / 8) as usize;
        }
        at += 32;
    }
    let (o, n) = (oc.remainder(), nc.remainder());
    let mut oc = o.chunks_exact(8);
    let mut nc = n.chunks_exact(8);
    for (a, b) in (&mut oc).zip(&mut nc) {
        let x = word(a, 0) ^ word(b, 0);
        if x != 0 {
            return at + (x.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    for (a, b) in oc.remainder().iter().zip(nc.remainder()) {
        if a != b {
            return at;
        }
        at += 1;
    }
    at
}

/// The first position at or after `i` where `old` and `new` are equal, or their length; stops
/// early (returning a position past `i + limit`) once the run is longer than `limit`.
#[inline(always)]
fn skip_different(old: &[u8], new: &[u8], mut i: usize, limit: usize) -> usize {
    let n = new.len();
    let stop = i.saturating_add(limit);
    while i + 8 <= n {
        let x = word(old, i) ^ word(new, i);
        // The lowest flagged byte is exactly the first zero byte of `x` (flags above it may be
        // false, from the borrow; they are never looked at).
        let z = x.wrapping_sub(LO) & !x & HI;
        if z != 0 {
            return i + (z.trailing_zeros() / 8) as usize;
        }
        i += 8;
        if i > stop {
            return i;
        }
    }
    while i < n && old[i] != new[i] {
        i += 1;
    }
    i
}

/// `dst.copy_from_slice(src)` without a `memcpy` call for the short runs that dominate deltas.
#[inline(always)]
fn copy_run(dst: &mut [u8], src: &[u8]) {
    if src.len() <= 16 {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *s;
        }
    } else {
        dst.copy_from_slice(src);
    }
}

#[inline(always)]
fn uleb_len(n: usize) -> usize {
    if n < 0x80 {
        1
    } else {
        2
    }
}

/// Encodes the difference from `old` to `new` (equal lengths) into `out`, in QEMU's XBZRLE
/// format. Returns the payload length (0 if the pages are equal), or `None` if it would be longer
/// than `out`, if a run exceeds [`MAX_RUN`], or if the lengths differ.
pub fn encode(old: &[u8], new: &[u8], out: &mut [u8]) -> Option<usize> {
    let n = new.len();
    if old.len() != n {
        return None;
    }
    let limit = out.len();
    let mut i = 0;
    let mut d = 0;
    while i < n {
        let start = i;
        i = skip_equal(old, new, i);
        if i == n {
            break; // the trailing unchanged run is left out
        }
        let zrun = i - start;
        // Room for the two lengths and at least one byte, else stop before scanning further.
        let room = limit.checked_sub(d + uleb_len(zrun) + 1)?;
        let nz_start = i;
        i = skip_different(old, new, i, room);
        let nzrun = i - nz_start;
        if zrun > MAX_RUN || nzrun > MAX_RUN {
            return None;
        }
        let end = d + uleb_len(zrun) + uleb_len(nzrun) + nzrun;
        if end > limit {
            return None;
        }
        d = put_uleb(out, d, zrun);
        d = put_uleb(out, d, nzrun);
        copy_run(&mut out[d..end], &new[nz_start..i]);
        d = end;
    }
    Some(d)
}

/// Writes `n` (at most [`MAX_RUN`]) at `out[at..]`; returns the position after it.
#[inline(always)]
fn put_uleb(out: &mut [u8], at: usize, n: usize) -> usize {
    if n < 0x80 {
        out[at] = n as u8;
        at + 1
    } else {
        out[at] = (n as u8 & 0x7f) | 0x80;
        out[at + 1] = (n >> 7) as u8;
        at + 2
    }
}

/// Why an XBZRLE payload was refused. Offsets are into the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeltaError {
    /// The payload ends inside a run: a length, or the changed bytes a length announced.
    Truncated {
        /// Where the missing part starts.
        at: usize,
    },
    /// A length that does not fit in two ULEB128 bytes (the second byte has its high bit set).
    BadLength {
        /// Where the length starts.
        at: usize,
    },
    /// An unchanged run of length zero past the first pair.
    EmptyUnchangedRun {
        /// Where the length starts.
        at: usize,
    },
    /// A changed run of length zero.
    EmptyChangedRun {
        /// Where the length starts.
        at: usize,
    },
    /// A run that ends past the page.
    PastPage {
        /// Where the run's length starts.
        at: usize,
        /// The page offset the run would end at.
        end: usize,
        /// The page size.
        page: usize,
    },
    /// Bytes after a run that ends exactly at the end of the page.
    TrailingBytes {
        /// Where they start.
        at: usize,
    },
}

impl DeltaError {
    /// A fixed description (what [`PageDecoder::decode`] returns).
    pub fn as_str(&self) -> &'static str {
        match self {
            DeltaError::Truncated { .. } => "xbzrle payload truncated inside a run",
            DeltaError::BadLength { .. } => "xbzrle run length longer than two ULEB128 bytes",
            DeltaError::EmptyUnchangedRun { .. } => {
                "xbzrle zero-length unchanged run past the first"
            }
            DeltaError::EmptyChangedRun { .. } => "xbzrle zero-length changed run",
            DeltaError::PastPage { .. } => "xbzrle run ends beyond the page",
            DeltaError::TrailingBytes { .. } => "xbzrle bytes after the end of the page",
        }
    }
}

impl fmt::Display for DeltaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DeltaError::PastPage { at, end, page } => write!(
                f,
                "{} (run at payload byte {at} ends at page offset {end}, page is {page} bytes)",
                self.as_str()
            ),
            DeltaError::Truncated { at }
            | DeltaError::BadLength { at }
            | DeltaError::EmptyUnchangedRun { at }
            | DeltaError::EmptyChangedRun { at }
            | DeltaError::TrailingBytes { at } => {
                write!(f, "{} (at payload byte {at})", self.as_str())
            }
        }
    }
}

impl core::error::Error for DeltaError {}

/// Reads a ULEB128 length of at most two bytes at `p[at..]`; returns it and its size.
#[inline(always)]
fn get_uleb(p: &[u8], at: usize) -> Result<(usize, usize), DeltaError> {
    let Some(&b0) = p.get(at) else {
        return Err(DeltaError::Truncated { at });
    };
    if b0 & 0x80 == 0 {
        return Ok((b0 as usize, 1));
    }
    let Some(&b1) = p.get(at + 1) else {
        return Err(DeltaError::Truncated { at: at + 1 });
    };
    if b1 & 0x80 != 0 {
        return Err(DeltaError::BadLength { at });
    }
    Ok(((b0 & 0x7f) as usize | (b1 as usize) << 7, 2))
}

/// Walks the runs of `payload` for a page of `page_len` bytes, calling `apply(page_offset,
/// changed_bytes)` for each changed run. Stops at the first error.
#[inline(always)]
fn walk(
    payload: &[u8],
    page_len: usize,
    mut apply: impl FnMut(usize, &[u8]),
) -> Result<(), DeltaError> {
    let mut i = 0;
    let mut d = 0;
    while i < payload.len() {
        if d == page_len {
            return Err(DeltaError::TrailingBytes { at: i });
        }
        let at = i;
        let (zrun, used) = get_uleb(payload, i)?;
        if zrun == 0 && i != 0 {
            return Err(DeltaError::EmptyUnchangedRun { at });
        }
        i += used;
        d += zrun;
        if d > page_len {
            return Err(DeltaError::PastPage {
                at,
                end: d,
                page: page_len,
            });
        }
        let at = i;
        let (nzrun, used) = get_uleb(payload, i)?;
        if nzrun == 0 {
            return Err(DeltaError::EmptyChangedRun { at });
        }
        i += used;
        if d + nzrun > page_len {
            return Err(DeltaError::PastPage {
                at,
                end: d + nzrun,
                page: page_len,
            });
        }
        let Some(bytes) = payload.get(i..i + nzrun) else {
            return Err(DeltaError::Truncated { at: payload.len() });
        };
        apply(d, bytes);
        i += nzrun;
        d += nzrun;
    }
    Ok(())
}

/// Applies the XBZRLE `payload` onto `page`, which holds the old copy on entry and the new one
/// on success. The whole payload is checked first: on an error `page` is left as it was. Never
/// panics.
pub fn decode(payload: &[u8], page: &mut [u8]) -> Result<(), DeltaError> {
    let len = page.len();
    walk(payload, len, |_, _| {})?;
    walk(payload, len, |at, bytes| {
        if let Some(dst) = page.get_mut(at..at + bytes.len()) {
            copy_run(dst, bytes);
        }
    })
}

/// A slot of the cache: which page it holds and when that page was last sent.
#[derive(Clone, Copy, Debug)]
struct Slot {
    /// The page index, or `EMPTY`.
    index: u64,
    /// The generation (round) that last sent this version.
    generation: u32,
}

const EMPTY: u64 = u64::MAX;

/// The source's cache of page versions last sent (QEMU's `page_cache.c`): a power of two of
/// page-sized slots, page `index` in slot `index mod slots`, with age-aware replacement.
pub struct XbzrleCache {
    page_size: usize,
    slots: Vec<Slot>,
    data: Vec<u8>,
    lifetime: u32,
}

impl XbzrleCache {
    /// Generations a cached page keeps its slot against other pages (QEMU's
    /// `CACHED_PAGE_LIFETIME`): a page sent in generation `g` can be displaced from `g + 2` on.
    pub const DEFAULT_LIFETIME: u32 = 2;

    /// A cache of at most `bytes` bytes of page data for pages of `page_size` bytes: the largest
    /// power of two of slots that fits (none if `bytes < page_size`: every lookup misses). The
    /// memory is allocated zeroed, so the OS maps it as slots fill.
    pub fn new(bytes: usize, page_size: usize) -> Self {
        let fit = bytes.checked_div(page_size).unwrap_or(0);
        let slots = if fit == 0 {
            0
        } else {
            1usize << (usize::BITS - 1 - fit.leading_zeros())
        };
        XbzrleCache {
            page_size,
            slots: vec![
                Slot {
                    index: EMPTY,
                    generation: 0
                };
                slots
            ],
            data: vec![0; slots * page_size],
            lifetime: Self::DEFAULT_LIFETIME,
        }
    }

    /// Sets the replacement lifetime in generations (0: a newer page always takes the slot).
    pub fn with_lifetime(mut self, generations: u32) -> Self {
        self.lifetime = generations;
        self
    }

    /// The number of slots (a power of two, or 0).
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// The page size the cache was made for.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Pages cached now.
    pub fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.index != EMPTY).count()
    }

    /// Whether no page is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn slot_of(&self, index: u64) -> Option<usize> {
        if self.slots.is_empty() || index == EMPTY {
            return None;
        }
        Some((index & (self.slots.len() as u64 - 1)) as usize)
    }

    /// The cached version of page `index` and the generation that sent it.
    pub fn get(&self, index: u64) -> Option<(&[u8], u32)> {
        let s = self.slot_of(index)?;
        let slot = self.slots[s];
        (slot.index == index).then(|| {
            (
                &self.data[s * self.page_size..(s + 1) * self.page_size],
                slot.generation,
            )
        })
    }

    /// The cached version of page `index`, writable, and the generation that sent it.
    pub fn get_mut(&mut self, index: u64) -> Option<(&mut [u8], &mut u32)> {
        let s = self.slot_of(index)?;
        let slot = &mut self.slots[s];
        if slot.index != index {
            return None;
        }
        Some((
            &mut self.data[s * self.page_size..(s + 1) * self.page_size],
            &mut slot.generation,
        ))
    }

    /// Caches `page` as the version of `index` sent in `generation`, unless its slot holds
    /// another page sent less than the lifetime ago. Returns whether it was cached.
    pub fn insert(&mut self, index: u64, page: &[u8], generation: u32) -> bool {
        let Some(s) = self.slot_of(index) else {
            return false;
        };
        if page.len() != self.page_size {
            return false;
        }
        let slot = &mut self.slots[s];
        if slot.index != EMPTY
            && slot.index != index
            && slot.generation.saturating_add(self.lifetime) > generation
        {
            return false;
        }
        *slot = Slot { index, generation };
        self.data[s * self.page_size..(s + 1) * self.page_size].copy_from_slice(page);
        true
    }

    /// Drops page `index` from the cache (its next send goes without delta).
    pub fn remove(&mut self, index: u64) {
        if let Some(s) = self.slot_of(index) {
            if self.slots[s].index == index {
                self.slots[s].index = EMPTY;
            }
        }
    }
}

/// Counters of a [`DeltaEncoder`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeltaStats {
    /// Pages encoded as a delta.
    pub encoded: u64,
    /// Pages found in the cache whose delta was too long (sent another way).
    pub overflows: u64,
    /// Pages not in the cache (or cached in this same generation).
    pub misses: u64,
    /// Pages inserted into the cache.
    pub inserted: u64,
    /// Delta payload bytes produced.
    pub payload_bytes: u64,
}

/// Encodes pages sent before as XBZRLE deltas against an [`XbzrleCache`]
/// ([`Encoding::XBZRLE`]); other pages go raw and are cached for their next send.
///
/// Rules that keep the cache equal to what the destination holds:
/// - a delta is made only against a version sent in an *earlier* generation (call
///   [`PageEncoder::begin_generation`] at each round);
/// - every page given to [`PageEncoder::encode`] is sent, whatever encoding wins, so the cached
///   copy is updated to it; a page sent as zero must be reported with
///   [`PageEncoder::sent_zero`] ([`super::encode_page`] does), and a page sent by other means
///   with [`DeltaEncoder::record`] (or not at all: [`XbzrleCache::remove`]);
/// - each page always goes through the same encoder, in order, on one channel, so that the
///   destination applies the delta onto the copy the cache holds.
///
/// As in QEMU, pages are cached from generation 2 on (the first round would fill the cache with
/// pages that are never sent again), unless [`DeltaEncoder::cache_first_round`] says otherwise.
pub struct DeltaEncoder {
    cache: XbzrleCache,
    generation: u32,
    first_round: bool,
    stats: DeltaStats,
}

impl DeltaEncoder {
    /// An encoder over `cache`.
    pub fn new(cache: XbzrleCache) -> Self {
        DeltaEncoder {
            cache,
            generation: 1,
            first_round: false,
            stats: DeltaStats::default(),
        }
    }

    /// Whether pages sent in generation 1 are cached too (default: no, as QEMU).
    pub fn cache_first_round(mut self, yes: bool) -> Self {
        self.first_round = yes;
        self
    }

    /// The cache.
    pub fn cache(&self) -> &XbzrleCache {
        &self.cache
    }

    /// The counters.
    pub fn stats(&self) -> DeltaStats {
        self.stats
    }

    /// The current generation.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Whether `index` has a cached version from an earlier generation (a delta can be tried).
    pub fn has_base(&self, index: u64) -> bool {
        self.cache
            .get(index)
            .is_some_and(|(_, g)| g < self.generation)
    }

    fn may_insert(&self) -> bool {
        self.first_round || self.generation >= 2
    }

    /// Notes that `page` was sent for `index` by another encoding: the cached copy (if any) is
    /// updated, or the page cached as a miss would be.
    pub fn record(&mut self, index: u64, page: &[u8]) {
        let generation = self.generation;
        if let Some((data, g)) = self.cache.get_mut(index) {
            if data.len() == page.len() {
                data.copy_from_slice(page);
                *g = generation;
                return;
            }
        }
        if self.may_insert() && self.cache.insert(index, page, generation) {
            self.stats.inserted += 1;
        }
    }

    /// Drops any cached copy of page `index`: cheaper than [`DeltaEncoder::record`] (no copy)
    /// for an owner that will not send deltas for now, and safe (a later delta of the page
    /// first needs a new base).
    pub fn forget(&mut self, index: u64) {
        self.cache.remove(index);
    }

    /// Tries a delta of `page` against the cached version into `out` (its whole length is the
    /// limit), and updates the cache to `page` in every case. Returns the payload length.
    pub fn encode_delta(&mut self, index: u64, page: &[u8], out: &mut [u8]) -> Option<usize> {
        let generation = self.generation;
        match self.cache.get_mut(index) {
            Some((old, g)) if *g < generation && old.len() == page.len() => {
                let n = encode(old, page, out);
                old.copy_from_slice(page);
                *g = generation;
                match n {
                    Some(n) => {
                        self.stats.encoded += 1;
                        self.stats.payload_bytes += n as u64;
                    }
                    None => self.stats.overflows += 1,
                }
                n
            }
            _ => {
                self.stats.misses += 1;
                self.record(index, page);
                None
            }
        }
    }
}

impl PageEncoder for DeltaEncoder {
    fn name(&self) -> &'static str {
        "xbzrle"
    }

    fn keeps_state(&self) -> bool {
        true
    }

    fn encode(&mut self, index: u64, page: &[u8], out: &mut [u8]) -> Option<(Encoding, usize)> {
        // Strictly shorter than the page, or the page goes raw anyway.
        let limit = out.len().min(page.len().saturating_sub(1));
        let n = self.encode_delta(index, page, &mut out[..limit])?;
        Some((Encoding::XBZRLE, n))
    }

    fn begin_generation(&mut self, generation: u32) {
        self.generation = generation;
    }

    fn sent_zero(&mut self, index: u64) {
        // As QEMU's xbzrle_cache_zero_page: a cached page that went as zero is cached as zero.
        let generation = self.generation;
        if let Some((data, g)) = self.cache.get_mut(index) {
            data.fill(0);
            *g = generation;
        }
    }
}

/// Decodes [`Encoding::XBZRLE`] pages. The scratch page given to [`PageDecoder::decode`] must
/// hold the destination's current copy of the page on entry (the receiver reads it back first);
/// it holds the new version on success and is unchanged on an error.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeltaDecoder;

impl PageDecoder for DeltaDecoder {
    fn encoding(&self) -> Encoding {
        Encoding::XBZRLE
    }

    fn decode(
        &mut self,
        _index: u64,
        payload: &[u8],
        scratch: &mut [u8],
    ) -> Result<(), &'static str> {
        decode(payload, scratch).map_err(|e| e.as_str())
    }

    fn needs_current_page(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_layout() {
        let old = [0u8; 4096];
        let mut new = old;
        new[0] = 1;
        new[200] = 2;
        new[201] = 3;
        let mut out = [0u8; 64];
        let n = encode(&old, &new, &mut out).unwrap();
        // zrun 0, nzrun 1, [1]; zrun 199 (0xc7 0x01), nzrun 2, [2, 3]; trailing run left out.
        assert_eq!(&out[..n], &[0, 1, 1, 0xc7, 0x01, 2, 2, 3]);
        let mut page = old;
        decode(&out[..n], &mut page).unwrap();
        assert_eq!(page, new);
        assert_eq!(encode(&old, &old, &mut out), Some(0));
    }

    #[test]
    fn cache_is_age_aware() {
        let mut c = XbzrleCache::new(4 * 4096 + 100, 4096);
        assert_eq!(c.slots(), 4);
        let p = [7u8; 4096];
        assert!(c.insert(1, &p, 2));
        assert!(!c.insert(5, &p, 3), "page 1 is fresh");
        assert!(c.insert(5, &p, 4), "page 1 aged out");
        assert!(c.get(1).is_none());
        assert_eq!(c.get(5).unwrap().1, 4);
        assert_eq!(XbzrleCache::new(4095, 4096).slots(), 0);
    }
}
