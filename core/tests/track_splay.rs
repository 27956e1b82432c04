//! Tests of the splay tree behind the splay predictor ([`memferry::track::SplayTree`]).
//!
//! - Property: under any sequence of inserts, lookups, restamps and removals the tree matches a
//!   `BTreeMap` model (keys in order, stamps, size), its invariants hold (BST order, parent
//!   links, size, free list) after every operation, and every operation that finds or inserts a
//!   key leaves it at the root.
//! - The three rotations on hand-built shapes: zig, zig-zig, zig-zag.
//! - No recursion: a two-million-node path (sequential inserts) is splayed from its deepest end
//!   and walked, which a recursive implementation could not survive on a test thread's stack.

use std::collections::BTreeMap;

use memferry::time::Nanos;
use memferry::track::SplayTree;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Insert(u64, u64),
    Get(u64),
    Touch(u64, u64),
    Remove(u64),
}

fn op(keys: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..keys, any::<u64>()).prop_map(|(k, t)| Op::Insert(k, t)),
        2 => (0..keys).prop_map(Op::Get),
        2 => (0..keys, any::<u64>()).prop_map(|(k, t)| Op::Touch(k, t)),
        3 => (0..keys).prop_map(Op::Remove),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn matches_a_btreemap_and_keeps_its_invariants(
        keys in 1u64..200,
        ops in proptest::collection::vec(op(200), 0..400),
    ) {
        let mut tree = SplayTree::new();
        let mut model: BTreeMap<u64, Nanos> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Insert(k, t) => {
                    let k = k % keys;
                    prop_assert_eq!(tree.insert(k, Nanos(t)), model.insert(k, Nanos(t)));
                    prop_assert_eq!(tree.root_key(), Some(k));
                    prop_assert_eq!(tree.depth(k), Some(0));
                }
                Op::Get(k) => {
                    let k = k % keys;
                    let got = tree.get(k);
                    prop_assert_eq!(got, model.get(&k).copied());
                    if got.is_some() {
                        prop_assert_eq!(tree.root_key(), Some(k));
                    }
                }
                Op::Touch(k, t) => {
                    let k = k % keys;
                    let old = model.get(&k).copied();
                    if old.is_some() {
                        model.insert(k, Nanos(t));
                    }
                    prop_assert_eq!(tree.touch(k, Nanos(t)), old);
                    if old.is_some() {
                        prop_assert_eq!(tree.root_key(), Some(k));
                    }
                }
                Op::Remove(k) => {
                    let k = k % keys;
                    prop_assert_eq!(tree.remove(k), model.remove(&k));
                    prop_assert_eq!(tree.peek(k), None);
                }
            }
            if let Err(e) = tree.check_invariants() {
                return Err(TestCaseError::fail(format!("invariant broken: {e}")));
            }
            prop_assert_eq!(tree.len(), model.len());
            prop_assert_eq!(tree.is_empty(), model.is_empty());
            prop_assert_eq!(tree.in_order_keys(), model.keys().copied().collect::<Vec<_>>());
        }
        let mut walked = Vec::new();
        tree.for_each(|k, t| walked.push((k, t)));
        let expected: Vec<(u64, Nanos)> = model.into_iter().collect();
        prop_assert_eq!(&walked, &expected);
        let mut scanned = Vec::new();
        tree.for_each_unordered(|k, t| scanned.push((k, t)));
        scanned.sort();
        prop_assert_eq!(&scanned, &expected);
    }
}

/// Builds the exact shape `keys` describes by inserting in an order that splaying cannot
/// disturb: inserting the keys in decreasing order makes a left path (each new, smaller key
/// becomes the root with the previous root as its right child).
fn right_path(keys: &[u64]) -> SplayTree {
    let mut tree = SplayTree::new();
    for &k in keys.iter().rev() {
        tree.insert(k, Nanos(k));
    }
    tree
}

#[test]
fn zig_rotates_a_child_of_the_root() {
    // Inserting 2 then 1 gives root 1 with right child 2; `get(2)` is a single zig.
    let mut tree = right_path(&[1, 2]);
    assert_eq!(tree.root_key(), Some(1));
    assert_eq!(tree.depth(2), Some(1));
    assert_eq!(tree.get(2), Some(Nanos(2)));
    assert_eq!(tree.root_key(), Some(2));
    assert_eq!(tree.depth(1), Some(1));
    tree.check_invariants().unwrap();
}

