//! Tests of the dirty-page trace format: round trips, every truncation, every flipped byte,
//! forged records behind valid checksums, the writer's input checks, recording a running
//! workload, and replay.

use std::io::Cursor;
use std::ops::ControlFlow;
use std::time::Duration;

use memferry::bitmap::DirtyBitmap;
use memferry::error::HostError;
use memferry::memory::DirtyLog;
use memferry::page::{Geometry, PageSize};
use memferry::time::Nanos;
use memferry_std::demo::{prepare_source, GuestOptions};
use memferry_std::trace::{
    encoding_sizes, inspect, record, record_log, AtEnd, DirtySet, Encoding, ReadLimits,
    RecordError, RecordOptions, ReplayOptions, Speed, TraceError, TraceHeader, TracePart,
    TraceReader, TraceReplay, TraceWriter, CHUNK_PAGES, MAGIC, MAX_DESCRIPTION_LEN,
};
use memferry_std::workload::WorkloadConfig;
use proptest::prelude::*;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

// ---------------------------------------------------------------------------------------------
// Helpers

/// One interval: its sorted dirty pages and its length.
type Interval = (Vec<u64>, Nanos);

/// A small deterministic generator (splitmix64), so sets do not depend on proptest's shrinking.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

fn geometry(page_count: u64) -> Geometry {
    Geometry::new(PageSize::DEFAULT, page_count).unwrap()
}

fn pages_of(map: &DirtyBitmap) -> Vec<u64> {
    map.iter_ones().collect()
}

fn bitmap_of(page_count: u64, pages: &[u64]) -> DirtyBitmap {
    let mut map = DirtyBitmap::new(page_count);
    pages.iter().for_each(|&p| map.set(p));
    map
}

/// A dirty set of one of several shapes: empty, uniform at some density, a run, hot/cold,
/// everything.
fn shaped_set(rng: &mut Rng, page_count: u64, shape: u8) -> Vec<u64> {
    let mut map = DirtyBitmap::new(page_count);
    match shape % 6 {
        0 => {}
        1 => {
            // Uniform, density 2^-k for k in 0..12.
            let k = rng.below(12);
            for p in 0..page_count {
                if rng.next() >> (64 - 12) < (1 << 12) >> k {
                    map.set(p);
                }
            }
        }
        2 => {
            let start = rng.below(page_count);
            let len = rng.below(page_count - start) + 1;
            (start..start + len).for_each(|p| map.set(p));
        }
        3 => {
            let hot = (page_count / 20).max(1);
            for _ in 0..rng.below(2 * page_count) {
                let p = if rng.below(10) < 9 {
                    rng.below(hot)
                } else {
                    rng.below(page_count)
                };
                map.set(p);
            }
        }
        4 => map.fill(),
        _ => {
            for _ in 0..rng.below(8) {
                map.set(rng.below(page_count));
            }
        }
    }
    pages_of(&map)
}

/// Writes a trace of `intervals`, alternating the bitmap and page-list inputs.
fn write_trace(header: &TraceHeader, intervals: &[Interval]) -> Vec<u8> {
    let page_count = header.geometry.page_count();
    let mut writer = TraceWriter::new(Vec::new(), header).unwrap();
    for (i, (pages, duration)) in intervals.iter().enumerate() {
        let map;
        let set = if i % 2 == 0 {
            map = bitmap_of(page_count, pages);
            DirtySet::Bitmap(&map)
        } else {
            DirtySet::SortedPages(pages)
        };
        let written = writer.write_interval_lasting(set, *duration).unwrap();
        assert_eq!(written.dirty_pages, pages.len() as u64);
    }
    let (bytes, totals) = writer.finish().unwrap();
    assert_eq!(totals.bytes, bytes.len() as u64);
    assert_eq!(totals.intervals, intervals.len() as u64);
    bytes
}

/// Reads a whole trace: the header, the intervals read, and the error that stopped it, if any.
fn read_all(bytes: &[u8]) -> (Option<TraceHeader>, Vec<Interval>, Option<TraceError>) {
    let mut reader = match TraceReader::open(bytes) {
        Ok(reader) => reader,
        Err(e) => return (None, Vec::new(), Some(e)),
    };
    let mut map = reader.new_bitmap();
    let mut intervals = Vec::new();
    loop {
        match reader.next_record(&mut map) {
            Ok(Some(record)) => {
                assert_eq!(record.index, intervals.len() as u64);
                assert_eq!(record.dirty_pages, map.count_ones());
                intervals.push((pages_of(&map), record.duration));
            }
            Ok(None) => {
                assert!(reader.is_finished());
                return (Some(reader.header().clone()), intervals, None);
            }
            Err(e) => return (Some(reader.header().clone()), intervals, Some(e)),
        }
    }
}

/// A guest of two full chunks and a partial one, and intervals that use both encodings and
/// every chunk form: empty, sparse (page deltas), full chunks, a bitmap chunk, in-chunk
/// deltas, the very last page.
fn varied_trace() -> (TraceHeader, Vec<Interval>, Vec<u8>) {
    let page_count = 2 * CHUNK_PAGES + 100;
    let header = TraceHeader::new(geometry(page_count), Nanos::from_millis(5))
        .with_description("varied test trace");
    let mut rng = Rng(42);
    let mut dense: Vec<u64> = (0..CHUNK_PAGES).filter(|_| rng.below(3) == 0).collect();
    dense.extend(2 * CHUNK_PAGES..page_count); // the partial last chunk, full
    let intervals = vec![
        (vec![], Nanos::from_millis(5)),
        (vec![3, 5000, page_count - 1], Nanos::from_millis(6)),
        ((0..page_count).collect(), Nanos::from_millis(4)),
        (dense, Nanos::from_millis(5)),
        (
            (CHUNK_PAGES..CHUNK_PAGES + 40).step_by(3).collect(),
            Nanos(1),
        ),
        (vec![page_count - 1], Nanos::from_millis(5)),
    ];
    let bytes = write_trace(&header, &intervals);
    (header, intervals, bytes)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A header's bytes with a valid checksum, for forging.
fn header_bytes(
    page_size: u32,
    page_count: u64,
    interval: u64,
    flags: u16,
    description: &[u8],
) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&page_size.to_le_bytes());
    out.extend_from_slice(&page_count.to_le_bytes());
    out.extend_from_slice(&interval.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&(description.len() as u16).to_le_bytes());
    out.extend_from_slice(description);
    let checksum = xxh3_64(&out);
    out.extend_from_slice(&checksum.to_le_bytes());
    out
}

