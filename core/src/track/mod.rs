//! Writable-working-set prediction: which pages will the guest dirty again before the next
//! round? Pages predicted hot are held back from the push rounds and sent once, in
//! stop-and-copy (paper 002's pre-processing phase; paper 001's bitmap of frequently updated
//! pages; paper 003's history of dirty pages).
//!
//! Every predictor sits behind one trait, [`Predictor`]: it observes each dirty-log sync (the
//! bitmap and `now`) and answers with the predicted-hot set. Predictors keep state only for pages
//! seen dirty, up to a configurable cap, so a 1 TiB guest with a small hot set costs memory in
//! proportion to the hot set, not to the guest.
//!
//! Implementations (selected by [`PredictorKind`], parsed from `none|wsclock|lru|splay|history`
//! by [`PredictorKind::parse`]):
//! - none ([`NoPrediction`]): predicts nothing (plain pre-copy).
//! - WSClock ([`wsclock::WsClock`], Carr and Hennessy, via paper 002): a clock ring with a
//!   referenced bit, a modified bit and the time of last use; hot = used within the window.
//! - LRU ([`lru::Lru`], Zaw and Thein): a recency list; hot = the recent part of the list.
//! - splay tree ([`splay::SplayPredictor`] over [`splay::SplayTree`], Sleator and Tarjan; Zaw and
//!   Thein): every dirty page is splayed to the root; hot = dirtied within the window.
//! - history / time series ([`history::History`], paper 003): hot = dirtied in at least `m` of
//!   the last `n` syncs, plus a moving-average dirty-rate estimate.
//!
//! ## The window, and its default
//! WSClock, LRU and the splay tree share one notion of "recent", [`Window`]: either a span of
//! time τ ([`Window::Time`], the paper's WSClock) or the last `k` syncs ([`Window::Syncs`]). The
//! default is [`Window::Syncs`]`(2)`, a τ that is always two sync intervals long. A fixed τ has to
//! be wrong somewhere: syncs happen once per pre-copy round, and rounds last from ~10 ms (short
//! pre-processing samples, late rounds of a small dirty set) to seconds (round 1 of a large guest
//! sends all memory), so any fixed τ is either many rounds (everything ever dirtied is "hot") or
//! less than one (nothing is). Two syncs rather than one or three, from the quality table that
//! `benches/benches/predictors.rs` prints (precision and recall against the next sync's dirty
//! set, synthetic hot/cold workloads on 2^16 pages): for a 5% hot set dirtied at 80% of syncs,
//! k = 1, 2, 3 give recall 0.76, 0.92, 0.95 at precision 0.76, 0.74, 0.72; for a hot set dirtied
//! at 40% of syncs a third sync still adds recall, but on uniform random writes every sync of
//! window holds back another 5% of the guest (5%, 10%, 14%) at 5% precision. Two is the knee.
//!
//! ## Using a prediction
//! A recency working set always contains the sync just observed, so right after `observe` it
//! includes every page that sync dirtied, and "dirty minus predicted hot" is empty. A pre-copy
//! engine therefore predicts *before* observing the sync whose pages it is about to send (hot =
//! dirtied within the window before, and again now) or learns the set in a pre-processing
//! phase. History with `m ≥ 2` does not need this: one dirtying never makes a page hot, which is
//! also why it holds back 1.4% of the guest on uniform writes where the recency predictors hold
//! back 10%.
//!
//! ## Memory
//! Every tracker allocates lazily, in proportion to the pages it tracks, and never more than
//! `max_tracked` pages (default [`DEFAULT_MAX_TRACKED`], clamped to the guest's page count): when
//! a new page arrives at the cap, the coldest tracked page makes room (each tracker documents
//! what "coldest" means), and when nothing colder than the newcomer exists the newcomer is not
//! tracked. [`Predictor::heap_bytes`] reports capacity-based sizes. Bytes per tracked page on
//! x86-64 (a `u64 -> u32` hash slot is 16 bytes plus a control byte, at most 7/8 full, and tables
//! and `Vec`s grow by doubling, so the figure moves between the bounds as the count grows):
//! - WSClock: a 24-byte frame + a hash slot: 41 to ~75; 58 measured at 2^16 tracked pages;
//! - LRU: a 24-byte node + a hash slot: the same, 58 measured;
//! - splay: a 32-byte node, no hash map (the tree is the index): 32 to 64; 32 measured;
//! - history: a `u64 -> u64` hash slot: 19 to ~39, up to ~78 just before the table shrinks
//!   (it does when a sync leaves it under a quarter full); 26 measured at 10,830 pages.
//!
//! Per sync, on a 2^20-page guest with 10,530 dirty pages (1% hot plus 100 fresh cold pages) and
//! 2^16 tracked pages, the benches measure (best of three quick runs on a shared two-core
//! machine; beyond the ~50 µs bitmap walk every predictor shares): history ~4 ns, LRU ~7 ns,
//! WSClock ~12 ns per dirty page (its sweep also visits every tracked page), splay ~115 ns per
//! dirty page (one splay in a 2^16-node tree each).
//!
//! ## Time
//! `now` must not decrease from one call to the next; if it does, ages saturate at zero (a page
//! dirtied "in the future" counts as just dirtied). Two syncs at the same instant are not told
//! apart by a [`Window::Syncs`] window.
//!
//! ## Hash maps
//! The trackers that need a page index use `hashbrown::HashMap` with hashbrown's default hasher
//! (foldhash, randomly seeded, no std). The dirty set is chosen by the guest, so a fixed weak
//! hash would let a guest aim collisions at the source; no decision depends on the maps'
//! iteration order (ties are broken by page index), so the randomness never reaches a result.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use core::fmt;
use core::mem::size_of;
use core::str::FromStr;

