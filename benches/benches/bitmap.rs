//! Dirty-bitmap benchmarks: how fast memferry walks, harvests and merges the dirty log of a big
//! guest, each measured beside the alternative it has to beat.
//!
//! - `walk/<density>`: visit every set bit of a 2^28-bit bitmap (a 1 TiB guest of 4 KiB pages,
//!   32 MiB of words) at 0.01 %, 1 % and 50 % density, summing the indices, four ways:
//!   [`DirtyBitmap::for_each_set`], [`DirtyBitmap::iter_ones`], a plain loop over
//!   [`DirtyBitmap::as_words`] (`trailing_zeros`, then `w &= w - 1`) and bitvec's `iter_ones`.
//!   Throughput is in set bits.
//! - `harvest`: [`AtomicDirtyBitmap::fetch_and_clear_into`] of a 2^28-bit map with 1 % marked
//!   (throughput in bitmap bytes scanned).
//! - `union`: [`DirtyBitmap::union_with`] against bitvec's `|=` on 2^24 bits.
//! - `merge`: [`DirtyBitmap::or_words_at`] merging a 2^24-bit memory slot's log into a larger map
//!   at a word-aligned page and at an unaligned one (two shifts per word), against bitvec's `|=`
//!   on the same unaligned range.
//!
//! The bitmaps come from a fixed-seed splitmix64, so every run walks the same bits. The maps are
//! large, so the sample counts are small; `cargo bench -p memferry-benches --bench bitmap --
//! --quick` gives a first look in well under a minute of measuring.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bitvec::order::Lsb0;
use bitvec::vec::BitVec;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use memferry::bitmap::{AtomicDirtyBitmap, DirtyBitmap};

/// Bits in the walked bitmaps: one per 4 KiB page of a 1 TiB guest.
const GUEST_PAGES: u64 = 1 << 28;
/// Bits in the bitmaps that are merged.
const UNION_BITS: u64 = 1 << 24;
/// The densities walked: a label and the expected number of set bits per million.
const DENSITIES: [(&str, u64); 3] = [("0.01%", 100), ("1%", 10_000), ("50%", 500_000)];

/// splitmix64 (Steele, Lea and Flood, 2014): a tiny, fast generator of well-mixed `u64`s.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// A `len`-bit map in which every bit is set independently with probability
/// `per_million / 1_000_000`.
fn random_bitmap(len: u64, per_million: u64, seed: u64) -> DirtyBitmap {
    let mut rng = SplitMix64(seed);
    let threshold = u64::MAX / 1_000_000 * per_million;
    let words = (0..len.div_ceil(64))
        .map(|_| {
            if per_million == 500_000 {
                // A fair coin per bit: a uniformly random word is exactly that.
                return rng.next_u64();
            }
            (0..64).fold(0u64, |word, bit| {
                word | (u64::from(rng.next_u64() < threshold) << bit)
            })
        })
        .collect();
    DirtyBitmap::from_words(words, len).expect("word count matches the length")
}

// The walkers are never inlined: each is compiled on its own rather than as part of `walk`, so
// its machine code does not change with the rest of the file. Where it lands still matters: at
// 0.01 % a walk is a tight loop over zero words, and identical code for `iter_ones` measured
// 1.5 ms to 3.3 ms from one build to another, depending on whether that loop straddles a 64-byte
// boundary. Compare the sparse figures within one build only.

#[inline(never)]
fn sum_for_each_set(map: &DirtyBitmap) -> u64 {
    let mut sum = 0u64;
    map.for_each_set(|i| sum = sum.wrapping_add(i));
    sum
}

#[inline(never)]
fn sum_iter_ones(map: &DirtyBitmap) -> u64 {
    let mut sum = 0u64;
    for i in map.iter_ones() {
        sum = sum.wrapping_add(i);
    }
    sum
}

/// The baseline: the loop anyone would write over the raw words.
#[inline(never)]
fn sum_word_loop(words: &[u64]) -> u64 {
    let mut sum = 0u64;
    for (index, &word) in words.iter().enumerate() {
        let base = index as u64 * 64;
        let mut w = word;
        while w != 0 {
            sum = sum.wrapping_add(base + u64::from(w.trailing_zeros()));
            w &= w - 1;
        }
    }
    sum
}

#[inline(never)]
fn sum_bitvec_iter_ones(map: &DirtyBitmap) -> u64 {
    let mut sum = 0u64;
    for i in map.as_bitslice().iter_ones() {
        sum = sum.wrapping_add(i as u64);
    }
    sum
}

