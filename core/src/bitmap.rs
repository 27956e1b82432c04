//! Dirty bitmaps: one bit per page in `u64` words, least-significant bit first.
//!
//! That is exactly the layout of `KVM_GET_DIRTY_LOG` and of vm-memory's
//! `AtomicBitmap::get_and_reset`, so a hypervisor's log is adopted a word at a time
//! ([`DirtyBitmap::or_words`]) with no per-bit loop, and a memory region's log can be merged in
//! at any page ([`DirtyBitmap::or_words_at`]: KVM memslots need not start at a multiple of 64
//! pages, and may have holes between them).
//!
//! Implementations:
//! - [`DirtyBitmap`]: a plain bitmap with word-at-a-time set-bit iteration ([`SetBits`],
//!   [`DirtyBitmap::for_each_set`]), count, union, difference and intersection, and a zero-cost
//!   `&BitSlice<u64, Lsb0>` view for users who want bitvec's API. Bits past `len` in the last
//!   word are always clear, so every walk reads whole words with no per-bit range check.
//! - [`AtomicDirtyBitmap`]: marked from many threads, fetched and cleared word by word.
//!
//! bitvec is deliberately not used on hot paths: its `iter_ones` is several times slower than the
//! word loop here and its `|=` far slower (see `benches/benches/bitmap.rs`).

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use bitvec::order::Lsb0;
use bitvec::slice::BitSlice;
use core::sync::atomic::{AtomicU64, Ordering};

const WORD_BITS: u64 = 64;

fn words_for(bits: u64) -> usize {
    bits.div_ceil(WORD_BITS) as usize
}

/// The mask of valid bits in the last word of a `bits`-bit map.
fn tail_mask(bits: u64) -> u64 {
    match bits % WORD_BITS {
        0 => u64::MAX,
        r => (1u64 << r) - 1,
    }
}

/// A plain dirty bitmap of `len` bits.
///
/// Invariant: bits past `len` in the last word are always zero. Every constructor and every
/// mutation keeps it (they mask the last word, or only combine maps of the same length), which is
/// what lets [`count_ones`](Self::count_ones), [`iter_ones`](Self::iter_ones) and
/// [`for_each_set`](Self::for_each_set) read whole words without checking bit indices.
#[derive(Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    len: u64,
}

impl core::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "DirtyBitmap({} of {} set)", self.count_ones(), self.len)
    }
}

impl DirtyBitmap {
    /// An all-clear bitmap of `len` bits.
    pub fn new(len: u64) -> Self {
        DirtyBitmap {
            words: vec![0; words_for(len)],
            len,
        }
    }

    /// An all-set bitmap of `len` bits.
    pub fn full(len: u64) -> Self {
        let mut map = DirtyBitmap {
            words: vec![u64::MAX; words_for(len)],
            len,
        };
        map.mask_tail();
        map
    }

    /// Adopts `words` (KVM's layout) as a bitmap of `len` bits. Returns `None` if the number of
    /// words does not match `len`. Bits past `len` are cleared.
    pub fn from_words(words: Vec<u64>, len: u64) -> Option<Self> {
        if words.len() != words_for(len) {
            return None;
        }
        let mut map = DirtyBitmap { words, len };
        map.mask_tail();
        Some(map)
    }

    fn mask_tail(&mut self) {
        if let Some(last) = self.words.last_mut() {
            *last &= tail_mask(self.len);
        }
    }

    /// Grows the bitmap to at least `len` bits (new bits clear); never shrinks it.
    pub fn grow(&mut self, len: u64) {
        if len > self.len {
            self.words.resize(words_for(len), 0);
            self.len = len;
        }
    }

    /// The number of bits (pages).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The words, least-significant bit first.
    pub fn as_words(&self) -> &[u64] {
        &self.words
    }

    /// A bitvec view of the same storage, for users who want its API (not for hot paths).
    pub fn as_bitslice(&self) -> &BitSlice<u64, Lsb0> {
        &BitSlice::from_slice(&self.words)[..self.len as usize]
    }

    /// Sets bit `i`. Panics if `i >= len` (an engine bug, never input from outside).
    #[inline]
    pub fn set(&mut self, i: u64) {
        assert!(i < self.len, "bit {i} out of range {}", self.len);
        self.words[(i / WORD_BITS) as usize] |= 1 << (i % WORD_BITS);
    }

