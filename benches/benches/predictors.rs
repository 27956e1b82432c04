//! Writable-working-set predictor benchmarks: what each predictor of `memferry::track` costs per
//! dirty page, what it holds in memory per tracked page, and how well it predicts.
//!
//! - `observe/<predictor>`: one [`Predictor::observe`] of a sync on a 2^20-page guest (4 GiB of
//!   4 KiB pages) whose hot set, 1% of the pages, is dirtied at every sync, plus 100 fresh random
//!   cold pages per sync. The predictor is warmed to its steady state first
//!   (cap 2^16 pages, so WSClock, LRU and the splay tree are full and replacing). Throughput is
//!   in dirty pages, so criterion's elements/s is the inverse of the cost per dirty page;
//!   `observe/walk-only` is the bitmap walk every predictor pays, for reference.
//! - `predict/<predictor>`: one [`Predictor::predict`] into a bitmap, same state; throughput in
//!   tracked pages.
//! - Printed once (stderr) before the timings: bytes per tracked page in that steady state
//!   ([`Predictor::heap_bytes`] / [`Predictor::tracked_pages`]), and a prediction-quality table
//!   on synthetic hot/cold workloads (precision and recall against the next sync's dirty set,
//!   and the share of the guest held back) for several windows and m-of-n settings: the
//!   measurement behind the defaults documented in `core/src/track/mod.rs` and `history.rs`.
//!
//! Every bitmap comes from a fixed-seed splitmix64. `cargo bench -p memferry-benches --bench
//! predictors -- --quick` gives a first look in well under a minute.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use memferry::bitmap::DirtyBitmap;
use memferry::time::Nanos;
use memferry::track::{HistoryConfig, Predictor, PredictorKind, RecencyConfig, Window};

/// Pages in the benchmarked guest.
const GUEST_PAGES: u64 = 1 << 20;
/// Its hot set: 1% of the pages, dirtied at every sync.
const HOT_PAGES: u64 = GUEST_PAGES / 100;
/// Random cold pages dirtied per sync.
const COLD_PER_SYNC: u64 = 100;
/// The cap of every predictor in the cost benchmarks.
const CAP: usize = 1 << 16;
/// Time between syncs.
const SYNC_INTERVAL: Nanos = Nanos::from_millis(100);

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

    /// A uniform `f64` in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The guest's dirty log: the hot set (a fixed random 1% of the guest) always set, and fresh
/// cold pages set for one sync at a time.
struct CostSyncs {
    map: DirtyBitmap,
    rng: SplitMix64,
    cold: Vec<u64>,
}

impl CostSyncs {
    fn new() -> Self {
        let mut rng = SplitMix64(0x5eed);
        let mut map = DirtyBitmap::new(GUEST_PAGES);
        (0..HOT_PAGES).for_each(|_| map.set(rng.next_u64() % GUEST_PAGES));
        CostSyncs {
            map,
            rng,
            cold: Vec::with_capacity(COLD_PER_SYNC as usize),
        }
    }

    /// Dirty pages per sync (hot set plus cold pages).
    fn dirty_per_sync(&self) -> u64 {
        self.map.count_ones() + COLD_PER_SYNC
    }

    /// Sets the next sync's cold pages, hands the log to `f`, then clears them again. Costs 200
    /// bit operations, noise beside a sync of ~10,600 pages.
    fn with_next<R>(&mut self, f: impl FnOnce(&DirtyBitmap) -> R) -> R {
        self.cold.clear();
        while self.cold.len() < COLD_PER_SYNC as usize {
            let page = self.rng.next_u64() % GUEST_PAGES;
            if !self.map.get(page) {
                self.map.set(page);
                self.cold.push(page);
            }
        }
        let r = f(&self.map);
        for &page in &self.cold {
            self.map.unset(page);
        }
        r
    }
}

fn kinds(window: Window, cap: usize) -> [PredictorKind; 4] {
    let r = RecencyConfig {
        window,
        max_tracked: cap,
    };
    [
        PredictorKind::WsClock(r),
        PredictorKind::Lru(r),
        PredictorKind::Splay(r),
        PredictorKind::History(HistoryConfig {
            max_tracked: cap,
            ..HistoryConfig::default()
        }),
    ]
}

