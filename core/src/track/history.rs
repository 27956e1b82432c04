//! History (time-series) prediction, after paper 003 ("hot pages recognised from the history of
//! dirty pages") and paper 001's bitmap of frequently updated pages: a page dirtied in at least
//! `m` of the last `n` syncs is hot. Plus a moving-average estimate of the dirty rate.
//!
//! Implementations:
//! - [`History`]: a per-page shift register of the last `n` syncs (`n ≤ 64`, one `u64`) in a
//!   hash map, the [`Predictor`] built on it, and [`History::dirty_rate`].
//! - [`HistoryConfig`]: `m`, `n`, the cap and the rate average's weight.
//!
//! ## Registers
//! Bit 0 of a page's register is the latest sync, bit `i` the sync `i` syncs before it; each
//! sync shifts every register left by one (dropping bits older than `n`) and then sets bit 0 of
//! the pages dirtied. A register that shifts to zero is removed: a page with no dirty sync in
//! the window carries no information (were it dirtied again, it would start from the same
//! single bit). So the map holds exactly the pages dirtied in the last `n` syncs, up to the cap,
//! and a sync costs O(tracked + dirty).
//!
//! ## Defaults: m = 2 of n = 4
//! Reasoned, then checked with the quality table that `benches/benches/predictors.rs` prints. A
//! single dirtying is weak evidence (a uniformly random writer dirties many pages once), so
//! m ≥ 2 is what keeps the predictor from holding back pages on a workload with no hot set. Pre-
//! copy runs only a handful of rounds, and the history must be built within them (a few
//! pre-processing samples, then rounds 1 to ~5), so n must be small: it takes ~n syncs to warm
//! up and reacts up to n syncs late when the hot set moves. With n = 4 a page dirtied at half the
//! syncs is hot with probability 69% (P[Bin(4, ½) ≥ 2]) and one dirtied at 5% of them with 1.4%.
//! Measured (precision / recall against the next sync, share of the guest held back):
//! - 5% hot, dirtied at 80% of syncs: 2-of-4 0.80 / 0.93; 2-of-3 0.80 / 0.86; 3-of-4 0.80 /
//!   0.77; 3-of-6 0.80 / 0.92 (the recency window of 2 syncs: 0.74 / 0.92);
//! - uniform writes at 5%: 2-of-4 holds back 1.4% of the guest, 2-of-3 0.7%, 3-of-6 0.2% (the
//!   recency window of 2 syncs: 9.8%);
//! - a 1% hot set that moves every 8 syncs: precision 0.66 for 2-of-4, 0.56 for 3-of-6, 0.47 for
//!   4-of-8: the longer histories lag.
//!
//! ## The rate average
//! [`History::dirty_rate`] is an exponentially weighted moving average of pages dirtied per
//! second, one sample per sync (the pages of this sync over the time since the previous one),
//! weighted `rate_alpha_permille / 1000` for the newest sample (default 300: the last ~3 syncs
//! dominate, enough to ride over one odd round without lagging a real change by many rounds).
//!
//! ## Cap and eviction
//! At the cap, a newcomer (one dirty sync, the latest) may replace only a page it outranks, by
//! the key (dirty syncs, capped at `m`; then the recency of the latest dirtying; then the lowest
//! page index), so a page that has reached `m` is never dropped for a page seen once, and pages
//! dirtied at this sync never make room for one another. When fewer pages can leave than
//! newcomers arrive, the newcomers with the lowest indices are admitted. Memory: a `u64 -> u64`
//! hash slot (16 bytes plus a control byte, at most 7/8 full: 19 to ~39 bytes per tracked page
//! as the table doubles); the map shrinks when a shift leaves it under a quarter full.

use alloc::vec::Vec;

use hashbrown::HashMap;

use super::{mark, Predictor};
use crate::bitmap::DirtyBitmap;
use crate::time::Nanos;

/// The default `m`: dirty syncs needed to be hot.
pub const DEFAULT_M: u32 = 2;
/// The default `n`: syncs remembered.
pub const DEFAULT_N: u32 = 4;
/// The default weight of the newest rate sample, in thousandths.
pub const DEFAULT_RATE_ALPHA_PERMILLE: u16 = 300;

/// The parameters of [`History`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HistoryConfig {
    /// Dirty syncs (out of the last `n`) that make a page hot. Clamped to `1..=n`.
    pub m: u32,
    /// Syncs remembered. Clamped to `1..=64`.
    pub n: u32,
    /// The most pages tracked at once.
    pub max_tracked: usize,
    /// The weight of the newest sample in the dirty-rate average, in thousandths (clamped to
    /// `1..=1000`).
    pub rate_alpha_permille: u16,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            m: DEFAULT_M,
            n: DEFAULT_N,
            max_tracked: super::DEFAULT_MAX_TRACKED,
            rate_alpha_permille: DEFAULT_RATE_ALPHA_PERMILLE,
        }
    }
}

/// The m-of-n history predictor (see the module docs).
#[derive(Clone, Debug)]
pub struct History {
    registers: HashMap<u64, u64>,
    config: HistoryConfig,
    /// The low `n` bits.
    mask: u64,
    /// The EWMA of pages per second, once two syncs have been seen.
    rate: Option<f64>,
    /// The sync the next rate sample is measured from.
    rate_since: Option<Nanos>,
    /// Pages dirtied since `rate_since` (syncs at the same instant add up).
    rate_pages: u64,
}

