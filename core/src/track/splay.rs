//! Splay-tree working-set prediction (Sleator and Tarjan, 1985; the structure Zaw and Thein use
//! to keep their LRU, cited by paper 002): every dirty page is splayed to the root, so pages
//! dirtied recently sit near the root and pages left alone sink.
//!
//! Implementations:
//! - [`SplayTree`]: a self-adjusting binary search tree keyed by page index, each node holding
//!   the time the page was last dirtied. Arena-allocated (a `Vec` of nodes with `u32` child and
//!   parent links, freed nodes chained for reuse); bottom-up splaying with zig, zig-zig and
//!   zig-zag rotations through parent links; **no recursion anywhere**: search, splay, removal and
//!   the in-order walk follow links in loops, and [`SplayTree::check_invariants`] uses an
//!   explicit stack. Debugging accessors for tests: [`SplayTree::in_order_keys`],
//!   [`SplayTree::len`], [`SplayTree::root_key`], [`SplayTree::depth`],
//!   [`SplayTree::check_invariants`].
//! - [`SplayPredictor`]: the [`Predictor`] built on the tree.
//!
//! ## The working-set rule
//! The predicted working set is the pages whose last dirtying is within the [`Window`], the same
//! rule as WSClock and LRU, so the three can be compared on their costs alone. Depth is not used
//! as the rule: it correlates with recency but depends on the access pattern (a sequential sweep
//! leaves a path, a random one a bushy tree), so "the top d levels" would mean a different set
//! for the same history. The tree is keyed by page, not by time, so prediction visits every node
//! (O(tracked)); it scans the arena linearly rather than walking the tree in order, because the
//! in-order walk hops around the arena (~20 ns a node at 2^16 nodes against ~1 ns).
//!
//! ## Costs and memory
//! Each dirty page costs one splay, O(log tracked) amortised; the pages of one sync arrive in
//! increasing order, which splay trees handle in O(1) amortised each (the sequential access
//! theorem). No hash map: the tree is the index. 32 bytes per node (key, time, three links).
//!
//! At the cap, the coldest pages not dirtied at this sync (oldest last dirtying, then lowest
//! page) are removed to make room for the sync's newcomers; one selection pass over the tree
//! (O(tracked)) serves the whole sync. When fewer pages can leave than newcomers arrive, the
//! newcomers with the lowest indices are admitted.

use alloc::vec::Vec;
use core::fmt;
use core::mem::size_of;

use super::{mark, Predictor, Window, WindowClock};
use crate::bitmap::DirtyBitmap;
use crate::time::Nanos;

const NIL: u32 = u32::MAX;
/// The `left` link of a node on the free list. Never a valid index: the arena stops one short.
const FREE: u32 = u32::MAX - 1;

#[derive(Clone, Copy, Debug)]
struct Node {
    key: u64,
    stamp: Nanos,
    /// The left child; [`FREE`] for a node on the free list.
    left: u32,
    right: u32,
    /// The parent; for a node on the free list, the next free node.
    parent: u32,
}

/// A broken invariant found by [`SplayTree::check_invariants`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvariantError {
    /// The root has a parent.
    RootHasParent,
    /// A child does not point back at its parent.
    BadParentLink {
        /// The child's key.
        key: u64,
    },
    /// The in-order walk is not strictly increasing.
    OutOfOrder {
        /// The key that came before.
        before: u64,
        /// The key that came after it.
        after: u64,
    },
    /// The number of nodes reachable from the root differs from `len`.
    WrongSize {
        /// Reachable nodes.
        reachable: usize,
        /// The recorded size.
        len: usize,
    },
    /// A link points outside the arena, or the links form a cycle.
    BadLink,
    /// Live and free nodes do not add up to the arena, or a node's free mark disagrees with the
    /// free list.
    FreeListMismatch,
}

