//! Memory image files: a guest's memory saved to a file with a fixed offset per page (QEMU's
//! `mapped-ram`, Cloud Hypervisor's snapshot), saved whole or incrementally (only the pages
//! dirtied since the last save are rewritten), crash-safe, and restored into any
//! [`PageWrite`]. It is the image that hash-first transfer, memory reuse and a checkpoint start
//! from.
//!
//! ```no_run
//! # fn demo(layout: memferry::page::MemoryLayout,
//! #         memory: &mut dyn memferry::memory::PageRead,
//! #         dirty: &memferry::bitmap::DirtyBitmap,
//! #         dest: &mut dyn memferry::memory::PageWrite) -> Result<(), memferry_std::image::ImageError> {
//! use memferry_std::image::Image;
//! let mut image = Image::create("guest.img", &layout)?;     // generation 0: all zero
//! image.save_full(memory)?;                                 // generation 1
//! // ... the guest runs; its dirty log collects the pages it writes ...
//! image.save_incremental(dirty, memory)?;                   // generation 2: dirty pages only
//! let image = Image::open("guest.img")?;                    // checks everything
//! image.restore_into(dest)?;                                // zero pages are skipped
//! # Ok(()) }
//! ```
//!
//! # The image file
//! Little-endian throughout. Offsets are from the start of the file.
//! ```text
//! 0              128             128+24n        table_offset        data_offset                          end
//! | fixed header | region table  | 0 ...        | page table | 0 ... | page 0 | page 1 | ... | page N-1 |
//! ```
//! The fixed header (128 bytes):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `MFRYIMG\0` ([`IMAGE_MAGIC`]) |
//! | 8 | 4 | version u32 = 1 ([`IMAGE_VERSION`]) |
//! | 12 | 4 | header length u32 = 128 + 24 × region count |
//! | 16 | 1 | page shift u8 (12 ..= 21: 4 KiB to 2 MiB pages) |
//! | 17 | 3 | 0 |
//! | 20 | 4 | region count u32 (1 ..= [`MAX_REGIONS`]) |
//! | 24 | 8 | page count u64: the sum of the regions' pages |
//! | 32 | 8 | generation u64: 0 when created, + 1 at every save |
//! | 40 | 8 | flags u64: bits 0..32 are features a reader must know (none is defined: a set one is refused), bits 32..64 features it may ignore |
//! | 48 | 16 | image id u128, random at creation, kept by every save: a journal names the image it belongs to |
//! | 64 | 8 | table offset u64 = header length rounded up to 4096 |
//! | 72 | 8 | table length u64 = ⌈page count / 8⌉ |
//! | 80 | 8 | data offset u64 = table offset + table length, rounded up to max(4096, page size) |
//! | 88 | 16 | table checksum u128: xxh3-128 of the page table's bytes |
//! | 104 | 8 | 0 |
//! | 112 | 16 | header checksum u128: xxh3-128 of bytes `[0, 112)` followed by the region table |
//!
//! Then the region table, `region count` entries of 24 bytes in dense-index order (the
//! [`MemoryLayout`]): id u32, 0 u32, guest-physical base u64, pages u64. Holes between regions
//! have no page index, no table bit and no bytes in the file.
//!
//! The page table has one bit per page, bit `i % 8` of byte `i / 8` for dense page `i`: 1 the
//! page's bytes are in the data area, 0 the page is all zero. Bits past the last page are 0.
//!
//! Page `i` lies at `data_offset + i × page size`, always, and the file is exactly
//! `data_offset + page count × page size` bytes long. Zero pages are never written, so they are
//! holes in a sparse file and take no disk blocks; a page that becomes zero has its blocks
//! punched out (`FALLOC_FL_PUNCH_HOLE`, Linux). The bytes of a page whose bit is 0 mean nothing
//! and are never read.
//!
//! # Saving and crash safety
//! - [`Image::create`] and [`Image::save_full`] write a whole new file next to the image
//!   (`<image>.new`), `fsync` it and rename it over the image: a crash leaves the old image or
//!   the new one, never a mix.
//! - [`Image::save_incremental`] writes a redo journal next to the image (`<image>.journal`):
//!   the new versions of the dirty pages and a commit record, made durable with one `fsync`
//!   (every byte of the journal is covered by checksums the commit record holds, so a journal
//!   whose writes the crash cut short or reordered does not verify and counts as uncommitted).
//!   Only then is the journal applied in place (pages, table, header), the image is `fsync`ed
//!   and the journal removed. When an image is opened, a committed journal is applied again
//!   (applying is idempotent) and an uncommitted one is deleted. So an interrupted save leaves
//!   the previous image, or, once its commit record is durable, the new one.
//!
//! An incremental save writes each dirty page twice (journal, then image) and the image's
//! metadata (the header and the 4 KiB blocks of the page table that changed) once.
//!
//! The journal:
//! ```text
//! 0                 64                                             end-56-h        end-56        end
//! | journal header  | record | record | ...                        | new header (h) | commit tail |
//! ```
//! - journal header (64 bytes): magic `MFRYJNL\0`, version u32 = 1, 0 u32, image id u128,
//!   base generation u64 (the image's generation it applies to), new generation u64 (base + 1),
//!   page count u64, page shift u8, 7 × 0.
//! - record: page index u64, kind u8 (0 zero, 1 data), 7 × 0, xxh3-128 of the page's bytes u128
//!   (0 for a zero page), then the page's bytes (data records only). Page indices strictly
//!   increase.
//! - new header: the image header (fixed part and region table) the image has once the journal
//!   is applied; its table checksum is the new table's.
//! - commit tail (56 bytes): magic `MFRYCMT\0`, record count u64, new header length u64, chain
//!   u128, tail checksum u128 (xxh3-128 of the new header followed by the tail's first 40
//!   bytes). The chain is `c0 = xxh3-128(journal header)`, `c(k+1) = xxh3-128(c(k) as 16 bytes
//!   LE ++ record k's 32-byte header)`: it covers every record, whose bytes their own hash covers.
//!
//! # Trust
//! [`Image::open`] checks every field, both checksums, the file's length and the page table
//! before it trusts any of it, and refuses a guest larger than [`Limits::max_memory`] before it
//! allocates anything for it (the page table takes 1/32768 of a 4 KiB-page guest's size). A
//! hostile or damaged file gives an [`ImageError`] that says what is wrong; nothing panics.
//!
//! # Memory reuse on return (paper 003)
//! The image a VM leaves behind on a host is content that host already holds if the VM comes
//! back: offered hash-first ([`memferry::hashfirst`]), only the pages that differ travel. Not
//! every page is worth keeping: paper 003's two rules ([`KeepRules`]) drop the pages *likely
//! to be updated soon* (the writable working set at departure: the pages dirtied just before
//! the VM left) and the pages *updated elsewhere* (named by the host the VM ran on, or found
//! rewritten in the image since departure). [`Image::keep_for_reuse`] records the decision in a
//! keep map beside the image (`<image>.keep`: the hot set and each page's hash at departure);
//! [`KeptImage`] offers the image with the rules applied, and counts what it kept and dropped
//! and why ([`KeepStats`]). A dropped page reads as zero, so it is never announced as held
//! content and never trusted. The image itself stays whole and restores as before.
//!
//! One writer at a time: an image opened for writing holds an exclusive `flock` on the file, one
//! opened with [`Image::open_read_only`] a shared one, and an open that conflicts fails with
//! [`ImageError::InUse`].

#![cfg(unix)]

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use memferry::bitmap::DirtyBitmap;
use memferry::codec::is_zero_page;
use memferry::digest::content_hash;
use memferry::error::HostError;
use memferry::memory::{PageRead, PageWrite};
use memferry::page::{GeometryError, MemoryLayout, PageIndex, PageSize, Region};

/// The first 8 bytes of an image file.
pub const IMAGE_MAGIC: [u8; 8] = *b"MFRYIMG\0";
/// The image format version this module reads and writes.
pub const IMAGE_VERSION: u32 = 1;
/// The first 8 bytes of a journal.
pub const JOURNAL_MAGIC: [u8; 8] = *b"MFRYJNL\0";
/// The magic of a journal's commit tail.
pub const COMMIT_MAGIC: [u8; 8] = *b"MFRYCMT\0";
/// The most regions an image may have (the wire format's limit).
pub const MAX_REGIONS: usize = memferry::wire::MAX_REGIONS;
/// The fixed part of the image header.
pub const FIXED_HEADER_LEN: usize = 128;
/// One entry of the region table.
pub const REGION_ENTRY_LEN: usize = 24;
/// The journal's header.
pub const JOURNAL_HEADER_LEN: usize = 64;
/// A journal record's header (its page bytes follow for a data record).
pub const RECORD_HEADER_LEN: usize = 32;
/// The journal's commit tail.
pub const COMMIT_TAIL_LEN: usize = 56;
/// The default of [`Limits::max_memory`]: 1 TiB of guest memory.
pub const DEFAULT_MAX_MEMORY: u64 = 1 << 40;

/// Bits of the flags word a reader must understand; this version defines none.
const REQUIRED_FLAGS: u64 = 0xffff_ffff;
/// Alignment of the table, and the least alignment of the data area.
const BLOCK: u64 = 4096;
/// How many bytes one read or write moves at most, when pages are contiguous.
const IO_CHUNK: usize = 1 << 20;

