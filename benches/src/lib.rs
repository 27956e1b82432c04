//! Criterion benchmarks of memferry's hot paths; the code is in `benches/`.
//!
//! - `bitmap`: set-bit walks of a 2^28-bit dirty bitmap (a 1 TiB guest of 4 KiB pages) at
//!   0.01 %, 1 % and 50 % density, against a plain `u64` word loop and bitvec's `iter_ones`;
//!   `AtomicDirtyBitmap::fetch_and_clear_into`; `DirtyBitmap::union_with` against bitvec's `|=`.
//! - `wire`: encoding and decoding 4 KiB page frames, and zero-page detection.
//! - `predictors`: the writable-working-set predictors of `memferry::track`.
//! - `trace`: writing and reading dirty sets in `memferry_std::trace`'s format.
//!
//! Run them with `cargo bench -p memferry-benches` (add `-- --quick` for a fast look).
//! This library is deliberately empty.
