//! A workload thread that plays a guest's vCPUs: it really writes into guest memory while the
//! migration runs, marking the atomic dirty bitmap after each write, and stops on `pause`.
//!
//! Writes follow a hot/cold pattern: a share `hot_share` of writes lands in the first
//! `hot_fraction` of pages (the writable working set), the rest anywhere. Each write stores
//! 8 bytes at a random aligned offset of a random page. The sequence of writes is fixed by the
//! seed; how many land before the pause depends on real time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memferry::bitmap::AtomicDirtyBitmap;
use rand_core::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::memory::GuestRegion;

/// What the workload does.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct WorkloadConfig {
    /// Writes per second (0: idle).
    pub writes_per_sec: u64,
    /// The fraction of memory that is hot (0..=1).
    pub hot_fraction: f64,
    /// The share of writes that land in the hot set (0..=1).
    pub hot_share: f64,
    /// Seed of the write sequence.
    pub seed: u64,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            writes_per_sec: 200_000,
            hot_fraction: 0.05,
            hot_share: 0.9,
            seed: 1,
        }
    }
}

/// A uniform integer below `n` from a 64-bit random value (Lemire's multiply-shift).
pub fn below(random: u64, n: u64) -> u64 {
    ((random as u128 * n as u128) >> 64) as u64
}

#[derive(Default)]
struct Control {
    pause_requested: bool,
    paused: bool,
    stop: bool,
}

struct Shared {
    control: Mutex<Control>,
    changed: Condvar,
    pause_flag: AtomicBool,
    writes: AtomicU64,
}

/// A running workload. Dropping it stops the thread.
pub struct WorkloadHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl WorkloadHandle {
    /// Starts writing into `region`, marking `dirty`.
    pub fn start(
        region: Arc<GuestRegion>,
        dirty: Arc<AtomicDirtyBitmap>,
        config: WorkloadConfig,
    ) -> Self {
        let shared = Arc::new(Shared {
            control: Mutex::new(Control::default()),
            changed: Condvar::new(),
            pause_flag: AtomicBool::new(false),
            writes: AtomicU64::new(0),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("memferry-workload".into())
            .spawn(move || run(region, dirty, config, thread_shared))
            .expect("spawning the workload thread");
        WorkloadHandle {
            shared,
            thread: Some(thread),
        }
    }

    /// Stops the workload and waits until no write is in flight.
    pub fn pause(&self) {
        let mut c = self.shared.control.lock().unwrap();
        c.pause_requested = true;
        self.shared.pause_flag.store(true, Ordering::SeqCst);
        while !c.paused && !c.stop {
            c = self.shared.changed.wait(c).unwrap();
        }
    }

    /// Lets a paused workload write again.
    pub fn resume(&self) {
        let mut c = self.shared.control.lock().unwrap();
        c.pause_requested = false;
        self.shared.pause_flag.store(false, Ordering::SeqCst);
        self.shared.changed.notify_all();
        while c.paused && !c.stop {
            c = self.shared.changed.wait(c).unwrap();
        }
    }

    /// Writes done so far.
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Ordering::Relaxed)
    }
}

impl Drop for WorkloadHandle {
    fn drop(&mut self) {
        {
            let mut c = self.shared.control.lock().unwrap();
            c.stop = true;
            self.shared.pause_flag.store(true, Ordering::SeqCst);
            self.shared.changed.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    region: Arc<GuestRegion>,
    dirty: Arc<AtomicDirtyBitmap>,
    config: WorkloadConfig,
    shared: Arc<Shared>,
) {
    let geometry = region.geometry();
    let pages = geometry.page_count();
    let words_per_page = (geometry.page_size().bytes() / 8) as u64;
    let hot_pages = ((pages as f64 * config.hot_fraction.clamp(0.0, 1.0)) as u64).clamp(1, pages);
    let hot_threshold = (config.hot_share.clamp(0.0, 1.0) * u64::MAX as f64) as u64;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(config.seed);
    // Writes come in small bursts, paced against the clock, so the rate holds on average.
    const BURST: u64 = 64;
    let started = Instant::now();
    let mut done: u64 = 0;
    loop {
        if shared.pause_flag.load(Ordering::SeqCst) {
            let mut c = shared.control.lock().unwrap();
            if c.stop {
                return;
            }
            if c.pause_requested {
                c.paused = true;
                shared.changed.notify_all();
                while c.pause_requested && !c.stop {
                    c = shared.changed.wait(c).unwrap();
                }
                c.paused = false;
                shared.changed.notify_all();
                if c.stop {
                    return;
                }
            }
            continue;
        }
        if config.writes_per_sec == 0 {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        for _ in 0..BURST {
            let page = if rng.next_u64() < hot_threshold {
                below(rng.next_u64(), hot_pages)
            } else {
                below(rng.next_u64(), pages)
            };
            let word = below(rng.next_u64(), words_per_page);
            let at =
                geometry.offset_of(memferry::page::PageIndex(page)) as usize + word as usize * 8;
            region.store_u64(at, rng.next_u64());
            // Mark after the write: a sync that misses this mark sees the written page next time.
            dirty.mark(page);
        }
        done += BURST;
        shared.writes.store(done, Ordering::Relaxed);
        let due = Duration::from_secs_f64(done as f64 / config.writes_per_sec as f64);
        let elapsed = started.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}