impl fmt::Display for InvariantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvariantError::RootHasParent => write!(f, "the root has a parent"),
            InvariantError::BadParentLink { key } => {
                write!(f, "node {key} does not point back at its parent")
            }
            InvariantError::OutOfOrder { before, after } => {
                write!(f, "in-order walk has {before} before {after}")
            }
            InvariantError::WrongSize { reachable, len } => {
                write!(f, "{reachable} nodes reachable, size says {len}")
            }
            InvariantError::BadLink => write!(f, "a link leaves the arena or forms a cycle"),
            InvariantError::FreeListMismatch => write!(f, "live plus free nodes != arena"),
        }
    }
}

/// A splay tree from page index to the time it was last dirtied (see the module docs).
#[derive(Clone, Debug)]
pub struct SplayTree {
    nodes: Vec<Node>,
    root: u32,
    /// Head of the free list, chained through `parent`.
    free: u32,
    len: usize,
}

impl Default for SplayTree {
    fn default() -> Self {
        SplayTree::new()
    }
}

impl SplayTree {
    /// An empty tree; it allocates on first insert.
    pub const fn new() -> Self {
        SplayTree {
            nodes: Vec::new(),
            root: NIL,
            free: NIL,
            len: 0,
        }
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the tree is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The key at the root: the last key inserted, found or removed-next-to.
    pub fn root_key(&self) -> Option<u64> {
        self.node(self.root).map(|n| n.key)
    }

    /// Heap bytes of the arena (capacity-based).
    pub fn heap_bytes(&self) -> usize {
        self.nodes.capacity() * size_of::<Node>()
    }

    /// Removes every key; keeps the arena's allocation.
    pub fn clear(&mut self) {
        self.nodes.clear();
        self.root = NIL;
        self.free = NIL;
        self.len = 0;
    }

    fn node(&self, i: u32) -> Option<&Node> {
        self.nodes.get(i as usize)
    }

    #[inline]
    fn left(&self, i: u32) -> u32 {
        self.nodes[i as usize].left
    }

    #[inline]
    fn right(&self, i: u32) -> u32 {
        self.nodes[i as usize].right
    }

    #[inline]
    fn parent(&self, i: u32) -> u32 {
        self.nodes[i as usize].parent
    }

    /// Rotates `x` above its parent (a right rotation if `x` is a left child, else a left one).
    fn rotate(&mut self, x: u32) {
        let p = self.parent(x);
        let g = self.parent(p);
        if self.left(p) == x {
            let b = self.right(x);
            self.nodes[p as usize].left = b;
            if b != NIL {
                self.nodes[b as usize].parent = p;
            }
            self.nodes[x as usize].right = p;
        } else {
            let b = self.left(x);
            self.nodes[p as usize].right = b;
            if b != NIL {
                self.nodes[b as usize].parent = p;
            }
            self.nodes[x as usize].left = p;
        }
        self.nodes[p as usize].parent = x;
        self.nodes[x as usize].parent = g;
        if g == NIL {
            self.root = x;
        } else if self.left(g) == p {
            self.nodes[g as usize].left = x;
        } else {
            self.nodes[g as usize].right = x;
        }
    }

    /// Moves `x` to the root of the subtree whose root has no parent (the whole tree, or a
    /// detached subtree during removal), bottom-up.
    fn splay(&mut self, x: u32) {
        loop {
            let p = self.parent(x);
            if p == NIL {
                return;
            }
            let g = self.parent(p);
            if g == NIL {
                // zig: the parent is the root.
                self.rotate(x);
            } else if (self.left(g) == p) == (self.left(p) == x) {
                // zig-zig: x and p are children on the same side; rotate the parent first.
                self.rotate(p);
                self.rotate(x);
            } else {
                // zig-zag: x is an inner grandchild; rotate it up twice.
                self.rotate(x);
                self.rotate(x);
            }
        }
    }

    /// Descends to `key`: `Ok(node)` if present, else `Err(last node visited)` (`NIL` when
    /// empty). Does not splay.
    fn descend(&self, key: u64) -> Result<u32, u32> {
        let mut at = self.root;
        let mut last = NIL;
        while at != NIL {
            let n = &self.nodes[at as usize];
            last = at;
            at = match key.cmp(&n.key) {
                core::cmp::Ordering::Less => n.left,
                core::cmp::Ordering::Greater => n.right,
                core::cmp::Ordering::Equal => return Ok(at),
            };
        }
        Err(last)
    }

    /// The time stored for `key`, without splaying (a read-only look, for tests and reports).
    pub fn peek(&self, key: u64) -> Option<Nanos> {
        self.descend(key).ok().map(|i| self.nodes[i as usize].stamp)
    }

    /// The depth of `key` (the root is at 0), without splaying.
    pub fn depth(&self, key: u64) -> Option<usize> {
        let i = self.descend(key).ok()?;
        let mut depth = 0;
        let mut at = self.parent(i);
        while at != NIL {
            depth += 1;
            at = self.parent(at);
        }
        Some(depth)
    }

    /// Looks `key` up and splays: the found node, or else the last node on the search path,
    /// becomes the root (so misses pay for themselves too).
    pub fn get(&mut self, key: u64) -> Option<Nanos> {
        match self.descend(key) {
            Ok(i) => {
                self.splay(i);
                Some(self.nodes[i as usize].stamp)
            }
            Err(last) => {
                if last != NIL {
                    self.splay(last);
                }
                None
            }
        }
    }

    /// Sets the time of `key` if present (splaying it to the root) and returns the old time;
    /// `None` (and no change but the splay of the search path's end) if absent.
    pub fn touch(&mut self, key: u64, stamp: Nanos) -> Option<Nanos> {
        match self.descend(key) {
            Ok(i) => {
                self.splay(i);
                Some(core::mem::replace(&mut self.nodes[i as usize].stamp, stamp))
            }
            Err(last) => {
                if last != NIL {
                    self.splay(last);
                }
                None
            }
        }
    }

    /// Inserts `key` with `stamp`, or updates its stamp; either way `key` becomes the root.
    /// Returns the old stamp if the key was present.
    pub fn insert(&mut self, key: u64, stamp: Nanos) -> Option<Nanos> {
        let parent = match self.descend(key) {
            Ok(i) => {
                self.splay(i);
                return Some(core::mem::replace(&mut self.nodes[i as usize].stamp, stamp));
            }
            Err(last) => last,
        };
        let node = Node {
            key,
            stamp,
            left: NIL,
            right: NIL,
            parent,
        };
        let i = if self.free != NIL {
            let i = self.free;
            self.free = self.nodes[i as usize].parent;
            self.nodes[i as usize] = node;
            i
        } else {
            assert!(
                self.nodes.len() < FREE as usize,
                "splay tree arena is full (u32 indices)"
            );
            self.nodes.push(node);
            (self.nodes.len() - 1) as u32
        };
        if parent == NIL {
            self.root = i;
        } else if key < self.nodes[parent as usize].key {
            self.nodes[parent as usize].left = i;
        } else {
            self.nodes[parent as usize].right = i;
        }
        self.len += 1;
        self.splay(i);
        None
    }

    /// Removes `key`, returning its stamp. The predecessor (or successor) becomes the root.
    pub fn remove(&mut self, key: u64) -> Option<Nanos> {
        let i = match self.descend(key) {
            Ok(i) => i,
            Err(last) => {
                if last != NIL {
                    self.splay(last);
                }
                return None;
            }
        };
        self.splay(i);
        let Node {
            left, right, stamp, ..
        } = self.nodes[i as usize];
        if left == NIL {
            self.root = right;
            if right != NIL {
                self.nodes[right as usize].parent = NIL;
            }
        } else {
            // Detach the left subtree, splay its maximum to its root (it then has no right
            // child), and hang the right subtree there.
            self.nodes[left as usize].parent = NIL;
            let mut max = left;
            while self.right(max) != NIL {
                max = self.right(max);
            }
            self.splay(max);
            self.nodes[max as usize].right = right;
            if right != NIL {
                self.nodes[right as usize].parent = max;
            }
            self.root = max;
        }
        self.nodes[i as usize] = Node {
            key: 0,
            stamp: Nanos::ZERO,
            left: FREE,
            right: NIL,
            parent: self.free,
        };
        self.free = i;
        self.len -= 1;
        Some(stamp)
    }

    /// The leftmost node of the subtree at `i`.
    fn leftmost(&self, mut i: u32) -> u32 {
        while i != NIL && self.left(i) != NIL {
            i = self.left(i);
        }
        i
    }

    /// The in-order successor of `i`, through parent links (no stack).
    fn successor(&self, i: u32) -> u32 {
        if self.right(i) != NIL {
            return self.leftmost(self.right(i));
        }
        let mut child = i;
        let mut at = self.parent(i);
        while at != NIL && self.right(at) == child {
            child = at;
            at = self.parent(at);
        }
        at
    }

    /// Calls `f(key, stamp)` for every key in increasing order, without splaying: O(len), no
    /// recursion, no allocation.
    pub fn for_each(&self, mut f: impl FnMut(u64, Nanos)) {
        let mut at = self.leftmost(self.root);
        while at != NIL {
            let n = &self.nodes[at as usize];
            f(n.key, n.stamp);
            at = self.successor(at);
        }
    }

    /// Calls `f(key, stamp)` for every key in arena order (no particular key order), without
    /// splaying. A linear scan of the arena: several times faster than [`SplayTree::for_each`],
    /// whose walk hops around the arena, so the predictor uses it wherever order does not matter.
    pub fn for_each_unordered(&self, mut f: impl FnMut(u64, Nanos)) {
        for n in &self.nodes {
            if n.left != FREE {
                f(n.key, n.stamp);
            }
        }
    }

    /// Every key in increasing order (for tests and debugging).
    pub fn in_order_keys(&self) -> Vec<u64> {
        let mut keys = Vec::with_capacity(self.len);
        self.for_each(|k, _| keys.push(k));
        keys
    }

    /// Verifies the tree: links inside the arena and acyclic, every child pointing back at its
    /// parent, the root parentless, keys strictly increasing in order, `len` equal to the
    /// reachable nodes, and live plus free nodes equal to the arena. Walks child links with an
    /// explicit stack (it must not trust the parent links it is checking).
    pub fn check_invariants(&self) -> Result<(), InvariantError> {
        let arena = self.nodes.len();
        if self.root != NIL {
            if self.root as usize >= arena {
                return Err(InvariantError::BadLink);
            }
            if self.parent(self.root) != NIL {
                return Err(InvariantError::RootHasParent);
            }
        }
        let mut stack: Vec<u32> = Vec::new();
        let mut at = self.root;
        let mut prev: Option<u64> = None;
        let mut reachable = 0usize;
        loop {
            while at != NIL {
                let n = self.node(at).ok_or(InvariantError::BadLink)?;
                for child in [n.left, n.right] {
                    if child != NIL {
                        let c = self.node(child).ok_or(InvariantError::BadLink)?;
                        if c.parent != at {
                            return Err(InvariantError::BadParentLink { key: c.key });
                        }
                    }
                }
                stack.push(at);
                // More nodes on the stack than in the arena means the links loop.
                if stack.len() > arena {
                    return Err(InvariantError::BadLink);
                }
                at = n.left;
            }
            let Some(i) = stack.pop() else { break };
            let n = &self.nodes[i as usize];
            if let Some(before) = prev {
                if before >= n.key {
                    return Err(InvariantError::OutOfOrder {
                        before,
                        after: n.key,
                    });
                }
            }
            prev = Some(n.key);
            reachable += 1;
            if reachable > arena {
                return Err(InvariantError::BadLink);
            }
            at = n.right;
        }
        if reachable != self.len {
            return Err(InvariantError::WrongSize {
                reachable,
                len: self.len,
            });
        }
        let mut free = 0usize;
        let mut f = self.free;
        while f != NIL {
            free += 1;
            if free > arena {
                return Err(InvariantError::BadLink);
            }
            let n = self.node(f).ok_or(InvariantError::BadLink)?;
            if n.left != FREE {
                return Err(InvariantError::FreeListMismatch);
            }
            f = n.parent;
        }
        let marked = self.nodes.iter().filter(|n| n.left == FREE).count();
        if free + self.len != arena || marked != free {
            return Err(InvariantError::FreeListMismatch);
        }
        Ok(())
    }
}

/// The splay-tree working-set predictor (see the module docs).
#[derive(Clone, Debug)]
pub struct SplayPredictor {
    tree: SplayTree,
    cap: usize,
    clock: WindowClock,
}

impl SplayPredictor {
    /// A predictor that tracks at most `max_tracked` pages (clamped to
    /// [`MAX_TRACKED_LIMIT`](super::MAX_TRACKED_LIMIT)), with working-set window `window`.
    pub fn new(window: Window, max_tracked: usize) -> Self {
        SplayPredictor {
            tree: SplayTree::new(),
            cap: max_tracked.min(super::MAX_TRACKED_LIMIT),
            clock: WindowClock::new(window),
        }
    }