/// A predictor in its steady state: fed enough syncs to fill its cap with cold pages.
fn warmed(kind: PredictorKind, syncs: &mut CostSyncs) -> (Box<dyn Predictor + Send>, Nanos) {
    let mut p = kind.build(GUEST_PAGES);
    let mut now = Nanos::ZERO;
    // Each sync brings 100 new cold pages: (CAP - hot) / 100 syncs fill the cap, and a hundred
    // more make the replacement run.
    let warmup = (CAP - HOT_PAGES as usize) / COLD_PER_SYNC as usize + 100;
    for _ in 0..warmup {
        now += SYNC_INTERVAL;
        syncs.with_next(|dirty| p.observe(dirty, now));
    }
    (p, now)
}

fn bench_costs(c: &mut Criterion) {
    let mut syncs = CostSyncs::new();
    let dirty_per_sync = syncs.dirty_per_sync();

    eprintln!(
        "steady state on a 2^20-page guest, {dirty_per_sync} dirty pages per sync (1% hot + \
         {COLD_PER_SYNC} fresh cold), cap {CAP}:"
    );
    for kind in kinds(Window::Syncs(2), CAP) {
        let (p, _) = warmed(kind, &mut syncs);
        eprintln!(
            "  {:8} tracked {:6} pages, heap {:8} B, {:5.1} B per tracked page",
            kind.name(),
            p.tracked_pages(),
            p.heap_bytes(),
            p.heap_bytes() as f64 / p.tracked_pages().max(1) as f64
        );
    }

    let mut group = c.benchmark_group("observe");
    group.throughput(Throughput::Elements(dirty_per_sync));
    group.bench_function("walk-only", |b| {
        b.iter(|| {
            syncs.with_next(|dirty| {
                let mut sum = 0u64;
                dirty.for_each_set(|p| sum = sum.wrapping_add(p));
                black_box(sum)
            })
        })
    });
    for kind in kinds(Window::Syncs(2), CAP) {
        let (mut p, mut now) = warmed(kind, &mut syncs);
        group.bench_function(kind.name(), |b| {
            b.iter(|| {
                now += SYNC_INTERVAL;
                syncs.with_next(|dirty| p.observe(dirty, now));
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("predict");
    for kind in kinds(Window::Syncs(2), CAP) {
        let (mut p, now) = warmed(kind, &mut syncs);
        group.throughput(Throughput::Elements(p.tracked_pages() as u64));
        let mut hot = DirtyBitmap::new(GUEST_PAGES);
        group.bench_function(kind.name(), |b| {
            // Not cleared between iterations: predict only sets bits, and a 128 KiB clear
            // would cost more than some predictions.
            b.iter(|| {
                p.predict(now, &mut hot);
                black_box(&hot);
            })
        });
    }
    group.finish();
}

/// A synthetic workload for the quality table: per sync, every page is dirtied independently
/// with its own probability.
struct Workload {
    name: &'static str,
    /// Share of the guest that is hot.
    hot_share: f64,
    /// Probability that a hot page is dirtied at a sync.
    hot_p: f64,
    /// Probability that any other page is dirtied at a sync.
    cold_p: f64,
    /// The hot set moves to fresh pages every this many syncs (0: never).
    moves_every: usize,
}

const WORKLOADS: [Workload; 5] = [
    Workload {
        name: "5% hot p=.8, cold .002",
        hot_share: 0.05,
        hot_p: 0.8,
        cold_p: 0.002,
        moves_every: 0,
    },
    Workload {
        name: "5% hot p=.4, cold .005",
        hot_share: 0.05,
        hot_p: 0.4,
        cold_p: 0.005,
        moves_every: 0,
    },
    Workload {
        name: "10% hot p=.6, cold .01",
        hot_share: 0.10,
        hot_p: 0.6,
        cold_p: 0.01,
        moves_every: 0,
    },
    Workload {
        name: "1% hot p=.9 moving/8",
        hot_share: 0.01,
        hot_p: 0.9,
        cold_p: 0.002,
        moves_every: 8,
    },
    Workload {
        name: "uniform p=.05",
        hot_share: 0.0,
        hot_p: 0.0,
        cold_p: 0.05,
        moves_every: 0,
    },
];

/// Pages of the quality table's guest, and syncs per workload.
const QUALITY_PAGES: u64 = 1 << 16;
const QUALITY_SYNCS: usize = 40;
/// Syncs before the averages start: a pre-copy migration runs a handful of rounds, so the
/// predictors are scored from the third sync on, while they are still learning.
const QUALITY_SKIP: usize = 2;

fn workload_syncs(w: &Workload, seed: u64) -> Vec<DirtyBitmap> {
    let mut rng = SplitMix64(seed);
    let hot_count = (QUALITY_PAGES as f64 * w.hot_share) as u64;
    let mut hot_start = 0;
    (0..QUALITY_SYNCS)
        .map(|s| {
            if w.moves_every > 0 && s > 0 && s % w.moves_every == 0 {
                hot_start = (hot_start + hot_count) % QUALITY_PAGES;
            }
            let mut map = DirtyBitmap::new(QUALITY_PAGES);
            for page in 0..QUALITY_PAGES {
                let is_hot = (page + QUALITY_PAGES - hot_start) % QUALITY_PAGES < hot_count;
                let p = if is_hot { w.hot_p } else { w.cold_p };
                if rng.unit() < p {
                    map.set(page);
                }
            }
            map
        })
        .collect()
}

/// Mean precision, recall and held-back share of `kind` on `syncs`: after each sync, the
/// prediction is scored against the next sync's dirty set.
fn score(kind: PredictorKind, syncs: &[DirtyBitmap]) -> (f64, f64, f64) {
    let mut p = kind.build(QUALITY_PAGES);
    let (mut precision, mut recall, mut held, mut n) = (0.0, 0.0, 0.0, 0.0);
    let mut hot = DirtyBitmap::new(QUALITY_PAGES);
    for (i, pair) in syncs.windows(2).enumerate() {
        let now = Nanos::from_millis(100 * i as u64);
        p.observe(&pair[0], now);
        if i < QUALITY_SKIP {
            continue;
        }
        hot.clear();
        p.predict(now, &mut hot);
        let (predicted, next) = (hot.count_ones() as f64, pair[1].count_ones() as f64);
        let right = hot.count_intersection(&pair[1]) as f64;
        precision += if predicted > 0.0 {
            right / predicted
        } else {
            1.0
        };
        recall += if next > 0.0 { right / next } else { 1.0 };
        held += predicted / QUALITY_PAGES as f64;
        n += 1.0;
    }
    (precision / n, recall / n, held / n)
}

fn quality_table() {
    let recency = |w| RecencyConfig {
        window: w,
        max_tracked: QUALITY_PAGES as usize,
    };
    let history = |m, n| HistoryConfig {
        m,
        n,
        max_tracked: QUALITY_PAGES as usize,
        ..HistoryConfig::default()
    };
    let configs = [
        PredictorKind::Lru(recency(Window::Syncs(1))),
        PredictorKind::Lru(recency(Window::Syncs(2))),
        PredictorKind::Lru(recency(Window::Syncs(3))),
        PredictorKind::Lru(recency(Window::Syncs(4))),
        PredictorKind::History(history(1, 2)),
        PredictorKind::History(history(2, 3)),
        PredictorKind::History(history(2, 4)),
        PredictorKind::History(history(3, 4)),
        PredictorKind::History(history(3, 6)),
        PredictorKind::History(history(4, 8)),
    ];
    eprintln!(
        "\nprediction quality vs the next sync (2^16 pages, {QUALITY_SYNCS} syncs, scored from sync {}):",
        QUALITY_SKIP + 1
    );
    eprintln!("  (WSClock and the splay tree predict exactly what LRU does for the same window)");
    eprintln!("  precision / recall / share of the guest held back");
    for (i, w) in WORKLOADS.iter().enumerate() {
        let syncs = workload_syncs(w, 0xabc + i as u64);
        eprintln!("  {}:", w.name);
        for kind in configs {
            let (p, r, h) = score(kind, &syncs);
            eprintln!(
                "    {:40} {:5.3} / {:5.3} / {:6.2}%",
                kind.to_string(),
                p,
                r,
                100.0 * h
            );
        }
    }
    eprintln!();
}

fn benches(c: &mut Criterion) {
    quality_table();
    bench_costs(c);
}

criterion_group! {
    name = predictors;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(predictors);