use crate::bitmap::DirtyBitmap;
use crate::time::Nanos;

pub mod history;
pub mod lru;
pub mod splay;
pub mod wsclock;

pub use history::{History, HistoryConfig};
pub use lru::Lru;
pub use splay::{SplayPredictor, SplayTree};
pub use wsclock::WsClock;

/// A writable-working-set predictor.
pub trait Predictor {
    /// A short name for reports (`"wsclock"`, `"lru"`, …).
    fn name(&self) -> &'static str;

    /// Observes one dirty-log sync: `dirty` holds the pages written since the previous sync,
    /// taken at `now`. Must cost O(pages set in `dirty` + pages tracked), never O(guest size).
    fn observe(&mut self, dirty: &DirtyBitmap, now: Nanos);

    /// Sets in `hot` (without clearing it first) every page predicted to be dirtied again before
    /// the next round, as of `now`.
    fn predict(&mut self, now: Nanos, hot: &mut DirtyBitmap);

    /// How many pages the predictor holds state for.
    fn tracked_pages(&self) -> usize;

    /// Heap bytes the predictor uses (its arenas and indexes), for the benches' bytes-per-page.
    fn heap_bytes(&self) -> usize;
}

/// Plain pre-copy: nothing is ever predicted hot.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPrediction;

impl Predictor for NoPrediction {
    fn name(&self) -> &'static str {
        "none"
    }
    fn observe(&mut self, _dirty: &DirtyBitmap, _now: Nanos) {}
    fn predict(&mut self, _now: Nanos, _hot: &mut DirtyBitmap) {}
    fn tracked_pages(&self) -> usize {
        0
    }
    fn heap_bytes(&self) -> usize {
        0
    }
}

/// The default cap on tracked pages: 2^20 pages (4 GiB of 4 KiB pages).
///
/// Why this size: a predicted-hot page is sent during downtime, so a hot set is only useful up
/// to what stop-and-copy can send within a downtime target. 2^20 pages take 3.4 s at 10 Gbit/s
/// and 0.34 s at 100 Gbit/s, beyond any usual target, so a larger cap would only buy memory
/// (about 30 to 60 MiB at this cap, see the module docs) and sweep time. It still holds the hot
/// set of the paper's workloads (5% of a 64 GiB guest is 0.8 × 2^20 pages) with room for cold
/// pages. [`PredictorKind::build`] clamps it to the guest's page count.
pub const DEFAULT_MAX_TRACKED: usize = 1 << 20;

/// The largest cap a tracker accepts: its arenas index pages with `u32`, one value reserved.
pub const MAX_TRACKED_LIMIT: usize = u32::MAX as usize - 1;

