//! Wire-format benchmarks: the per-page cost of the frame layer, which every page of a
//! migration pays once on each side.
//!
//! - `page_frame/encode`: a one-page `Pages` frame built in place with [`PagesWriter`] and
//!   [`codec::encode_page_raw`] (copy, zero check and xxh3 checksum included), for a random
//!   page and for a zero page.
//! - `batch_256/encode`: 256 pages in one batch frame (1 MiB), per page.
//! - `page_frame/decode`: [`Frame::parse`] of the random page's frame and a walk of its
//!   entries (checksum verified).
//! - `is_zero`: [`is_zero`] over a 4 KiB zero page, the worst case (every byte is read).
//!
//! Throughput is in bytes of page (encode, `is_zero`) or of frame (decode).

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use memferry::codec;
use memferry::wire::{is_zero, page_frame_len, Encoding, Frame, PagesWriter};

const PAGE: usize = 4096;

/// A page of reproducible, incompressible bytes (a 64-bit LCG's high bytes).
fn random_page() -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..PAGE)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 56) as u8
        })
        .collect()
}

/// Writes frames of `per_frame` copies of `page` into `out`, as the engine does; returns the
/// bytes written and the last page's encoding.
fn encode(out: &mut [u8], index: u64, page: &[u8], per_frame: usize) -> (usize, Encoding) {
    let mut w = PagesWriter::new(out, 1, true).expect("room for a frame");
    let mut encoding = Encoding::RAW;
    for i in 0..per_frame as u64 {
        let e = codec::encode_page_raw(&mut w, index + i, page.len(), |buf| {
            buf.copy_from_slice(page);
            Ok::<(), Infallible>(())
        })
        .unwrap_or_else(|never| match never {})
        .expect("the page fits");
        encoding = e.encoding;
    }
    (w.finish(), encoding)
}

fn page_frame(c: &mut Criterion) {
    let page = random_page();
    let zero = vec![0u8; PAGE];
    let mut out = vec![0u8; 2 << 20];

    let mut group = c.benchmark_group("page_frame");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(PAGE as u64));
    group.bench_function("encode/random_4k", |b| {
        b.iter(|| black_box(encode(&mut out, black_box(42), black_box(&page), 1)))
    });
    group.bench_function("encode/zero_4k", |b| {
        b.iter(|| black_box(encode(&mut out, black_box(42), black_box(&zero), 1)))
    });

    let mut frame = vec![0u8; page_frame_len(PAGE)];
    let (len, encoding) = encode(&mut frame, 42, &page, 1);
    assert_eq!((len, encoding), (page_frame_len(PAGE), Encoding::RAW));
    group.throughput(Throughput::Bytes(len as u64));
    group.bench_function("decode/random_4k", |b| {
        b.iter(|| {
            let (parsed, _) =
                Frame::parse(black_box(&frame)).expect("a frame we just encoded parses");
            let Frame::Pages { entries, .. } = parsed else {
                unreachable!()
            };
            black_box(
                entries
                    .iter()
                    .filter_map(Result::ok)
                    .map(|e| e.payload.len())
                    .sum::<usize>(),
            )
        })
    });
    group.finish();

    let mut group = c.benchmark_group("batch_256");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(256 * PAGE as u64));
    group.bench_function("encode/random_4k", |b| {
        b.iter(|| black_box(encode(&mut out, black_box(42), black_box(&page), 256)))
    });
    group.finish();
}

fn zero_check(c: &mut Criterion) {
    let zero = vec![0u8; PAGE];
    let mut group = c.benchmark_group("is_zero");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(PAGE as u64));
    group.bench_function("zero_4k", |b| b.iter(|| is_zero(black_box(&zero))));
    group.finish();
}

criterion_group!(benches, page_frame, zero_check);
criterion_main!(benches);