    /// Clears bit `i`.
    #[inline]
    pub fn unset(&mut self, i: u64) {
        assert!(i < self.len, "bit {i} out of range {}", self.len);
        self.words[(i / WORD_BITS) as usize] &= !(1 << (i % WORD_BITS));
    }

    /// Whether bit `i` is set (false when out of range).
    #[inline]
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / WORD_BITS) as usize] & (1 << (i % WORD_BITS)) != 0
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Sets bits `start..end` (clamped to the length), a word at a time.
    pub fn set_range(&mut self, start: u64, end: u64) {
        let end = end.min(self.len);
        if start >= end {
            return;
        }
        let (first, last) = (
            (start / WORD_BITS) as usize,
            ((end - 1) / WORD_BITS) as usize,
        );
        let head = u64::MAX << (start % WORD_BITS);
        let tail = u64::MAX >> (WORD_BITS - 1 - (end - 1) % WORD_BITS);
        if first == last {
            self.words[first] |= head & tail;
            return;
        }
        self.words[first] |= head;
        self.words[first + 1..last].fill(u64::MAX);
        self.words[last] |= tail;
    }

    /// Keeps the first `n` set bits and clears the rest, a word at a time.
    pub fn keep_first_ones(&mut self, n: u64) {
        let mut left = n;
        for w in &mut self.words {
            let ones = w.count_ones() as u64;
            if left >= ones {
                left -= ones;
                continue;
            }
            // Clear every set bit of this word after the `left` lowest.
            let mut keep = 0u64;
            let mut rest = *w;
            for _ in 0..left {
                let low = rest & rest.wrapping_neg();
                keep |= low;
                rest ^= low;
            }
            *w = keep;
            left = 0;
        }
    }

    /// Sets every bit.
    pub fn fill(&mut self) {
        self.words.fill(u64::MAX);
        self.mask_tail();
    }

    /// The number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Whether no bit is set.
    pub fn is_clear(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// ORs `words` (a KVM dirty log, or vm-memory's `get_and_reset`) into this bitmap, a word at a
    /// time. `words` may be shorter than the bitmap (a memory slot covering its start); bits
    /// past `len` are ignored. Returns the number of words that were applied.
    pub fn or_words(&mut self, words: &[u64]) -> usize {
        self.or_words_at(0, words)
    }

    /// ORs the bits of `words` in starting at bit `first_bit`: bit `j` of the slice (bit `j % 64`
    /// of `words[j / 64]`) is ORed into bit `first_bit + j`. This merges the dirty log of a memory
    /// slot that starts at page `first_bit`, which need not be a multiple of 64.
    ///
    /// Bits that would land at or past `len` are ignored. Returns the number of source words
    /// consumed: those with at least one bit landing below `len`, that is
    /// `min(words.len(), ceil((len - first_bit) / 64))`, or 0 if `first_bit >= len`.
    ///
    /// A word-aligned `first_bit` is a plain word-wise OR; otherwise each source word is split by
    /// two shifts across two destination words.
    pub fn or_words_at(&mut self, first_bit: u64, words: &[u64]) -> usize {
        if first_bit >= self.len {
            return 0;
        }
        // Source word `k` covers bits `first_bit + 64k ..`, so the words past `n` only hold bits
        // at or past `len`.
        let n = words.len().min(words_for(self.len - first_bit));
        let src = &words[..n];
        // `ceil(len / 64) - floor(first_bit / 64) >= ceil((len - first_bit) / 64)`, so `dst`
        // has room for every source word (and maybe the spill of the last one).
        let dst = &mut self.words[(first_bit / WORD_BITS) as usize..];
        let shift = (first_bit % WORD_BITS) as u32;
        if shift == 0 {
            for (d, s) in dst.iter_mut().zip(src) {
                *d |= *s;
            }
        } else if let Some((&last, _)) = src.split_last() {
            // Destination word `k` takes the low bits of source word `k` (shifted up) and the
            // high bits of source word `k - 1` (shifted down).
            dst[0] |= src[0] << shift;
            for ((d, &s), &prev) in dst[1..].iter_mut().zip(&src[1..]).zip(src) {
                *d |= (s << shift) | (prev >> (64 - shift));
            }
            // The top of the last source word spills into the next destination word, if there is
            // one; if not, those bits lie past `len`.
            if let Some(d) = dst.get_mut(n) {
                *d |= last >> (64 - shift);
            }
        }
        self.mask_tail();
        n
    }

    /// `self |= other`. Panics if the lengths differ.
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        assert_eq!(self.len, other.len, "bitmap lengths differ");
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// `self &= !other`. Panics if the lengths differ.
    pub fn difference_with(&mut self, other: &DirtyBitmap) {
        assert_eq!(self.len, other.len, "bitmap lengths differ");
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !*b;
        }
    }

    /// `self &= other`. Panics if the lengths differ.
    pub fn intersect_with(&mut self, other: &DirtyBitmap) {
        assert_eq!(self.len, other.len, "bitmap lengths differ");
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= *b;
        }
    }

    /// The number of bits set in both `self` and `other`, without allocating.
    pub fn count_intersection(&self, other: &DirtyBitmap) -> u64 {
        assert_eq!(self.len, other.len, "bitmap lengths differ");
        self.words
            .iter()
            .zip(&other.words)
            .map(|(a, b)| (a & b).count_ones() as u64)
            .sum()
    }

    /// Moves the contents out into a new bitmap and leaves this one clear, reusing allocations:
    /// `dst` receives the bits (its old contents are discarded).
    pub fn take_into(&mut self, dst: &mut DirtyBitmap) {
        assert_eq!(self.len, dst.len, "bitmap lengths differ");
        core::mem::swap(&mut self.words, &mut dst.words);
        self.clear();
    }

    /// Iterates over the indices of set bits, in increasing order.
    pub fn iter_ones(&self) -> SetBits<'_> {
        SetBits::new(&self.words, 0)
    }

    /// Iterates over set bits at or after `start`.
    pub fn iter_ones_from(&self, start: u64) -> SetBits<'_> {
        SetBits::new(&self.words, start.min(self.len))
    }

    /// Calls `f` with the index of every set bit, in increasing order.
    ///
    /// It is the plain `trailing_zeros` loop over [`as_words`](Self::as_words), four words at a
    /// time: four all-clear words are skipped with one test (sparse maps: a 1 TiB guest with a
    /// handful of dirty pages), and the unrolled inner loop beats a word-by-word loop at every
    /// density (see `benches/benches/bitmap.rs`). It is the fastest walk of sparse and
    /// moderately dirty maps; on dense ones (half the bits set) [`iter_ones`](Self::iter_ones)
    /// is about 10 % faster. No bit index is checked against `len`: the bits past it are clear.
    #[inline]
    pub fn for_each_set(&self, mut f: impl FnMut(u64)) {
        /// Words tested together for all-clear.
        const GROUP: usize = 4;
        let groups = self.words.chunks_exact(GROUP);
        let tail = groups.remainder();
        let mut base = 0u64;
        for group in groups {
            // A fixed-size array, so the loops below are fully unrolled.
            let group: &[u64; GROUP] = group.try_into().expect("chunks_exact yields whole groups");
            if group.iter().fold(0, |any, &w| any | w) != 0 {
                for (k, &word) in group.iter().enumerate() {
                    let word_base = base + k as u64 * WORD_BITS;
                    let mut w = word;
                    while w != 0 {
                        f(word_base + w.trailing_zeros() as u64);
                        w &= w - 1;
                    }
                }
            }
            base += GROUP as u64 * WORD_BITS;
        }
        for &word in tail {
            let mut w = word;
            while w != 0 {
                f(base + w.trailing_zeros() as u64);
                w &= w - 1;
            }
            base += WORD_BITS;
        }
    }
}

