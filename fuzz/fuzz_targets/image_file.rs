//! Fuzzes memory image files ([`memferry_std::image`]): arbitrary bytes written to a file (and,
//! optionally, to its journal) are opened as an image, and every page of an image that opens is
//! read, restored, saved again and reopened.
//!
//! The first input byte picks the mode:
//! - bit 0: lay the image out: the input's image part is the header; the page table follows at
//!   the table offset the header names and the file gets the length the header implies (up to
//!   16 MiB, sparse), so inputs far shorter than an image still reach the table and page checks;
//! - bit 1: recompute the header checksum, bit 2 the page-table checksum, so that the checks
//!   behind them are fuzzed as well;
//! - bit 3: a journal follows: the next two bytes (LE) are the image part's length, the rest is
//!   the journal's bytes; bit 4: give the journal valid record hashes, chain and commit tail, so
//!   that replaying a committed hostile journal is fuzzed.
//!
//! Checks: nothing panics and every error prints; an image that opens has a table consistent
//! with what reading it gives (data pages are the table's set bits; a restore writes each of
//! them once), and an incremental save on it reopens to the memory saved.

#![no_main]

use std::fs;
use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use memferry::bitmap::DirtyBitmap;
use memferry::error::HostError;
use memferry::memory::{PageRead, PageWrite};
use memferry::page::PageIndex;
use memferry_std::image::{self, Image, Limits};
use xxhash_rust::xxh3::xxh3_128;

/// The largest file the layout mode makes.
const MAX_LAID_OUT: u64 = 16 << 20;

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes(s.try_into().unwrap()))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map_or(0, |s| u64::from_le_bytes(s.try_into().unwrap()))
}

/// The header checksum: xxh3-128 of `[0, 112)` and the region table, at `[112, 128)`.
fn fix_header(b: &mut [u8]) {
    if b.len() < 128 {
        return;
    }
    let regions = (u32_at(b, 20) as usize).min(4096);
    let end = (128 + 24 * regions).min(b.len());
    let mut covered = b[..112].to_vec();
    covered.extend_from_slice(&b[128..end]);
    b[112..128].copy_from_slice(&xxh3_128(&covered).to_le_bytes());
}

/// Valid record hashes, chain and commit tail for a journal's bytes, as the format says, and
/// the new header's table checksum for the table that applying it to `image` gives.
fn fix_journal(j: &mut [u8], image: &[u8]) {
    let len = j.len();
    if len < 64 + 56 + 128 {
        return;
    }
    j[0..8].copy_from_slice(b"MFRYJNL\0");
    j[8..12].copy_from_slice(&1u32.to_le_bytes());
    let shift = u32::from(j[56]).clamp(12, 21);
    let page = 1usize << shift;
    let h = (u64_at(j, len - 40) as usize).min(len - 64 - 56);
    let records_end = len - 56 - h;
    let mut chain = xxh3_128(&j[..64]);
    let (mut at, mut count) = (64usize, 0u64);
    let mut records = Vec::new();
    while at + 32 <= records_end {
        let data = j[at + 8] == 1;
        records.push((u64_at(j, at), data));
        if data && at + 32 + page > records_end {
            break;
        }
        let hash = if data {
            xxh3_128(&j[at + 32..at + 32 + page])
        } else {
            0
        };
        j[at + 16..at + 32].copy_from_slice(&hash.to_le_bytes());
        let mut link = chain.to_le_bytes().to_vec();
        link.extend_from_slice(&j[at..at + 32]);
        chain = xxh3_128(&link);
        at += 32 + if data { page } else { 0 };
        count += 1;
    }
    let header = &mut j[records_end..len - 56];
    let (table_offset, table_len) = (u64_at(header, 64), u64_at(header, 72));
    if header.len() >= 128 && table_len <= MAX_LAID_OUT {
        let mut table = vec![0u8; table_len as usize];
        let start = (table_offset as usize).min(image.len());
        let end = start.saturating_add(table.len()).min(image.len());
        table[..end - start].copy_from_slice(&image[start..end]);
        for (page, data) in records {
            if let Some(b) = table.get_mut((page / 8) as usize) {
                if data {
                    *b |= 1 << (page % 8);
                } else {
                    *b &= !(1 << (page % 8));
                }
            }
        }
        header[88..104].copy_from_slice(&xxh3_128(&table).to_le_bytes());
    }
    fix_header(header);
    let tail = len - 56;
    j[tail..tail + 8].copy_from_slice(b"MFRYCMT\0");
    j[tail + 8..tail + 16].copy_from_slice(&count.to_le_bytes());
    j[tail + 16..tail + 24].copy_from_slice(&(h as u64).to_le_bytes());
    j[tail + 24..tail + 40].copy_from_slice(&chain.to_le_bytes());
    let mut covered = j[records_end..tail].to_vec();
    covered.extend_from_slice(&j[tail..tail + 40]);
    let sum = xxh3_128(&covered);
    j[tail + 40..tail + 56].copy_from_slice(&sum.to_le_bytes());
}

