//! WSClock (Carr and Hennessy, 1981), as paper 002 applies it to pre-copy: the writable working
//! set is the pages used within a window τ, found by a clock hand sweeping a circular list.
//!
//! Implementations:
//! - [`WsClock`]: the ring of frames, its hand, and the [`Predictor`] built on it.
//!
//! ## The algorithm, mapped onto dirty-log syncs
//! A page enters the ring (a `Vec` of frames, circular through the hand) the first time it is
//! seen dirty. Each frame holds the page, its *time of last use* and a *modified* bit; the
//! *referenced* bit is the page's bit in the sync's dirty bitmap, read as the hand passes (the
//! dirty log is this algorithm's page table: it is what sets R, and a sync is what clears it).
//! On every [`Predictor::observe`] the hand makes one full revolution and, for each frame:
//! - referenced → clear R (the next sync's bitmap starts empty), stamp the time of last use,
//!   set M (dirtied since last sent): the page is in the working set;
//! - not referenced, last used within the window → it stays in the working set;
//! - not referenced, older than the window → it leaves the working set: if M is set the "write
//!   is scheduled" (the next push round sends the page, since it is no longer held back) and M
//!   is cleared; if M is already clear the frame is *clean* and may be replaced.
//!
//! Newly dirtied pages then take a free frame while the ring is below its cap, or replace a
//! victim, chosen the WSClock way by a replacement hand that starts at the clock hand: first a
//! clean old frame, then one whose write was just scheduled, and only then (the cap is smaller
//! than the working set) a working-set frame not dirtied at this sync. A page dirtied at this
//! sync is never replaced by another page dirtied at this sync: when no victim remains, the
//! remaining newcomers (the higher page indices) are not tracked. After a replacement the clock
//! hand moves past the victim, as in the clock algorithm.
//!
//! A full revolution per sync keeps the working set exact (it is what the property tests
//! check: a page is predicted hot iff it was dirtied within the window) at O(tracked) per sync,
//! within the [`Predictor`] budget. Old frames are kept, not dropped, until a newcomer needs the
//! room: evicting one changes no prediction (a re-dirtied page re-enters with R set, exactly as
//! a remembered one would), but the ring is WSClock's memory of frames and the M bit lives in it.
//!
//! Memory: 24 bytes per frame plus a `u64 -> u32` hash slot (17 bytes, at most 7/8 full), so 41
//! to ~75 bytes per tracked page as the ring and the table double (58 measured at 2^16 pages).

use alloc::vec::Vec;
use core::mem::size_of;

use hashbrown::HashMap;

use super::{mark, Cutoff, Predictor, Window, WindowClock};
use crate::bitmap::DirtyBitmap;
use crate::time::Nanos;

/// What the last sweep found a frame to be; it orders the replacement hand's choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// Dirtied at the latest sync (or admitted at it): never a victim for another newcomer.
    Fresh,
    /// In the working set, not dirtied at the latest sync: the last-resort victim.
    InWorkingSet,
    /// Left the working set at the latest sweep with M set: its write was just scheduled.
    Scheduled,
    /// Old and clean: the first choice of victim.
    Clean,
}

#[derive(Clone, Copy, Debug)]
struct Frame {
    page: u64,
    last_use: Nanos,
    modified: bool,
    class: Class,
}

/// The WSClock working-set predictor (see the module docs).
#[derive(Clone, Debug)]
pub struct WsClock {
    frames: Vec<Frame>,
    /// Page → frame index.
    index: HashMap<u64, u32>,
    /// Where the next sweep, and the replacement hand, start.
    hand: usize,
    cap: usize,
    clock: WindowClock,
}

impl WsClock {
    /// A ring that tracks at most `max_tracked` pages (clamped to
    /// [`MAX_TRACKED_LIMIT`](super::MAX_TRACKED_LIMIT)), with working-set window `window`.
    pub fn new(window: Window, max_tracked: usize) -> Self {
        WsClock {
            frames: Vec::new(),
            index: HashMap::default(),
            hand: 0,
            cap: max_tracked.min(super::MAX_TRACKED_LIMIT),
            clock: WindowClock::new(window),
        }
    }

    /// The window (a `Syncs` window is clamped to its allowed range).
    pub fn window(&self) -> Window {
        self.clock.window()
    }

    /// The cap on tracked pages.
    pub fn max_tracked(&self) -> usize {
        self.cap
    }

    /// The clock hand: the frame the next sweep starts at.
    pub fn hand(&self) -> usize {
        self.hand
    }