/// The longest [`Window::Syncs`] window (the tracker keeps one timestamp per sync in it).
pub const MAX_SYNC_WINDOW: u32 = 1024;

/// The default window of WSClock, LRU and the splay tree: the last two syncs (see the module
/// docs for the reasoning and the measurement).
pub const DEFAULT_WINDOW: Window = Window::Syncs(2);

/// What "recently dirtied" means: the working set is the pages dirtied within the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Window {
    /// Dirtied less than τ before `now` (`now - last < τ`): the WSClock paper's rule. τ = 0
    /// makes nothing hot.
    Time(Nanos),
    /// Dirtied in one of the last `k` syncs: a τ that stretches with the round length. `k` is
    /// clamped to `1..=MAX_SYNC_WINDOW`.
    Syncs(u32),
}

impl Default for Window {
    fn default() -> Self {
        DEFAULT_WINDOW
    }
}

impl fmt::Display for Window {
    /// `tau=<ns>ns` or `syncs=<k>`, as [`PredictorKind::parse`] reads it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Window::Time(tau) => write!(f, "tau={}ns", tau.0),
            Window::Syncs(k) => write!(f, "syncs={k}"),
        }
    }
}

/// The times of the latest syncs a [`Window::Syncs`] window needs, and the cutoff it implies.
#[derive(Clone, Debug)]
pub(crate) struct WindowClock {
    window: Window,
    /// The last `k` sync times, oldest first (empty for a time window).
    recent: VecDeque<Nanos>,
}

impl WindowClock {
    pub(crate) fn new(window: Window) -> Self {
        let window = match window {
            Window::Syncs(k) => Window::Syncs(k.clamp(1, MAX_SYNC_WINDOW)),
            w => w,
        };
        WindowClock {
            window,
            recent: VecDeque::new(),
        }
    }

    pub(crate) fn window(&self) -> Window {
        self.window
    }

    /// Records a sync at `now`; call before asking for the cutoff of that sync.
    pub(crate) fn observed(&mut self, now: Nanos) {
        if let Window::Syncs(k) = self.window {
            if self.recent.len() == k as usize {
                self.recent.pop_front();
            }
            self.recent.push_back(now);
        }
    }

    /// The rule that tells, as of `now`, whether a page last dirtied at some time is hot.
    pub(crate) fn cutoff(&self, now: Nanos) -> Cutoff {
        match self.window {
            Window::Time(tau) => Cutoff::Age { now, tau },
            Window::Syncs(k) => match self.recent.front() {
                Some(&oldest) if self.recent.len() == k as usize => Cutoff::Since(oldest),
                // Fewer than k syncs so far: every page seen was dirtied within the last k.
                _ => Cutoff::Everything,
            },
        }
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.recent.capacity() * size_of::<Nanos>()
    }
}

/// The membership test of a window at one instant.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Cutoff {
    /// Hot when `now - last < tau`.
    Age { now: Nanos, tau: Nanos },
    /// Hot when dirtied at or after this sync.
    Since(Nanos),
    /// Every page seen is hot.
    Everything,
}

impl Cutoff {
    #[inline]
    pub(crate) fn is_hot(self, last: Nanos) -> bool {
        match self {
            Cutoff::Age { now, tau } => now.saturating_sub(last) < tau,
            Cutoff::Since(t) => last >= t,
            Cutoff::Everything => true,
        }
    }
}

/// Sets `page` in `hot` if it is inside the bitmap (a smaller `hot` than the guest is the
/// caller's business, not a reason to panic).
#[inline]
pub(crate) fn mark(hot: &mut DirtyBitmap, page: u64) {
    if page < hot.len() {
        hot.set(page);
    }
}

/// Clamps a configured cap to what the guest and the `u32` arenas allow.
pub(crate) fn clamp_cap(max_tracked: usize, page_count: u64) -> usize {
    let guest = usize::try_from(page_count).unwrap_or(usize::MAX);
    max_tracked.min(guest).min(MAX_TRACKED_LIMIT)
}

/// The parameters of the recency predictors (WSClock, LRU, splay tree).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RecencyConfig {
    /// What "recently dirtied" means. Default [`DEFAULT_WINDOW`].
    pub window: Window,
    /// The most pages tracked at once. Default [`DEFAULT_MAX_TRACKED`].
    pub max_tracked: usize,
}

