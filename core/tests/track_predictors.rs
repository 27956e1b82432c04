//! Tests that hold for every predictor behind [`memferry::track::Predictor`].
//!
//! - Property: the tracked pages never exceed the cap, for every predictor, window and cap, on
//!   random sequences of syncs.
//! - Property: the splay predictor's working set equals the definition (pages dirtied within
//!   the window), like WSClock's (`track_wsclock.rs`), whenever the cap holds the working set.
//! - Property: two instances fed the same syncs predict the same pages (the hash maps are
//!   randomly seeded; no decision may depend on their order).
//! - Bounded memory: on a 2^28-page guest (1 TiB of 4 KiB pages) with a sparse dirty set, every
//!   predictor's heap stays proportional to its tracked pages, far below one byte per guest page.
//! - `PredictorKind`: parsing of names and parameters, the display form parsing back, errors,
//!   and `build` giving the named predictor.

use std::collections::{BTreeMap, BTreeSet};

use memferry::bitmap::DirtyBitmap;
use memferry::time::Nanos;
use memferry::track::{
    HistoryConfig, ParsePredictorError, Predictor, PredictorKind, RecencyConfig, SplayPredictor,
    Window, DEFAULT_MAX_TRACKED, PREDICTOR_NAMES,
};
use proptest::prelude::*;

const PAGES: u64 = 500;

fn bitmap(len: u64, pages: &BTreeSet<u64>) -> DirtyBitmap {
    let mut map = DirtyBitmap::new(len);
    pages.iter().for_each(|&p| map.set(p));
    map
}

fn predicted(p: &mut dyn Predictor, len: u64, now: Nanos) -> BTreeSet<u64> {
    let mut hot = DirtyBitmap::new(len);
    p.predict(now, &mut hot);
    hot.iter_ones().collect()
}

fn window() -> impl Strategy<Value = Window> {
    prop_oneof![
        (0u64..200).prop_map(|t| Window::Time(Nanos(t))),
        (1u32..6).prop_map(Window::Syncs)
    ]
}

fn kind(window: Window, cap: usize, m: u32, n: u32) -> impl Iterator<Item = PredictorKind> {
    let r = RecencyConfig {
        window,
        max_tracked: cap,
    };
    let h = HistoryConfig {
        m: m.min(n),
        n,
        max_tracked: cap,
        ..HistoryConfig::default()
    };
    [
        PredictorKind::None,
        PredictorKind::WsClock(r),
        PredictorKind::Lru(r),
        PredictorKind::Splay(r),
        PredictorKind::History(h),
    ]
    .into_iter()
}