/// Forges traces with valid checksums around arbitrary contents.
struct Forge {
    bytes: Vec<u8>,
    header_checksum: u64,
    records: u64,
}

impl Forge {
    fn new(page_count: u64) -> Self {
        let bytes = header_bytes(4096, page_count, 1_000_000, 0, b"forged");
        let header_checksum = xxh3_64(&bytes[..bytes.len() - 8]);
        Forge {
            bytes,
            header_checksum,
            records: 0,
        }
    }

    fn record(self, kind: u8, dirty: u64, payload: &[u8]) -> Self {
        self.record_claiming(kind, dirty, payload.len() as u64, payload)
    }

    fn record_claiming(mut self, kind: u8, dirty: u64, payload_len: u64, payload: &[u8]) -> Self {
        let mut record = vec![kind];
        put_varint(&mut record, 1_000_000);
        put_varint(&mut record, dirty);
        put_varint(&mut record, payload_len);
        record.extend_from_slice(payload);
        let seed = self.header_checksum.wrapping_add(self.records);
        let checksum = xxh3_64_with_seed(&record, seed);
        self.bytes.extend_from_slice(&record);
        self.bytes.extend_from_slice(&checksum.to_le_bytes());
        self.records += 1;
        self
    }

    fn end(self, intervals: u64, dirty: u64) -> Vec<u8> {
        let mut bytes = self.bytes;
        let mut end = vec![b'E'];
        end.extend_from_slice(&intervals.to_le_bytes());
        end.extend_from_slice(&dirty.to_le_bytes());
        let seed = self.header_checksum.wrapping_add(self.records);
        let checksum = xxh3_64_with_seed(&end, seed);
        bytes.extend_from_slice(&end);
        bytes.extend_from_slice(&checksum.to_le_bytes());
        bytes
    }
}

fn error_of(bytes: &[u8]) -> TraceError {
    let (_, _, error) = read_all(bytes);
    error.expect("the trace should have been refused")
}

// ---------------------------------------------------------------------------------------------
// Round trips

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_traces_round_trip(
        page_count in 1u64..(3 * CHUNK_PAGES + 200),
        page_shift in 12u32..=21,
        shapes in proptest::collection::vec((any::<u8>(), 0u64..u64::MAX), 0..7),
        description in "\\PC{0,40}",
        start in proptest::option::of(1u64..u64::MAX),
        interval in 1u64..10_000_000_000,
        seed in any::<u64>(),
    ) {
        let page_size = PageSize::new(1 << page_shift).unwrap();
        let mut header = TraceHeader::new(Geometry::new(page_size, page_count).unwrap(), Nanos(interval))
            .with_description(description);
        header.start_unix_nanos = start;
        let mut rng = Rng(seed);
        let intervals: Vec<Interval> = shapes
            .iter()
            .map(|&(shape, duration)| (shaped_set(&mut rng, page_count, shape), Nanos(duration)))
            .collect();
        let bytes = write_trace(&header, &intervals);
        let (read_header, read_intervals, error) = read_all(&bytes);
        prop_assert!(error.is_none(), "{}", error.unwrap());
        prop_assert_eq!(read_header.unwrap(), header);
        prop_assert_eq!(&read_intervals, &intervals);

        let info = inspect(bytes.as_slice()).unwrap();
        prop_assert_eq!(info.intervals, intervals.len() as u64);
        let dirty: u64 = intervals.iter().map(|(p, _)| p.len() as u64).sum();
        prop_assert_eq!(info.dirty_pages, dirty);
    }

    /// The writer's one-pass size accounting is exact: the page-delta size matches a direct
    /// count, the smaller encoding is chosen (ties to chunked), and the record is exactly its
    /// payload plus framing.
    #[test]
    fn the_writer_measures_and_chooses_exactly(
        page_count in 1u64..(5 * CHUNK_PAGES),
        shapes in proptest::collection::vec(any::<u8>(), 1..4),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed);
        let mut map = DirtyBitmap::new(page_count);
        for shape in shapes {
            shaped_set(&mut rng, page_count, shape).into_iter().for_each(|p| map.set(p));
        }
        let mut previous = 0;
        let mut deltas = Vec::new();
        for page in map.iter_ones() {
            put_varint(&mut deltas, page - previous);
            previous = page;
        }
        let sizes = encoding_sizes(&map);
        prop_assert_eq!(sizes.page_deltas, deltas.len());
        let header = TraceHeader::new(geometry(page_count), Nanos(1));
        let mut writer = TraceWriter::new(Vec::new(), &header).unwrap();
        let written = writer.write_interval(&map).unwrap();
        let expected = if sizes.page_deltas < sizes.chunked {
            Encoding::PageDeltas
        } else {
            Encoding::Chunked
        };
        prop_assert_eq!(written.encoding, expected);
        let mut framing = vec![b'C'];
        put_varint(&mut framing, 1);
        put_varint(&mut framing, map.count_ones());
        put_varint(&mut framing, sizes.chosen() as u64);
        prop_assert_eq!(written.bytes, (framing.len() + sizes.chosen() + 8) as u64);
        let pages: Vec<u64> = map.iter_ones().collect();
        prop_assert_eq!(writer.write_interval_pages(&pages).unwrap(), written);
    }

    /// Whatever the bytes, reading returns a value or a typed error, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(
        body in proptest::collection::vec(any::<u8>(), 0..400),
        with_header in any::<bool>(),
    ) {
        let mut bytes = if with_header { header_bytes(4096, 5000, 1000, 0, b"x") } else { Vec::new() };
        bytes.extend_from_slice(&body);
        let _ = read_all(&bytes);
    }

    /// Edits of a valid trace (overwrites, insertions, deletions) never panic and, when they
    /// change anything, are refused.
    #[test]
    fn edited_traces_are_refused_without_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<u8>()), 1..6),
    ) {
        let (_, _, original) = varied_trace();
        let mut bytes = original.clone();
        for (at, op, byte) in edits {
            let i = at.index(bytes.len().max(1));
            match op {
                0 if !bytes.is_empty() => bytes[i] = byte,
                1 => bytes.insert(i.min(bytes.len()), byte),
                _ if !bytes.is_empty() => { bytes.remove(i); }
                _ => {}
            }
        }
        let (_, _, error) = read_all(&bytes);
        if bytes != original {
            prop_assert!(error.is_some());
        }
    }

    /// Payloads with valid checksums reach the decoders: whatever they hold, the reader returns
    /// a typed error or a set inside the guest with the announced number of pages.
    #[test]
    fn forged_payloads_never_panic(
        page_count in 1u64..(3 * CHUNK_PAGES),
        chunked in any::<bool>(),
        dirty in 0u64..40,
        payload in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        let kind = if chunked { b'C' } else { b'D' };
        let bytes = Forge::new(page_count).record(kind, dirty, &payload).end(1, dirty);
        let mut reader = TraceReader::open(bytes.as_slice()).unwrap();
        let mut map = reader.new_bitmap();
        if let Ok(Some(record)) = reader.next_record(&mut map) {
            prop_assert_eq!(record.dirty_pages, dirty);
            prop_assert_eq!(map.count_ones(), dirty);
            prop_assert_eq!(map.len(), page_count);
        }
    }
}

