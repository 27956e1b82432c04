//! Trace benchmarks: how fast a dirty set is written to and read from a memferry trace, for the
//! sets the format was measured on (see the module docs of `memferry_std::trace`).
//!
//! - `write/<set>`: [`TraceWriter::write_interval`] of one bitmap to `io::sink()`: choosing the
//!   encoding, encoding and checksumming (throughput in dirty pages).
//! - `write_pages/<set>`: the same from a sorted page list (the sparse 2^28-page set only: a
//!   list is how a sparse sampler holds its pages).
//! - `read/<set>`: [`TraceReader::next_interval`] of a one-interval trace held in memory:
//!   checksum and decode into a cleared bitmap (throughput in dirty pages).
//!
//! Before measuring, the bytes each encoding takes for each set are printed: the figures behind
//! the format's per-record choice. Sets come from a fixed-seed splitmix64, hot/cold ones with
//! the in-process workload's pattern (90 % of writes into the first 5 % of pages).
//! `cargo bench -p memferry-benches --bench trace -- --quick` gives a first look.

use std::hint::black_box;
use std::io;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use memferry::bitmap::DirtyBitmap;
use memferry::page::{Geometry, PageSize};
use memferry::time::Nanos;
use memferry_std::trace::{encoding_sizes, TraceHeader, TraceReader, TraceWriter};

/// splitmix64 (Steele, Lea and Flood, 2014): a tiny, fast generator of well-mixed `u64`s.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform integer below `n` (Lemire's multiply-shift).
    fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// Exactly `dirty` distinct pages of `pages`, uniformly.
fn uniform(pages: u64, dirty: u64, seed: u64) -> DirtyBitmap {
    let mut rng = SplitMix64(seed);
    let mut map = DirtyBitmap::new(pages);
    let mut count = 0;
    while count < dirty {
        let page = rng.below(pages);
        if !map.get(page) {
            map.set(page);
            count += 1;
        }
    }
    map
}

/// `writes` writes of the workload's hot/cold pattern.
fn hot_cold(pages: u64, writes: u64, seed: u64) -> DirtyBitmap {
    let mut rng = SplitMix64(seed);
    let mut map = DirtyBitmap::new(pages);
    let hot = pages / 20;
    for _ in 0..writes {
        let page = if rng.below(10) < 9 {
            rng.below(hot)
        } else {
            rng.below(pages)
        };
        map.set(page);
    }
    map
}

fn sets() -> Vec<(&'static str, DirtyBitmap)> {
    let small = 1u64 << 18;
    let big = 1u64 << 28;
    vec![
        ("uniform-1%-of-2^18", uniform(small, small / 100, 1)),
        ("workload-100ms-of-2^18", hot_cold(small, 20_000, 2)),
        ("uniform-50%-of-2^18", uniform(small, small / 2, 3)),
        ("uniform-0.01%-of-2^28", uniform(big, big / 10_000, 4)),
        // ~1 % of the pages dirty, most of them hot.
        ("hot/cold-1%-of-2^28", hot_cold(big, big / 80, 5)),
    ]
}

fn header(pages: u64) -> TraceHeader {
    let geometry = Geometry::new(PageSize::DEFAULT, pages).expect("a valid guest");
    TraceHeader::new(geometry, Nanos::from_millis(100)).with_description("bench")
}

fn bench_trace(c: &mut Criterion) {
    let sets = sets();
    println!("| set | dirty | raw bitmap | page deltas | chunked | chosen |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (name, map) in &sets {
        let sizes = encoding_sizes(map);
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            map.count_ones(),
            map.len() / 8,
            sizes.page_deltas,
            sizes.chunked,
            sizes.chosen()
        );
    }

    let mut group = c.benchmark_group("trace");
    group.sample_size(20);
    for (name, map) in &sets {
        let dirty = map.count_ones();
        group.throughput(Throughput::Elements(dirty));
        let mut writer = TraceWriter::new(io::sink(), &header(map.len())).expect("a header");
        group.bench_function(format!("write/{name}"), |b| {
            b.iter(|| writer.write_interval(black_box(map)).expect("written"))
        });

        if name.starts_with("uniform-0.01%") {
            let pages: Vec<u64> = map.iter_ones().collect();
            let mut writer = TraceWriter::new(io::sink(), &header(map.len())).expect("a header");
            group.bench_function(format!("write_pages/{name}"), |b| {
                b.iter(|| {
                    writer
                        .write_interval_pages(black_box(&pages))
                        .expect("written")
                })
            });
        }

        let mut writer = TraceWriter::new(Vec::new(), &header(map.len())).expect("a header");
        writer.write_interval(map).expect("written");
        let (trace, _) = writer.finish().expect("finished");
        let mut into = DirtyBitmap::new(map.len());
        let mut reader = TraceReader::open(trace.as_slice()).expect("a trace");
        assert!(reader.next_interval(&mut into).expect("an interval"));
        assert_eq!(&into, map, "{name} reads back as written");
        group.bench_function(format!("read/{name}"), |b| {
            b.iter(|| {
                let mut reader = TraceReader::open(black_box(trace.as_slice())).expect("a trace");
                reader.next_interval(&mut into).expect("an interval")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_trace);
criterion_main!(benches);
