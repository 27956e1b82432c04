//! Guest memory for the std side: an anonymous mmap ([`GuestRegion`]) that a workload thread
//! writes while the migration thread reads, the atomic dirty bitmap the workload marks, and the
//! two hosts the core engine talks to: [`SourceHost`] and [`DestinationHost`].
//!
//! Memory shared with a running guest is read and written with relaxed atomic 64-bit loads and
//! stores, never with a plain `copy_nonoverlapping` from memory another thread writes (that is
//! undefined behaviour in Rust's memory model). A page torn by a concurrent write is harmless
//! because the writer marks the page dirty *after* writing it, so the page is sent again in a
//! later round, and the last round runs with the guest paused.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memferry::bitmap::{AtomicDirtyBitmap, DirtyBitmap};
use memferry::error::HostError;
use memferry::memory::{DestinationGuest, DirtyLog, PageRead, PageWrite, SourceGuest};
use memferry::page::{Geometry, PageIndex, Region};
use memmap2::MmapMut;

use crate::workload::WorkloadHandle;

/// A guest's memory: one anonymous, private mapping of `geometry.memory_bytes()` bytes.
pub struct GuestRegion {
    map: MmapMut,
    geometry: Geometry,
}

// SAFETY: the mapping is plain memory; concurrent access goes through raw pointers in the
// methods below, whose races are the guest-memory races described in the module docs.
unsafe impl Sync for GuestRegion {}

/// The guest's size as a mapping length, or an error on a 32-bit host too small for it.
fn mapping_len(geometry: Geometry) -> io::Result<usize> {
    usize::try_from(geometry.memory_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "guest larger than the address space",
        )
    })
}

impl GuestRegion {
    /// Maps zeroed memory for a guest of `geometry`. Pages are allocated lazily by the kernel.
    pub fn new(geometry: Geometry) -> io::Result<Self> {
        let len = mapping_len(geometry)?;
        let map = MmapMut::map_anon(len)?;
        // Transparent huge pages cut first-touch faults 512-fold when the guest's memory is first
        // filled. Advice only; failure is harmless.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        Ok(GuestRegion { map, geometry })
    }

    /// Maps zeroed memory and has the kernel allocate it all now (`MAP_POPULATE`): the
    /// destination reserves its memory before the first page arrives (paper 002's reservation
    /// stage), so round 1 does not pay a page fault per page while the stream runs. Small pages:
    /// asking for huge pages here made the kernel compact memory for up to a second.
    pub fn new_reserved(geometry: Geometry) -> io::Result<Self> {
        let len = mapping_len(geometry)?;
        let map = memmap2::MmapOptions::new().len(len).populate().map_anon()?;
        Ok(GuestRegion { map, geometry })
    }

    /// Maps zeroed memory and faults none of it in: memory is taken as pages are written (or
    /// [`GuestRegion::prefault`]ed), and a page never written reads as zero. No huge-page advice,
    /// so memory is taken in small pages.
    pub fn new_lazy(geometry: Geometry) -> io::Result<Self> {
        let len = mapping_len(geometry)?;
        let map = MmapMut::map_anon(len)?;
        Ok(GuestRegion { map, geometry })
    }

