//! Wire-format benchmarks: the per-page cost of the frame layer, which every page of a
//! migration pays once on each side.
//!
//! - `page_frame/encode`: [`PageFrameWriter::write`] copying a 4 KiB page into a reused output
//!   buffer (zero check and xxh3 checksum included), for a random page and for a zero page.
//! - `page_frame/decode`: [`Frame::parse`] of the random page's frame (checksum verified).
//! - `is_zero`: [`is_zero`] over a 4 KiB zero page, the worst case (every byte is read).
//!
//! Throughput is in bytes of page (encode, `is_zero`) or of frame (decode).

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use memferry::wire::{is_zero, page_frame_len, Frame, PageEncoding, PageFrameWriter};

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

/// Appends one page frame for `page` to `out`, as the pre-copy engine does.
fn encode(out: &mut Vec<u8>, index: u64, page: &[u8]) -> (usize, PageEncoding) {
    PageFrameWriter::write(out, index, page.len(), |buf| {
        buf.copy_from_slice(page);
        Ok::<(), Infallible>(())
    })
    .unwrap_or_else(|never| match never {})
}

fn page_frame(c: &mut Criterion) {
    let page = random_page();
    let zero = vec![0u8; PAGE];
    let mut out = Vec::with_capacity(page_frame_len(PAGE));

    let mut group = c.benchmark_group("page_frame");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(PAGE as u64));
    group.bench_function("encode/random_4k", |b| {
        b.iter(|| {
            out.clear();
            black_box(encode(&mut out, black_box(42), black_box(&page)))
        })
    });
    group.bench_function("encode/zero_4k", |b| {
        b.iter(|| {
            out.clear();
            black_box(encode(&mut out, black_box(42), black_box(&zero)))
        })
    });

    let mut frame = Vec::new();
    let (len, encoding) = encode(&mut frame, 42, &page);
    assert_eq!((len, encoding), (page_frame_len(PAGE), PageEncoding::Raw));
    group.throughput(Throughput::Bytes(len as u64));
    group.bench_function("decode/random_4k", |b| {
        b.iter(|| {
            let parsed = Frame::parse(black_box(&frame));
            black_box(parsed.expect("a frame we just encoded parses"))
        })
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
