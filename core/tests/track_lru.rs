//! Tests of the LRU predictor ([`memferry::track::Lru`]).
//!
//! - Property: on random sequences of syncs, random times, windows and caps, the list equals a
//!   naive model (a `Vec` ordered by recency, most recent first: each dirty page, in increasing
//!   order, is moved or inserted at the front, and the back is cut at the cap), and so do the
//!   predicted working set (the model's pages dirtied within the window) and the inactive list.
//! - The O(1) structure survives the edge cases: a cap of one, a cap of zero, a page dirtied at
//!   every sync (already at the head).

use std::collections::BTreeSet;

use memferry::bitmap::DirtyBitmap;
use memferry::time::Nanos;
use memferry::track::{Lru, Predictor, Window};
use proptest::prelude::*;

const PAGES: u64 = 200;

fn bitmap(pages: &BTreeSet<u64>) -> DirtyBitmap {
    let mut map = DirtyBitmap::new(PAGES);
    pages.iter().for_each(|&p| map.set(p));
    map
}

fn predicted(p: &mut impl Predictor, now: Nanos) -> BTreeSet<u64> {
    let mut hot = DirtyBitmap::new(PAGES);
    p.predict(now, &mut hot);
    hot.iter_ones().collect()
}

/// The naive model: `(page, last dirtied)`, most recent first.
#[derive(Default)]
struct Model {
    list: Vec<(u64, Nanos)>,
    syncs: Vec<Nanos>,
}

impl Model {
    fn observe(&mut self, dirty: &BTreeSet<u64>, now: Nanos, cap: usize) {
        self.syncs.push(now);
        for &p in dirty {
            self.list.retain(|&(q, _)| q != p);
            self.list.insert(0, (p, now));
            self.list.truncate(cap);
        }
    }

    fn working_set(&self, window: Window, now: Nanos) -> BTreeSet<u64> {
        self.list
            .iter()
            .filter(|&&(_, t)| match window {
                Window::Time(tau) => now.0.saturating_sub(t.0) < tau.0,
                Window::Syncs(k) => {
                    let k = k as usize;
                    self.syncs.len() <= k || t >= self.syncs[self.syncs.len() - k]
                }
            })
            .map(|&(p, _)| p)
            .collect()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn matches_a_naive_recency_list(
        window in prop_oneof![
            (0u64..200).prop_map(|t| Window::Time(Nanos(t))),
            (1u32..6).prop_map(Window::Syncs),
        ],
        seq in proptest::collection::vec(
            (
                proptest::collection::btree_set(
                    prop_oneof![3 => 0..16u64, 1 => 0..PAGES], 0..30),
                0u64..50,
            ),
            1..40,
        ),
        cap in 0usize..60,
        later in 0u64..100,
    ) {
        let mut lru = Lru::new(window, cap);
        let mut model = Model::default();
        let mut now = Nanos(0);
        for (dirty, step) in seq {
            now += Nanos(if matches!(window, Window::Syncs(_)) { step + 1 } else { step });
            lru.observe(&bitmap(&dirty), now);
            model.observe(&dirty, now, cap);
            prop_assert_eq!(lru.iter_recent_first().collect::<Vec<_>>(), model.list.clone());
            let mut oldest: Vec<_> = lru.iter_oldest_first().collect();
            oldest.reverse();
            prop_assert_eq!(oldest, model.list.clone());
            prop_assert_eq!(lru.tracked_pages(), model.list.len());
            prop_assert!(lru.tracked_pages() <= cap);
            let expected = model.working_set(window, now);
            prop_assert_eq!(lru.recent_len(now), expected.len());
            prop_assert_eq!(predicted(&mut lru, now), expected);
            let then = now + Nanos(later);
            prop_assert_eq!(predicted(&mut lru, then), model.working_set(window, then));
            for &(p, t) in &model.list {
                prop_assert_eq!(lru.last_dirtied(p), Some(t));
            }
        }
    }
}

fn pages(list: &[u64]) -> BTreeSet<u64> {
    list.iter().copied().collect()
}

#[test]
fn edge_cases_of_the_linked_list() {
    let mut one = Lru::new(Window::Syncs(1), 1);
    one.observe(&bitmap(&pages(&[3, 4, 5])), Nanos(1));
    assert_eq!(
        one.iter_recent_first().collect::<Vec<_>>(),
        vec![(5, Nanos(1))]
    );
    one.observe(&bitmap(&pages(&[5])), Nanos(2));
    one.observe(&bitmap(&pages(&[5])), Nanos(3));
    assert_eq!(
        one.iter_oldest_first().collect::<Vec<_>>(),
        vec![(5, Nanos(3))]
    );

    let mut none = Lru::new(Window::Syncs(1), 0);
    none.observe(&bitmap(&pages(&[3, 4, 5])), Nanos(1));
    assert_eq!(none.tracked_pages(), 0);
    assert!(predicted(&mut none, Nanos(1)).is_empty());

    // Recent list and inactive list: with a window of one sync, only the latest sync is recent.
    let mut lru = Lru::new(Window::Syncs(1), 100);
    lru.observe(&bitmap(&pages(&[1, 2, 3])), Nanos(10));
    lru.observe(&bitmap(&pages(&[2, 7])), Nanos(20));
    assert_eq!(lru.recent_len(Nanos(20)), 2);
    let inactive: Vec<u64> = lru.iter_oldest_first().take(2).map(|(p, _)| p).collect();
    assert_eq!(inactive, vec![1, 3]);
    assert_eq!(predicted(&mut lru, Nanos(20)), pages(&[2, 7]));
    assert!(lru.heap_bytes() > 0);
}