/// An iterator over set bits, a word at a time (see [`DirtyBitmap::iter_ones`]).
///
/// It keeps the words still to visit as a slice and the current word's base index, so moving
/// to the next word is one load and one add: about as fast as a hand-written `trailing_zeros`
/// loop at every density, and faster on dense maps (see `benches/benches/bitmap.rs`). On sparse
/// maps [`DirtyBitmap::for_each_set`], which skips all-clear words four at a time, is faster.
pub struct SetBits<'a> {
    /// Words after the current one.
    rest: &'a [u64],
    /// Index of bit 0 of the current word.
    base: u64,
    /// The not yet visited bits of the current word.
    current: u64,
}

impl<'a> SetBits<'a> {
    fn new(words: &'a [u64], start: u64) -> Self {
        let i = (start / WORD_BITS) as usize;
        SetBits {
            current: words
                .get(i)
                .map_or(0, |w| w & (u64::MAX << (start % WORD_BITS))),
            rest: words.get(i + 1..).unwrap_or(&[]),
            base: i as u64 * WORD_BITS,
        }
    }
}

impl Iterator for SetBits<'_> {
    type Item = u64;

    #[inline]
    fn next(&mut self) -> Option<u64> {
        while self.current == 0 {
            let (&word, rest) = self.rest.split_first()?;
            self.rest = rest;
            self.base += WORD_BITS;
            self.current = word;
        }
        let bit = self.current.trailing_zeros() as u64;
        self.current &= self.current - 1;
        Some(self.base + bit)
    }
}