fn walk(c: &mut Criterion) {
    for (seed, (label, per_million)) in (1u64..).zip(DENSITIES) {
        let map = random_bitmap(GUEST_PAGES, per_million, seed);
        let ones = map.count_ones();
        // All four walks must agree before any of them is worth timing.
        let expected = sum_word_loop(map.as_words());
        assert_eq!(sum_for_each_set(&map), expected, "for_each_set at {label}");
        assert_eq!(sum_iter_ones(&map), expected, "iter_ones at {label}");
        assert_eq!(sum_bitvec_iter_ones(&map), expected, "bitvec at {label}");

        let mut group = c.benchmark_group(format!("walk/{label}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
            .throughput(Throughput::Elements(ones));
        group.bench_function("for_each_set", |b| {
            b.iter(|| black_box(sum_for_each_set(black_box(&map))))
        });
        group.bench_function("iter_ones", |b| {
            b.iter(|| black_box(sum_iter_ones(black_box(&map))))
        });
        group.bench_function("u64_loop", |b| {
            b.iter(|| black_box(sum_word_loop(black_box(map.as_words()))))
        });
        group.bench_function("bitvec_iter_ones", |b| {
            b.iter(|| black_box(sum_bitvec_iter_ones(black_box(&map))))
        });
        group.finish();
    }
}

fn harvest(c: &mut Criterion) {
    let marks = random_bitmap(GUEST_PAGES, 10_000, 7);
    let atomic = AtomicDirtyBitmap::new(GUEST_PAGES);
    let mut into = DirtyBitmap::new(GUEST_PAGES);

    let mut group = c.benchmark_group("harvest");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(GUEST_PAGES / 8));
    group.bench_function("fetch_and_clear_into/1%", |b| {
        b.iter_custom(|iters| {
            let mut measured = Duration::ZERO;
            for _ in 0..iters {
                // Re-marking is setup, not measured: only the harvest is timed.
                into.clear();
                marks.for_each_set(|i| atomic.mark(i));
                let start = Instant::now();
                black_box(atomic.fetch_and_clear_into(&mut into));
                measured += start.elapsed();
            }
            measured
        })
    });
    group.finish();
    assert_eq!(into, marks, "the harvest took exactly the marked bits");
}

fn union(c: &mut Criterion) {
    let a = random_bitmap(UNION_BITS, 500_000, 11);
    let b = random_bitmap(UNION_BITS, 500_000, 12);
    let mut ours = a.clone();
    let mut theirs: BitVec<u64, Lsb0> = BitVec::from_bitslice(a.as_bitslice());

    let mut group = c.benchmark_group("union");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(UNION_BITS / 8));
    group.bench_function("union_with", |bench| {
        bench.iter(|| black_box(&mut ours).union_with(black_box(&b)))
    });
    group.bench_function("bitvec_bitor_assign", |bench| {
        bench.iter(|| *black_box(&mut theirs).as_mut_bitslice() |= black_box(b.as_bitslice()))
    });
    group.finish();
    assert_eq!(
        ours.as_bitslice(),
        theirs.as_bitslice(),
        "both unions agree"
    );
}

fn merge(c: &mut Criterion) {
    // A slot of 2^24 pages at page 64 (aligned) or at page 77 (unaligned), in a map with room
    // for either.
    let slot = random_bitmap(UNION_BITS, 500_000, 13);
    let map_bits = UNION_BITS + 128;
    let mut ours = random_bitmap(map_bits, 500_000, 14);
    let mut theirs: BitVec<u64, Lsb0> = BitVec::from_bitslice(ours.as_bitslice());
    const ALIGNED: u64 = 64;
    const UNALIGNED: u64 = 77;

    let mut group = c.benchmark_group("merge");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(UNION_BITS / 8));
    group.bench_function("or_words_at/aligned", |bench| {
        bench.iter(|| black_box(&mut ours).or_words_at(ALIGNED, black_box(slot.as_words())))
    });
    group.bench_function("or_words_at/unaligned", |bench| {
        bench.iter(|| black_box(&mut ours).or_words_at(UNALIGNED, black_box(slot.as_words())))
    });
    let range = UNALIGNED as usize..(UNALIGNED + UNION_BITS) as usize;
    group.bench_function("bitvec_bitor_assign/unaligned", |bench| {
        bench.iter(|| {
            black_box(&mut theirs)[range.clone()] |= black_box(slot.as_bitslice());
        })
    });
    group.finish();
    // Only the unaligned merges ran on both sides; redo the aligned one on bitvec's copy.
    theirs[ALIGNED as usize..(ALIGNED + UNION_BITS) as usize] |= slot.as_bitslice();
    assert_eq!(
        ours.as_bitslice(),
        theirs.as_bitslice(),
        "both merges agree"
    );
}

criterion_group!(benches, walk, harvest, union, merge);
criterion_main!(benches);