fn syncs() -> impl Strategy<Value = Vec<(BTreeSet<u64>, u64)>> {
    proptest::collection::vec(
        (
            proptest::collection::btree_set(prop_oneof![2 => 0..30u64, 1 => 0..PAGES], 0..80),
            1u64..50,
        ),
        1..30,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn tracked_pages_never_exceed_the_cap(
        window in window(),
        seq in syncs(),
        cap in 0usize..100,
        m in 1u32..4,
        n in 1u32..10,
    ) {
        for kind in kind(window, cap, m, n) {
            let mut p = kind.build(PAGES);
            prop_assert_eq!(p.name(), kind.name());
            let mut now = Nanos(0);
            for (dirty, step) in &seq {
                now += Nanos(*step);
                p.observe(&bitmap(PAGES, dirty), now);
                prop_assert!(p.tracked_pages() <= cap, "{} tracks {} > {}", kind, p.tracked_pages(), cap);
                // Whatever a predictor predicts, it was seen dirty.
                let hot = predicted(p.as_mut(), PAGES, now);
                prop_assert!(hot.len() <= p.tracked_pages());
            }
        }
    }

    #[test]
    fn same_syncs_same_predictions(
        window in window(),
        seq in syncs(),
        cap in 0usize..100,
        m in 1u32..4,
        n in 1u32..10,
    ) {
        for kind in kind(window, cap, m, n) {
            let (mut a, mut b) = (kind.build(PAGES), kind.build(PAGES));
            let mut now = Nanos(0);
            for (dirty, step) in &seq {
                now += Nanos(*step);
                a.observe(&bitmap(PAGES, dirty), now);
                b.observe(&bitmap(PAGES, dirty), now);
                prop_assert_eq!(a.tracked_pages(), b.tracked_pages());
                prop_assert_eq!(predicted(a.as_mut(), PAGES, now), predicted(b.as_mut(), PAGES, now));
            }
        }
    }

    #[test]
    fn splay_working_set_is_the_pages_dirtied_within_the_window(
        window in window(),
        seq in syncs(),
        cap in 0usize..(PAGES as usize),
        later in 0u64..100,
    ) {
        let mut splay = SplayPredictor::new(window, cap);
        let mut last: BTreeMap<u64, Nanos> = BTreeMap::new();
        let mut times = Vec::new();
        let mut now = Nanos(0);
        let mut cap_held = true;
        let definition = |last: &BTreeMap<u64, Nanos>, times: &[Nanos], now: Nanos| -> BTreeSet<u64> {
            last.iter()
                .filter(|&(_, &t)| match window {
                    Window::Time(tau) => now.0.saturating_sub(t.0) < tau.0,
                    Window::Syncs(k) => times.len() <= k as usize || t >= times[times.len() - k as usize],
                })
                .map(|(&p, _)| p)
                .collect()
        };
        for (dirty, step) in seq {
            now += Nanos(step);
            splay.observe(&bitmap(PAGES, &dirty), now);
            times.push(now);
            for &p in &dirty {
                last.insert(p, now);
            }
            prop_assert!(splay.tracked_pages() <= cap);
            if let Err(e) = splay.tree().check_invariants() {
                return Err(TestCaseError::fail(format!("{e}")));
            }
            let expected = definition(&last, &times, now);
            cap_held &= expected.len() <= cap;
            if cap_held {
                prop_assert_eq!(predicted(&mut splay, PAGES, now), expected);
                let then = now + Nanos(later);
                prop_assert_eq!(predicted(&mut splay, PAGES, then), definition(&last, &times, then));
            }
        }
    }

    #[test]
    fn display_parses_back(
        window in window(),
        cap in any::<u32>(),
        m in 1u32..=64,
        n in 1u32..=64,
        alpha in 1u16..=1000,
    ) {
        let kinds = kind(window, cap as usize, m, n).map(|k| match k {
            PredictorKind::History(h) => PredictorKind::History(HistoryConfig {
                m: h.m.min(h.n),
                rate_alpha_permille: alpha,
                ..h
            }),
            k => k,
        });
        for k in kinds {
            let text = k.to_string();
            prop_assert_eq!(PredictorKind::parse(&text), Ok(k), "{}", text);
            prop_assert_eq!(text.parse::<PredictorKind>(), Ok(k));
        }
    }
}

#[test]
fn names_parse_to_their_defaults() {
    for name in PREDICTOR_NAMES {
        let kind = PredictorKind::parse(name).unwrap();
        assert_eq!(kind.name(), name);
        assert_eq!(kind.build(1000).name(), name);
        assert_eq!(PredictorKind::parse(&name.to_uppercase()), Ok(kind));
    }
    assert_eq!(PredictorKind::parse("none"), Ok(PredictorKind::None));
    assert_eq!(PredictorKind::default(), PredictorKind::None);
    assert_eq!(
        PredictorKind::parse("wsclock"),
        Ok(PredictorKind::WsClock(RecencyConfig::default()))
    );
    assert_eq!(
        PredictorKind::parse("history"),
        Ok(PredictorKind::History(HistoryConfig::default()))
    );
}

#[test]
fn parameters_parse() {
    assert_eq!(
        PredictorKind::parse("lru:tau=250ms, cap=1000"),
        Ok(PredictorKind::Lru(RecencyConfig {
            window: Window::Time(Nanos::from_millis(250)),
            max_tracked: 1000,
        }))
    );
    assert_eq!(
        PredictorKind::parse(" splay:syncs=3 "),
        Ok(PredictorKind::Splay(RecencyConfig {
            window: Window::Syncs(3),
            max_tracked: DEFAULT_MAX_TRACKED,
        }))
    );
    assert_eq!(
        PredictorKind::parse("wsclock:tau=2s"),
        Ok(PredictorKind::WsClock(RecencyConfig {
            window: Window::Time(Nanos::from_secs(2)),
            max_tracked: DEFAULT_MAX_TRACKED,
        }))
    );
    assert_eq!(
        PredictorKind::parse("wsclock:tau=7us"),
        PredictorKind::parse("wsclock:tau=7000ns")
    );
    assert_eq!(
        PredictorKind::parse("history:m=3,n=8,alpha=500"),
        Ok(PredictorKind::History(HistoryConfig {
            m: 3,
            n: 8,
            rate_alpha_permille: 500,
            ..HistoryConfig::default()
        }))
    );
}

#[test]
fn bad_specs_say_what_is_wrong() {
    use ParsePredictorError::*;
    let cases = [
        ("clock", UnknownName),
        ("", UnknownName),
        ("none:cap=3", BadParameter),
        ("lru:m=2", BadParameter),
        ("lru:cap", BadParameter),
        ("history:tau=1s", BadParameter),
        ("lru:tau=10", BadValue),
        ("lru:tau=10h", BadValue),
        ("lru:tau=ms", BadValue),
        ("lru:syncs=0", BadValue),
        ("lru:syncs=5000", BadValue),
        ("lru:cap=-1", BadValue),
        ("history:alpha=0", BadValue),
        ("history:m=5,n=4", BadHistory),
        ("history:n=65", BadHistory),
        ("history:m=0", BadHistory),
        ("wsclock:tau=99999999999999999999s", BadValue),
    ];
    for (spec, expected) in cases {
        assert_eq!(PredictorKind::parse(spec), Err(expected), "{spec}");
        assert!(!expected.to_string().is_empty());
    }
}

/// splitmix64: sparse pages spread over the whole guest.
fn spread(i: u64) -> u64 {
    let mut z = i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn memory_stays_bounded_on_a_sparse_two_to_the_28_page_guest() {
    const GUEST: u64 = 1 << 28;
    const HOT: u64 = 2_000;
    const COLD_PER_SYNC: u64 = 3_000;
    const CAP: usize = 10_000;
    // One 32 MiB bitmap, reused: each sync sets its pages, observes, then unsets them.
    let mut dirty = DirtyBitmap::new(GUEST);
    let r = RecencyConfig {
        window: Window::Syncs(2),
        max_tracked: CAP,
    };
    let kinds = [
        PredictorKind::WsClock(r),
        PredictorKind::Lru(r),
        PredictorKind::Splay(r),
        PredictorKind::History(HistoryConfig {
            max_tracked: CAP,
            ..HistoryConfig::default()
        }),
    ];
    for kind in kinds {
        let mut p = kind.build(GUEST);
        let mut peak_heap = 0;
        for sync in 0..8u64 {
            let hot = (0..HOT).map(|i| spread(i) % GUEST);
            let cold =
                (0..COLD_PER_SYNC).map(|i| spread(1_000_000 + sync * COLD_PER_SYNC + i) % GUEST);
            let pages: Vec<u64> = hot.chain(cold).collect();
            pages.iter().for_each(|&q| dirty.set(q));
            p.observe(&dirty, Nanos::from_millis(100 * sync));
            pages.iter().for_each(|&q| dirty.unset(q));
            assert!(p.tracked_pages() <= CAP, "{kind}: {}", p.tracked_pages());
            peak_heap = peak_heap.max(p.heap_bytes());
        }
        // Predict into the same (now clear) bitmap: the hot pages are all there.
        p.predict(Nanos::from_millis(700), &mut dirty);
        let predicted = dirty.count_ones();
        for i in 0..HOT {
            assert!(dirty.get(spread(i) % GUEST), "{kind} lost hot page {i}");
        }
        dirty.clear();
        let per_page = peak_heap as f64 / p.tracked_pages() as f64;
        eprintln!(
            "{kind}: {} tracked, {predicted} predicted, peak heap {peak_heap} B ({per_page:.1} B per tracked page)",
            p.tracked_pages()
        );
        // Proportional to the tracked pages (a generous 160 B each), nothing per guest page.
        assert!(peak_heap <= 160 * CAP, "{kind}: {peak_heap} B");
        assert!(p.tracked_pages() >= HOT as usize);
    }
}