    /// The guest's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn page_range(&self, page: PageIndex) -> Result<(usize, usize), HostError> {
        if !self.geometry.contains(page) {
            return Err(HostError::new(format!(
                "{page} is outside the guest's {} pages",
                self.geometry.page_count()
            )));
        }
        let size = self.geometry.page_size().bytes();
        Ok((self.geometry.offset_of(page) as usize, size))
    }

    /// Copies page `page` into `buf` (which must be one page long).
    pub fn read_page(&self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError> {
        let (at, size) = self.page_range(page)?;
        if buf.len() != size {
            return Err(HostError::new("read buffer is not one page long"));
        }
        // SAFETY: `at + size` lies inside the mapping (checked above), `at` is a multiple of the
        // page size and the mapping is page-aligned, so every u64 is aligned. The guest may write
        // concurrently: both sides use atomic accesses, so the race is defined behaviour.
        let words = unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(at).cast::<AtomicU64>(), size / 8)
        };
        for (word, out) in words.iter().zip(buf.chunks_exact_mut(8)) {
            out.copy_from_slice(&word.load(Ordering::Relaxed).to_ne_bytes());
        }
        Ok(())
    }

    /// Faults in the bytes `[at, at + len)` (cut to the mapping, rounded out to small pages)
    /// writable, without changing them (`MADV_POPULATE_WRITE`): one system call instead of a
    /// page fault per page. Only an optimisation: where the kernel does not offer it (Linux
    /// before 5.14, other systems) the pages fault in when written, as before.
    pub fn prefault(&self, at: usize, len: usize) {
        let end = at.saturating_add(len).min(self.map.len());
        if at >= end {
            return;
        }
        #[cfg(target_os = "linux")]
        let _ = self
            .map
            .advise_range(memmap2::Advice::PopulateWrite, at, end - at);
    }

    /// Writes one page.
    pub fn write_page(&self, page: PageIndex, data: &[u8]) -> Result<(), HostError> {
        let (at, size) = self.page_range(page)?;
        if data.len() != size {
            return Err(HostError::new("page data is not one page long"));
        }
        // SAFETY: in bounds (checked above); see the module docs on concurrent access.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.map.as_ptr().cast_mut().add(at), size)
        };
        Ok(())
    }

    /// Stores `value` at byte offset `at` (8-byte aligned, in bounds), as a guest write would.
    pub fn store_u64(&self, at: usize, value: u64) {
        assert!(
            at.is_multiple_of(8) && at + 8 <= self.map.len(),
            "store outside the guest"
        );
        // SAFETY: aligned and in bounds; atomic, because the migration thread reads the same
        // word concurrently.
        let word = unsafe { &*self.map.as_ptr().add(at).cast::<AtomicU64>() };
        word.store(value, Ordering::Relaxed);
    }

    /// The whole memory as a slice. Only meaningful while nothing writes it (a paused or
    /// finished guest); used to compare source and destination.
    pub fn snapshot(&self) -> &[u8] {
        &self.map
    }

    /// Fills the memory with initial contents from `fill`, which is given each page in turn.
    /// Takes `&mut self`: it runs before the region is shared with any writer.
    pub fn fill_pages(&mut self, mut fill: impl FnMut(PageIndex, &mut [u8])) {
        let size = self.geometry.page_size().bytes();
        for (i, chunk) in self.map.chunks_mut(size).enumerate() {
            fill(PageIndex(i as u64), chunk);
        }
    }
}

/// The source's host: guest memory, the dirty bitmap its writers mark, and the workload (if
/// any) that plays the guest's vCPUs.
pub struct SourceHost {
    region: Arc<GuestRegion>,
    dirty: Arc<AtomicDirtyBitmap>,
    workload: Option<WorkloadHandle>,
    device_state: Vec<u8>,
    paused: bool,
    /// Where dirty pages come from instead of the writers' own marks (the kernel's log).
    dirty_log: Option<Box<dyn DirtyLog + Send>>,
    /// How many times the engine resumed the guest after pausing it (a failed migration).
    pub resumes: u32,
}

impl SourceHost {
    /// A source over `region`, whose writers mark `dirty`, with `workload` as its vCPUs.
    pub fn new(
        region: Arc<GuestRegion>,
        dirty: Arc<AtomicDirtyBitmap>,
        workload: Option<WorkloadHandle>,
    ) -> Self {
        let device_state = format!(
            "memferry demo vCPU state: {} pages of {} bytes",
            region.geometry().page_count(),
            region.geometry().page_size().bytes()
        )
        .into_bytes();
        SourceHost {
            region,
            dirty,
            workload,
            device_state,
            paused: false,
            dirty_log: None,
            resumes: 0,
        }
    }

    /// Takes dirty pages from `log` (for example the kernel's,
    /// `kernel_dirty::KernelDirtyLog`) instead of the bitmap the writers mark.
    pub fn with_dirty_log(mut self, log: Box<dyn DirtyLog + Send>) -> Self {
        self.set_dirty_log(log);
        self
    }

    /// [`SourceHost::with_dirty_log`] on a host already built.
    pub fn set_dirty_log(&mut self, log: Box<dyn DirtyLog + Send>) {
        self.dirty_log = Some(log);
    }

    /// Whether dirty pages come from a log of their own rather than the writers' marks.
    pub fn has_dirty_log(&self) -> bool {
        self.dirty_log.is_some()
    }

    /// The guest memory.
    pub fn region(&self) -> &Arc<GuestRegion> {
        &self.region
    }

    /// The workload, if any.
    pub fn workload(&self) -> Option<&WorkloadHandle> {
        self.workload.as_ref()
    }