/// Why an image could not be created, opened, saved or restored.
#[derive(Debug)]
#[non_exhaustive]
pub enum ImageError {
    /// A file operation failed.
    Io {
        /// What was being done, with the path.
        context: String,
        /// The operating system's error.
        source: io::Error,
    },
    /// The file does not start with [`IMAGE_MAGIC`].
    NotAnImage(PathBuf),
    /// The file is an image of a version this module does not read.
    UnsupportedVersion(u32),
    /// The image uses features (flag bits) this module does not know.
    UnsupportedFeatures(u64),
    /// The file is shorter or longer than its header says.
    WrongLength {
        /// The file's length.
        actual: u64,
        /// The length the header implies.
        expected: u64,
    },
    /// A checksum does not match: the file is damaged.
    ChecksumMismatch(&'static str),
    /// A header field is invalid (the message says which and why).
    Corrupt(String),
    /// The region table is not a valid layout.
    Layout(GeometryError),
    /// The image's guest is larger than the limit it was opened with.
    TooLarge {
        /// The guest's memory in bytes.
        memory: u64,
        /// [`Limits::max_memory`].
        limit: u64,
    },
    /// A journal next to the image is committed but does not belong to it.
    ForeignJournal(String),
    /// Another process has the image open.
    InUse(PathBuf),
    /// A caller's argument does not fit the image (a bitmap or buffer of the wrong size, a page
    /// outside the guest).
    InvalidArgument(String),
    /// Reading guest memory (saving) or writing it (restoring) failed.
    Memory(HostError),
    /// A save failed part-way after its journal was committed: the image on disk is the new
    /// one once the journal is applied, which the next [`Image::open`] does.
    NeedsRecovery(PathBuf),
    /// The write budget of [`Image::inject_crash_after`] ran out (tests).
    Crashed,
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageError::Io { context, source } => write!(f, "{context}: {source}"),
            ImageError::NotAnImage(p) => write!(
                f,
                "{} is not a memferry memory image (no MFRYIMG magic)",
                p.display()
            ),
            ImageError::UnsupportedVersion(v) => write!(
                f,
                "image format version {v} is not supported (this build reads version {IMAGE_VERSION})"
            ),
            ImageError::UnsupportedFeatures(bits) => write!(
                f,
                "the image uses features this build does not know (flags {bits:#x})"
            ),
            ImageError::WrongLength { actual, expected } => {
                if actual < expected {
                    write!(f, "the image is truncated: {actual} bytes, its header says {expected}")
                } else {
                    write!(f, "the image has {actual} bytes, its header says {expected}")
                }
            }
            ImageError::ChecksumMismatch(what) => {
                write!(f, "the image's {what} checksum does not match: the file is damaged")
            }
            ImageError::Corrupt(m) => write!(f, "corrupt image: {m}"),
            ImageError::Layout(e) => write!(f, "the image's region table is invalid: {e}"),
            ImageError::TooLarge { memory, limit } => write!(
                f,
                "the image holds a guest of {memory} bytes, more than the limit of {limit} bytes"
            ),
            ImageError::ForeignJournal(m) => write!(f, "{m}"),
            ImageError::InUse(p) => write!(
                f,
                "{} is in use by another process (it holds the image's lock)",
                p.display()
            ),
            ImageError::InvalidArgument(m) => write!(f, "{m}"),
            ImageError::Memory(e) => write!(f, "guest memory: {e}"),
            ImageError::NeedsRecovery(p) => write!(
                f,
                "a save of {} failed after its journal was committed; open the image again to \
                 apply the journal",
                p.display()
            ),
            ImageError::Crashed => write!(f, "simulated crash (injected write budget ran out)"),
        }
    }
}

impl std::error::Error for ImageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ImageError::Io { source, .. } => Some(source),
            ImageError::Layout(e) => Some(e),
            ImageError::Memory(e) => Some(e),
            _ => None,
        }
    }
}

impl From<HostError> for ImageError {
    fn from(e: HostError) -> Self {
        ImageError::Memory(e)
    }
}

fn io_error(context: String) -> impl FnOnce(io::Error) -> ImageError {
    move |source| ImageError::Io { context, source }
}

/// The length of the open file `file`, found at `path` (for the error).
fn file_len(file: &File, path: &Path) -> Result<u64, ImageError> {
    file.metadata().map(|m| m.len()).map_err(io_error(format!(
        "reading the length of {}",
        path.display()
    )))
}

/// What [`Image::open_with`] accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest guest (page count × page size) an image may hold. The page table, the only
    /// allocation that grows with the guest, is 1/32768 of it with 4 KiB pages.
    pub max_memory: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_memory: DEFAULT_MAX_MEMORY,
        }
    }
}

/// What a save did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SaveStats {
    /// The image's generation after the save.
    pub generation: u64,
    /// Pages saved (all pages for a full save, the dirty ones for an incremental one).
    pub pages: u64,
    /// Of those, pages with data.
    pub data_pages: u64,
    /// Of those, zero pages (no data written).
    pub zero_pages: u64,
    /// Bytes written to the image file (the new file, for a full save).
    pub image_bytes: u64,
    /// Bytes written to the journal.
    pub journal_bytes: u64,
    /// Wall-clock time of the save, `fsync`s included.
    pub elapsed: Duration,
}

/// What a restore did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Pages written from data.
    pub data_pages: u64,
    /// Zero pages (skipped by [`Image::restore_into`], zeroed by [`Image::restore_over`]).
    pub zero_pages: u64,
    /// Bytes read from the image.
    pub bytes_read: u64,
    /// Wall-clock time of the restore.
    pub elapsed: Duration,
}

/// Bytes an image has written since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoCounters {
    /// To the image file (or to the new file a full save renames over it).
    pub image_bytes: u64,
    /// To the journal.
    pub journal_bytes: u64,
    /// `fsync` calls.
    pub syncs: u64,
}

/// The parsed image header.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Header {
    layout: MemoryLayout,
    page_count: u64,
    generation: u64,
    flags: u64,
    id: u128,
    table_offset: u64,
    table_len: u64,
    data_offset: u64,
    table_checksum: u128,
}

fn align_up(x: u64, to: u64) -> Option<u64> {
    x.checked_add(to - 1).map(|v| v / to * to)
}

fn get<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(s) = b.get(at..at + N) {
        out.copy_from_slice(s);
    }
    out
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(get(b, at))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(get(b, at))
}
fn u128_at(b: &[u8], at: usize) -> u128 {
    u128::from_le_bytes(get(b, at))
}

/// Offsets that follow from a layout: (header length, table offset, table length, data offset,
/// file length).
fn placement(layout: &MemoryLayout) -> Option<(u64, u64, u64, u64, u64)> {
    let header_len = (FIXED_HEADER_LEN + REGION_ENTRY_LEN * layout.regions().len()) as u64;
    let pages = layout.page_count();
    let table_offset = align_up(header_len, BLOCK)?;
    let table_len = pages.div_ceil(8);
    let page_size = layout.page_size().bytes() as u64;
    let data_offset = align_up(table_offset.checked_add(table_len)?, page_size.max(BLOCK))?;
    let file_len = data_offset.checked_add(pages.checked_mul(page_size)?)?;
    Some((header_len, table_offset, table_len, data_offset, file_len))
}

impl Header {
    fn new(
        layout: &MemoryLayout,
        generation: u64,
        id: u128,
        table: &[u8],
    ) -> Result<Self, ImageError> {
        if layout.regions().len() > MAX_REGIONS {
            return Err(ImageError::InvalidArgument(format!(
                "an image holds at most {MAX_REGIONS} regions, the layout has {}",
                layout.regions().len()
            )));
        }
        let (_, table_offset, table_len, data_offset, _) = placement(layout).ok_or_else(|| {
            ImageError::InvalidArgument("the layout is too large for an image file".into())
        })?;
        Ok(Header {
            layout: layout.clone(),
            page_count: layout.page_count(),
            generation,
            flags: 0,
            id,
            table_offset,
            table_len,
            data_offset,
            table_checksum: content_hash(table),
        })
    }

    fn page_size(&self) -> u64 {
        self.layout.page_size().bytes() as u64
    }

    fn header_len(&self) -> usize {
        FIXED_HEADER_LEN + REGION_ENTRY_LEN * self.layout.regions().len()
    }

    fn file_len(&self) -> u64 {
        self.data_offset + self.page_count * self.page_size()
    }

    fn page_offset(&self, page: u64) -> u64 {
        self.data_offset + page * self.page_size()
    }