#[test]
fn the_varied_trace_round_trips_and_uses_both_encodings() {
    let (header, intervals, bytes) = varied_trace();
    let (read_header, read_intervals, error) = read_all(&bytes);
    assert!(error.is_none());
    assert_eq!(read_header.unwrap(), header);
    assert_eq!(read_intervals, intervals);

    let mut reader = TraceReader::open(bytes.as_slice()).unwrap();
    let mut map = reader.new_bitmap();
    let mut encodings = Vec::new();
    while let Some(record) = reader.next_record(&mut map).unwrap() {
        encodings.push(record.encoding);
    }
    assert!(encodings.contains(&Encoding::PageDeltas));
    assert!(encodings.contains(&Encoding::Chunked));
    // Every record of the guest fits in a few hundred bytes, and the full guest in a handful.
    assert!(bytes.len() < 1500, "{} bytes", bytes.len());
}

// ---------------------------------------------------------------------------------------------
// Damage

#[test]
fn truncation_at_every_offset_is_reported_as_a_cut() {
    let (header, intervals, bytes) = varied_trace();
    for cut in 0..bytes.len() {
        let (read_header, read_intervals, error) = read_all(&bytes[..cut]);
        let error = error.unwrap_or_else(|| panic!("a trace cut at {cut} was accepted"));
        assert!(
            error.is_truncation(),
            "cut at {cut}: {error} is not reported as a truncation"
        );
        if let Some(read_header) = read_header {
            assert_eq!(read_header, header);
        }
        assert_eq!(read_intervals[..], intervals[..read_intervals.len()]);
        assert!(!error.to_string().is_empty());
    }
}

#[test]
fn every_flipped_byte_is_detected() {
    let (_, _, bytes) = varied_trace();
    for at in 0..bytes.len() {
        for mask in [0x01u8, 0x10, 0x80, 0xff] {
            let mut damaged = bytes.clone();
            damaged[at] ^= mask;
            let (_, _, error) = read_all(&damaged);
            assert!(
                error.is_some(),
                "flipping byte {at} with {mask:#04x} went unnoticed"
            );
        }
    }
}

#[test]
fn swapped_records_fail_their_checksums() {
    let header = TraceHeader::new(geometry(100), Nanos(10));
    let bytes = write_trace(&header, &[(vec![1], Nanos(10)), (vec![2], Nanos(10))]);
    let mut reader = TraceReader::open(bytes.as_slice()).unwrap();
    let mut map = reader.new_bitmap();
    let first_len = reader.next_record(&mut map).unwrap().unwrap().bytes as usize;
    let second_len = reader.next_record(&mut map).unwrap().unwrap().bytes as usize;
    let header_len = 50; // no description
    let (first, second) = bytes[header_len..].split_at(first_len);
    let mut swapped = bytes[..header_len].to_vec();
    swapped.extend_from_slice(&second[..second_len]);
    swapped.extend_from_slice(first);
    swapped.extend_from_slice(&second[second_len..]);
    assert_eq!(swapped.len(), bytes.len());
    assert!(matches!(
        error_of(&swapped),
        TraceError::ChecksumMismatch {
            part: TracePart::Interval(0),
            offset: 50,
        }
    ));
}

#[test]
fn header_defects_have_their_own_errors() {
    assert!(matches!(
        error_of(b""),
        TraceError::Truncated {
            part: TracePart::Header,
            offset: 0
        }
    ));
    assert!(matches!(
        error_of(&MAGIC[..5]),
        TraceError::Truncated { .. }
    ));
    assert!(matches!(error_of(b"hello, world"), TraceError::NotATrace));
    assert!(matches!(
        error_of(b"\x89PNG\r\n\x1a\n...."),
        TraceError::NotATrace
    ));

    let mut newer = header_bytes(4096, 10, 1000, 0, b"");
    newer[8] = 2;
    assert!(matches!(
        error_of(&newer),
        TraceError::UnsupportedVersion { found: 2 }
    ));
    assert!(matches!(
        error_of(&header_bytes(4096, 10, 1000, 4, b"")),
        TraceError::UnsupportedFlags { flags: 4 }
    ));
    let mut long = header_bytes(4096, 10, 1000, 0, b"");
    long[40..42].copy_from_slice(&5000u16.to_le_bytes());
    assert!(matches!(
        error_of(&long),
        TraceError::DescriptionTooLong { len: 5000 }
    ));
    for (bytes, what) in [
        (header_bytes(1000, 10, 1000, 0, b""), "page size"),
        (header_bytes(4096, 0, 1000, 0, b""), "at least one page"),
        (header_bytes(4096, 10, 0, 0, b""), "interval"),
        (header_bytes(4096, 10, 1000, 0, b"\xff\xfe"), "UTF-8"),
    ] {
        let error = error_of(&bytes);
        assert!(matches!(error, TraceError::InvalidHeader(_)), "{error}");
        assert!(error.to_string().contains(what), "{error}");
    }
    let mut damaged = header_bytes(4096, 10, 1000, 0, b"abc");
    damaged[43] ^= 1;
    assert!(matches!(
        error_of(&damaged),
        TraceError::ChecksumMismatch {
            part: TracePart::Header,
            ..
        }
    ));

    let huge = header_bytes(4096, 1 << 40, 1000, 0, b"");
    let limited = TraceReader::open_with_limits(huge.as_slice(), ReadLimits::default());
    assert!(matches!(
        limited.err().unwrap(),
        TraceError::TooManyPages {
            page_count,
            ..
        } if page_count == 1 << 40
    ));
}

