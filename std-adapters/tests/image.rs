//! Memory image files (`memferry_std::image`): full and incremental saves round-trip, an
//! incremental save rewrites only the dirty pages, an interrupted save leaves the previous image,
//! zero pages take no disk, and hostile files give errors, never panics.

#![cfg(unix)]

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memferry::bitmap::DirtyBitmap;
use memferry::digest::content_hash;
use memferry::error::HostError;
use memferry::memory::{PageRead, PageWrite};
use memferry::page::{MemoryLayout, PageIndex, PageSize, Region};
use memferry_std::image::{self, Image, ImageError, Limits};
use proptest::prelude::*;

/// A directory of its own under the system's temp directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "memferry-image-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Guest memory in a `Vec`, with a count of pages read and written.
#[derive(Clone)]
struct Memory {
    page_size: usize,
    bytes: Vec<u8>,
    reads: u64,
    writes: u64,
}

impl Memory {
    fn new(layout: &MemoryLayout) -> Self {
        let page_size = layout.page_size().bytes();
        Memory {
            page_size,
            bytes: vec![0; page_size * layout.page_count() as usize],
            reads: 0,
            writes: 0,
        }
    }

    fn page(&self, p: u64) -> &[u8] {
        &self.bytes[p as usize * self.page_size..(p as usize + 1) * self.page_size]
    }

    fn page_mut(&mut self, p: u64) -> &mut [u8] {
        &mut self.bytes[p as usize * self.page_size..(p as usize + 1) * self.page_size]
    }

    /// Fills page `p` with bytes derived from `seed` (never all zero).
    fn scribble(&mut self, p: u64, seed: u64) {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ p ^ 1;
        for chunk in self.page_mut(p).chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }

    fn pages(&self) -> u64 {
        (self.bytes.len() / self.page_size) as u64
    }
}