    fn encode(&self) -> Vec<u8> {
        let regions = self.layout.regions();
        let mut b = vec![0u8; self.header_len()];
        b[0..8].copy_from_slice(&IMAGE_MAGIC);
        b[8..12].copy_from_slice(&IMAGE_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(self.header_len() as u32).to_le_bytes());
        b[16] = self.layout.page_size().shift() as u8;
        b[20..24].copy_from_slice(&(regions.len() as u32).to_le_bytes());
        b[24..32].copy_from_slice(&self.page_count.to_le_bytes());
        b[32..40].copy_from_slice(&self.generation.to_le_bytes());
        b[40..48].copy_from_slice(&self.flags.to_le_bytes());
        b[48..64].copy_from_slice(&self.id.to_le_bytes());
        b[64..72].copy_from_slice(&self.table_offset.to_le_bytes());
        b[72..80].copy_from_slice(&self.table_len.to_le_bytes());
        b[80..88].copy_from_slice(&self.data_offset.to_le_bytes());
        b[88..104].copy_from_slice(&self.table_checksum.to_le_bytes());
        for (i, r) in regions.iter().enumerate() {
            let at = FIXED_HEADER_LEN + REGION_ENTRY_LEN * i;
            b[at..at + 4].copy_from_slice(&r.id.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&r.guest_base.to_le_bytes());
            b[at + 16..at + 24].copy_from_slice(&r.pages.to_le_bytes());
        }
        let sum = header_checksum(&b);
        b[112..128].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// The header length the fixed part announces, checked against its bounds (so the caller
    /// can read the region table), after the magic and the version.
    fn announced_len(fixed: &[u8], path: &Path) -> Result<usize, ImageError> {
        if fixed.len() < 8 || fixed[0..8] != IMAGE_MAGIC {
            return Err(ImageError::NotAnImage(path.to_path_buf()));
        }
        if fixed.len() < FIXED_HEADER_LEN {
            return Err(ImageError::WrongLength {
                actual: fixed.len() as u64,
                expected: FIXED_HEADER_LEN as u64,
            });
        }
        let version = u32_at(fixed, 8);
        if version != IMAGE_VERSION {
            return Err(ImageError::UnsupportedVersion(version));
        }
        let regions = u32_at(fixed, 20) as usize;
        if regions == 0 || regions > MAX_REGIONS {
            return Err(ImageError::Corrupt(format!(
                "region count {regions} is not between 1 and {MAX_REGIONS}"
            )));
        }
        let len = u32_at(fixed, 12) as usize;
        if len != FIXED_HEADER_LEN + REGION_ENTRY_LEN * regions {
            return Err(ImageError::Corrupt(format!(
                "header length {len} does not match {regions} regions"
            )));
        }
        Ok(len)
    }

    /// Parses a whole header (fixed part and region table), checking every field.
    fn parse(b: &[u8], path: &Path, limits: &Limits) -> Result<Self, ImageError> {
        let len = Self::announced_len(b, path)?;
        if b.len() != len {
            return Err(ImageError::WrongLength {
                actual: b.len() as u64,
                expected: len as u64,
            });
        }
        if header_checksum(b) != u128_at(b, 112) {
            return Err(ImageError::ChecksumMismatch("header"));
        }
        let shift = b[16];
        if b[17..20] != [0, 0, 0] || b[104..112] != [0; 8] {
            return Err(ImageError::Corrupt(
                "reserved header bytes are not zero".into(),
            ));
        }
        let flags = u64_at(b, 40);
        if flags & REQUIRED_FLAGS != 0 {
            return Err(ImageError::UnsupportedFeatures(flags & REQUIRED_FLAGS));
        }
        if !(12..=21).contains(&shift) {
            return Err(ImageError::Corrupt(format!(
                "page shift {shift} is not between 12 (4 KiB) and 21 (2 MiB)"
            )));
        }
        let page_size = PageSize::new(1u64 << shift).map_err(ImageError::Layout)?;
        let count = u32_at(b, 20) as usize;
        let mut regions = Vec::with_capacity(count);
        for i in 0..count {
            let at = FIXED_HEADER_LEN + REGION_ENTRY_LEN * i;
            if u32_at(b, at + 4) != 0 {
                return Err(ImageError::Corrupt(format!(
                    "region entry {i} has non-zero reserved bytes"
                )));
            }
            regions.push(Region {
                id: u32_at(b, at),
                guest_base: u64_at(b, at + 8),
                pages: u64_at(b, at + 16),
            });
        }
        // Sizes first: a hostile table of huge regions is refused before anything is sized
        // from it.
        let mut memory = 0u64;
        for r in &regions {
            memory = r
                .pages
                .checked_mul(page_size.bytes() as u64)
                .and_then(|m| m.checked_add(memory))
                .ok_or(ImageError::Layout(GeometryError::TooLarge))?;
        }
        if memory > limits.max_memory {
            return Err(ImageError::TooLarge {
                memory,
                limit: limits.max_memory,
            });
        }
        let layout = MemoryLayout::new(page_size, regions).map_err(ImageError::Layout)?;
        let page_count = u64_at(b, 24);
        if page_count != layout.page_count() {
            return Err(ImageError::Corrupt(format!(
                "page count {page_count} is not the regions' total {}",
                layout.page_count()
            )));
        }
        let (_, table_offset, table_len, data_offset, _) =
            placement(&layout).ok_or(ImageError::Layout(GeometryError::TooLarge))?;
        let header = Header {
            layout,
            page_count,
            generation: u64_at(b, 32),
            flags,
            id: u128_at(b, 48),
            table_offset: u64_at(b, 64),
            table_len: u64_at(b, 72),
            data_offset: u64_at(b, 80),
            table_checksum: u128_at(b, 88),
        };
        if (header.table_offset, header.table_len, header.data_offset)
            != (table_offset, table_len, data_offset)
        {
            return Err(ImageError::Corrupt(format!(
                "table offset {}, table length {} and data offset {} are not where the layout \
                 puts them ({table_offset}, {table_len}, {data_offset})",
                header.table_offset, header.table_len, header.data_offset
            )));
        }
        Ok(header)
    }
}

fn header_checksum(b: &[u8]) -> u128 {
    let mut covered = Vec::with_capacity(b.len().saturating_sub(16));
    covered.extend_from_slice(b.get(..112).unwrap_or(b));
    covered.extend_from_slice(b.get(FIXED_HEADER_LEN..).unwrap_or(&[]));
    content_hash(&covered)
}

fn table_bit(table: &[u8], page: u64) -> bool {
    table
        .get((page / 8) as usize)
        .is_some_and(|b| b & (1 << (page % 8)) != 0)
}

fn set_table_bit(table: &mut [u8], page: u64, on: bool) {
    if let Some(b) = table.get_mut((page / 8) as usize) {
        if on {
            *b |= 1 << (page % 8);
        } else {
            *b &= !(1 << (page % 8));
        }
    }
}

/// Checks that the table's bits past the last page are clear.
fn check_table_tail(table: &[u8], pages: u64) -> Result<(), ImageError> {
    let used = (pages % 8) as u32;
    if used != 0 {
        if let Some(last) = table.last() {
            if last >> used != 0 {
                return Err(ImageError::Corrupt(
                    "page table bits past the last page are set".into(),
                ));
            }
        }
    }
    Ok(())
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name: OsString = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The journal an incremental save of the image at `path` writes: `<path>.journal`.
pub fn journal_path(path: &Path) -> PathBuf {
    with_suffix(path, ".journal")
}

/// The new file a full save writes before renaming it over the image: `<path>.new`.
pub fn new_file_path(path: &Path) -> PathBuf {
    with_suffix(path, ".new")
}

fn sync_dir(path: &Path) -> Result<(), ImageError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(format!("syncing directory {}", dir.display())))
}

/// Takes the image's lock: exclusive for a writer, shared for a reader.
fn lock(file: &File, path: &Path, exclusive: bool) -> Result<(), ImageError> {
    let how = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    // SAFETY: flock on a descriptor this function borrows; no memory is involved.
    let r = unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Err(ImageError::InUse(path.to_path_buf()))
    } else {
        Err(ImageError::Io {
            context: format!("locking {}", path.display()),
            source: e,
        })
    }
}

fn new_image_id(path: &Path) -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut seed = Vec::new();
    seed.extend_from_slice(&now.to_le_bytes());
    seed.extend_from_slice(&std::process::id().to_le_bytes());
    seed.extend_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    seed.extend_from_slice(&(&seed as *const Vec<u8> as usize).to_le_bytes());
    seed.extend_from_slice(path.as_os_str().as_encoded_bytes());
    content_hash(&seed)
}

/// Every write and `fsync` goes through here: counted, and cut short by an injected crash.
#[derive(Debug, Default)]
struct Io {
    counters: IoCounters,
    /// Bytes that may still be written before the simulated crash.
    budget: Option<u64>,
    crashed: bool,
}

#[derive(Clone, Copy)]
enum Target {
    Image,
    Journal,
}

impl Io {
    fn check(&self) -> Result<(), ImageError> {
        if self.crashed {
            Err(ImageError::Crashed)
        } else {
            Ok(())
        }
    }

    fn write_at(
        &mut self,
        file: &File,
        buf: &[u8],
        at: u64,
        target: Target,
        what: &dyn Fn() -> String,
    ) -> Result<(), ImageError> {
        self.check()?;
        let mut n = buf.len();
        if let Some(budget) = self.budget.as_mut() {
            if (n as u64) > *budget {
                n = *budget as usize;
                self.crashed = true;
            }
            *budget -= n as u64;
        }
        file.write_all_at(&buf[..n], at)
            .map_err(|e| io_error(what())(e))?;
        match target {
            Target::Image => self.counters.image_bytes += n as u64,
            Target::Journal => self.counters.journal_bytes += n as u64,
        }
        self.check()
    }

    fn sync(&mut self, file: &File, what: &dyn Fn() -> String) -> Result<(), ImageError> {
        self.check()?;
        file.sync_all().map_err(|e| io_error(what())(e))?;
        self.counters.syncs += 1;
        Ok(())
    }
}

/// Reads `buf.len()` bytes at `at`, or says the file is too short.
fn read_exact_at(
    file: &File,
    buf: &mut [u8],
    at: u64,
    what: &dyn Fn() -> String,
) -> Result<(), ImageError> {
    file.read_exact_at(buf, at).map_err(|e| io_error(what())(e))
}

/// A memory image file. See the [module docs](self) for the format.
#[derive(Debug)]
pub struct Image {
    path: PathBuf,
    file: File,
    header: Header,
    table: Vec<u8>,
    io: Io,
    /// A save failed after its journal was committed.
    needs_recovery: bool,
    /// Opened for writing ([`Image::open_read_only`] gives false).
    writable: bool,
}