#[test]
fn forged_records_get_specific_errors() {
    let pages = 2 * CHUNK_PAGES + 10; // the last chunk holds 10 pages
    let check = |bytes: Vec<u8>, expect: &dyn Fn(&TraceError) -> bool| {
        let error = error_of(&bytes);
        assert!(expect(&error), "unexpected error: {error}");
        assert!(!error.to_string().is_empty());
    };
    // Page deltas.
    let mut beyond = Vec::new();
    put_varint(&mut beyond, pages);
    check(
        Forge::new(pages).record(b'D', 1, &beyond).end(1, 1),
        &|e| matches!(e, TraceError::PageOutOfRange { page, .. } if *page == pages),
    );
    check(Forge::new(pages).record(b'D', 2, &[5, 0]).end(1, 2), &|e| {
        matches!(e, TraceError::UnsortedPages { page: 5, .. })
    });
    check(Forge::new(pages).record(b'D', 3, &[5, 1]).end(1, 3), &|e| {
        matches!(e, TraceError::MalformedRecord { .. })
    });
    check(Forge::new(pages).record(b'D', 1, &[5, 1]).end(1, 1), &|e| {
        matches!(e, TraceError::MalformedRecord { .. })
    });
    check(
        Forge::new(pages)
            .record(
                b'D',
                2,
                &[
                    5, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
                ],
            )
            .end(1, 2),
        &|e| matches!(e, TraceError::PageOutOfRange { .. }),
    );
    check(
        Forge::new(pages).record(b'D', pages + 1, &[]).end(1, 0),
        &|e| matches!(e, TraceError::MalformedRecord { .. }),
    );
    // Chunked: a chunk past the end, the reserved form, a full chunk that is not, a bitmap
    // with a bit past the guest, a bitmap whose count lies, totals that disagree.
    check(
        Forge::new(pages).record(b'C', 1, &[3, 0, 0]).end(1, 1),
        &|e| matches!(e, TraceError::PageOutOfRange { .. }),
    );
    check(Forge::new(pages).record(b'C', 1, &[0, 3]).end(1, 1), &|e| {
        matches!(e, TraceError::MalformedRecord { .. })
    });
    check(
        Forge::new(pages)
            .record(b'C', 2, &[0, 1 << 2 | 2])
            .end(1, 2),
        &|e| matches!(e, TraceError::MalformedRecord { .. }),
    );
    let mut tail_bit = vec![2, 1]; // chunk 2, one page, bitmap
    tail_bit.extend_from_slice(&(1u64 << 10).to_le_bytes());
    check(
        Forge::new(pages).record(b'C', 1, &tail_bit).end(1, 1),
        &|e| matches!(e, TraceError::PageOutOfRange { page, .. } if *page == pages),
    );
    let mut lying_bitmap = vec![2, 1 << 2 | 1]; // chunk 2, two pages, bitmap
    lying_bitmap.extend_from_slice(&1u64.to_le_bytes());
    check(
        Forge::new(pages).record(b'C', 2, &lying_bitmap).end(1, 2),
        &|e| matches!(e, TraceError::MalformedRecord { .. }),
    );
    check(
        Forge::new(pages).record(b'C', 5, &[0, 0, 7]).end(1, 5),
        &|e| matches!(e, TraceError::MalformedRecord { .. }),
    );
    check(
        Forge::new(pages)
            .record(b'C', 2, &[0, 1 << 2, 7, 0])
            .end(1, 2),
        &|e| matches!(e, TraceError::UnsortedPages { page: 7, .. }),
    );
    check(
        Forge::new(pages).record(b'C', 1, &[2, 0, 10]).end(1, 1),
        &|e| matches!(e, TraceError::PageOutOfRange { page, .. } if *page == pages),
    );
    // Framing: an oversized record, an unknown kind, end-marker totals, trailing bytes.
    check(
        Forge::new(pages)
            .record_claiming(b'D', 0, 1 << 30, &[])
            .end(1, 0),
        &|e| matches!(e, TraceError::RecordTooLarge { .. }),
    );
    check(Forge::new(pages).record(b'X', 0, &[]).end(1, 0), &|e| {
        matches!(e, TraceError::UnknownRecordKind { kind: b'X', .. })
    });
    check(Forge::new(pages).record(b'D', 1, &[4]).end(2, 1), &|e| {
        matches!(
            e,
            TraceError::EndMarkerMismatch {
                recorded: 2,
                read: 1,
                ..
            }
        )
    });
    check(Forge::new(pages).record(b'D', 1, &[4]).end(1, 9), &|e| {
        matches!(
            e,
            TraceError::EndMarkerMismatch {
                recorded: 9,
                read: 1,
                ..
            }
        )
    });
    let mut trailing = Forge::new(pages).record(b'D', 1, &[4]).end(1, 1);
    trailing.push(0);
    check(trailing, &|e| matches!(e, TraceError::TrailingData { .. }));

    // The same forge with honest contents is accepted: the forgeries above fail for their
    // contents, not for the forge.
    let honest = Forge::new(pages)
        .record(b'D', 2, &[4, 3])
        .record(b'C', 10, &[2, 9 << 2 | 2])
        .end(2, 12);
    let (_, intervals, error) = read_all(&honest);
    assert!(error.is_none(), "{}", error.unwrap());
    assert_eq!(intervals[0].0, vec![4, 7]);
    assert_eq!(intervals[1].0, (2 * CHUNK_PAGES..pages).collect::<Vec<_>>());
}

#[test]
fn an_unfinished_trace_reports_its_missing_end_marker() {
    let header = TraceHeader::new(geometry(1000), Nanos(10));
    let mut bytes = Vec::new();
    {
        let mut writer = TraceWriter::new(&mut bytes, &header).unwrap();
        for page in 0..3 {
            writer.write_interval_pages(&[page]).unwrap();
        }
        // Dropped without `finish`: a recorder killed mid-run.
    }
    let (_, intervals, error) = read_all(&bytes);
    assert_eq!(intervals.len(), 3);
    let error = error.unwrap();
    assert!(matches!(
        error,
        TraceError::MissingEndMarker { intervals: 3, .. }
    ));
    assert!(error.is_truncation());
    assert!(
        error.to_string().contains("without its end marker"),
        "{error}"
    );
}

