//! Tests of the history predictor ([`memferry::track::History`]).
//!
//! - Property: on random sequences of syncs and random m, n (1 ≤ m ≤ n ≤ 64), the predicted
//!   set equals a naive model (the last n dirty sets kept whole; hot = in at least m of them),
//!   and so do the per-page registers and counts, while the cap is never reached; with a small
//!   cap the tracked pages never exceed it.
//! - The cap keeps hot pages: newcomers never push out a page that has reached m.
//! - The rate average: exact on a steady rate, weighted toward the newest sample on a change.

use std::collections::{BTreeSet, VecDeque};

use memferry::bitmap::DirtyBitmap;
use memferry::time::Nanos;
use memferry::track::{History, HistoryConfig, Predictor};
use proptest::prelude::*;

const PAGES: u64 = 200;

fn bitmap(pages: &BTreeSet<u64>) -> DirtyBitmap {
    let mut map = DirtyBitmap::new(PAGES);
    pages.iter().for_each(|&p| map.set(p));
    map
}

fn predicted(p: &mut impl Predictor) -> BTreeSet<u64> {
    let mut hot = DirtyBitmap::new(PAGES);
    p.predict(Nanos::ZERO, &mut hot);
    hot.iter_ones().collect()
}

fn config(m: u32, n: u32, cap: usize) -> HistoryConfig {
    HistoryConfig {
        m,
        n,
        max_tracked: cap,
        ..HistoryConfig::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn matches_a_naive_m_of_n_model(
        n in 1u32..=64,
        m_frac in 0.0f64..1.0,
        seq in proptest::collection::vec(
            proptest::collection::btree_set(prop_oneof![3 => 0..12u64, 1 => 0..PAGES], 0..20),
            1..80,
        ),
        cap in 0usize..80,
    ) {
        let m = 1 + (m_frac * n as f64) as u32; // 1..=n
        let mut big = History::new(config(m, n, usize::MAX));
        let mut small = History::new(config(m, n, cap));
        let mut window: VecDeque<BTreeSet<u64>> = VecDeque::new();
        for (i, dirty) in seq.iter().enumerate() {
            let now = Nanos(i as u64 * 1000);
            big.observe(&bitmap(dirty), now);
            small.observe(&bitmap(dirty), now);
            window.push_front(dirty.clone());
            window.truncate(n as usize);
            let count = |p: u64| window.iter().filter(|s| s.contains(&p)).count() as u32;
            let seen: BTreeSet<u64> = window.iter().flatten().copied().collect();
            let hot: BTreeSet<u64> = seen.iter().copied().filter(|&p| count(p) >= m).collect();
            prop_assert_eq!(predicted(&mut big), hot.clone());
            prop_assert_eq!(big.tracked_pages(), seen.len());
            for &p in &seen {
                let register: u64 = window
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.contains(&p))
                    .map(|(age, _)| 1u64 << age)
                    .sum();
                prop_assert_eq!(big.register(p), Some(register));
                prop_assert_eq!(big.dirty_syncs(p), count(p));
                prop_assert_eq!(big.is_hot(p), count(p) >= m);
            }
            prop_assert!(small.tracked_pages() <= cap);
            // The small one predicts only pages the model calls hot... unless it dropped a
            // page that later came back (its count then restarts): so a subset of the model's
            // pages dirtied in the window.
            prop_assert!(predicted(&mut small).is_subset(&seen));
        }
    }
}

#[test]
fn newcomers_never_push_out_pages_that_reached_m() {
    let mut h = History::new(config(2, 4, 4));
    let hot = BTreeSet::from([1, 2, 3]);
    h.observe(&bitmap(&hot), Nanos(0));
    h.observe(&bitmap(&hot), Nanos(1)); // 1, 2, 3 are hot
    h.observe(&bitmap(&BTreeSet::from([9])), Nanos(2)); // one cold page fills the cap
    assert_eq!(h.tracked_pages(), 4);
    // A burst of ten newcomers: only the cold page 9 (seen once, earlier) can make room, and
    // the lowest newcomer takes it.
    h.observe(&bitmap(&(100..110).collect()), Nanos(3));
    assert_eq!(h.tracked_pages(), 4);
    assert_eq!(predicted(&mut h), hot);
    assert_eq!(h.register(9), None);
    assert_eq!(h.register(100), Some(1));
    assert_eq!(h.register(101), None);
    // Pages dirtied at the same sync never make room for one another: every tracked page is
    // dirtied here, so the newcomer 150 is not tracked.
    h.observe(&bitmap(&BTreeSet::from([1, 2, 3, 100, 150])), Nanos(4));
    assert_eq!(h.register(100), Some(0b11));
    assert_eq!(h.register(1), Some(0b1001));
    assert_eq!(h.register(150), None);
    // One sync later 1, 2 and 3 are down to one dirty sync in the window (not hot any more) and
    // are the first to go.
    h.observe(&bitmap(&BTreeSet::from([100, 150])), Nanos(5));
    assert_eq!(h.register(150), Some(1));
    assert_eq!(h.register(1), None, "the coldest, ties to the lowest page");
    assert_eq!(h.tracked_pages(), 4);
}

#[test]
fn rate_average_is_exact_on_a_steady_rate_and_follows_a_change() {
    let mut h = History::new(HistoryConfig {
        rate_alpha_permille: 500,
        ..HistoryConfig::default()
    });
    let ten: BTreeSet<u64> = (0..10).collect();
    assert_eq!(h.dirty_rate(), None);
    h.observe(&bitmap(&ten), Nanos::from_millis(0));
    assert_eq!(h.dirty_rate(), None, "the first sync has no span");
    for i in 1..=5 {
        h.observe(&bitmap(&ten), Nanos::from_millis(10 * i));
    }
    // 10 pages every 10 ms: 1000 pages/s.
    assert!((h.dirty_rate().unwrap() - 1000.0).abs() < 1e-6);
    assert_eq!(h.predicted_dirty_pages(Nanos::from_millis(50)), Some(50));
    // A second sync at the same instant has no span: its pages count toward the next sample.
    // 20 pages over the next 10 ms is 2000 pages/s; with weight 1/2 the average moves half way.
    h.observe(&bitmap(&ten), Nanos::from_millis(60));
    h.observe(&bitmap(&ten), Nanos::from_millis(60));
    assert!((h.dirty_rate().unwrap() - 1000.0).abs() < 1e-6);
    h.observe(&bitmap(&ten), Nanos::from_millis(70));
    assert!((h.dirty_rate().unwrap() - 1500.0).abs() < 1e-6);
    h.observe(&bitmap(&BTreeSet::new()), Nanos::from_millis(80));
    assert!((h.dirty_rate().unwrap() - 750.0).abs() < 1e-6);
}

#[test]
fn config_is_clamped() {
    let h = History::new(HistoryConfig {
        m: 100,
        n: 100,
        max_tracked: 5,
        rate_alpha_permille: 0,
    });
    let c = h.config();
    assert_eq!(
        (c.m, c.n, c.max_tracked, c.rate_alpha_permille),
        (64, 64, 5, 1)
    );
    let h = History::new(config(0, 0, 5));
    assert_eq!((h.config().m, h.config().n), (1, 1));
}