impl Image {
    /// Creates an image of `layout` at `path` (replacing any file there), all pages zero,
    /// generation 0. Written to `<path>.new` and renamed over `path`; a journal or a keep map
    /// left by an earlier image at `path` is deleted first.
    pub fn create(path: impl AsRef<Path>, layout: &MemoryLayout) -> Result<Image, ImageError> {
        let path = path.as_ref();
        let table = vec![0u8; layout.page_count().div_ceil(8) as usize];
        let header = Header::new(layout, 0, new_image_id(path), &table)?;
        // Another process saving this image must not see it replaced: hold its lock until the
        // new file is in place.
        let _old = match OpenOptions::new().read(true).open(path) {
            Ok(old) => {
                lock(&old, path, true)?;
                Some(old)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_error(format!("opening {}", path.display()))(e)),
        };
        // A journal or a keep map left by an earlier image at `path` belongs to it, not to
        // this one.
        for stale in [journal_path(path), keep_path(path)] {
            match fs::remove_file(&stale) {
                Ok(()) => sync_dir(path)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(format!("removing {}", stale.display()))(e)),
            }
        }
        let mut io = Io::default();
        let (file, header, table) =
            write_new_file(path, &header, &mut io, |_, _| Ok((header.clone(), table)))?;
        Ok(Image {
            path: path.to_path_buf(),
            file,
            header,
            table,
            io,
            needs_recovery: false,
            writable: true,
        })
    }

    /// Opens the image at `path` with the default [`Limits`]: recovers an interrupted save
    /// (applies a committed journal, deletes an uncommitted one), then checks the header, the
    /// file's length and the page table.
    pub fn open(path: impl AsRef<Path>) -> Result<Image, ImageError> {
        Self::open_with(path, Limits::default())
    }

    /// [`Image::open`] with `limits`.
    pub fn open_with(path: impl AsRef<Path>, limits: Limits) -> Result<Image, ImageError> {
        Self::open_impl(path.as_ref(), limits, true)
    }

    /// Opens the image at `path` for reading only (restores, reads; saves are refused), with a
    /// shared lock: a file without write permission, read-only media, several readers. An
    /// uncommitted journal is ignored (the image is the previous save, as it should be); a
    /// committed one is refused with [`ImageError::NeedsRecovery`], since applying it needs
    /// [`Image::open`].
    pub fn open_read_only(path: impl AsRef<Path>, limits: Limits) -> Result<Image, ImageError> {
        Self::open_impl(path.as_ref(), limits, false)
    }

    fn open_impl(path: &Path, limits: Limits, writable: bool) -> Result<Image, ImageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(io_error(format!("opening {}", path.display())))?;
        lock(&file, path, writable)?;
        if writable {
            // A full save that a crash cut short; nobody else writes it while we hold the lock.
            let _ = fs::remove_file(new_file_path(path));
        }
        let mut io = Io::default();
        let parsed = read_header(&file, path, &limits);
        let journal = journal_path(path);
        let header = match File::open(&journal) {
            Ok(j) => match check_journal(&j, path, &limits)? {
                Some(_) if !writable => return Err(ImageError::NeedsRecovery(path.to_path_buf())),
                None if !writable => parsed?,
                Some(committed) => {
                    // The image's own header may be the one a crash tore while the journal
                    // was being applied: the journal's new header replaces it.
                    if let Ok(h) = &parsed {
                        let new = &committed.header;
                        if h.id != new.id || h.layout != new.layout {
                            return Err(ImageError::ForeignJournal(format!(
                                "{} is a committed journal of another image than {}; move it \
                                 away to open the image as it is",
                                journal.display(),
                                path.display()
                            )));
                        }
                        if h.generation != committed.base && h.generation != new.generation {
                            return Err(ImageError::ForeignJournal(format!(
                                "{} takes generation {} to {}, but {} is at generation {}; \
                                 move it away to open the image as it is",
                                journal.display(),
                                committed.base,
                                new.generation,
                                path.display(),
                                h.generation
                            )));
                        }
                    }
                    let file_len = file_len(&file, path)?;
                    if file_len != committed.header.file_len() {
                        return Err(ImageError::ForeignJournal(format!(
                            "{} is a committed journal for an image of {} bytes, but {} has {}",
                            journal.display(),
                            committed.header.file_len(),
                            path.display(),
                            file_len
                        )));
                    }
                    let mut table = vec![0u8; committed.header.table_len as usize];
                    read_exact_at(&file, &mut table, committed.header.table_offset, &|| {
                        format!("reading the page table of {}", path.display())
                    })?;
                    let old = table.clone();
                    for &(page, data) in &committed.records {
                        set_table_bit(&mut table, page, data);
                    }
                    if content_hash(&table) != committed.header.table_checksum {
                        return Err(ImageError::ForeignJournal(format!(
                            "{} does not apply to {}: the page table it makes does not match \
                             its checksum",
                            journal.display(),
                            path.display()
                        )));
                    }
                    apply_journal(
                        &file,
                        &j,
                        path,
                        &committed.header,
                        &old,
                        &table,
                        committed.records_end,
                        &mut io,
                    )?;
                    finish_journal(path, &mut io)?;
                    committed.header
                }
                None => {
                    drop(j);
                    fs::remove_file(&journal)
                        .map_err(io_error(format!("removing {}", journal.display())))?;
                    sync_dir(path)?;
                    parsed?
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => parsed?,
            Err(e) => return Err(io_error(format!("opening {}", journal.display()))(e)),
        };
        let len = file_len(&file, path)?;
        if len != header.file_len() {
            return Err(ImageError::WrongLength {
                actual: len,
                expected: header.file_len(),
            });
        }
        let mut table = vec![0u8; header.table_len as usize];
        read_exact_at(&file, &mut table, header.table_offset, &|| {
            format!("reading the page table of {}", path.display())
        })?;
        if content_hash(&table) != header.table_checksum {
            return Err(ImageError::ChecksumMismatch("page table"));
        }
        check_table_tail(&table, header.page_count)?;
        Ok(Image {
            path: path.to_path_buf(),
            file,
            header,
            table,
            io,
            needs_recovery: false,
            writable,
        })
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The guest's memory layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.header.layout
    }

    /// How many saves the image has had (0: created, never saved).
    pub fn generation(&self) -> u64 {
        self.header.generation
    }

    /// The image's id, random at creation and kept by every save.
    pub fn id(&self) -> u128 {
        self.header.id
    }

    /// Pages in the guest.
    pub fn page_count(&self) -> u64 {
        self.header.page_count
    }

    /// The page size in bytes.
    pub fn page_size(&self) -> usize {
        self.header.layout.page_size().bytes()
    }

    /// Whether page `page` has data in the image (false: it is all zero, or outside the guest).
    pub fn has_data(&self, page: PageIndex) -> bool {
        page.0 < self.header.page_count && table_bit(&self.table, page.0)
    }

    /// Pages with data in the image.
    pub fn data_pages(&self) -> u64 {
        self.table.iter().map(|b| b.count_ones() as u64).sum()
    }

    /// Bytes written since the image was opened.
    pub fn io_counters(&self) -> IoCounters {
        self.io.counters
    }

    /// The file's byte offset of page `page`'s data (the format's fixed offset).
    pub fn page_offset(&self, page: PageIndex) -> Option<u64> {
        (page.0 < self.header.page_count).then(|| self.header.page_offset(page.0))
    }

    fn usable(&self) -> Result<(), ImageError> {
        self.io.check()?;
        if self.needs_recovery {
            return Err(ImageError::NeedsRecovery(self.path.clone()));
        }
        Ok(())
    }

    /// Copies page `page` into `buf` (one page long): its data, or zeroes.
    pub fn read_page(&self, page: PageIndex, buf: &mut [u8]) -> Result<(), ImageError> {
        self.usable()?;
        if page.0 >= self.header.page_count {
            return Err(ImageError::InvalidArgument(format!(
                "{page} is outside the image's {} pages",
                self.header.page_count
            )));
        }
        if buf.len() != self.page_size() {
            return Err(ImageError::InvalidArgument(format!(
                "the buffer has {} bytes, a page has {}",
                buf.len(),
                self.page_size()
            )));
        }
        if table_bit(&self.table, page.0) {
            read_exact_at(&self.file, buf, self.header.page_offset(page.0), &|| {
                format!("reading {page} of {}", self.path.display())
            })
        } else {
            buf.fill(0);
            Ok(())
        }
    }

    /// A cursor over every page in order, its data read in runs of up to 1 MiB.
    pub fn pages(&self) -> PageCursor<'_> {
        PageCursor {
            image: self,
            next: 0,
            buf: Vec::new(),
            buf_first: 0,
            buf_pages: 0,
            bytes_read: 0,
        }
    }

    /// Writes every data page of the image into `dest`, and skips zero pages: for fresh memory,
    /// which is zero already.
    pub fn restore_into<W: PageWrite + ?Sized>(
        &self,
        dest: &mut W,
    ) -> Result<RestoreStats, ImageError> {
        self.restore(dest, false)
    }

    /// Writes every page of the image into `dest`, zero pages through
    /// [`PageWrite::write_zero_page`]: for memory that may hold other contents.
    pub fn restore_over<W: PageWrite + ?Sized>(
        &self,
        dest: &mut W,
    ) -> Result<RestoreStats, ImageError> {
        self.restore(dest, true)
    }

    fn restore<W: PageWrite + ?Sized>(
        &self,
        dest: &mut W,
        zeroes: bool,
    ) -> Result<RestoreStats, ImageError> {
        let start = Instant::now();
        let zero_page = if zeroes {
            vec![0u8; self.page_size()]
        } else {
            Vec::new()
        };
        let mut stats = RestoreStats::default();
        let mut cursor = self.pages();
        while let Some(next) = cursor.next_page() {
            let (page, data) = next?;
            match data {
                Some(data) => {
                    dest.write_page(page, data)?;
                    stats.data_pages += 1;
                }
                None => {
                    if zeroes {
                        dest.write_zero_page(page, &zero_page)?;
                    }
                    stats.zero_pages += 1;
                }
            }
        }
        stats.bytes_read = cursor.bytes_read;
        stats.elapsed = start.elapsed();
        Ok(stats)
    }

    /// Saves every page of `memory` as the next generation: a new file renamed over the image.
    /// Zero pages (found by scanning, or [`PageRead::is_known_zero`]) are not written.
    pub fn save_full<R: PageRead + ?Sized>(
        &mut self,
        memory: &mut R,
    ) -> Result<SaveStats, ImageError> {
        self.usable()?;
        let start = Instant::now();
        let before = self.io.counters;
        let generation = self.next_generation()?;
        let pages = self.header.page_count;
        let page_size = self.page_size();
        let mut table = vec![0u8; self.header.table_len as usize];
        let mut stats = SaveStats::default();
        let placement = &self.header;
        let (file, header, table) =
            write_new_file(&self.path, placement, &mut self.io, |file, io| {
                let mut buf = vec![0u8; IO_CHUNK.max(page_size)];
                let cap = buf.len() / page_size;
                let mut run_first = 0u64;
                let mut run_len = 0usize;
                let mut page_buf = vec![0u8; page_size];
                for p in 0..pages {
                    let index = PageIndex(p);
                    let zero = if memory.is_known_zero(index) {
                        true
                    } else {
                        memory.read_page(index, &mut page_buf)?;
                        is_zero_page(&page_buf)
                    };
                    if run_len > 0 && (zero || run_len == cap) {
                        write_run(file, io, placement, run_first, &buf[..run_len * page_size])?;
                        run_len = 0;
                    }
                    if zero {
                        stats.zero_pages += 1;
                        continue;
                    }
                    stats.data_pages += 1;
                    set_table_bit(&mut table, p, true);
                    if run_len == 0 {
                        run_first = p;
                    }
                    buf[run_len * page_size..(run_len + 1) * page_size].copy_from_slice(&page_buf);
                    run_len += 1;
                }
                if run_len > 0 {
                    write_run(file, io, placement, run_first, &buf[..run_len * page_size])?;
                }
                let mut header = placement.clone();
                header.generation = generation;
                header.table_checksum = content_hash(&table);
                Ok((header, table))
            })?;
        self.file = file;
        self.header = header;
        self.table = table;
        stats.generation = generation;
        stats.pages = pages;
        stats.image_bytes = self.io.counters.image_bytes - before.image_bytes;
        stats.elapsed = start.elapsed();
        Ok(stats)
    }

    fn next_generation(&self) -> Result<u64, ImageError> {
        if !self.writable {
            return Err(ImageError::InvalidArgument(format!(
                "{} was opened read-only: it cannot be saved",
                self.path.display()
            )));
        }
        self.header
            .generation
            .checked_add(1)
            .ok_or_else(|| ImageError::Corrupt("the generation counter is exhausted".into()))
    }

    /// Saves the pages set in `dirty` (one bit per page of the layout: the pages written since
    /// the last save) from `memory` as the next generation, through the journal: crash-safe.
    ///
    /// If it fails, keep `dirty`: its pages are still to be saved. A failure after the journal
    /// was committed leaves the image needing recovery ([`ImageError::NeedsRecovery`]): open it
    /// again.
    pub fn save_incremental<R: PageRead + ?Sized>(
        &mut self,
        dirty: &DirtyBitmap,
        memory: &mut R,
    ) -> Result<SaveStats, ImageError> {
        self.usable()?;
        if dirty.len() != self.header.page_count {
            return Err(ImageError::InvalidArgument(format!(
                "the dirty bitmap has {} bits, the image has {} pages",
                dirty.len(),
                self.header.page_count
            )));
        }
        let start = Instant::now();
        let before = self.io.counters;
        let generation = self.next_generation()?;
        let journal_path = journal_path(&self.path);
        let journal = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&journal_path)
            .map_err(io_error(format!("creating {}", journal_path.display())))?;
        let mut stats = SaveStats::default();
        let mut table = self.table.clone();
        let written = self.write_journal(
            &journal,
            &journal_path,
            dirty,
            memory,
            generation,
            &mut table,
            &mut stats,
        );
        let (new_header, records_end) = match written {
            Ok(v) => v,
            Err(e) => {
                // Before the commit: the image is untouched. A simulated crash leaves the
                // journal behind, as a real one would.
                if !self.io.crashed {
                    drop(journal);
                    let _ = fs::remove_file(&journal_path);
                }
                return Err(e);
            }
        };
        // Committed: from here on, the new generation is what the image holds.
        let applied = apply_journal(
            &self.file,
            &journal,
            &self.path,
            &new_header,
            &self.table,
            &table,
            records_end,
            &mut self.io,
        )
        .and_then(|()| {
            drop(journal);
            finish_journal(&self.path, &mut self.io)
        });
        if let Err(e) = applied {
            self.needs_recovery = true;
            return Err(e);
        }
        self.header = new_header;
        self.table = table;
        stats.generation = generation;
        stats.image_bytes = self.io.counters.image_bytes - before.image_bytes;
        stats.journal_bytes = self.io.counters.journal_bytes - before.journal_bytes;
        stats.elapsed = start.elapsed();
        Ok(stats)
    }

    /// Writes and syncs the journal; returns the new header and where the records end.
    #[allow(clippy::too_many_arguments)]
    fn write_journal<R: PageRead + ?Sized>(
        &mut self,
        journal: &File,
        journal_path: &Path,
        dirty: &DirtyBitmap,
        memory: &mut R,
        generation: u64,
        table: &mut [u8],
        stats: &mut SaveStats,
    ) -> Result<(Header, u64), ImageError> {
        let page_size = self.page_size();
        let what = || format!("writing {}", journal_path.display());
        let mut head = [0u8; JOURNAL_HEADER_LEN];
        head[0..8].copy_from_slice(&JOURNAL_MAGIC);
        head[8..12].copy_from_slice(&1u32.to_le_bytes());
        head[16..32].copy_from_slice(&self.header.id.to_le_bytes());
        head[32..40].copy_from_slice(&self.header.generation.to_le_bytes());
        head[40..48].copy_from_slice(&generation.to_le_bytes());
        head[48..56].copy_from_slice(&self.header.page_count.to_le_bytes());
        head[56] = self.header.layout.page_size().shift() as u8;
        let mut chain = content_hash(&head);
        let mut out = Vec::with_capacity(IO_CHUNK.max(page_size) + RECORD_HEADER_LEN);
        out.extend_from_slice(&head);
        let mut at = 0u64;
        let mut page = vec![0u8; page_size];
        let mut records = 0u64;
        for p in dirty.iter_ones() {
            let index = PageIndex(p);
            let zero = if memory.is_known_zero(index) {
                true
            } else {
                memory.read_page(index, &mut page)?;
                is_zero_page(&page)
            };
            let mut rec = [0u8; RECORD_HEADER_LEN];
            rec[0..8].copy_from_slice(&p.to_le_bytes());
            if !zero {
                rec[8] = 1;
                rec[16..32].copy_from_slice(&content_hash(&page).to_le_bytes());
            }
            chain = chain_step(chain, &rec);
            out.extend_from_slice(&rec);
            if zero {
                stats.zero_pages += 1;
            } else {
                out.extend_from_slice(&page);
                stats.data_pages += 1;
            }
            set_table_bit(table, p, !zero);
            records += 1;
            if out.len() >= IO_CHUNK {
                self.io
                    .write_at(journal, &out, at, Target::Journal, &what)?;
                at += out.len() as u64;
                out.clear();
            }
        }
        let records_end = at + out.len() as u64;
        let mut header = self.header.clone();
        header.generation = generation;
        header.table_checksum = content_hash(table);
        let encoded = header.encode();
        let mut tail = [0u8; COMMIT_TAIL_LEN];
        tail[0..8].copy_from_slice(&COMMIT_MAGIC);
        tail[8..16].copy_from_slice(&records.to_le_bytes());
        tail[16..24].copy_from_slice(&(encoded.len() as u64).to_le_bytes());
        tail[24..40].copy_from_slice(&chain.to_le_bytes());
        let sum = tail_checksum(&encoded, &tail);
        tail[40..56].copy_from_slice(&sum.to_le_bytes());
        out.extend_from_slice(&encoded);
        out.extend_from_slice(&tail);
        self.io
            .write_at(journal, &out, at, Target::Journal, &what)?;
        self.io
            .sync(journal, &|| format!("syncing {}", journal_path.display()))?;
        // The journal's directory entry must be durable too, or a crash could lose the
        // journal after the image was changed in place.
        self.io.check()?;
        sync_dir(journal_path)?;
        stats.pages = records;
        Ok((header, records_end))
    }

    /// Simulates a crash for tests: once `bytes` more bytes have been written (to the image,
    /// the journal or a new file), the write that crosses the budget writes only its first part
    /// and fails with [`ImageError::Crashed`], and every later operation fails too. Nothing is
    /// cleaned up, as after a real crash: drop the image and open it again.
    #[doc(hidden)]
    pub fn inject_crash_after(&mut self, bytes: u64) {
        self.io.budget = Some(bytes);
    }
}