#[test]
fn zig_zig_rotates_the_parent_first() {
    // A right path 1 -> 2 -> 3. Splaying 3 is one zig-zig: rotate 2 over 1, then 3 over 2,
    // giving the left path 3 -> 2 -> 1 (a zig-zag or two zigs would give 3 with children 1, 2
    // arranged differently: 3 -> 1 -> 2).
    let mut tree = right_path(&[1, 2, 3]);
    assert_eq!(tree.depth(3), Some(2));
    tree.get(3);
    assert_eq!(tree.root_key(), Some(3));
    assert_eq!(tree.depth(2), Some(1));
    assert_eq!(tree.depth(1), Some(2));
    tree.check_invariants().unwrap();
}

#[test]
fn zig_zag_lifts_an_inner_grandchild_twice() {
    // Root 3 with left child 1: inserting 2 attaches it as 1's right child, an inner
    // grandchild of 3, and one zig-zag makes it the root with 1 and 3 as its children.
    let mut tree = SplayTree::new();
    tree.insert(1, Nanos(1));
    tree.insert(3, Nanos(3));
    assert_eq!(tree.root_key(), Some(3));
    assert_eq!(tree.depth(1), Some(1));
    tree.insert(2, Nanos(2));
    assert_eq!(tree.root_key(), Some(2));
    assert_eq!(tree.depth(1), Some(1));
    assert_eq!(tree.depth(3), Some(1));
    tree.check_invariants().unwrap();
}

#[test]
fn remove_keeps_order_and_moves_a_neighbour_to_the_root() {
    let mut tree = SplayTree::new();
    for k in [50, 20, 80, 10, 30, 70, 90] {
        tree.insert(k, Nanos(k));
    }
    assert_eq!(tree.remove(50), Some(Nanos(50)));
    assert_eq!(
        tree.root_key(),
        Some(30),
        "the predecessor becomes the root"
    );
    assert_eq!(tree.remove(5), None);
    assert_eq!(tree.in_order_keys(), vec![10, 20, 30, 70, 80, 90]);
    tree.check_invariants().unwrap();
    for k in [10, 20, 30, 70, 80, 90] {
        assert!(tree.remove(k).is_some());
        tree.check_invariants().unwrap();
    }
    assert!(tree.is_empty());
    assert_eq!(tree.root_key(), None);
    // Freed nodes are reused before the arena grows.
    let bytes = tree.heap_bytes();
    for k in 0..7 {
        tree.insert(k, Nanos::ZERO);
    }
    assert_eq!(tree.heap_bytes(), bytes);
    tree.check_invariants().unwrap();
}

#[test]
fn a_two_million_node_path_needs_no_recursion() {
    const N: u64 = 2_000_000;
    let mut tree = SplayTree::new();
    // Increasing inserts: each new key becomes the root with the previous root as its left
    // child, so the tree is a left path of depth N - 1.
    for k in 0..N {
        tree.insert(k, Nanos(k));
    }
    assert_eq!(tree.depth(0), Some(N as usize - 1));
    // The deepest node: one splay over two million levels.
    assert_eq!(tree.get(0), Some(Nanos(0)));
    assert_eq!(tree.root_key(), Some(0));
    // Zig-zig steps fold the path: every node's depth roughly halves.
    let d = tree.depth(N / 2).unwrap();
    eprintln!("depth of the middle key after one splay: {d}");
    assert!(d <= N as usize / 4 + 2, "depth {d}");
    tree.check_invariants().unwrap();
    let mut count = 0u64;
    let mut expected = 0;
    tree.for_each(|k, _| {
        assert_eq!(k, expected);
        expected += 1;
        count += 1;
    });
    assert_eq!(count, N);
    // Removing from a long path, and clearing.
    assert_eq!(tree.remove(N / 2), Some(Nanos(N / 2)));
    assert_eq!(tree.len(), N as usize - 1);
    tree.clear();
    assert!(tree.is_empty());
    tree.check_invariants().unwrap();
}