impl History {
    /// A history with `config`, its values clamped to their ranges.
    pub fn new(config: HistoryConfig) -> Self {
        let n = config.n.clamp(1, 64);
        let config = HistoryConfig {
            n,
            m: config.m.clamp(1, n),
            max_tracked: config.max_tracked.min(super::MAX_TRACKED_LIMIT),
            rate_alpha_permille: config.rate_alpha_permille.clamp(1, 1000),
        };
        History {
            registers: HashMap::default(),
            config,
            mask: if n == 64 { u64::MAX } else { (1 << n) - 1 },
            rate: None,
            rate_since: None,
            rate_pages: 0,
        }
    }

    /// The configuration in use (after clamping).
    pub fn config(&self) -> HistoryConfig {
        self.config
    }

    /// The register of `page` (bit 0 = the latest sync), if tracked.
    pub fn register(&self, page: u64) -> Option<u64> {
        self.registers.get(&page).copied()
    }

    /// In how many of the last `n` syncs `page` was dirtied (0 if untracked).
    pub fn dirty_syncs(&self, page: u64) -> u32 {
        self.register(page).map_or(0, u64::count_ones)
    }

    /// Whether `page` is predicted hot: dirtied in at least `m` of the last `n` syncs.
    pub fn is_hot(&self, page: u64) -> bool {
        self.dirty_syncs(page) >= self.config.m
    }

    /// The moving average of pages dirtied per second, once two syncs at different times have
    /// been seen.
    pub fn dirty_rate(&self) -> Option<f64> {
        self.rate
    }

    /// The pages the average rate predicts will be dirtied in `span` (rounded to nearest).
    pub fn predicted_dirty_pages(&self, span: Nanos) -> Option<u64> {
        self.rate.map(|r| (r * span.as_secs_f64() + 0.5) as u64)
    }

    fn sample_rate(&mut self, pages: u64, now: Nanos) {
        self.rate_pages += pages;
        let Some(since) = self.rate_since else {
            // The first sync's pages were dirtied over an unknown span: no sample.
            self.rate_since = Some(now);
            self.rate_pages = 0;
            return;
        };
        let span = now.saturating_sub(since);
        if span == Nanos::ZERO {
            return;
        }
        let sample = self.rate_pages as f64 / span.as_secs_f64();
        let alpha = f64::from(self.config.rate_alpha_permille) / 1000.0;
        self.rate = Some(match self.rate {
            None => sample,
            Some(r) => r + alpha * (sample - r),
        });
        self.rate_since = Some(now);
        self.rate_pages = 0;
    }

    /// The coldness key of a register: smaller is colder (see the module docs).
    fn rank(&self, register: u64) -> (u32, u64) {
        // reverse_bits puts the latest sync in the top bit, so a more recent last dirtying
        // compares greater, whatever the older bits.
        (
            register.count_ones().min(self.config.m),
            register.reverse_bits(),
        )
    }

    /// Makes room for up to `count` newcomers by removing tracked pages a newcomer outranks;
    /// returns how many were removed.
    fn evict_for_newcomers(&mut self, count: usize) -> usize {
        let newcomer = self.rank(1);
        let mut candidates: Vec<((u32, u64), u64)> = self
            .registers
            .iter()
            .map(|(&page, &r)| (self.rank(r), page))
            .filter(|&(rank, _)| rank < newcomer)
            .collect();
        let count = count.min(candidates.len());
        if count == 0 {
            return 0;
        }
        if count < candidates.len() {
            candidates.select_nth_unstable(count - 1);
        }
        for &(_, page) in &candidates[..count] {
            self.registers.remove(&page);
        }
        count
    }
}

impl Predictor for History {
    fn name(&self) -> &'static str {
        "history"
    }

    fn observe(&mut self, dirty: &DirtyBitmap, now: Nanos) {
        let mask = self.mask;
        self.registers.retain(|_, r| {
            *r = (*r << 1) & mask;
            *r != 0
        });
        if self.registers.capacity() > 64 && self.registers.len() * 4 < self.registers.capacity() {
            self.registers.shrink_to(self.registers.len() * 2);
        }
        let cap = self.config.max_tracked;
        let mut pages = 0u64;
        let mut overflow = 0usize;
        let mut first_overflow = None;
        dirty.for_each_set(|page| {
            pages += 1;
            if let Some(r) = self.registers.get_mut(&page) {
                *r |= 1;
            } else if self.registers.len() < cap {
                self.registers.insert(page, 1);
            } else {
                overflow += 1;
                first_overflow.get_or_insert(page);
            }
        });
        self.sample_rate(pages, now);
        let Some(from) = first_overflow else { return };
        if self.evict_for_newcomers(overflow) == 0 {
            return;
        }
        for page in dirty.iter_ones_from(from) {
            if self.registers.len() >= cap {
                break;
            }
            self.registers.entry(page).or_insert(1);
        }
    }

    fn predict(&mut self, _now: Nanos, hot: &mut DirtyBitmap) {
        let m = self.config.m;
        for (&page, &r) in &self.registers {
            if r.count_ones() >= m {
                mark(hot, page);
            }
        }
    }

    fn tracked_pages(&self) -> usize {
        self.registers.len()
    }

    fn heap_bytes(&self) -> usize {
        self.registers.allocation_size()
    }
}