fn chain_step(chain: u128, record: &[u8; RECORD_HEADER_LEN]) -> u128 {
    let mut b = [0u8; 16 + RECORD_HEADER_LEN];
    b[..16].copy_from_slice(&chain.to_le_bytes());
    b[16..].copy_from_slice(record);
    content_hash(&b)
}

fn tail_checksum(header: &[u8], tail: &[u8; COMMIT_TAIL_LEN]) -> u128 {
    let mut covered = Vec::with_capacity(header.len() + 40);
    covered.extend_from_slice(header);
    covered.extend_from_slice(&tail[..40]);
    content_hash(&covered)
}

/// Writes pages `[first, first + data.len() / page size)` at their fixed offsets.
fn write_run(
    file: &File,
    io: &mut Io,
    header: &Header,
    first: u64,
    data: &[u8],
) -> Result<(), ImageError> {
    io.write_at(
        file,
        data,
        header.page_offset(first),
        Target::Image,
        &|| format!("writing page data at page {first}"),
    )
}

/// Writes a new image file at `<path>.new`, sized for `placement`'s layout: `fill` writes the
/// page data and returns the final header and table, which are written last. Then syncs it and
/// renames it over `path`. On failure the new file is removed (not after a simulated crash).
fn write_new_file<F>(
    path: &Path,
    placement: &Header,
    io: &mut Io,
    fill: F,
) -> Result<(File, Header, Vec<u8>), ImageError>
where
    F: FnOnce(&File, &mut Io) -> Result<(Header, Vec<u8>), ImageError>,
{
    let new_path = new_file_path(path);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&new_path)
        .map_err(io_error(format!("creating {}", new_path.display())))?;
    lock(&file, &new_path, true)?;
    let result = || {
        file.set_len(placement.file_len())
            .map_err(io_error(format!("sizing {}", new_path.display())))?;
        let (header, table) = fill(&file, io)?;
        io.write_at(&file, &table, header.table_offset, Target::Image, &|| {
            format!("writing the page table of {}", new_path.display())
        })?;
        io.write_at(&file, &header.encode(), 0, Target::Image, &|| {
            format!("writing the header of {}", new_path.display())
        })?;
        io.sync(&file, &|| format!("syncing {}", new_path.display()))?;
        fs::rename(&new_path, path).map_err(io_error(format!(
            "renaming {} to {}",
            new_path.display(),
            path.display()
        )))?;
        sync_dir(path)?;
        Ok((header, table))
    };
    match result() {
        Ok((header, table)) => Ok((file, header, table)),
        Err(e) => {
            if !io.crashed {
                let _ = fs::remove_file(&new_path);
            }
            Err(e)
        }
    }
}