#[test]
fn a_reader_is_spent_after_an_error() {
    let (_, _, mut bytes) = varied_trace();
    let last = bytes.len() - 30;
    bytes[last] ^= 0x40;
    let mut reader = TraceReader::open(bytes.as_slice()).unwrap();
    let mut map = reader.new_bitmap();
    let mut outcome = Ok(true);
    while let Ok(true) = outcome {
        outcome = reader.next_interval(&mut map);
    }
    assert!(outcome.is_err());
    assert!(!reader.next_interval(&mut map).unwrap());
    assert!(!reader.is_finished());
}

#[test]
fn a_wrong_sized_bitmap_is_an_error_not_a_panic() {
    let (_, _, bytes) = varied_trace();
    let mut reader = TraceReader::open(bytes.as_slice()).unwrap();
    let mut small = DirtyBitmap::new(10);
    assert!(matches!(
        reader.next_interval(&mut small),
        Err(TraceError::WrongBitmapLength { found: 10, .. })
    ));
    // The reader is still usable with the right bitmap.
    let mut map = reader.new_bitmap();
    assert!(reader.next_interval(&mut map).unwrap());
}

// ---------------------------------------------------------------------------------------------
// Writer

#[test]
fn the_writer_refuses_bad_input_and_writes_nothing_for_it() {
    let header = TraceHeader::new(geometry(100), Nanos(10));
    let mut writer = TraceWriter::new(Vec::new(), &header).unwrap();
    fn invalid<T>(result: std::io::Result<T>) {
        let error = result.err().expect("the writer should refuse this");
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{error}");
    }
    invalid(writer.write_interval_pages(&[5, 3]));
    invalid(writer.write_interval_pages(&[5, 5]));
    invalid(writer.write_interval_pages(&[100]));
    invalid(writer.write_interval(&DirtyBitmap::new(99)));
    writer.write_interval_pages(&[0, 99]).unwrap();
    let (bytes, totals) = writer.finish().unwrap();
    assert_eq!(totals.intervals, 1);
    let (_, intervals, error) = read_all(&bytes);
    assert!(error.is_none());
    assert_eq!(intervals, vec![(vec![0, 99], Nanos(10))]);

    let long = TraceHeader::new(geometry(100), Nanos(10))
        .with_description("x".repeat(MAX_DESCRIPTION_LEN + 1));
    invalid(TraceWriter::new(Vec::new(), &long));
    let longest = long.with_description("é".repeat(MAX_DESCRIPTION_LEN / 2));
    let bytes = TraceWriter::new(Vec::new(), &longest)
        .unwrap()
        .finish()
        .unwrap()
        .0;
    assert_eq!(read_all(&bytes).0.unwrap(), longest);
    invalid(TraceWriter::new(
        Vec::new(),
        &TraceHeader::new(geometry(100), Nanos(0)),
    ));
}

#[test]
fn the_writer_picks_the_smaller_encoding() {
    let mut rng = Rng(9);
    /// Whether page `p` is dirty, drawn from the generator.
    type Draw = Box<dyn Fn(&mut Rng, u64) -> bool>;
    let cases: [(&str, u64, Draw, Encoding); 4] = [
        (
            "uniform 0.05%",
            1 << 20,
            Box::new(|r, _| r.below(2000) == 0),
            Encoding::PageDeltas,
        ),
        (
            "uniform 1%",
            1 << 18,
            Box::new(|r, _| r.below(100) == 0),
            Encoding::PageDeltas,
        ),
        (
            "hot 5% mostly dirty",
            1 << 18,
            Box::new(|r, p| {
                if p < (1 << 18) / 20 {
                    r.below(10) < 7
                } else {
                    r.below(200) == 0
                }
            }),
            Encoding::Chunked,
        ),
        (
            "uniform 50%",
            1 << 18,
            Box::new(|r, _| r.below(2) == 0),
            Encoding::Chunked,
        ),
    ];
    for (name, page_count, dirty, expected) in cases {
        let mut map = DirtyBitmap::new(page_count);
        for p in 0..page_count {
            if dirty(&mut rng, p) {
                map.set(p);
            }
        }
        let sizes = encoding_sizes(&map);
        let header = TraceHeader::new(geometry(page_count), Nanos(1));
        let mut writer = TraceWriter::new(Vec::new(), &header).unwrap();
        let written = writer.write_interval(&map).unwrap();
        assert_eq!(written.encoding, expected, "{name}: {sizes:?}");
        // The record is the chosen payload plus at most 1 + 3 varints + 8 bytes of framing.
        let payload = sizes.chosen() as u64;
        assert!(
            written.bytes > payload && written.bytes <= payload + 1 + 30 + 8,
            "{name}: {written:?} for {sizes:?}"
        );
        // Never worse than a raw bitmap by more than the chunk headers.
        assert!(sizes.chosen() as u64 <= page_count / 8 + 3 * page_count / CHUNK_PAGES);
    }
}

// ---------------------------------------------------------------------------------------------
// Recording

#[test]
fn records_a_running_workload() {
    let options = GuestOptions {
        memory: 16 << 20,
        zero_fraction: 0.1,
        workload: Some(WorkloadConfig {
            writes_per_sec: 200_000,
            hot_fraction: 0.05,
            hot_share: 0.9,
            seed: 7,
        }),
        ..GuestOptions::default()
    };
    let mut source = prepare_source(&options, 1).unwrap();
    let page_count = source.region().geometry().page_count();
    let mut bytes = Vec::new();
    let mut record_options =
        RecordOptions::new(Duration::from_millis(5), Duration::from_millis(100));
    record_options.description = "test: 16 MiB hot/cold workload".into();
    let summary = record(&mut source, &record_options, &mut bytes).unwrap();
    assert_eq!(summary.intervals, 20);
    assert_eq!(summary.file_bytes, bytes.len() as u64);
    assert!(summary.dirty_pages > 0);

    let mut reader = TraceReader::open(bytes.as_slice()).unwrap();
    let header = reader.header().clone();
    assert_eq!(header.geometry, source.region().geometry());
    assert_eq!(header.interval, Nanos::from_millis(5));
    assert_eq!(header.description, record_options.description);
    assert!(header.start_unix_nanos.is_some());

    let hot_pages = page_count / 20;
    let (mut intervals, mut dirty, mut hot, mut duration) = (0u64, 0u64, 0u64, 0u64);
    let mut map = reader.new_bitmap();
    while let Some(record) = reader.next_record(&mut map).unwrap() {
        intervals += 1;
        dirty += record.dirty_pages;
        duration += record.duration.0;
        assert!(map.iter_ones().all(|p| p < page_count));
        hot += map.iter_ones().filter(|&p| p < hot_pages).count() as u64;
    }
    assert_eq!(intervals, 20);
    assert_eq!(dirty, summary.dirty_pages);
    // Each interval sees ~1000 writes, 90% of them into 5% of the pages: the hot set dominates
    // (a loaded machine may slow the workload, never change where it writes).
    assert!(
        hot * 10 >= dirty * 3,
        "{hot} of {dirty} dirty pages are hot"
    );
    // Deadlines are absolute: the intervals add up to at least the 100 ms asked for.
    assert!(duration >= Nanos::from_millis(99).0, "{duration} ns");
}

