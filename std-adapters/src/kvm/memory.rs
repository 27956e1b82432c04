//! Any vm-memory `GuestMemoryMmap<AtomicBitmap>` as memferry's page source and sink, region by
//! region: region `i` of the memory (in address order) is the layout's region `i`, with the
//! memslot number the VMM gave it as its id, so holes between regions cost nothing.
//!
//! Reads copy with relaxed atomic 64-bit loads (the vCPUs write the same memory concurrently;
//! a torn page is sent again because the dirty log reports it). A [`ReadHook`] runs before each
//! read: the manual-protect dirty log re-arms a chunk's write protection there, just before its
//! pages are read ([`super::dirty`]). Writes on the destination skip all-zero pages for memory
//! never written: fresh anonymous memory is zero already, and stays unallocated.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memferry::error::HostError;
use memferry::memory::{PageRead, PageWrite};
use memferry::page::{MemoryLayout, PageIndex, PageSize, Region};
use memferry::plan::SharedPageRead;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::vm::Memory;
use super::KvmError;

/// Runs before a page is read (on any thread that reads pages).
pub trait ReadHook: Send + Sync {
    /// Page `page` of the region at position `region` of the layout is about to be read.
    fn before_read(&self, region: usize, page: u64) -> Result<(), HostError>;
}

/// One region as the host sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostRegion {
    /// Its memslot.
    pub slot: u32,
    /// Guest-physical base.
    pub guest_base: u64,
    /// Bytes.
    pub bytes: u64,
    /// Where it is mapped in this process.
    pub host_addr: usize,
}

/// Guest memory as pages: the layout, reads, writes.
#[derive(Clone)]
pub struct KvmMemory {
    memory: Arc<Memory>,
    layout: MemoryLayout,
    regions: Vec<HostRegion>,
    hook: Option<Arc<dyn ReadHook>>,
}

impl KvmMemory {
    /// `memory`'s regions as a layout of 4 KiB pages; `slots[i]` is the memslot of region `i`
    /// (address order). Regions must be whole pages.
    pub fn new(memory: Arc<Memory>, slots: &[u32]) -> Result<Self, KvmError> {
        if memory.num_regions() != slots.len() {
            return Err(KvmError::new(format!(
                "guest memory has {} regions but {} memslots were named",
                memory.num_regions(),
                slots.len()
            )));
        }
        let page = PageSize::DEFAULT.bytes() as u64;
        let mut regions = Vec::new();
        for (slot, region) in slots.iter().zip(memory.iter()) {
            let bytes = region.len();
            if !bytes.is_multiple_of(page) || !region.start_addr().0.is_multiple_of(page) {
                return Err(KvmError::new(format!(
                    "memslot {slot} is not made of whole 4 KiB pages"
                )));
            }
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| KvmError::new(format!("memslot {slot} has no host address: {e}")))?;
            regions.push(HostRegion {
                slot: *slot,
                guest_base: region.start_addr().0,
                bytes,
                host_addr: host as usize,
            });
        }
        let layout = MemoryLayout::new(
            PageSize::DEFAULT,
            regions
                .iter()
                .map(|r| Region {
                    id: r.slot,
                    guest_base: r.guest_base,
                    pages: r.bytes / page,
                })
                .collect(),
        )
        .map_err(|e| KvmError::new(format!("guest memory is not a valid layout: {e}")))?;
        Ok(KvmMemory {
            memory,
            layout,
            regions,
            hook: None,
        })
    }

    /// The same memory with `hook` run before every read.
    pub fn with_read_hook(mut self, hook: Option<Arc<dyn ReadHook>>) -> Self {
        self.hook = hook;
        self
    }

    /// The layout (region ids are memslots).
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The regions, in layout order.
    pub fn regions(&self) -> &[HostRegion] {
        &self.regions
    }

    /// The vm-memory object.
    pub fn memory(&self) -> &Arc<Memory> {
        &self.memory
    }

    /// The host address of `page`, and its region's position and page within it.
    fn locate(&self, page: PageIndex) -> Result<(usize, u64, *mut u8), HostError> {
        let (i, within) = self.layout.locate(page).ok_or_else(|| {
            HostError::new(format!(
                "{page} is outside the guest's {} pages",
                self.layout.page_count()
            ))
        })?;
        let at = self.regions[i].host_addr + (within as usize) * PageSize::DEFAULT.bytes();
        Ok((i, within, at as *mut u8))
    }

    /// Copies page `page` into `buf` (one page), with atomic loads.
    pub fn read(&self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError> {
        let size = PageSize::DEFAULT.bytes();
        if buf.len() != size {
            return Err(HostError::new("read buffer is not one page long"));
        }
        let (region, within, at) = self.locate(page)?;
        if let Some(hook) = &self.hook {
            hook.before_read(region, within)?;
        }
        copy_page_atomic(at, buf);
        Ok(())
    }

    /// Writes one page (the guest must not be running: a destination before its start).
    pub fn write(&self, page: PageIndex, data: &[u8]) -> Result<(), HostError> {
        let size = PageSize::DEFAULT.bytes();
        if data.len() != size {
            return Err(HostError::new("page data is not one page long"));
        }
        let (_, _, at) = self.locate(page)?;
        // SAFETY: in bounds of a live mapping; nothing else writes it (the guest is not
        // running), and readers use atomic loads.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), at, size) };
        Ok(())
    }
}