/// Reads and parses the header of an open image file.
fn read_header(file: &File, path: &Path, limits: &Limits) -> Result<Header, ImageError> {
    let len = file_len(file, path)?;
    let mut fixed = vec![0u8; (len.min(FIXED_HEADER_LEN as u64)) as usize];
    read_exact_at(file, &mut fixed, 0, &|| {
        format!("reading {}", path.display())
    })?;
    let header_len = Header::announced_len(&fixed, path)?;
    if len < header_len as u64 {
        return Err(ImageError::WrongLength {
            actual: len,
            expected: header_len as u64,
        });
    }
    let mut b = vec![0u8; header_len];
    read_exact_at(file, &mut b, 0, &|| {
        format!("reading the header of {}", path.display())
    })?;
    Header::parse(&b, path, limits)
}

/// A journal whose commit verified.
struct Committed {
    header: Header,
    base: u64,
    /// (page, has data), in order.
    records: Vec<(u64, bool)>,
    records_end: u64,
}

/// Verifies the journal at `journal`: `Some` if it is committed (every checksum holds), `None`
/// if it is not (a save cut short: discard it).
fn check_journal(
    journal: &File,
    image_path: &Path,
    limits: &Limits,
) -> Result<Option<Committed>, ImageError> {
    let jpath = journal_path(image_path);
    let len = file_len(journal, &jpath)?;
    let min = (JOURNAL_HEADER_LEN + FIXED_HEADER_LEN + REGION_ENTRY_LEN + COMMIT_TAIL_LEN) as u64;
    if len < min {
        return Ok(None);
    }
    let what = || format!("reading {}", jpath.display());
    let mut head = [0u8; JOURNAL_HEADER_LEN];
    read_exact_at(journal, &mut head, 0, &what)?;
    let mut tail = [0u8; COMMIT_TAIL_LEN];
    read_exact_at(journal, &mut tail, len - COMMIT_TAIL_LEN as u64, &what)?;
    if head[0..8] != JOURNAL_MAGIC || tail[0..8] != COMMIT_MAGIC || u32_at(&head, 8) != 1 {
        return Ok(None);
    }
    let count = u64_at(&tail, 8);
    let header_len = u64_at(&tail, 16);
    let max_header = (FIXED_HEADER_LEN + REGION_ENTRY_LEN * MAX_REGIONS) as u64;
    if header_len > max_header || header_len + (JOURNAL_HEADER_LEN + COMMIT_TAIL_LEN) as u64 > len {
        return Ok(None);
    }
    let records_end = len - COMMIT_TAIL_LEN as u64 - header_len;
    let mut encoded = vec![0u8; header_len as usize];
    read_exact_at(journal, &mut encoded, records_end, &what)?;
    if tail_checksum(&encoded, &tail) != u128_at(&tail, 40) {
        return Ok(None);
    }
    // From here the commit tail is intact: the save reached its commit. Anything wrong now is
    // a journal that does not fit, not a save cut short.
    let bad =
        |why: String| ImageError::ForeignJournal(format!("{} is damaged: {why}", jpath.display()));
    let header = Header::parse(&encoded, image_path, limits).map_err(|e| match e {
        ImageError::TooLarge { .. } => e,
        e => bad(e.to_string()),
    })?;
    let base = u64_at(&head, 32);
    if u128_at(&head, 16) != header.id
        || u64_at(&head, 40) != header.generation
        || base.checked_add(1) != Some(header.generation)
        || u64_at(&head, 48) != header.page_count
        || head[56] as u32 != header.layout.page_size().shift()
        || head[12..16] != [0; 4]
        || head[57..64] != [0; 7]
    {
        return Err(bad(
            "its header does not match the image header it carries".into()
        ));
    }
    if count > header.page_count {
        return Err(bad(format!(
            "{count} records for {} pages",
            header.page_count
        )));
    }
    // Walk the records: the chain and each page's hash. A mismatch means the records did not
    // all reach the disk before the crash (the commit tail did): the save never applied.
    let page_size = header.page_size() as usize;
    let mut chain = content_hash(&head);
    let mut at = JOURNAL_HEADER_LEN as u64;
    let mut records = Vec::new();
    let mut page = vec![0u8; page_size];
    let mut last: Option<u64> = None;
    for _ in 0..count {
        if at + RECORD_HEADER_LEN as u64 > records_end {
            return Ok(None);
        }
        let mut rec = [0u8; RECORD_HEADER_LEN];
        read_exact_at(journal, &mut rec, at, &what)?;
        at += RECORD_HEADER_LEN as u64;
        chain = chain_step(chain, &rec);
        let index = u64_at(&rec, 0);
        let kind = rec[8];
        if kind > 1
            || rec[9..16] != [0; 7]
            || index >= header.page_count
            || last.is_some_and(|l| index <= l)
        {
            return Ok(None);
        }
        last = Some(index);
        if kind == 1 {
            if at + page_size as u64 > records_end {
                return Ok(None);
            }
            read_exact_at(journal, &mut page, at, &what)?;
            at += page_size as u64;
            if content_hash(&page) != u128_at(&rec, 16) {
                return Ok(None);
            }
        } else if u128_at(&rec, 16) != 0 {
            return Ok(None);
        }
        records.push((index, kind == 1));
    }
    if at != records_end || chain != u128_at(&tail, 24) {
        return Ok(None);
    }
    Ok(Some(Committed {
        header,
        base,
        records,
        records_end,
    }))
}

/// A sequential reader over a journal's records.
struct JournalReader<'a> {
    file: &'a File,
    path: &'a Path,
    pos: u64,
    end: u64,
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl JournalReader<'_> {
    /// The next `n` bytes (`n` at most the buffer's size).
    fn take(&mut self, n: usize) -> Result<&[u8], ImageError> {
        if self.len < n {
            self.buf.copy_within(self.start..self.start + self.len, 0);
            self.start = 0;
            let want = ((self.buf.len() - self.len) as u64).min(self.end - self.pos) as usize;
            if self.len + want < n {
                return Err(ImageError::Corrupt(format!(
                    "{} ends inside a record",
                    self.path.display()
                )));
            }
            let (len, pos) = (self.len, self.pos);
            read_exact_at(self.file, &mut self.buf[len..len + want], pos, &|| {
                format!("reading {}", self.path.display())
            })?;
            self.pos += want as u64;
            self.len += want;
        }
        let s = &self.buf[self.start..self.start + n];
        self.start += n;
        self.len -= n;
        Ok(s)
    }

    fn done(&self) -> bool {
        self.len == 0 && self.pos >= self.end
    }
}

/// Applies a committed journal to the image in place: pages (runs written together, zero runs
/// punched out), the changed blocks of the table, the header; then syncs the image.
#[allow(clippy::too_many_arguments)]
fn apply_journal(
    image: &File,
    journal: &File,
    path: &Path,
    header: &Header,
    old_table: &[u8],
    new_table: &[u8],
    records_end: u64,
    io: &mut Io,
) -> Result<(), ImageError> {
    let page_size = header.page_size() as usize;
    let jpath = journal_path(path);
    let mut reader = JournalReader {
        file: journal,
        path: &jpath,
        pos: JOURNAL_HEADER_LEN as u64,
        end: records_end,
        buf: vec![0u8; 2 * (IO_CHUNK.max(page_size) + RECORD_HEADER_LEN)],
        start: 0,
        len: 0,
    };
    let cap = IO_CHUNK.max(page_size) / page_size;
    let mut run = Vec::with_capacity(cap * page_size);
    let mut run_first = 0u64;
    let mut zero_first = 0u64;
    let mut zero_len = 0u64;
    while !reader.done() {
        let rec = reader.take(RECORD_HEADER_LEN)?;
        let page = u64_at(rec, 0);
        let data = rec[8] == 1;
        if page >= header.page_count {
            return Err(ImageError::Corrupt(format!(
                "{} names page {page}",
                jpath.display()
            )));
        }
        let run_pages = (run.len() / page_size) as u64;
        if !run.is_empty() && (!data || page != run_first + run_pages || run_pages as usize == cap)
        {
            write_run(image, io, header, run_first, &run)?;
            run.clear();
        }
        if zero_len > 0 && (data || page != zero_first + zero_len) {
            punch(image, io, header, zero_first, zero_len)?;
            zero_len = 0;
        }
        if data {
            if run.is_empty() {
                run_first = page;
            }
            let bytes = reader.take(page_size)?;
            run.extend_from_slice(bytes);
        } else {
            if zero_len == 0 {
                zero_first = page;
            }
            zero_len += 1;
        }
    }
    if !run.is_empty() {
        write_run(image, io, header, run_first, &run)?;
    }
    if zero_len > 0 {
        punch(image, io, header, zero_first, zero_len)?;
    }
    let what = || format!("writing the page table of {}", path.display());
    for (i, (old, new)) in old_table
        .chunks(BLOCK as usize)
        .zip(new_table.chunks(BLOCK as usize))
        .enumerate()
    {
        if old != new {
            io.write_at(
                image,
                new,
                header.table_offset + i as u64 * BLOCK,
                Target::Image,
                &what,
            )?;
        }
    }
    io.write_at(image, &header.encode(), 0, Target::Image, &|| {
        format!("writing the header of {}", path.display())
    })?;
    io.sync(image, &|| format!("syncing {}", path.display()))
}