impl PageRead for Memory {
    fn read_page(&mut self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError> {
        self.reads += 1;
        buf.copy_from_slice(self.page(page.0));
        Ok(())
    }
}

impl PageWrite for Memory {
    fn write_page(&mut self, page: PageIndex, data: &[u8]) -> Result<(), HostError> {
        self.writes += 1;
        self.page_mut(page.0).copy_from_slice(data);
        Ok(())
    }
}

/// Two regions with a 1 GiB hole between them.
fn layout(pages_low: u64, pages_high: u64) -> MemoryLayout {
    MemoryLayout::new(
        PageSize::DEFAULT,
        vec![
            Region {
                id: 0,
                guest_base: 0,
                pages: pages_low,
            },
            Region {
                id: 7,
                guest_base: 1 << 30,
                pages: pages_high,
            },
        ],
    )
    .unwrap()
}

/// A memory with every third page zero and the rest scribbled with `seed`.
fn filled(layout: &MemoryLayout, seed: u64) -> Memory {
    let mut m = Memory::new(layout);
    for p in 0..m.pages() {
        if p % 3 != 0 {
            m.scribble(p, seed);
        }
    }
    m
}

fn restored(path: &Path) -> (Memory, u64) {
    let image = Image::open(path).unwrap();
    let mut out = Memory::new(image.layout());
    image.restore_into(&mut out).unwrap();
    (out, image.generation())
}

#[test]
fn a_full_save_restores_the_memory_it_saved() {
    let dir = TempDir::new("full");
    let path = dir.path("guest.img");
    let layout = layout(100, 60);
    let mut memory = filled(&layout, 1);
    let mut image = Image::create(&path, &layout).unwrap();
    assert_eq!(image.generation(), 0);
    let stats = image.save_full(&mut memory).unwrap();
    assert_eq!(stats.generation, 1);
    assert_eq!(stats.pages, 160);
    assert_eq!(stats.zero_pages, 160_u64.div_ceil(3));
    assert_eq!(stats.data_pages, 160 - stats.zero_pages);
    drop(image);

    let image = Image::open(&path).unwrap();
    assert_eq!(image.layout(), &layout);
    assert_eq!(image.generation(), 1);
    assert_eq!(image.data_pages(), stats.data_pages);
    let mut out = Memory::new(&layout);
    let restore = image.restore_into(&mut out).unwrap();
    assert!(out.bytes == memory.bytes, "restored memory differs");
    assert_eq!(restore.data_pages, stats.data_pages);
    // Zero pages are skipped: only data pages are written.
    assert_eq!(out.writes, stats.data_pages);
    assert_eq!(restore.bytes_read, stats.data_pages * 4096);

    // restore_over zeroes pages of memory that held something else.
    let mut dirty_dest = filled(&layout, 99);
    for p in 0..dirty_dest.pages() {
        dirty_dest.scribble(p, 99);
    }
    image.restore_over(&mut dirty_dest).unwrap();
    assert!(dirty_dest.bytes == memory.bytes);

    // Page by page and through the cursor.
    let mut buf = vec![0xaau8; 4096];
    for p in 0..160 {
        image.read_page(PageIndex(p), &mut buf).unwrap();
        assert_eq!(buf, memory.page(p), "page {p}");
    }
    let mut cursor = image.pages();
    let mut seen = 0;
    while let Some(next) = cursor.next_page() {
        let (page, data) = next.unwrap();
        assert_eq!(page, PageIndex(seen));
        match data {
            Some(d) => assert_eq!(d, memory.page(seen)),
            None => assert!(memory.page(seen).iter().all(|&b| b == 0)),
        }
        seen += 1;
    }
    assert_eq!(seen, 160);
    assert!(matches!(
        image.read_page(PageIndex(160), &mut buf),
        Err(ImageError::InvalidArgument(_))
    ));
    assert!(matches!(
        image.read_page(PageIndex(0), &mut buf[..100]),
        Err(ImageError::InvalidArgument(_))
    ));
}

#[test]
fn an_incremental_save_rewrites_only_the_dirty_pages() {
    let dir = TempDir::new("incremental");
    let path = dir.path("guest.img");
    let layout = layout(4096, 4096); // 32 MiB
    let mut memory = filled(&layout, 1);
    let mut image = Image::create(&path, &layout).unwrap();
    image.save_full(&mut memory).unwrap();

    let mut dirty = DirtyBitmap::new(layout.page_count());
    // 20 pages get new data (some of them zero before), 5 become zero.
    for p in (0..20).map(|i| i * 301 + 5) {
        memory.scribble(p, 2);
        dirty.set(p);
    }
    for p in (0..5).map(|i| i * 997 + 1) {
        memory.page_mut(p).fill(0);
        dirty.set(p);
    }
    // A page written without being marked dirty is not the image's business.
    let unmarked = 4000;
    let before_unmarked = memory.page(unmarked).to_vec();
    memory.scribble(unmarked, 3);

    memory.reads = 0;
    let stats = image.save_incremental(&dirty, &mut memory).unwrap();
    assert_eq!(stats.generation, 2);
    assert_eq!(stats.pages, 25);
    assert_eq!(stats.data_pages, 20);
    assert_eq!(stats.zero_pages, 5);
    assert_eq!(memory.reads, 25, "only dirty pages are read");
    // In place: the 20 data pages, the page-table blocks that changed (one 4 KiB block for
    // 8192 pages) and the header.
    let header_len = 128 + 24 * 2;
    assert_eq!(stats.image_bytes, 20 * 4096 + 1024 + header_len);
    // The journal: its header, 25 record headers, 20 pages, the new header, the commit tail.
    assert_eq!(
        stats.journal_bytes,
        64 + 25 * 32 + 20 * 4096 + header_len + 56
    );
    assert!(
        !image::journal_path(&path).exists(),
        "the journal is removed"
    );
    drop(image);

    let (out, generation) = restored(&path);
    assert_eq!(generation, 2);
    let mut expected = memory.clone();
    expected
        .page_mut(unmarked)
        .copy_from_slice(&before_unmarked);
    assert!(out.bytes == expected.bytes, "restored memory differs");

    // An empty dirty set still makes a generation, and writes only the header.
    let mut image = Image::open(&path).unwrap();
    let stats = image
        .save_incremental(&DirtyBitmap::new(layout.page_count()), &mut memory)
        .unwrap();
    assert_eq!((stats.generation, stats.pages), (3, 0));
    assert_eq!(stats.image_bytes, header_len);
    // A bitmap of the wrong size is refused.
    assert!(matches!(
        image.save_incremental(&DirtyBitmap::new(10), &mut memory),
        Err(ImageError::InvalidArgument(_))
    ));
}

/// The memory of the "previous save", the memory of the next one and its dirty set.
fn two_generations(layout: &MemoryLayout) -> (Memory, Memory, DirtyBitmap) {
    let old = filled(layout, 1);
    let mut new = old.clone();
    let mut dirty = DirtyBitmap::new(layout.page_count());
    for p in 0..new.pages() {
        match p % 7 {
            0 => new.scribble(p, 2),
            1 => new.page_mut(p).fill(0),
            _ => continue,
        }
        dirty.set(p);
    }
    (old, new, dirty)
}

#[test]
fn an_interrupted_incremental_save_leaves_the_previous_image() {
    let dir = TempDir::new("crash");
    let layout = layout(40, 30);
    let (old, new, dirty) = two_generations(&layout);

    // The bytes an uninterrupted save writes, journal first.
    let reference = dir.path("reference.img");
    let mut image = Image::create(&reference, &layout).unwrap();
    image.save_full(&mut old.clone()).unwrap();
    let full = image.save_incremental(&dirty, &mut new.clone()).unwrap();
    let journal = full.journal_bytes;
    let total = full.journal_bytes + full.image_bytes;
    drop(image);

    let path = dir.path("guest.img");
    let mut budgets: Vec<u64> = (0..=total + 1).step_by(997).collect();
    budgets.extend([
        0,
        1,
        63,
        64,
        65,
        journal - 57,
        journal - 56,
        journal - 1,
        journal,
    ]);
    budgets.extend([journal + 1, journal + 4096, total - 1, total]);
    let (mut rolled_back, mut rolled_forward) = (0, 0);
    for budget in budgets {
        let mut image = Image::create(&path, &layout).unwrap();
        image.save_full(&mut old.clone()).unwrap();
        image.inject_crash_after(budget);
        let result = image.save_incremental(&dirty, &mut new.clone());
        if budget < total {
            assert!(
                matches!(result, Err(ImageError::Crashed)),
                "budget {budget}: {result:?}"
            );
            // Every later operation fails too.
            assert!(image.read_page(PageIndex(0), &mut [0; 4096]).is_err());
        } else {
            result.unwrap();
        }
        drop(image); // the crash: nothing cleaned up

        let (out, generation) = restored(&path);
        if budget < journal {
            assert_eq!(generation, 1, "budget {budget}");
            assert!(
                out.bytes == old.bytes,
                "budget {budget}: not the previous save"
            );
            rolled_back += 1;
        } else {
            // The commit record was complete: the journal is applied when the image opens.
            assert_eq!(generation, 2, "budget {budget}");
            assert!(out.bytes == new.bytes, "budget {budget}: not the new save");
            rolled_forward += 1;
        }
        assert!(!image::journal_path(&path).exists(), "budget {budget}");

        // A later save works: the failed save's dirty pages are saved with the new ones.
        let mut image = Image::open(&path).unwrap();
        let mut third = new.clone();
        let mut dirty3 = dirty.clone();
        third.scribble(3, 3);
        dirty3.set(3);
        let stats = image.save_incremental(&dirty3, &mut third).unwrap();
        drop(image);
        let (out, generation) = restored(&path);
        assert_eq!(generation, stats.generation);
        assert!(out.bytes == third.bytes, "budget {budget}: the later save");
    }
    assert!(rolled_back > 3 && rolled_forward > 3);
}

#[test]
fn an_interrupted_full_save_leaves_the_previous_image() {
    let dir = TempDir::new("crash-full");
    let path = dir.path("guest.img");
    let layout = layout(40, 30);
    let (old, new, _) = two_generations(&layout);
    for budget in [0, 1, 4096, 50_000, 100_000] {
        let mut image = Image::create(&path, &layout).unwrap();
        image.save_full(&mut old.clone()).unwrap();
        image.inject_crash_after(budget);
        assert!(matches!(
            image.save_full(&mut new.clone()),
            Err(ImageError::Crashed)
        ));
        drop(image);
        let (out, generation) = restored(&path);
        assert_eq!(generation, 1);
        assert!(out.bytes == old.bytes, "budget {budget}");
        assert!(!image::new_file_path(&path).exists());
    }
}

#[test]
fn a_damaged_or_foreign_journal_is_handled() {
    let dir = TempDir::new("journal");
    let path = dir.path("guest.img");
    let layout = layout(40, 30);
    let (old, new, dirty) = two_generations(&layout);

    // Garbage where a journal would be: discarded, the image is as saved.
    let mut image = Image::create(&path, &layout).unwrap();
    image.save_full(&mut old.clone()).unwrap();
    drop(image);
    fs::write(image::journal_path(&path), vec![0x5a; 100_000]).unwrap();
    let (out, generation) = restored(&path);
    assert_eq!(generation, 1);
    assert!(out.bytes == old.bytes);
    assert!(!image::journal_path(&path).exists());

    // A committed journal (a save crashed after its commit), kept aside.
    let mut image = Image::open(&path).unwrap();
    let full = image.save_incremental(&dirty, &mut new.clone());
    let journal_len = full.unwrap().journal_bytes;
    drop(image);
    let mut image = Image::create(&path, &layout).unwrap();
    image.save_full(&mut old.clone()).unwrap();
    image.inject_crash_after(journal_len);
    assert!(image.save_incremental(&dirty, &mut new.clone()).is_err());
    drop(image);
    let committed = fs::read(image::journal_path(&path)).unwrap();
    assert_eq!(committed.len() as u64, journal_len);
    fs::remove_file(image::journal_path(&path)).unwrap();

    // Applied to another image of the same layout: refused, with the journal left alone.
    let other = dir.path("other.img");
    let mut image = Image::create(&other, &layout).unwrap();
    image.save_full(&mut old.clone()).unwrap();
    drop(image);
    fs::write(image::journal_path(&other), &committed).unwrap();
    let err = Image::open(&other).unwrap_err();
    assert!(matches!(err, ImageError::ForeignJournal(_)), "{err}");
    assert!(err.to_string().contains("another image"), "{err}");

    // One page's bytes damaged inside the committed journal: the records did not all reach
    // the disk, so the save never applied: discarded.
    let mut damaged = committed.clone();
    damaged[64 + 32 + 100] ^= 1;
    fs::write(image::journal_path(&path), &damaged).unwrap();
    let (out, generation) = restored(&path);
    assert_eq!(generation, 1);
    assert!(out.bytes == old.bytes);

    // The intact journal is applied.
    fs::write(image::journal_path(&path), &committed).unwrap();
    let (out, generation) = restored(&path);
    assert_eq!(generation, 2);
    assert!(out.bytes == new.bytes);
}

#[test]
fn zero_pages_take_no_disk_blocks() {
    let dir = TempDir::new("sparse");
    let path = dir.path("guest.img");
    let layout = layout(32768, 32768); // 256 MiB
    let mut memory = Memory::new(&layout);
    for p in (0..64).map(|i| i * 1000) {
        memory.scribble(p, 1);
    }
    let mut image = Image::create(&path, &layout).unwrap();
    image.save_full(&mut memory).unwrap();
    let meta = fs::metadata(&path).unwrap();
    let on_disk = meta.blocks() * 512;
    assert_eq!(meta.len(), 3 * 4096 + 256 * 1024 * 1024);
    // 64 pages (256 KiB), the header block and the 8 KiB table; file systems allocate in
    // blocks of 4 KiB, or more (extents, preallocation): allow 2x.
    let least = (64 + 3) * 4096;
    assert!(
        on_disk <= 2 * least,
        "{on_disk} bytes on disk for {least} bytes of data and metadata"
    );

    // Pages that become zero give their blocks back.
    let mut dirty = DirtyBitmap::new(layout.page_count());
    for p in (0..32).map(|i| i * 1000) {
        memory.page_mut(p).fill(0);
        dirty.set(p);
    }
    image.save_incremental(&dirty, &mut memory).unwrap();
    drop(image);
    let after = fs::metadata(&path).unwrap().blocks() * 512;
    assert!(
        after + 32 * 4096 <= on_disk + 4096,
        "{after} bytes on disk after zeroing 32 pages, {on_disk} before"
    );
    let (out, _) = restored(&path);
    assert!(out.bytes == memory.bytes);
}

#[test]
fn one_writer_or_several_readers() {
    let dir = TempDir::new("lock");
    let path = dir.path("guest.img");
    let image = Image::create(&path, &layout(4, 4)).unwrap();
    let err = Image::open(&path).unwrap_err();
    assert!(matches!(err, ImageError::InUse(_)), "{err}");
    assert!(err.to_string().contains("in use"));
    drop(image);
    Image::open(&path).unwrap();

    // Readers share the lock, and keep writers out.
    let reader = Image::open_read_only(&path, Limits::default()).unwrap();
    let mut reader2 = Image::open_read_only(&path, Limits::default()).unwrap();
    assert!(matches!(Image::open(&path), Err(ImageError::InUse(_))));
    let mut memory = Memory::new(reader.layout());
    let e = reader2.save_full(&mut memory).unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    drop((reader, reader2));

    // A committed journal needs a writer to apply it; an uncommitted one is ignored.
    let layout = layout(4, 4);
    let (old, new, dirty) = two_generations(&layout);
    let mut image = Image::create(&path, &layout).unwrap();
    image.save_full(&mut old.clone()).unwrap();
    let journal_len = image
        .save_incremental(&dirty, &mut new.clone())
        .unwrap()
        .journal_bytes;
    drop(image);
    for (budget, committed) in [(journal_len - 1, false), (journal_len, true)] {
        let mut image = Image::create(&path, &layout).unwrap();
        image.save_full(&mut old.clone()).unwrap();
        image.inject_crash_after(budget);
        assert!(image.save_incremental(&dirty, &mut new.clone()).is_err());
        drop(image);
        match Image::open_read_only(&path, Limits::default()) {
            Ok(reader) => {
                assert!(!committed);
                assert_eq!(reader.generation(), 1);
                let mut out = Memory::new(&layout);
                reader.restore_into(&mut out).unwrap();
                assert!(out.bytes == old.bytes);
            }
            Err(e) => assert!(
                committed && matches!(e, ImageError::NeedsRecovery(_)),
                "{e}"
            ),
        }
    }
}

/// A valid image's bytes, with a memory written into it.
fn image_bytes(dir: &TempDir, layout: &MemoryLayout) -> Vec<u8> {
    let path = dir.path("valid.img");
    let mut image = Image::create(&path, layout).unwrap();
    image.save_full(&mut filled(layout, 5)).unwrap();
    drop(image);
    fs::read(&path).unwrap()
}

/// Recomputes the header checksum (bytes 112..128) of an image's bytes, as the format says.
fn fix_header_checksum(b: &mut [u8]) {
    if b.len() < 128 {
        return;
    }
    let regions = u32::from_le_bytes(b[20..24].try_into().unwrap()) as usize;
    let end = (128 + 24 * regions.min(4096)).min(b.len());
    let mut covered = b[..112].to_vec();
    covered.extend_from_slice(&b[128..end]);
    let sum = content_hash(&covered);
    b[112..128].copy_from_slice(&sum.to_le_bytes());
}

fn open_bytes(dir: &TempDir, bytes: &[u8]) -> Result<Image, ImageError> {
    let path = dir.path("probe.img");
    fs::write(&path, bytes).unwrap();
    let _ = fs::remove_file(image::journal_path(&path));
    Image::open(&path)
}

/// Opens `bytes`; if that works, reads every page. Returns the error, if any.
fn probe(dir: &TempDir, bytes: &[u8]) -> Option<ImageError> {
    match open_bytes(dir, bytes) {
        Ok(image) => {
            let mut cursor = image.pages();
            while let Some(next) = cursor.next_page() {
                next.unwrap();
            }
            None
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            Some(e)
        }
    }
}

#[test]
fn hostile_headers_give_clear_errors() {
    let dir = TempDir::new("hostile");
    let layout = layout(40, 30);
    let valid = image_bytes(&dir, &layout);
    assert!(probe(&dir, &valid).is_none());

    let expect = |bytes: &[u8], what: &str, want: fn(&ImageError) -> bool| {
        let e = open_bytes(&dir, bytes).expect_err(what);
        assert!(want(&e), "{what}: {e} ({e:?})");
    };
    let with = |at: usize, new: &[u8], fix: bool| {
        let mut b = valid.clone();
        b[at..at + new.len()].copy_from_slice(new);
        if fix {
            fix_header_checksum(&mut b);
        }
        b
    };
    expect(&[], "empty", |e| matches!(e, ImageError::NotAnImage(_)));
    expect(b"MFRYIMG\0", "magic only", |e| {
        matches!(e, ImageError::WrongLength { .. })
    });
    expect(&with(0, b"XFRY", false), "magic", |e| {
        matches!(e, ImageError::NotAnImage(_))
    });
    expect(&with(8, &2u32.to_le_bytes(), true), "version", |e| {
        matches!(e, ImageError::UnsupportedVersion(2))
    });
    expect(
        &with(32, &9u64.to_le_bytes(), false),
        "unfixed checksum",
        |e| matches!(e, ImageError::ChecksumMismatch("header")),
    );
    expect(&with(40, &1u64.to_le_bytes(), true), "required flag", |e| {
        matches!(e, ImageError::UnsupportedFeatures(1))
    });
    expect(
        &with(16, &[11], true),
        "page shift",
        |e| matches!(e, ImageError::Corrupt(m) if m.contains("page shift")),
    );
    expect(&with(20, &0u32.to_le_bytes(), true), "no regions", |e| {
        matches!(e, ImageError::Corrupt(_))
    });
    expect(
        &with(20, &u32::MAX.to_le_bytes(), true),
        "region count",
        |e| matches!(e, ImageError::Corrupt(_)),
    );
    // A region of 2^40 pages: refused by size before the table is allocated.
    expect(
        &with(128 + 16, &(1u64 << 40).to_le_bytes(), true),
        "huge",
        |e| matches!(e, ImageError::TooLarge { .. }),
    );
    // Regions that overlap.
    expect(
        &with(128 + 24 + 8, &0u64.to_le_bytes(), true),
        "overlap",
        |e| matches!(e, ImageError::Layout(_)),
    );
    expect(
        &with(24, &71u64.to_le_bytes(), true),
        "page count",
        |e| matches!(e, ImageError::Corrupt(m) if m.contains("page count")),
    );
    expect(
        &with(80, &12288u64.to_le_bytes(), true),
        "data offset",
        |e| matches!(e, ImageError::Corrupt(m) if m.contains("data offset")),
    );
    // The table's checksum, and bits past the last page (70 pages: 2 spare bits).
    expect(&with(4096, &[valid[4096] ^ 4], false), "table bit", |e| {
        matches!(e, ImageError::ChecksumMismatch("page table"))
    });
    let mut tail = valid.clone();
    tail[4096 + 8] |= 0x80;
    let sum = content_hash(&tail[4096..4096 + 9]);
    tail[88..104].copy_from_slice(&sum.to_le_bytes());
    fix_header_checksum(&mut tail);
    expect(
        &tail,
        "table tail",
        |e| matches!(e, ImageError::Corrupt(m) if m.contains("past the last page")),
    );
    // Truncated anywhere, or longer.
    for len in [
        7,
        100,
        127,
        128,
        150,
        175,
        4096,
        4100,
        8191,
        8192,
        valid.len() - 1,
    ] {
        let e = open_bytes(&dir, &valid[..len]).expect_err("truncated");
        assert!(
            matches!(
                e,
                ImageError::WrongLength { .. } | ImageError::NotAnImage(_)
            ),
            "{len}: {e}"
        );
        if len >= 176 {
            assert!(e.to_string().contains("truncated"), "{e}");
        }
    }
    let mut longer = valid.clone();
    longer.push(0);
    expect(&longer, "longer", |e| {
        matches!(e, ImageError::WrongLength { .. })
    });
    // The limit is checked before the table is read.
    let path = dir.path("limited.img");
    fs::write(&path, &valid).unwrap();
    let e = Image::open_with(&path, Limits { max_memory: 4096 }).unwrap_err();
    assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");
}

#[test]
fn every_single_byte_change_to_a_header_is_handled() {
    let dir = TempDir::new("bytes");
    let layout = layout(40, 30);
    let valid = image_bytes(&dir, &layout);
    let mut opened = 0;
    for at in 0..176 {
        for (delta, fix) in [(1u8, false), (1, true), (0x80, true)] {
            let mut b = valid.clone();
            b[at] ^= delta;
            if fix {
                fix_header_checksum(&mut b);
            }
            if probe(&dir, &b).is_none() {
                opened += 1;
                // Only fields without constraints may change: the generation, the ignorable
                // flags, the image id, region ids and guest bases that keep the layout valid
                // (and the checksum itself, when it is recomputed).
                assert!(
                    (32..40).contains(&at)
                        || (44..64).contains(&at)
                        || (fix && (112..128).contains(&at))
                        || (128..132).contains(&at) // region ids
                        || (152..156).contains(&at)
                        || (136..144).contains(&at) // guest bases
                        || (160..168).contains(&at),
                    "a change at byte {at} opened"
                );
            }
        }
    }
    assert!(opened > 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn opening_arbitrary_bytes_never_panics(
        magic in any::<bool>(),
        fix in any::<bool>(),
        bytes in proptest::collection::vec(any::<u8>(), 0..10_000),
    ) {
        let dir = TempDir::new("prop");
        let mut b = bytes;
        if magic && b.len() >= 8 {
            b[..8].copy_from_slice(b"MFRYIMG\0");
            if b.len() >= 12 {
                b[8..12].copy_from_slice(&1u32.to_le_bytes());
            }
        }
        if fix {
            fix_header_checksum(&mut b);
        }
        probe(&dir, &b);
    }

    #[test]
    fn damaging_a_valid_image_never_panics(
        edits in proptest::collection::vec((0usize..12_288 + 70 * 4096, any::<u8>()), 1..8),
        fix in any::<bool>(),
        journal in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..2_000)),
    ) {
        let dir = TempDir::new("prop-damage");
        let layout = layout(40, 30);
        let mut b = image_bytes(&dir, &layout);
        for (at, v) in edits {
            let at = at % b.len();
            b[at] = v;
        }
        if fix {
            fix_header_checksum(&mut b);
        }
        let path = dir.path("probe.img");
        fs::write(&path, &b).unwrap();
        if let Some(j) = journal {
            fs::write(image::journal_path(&path), j).unwrap();
        }
        if let Ok(image) = Image::open(&path) {
            let mut out = Memory::new(image.layout());
            image.restore_into(&mut out).unwrap();
        }
    }
}