    /// The time `page` was last seen dirty, if it is in the ring.
    pub fn last_use(&self, page: u64) -> Option<Nanos> {
        self.index
            .get(&page)
            .map(|&f| self.frames[f as usize].last_use)
    }

    /// The M bit of `page`, if it is in the ring: set when the page is dirtied, cleared when
    /// the hand finds it older than the window (its write is then scheduled).
    pub fn is_modified(&self, page: u64) -> Option<bool> {
        self.index
            .get(&page)
            .map(|&f| self.frames[f as usize].modified)
    }

    /// Calls `f` with every page in the working set as of `now`, in ring order.
    pub fn for_each_in_working_set(&self, now: Nanos, mut f: impl FnMut(u64)) {
        let cutoff = self.clock.cutoff(now);
        for frame in &self.frames {
            if cutoff.is_hot(frame.last_use) {
                f(frame.page);
            }
        }
    }

    /// The hand's revolution: reads R from `dirty`, stamps, classifies (module docs).
    fn sweep(&mut self, dirty: &DirtyBitmap, now: Nanos, cutoff: Cutoff) {
        // Every frame is visited once, so the visiting order changes no outcome; a linear pass
        // is the cache-friendly way to make the revolution. The hand only orders the victims.
        for frame in &mut self.frames {
            frame.class = if dirty.get(frame.page) {
                frame.last_use = now;
                frame.modified = true;
                Class::Fresh
            } else if cutoff.is_hot(frame.last_use) {
                Class::InWorkingSet
            } else if frame.modified {
                frame.modified = false;
                Class::Scheduled
            } else {
                Class::Clean
            };
        }
    }

    /// Admits the pages of `dirty` that are not in the ring yet.
    fn admit(&mut self, dirty: &DirtyBitmap, now: Nanos) {
        let mut victims = Victims::new(self.hand);
        let mut last_victim = None;
        for page in dirty.iter_ones() {
            if self.index.contains_key(&page) {
                continue;
            }
            let fresh = Frame {
                page,
                last_use: now,
                modified: true,
                class: Class::Fresh,
            };
            if self.frames.len() < self.cap {
                self.index.insert(page, self.frames.len() as u32);
                self.frames.push(fresh);
                continue;
            }
            let Some(v) = victims.next(&self.frames) else {
                // Every frame holds a page dirtied at this sync: nothing colder to replace.
                break;
            };
            self.index.remove(&self.frames[v].page);
            self.index.insert(page, v as u32);
            self.frames[v] = fresh;
            last_victim = Some(v);
        }
        if let Some(v) = last_victim {
            self.hand = (v + 1) % self.frames.len();
        }
    }
}

/// The replacement hand: walks the ring from the clock hand once per class of victim, in the
/// order clean, scheduled, working set.
struct Victims {
    start: usize,
    pos: usize,
    scanned: usize,
    class: usize,
}

const VICTIM_ORDER: [Class; 3] = [Class::Clean, Class::Scheduled, Class::InWorkingSet];

impl Victims {
    fn new(hand: usize) -> Self {
        Victims {
            start: hand,
            pos: hand,
            scanned: 0,
            class: 0,
        }
    }

    /// The next frame to replace, or `None` when only fresh frames remain. Each class costs at
    /// most one revolution per sync, so admitting all newcomers costs O(tracked) in total.
    fn next(&mut self, frames: &[Frame]) -> Option<usize> {
        let n = frames.len();
        while self.class < VICTIM_ORDER.len() {
            let wanted = VICTIM_ORDER[self.class];
            while self.scanned < n {
                let i = self.pos % n;
                self.pos = i + 1;
                self.scanned += 1;
                if frames[i].class == wanted {
                    // The frame becomes fresh once replaced, so it is never chosen twice.
                    return Some(i);
                }
            }
            self.class += 1;
            self.scanned = 0;
            self.pos = self.start;
        }
        None
    }
}

impl Predictor for WsClock {
    fn name(&self) -> &'static str {
        "wsclock"
    }

    fn observe(&mut self, dirty: &DirtyBitmap, now: Nanos) {
        self.clock.observed(now);
        let cutoff = self.clock.cutoff(now);
        self.sweep(dirty, now, cutoff);
        if self.cap > 0 {
            self.admit(dirty, now);
        }
    }

    fn predict(&mut self, now: Nanos, hot: &mut DirtyBitmap) {
        self.for_each_in_working_set(now, |page| mark(hot, page));
    }

    fn tracked_pages(&self) -> usize {
        self.frames.len()
    }

    fn heap_bytes(&self) -> usize {
        self.frames.capacity() * size_of::<Frame>()
            + self.index.allocation_size()
            + self.clock.heap_bytes()
    }
}