/// Frees the disk blocks of `count` zero pages from `first` (Linux; elsewhere the stale bytes
/// stay, unread, since the table says the pages are zero).
fn punch(
    image: &File,
    io: &mut Io,
    header: &Header,
    first: u64,
    count: u64,
) -> Result<(), ImageError> {
    io.check()?;
    #[cfg(target_os = "linux")]
    {
        let at = header.page_offset(first);
        let len = count * header.page_size();
        // SAFETY: fallocate on a descriptor the image owns; no memory is involved.
        let r = unsafe {
            libc::fallocate(
                image.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                at as libc::off_t,
                len as libc::off_t,
            )
        };
        // A file system that cannot punch holes keeps the bytes: harmless, they are never read.
        let _ = r;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (image, header, first, count);
    Ok(())
}

/// Removes the journal once it is applied, and makes that durable.
fn finish_journal(path: &Path, io: &mut Io) -> Result<(), ImageError> {
    io.check()?;
    let journal = journal_path(path);
    fs::remove_file(&journal).map_err(io_error(format!("removing {}", journal.display())))?;
    sync_dir(path)
}

/// Every page of an image in order, data read in runs: a lending iterator
/// ([`PageCursor::next_page`]), for restores and for hashing what an image holds.
pub struct PageCursor<'a> {
    image: &'a Image,
    next: u64,
    buf: Vec<u8>,
    buf_first: u64,
    buf_pages: u64,
    bytes_read: u64,
}

impl PageCursor<'_> {
    /// The next page and its bytes (`None`: a zero page), or `None` after the last page.
    #[allow(clippy::type_complexity)]
    pub fn next_page(&mut self) -> Option<Result<(PageIndex, Option<&[u8]>), ImageError>> {
        let image = self.image;
        if let Err(e) = image.usable() {
            return Some(Err(e));
        }
        let pages = image.header.page_count;
        let p = self.next;
        if p >= pages {
            return None;
        }
        self.next += 1;
        if !table_bit(&image.table, p) {
            return Some(Ok((PageIndex(p), None)));
        }
        let page_size = image.page_size();
        if !(self.buf_first..self.buf_first + self.buf_pages).contains(&p) {
            let cap = (IO_CHUNK.max(page_size) / page_size) as u64;
            let mut n = 1;
            while n < cap && p + n < pages && table_bit(&image.table, p + n) {
                n += 1;
            }
            self.buf.resize(n as usize * page_size, 0);
            if let Err(e) = read_exact_at(
                &image.file,
                &mut self.buf,
                image.header.page_offset(p),
                &|| format!("reading page {p} of {}", image.path.display()),
            ) {
                return Some(Err(e));
            }
            self.bytes_read += self.buf.len() as u64;
            self.buf_first = p;
            self.buf_pages = n;
        }
        let at = (p - self.buf_first) as usize * page_size;
        Some(Ok((PageIndex(p), Some(&self.buf[at..at + page_size]))))
    }
}

/// An image is content a destination may already hold: the image a VM left on this host
/// (memory reuse on return, paper 003) is announced to the source (hash-first), which then
/// sends only the pages that differ.
impl memferry::hashfirst::ContentSource for Image {
    fn page_count(&self) -> u64 {
        self.header.page_count
    }

    fn read_content(&mut self, index: u64, buf: &mut [u8]) -> Result<(), HostError> {
        self.read_page(PageIndex(index), buf)
            .map_err(|e| HostError::new(format!("image {}: {e}", self.path.display())))
    }
}

// ---------------------------------------------------------------------------------------------
// Memory reuse on return (paper 003): which pages of the image a VM left behind are worth
// keeping.
// ---------------------------------------------------------------------------------------------

/// The first 8 bytes of a keep map (`<image>.keep`).
pub const KEEP_MAGIC: [u8; 8] = *b"MFRYKEEP";
/// The keep map format version this module reads and writes.
pub const KEEP_VERSION: u32 = 1;
/// The keep map's fixed header.
pub const KEEP_HEADER_LEN: usize = 64;

/// The keep map of the image at `path`: `<path>.keep`.
pub fn keep_path(path: &Path) -> PathBuf {
    with_suffix(path, ".keep")
}

/// Paper 003's two rules for the image a VM leaves behind on a host it may return to: "a page
/// that is updated on another host is no longer needed because the page cannot be reused", and
/// "a memory page that has strong possibility of update in a near future does not need to be
/// cached". A page a rule drops is never offered for reuse (never announced as held content,
/// so never trusted); it simply travels again if the VM returns.
///
/// The default, [`KeepRules::PAPER`], applies both; [`KeepRules::KEEP_ALL`] keeps every page
/// (every non-zero page of the image is offered, as an image without a keep map is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepRules {
    /// Rule 2: drop the pages likely to be updated soon: the writable working set at
    /// departure (the pages the guest dirtied in its last interval before it left).
    pub drop_hot: bool,
    /// Rule 1: drop the pages updated elsewhere: pages the host the VM ran on says it wrote
    /// ([`KeptImage::note_updated_elsewhere`]), and pages whose content in the image is no
    /// longer what the VM left (rewritten after departure, found by hash when read).
    pub drop_updated: bool,
}

impl KeepRules {
    /// Both rules (the default).
    pub const PAPER: KeepRules = KeepRules {
        drop_hot: true,
        drop_updated: true,
    };
    /// Neither rule: every page with data is kept.
    pub const KEEP_ALL: KeepRules = KeepRules {
        drop_hot: false,
        drop_updated: false,
    };

    /// The CLI's name: `rules` (both), `all` (neither), `hot` (rule 2 only), `updated`
    /// (rule 1 only).
    pub fn name(self) -> &'static str {
        match (self.drop_hot, self.drop_updated) {
            (true, true) => "rules",
            (false, false) => "all",
            (true, false) => "hot",
            (false, true) => "updated",
        }
    }

    /// Parses a [`KeepRules::name`].
    pub fn parse(name: &str) -> Option<KeepRules> {
        Some(match name {
            "rules" => KeepRules::PAPER,
            "all" => KeepRules::KEEP_ALL,
            "hot" => KeepRules {
                drop_hot: true,
                drop_updated: false,
            },
            "updated" => KeepRules {
                drop_hot: false,
                drop_updated: true,
            },
            _ => return None,
        })
    }

    fn bits(self) -> u32 {
        u32::from(self.drop_hot) | u32::from(self.drop_updated) << 1
    }

    fn from_bits(bits: u32) -> Option<KeepRules> {
        (bits < 4).then_some(KeepRules {
            drop_hot: bits & 1 != 0,
            drop_updated: bits & 2 != 0,
        })
    }
}

impl Default for KeepRules {
    fn default() -> Self {
        KeepRules::PAPER
    }
}

/// How many pages of an image are kept for reuse, and why the others are not. Every page is in
/// exactly one of `kept`, `zero`, `dropped_hot` and `dropped_updated`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeepStats {
    /// The rules applied.
    pub rules: KeepRules,
    /// Pages in the guest.
    pub pages: u64,
    /// Pages kept: offered for reuse when the VM returns.
    pub kept: u64,
    /// Pages that were all zero (nothing to keep: a zero page travels as a header anyway).
    pub zero: u64,
    /// Rule 2: pages dropped as likely to be updated soon (dirtied just before departure).
    pub dropped_hot: u64,
    /// Rule 1: pages dropped as updated elsewhere, or rewritten in the image since departure.
    pub dropped_updated: u64,
}

impl KeepStats {
    /// One line for people: `kept 900 of 1024 pages; dropped 60 likely to be updated soon, 4
    /// updated elsewhere; 60 zero`.
    pub fn describe(&self) -> String {
        format!(
            "kept {} of {} pages (rules: {}); dropped {} likely to be updated soon (dirtied \
             just before departure), {} updated elsewhere; {} zero",
            self.kept,
            self.pages,
            self.rules.name(),
            self.dropped_hot,
            self.dropped_updated,
            self.zero
        )
    }
}

/// Where a page of a kept image stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keep {
    Kept,
    Zero,
    Hot,
    Updated,
}

fn bump(stats: &mut KeepStats, state: Keep, by: i64) {
    let slot = match state {
        Keep::Kept => &mut stats.kept,
        Keep::Zero => &mut stats.zero,
        Keep::Hot => &mut stats.dropped_hot,
        Keep::Updated => &mut stats.dropped_updated,
    };
    *slot = slot.saturating_add_signed(by);
}

/// A page's hash in a keep map: 0 for an all-zero page.
fn keep_hash(page: &[u8]) -> u128 {
    if is_zero_page(page) {
        0
    } else {
        content_hash(page).max(1)
    }
}

fn keep_map_len(pages: u64) -> Option<u64> {
    (KEEP_HEADER_LEN as u64)
        .checked_add(pages.div_ceil(8))?
        .checked_add(pages.checked_mul(16)?)?
        .checked_add(16)
}