/// Figures: a 1 GiB guest saved whole, saved incrementally with 1% of pages dirty, restored.
/// `cargo test -p memferry-std --no-default-features --test image -- --ignored --nocapture`
#[test]
#[ignore]
fn figures_for_a_1_gib_guest() {
    let dir = TempDir::new("figures");
    let path = dir.path("guest.img");
    let layout = MemoryLayout::single(
        memferry::page::Geometry::for_memory(PageSize::DEFAULT, 1 << 30).unwrap(),
    );
    let mut memory = Memory::new(&layout);
    // Three quarters data, a quarter zero.
    for p in 0..memory.pages() {
        if p % 4 != 0 {
            memory.scribble(p, 1);
        }
    }
    let mut image = Image::create(&path, &layout).unwrap();
    let full = image.save_full(&mut memory).unwrap();
    println!(
        "full save: {} pages ({} data) in {:?} ({:.0} MB/s of guest memory), {} MiB written",
        full.pages,
        full.data_pages,
        full.elapsed,
        (1u64 << 30) as f64 / full.elapsed.as_secs_f64() / 1e6,
        full.image_bytes >> 20
    );
    let mut dirty = DirtyBitmap::new(layout.page_count());
    for p in (0..memory.pages()).step_by(100) {
        memory.scribble(p, 2);
        dirty.set(p);
    }
    let inc = image.save_incremental(&dirty, &mut memory).unwrap();
    println!(
        "incremental save: {} dirty pages in {:?}: {} bytes to the image, {} to the journal",
        inc.pages, inc.elapsed, inc.image_bytes, inc.journal_bytes
    );
    drop(image);
    let image = Image::open(&path).unwrap();
    let mut out = Memory::new(&layout);
    let r = image.restore_into(&mut out).unwrap();
    println!(
        "restore: {} data pages in {:?} ({:.0} MB/s of guest memory)",
        r.data_pages,
        r.elapsed,
        (1u64 << 30) as f64 / r.elapsed.as_secs_f64() / 1e6
    );
    assert!(out.bytes == memory.bytes);
    let mut out = Memory::new(&layout);
    let r = image.restore_into(&mut out).unwrap();
    println!("restore again: {:?}", r.elapsed);
    let t = std::time::Instant::now();
    let mut cursor = image.pages();
    let mut sum = 0u64;
    while let Some(next) = cursor.next_page() {
        if let (_, Some(d)) = next.unwrap() {
            sum += d[0] as u64;
        }
    }
    println!(
        "reading every page (cursor only): {:?} ({sum})",
        t.elapsed()
    );
    let meta = fs::metadata(&path).unwrap();
    println!(
        "file: {} bytes long, {} bytes on disk",
        meta.len(),
        meta.blocks() * 512
    );
}