impl Default for RecencyConfig {
    fn default() -> Self {
        RecencyConfig {
            window: DEFAULT_WINDOW,
            max_tracked: DEFAULT_MAX_TRACKED,
        }
    }
}

/// Which predictor to use, with its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PredictorKind {
    /// Plain pre-copy.
    #[default]
    None,
    /// WSClock: the clock ring of paper 002.
    WsClock(RecencyConfig),
    /// A least-recently-dirtied list.
    Lru(RecencyConfig),
    /// A splay tree keyed by page.
    Splay(RecencyConfig),
    /// At least `m` dirty syncs out of the last `n`.
    History(HistoryConfig),
}

/// The names [`PredictorKind::parse`] accepts, in the order of the CLI's help.
pub const PREDICTOR_NAMES: [&str; 5] = ["none", "wsclock", "lru", "splay", "history"];

impl PredictorKind {
    /// Builds the predictor for a guest of `page_count` pages. Caps are clamped to the guest.
    pub fn build(self, page_count: u64) -> Box<dyn Predictor + Send> {
        match self {
            PredictorKind::None => Box::new(NoPrediction),
            PredictorKind::WsClock(c) => {
                Box::new(WsClock::new(c.window, clamp_cap(c.max_tracked, page_count)))
            }
            PredictorKind::Lru(c) => {
                Box::new(Lru::new(c.window, clamp_cap(c.max_tracked, page_count)))
            }
            PredictorKind::Splay(c) => Box::new(SplayPredictor::new(
                c.window,
                clamp_cap(c.max_tracked, page_count),
            )),
            PredictorKind::History(c) => Box::new(History::new(HistoryConfig {
                max_tracked: clamp_cap(c.max_tracked, page_count),
                ..c
            })),
        }
    }

    /// The predictor's short name, as [`Predictor::name`] reports it.
    pub fn name(&self) -> &'static str {
        match self {
            PredictorKind::None => "none",
            PredictorKind::WsClock(_) => "wsclock",
            PredictorKind::Lru(_) => "lru",
            PredictorKind::Splay(_) => "splay",
            PredictorKind::History(_) => "history",
        }
    }

    /// Parses `name[:key=value,...]`, as the CLI's `--predictor` takes it.
    ///
    /// `name` is one of [`PREDICTOR_NAMES`] (any case) and gives that predictor with its
    /// defaults. Keys, all optional:
    /// - `wsclock`, `lru`, `splay`: `tau=<duration>` (a time window; units `ns`, `us`, `ms`,
    ///   `s`, e.g. `tau=250ms`) or `syncs=<k>` (the last k syncs), and `cap=<pages>`;
    /// - `history`: `m=<count>`, `n=<syncs>` (1 ≤ m ≤ n ≤ 64), `cap=<pages>` and
    ///   `alpha=<permille>` (the rate average's weight of the newest sample, 1 to 1000).
    ///
    /// The [`Display`](fmt::Display) form parses back to the same value.
    pub fn parse(spec: &str) -> Result<PredictorKind, ParsePredictorError> {
        let spec = spec.trim();
        let (name, params) = match spec.split_once(':') {
            Some((n, p)) => (n.trim(), p),
            None => (spec, ""),
        };
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        let mut kind = if is("none") {
            PredictorKind::None
        } else if is("wsclock") {
            PredictorKind::WsClock(RecencyConfig::default())
        } else if is("lru") {
            PredictorKind::Lru(RecencyConfig::default())
        } else if is("splay") {
            PredictorKind::Splay(RecencyConfig::default())
        } else if is("history") {
            PredictorKind::History(HistoryConfig::default())
        } else {
            return Err(ParsePredictorError::UnknownName);
        };
        for param in params.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = param
                .split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or(ParsePredictorError::BadParameter)?;
            kind.set(key, value)?;
        }
        if let PredictorKind::History(c) = kind {
            if c.m == 0 || c.n == 0 || c.m > c.n || c.n > 64 {
                return Err(ParsePredictorError::BadHistory);
            }
        }
        Ok(kind)
    }

    fn set(&mut self, key: &str, value: &str) -> Result<(), ParsePredictorError> {
        let number = |v: &str| v.parse::<u64>().map_err(|_| ParsePredictorError::BadValue);
        let cap = |v: &str| {
            number(v).and_then(|c| usize::try_from(c).map_err(|_| ParsePredictorError::BadValue))
        };
        match self {
            PredictorKind::WsClock(c) | PredictorKind::Lru(c) | PredictorKind::Splay(c) => {
                match key {
                    "tau" => c.window = Window::Time(parse_duration(value)?),
                    "syncs" => {
                        let k = number(value)?;
                        if k == 0 || k > MAX_SYNC_WINDOW as u64 {
                            return Err(ParsePredictorError::BadValue);
                        }
                        c.window = Window::Syncs(k as u32);
                    }
                    "cap" => c.max_tracked = cap(value)?,
                    _ => return Err(ParsePredictorError::BadParameter),
                }
            }
            PredictorKind::History(c) => match key {
                "m" => {
                    c.m =
                        u32::try_from(number(value)?).map_err(|_| ParsePredictorError::BadValue)?
                }
                "n" => {
                    c.n =
                        u32::try_from(number(value)?).map_err(|_| ParsePredictorError::BadValue)?
                }
                "cap" => c.max_tracked = cap(value)?,
                "alpha" => match number(value)? {
                    a @ 1..=1000 => c.rate_alpha_permille = a as u16,
                    _ => return Err(ParsePredictorError::BadValue),
                },
                _ => return Err(ParsePredictorError::BadParameter),
            },
            PredictorKind::None => return Err(ParsePredictorError::BadParameter),
        }
        Ok(())
    }
}