    /// The tree, for inspection.
    pub fn tree(&self) -> &SplayTree {
        &self.tree
    }

    /// The window (a `Syncs` window is clamped to its allowed range).
    pub fn window(&self) -> Window {
        self.clock.window()
    }

    /// The cap on tracked pages.
    pub fn max_tracked(&self) -> usize {
        self.cap
    }

    /// Removes up to `count` of the coldest pages not set in `dirty`: oldest stamp first, then
    /// lowest page. Returns how many were removed.
    fn evict_coldest(&mut self, dirty: &DirtyBitmap, count: usize) -> usize {
        let mut candidates: Vec<(Nanos, u64)> = Vec::new();
        self.tree.for_each_unordered(|key, stamp| {
            if !dirty.get(key) {
                candidates.push((stamp, key));
            }
        });
        let count = count.min(candidates.len());
        if count == 0 {
            return 0;
        }
        if count < candidates.len() {
            candidates.select_nth_unstable(count - 1);
        }
        for &(_, key) in &candidates[..count] {
            self.tree.remove(key);
        }
        count
    }
}

impl Predictor for SplayPredictor {
    fn name(&self) -> &'static str {
        "splay"
    }

    fn observe(&mut self, dirty: &DirtyBitmap, now: Nanos) {
        self.clock.observed(now);
        let mut first_overflow = None;
        let mut overflow = 0usize;
        for page in dirty.iter_ones() {
            if self.tree.len() < self.cap {
                // Inserts, or restamps a page already tracked: one descent either way.
                self.tree.insert(page, now);
            } else if self.tree.touch(page, now).is_none() {
                overflow += 1;
                first_overflow.get_or_insert(page);
            }
        }
        let Some(from) = first_overflow else { return };
        if self.evict_coldest(dirty, overflow) == 0 {
            return;
        }
        for page in dirty.iter_ones_from(from) {
            if self.tree.len() >= self.cap {
                break;
            }
            // Pages already tracked were restamped to `now` above; inserting them again is a
            // harmless restamp.
            self.tree.insert(page, now);
        }
    }

    fn predict(&mut self, now: Nanos, hot: &mut DirtyBitmap) {
        let cutoff = self.clock.cutoff(now);
        self.tree.for_each_unordered(|key, stamp| {
            if cutoff.is_hot(stamp) {
                mark(hot, key);
            }
        });
    }

    fn tracked_pages(&self) -> usize {
        self.tree.len()
    }

    fn heap_bytes(&self) -> usize {
        self.tree.heap_bytes() + self.clock.heap_bytes()
    }
}