impl KvmMemory {
    /// The digest of every page (memferry's order-independent memory digest, as the engine
    /// verifies with). Only meaningful while nothing writes the memory.
    pub fn digest(&self) -> Result<u128, HostError> {
        let mut d = memferry::digest::MemoryDigest::new();
        let mut buf = vec![0u8; PageSize::DEFAULT.bytes()];
        for i in 0..self.layout.page_count() {
            // As `read`, without the hook (nothing is re-armed for a digest).
            let (_, _, at) = self.locate(PageIndex(i))?;
            copy_page_atomic(at, &mut buf);
            d.add_page(i, &buf);
        }
        Ok(d.value())
    }
}

/// Copies the page at `at` (as [`KvmMemory::locate`] gives it) into `buf` (one page) with
/// atomic loads: the guest may be writing it.
fn copy_page_atomic(at: *mut u8, buf: &mut [u8]) {
    // SAFETY: `at` is a page inside a live mapping (the memory's Arc holds it), page-aligned,
    // so every u64 is aligned; `buf` is one page. The guest writes concurrently: atomic loads
    // make that defined.
    let words = unsafe { std::slice::from_raw_parts(at.cast::<AtomicU64>(), buf.len() / 8) };
    for (word, out) in words.iter().zip(buf.chunks_exact_mut(8)) {
        out.copy_from_slice(&word.load(Ordering::Relaxed).to_ne_bytes());
    }
}

impl SharedPageRead for KvmMemory {
    fn read_page_shared(&self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError> {
        self.read(page, buf)
    }
}

impl PageRead for KvmMemory {
    fn read_page(&mut self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError> {
        self.read(page, buf)
    }
}

/// The destination's page sink: writes pages, and skips zero pages for memory never written.
pub struct PageSink {
    memory: KvmMemory,
    written: Vec<u64>,
    /// Zero pages not written because the memory was fresh.
    pub zero_pages_skipped: u64,
}

impl PageSink {
    /// A sink into fresh guest memory (all zero, nothing written yet).
    pub fn new(memory: KvmMemory) -> Self {
        let words = memory.layout().page_count().div_ceil(64) as usize;
        PageSink {
            memory,
            written: vec![0; words],
            zero_pages_skipped: 0,
        }
    }

    /// The memory.
    pub fn memory(&self) -> &KvmMemory {
        &self.memory
    }
}

impl PageWrite for PageSink {
    fn write_page(&mut self, page: PageIndex, data: &[u8]) -> Result<(), HostError> {
        self.memory.write(page, data)?;
        if let Some(w) = self.written.get_mut((page.0 / 64) as usize) {
            *w |= 1 << (page.0 % 64);
        }
        Ok(())
    }

    fn write_zero_page(&mut self, page: PageIndex, zeroes: &[u8]) -> Result<(), HostError> {
        let never_written = self
            .written
            .get((page.0 / 64) as usize)
            .is_some_and(|w| w & (1 << (page.0 % 64)) == 0);
        if never_written && zeroes.len() == PageSize::DEFAULT.bytes() {
            self.zero_pages_skipped += 1;
            return Ok(());
        }
        self.write_page(page, zeroes)
    }
}