/// Memory that checks what a restore writes.
struct Sink {
    page_size: usize,
    pages: u64,
    writes: u64,
}

impl PageWrite for Sink {
    fn write_page(&mut self, page: PageIndex, data: &[u8]) -> Result<(), HostError> {
        assert!(page.0 < self.pages, "restore wrote outside the guest");
        assert_eq!(data.len(), self.page_size);
        self.writes += 1;
        Ok(())
    }
}

/// Memory whose page `p` is filled with `p as u8 | 1`.
struct Pattern;

impl PageRead for Pattern {
    fn read_page(&mut self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError> {
        buf.fill(page.0 as u8 | 1);
        Ok(())
    }
}

fn scratch() -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!("memferry-fuzz-image-{}.img", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (image_part, journal) = if mode & 8 != 0 {
        if rest.len() < 2 {
            return;
        }
        let split = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let (i, j) = rest[2..].split_at(split);
        (i, Some(j))
    } else {
        (rest, None)
    };
    let mut file = image_part.to_vec();
    let mut length = None;
    if mode & 1 != 0 && file.len() >= 128 {
        let header_len = (128 + 24 * (u32_at(&file, 20) as usize).min(4096)).min(file.len());
        let (table_offset, table_len, data_offset) =
            (u64_at(&file, 64), u64_at(&file, 72), u64_at(&file, 80));
        let pages = u64_at(&file, 24);
        let page_size = 1u64 << u32::from(file[16]).min(21);
        let total = pages
            .checked_mul(page_size)
            .and_then(|d| d.checked_add(data_offset));
        if table_offset >= header_len as u64
            && table_offset.saturating_add(table_len) <= MAX_LAID_OUT
        {
            let table = file[header_len..].to_vec();
            file.truncate(header_len);
            file.resize(table_offset as usize, 0);
            let mut table = table;
            table.resize(table_len as usize, 0);
            if mode & 4 != 0 {
                file[88..104].copy_from_slice(&xxh3_128(&table).to_le_bytes());
            }
            file.extend_from_slice(&table);
            length = total.filter(|&t| t <= MAX_LAID_OUT && t >= file.len() as u64);
        }
    }
    if mode & 2 != 0 {
        fix_header(&mut file);
    }
    let path = scratch();
    let journal_path = image::journal_path(&path);
    fs::write(&path, &file).unwrap();
    if let Some(len) = length {
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len)
            .unwrap();
    }
    match journal {
        Some(j) => {
            let mut j = j.to_vec();
            if mode & 16 != 0 {
                fix_journal(&mut j, &file);
            }
            fs::write(&journal_path, &j).unwrap();
        }
        None => {
            let _ = fs::remove_file(&journal_path);
        }
    }

    let limits = Limits {
        max_memory: 64 << 20,
    };
    let mut image = match Image::open_with(&path, limits) {
        Ok(image) => image,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert!(!journal_path.exists(), "open left a journal behind");
    let (pages, page_size) = (image.page_count(), image.page_size());
    let mut data_pages = 0;
    let mut cursor = image.pages();
    while let Some(next) = cursor.next_page() {
        let (page, bytes) = next.expect("an image that opened reads");
        assert!(page.0 < pages);
        if let Some(bytes) = bytes {
            assert_eq!(bytes.len(), page_size);
            assert!(image.has_data(page));
            data_pages += 1;
        }
    }
    assert_eq!(data_pages, image.data_pages());
    let mut sink = Sink {
        page_size,
        pages,
        writes: 0,
    };
    let stats = image.restore_into(&mut sink).expect("restore");
    assert_eq!((stats.data_pages, sink.writes), (data_pages, data_pages));

    // Save a few pages incrementally and read them back after reopening.
    let mut dirty = DirtyBitmap::new(pages);
    for p in [0, pages / 2, pages - 1] {
        dirty.set(p);
    }
    let generation = image.generation();
    image
        .save_incremental(&dirty, &mut Pattern)
        .expect("an incremental save on an image that opened");
    drop(image);
    let image = Image::open_with(&path, limits).expect("reopen after a save");
    assert_eq!(image.generation(), generation + 1);
    let mut buf = vec![0u8; page_size];
    for p in [0, pages / 2, pages - 1] {
        image.read_page(PageIndex(p), &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == p as u8 | 1));
    }
});