    /// Whether the guest is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The state `save_state` returns.
    pub fn device_state(&self) -> &[u8] {
        &self.device_state
    }
}

impl memferry::plan::SharedPageRead for GuestRegion {
    fn read_page_shared(&self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError> {
        self.read_page(page, buf)
    }
}

impl PageRead for SourceHost {
    fn read_page(&mut self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError> {
        self.region.read_page(page, buf)
    }
}

impl DirtyLog for SourceHost {
    fn sync_region(
        &mut self,
        region: &Region,
        first_page: u64,
        into: &mut DirtyBitmap,
    ) -> Result<(), HostError> {
        if let Some(log) = self.dirty_log.as_mut() {
            return log.sync_region(region, first_page, into);
        }
        // One region covering the whole guest: its bitmap is the guest's.
        self.dirty.fetch_and_clear_into(into);
        Ok(())
    }

    fn stop_logging(&mut self) {
        // Closing the kernel log's userfaultfd ends the write-protect tracking.
        if let Some(mut log) = self.dirty_log.take() {
            log.stop_logging();
        }
    }

    fn take_cost(&mut self) -> Option<memferry::memory::DirtyCost> {
        self.dirty_log.as_mut().and_then(|log| log.take_cost())
    }
}

impl SourceGuest for SourceHost {
    fn pause(&mut self) -> Result<(), HostError> {
        if let Some(w) = &self.workload {
            w.pause();
        }
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), HostError> {
        if let Some(w) = &self.workload {
            w.resume();
        }
        self.paused = false;
        self.resumes += 1;
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<u8>, HostError> {
        Ok(self.device_state.clone())
    }
}

/// The destination's host: fresh guest memory and the state the source sent.
pub struct DestinationHost {
    region: GuestRegion,
    /// The receiver's verdict on the source's digest, once the migration is over.
    pub verdict: Option<memferry::wire::Verdict>,
    state: Option<Vec<u8>>,
    started: bool,
    /// One bit per page: written since the memory was mapped. Fresh memory is zero, so a zero
    /// page for a page never written needs no write (and, in a lazy mapping, no memory).
    written: Vec<u64>,
    /// One bit per [`PREFAULT_CHUNK`] of memory: faulted in already.
    prefaulted: Vec<u64>,
    /// One bit per [`PREFAULT_CHUNK`]: a page inside it was written.
    touched: Vec<u64>,
}

/// The unit in which a lazy [`DestinationHost`] faults memory in: one system call per 512
/// small pages instead of 512 page faults.
pub const PREFAULT_CHUNK: u64 = 2 << 20;

/// How far ahead of the first page written in a chunk a lazy [`DestinationHost`] faults memory
/// in, in chunks (64 MiB). Round 1 arrives in page order, so the faulting stays this far ahead
/// of the stream, and the tail of the stream, which the destination applies while the guest is
/// paused (what the socket buffers and the driver's queue hold, tens of MiB), finds its memory
/// ready (faulting it in then added 7 to 10 ms to the 1 GiB demo's downtime, 3x). The most memory a
/// source makes the host take beyond the chunks it wrote: 64 MiB per chunk it touches (but
/// never more than the guest's size, which a listener bounds before mapping anything).
pub const PREFAULT_AHEAD: u64 = 32;

fn bit(words: &[u64], i: u64) -> bool {
    words
        .get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

fn set_bit(words: &mut [u64], i: u64) {
    if let Some(w) = words.get_mut((i / 64) as usize) {
        *w |= 1 << (i % 64);
    }
}

impl DestinationHost {
    /// A destination with fresh memory for `geometry`, all of it faulted in now
    /// ([`GuestRegion::new_reserved`]).
    pub fn new(geometry: Geometry) -> io::Result<Self> {
        let mut host = Self::with_region(GuestRegion::new_reserved(geometry)?);
        host.prefaulted.fill(u64::MAX);
        host.touched.fill(u64::MAX);
        Ok(host)
    }

    /// A destination with fresh memory for `geometry` of which nothing is faulted in yet
    /// ([`GuestRegion::new_lazy`]): the first page written inside a [`PREFAULT_CHUNK`] faults
    /// in that chunk and the [`PREFAULT_AHEAD`] after it, and all-zero pages never written take
    /// nothing. So mapping costs nothing until the source sends pages, and the memory held
    /// follows what it sent.
    pub fn new_lazy(geometry: Geometry) -> io::Result<Self> {
        Ok(Self::with_region(GuestRegion::new_lazy(geometry)?))
    }

    fn with_region(region: GuestRegion) -> Self {
        let geometry = region.geometry();
        let chunks = geometry.memory_bytes().div_ceil(PREFAULT_CHUNK);
        DestinationHost {
            region,
            verdict: None,
            state: None,
            started: false,
            written: vec![0; geometry.page_count().div_ceil(64) as usize],
            prefaulted: vec![0; chunks.div_ceil(64) as usize],
            touched: vec![0; chunks.div_ceil(64) as usize],
        }
    }

    /// Faults in the chunks from `first` to `first + PREFAULT_AHEAD` that are not yet, one
    /// system call per run of them.
    fn prefault_from(&mut self, first: u64) {
        let chunks = self
            .region
            .geometry()
            .memory_bytes()
            .div_ceil(PREFAULT_CHUNK);
        let end = first.saturating_add(PREFAULT_AHEAD + 1).min(chunks);
        let mut c = first;
        while c < end {
            let start = c;
            while c < end && !bit(&self.prefaulted, c) {
                set_bit(&mut self.prefaulted, c);
                c += 1;
            }
            if c > start {
                self.region.prefault(
                    (start * PREFAULT_CHUNK) as usize,
                    ((c - start) * PREFAULT_CHUNK) as usize,
                );
            } else {
                c += 1;
            }
        }
    }

    /// The guest memory.
    pub fn region(&self) -> &GuestRegion {
        &self.region
    }

    /// The device state received, once restored.
    pub fn device_state(&self) -> Option<&[u8]> {
        self.state.as_deref()
    }

    /// Whether the guest was started.
    pub fn started(&self) -> bool {
        self.started
    }
}

impl PageWrite for DestinationHost {
    fn write_page(&mut self, page: PageIndex, data: &[u8]) -> Result<(), HostError> {
        let geometry = self.region.geometry();
        if geometry.contains(page) {
            let chunk = geometry.offset_of(page) / PREFAULT_CHUNK;
            if !bit(&self.touched, chunk) {
                set_bit(&mut self.touched, chunk);
                self.prefault_from(chunk);
            }
        }
        self.region.write_page(page, data)?;
        set_bit(&mut self.written, page.0);
        Ok(())
    }

    fn write_zero_page(&mut self, page: PageIndex, zeroes: &[u8]) -> Result<(), HostError> {
        let geometry = self.region.geometry();
        if geometry.contains(page)
            && zeroes.len() == geometry.page_size().bytes()
            && !bit(&self.written, page.0)
        {
            // Fresh memory reads as zero already.
            return Ok(());
        }
        self.write_page(page, zeroes)
    }
}

impl DestinationGuest for DestinationHost {
    fn restore_state(&mut self, state: &[u8]) -> Result<(), HostError> {
        self.state = Some(state.to_vec());
        Ok(())
    }

    fn start(&mut self) -> Result<(), HostError> {
        self.started = true;
        Ok(())
    }

    fn read_back(&mut self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError> {
        self.region.read_page(page, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memferry::page::PageSize;

    #[test]
    fn a_lazy_destination_skips_fresh_zero_pages_and_zeroes_rewritten_ones() {
        let geometry = Geometry::new(PageSize::DEFAULT, 1024).unwrap();
        let mut host = DestinationHost::new_lazy(geometry).unwrap();
        let zero = vec![0u8; 4096];
        let ones = vec![1u8; 4096];
        host.write_zero_page(PageIndex(3), &zero).unwrap();
        host.write_page(PageIndex(5), &ones).unwrap();
        host.write_page(PageIndex(1023), &ones).unwrap();
        // Page 5 was written: its zero page must really zero it.
        host.write_zero_page(PageIndex(5), &zero).unwrap();
        let memory = host.region().snapshot();
        assert!(memory[..1023 * 4096].iter().all(|&b| b == 0));
        assert!(memory[1023 * 4096..].iter().all(|&b| b == 1));
        // Bounds and lengths are still checked.
        assert!(host.write_page(PageIndex(1024), &ones).is_err());
        assert!(host.write_zero_page(PageIndex(1024), &zero).is_err());
        assert!(host.write_zero_page(PageIndex(7), &zero[..100]).is_err());
    }
}
