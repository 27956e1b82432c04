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
//! Implementations (selected by [`PredictorKind`]):
//! - none: predicts nothing (plain pre-copy).
//! - WSClock (Carr and Hennessy, via paper 002).
//! - LRU (Zaw and Thein).
//! - splay tree (Sleator and Tarjan; Zaw and Thein).
//! - history / time series (paper 003).

use alloc::boxed::Box;

use crate::bitmap::DirtyBitmap;
use crate::time::Nanos;

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

/// Which predictor to use, with its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PredictorKind {
    /// Plain pre-copy.
    #[default]
    None,
}

impl PredictorKind {
    /// Builds the predictor for a guest of `page_count` pages.
    pub fn build(self, page_count: u64) -> Box<dyn Predictor + Send> {
        let _ = page_count;
        match self {
            PredictorKind::None => Box::new(NoPrediction),
        }
    }
}
