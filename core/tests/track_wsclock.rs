//! Tests of the WSClock predictor ([`memferry::track::WsClock`]).
//!
//! - Property: on random sequences of syncs (random dirty sets, random time steps), the
//!   predicted working set equals the definition, "the pages dirtied within τ" (a time window)
//!   or "within the last k syncs" (a sync window), at the sync and at a later instant. A naive
//!   model (page → time of last dirtying) gives the definition. This holds with any cap at least
//!   the working set's size, because the hand only replaces pages outside the working set then.
//! - The modified bit: set by a dirtying, cleared when the hand finds the page old.
//! - The replacement order at the cap: clean old frames first, then just-scheduled ones, then
//!   working-set frames; never a page dirtied at the same sync.

use std::collections::{BTreeMap, BTreeSet};

use memferry::bitmap::DirtyBitmap;
use memferry::time::Nanos;
use memferry::track::{Predictor, Window, WsClock};
use proptest::prelude::*;

const PAGES: u64 = 300;

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

/// The definition: pages whose last dirtying is within the window as of `now`.
fn definition(
    last: &BTreeMap<u64, Nanos>,
    syncs: &[Nanos],
    window: Window,
    now: Nanos,
) -> BTreeSet<u64> {
    last.iter()
        .filter(|&(_, &t)| match window {
            Window::Time(tau) => now.0.saturating_sub(t.0) < tau.0,
            Window::Syncs(k) => {
                let k = k as usize;
                syncs.len() <= k || t >= syncs[syncs.len() - k]
            }
        })
        .map(|(&p, _)| p)
        .collect()
}

fn syncs() -> impl Strategy<Value = Vec<(BTreeSet<u64>, u64)>> {
    // Each sync: a dirty set drawn from a hot range and the whole guest, and a time step.
    proptest::collection::vec(
        (
            proptest::collection::btree_set(prop_oneof![3 => 0..20u64, 1 => 0..PAGES], 0..40),
            0u64..50,
        ),
        1..40,
    )
}

fn window() -> impl Strategy<Value = Window> {
    prop_oneof![
        (0u64..200).prop_map(|t| Window::Time(Nanos(t))),
        (1u32..6).prop_map(Window::Syncs)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn working_set_is_the_pages_dirtied_within_the_window(
        window in window(),
        seq in syncs(),
        cap in 0usize..(PAGES as usize + 10),
        later in 0u64..100,
    ) {
        let mut clock = WsClock::new(window, cap);
        let mut last: BTreeMap<u64, Nanos> = BTreeMap::new();
        let mut times = Vec::new();
        let mut now = Nanos(1000);
        // The property holds while the cap has always held the working set.
        let mut cap_held = true;
        for (dirty, step) in seq {
            // A sync window counts syncs, so two syncs must not share an instant.
            now += Nanos(if matches!(window, Window::Syncs(_)) { step + 1 } else { step });
            clock.observe(&bitmap(&dirty), now);
            times.push(now);
            for &p in &dirty {
                last.insert(p, now);
            }
            prop_assert!(clock.tracked_pages() <= cap);
            let expected = definition(&last, &times, window, now);
            cap_held &= expected.len() <= cap;
            if cap_held {
                prop_assert_eq!(predicted(&mut clock, now), expected);
                let then = now + Nanos(later);
                prop_assert_eq!(predicted(&mut clock, then), definition(&last, &times, window, then));
                // Every page of this sync is tracked when the cap can hold the sync at all.
                if dirty.len() <= cap {
                    for &p in &dirty {
                        prop_assert_eq!(clock.last_use(p), Some(now));
                        prop_assert_eq!(clock.is_modified(p), Some(true));
                    }
                }
            }
        }
    }
}

fn pages(list: &[u64]) -> BTreeSet<u64> {
    list.iter().copied().collect()
}

#[test]
fn modified_bit_is_cleared_when_the_hand_finds_the_page_old() {
    let mut clock = WsClock::new(Window::Time(Nanos(100)), 10);
    clock.observe(&bitmap(&pages(&[1, 2])), Nanos(0));
    assert_eq!(clock.is_modified(1), Some(true));
    clock.observe(&bitmap(&pages(&[2])), Nanos(50));
    // 1 is 50 old: still in the working set, still modified.
    assert_eq!(clock.is_modified(1), Some(true));
    assert_eq!(predicted(&mut clock, Nanos(50)), pages(&[1, 2]));
    clock.observe(&bitmap(&pages(&[])), Nanos(120));
    // 1 is 120 old: it left the working set, its write is scheduled (M cleared); 2 is 70 old.
    assert_eq!(clock.is_modified(1), Some(false));
    assert_eq!(clock.is_modified(2), Some(true));
    assert_eq!(predicted(&mut clock, Nanos(120)), pages(&[2]));
    assert_eq!(clock.is_modified(3), None);
    assert_eq!(
        clock.tracked_pages(),
        2,
        "old frames stay until a newcomer needs the room"
    );
}

#[test]
fn replacement_takes_clean_then_scheduled_then_working_set_frames() {
    let mut clock = WsClock::new(Window::Time(Nanos(100)), 3);
    clock.observe(&bitmap(&pages(&[10])), Nanos(0));
    clock.observe(&bitmap(&pages(&[11])), Nanos(150)); // 10 leaves the WS: scheduled
    clock.observe(&bitmap(&pages(&[12])), Nanos(200)); // 10 is now clean; 11 in the WS
    assert_eq!(clock.is_modified(10), Some(false));
    assert_eq!(clock.tracked_pages(), 3);
    // Full. At 290: 10 is clean, 11 (150) leaves the WS and is scheduled, 12 (200) is in the
    // WS. Two newcomers: the clean 10 goes first, then the scheduled 11.
    clock.observe(&bitmap(&pages(&[20, 21])), Nanos(290));
    assert_eq!(clock.last_use(10), None);
    assert_eq!(clock.last_use(11), None);
    assert_eq!(clock.last_use(12), Some(Nanos(200)));
    assert_eq!(predicted(&mut clock, Nanos(290)), pages(&[12, 20, 21]));
    // At 295 every frame is in the WS (the cap is smaller than the working set): newcomers take
    // the WS frames not dirtied at this sync, in hand order (12 then 21), and the last newcomer
    // finds only frames dirtied at this sync, so it is not tracked.
    clock.observe(&bitmap(&pages(&[20, 30, 31, 32])), Nanos(295));
    assert_eq!(clock.last_use(12), None);
    assert_eq!(clock.last_use(21), None);
    assert_eq!(clock.last_use(32), None);
    assert_eq!(predicted(&mut clock, Nanos(295)), pages(&[20, 30, 31]));
    assert_eq!(clock.tracked_pages(), 3);
}

#[test]
fn a_cap_of_zero_tracks_nothing() {
    let mut clock = WsClock::new(Window::Syncs(2), 0);
    clock.observe(&bitmap(&pages(&[1, 2, 3])), Nanos(0));
    assert_eq!(clock.tracked_pages(), 0);
    assert!(predicted(&mut clock, Nanos(0)).is_empty());
}
