//! LRU working-set prediction (Zaw and Thein, cited by paper 002): pages ordered by the time
//! they were last dirtied; the recent part of the order is the working set, the rest is the
//! inactive list that the push rounds send.
//!
//! Implementations:
//! - [`Lru`]: an arena-indexed doubly linked list (a `Vec` of nodes with `u32` links) plus a
//!   `page → node` hash map, and the [`Predictor`] built on it.
//!
//! Every dirty page costs O(1): one hash lookup, then an unlink and a relink at the head (or,
//! for a page not yet tracked, a new node, or the tail's node reused when the list is at its
//! cap). Within one sync the pages are visited in increasing order, so of two pages dirtied at
//! the same sync the higher index is nearer the head.
//!
//! The working set is the prefix of the list dirtied within the [`Window`]: [`Predictor::predict`]
//! walks from the head and stops at the first page outside it, so it costs O(working set), not
//! O(tracked). The inactive list is the rest; it is kept (up to the cap) so that the order of
//! cold pages is known, oldest at the tail ([`Lru::iter_oldest_first`]).
//!
//! Eviction: at the cap, the tail (the least recently dirtied page) makes room, even when the
//! tail was itself dirtied at this sync (the list then holds the `cap` most recent pages, in the
//! order above). Memory: 24 bytes per node plus a `u64 -> u32` hash slot (17 bytes, at most 7/8
//! full), so 41 to ~75 bytes per tracked page as the arena and the table double (58 measured at
//! 2^16 pages).

use alloc::vec::Vec;
use core::mem::size_of;

use hashbrown::HashMap;

use super::{mark, Predictor, Window, WindowClock};
use crate::bitmap::DirtyBitmap;
use crate::time::Nanos;

const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Node {
    page: u64,
    last: Nanos,
    /// Toward the head (more recent).
    prev: u32,
    /// Toward the tail (less recent).
    next: u32,
}

/// The least-recently-dirtied list (see the module docs).
#[derive(Clone, Debug)]
pub struct Lru {
    nodes: Vec<Node>,
    index: HashMap<u64, u32>,
    /// Most recently dirtied.
    head: u32,
    /// Least recently dirtied.
    tail: u32,
    cap: usize,
    clock: WindowClock,
}

impl Lru {
    /// A list of at most `max_tracked` pages (clamped to
    /// [`MAX_TRACKED_LIMIT`](super::MAX_TRACKED_LIMIT)) whose recent part is `window`.
    pub fn new(window: Window, max_tracked: usize) -> Self {
        Lru {
            nodes: Vec::new(),
            index: HashMap::default(),
            head: NIL,
            tail: NIL,
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

    /// The time `page` was last seen dirty, if tracked.
    pub fn last_dirtied(&self, page: u64) -> Option<Nanos> {
        self.index.get(&page).map(|&i| self.nodes[i as usize].last)
    }

    /// `(page, last dirtied)` from the most recently dirtied page to the least.
    pub fn iter_recent_first(&self) -> impl Iterator<Item = (u64, Nanos)> + '_ {
        let mut at = self.head;
        core::iter::from_fn(move || {
            let node = self.nodes.get(at as usize)?;
            at = node.next;
            Some((node.page, node.last))
        })
    }

    /// `(page, last dirtied)` from the least recently dirtied page to the most: the inactive
    /// list comes first, coldest first.
    pub fn iter_oldest_first(&self) -> impl Iterator<Item = (u64, Nanos)> + '_ {
        let mut at = self.tail;
        core::iter::from_fn(move || {
            let node = self.nodes.get(at as usize)?;
            at = node.prev;
            Some((node.page, node.last))
        })
    }

    /// How many pages are in the recent list (the working set) as of `now`.
    pub fn recent_len(&self, now: Nanos) -> usize {
        let cutoff = self.clock.cutoff(now);
        self.iter_recent_first()
            .take_while(|&(_, last)| cutoff.is_hot(last))
            .count()
    }

    fn unlink(&mut self, i: u32) {
        let Node { prev, next, .. } = self.nodes[i as usize];
        match prev {
            NIL => self.head = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let node = &mut self.nodes[i as usize];
            node.prev = NIL;
            node.next = old;
        }
        match old {
            NIL => self.tail = i,
            h => self.nodes[h as usize].prev = i,
        }
        self.head = i;
    }

    /// Records that `page` was dirtied at `now`: O(1).
    fn touch(&mut self, page: u64, now: Nanos) {
        if let Some(&i) = self.index.get(&page) {
            self.nodes[i as usize].last = now;
            if self.head != i {
                self.unlink(i);
                self.push_front(i);
            }
            return;
        }
        let node = Node {
            page,
            last: now,
            prev: NIL,
            next: NIL,
        };
        let i = if self.nodes.len() < self.cap {
            self.nodes.push(node);
            (self.nodes.len() - 1) as u32
        } else if self.tail != NIL {
            // At the cap: the least recently dirtied page gives its node to the newcomer.
            let t = self.tail;
            self.unlink(t);
            self.index.remove(&self.nodes[t as usize].page);
            self.nodes[t as usize] = node;
            t
        } else {
            return; // a cap of zero
        };
        self.index.insert(page, i);
        self.push_front(i);
    }
}

impl Predictor for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn observe(&mut self, dirty: &DirtyBitmap, now: Nanos) {
        self.clock.observed(now);
        dirty.for_each_set(|page| self.touch(page, now));
    }

    fn predict(&mut self, now: Nanos, hot: &mut DirtyBitmap) {
        let cutoff = self.clock.cutoff(now);
        // The list is in order of last dirtying, so the working set is a prefix of it.
        for (page, last) in self.iter_recent_first() {
            if !cutoff.is_hot(last) {
                break;
            }
            mark(hot, page);
        }
    }

    fn tracked_pages(&self) -> usize {
        self.nodes.len()
    }

    fn heap_bytes(&self) -> usize {
        self.nodes.capacity() * size_of::<Node>()
            + self.index.allocation_size()
            + self.clock.heap_bytes()
    }
}
