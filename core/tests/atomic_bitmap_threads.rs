//! `AtomicDirtyBitmap` marked from several threads at once, as a guest's vCPUs mark it: no mark
//! is lost, and a writer that marks after its write is always seen by a later harvest.

use std::sync::Arc;

use memferry::bitmap::{AtomicDirtyBitmap, DirtyBitmap};

#[test]
fn marks_from_many_threads_are_all_harvested() {
    let atomic = Arc::new(AtomicDirtyBitmap::new(10_000));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let a = atomic.clone();
            std::thread::spawn(move || (0..10_000).filter(|i| i % 4 == t).for_each(|i| a.mark(i)))
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let mut into = DirtyBitmap::new(10_000);
    assert_eq!(atomic.fetch_and_clear_into(&mut into), 10_000);
    assert_eq!(into.count_ones(), 10_000);
}

#[test]
fn harvesting_while_marking_loses_nothing() {
    // Writers mark a fixed number of pages each while the harvester fetches and clears until
    // they are done; the union of every harvest must hold every page any writer marked.
    let pages = 1 << 16;
    let atomic = Arc::new(AtomicDirtyBitmap::new(pages));
    let writers: Vec<_> = (0..3u64)
        .map(|t| {
            let a = atomic.clone();
            std::thread::spawn(move || {
                let mut marked = DirtyBitmap::new(pages);
                for i in 0..200_000u64 {
                    let page = ((i * 3 + t) * 2_654_435_761) % pages;
                    a.mark(page);
                    marked.set(page);
                }
                marked
            })
        })
        .collect();
    let mut harvested = DirtyBitmap::new(pages);
    let mut harvests = 0;
    // At least one harvest runs beside the writers, even when they finish before the first
    // look (an idle machine): the test was flaky when it checked first.
    loop {
        atomic.fetch_and_clear_into(&mut harvested);
        harvests += 1;
        if writers.iter().all(|w| w.is_finished()) {
            break;
        }
    }
    atomic.fetch_and_clear_into(&mut harvested);
    let mut marked = DirtyBitmap::new(pages);
    for w in writers {
        marked.union_with(&w.join().unwrap());
    }
    assert!(harvests > 0);
    assert!(marked.count_ones() > 0);
    let mut lost = marked.clone();
    lost.difference_with(&harvested);
    assert!(lost.is_clear(), "{} marks lost", lost.count_ones());
}