/// A dirty log that reports pages {k, k + 1} on its k-th sync (k from 1; sync 0 is the
/// recorder's initial sync, which must be discarded).
struct CountingLog {
    syncs: u64,
}

impl DirtyLog for CountingLog {
    fn sync_region(
        &mut self,
        _region: &memferry::page::Region,
        _first_page: u64,
        into: &mut DirtyBitmap,
    ) -> Result<(), HostError> {
        if self.syncs == 0 {
            into.set(0); // written before the recording started
        } else {
            into.set(self.syncs);
            into.set(self.syncs + 1);
        }
        self.syncs += 1;
        Ok(())
    }
}

#[test]
fn record_log_writes_what_each_sync_returned_and_can_stop_early() {
    let mut log = CountingLog { syncs: 0 };
    let mut bytes = Vec::new();
    let mut seen = Vec::new();
    let options = RecordOptions::new(Duration::from_micros(200), Duration::from_millis(10));
    let summary = record_log(&mut log, geometry(64), &options, &mut bytes, |sample| {
        assert_eq!(sample.planned, 50);
        seen.push(sample.dirty_pages);
        if sample.index == 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!(summary.intervals, 4);
    assert_eq!(summary.dirty_pages, 8);
    assert_eq!(summary.max_dirty_pages, 2);
    assert_eq!(seen, vec![2; 4]);
    let (_, intervals, error) = read_all(&bytes);
    assert!(error.is_none());
    let pages: Vec<Vec<u64>> = intervals.into_iter().map(|(p, _)| p).collect();
    assert_eq!(pages, vec![vec![1, 2], vec![2, 3], vec![3, 4], vec![4, 5]]);
}

#[test]
fn record_refuses_meaningless_options() {
    let mut log = CountingLog { syncs: 0 };
    for options in [
        RecordOptions::new(Duration::ZERO, Duration::from_secs(1)),
        RecordOptions::new(Duration::from_secs(2), Duration::from_secs(1)),
        RecordOptions {
            description: "x".repeat(MAX_DESCRIPTION_LEN + 1),
            ..RecordOptions::new(Duration::from_millis(1), Duration::from_millis(1))
        },
    ] {
        let result = record_log(&mut log, geometry(8), &options, Vec::new(), |_| {
            ControlFlow::Continue(())
        });
        assert!(
            matches!(result, Err(RecordError::InvalidOptions(_))),
            "{options:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Replay

fn three_interval_trace() -> (Vec<Interval>, Vec<u8>) {
    let intervals = vec![
        (vec![1, 2, 3, 4], Nanos(100)),
        (vec![], Nanos(50)),
        (vec![7], Nanos(200)),
    ];
    let header = TraceHeader::new(geometry(10), Nanos(100));
    let bytes = write_trace(&header, &intervals);
    (intervals, bytes)
}

#[test]
fn replay_yields_each_interval_once_then_stops() {
    let (intervals, bytes) = three_interval_trace();
    let mut replay = TraceReplay::open(Cursor::new(bytes), AtEnd::Stop).unwrap();
    let mut start = 0;
    for (i, (pages, duration)) in intervals.iter().enumerate() {
        let interval = replay.next_interval().unwrap().unwrap();
        assert_eq!((interval.lap, interval.index), (0, i as u64));
        assert_eq!(interval.start, Nanos(start));
        assert_eq!(interval.duration, *duration);
        assert_eq!(&pages_of(interval.dirty), pages);
        start += duration.0;
    }
    assert!(replay.next_interval().unwrap().is_none());
    assert!(replay.next_interval().unwrap().is_none());
}

#[test]
fn replay_loops_with_time_running_on() {
    let (intervals, bytes) = three_interval_trace();
    let mut replay = TraceReplay::open(Cursor::new(bytes), AtEnd::Loop).unwrap();
    let lap_length: u64 = intervals.iter().map(|(_, d)| d.0).sum();
    for step in 0..10u64 {
        let (lap, index) = (step / 3, step % 3);
        let interval = replay.next_interval().unwrap().unwrap();
        assert_eq!((interval.lap, interval.index), (lap, index));
        let before: u64 = intervals[..index as usize].iter().map(|(_, d)| d.0).sum();
        assert_eq!(interval.start, Nanos(lap * lap_length + before));
        assert_eq!(&pages_of(interval.dirty), &intervals[index as usize].0);
    }
    assert_eq!(replay.laps(), 3);
}

#[test]
fn replay_rewinds_a_trace_that_does_not_start_the_stream() {
    let (intervals, bytes) = three_interval_trace();
    let mut embedded = b"prefix".to_vec();
    embedded.extend_from_slice(&bytes);
    let mut input = Cursor::new(embedded);
    input.set_position(6);
    let mut replay = TraceReplay::open(input, AtEnd::Loop).unwrap();
    for step in 0..7 {
        let interval = replay.next_interval().unwrap().unwrap();
        assert_eq!(&pages_of(interval.dirty), &intervals[step % 3].0);
    }
}

#[test]
fn a_damaged_interval_ends_a_looping_replay() {
    let (_, mut bytes) = three_interval_trace();
    let last_record_checksum = bytes.len() - 25 - 1;
    bytes[last_record_checksum] ^= 1;
    let mut replay = TraceReplay::open(Cursor::new(bytes), AtEnd::Loop).unwrap();
    assert!(replay.next_interval().unwrap().is_some());
    assert!(replay.next_interval().unwrap().is_some());
    assert!(matches!(
        replay.next_interval(),
        Err(TraceError::ChecksumMismatch {
            part: TracePart::Interval(2),
            ..
        })
    ));
    assert!(replay.next_interval().unwrap().is_none());
    assert!(replay
        .advance(Nanos(0), Nanos(u64::MAX), |_| panic!(
            "no writes after an error"
        ))
        .is_ok());
}

#[test]
fn replay_of_an_empty_or_timeless_trace_ends_even_when_looping() {
    let header = TraceHeader::new(geometry(10), Nanos(100));
    let empty = write_trace(&header, &[]);
    let mut replay = TraceReplay::open(Cursor::new(empty), AtEnd::Loop).unwrap();
    assert!(replay.next_interval().unwrap().is_none());

    let timeless = write_trace(&header, &[(vec![1], Nanos(0)), (vec![2], Nanos(0))]);
    let mut replay = TraceReplay::open(Cursor::new(timeless), AtEnd::Loop).unwrap();
    let mut written = Vec::new();
    replay
        .advance(Nanos(0), Nanos(1_000), |p| written.push(p))
        .unwrap();
    assert_eq!(written, vec![1, 2]);
}

#[test]
fn advance_spreads_each_interval_across_its_length() {
    let (_, bytes) = three_interval_trace();
    let mut replay = TraceReplay::open(Cursor::new(bytes), AtEnd::Stop).unwrap();
    // Step 10 ns at a time; note when each page is written.
    let mut writes = Vec::new();
    for step in 0..40u64 {
        let (from, to) = (Nanos(step * 10), Nanos(step * 10 + 10));
        replay
            .advance(from, to, |p| writes.push((from.0, p)))
            .unwrap();
    }
    // Interval 0 (0..100 ns) spreads 4 pages at 0, 25, 50, 75 ns; interval 1 is empty;
    // interval 2 (150..350 ns) writes page 7 at its start.
    assert_eq!(writes, vec![(0, 1), (20, 2), (50, 3), (70, 4), (150, 7)]);

    // One big step gives the same writes, in the same order.
    let (_, bytes) = three_interval_trace();
    let mut replay = TraceReplay::open(Cursor::new(bytes), AtEnd::Stop).unwrap();
    let mut all = Vec::new();
    replay
        .advance(Nanos(0), Nanos(10_000), |p| all.push(p))
        .unwrap();
    assert_eq!(all, vec![1, 2, 3, 4, 7]);
}

#[test]
fn advance_loops_too() {
    let (_, bytes) = three_interval_trace();
    let mut replay = TraceReplay::open(Cursor::new(bytes), AtEnd::Loop).unwrap();
    let mut all = Vec::new();
    // Two laps are 700 ns; the third lap's first interval starts at 700.
    replay
        .advance(Nanos(0), Nanos(701), |p| all.push(p))
        .unwrap();
    assert_eq!(all, vec![1, 2, 3, 4, 7, 1, 2, 3, 4, 7, 1]);
}

fn windowed(at_end: AtEnd, start: u64, length: Option<u64>, speed: f64) -> ReplayOptions {
    ReplayOptions {
        at_end,
        start: Nanos(start),
        length: length.map(Nanos),
        speed: Speed::new(speed).unwrap(),
    }
}

/// Every write of `replay` in replay time `[0, until)`, with the time it was made, stepping
/// one nanosecond at a time.
fn timed_writes<R: std::io::Read + std::io::Seek>(
    replay: &mut TraceReplay<R>,
    until: u64,
) -> Vec<(u64, u64)> {
    let mut writes = Vec::new();
    for t in 0..until {
        replay
            .advance(Nanos(t), Nanos(t + 1), |p| writes.push((t, p)))
            .unwrap();
    }
    writes
}

#[test]
fn a_window_cuts_intervals_where_their_writes_fall() {
    // Recorded time 50..250 ns: of interval 0 (0..100 ns, pages 1-4 due at 0, 25, 50, 75) the
    // writes at 50 and 75 (pages 3, 4); interval 1 (empty); of interval 2 (150..350, page 7 due
    // at 150) all. Replay time 0 is recorded time 50.
    let (_, bytes) = three_interval_trace();
    let options = windowed(AtEnd::Stop, 50, Some(200), 1.0);
    let mut replay =
        TraceReplay::open_with_options(Cursor::new(bytes.clone()), options, ReadLimits::default())
            .unwrap();
    assert_eq!(
        timed_writes(&mut replay, 1000),
        vec![(0, 3), (25, 4), (100, 7)]
    );

    let mut replay =
        TraceReplay::open_with_options(Cursor::new(bytes), options, ReadLimits::default()).unwrap();
    let mut seen = Vec::new();
    while let Some(i) = replay.next_interval().unwrap() {
        seen.push((i.index, i.start.0, i.duration.0, pages_of(i.dirty)));
    }
    assert_eq!(
        seen,
        vec![
            (0, 0, 50, vec![3, 4]),
            (1, 50, 50, vec![]),
            (2, 100, 100, vec![7]),
        ]
    );
    assert_eq!(options.plan(Nanos(350)).pass, Nanos(200));
}

#[test]
fn a_window_loops_only_when_asked_and_scales_with_the_speed() {
    let (_, bytes) = three_interval_trace();
    // At twice the speed the 200 ns window lasts 100 ns: writes at 0, 12.5 (rounded to 13)
    // and 50, then again from 100.
    let looping = windowed(AtEnd::Loop, 50, Some(200), 2.0);
    let mut replay =
        TraceReplay::open_with_options(Cursor::new(bytes.clone()), looping, ReadLimits::default())
            .unwrap();
    assert_eq!(
        timed_writes(&mut replay, 201),
        vec![
            (0, 3),
            (13, 4),
            (50, 7),
            (100, 3),
            (113, 4),
            (150, 7),
            (200, 3)
        ]
    );
    assert_eq!(replay.laps(), 2);
    let plan = looping.plan(Nanos(350));
    assert_eq!(plan.pass, Nanos(100));
    assert_eq!(plan.passes(Nanos(250)), 2.5);
    assert_eq!(plan.idle_after_end(Nanos(250)), Nanos::ZERO);

    // The same window once: three writes, then nothing.
    let once = ReplayOptions {
        at_end: AtEnd::Stop,
        ..looping
    };
    let mut replay =
        TraceReplay::open_with_options(Cursor::new(bytes.clone()), once, ReadLimits::default())
            .unwrap();
    assert_eq!(timed_writes(&mut replay, 400).len(), 3);
    let plan = once.plan(Nanos(350));
    assert_eq!(plan.passes(Nanos(250)), 1.0);
    assert_eq!(plan.idle_after_end(Nanos(250)), Nanos(150));

    // Half speed: the whole trace, each write at twice its recorded time.
    let slow = windowed(AtEnd::Stop, 0, None, 0.5);
    let mut replay =
        TraceReplay::open_with_options(Cursor::new(bytes), slow, ReadLimits::default()).unwrap();
    assert_eq!(
        timed_writes(&mut replay, 1000),
        vec![(0, 1), (50, 2), (100, 3), (150, 4), (300, 7)]
    );
    assert_eq!(slow.plan(Nanos(350)).pass, Nanos(700));
}

#[test]
fn a_window_past_the_recording_replays_nothing_even_looping() {
    let (_, bytes) = three_interval_trace();
    for start in [350, 400] {
        let options = windowed(AtEnd::Loop, start, Some(100), 1.0);
        let mut replay = TraceReplay::open_with_options(
            Cursor::new(bytes.clone()),
            options,
            ReadLimits::default(),
        )
        .unwrap();
        replay
            .advance(Nanos(0), Nanos(u64::MAX), |p| panic!("wrote page {p}"))
            .unwrap();
        assert!(replay.next_interval().unwrap().is_none());
        assert_eq!(options.plan(Nanos(350)).pass, Nanos::ZERO);
    }
    assert!(Speed::new(0.0).is_none());
    assert!(Speed::new(-1.0).is_none());
    assert!(Speed::new(f64::NAN).is_none());
    assert!(Speed::new(f64::INFINITY).is_none());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// A window replays exactly the writes of the whole replay that fall inside it, each moved
    /// back by the window's start, whatever the step sizes of the caller.
    #[test]
    fn a_window_is_the_whole_replay_cut_and_shifted(
        intervals in prop::collection::vec(
            (prop::collection::btree_set(0u64..40, 0..8), 0u64..60),
            1..6,
        ),
        start in 0u64..200,
        length in 1u64..200,
        steps in prop::collection::vec(1u64..40, 1..20),
    ) {
        let intervals: Vec<Interval> = intervals
            .into_iter()
            .map(|(pages, d)| (pages.into_iter().collect(), Nanos(d)))
            .collect();
        let total: u64 = intervals.iter().map(|(_, d)| d.0).sum();
        prop_assume!(start < total);
        let bytes = write_trace(&TraceHeader::new(geometry(40), Nanos(10)), &intervals);
        // Expected: write k of an interval of n pages at a + d*k/n, inside [start, start+length).
        let mut expected = Vec::new();
        let mut a = 0;
        for (pages, d) in &intervals {
            for (k, &page) in pages.iter().enumerate() {
                let due = a + (d.0 as u128 * k as u128 / pages.len() as u128) as u64;
                if (start..start + length).contains(&due) {
                    expected.push((due - start, page));
                }
            }
            a += d.0;
        }
        let options = windowed(AtEnd::Stop, start, Some(length), 1.0);
        let mut replay = TraceReplay::open_with_options(
            Cursor::new(bytes),
            options,
            ReadLimits::default(),
        )
        .unwrap();
        // Uneven steps: each write must land in the step that contains its time.
        let mut got = Vec::new();
        let mut t = 0;
        for step in steps.iter().cycle().take(400) {
            let next = t + step;
            let mut in_step = Vec::new();
            replay.advance(Nanos(t), Nanos(next), |p| in_step.push(p)).unwrap();
            let due_here: Vec<u64> = expected
                .iter()
                .filter(|(due, _)| (t..next).contains(due))
                .map(|&(_, p)| p)
                .collect();
            prop_assert_eq!(&in_step, &due_here, "step {}..{}", t, next);
            got.extend(in_step);
            t = next;
            if t > total + length {
                break;
            }
        }
        prop_assert_eq!(got.len(), expected.len());
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// Sets like the ones the module docs measure, built with the in-process workload's pattern.
fn measured_sets() -> Vec<(&'static str, DirtyBitmap)> {
    fn uniform(pages: u64, dirty: u64, seed: u64) -> DirtyBitmap {
        let mut rng = Rng(seed);
        let mut map = DirtyBitmap::new(pages);
        while map.count_ones() < dirty {
            for _ in 0..dirty - map.count_ones() {
                map.set(rng.below(pages));
            }
        }
        map
    }
    fn hot_cold(pages: u64, writes: u64, seed: u64) -> DirtyBitmap {
        let mut rng = Rng(seed);
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
    fn hot_cold_until(pages: u64, dirty: u64, seed: u64) -> DirtyBitmap {
        let mut rng = Rng(seed);
        let mut map = DirtyBitmap::new(pages);
        let hot = pages / 20;
        let mut count = 0;
        while count < dirty {
            let page = if rng.below(10) < 9 {
                rng.below(hot)
            } else {
                rng.below(pages)
            };
            if !map.get(page) {
                map.set(page);
                count += 1;
            }
        }
        map
    }
    let g = 1u64 << 18;
    let mut phase = uniform(g, g / 100, 13);
    (50_000..50_000 + g / 10).for_each(|p| phase.set(p));
    let mut sweep = DirtyBitmap::new(g);
    (1000..1000 + g / 10).for_each(|p| sweep.set(p));
    let big = 1u64 << 28;
    vec![
        ("uniform 0.1% of 2^18", uniform(g, g / 1000, 5)),
        ("uniform 1% of 2^18", uniform(g, g / 100, 1)),
        ("hot/cold 1% of 2^18", hot_cold_until(g, g / 100, 2)),
        ("workload 100 ms (20k writes)", hot_cold(g, 20_000, 3)),
        ("workload 1 s (200k writes)", hot_cold(g, 200_000, 4)),
        ("uniform 10% of 2^18", uniform(g, g / 10, 7)),
        ("uniform 20% of 2^18", uniform(g, g / 5, 9)),
        ("uniform 50% of 2^18", uniform(g, g / 2, 10)),
        ("sweep 10% + uniform 1%", phase),
        ("sweep 10%", sweep),
        ("uniform 0.01% of 2^28", uniform(big, big / 10_000, 11)),
        ("hot/cold 1% of 2^28", hot_cold_until(big, big / 100, 12)),
    ]
}

/// Prints the encoder's sizes for the sets the module docs measure:
/// `cargo test -p memferry-std --test trace -- --ignored --nocapture encoding_table`.
#[test]
#[ignore = "prints measurements; slow (builds 2^28-page sets)"]
fn encoding_table() {
    println!("| dirty set | pages | dirty | raw bitmap | page deltas | chunked | chosen |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (name, map) in measured_sets() {
        let sizes = encoding_sizes(&map);
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} |",
            map.len(),
            map.count_ones(),
            map.len() / 8,
            sizes.page_deltas,
            sizes.chunked,
            sizes.chosen()
        );
    }
}