/// A dirty bitmap that many threads mark at once (a guest's vCPUs, or a workload), and that the
/// migration thread fetches and clears word by word.
///
/// Marking is a relaxed-cost `fetch_or` with release ordering; the fetch is an `swap(0)` with
/// acquire ordering, so a writer that stores to a page *then* marks it is always seen: either the
/// fetch sees the mark (and the page is re-sent), or the mark lands after the fetch (and the next
/// fetch sees it).
pub struct AtomicDirtyBitmap {
    words: Box<[AtomicU64]>,
    len: u64,
}

impl core::fmt::Debug for AtomicDirtyBitmap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "AtomicDirtyBitmap({} bits)", self.len)
    }
}

impl AtomicDirtyBitmap {
    /// An all-clear bitmap of `len` bits.
    pub fn new(len: u64) -> Self {
        let words = (0..words_for(len)).map(|_| AtomicU64::new(0)).collect();
        AtomicDirtyBitmap { words, len }
    }

    /// The number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Marks bit `i` (from any thread). Out-of-range bits are ignored.
    #[inline]
    pub fn mark(&self, i: u64) {
        if i < self.len {
            self.words[(i / WORD_BITS) as usize].fetch_or(1 << (i % WORD_BITS), Ordering::Release);
        }
    }

    /// Whether bit `i` is marked right now.
    pub fn is_marked(&self, i: u64) -> bool {
        i < self.len
            && self.words[(i / WORD_BITS) as usize].load(Ordering::Acquire) & (1 << (i % WORD_BITS))
                != 0
    }