/// `<integer><unit>` with unit `ns`, `us`, `ms` or `s`.
fn parse_duration(value: &str) -> Result<Nanos, ParsePredictorError> {
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .ok_or(ParsePredictorError::BadValue)?;
    let (digits, unit) = value.split_at(split);
    let n: u64 = digits.parse().map_err(|_| ParsePredictorError::BadValue)?;
    let scale = match unit.trim() {
        "ns" => 1,
        "us" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        _ => return Err(ParsePredictorError::BadValue),
    };
    n.checked_mul(scale)
        .map(Nanos)
        .ok_or(ParsePredictorError::BadValue)
}

impl fmt::Display for PredictorKind {
    /// The canonical spec, every parameter spelled out: `lru:syncs=2,cap=1048576`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PredictorKind::None => f.write_str("none"),
            PredictorKind::WsClock(c) | PredictorKind::Lru(c) | PredictorKind::Splay(c) => {
                write!(f, "{}:{},cap={}", self.name(), c.window, c.max_tracked)
            }
            PredictorKind::History(c) => write!(
                f,
                "history:m={},n={},cap={},alpha={}",
                c.m, c.n, c.max_tracked, c.rate_alpha_permille
            ),
        }
    }
}

impl FromStr for PredictorKind {
    type Err = ParsePredictorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PredictorKind::parse(s)
    }
}

/// Why a predictor spec did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParsePredictorError {
    /// The name is not one of [`PREDICTOR_NAMES`].
    UnknownName,
    /// A parameter is not `key=value`, or the key does not belong to this predictor.
    BadParameter,
    /// A value is not a number (or a duration with a unit) in range.
    BadValue,
    /// History needs 1 ≤ m ≤ n ≤ 64.
    BadHistory,
}

impl fmt::Display for ParsePredictorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParsePredictorError::UnknownName => {
                "unknown predictor: use none, wsclock, lru, splay or history"
            }
            ParsePredictorError::BadParameter => {
                "bad predictor parameter: wsclock, lru and splay take tau=, syncs= and cap=; \
                 history takes m=, n=, cap= and alpha=; none takes none (e.g. lru:syncs=3,cap=100000)"
            }
            ParsePredictorError::BadValue => {
                "bad predictor value: counts are whole numbers (syncs 1 to 1024, alpha 1 to 1000), \
                 tau is a whole number with a unit ns, us, ms or s (e.g. tau=250ms)"
            }
            ParsePredictorError::BadHistory => "history needs 1 <= m <= n <= 64 (e.g. history:m=2,n=4)",
        })
    }
}