impl Image {
    /// Records, beside the image, what is worth keeping of it for the VM's return (paper
    /// 003): writes the keep map `<image>.keep` (crash-safe: a new file renamed into place).
    /// `hot` has one bit per page: the pages the guest dirtied just before it left (its
    /// writable working set at departure), which [`KeepRules::drop_hot`] drops. The map also
    /// holds every page's content hash, so that pages rewritten after departure are found and
    /// dropped ([`KeepRules::drop_updated`]) when the image is offered ([`KeptImage`]).
    ///
    /// The image itself is untouched and restores as before: the map only governs what is
    /// offered for reuse.
    ///
    /// # Keep map format
    /// Little-endian. A 64-byte header: magic `MFRYKEEP` ([`KEEP_MAGIC`]), version u32 = 1,
    /// rules u32 (bit 0 drop hot, bit 1 drop updated), image id u128, the image's generation
    /// u64 at departure, page count u64, hot pages u64, kept pages u64. Then the hot bitmap
    /// (⌈pages / 8⌉ bytes, bit `i % 8` of byte `i / 8`), then one xxh3-128 per page (0 for a
    /// zero page), then an xxh3-128 of everything before it.
    pub fn keep_for_reuse(
        &self,
        hot: &DirtyBitmap,
        rules: KeepRules,
    ) -> Result<KeepStats, ImageError> {
        self.usable()?;
        if !self.writable {
            return Err(ImageError::InvalidArgument(format!(
                "{} was opened read-only: its keep map cannot be written",
                self.path.display()
            )));
        }
        let pages = self.header.page_count;
        if hot.len() != pages {
            return Err(ImageError::InvalidArgument(format!(
                "the hot bitmap has {} bits, the image has {pages} pages",
                hot.len()
            )));
        }
        let len = keep_map_len(pages)
            .ok_or_else(|| ImageError::InvalidArgument("the image is too large".into()))?;
        let mut out = Vec::with_capacity(len as usize);
        out.resize(KEEP_HEADER_LEN, 0);
        let mut bits = vec![0u8; pages.div_ceil(8) as usize];
        let mut hashes = Vec::with_capacity(pages as usize * 16);
        let mut stats = KeepStats {
            rules,
            pages,
            ..KeepStats::default()
        };
        let mut cursor = self.pages();
        while let Some(next) = cursor.next_page() {
            let (page, data) = next?;
            let hash = data.map_or(0, keep_hash);
            hashes.extend_from_slice(&hash.to_le_bytes());
            let is_hot = hot.get(page.0);
            if is_hot {
                set_table_bit(&mut bits, page.0, true);
            }
            let state = if hash == 0 {
                Keep::Zero
            } else if is_hot && rules.drop_hot {
                Keep::Hot
            } else {
                Keep::Kept
            };
            bump(&mut stats, state, 1);
        }
        out[0..8].copy_from_slice(&KEEP_MAGIC);
        out[8..12].copy_from_slice(&KEEP_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&rules.bits().to_le_bytes());
        out[16..32].copy_from_slice(&self.header.id.to_le_bytes());
        out[32..40].copy_from_slice(&self.header.generation.to_le_bytes());
        out[40..48].copy_from_slice(&pages.to_le_bytes());
        out[48..56].copy_from_slice(&hot.count_ones().to_le_bytes());
        out[56..64].copy_from_slice(&stats.kept.to_le_bytes());
        out.extend_from_slice(&bits);
        out.extend_from_slice(&hashes);
        let sum = content_hash(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        let path = keep_path(&self.path);
        let new = with_suffix(&path, ".new");
        let what = || format!("writing {}", new.display());
        let file = File::create(&new).map_err(|e| io_error(what())(e))?;
        file.write_all_at(&out, 0)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_error(what())(e))?;
        drop(file);
        fs::rename(&new, &path).map_err(io_error(format!(
            "renaming {} to {}",
            new.display(),
            path.display()
        )))?;
        sync_dir(&path)?;
        Ok(stats)
    }
}

/// What a keep map holds, checked.
struct KeepMap {
    rules: KeepRules,
    hot: Vec<u8>,
    hashes: Vec<u128>,
}

/// Reads and checks the keep map of `image`, if there is one.
fn read_keep_map(image: &Image) -> Result<Option<KeepMap>, ImageError> {
    let path = keep_path(&image.path);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(format!("opening {}", path.display()))(e)),
    };
    let pages = image.header.page_count;
    let bad = |why: String| ImageError::Corrupt(format!("keep map {}: {why}", path.display()));
    let expected = keep_map_len(pages).ok_or_else(|| bad("the image is too large".into()))?;
    let actual = file_len(&file, &path)?;
    if actual != expected {
        return Err(bad(format!(
            "{actual} bytes, an image of {pages} pages needs {expected}"
        )));
    }
    let mut b = vec![0u8; expected as usize];
    read_exact_at(&file, &mut b, 0, &|| format!("reading {}", path.display()))?;
    let body = b.len() - 16;
    if b[0..8] != KEEP_MAGIC {
        return Err(bad("no MFRYKEEP magic".into()));
    }
    if content_hash(&b[..body]) != u128_at(&b, body) {
        return Err(ImageError::ChecksumMismatch("keep map"));
    }
    let version = u32_at(&b, 8);
    if version != KEEP_VERSION {
        return Err(bad(format!(
            "version {version} (this build reads {KEEP_VERSION})"
        )));
    }
    let rules =
        KeepRules::from_bits(u32_at(&b, 12)).ok_or_else(|| bad("unknown rule bits".into()))?;
    if u128_at(&b, 16) != image.header.id {
        return Err(bad(format!(
            "it belongs to another image than {}; move it away to offer every page",
            image.path.display()
        )));
    }
    if u64_at(&b, 40) != pages {
        return Err(bad(format!(
            "{} pages, the image has {pages}",
            u64_at(&b, 40)
        )));
    }
    let bits_end = KEEP_HEADER_LEN + pages.div_ceil(8) as usize;
    let hot = b[KEEP_HEADER_LEN..bits_end].to_vec();
    check_table_tail(&hot, pages)?;
    let hashes = b[bits_end..body]
        .chunks_exact(16)
        .map(|c| u128_at(c, 0))
        .collect();
    Ok(Some(KeepMap { rules, hot, hashes }))
}

/// The image a VM left on this host, offered for its return (paper 003) with the keep rules
/// applied: a [`memferry::hashfirst::ContentSource`] that offers only the pages worth keeping.
/// A dropped page reads as all zero, and a hash-first destination never announces zero
/// content, so a dropped page is never announced and never trusted: it travels again in full.
///
/// Without a keep map (an image saved before there were any, or by a tool that writes none),
/// every page with data is offered, and only [`KeptImage::note_updated_elsewhere`] drops any.
pub struct KeptImage {
    image: Image,
    rules: KeepRules,
    /// One per page.
    state: Vec<Keep>,
    /// The content hash of each page at departure (from the keep map).
    hashes: Option<Vec<u128>>,
    stats: Arc<Mutex<KeepStats>>,
}

impl KeptImage {
    /// Opens the image at `path` read-only with the rules its keep map recorded (all pages
    /// offered when it has none).
    pub fn open(path: impl AsRef<Path>, limits: Limits) -> Result<KeptImage, ImageError> {
        Self::open_with(path, limits, None, Arc::default())
    }

    /// [`KeptImage::open`], with `rules` instead of the recorded ones (when `Some`), counting
    /// into `stats` (a handle the caller keeps to read the figures after a migration used
    /// this image).
    pub fn open_with(
        path: impl AsRef<Path>,
        limits: Limits,
        rules: Option<KeepRules>,
        stats: Arc<Mutex<KeepStats>>,
    ) -> Result<KeptImage, ImageError> {
        let image = Image::open_read_only(path, limits)?;
        let map = read_keep_map(&image)?;
        let rules = rules.unwrap_or(match &map {
            Some(m) => m.rules,
            None => KeepRules::KEEP_ALL,
        });
        let pages = image.header.page_count;
        let mut counts = KeepStats {
            rules,
            pages,
            ..KeepStats::default()
        };
        let mut state = Vec::with_capacity(pages as usize);
        for p in 0..pages {
            let s = match &map {
                Some(m) if m.hashes.get(p as usize) == Some(&0) => Keep::Zero,
                Some(m) if rules.drop_hot && table_bit(&m.hot, p) => Keep::Hot,
                Some(_) => Keep::Kept,
                None if !table_bit(&image.table, p) => Keep::Zero,
                None => Keep::Kept,
            };
            bump(&mut counts, s, 1);
            state.push(s);
        }
        if let Ok(mut s) = stats.lock() {
            *s = counts;
        }
        Ok(KeptImage {
            image,
            rules,
            state,
            hashes: map.map(|m| m.hashes),
            stats,
        })
    }

    /// The image.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// The rules applied.
    pub fn rules(&self) -> KeepRules {
        self.rules
    }

    /// Rule 1 with outside knowledge: `pages` (one bit per page) were written on the host the
    /// VM ran on since it left, so their kept copies cannot be reused. Nothing is dropped when
    /// [`KeepRules::drop_updated`] is off.
    pub fn note_updated_elsewhere(&mut self, pages: &DirtyBitmap) -> Result<(), ImageError> {
        if pages.len() != self.image.header.page_count {
            return Err(ImageError::InvalidArgument(format!(
                "the bitmap has {} bits, the image has {} pages",
                pages.len(),
                self.image.header.page_count
            )));
        }
        if self.rules.drop_updated {
            for p in pages.iter_ones() {
                self.set_state(p, Keep::Updated);
            }
        }
        Ok(())
    }

    /// Whether page `index` is offered for reuse (as far as is known: a page rewritten in the
    /// image since departure is found when it is read).
    pub fn offers(&self, index: u64) -> bool {
        self.state.get(index as usize) == Some(&Keep::Kept)
    }

    /// The figures so far.
    pub fn stats(&self) -> KeepStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// The shared handle the figures are counted into.
    pub fn stats_handle(&self) -> Arc<Mutex<KeepStats>> {
        self.stats.clone()
    }

    fn set_state(&mut self, index: u64, to: Keep) {
        if let Some(s) = self.state.get_mut(index as usize) {
            if *s != to {
                if let Ok(mut stats) = self.stats.lock() {
                    bump(&mut stats, *s, -1);
                    bump(&mut stats, to, 1);
                }
                *s = to;
            }
        }
    }
}

impl memferry::hashfirst::ContentSource for KeptImage {
    fn page_count(&self) -> u64 {
        self.image.header.page_count
    }

    fn read_content(&mut self, index: u64, buf: &mut [u8]) -> Result<(), HostError> {
        let state = self
            .state
            .get(index as usize)
            .copied()
            .ok_or_else(|| HostError::new(format!("page {index} is outside the image")))?;
        if matches!(state, Keep::Hot | Keep::Updated) {
            buf.fill(0);
            return Ok(());
        }
        self.image
            .read_page(PageIndex(index), buf)
            .map_err(|e| HostError::new(format!("image {}: {e}", self.image.path.display())))?;
        let departed = self
            .hashes
            .as_ref()
            .and_then(|h| h.get(index as usize).copied());
        if let (true, Some(departed)) = (self.rules.drop_updated, departed) {
            if keep_hash(buf) != departed {
                // Rewritten since the VM left: not the page it left, not worth keeping.
                self.set_state(index, Keep::Updated);
                buf.fill(0);
            }
        }
        Ok(())
    }
}