    /// Atomically takes every marked bit, word by word, ORs them into `into` and leaves this
    /// bitmap clear. Returns the number of bits taken. Panics if the lengths differ.
    pub fn fetch_and_clear_into(&self, into: &mut DirtyBitmap) -> u64 {
        assert_eq!(self.len, into.len, "bitmap lengths differ");
        let mut taken = 0;
        for (src, dst) in self.words.iter().zip(into.words.iter_mut()) {
            // A plain load first avoids dirtying cache lines of all-clean words.
            if src.load(Ordering::Relaxed) != 0 {
                let w = src.swap(0, Ordering::Acquire);
                taken += w.count_ones() as u64;
                *dst |= w;
            }
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitvec::vec::BitVec;
    use proptest::prelude::*;

    fn reference(len: u64, bits: &[u64]) -> BitVec<u64, Lsb0> {
        let mut v = BitVec::<u64, Lsb0>::repeat(false, len as usize);
        for &b in bits {
            v.set((b % len) as usize, true);
        }
        v
    }

    fn ours(len: u64, bits: &[u64]) -> DirtyBitmap {
        let mut m = DirtyBitmap::new(len);
        for &b in bits {
            m.set(b % len);
        }
        m
    }

    proptest! {
        #[test]
        fn matches_bitvec(len in 1u64..3000, a in proptest::collection::vec(any::<u64>(), 0..400),
                          b in proptest::collection::vec(any::<u64>(), 0..400), start in 0u64..3100) {
            let (ma, mb) = (ours(len, &a), ours(len, &b));
            let (ra, rb) = (reference(len, &a), reference(len, &b));
            prop_assert_eq!(ma.as_bitslice(), ra.as_bitslice());
            prop_assert_eq!(ma.count_ones(), ra.count_ones() as u64);
            let ones: Vec<u64> = ma.iter_ones().collect();
            let expected: Vec<u64> = ra.iter_ones().map(|i| i as u64).collect();
            prop_assert_eq!(&ones, &expected);
            let mut walked = Vec::new();
            ma.for_each_set(|i| walked.push(i));
            prop_assert_eq!(&walked, &expected);
            let from: Vec<u64> = ma.iter_ones_from(start).collect();
            let expected_from: Vec<u64> = expected.iter().copied().filter(|&i| i >= start).collect();
            prop_assert_eq!(from, expected_from);

            let mut u = ma.clone(); u.union_with(&mb);
            let ru = ra.clone() | rb.clone();
            prop_assert_eq!(u.as_bitslice(), ru.as_bitslice());
            let mut i = ma.clone(); i.intersect_with(&mb);
            let ri = ra.clone() & rb.clone();
            prop_assert_eq!(i.as_bitslice(), ri.as_bitslice());
            prop_assert_eq!(ma.count_intersection(&mb), i.count_ones());
            let mut d = ma.clone(); d.difference_with(&mb);
            let rd = ra.clone() & !rb.clone();
            prop_assert_eq!(d.as_bitslice(), rd.as_bitslice());
        }

        #[test]
        fn set_range_and_keep_first_ones_match_bit_by_bit(
            len in 1u64..400,
            bits in proptest::collection::vec(any::<u16>(), 0..64),
            start in 0u64..450,
            width in 0u64..300,
            keep in 0u64..80,
        ) {
            let mut m = DirtyBitmap::new(len);
            for b in &bits {
                m.set(*b as u64 % len);
            }
            let mut model = m.clone();
            m.set_range(start, start + width);
            for i in start..(start + width).min(len) {
                model.set(i);
            }
            prop_assert_eq!(&m, &model);
            m.keep_first_ones(keep);
            for i in model.iter_ones().skip(keep as usize).collect::<Vec<_>>() {
                model.unset(i);
            }
            prop_assert_eq!(&m, &model);
        }

        #[test]
        fn or_words_at_matches_bitwise_model(
            len in 1u64..1500,
            before in proptest::collection::vec(any::<u64>(), 0..60),
            words in proptest::collection::vec(any::<u64>(), 0..30),
            offset in 0u64..1700,
            near_end in any::<bool>(),
        ) {
            // Half the cases start within a few words of the end (or past it), where the spill
            // and the masking of the last word matter.
            let first_bit = if near_end { (len + 70).saturating_sub(offset % 200) } else { offset };
            let mut map = ours(len, &before);
            let mut model = map.clone();
            let applied = map.or_words_at(first_bit, &words);
            prop_assert_eq!(applied, naive_or_words_at(&mut model, first_bit, &words));
            // Comparing the words also checks that no bit past `len` was set.
            prop_assert_eq!(map.as_words(), model.as_words());
            if first_bit == 0 {
                let mut whole = ours(len, &before);
                prop_assert_eq!(whole.or_words(&words), applied);
                prop_assert_eq!(&whole, &map);
            }
        }

        #[test]
        fn atomic_fetch_and_clear(len in 1u64..2000, a in proptest::collection::vec(any::<u64>(), 0..300)) {
            let atomic = AtomicDirtyBitmap::new(len);
            for &x in &a { atomic.mark(x % len); }
            let mut into = DirtyBitmap::new(len);
            let taken = atomic.fetch_and_clear_into(&mut into);
            prop_assert_eq!(&into, &ours(len, &a));
            prop_assert_eq!(taken, into.count_ones());
            let mut again = DirtyBitmap::new(len);
            prop_assert_eq!(atomic.fetch_and_clear_into(&mut again), 0);
            prop_assert!(again.is_clear());
        }
    }

    /// `or_words_at`, a bit at a time: the model it must match. Returns the number of source
    /// words with at least one bit position below `len`.
    fn naive_or_words_at(map: &mut DirtyBitmap, first_bit: u64, words: &[u64]) -> usize {
        let mut consumed = 0;
        for (k, &word) in (0u64..).zip(words) {
            if first_bit + 64 * k < map.len() {
                consumed += 1;
            }
            for b in 0..64 {
                let i = first_bit + 64 * k + b;
                if word >> b & 1 == 1 && i < map.len() {
                    map.set(i);
                }
            }
        }
        consumed
    }

    #[test]
    fn or_words_at_any_bit_offset() {
        // Aligned: a plain word-wise OR.
        let mut m = DirtyBitmap::new(256);
        assert_eq!(m.or_words_at(64, &[0b1011]), 1);
        assert_eq!(m.iter_ones().collect::<Vec<_>>(), vec![64, 65, 67]);

        // One bit in: the top bit of each source word spills into the next word.
        let mut m = DirtyBitmap::new(256);
        assert_eq!(m.or_words_at(1, &[1 | 1 << 63, 1 << 63]), 2);
        assert_eq!(m.iter_ones().collect::<Vec<_>>(), vec![1, 64, 128]);

        // 63 bits in: almost all of each source word lands in the next word.
        let mut m = DirtyBitmap::new(256);
        assert_eq!(m.or_words_at(63, &[u64::MAX]), 1);
        assert_eq!(m.as_words(), &[1 << 63, u64::MAX >> 1, 0, 0]);

        // A slot of 100 pages starting at page 70, after a hole, beside one at page 0.
        let mut m = DirtyBitmap::new(300);
        assert_eq!(m.or_words_at(0, &[1]), 1);
        assert_eq!(m.or_words_at(70, &[u64::MAX, (1 << 36) - 1]), 2);
        assert_eq!(m.count_ones(), 1 + 100);
        assert_eq!(m.iter_ones().nth(1), Some(70));
        assert_eq!(m.iter_ones().last(), Some(169));

        // ORing keeps what was already set.
        let mut m = DirtyBitmap::new(128);
        m.set(5);
        m.or_words_at(3, &[1]);
        assert_eq!(m.iter_ones().collect::<Vec<_>>(), vec![3, 5]);
    }

    #[test]
    fn or_words_at_ignores_bits_past_the_end() {
        // 130 bits: three words, the last holding two valid bits.
        let mut m = DirtyBitmap::new(130);
        assert_eq!(m.or_words_at(129, &[u64::MAX, u64::MAX]), 1);
        assert_eq!(m.iter_ones().collect::<Vec<_>>(), vec![129]);
        assert_eq!(m.as_words()[2], 0b10, "bits past len stay clear");

        // The spill of the last source word would land past the last destination word.
        let mut m = DirtyBitmap::new(128);
        assert_eq!(m.or_words_at(100, &[u64::MAX; 4]), 1);
        assert_eq!(m.count_ones(), 28);

        // At or past the end, nothing is applied.
        let mut m = DirtyBitmap::new(130);
        assert_eq!(m.or_words_at(130, &[u64::MAX]), 0);
        assert_eq!(m.or_words_at(u64::MAX, &[u64::MAX]), 0);
        assert_eq!(m.or_words_at(5, &[]), 0);
        assert!(m.is_clear());
        assert_eq!(DirtyBitmap::new(0).or_words_at(0, &[u64::MAX]), 0);

        // A full last word of a multiple-of-64 map.
        let mut m = DirtyBitmap::new(192);
        assert_eq!(m.or_words_at(130, &[u64::MAX; 3]), 1);
        assert_eq!(m.count_ones(), 62);
    }

    #[test]
    fn for_each_set_covers_groups_and_tail() {
        // Every length around the four-word groups and the partial last word.
        for len in 0..=600 {
            let full = DirtyBitmap::full(len);
            let mut walked = Vec::new();
            full.for_each_set(|i| walked.push(i));
            assert_eq!(walked, (0..len).collect::<Vec<_>>(), "len {len}");
            let mut sparse = DirtyBitmap::new(len);
            for i in (0..len).step_by(97) {
                sparse.set(i);
            }
            let mut walked = Vec::new();
            sparse.for_each_set(|i| walked.push(i));
            assert_eq!(walked, sparse.iter_ones().collect::<Vec<_>>(), "len {len}");
        }
    }

    #[test]
    fn adopts_kvm_words_and_masks_tail() {
        let m = DirtyBitmap::from_words(vec![u64::MAX, u64::MAX], 70).unwrap();
        assert_eq!(m.count_ones(), 70);
        assert!(DirtyBitmap::from_words(vec![0; 3], 70).is_none());
        let mut m = DirtyBitmap::new(200);
        assert_eq!(m.or_words(&[0b101]), 1);
        assert_eq!(m.or_words_at(3 * 64, &[u64::MAX, 1]), 1);
        assert_eq!(m.iter_ones().take(3).collect::<Vec<_>>(), vec![0, 2, 192]);
        assert_eq!(m.count_ones(), 2 + 8);
        assert_eq!(DirtyBitmap::full(130).count_ones(), 130);
    }
}
