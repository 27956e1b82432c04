//! The kernel's dirty log for memory in this process: userfaultfd asynchronous write-protect
//! (`UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED`) read back with the `PAGEMAP_SCAN`
//! ioctl (Linux 6.7 and later), the mechanism `memferry record` uses inside a traced program.
//!
//! The in-process demo's workload marks its own writes in a bitmap; a real guest does not. With
//! [`KernelDirtyLog`] the dirty pages come from the kernel's page tables instead: every page is
//! write-protected, the first write to it clears the protection (a fault the kernel resolves
//! itself, about 1.5 µs here), and each sync reports the pages whose protection was cleared and
//! protects them again in the same walk (`PM_SCAN_WP_MATCHING`), so no write falls between
//! report and re-protection. It needs no cooperation from whatever writes the memory.
//!
//! Limits: anonymous private (or shared memory) mappings only; a transparent huge page is
//! reported whole (512 pages for one write), so [`KernelDirtyLog::new`] advises the kernel
//! against huge pages in the range (pages already huge stay so: map the guest without
//! huge-page advice, [`crate::memory::GuestRegion::new_lazy`], to get 4 KiB precision).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use memferry::bitmap::DirtyBitmap;
use memferry::error::HostError;
use memferry::memory::DirtyLog;
use memferry::page::Region;
use memferry_recorder::sys::{self, PageRegion, PmScanArg};

/// Regions returned by one `PAGEMAP_SCAN` call (a longer list takes several calls).
const SCAN_BATCH: usize = 4096;

/// The kernel's dirty log over one range of this process's memory.
pub struct KernelDirtyLog {
    uffd: OwnedFd,
    pagemap: OwnedFd,
    start: u64,
    len: u64,
    page_size: u64,
    found: Vec<PageRegion>,
    /// Time spent in `PAGEMAP_SCAN` so far (the cost of dirty tracking, reported).
    scan_time: Duration,
    scans: u64,
    /// Scan time already reported to the engine (`take_cost`).
    reported: Duration,
}

fn errno_error(what: &str, errno: i32) -> std::io::Error {
    let e = std::io::Error::from_raw_os_error(errno);
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl KernelDirtyLog {
    /// Tracks writes to `[start, start + len)` (page-aligned, anonymous memory of this process)
    /// from now on. Every page reads as dirty at the first sync until it has been synced once:
    /// the migration's first round sends everything anyway.
    ///
    /// Fails with a clear message where the kernel lacks asynchronous write-protect or
    /// `PAGEMAP_SCAN` (before Linux 6.7), or the range cannot be registered.
    pub fn new(start: *const u8, len: usize, page_size: usize) -> std::io::Result<Self> {
        let start = start as u64;
        let (len, page) = (len as u64, page_size as u64);
        if page == 0 || !start.is_multiple_of(page) || !len.is_multiple_of(page) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the kernel dirty log needs a page-aligned range",
            ));
        }
        let uffd = sys::open_userfaultfd().map_err(|e| errno_error("opening a userfaultfd", e))?;
        // SAFETY: a descriptor just opened and owned by nothing else.
        let uffd = unsafe { OwnedFd::from_raw_fd(uffd) };
        let wanted = sys::UFFD_FEATURE_WP_ASYNC | sys::UFFD_FEATURE_WP_UNPOPULATED;
        match sys::uffd_api(uffd.as_raw_fd(), wanted) {
            Ok(have) if have & wanted == wanted => {}
            Ok(_) => return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "this kernel lacks userfaultfd's asynchronous write-protect (Linux 6.7 and later)",
            )),
            Err(e) => return Err(errno_error("UFFDIO_API (asynchronous write-protect)", e)),
        }
        let pagemap =
            sys::open_pagemap().map_err(|e| errno_error("opening /proc/self/pagemap", e))?;
        // SAFETY: as above.
        let pagemap = unsafe { OwnedFd::from_raw_fd(pagemap) };
        // A write reports a whole huge page; ask for small ones. Advice only.
        // SAFETY: madvise on a range of this process's memory; it changes no contents.
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                len as usize,
                libc::MADV_NOHUGEPAGE,
            );
        }
        sys::uffd_register_wp(uffd.as_raw_fd(), start, len)
            .map_err(|e| errno_error("registering the guest memory for write-protect", e))?;
        sys::uffd_writeprotect(uffd.as_raw_fd(), start, len)
            .map_err(|e| errno_error("write-protecting the guest memory", e))?;
        Ok(KernelDirtyLog {
            uffd,
            pagemap,
            start,
            len,
            page_size: page,
            found: vec![PageRegion::default(); SCAN_BATCH],
            scan_time: Duration::ZERO,
            scans: 0,
            reported: Duration::ZERO,
        })
    }

    /// ORs into `into` (bit `first_page + i` is page `i` of the range) the pages written since
    /// the last call over `[from_page, from_page + pages)` of the range, and write-protects
    /// them again. Returns how many pages it found.
    pub fn collect(
        &mut self,
        from_page: u64,
        pages: u64,
        first_page: u64,
        into: &mut DirtyBitmap,
    ) -> std::io::Result<u64> {
        let began = Instant::now();
        let end = (self.start + (from_page + pages) * self.page_size).min(self.start + self.len);
        let mut pos = self.start + from_page * self.page_size;
        let mut found = 0;
        while pos < end {
            let mut arg = PmScanArg {
                flags: sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC,
                start: pos,
                end,
                category_mask: sys::PAGE_IS_WRITTEN,
                return_mask: sys::PAGE_IS_WRITTEN,
                ..PmScanArg::default()
            };
            let n = sys::pagemap_scan(self.pagemap.as_raw_fd(), &mut arg, &mut self.found)
                .map_err(|e| errno_error("PAGEMAP_SCAN", e))?;
            for r in &self.found[..n] {
                let first = (r.start - self.start) / self.page_size;
                let last = (r.end - self.start).div_ceil(self.page_size);
                into.set_range(
                    first_page + first - from_page,
                    first_page + last - from_page,
                );
                found += last - first;
            }
            if n < self.found.len() || arg.walk_end <= pos {
                break;
            }
            pos = arg.walk_end;
        }
        self.scan_time += began.elapsed();
        self.scans += 1;
        Ok(found)
    }

    /// Time spent scanning so far, and how many scans.
    pub fn cost(&self) -> (Duration, u64) {
        (self.scan_time, self.scans)
    }

    /// The userfaultfd (kept open: closing it ends the tracking).
    pub fn userfaultfd(&self) -> &OwnedFd {
        &self.uffd
    }
}

/// One region at the start of the tracked range: the guest's dense pages map onto it in order.
impl DirtyLog for KernelDirtyLog {
    fn sync_region(
        &mut self,
        region: &Region,
        first_page: u64,
        into: &mut DirtyBitmap,
    ) -> Result<(), HostError> {
        self.collect(first_page, region.pages, first_page, into)
            .map(|_| ())
            .map_err(|e| HostError::new(format!("the kernel dirty log: {e}")))
    }

    /// The scans since the last call (each scan also write-protects again: one figure).
    fn take_cost(&mut self) -> Option<memferry::memory::DirtyCost> {
        let new = self.scan_time - self.reported;
        self.reported = self.scan_time;
        Some(memferry::memory::DirtyCost {
            sync: memferry::time::Nanos(new.as_nanos().min(u64::MAX as u128) as u64),
            clear: memferry::time::Nanos::ZERO,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memferry::page::{Geometry, PageSize};

    use crate::memory::GuestRegion;

    /// The kernel reports exactly the pages written, each once, and nothing after a sync.
    #[test]
    fn reports_exactly_the_pages_written() {
        if let Err(why) = sys::probe() {
            eprintln!("SKIPPED: the kernel dirty log cannot run here: {why}");
            return;
        }
        let geometry = Geometry::new(PageSize::DEFAULT, 256).unwrap();
        let region = GuestRegion::new_lazy(geometry).unwrap();
        region.prefault(0, 128 * 4096);
        let mem = region.snapshot().as_ptr();
        let mut log = KernelDirtyLog::new(mem, 256 * 4096, 4096).unwrap();
        let layout = memferry::page::MemoryLayout::single(geometry);
        let mut dirty = DirtyBitmap::new(256);
        // First sync: whatever it reports (pages populated before), then a clean slate.
        memferry::memory::sync_all(&layout, &mut log, &mut dirty).unwrap();
        dirty.clear();
        memferry::memory::sync_all(&layout, &mut log, &mut dirty).unwrap();
        assert_eq!(dirty.count_ones(), 0, "nothing written, yet pages reported");
        let written = [0u64, 3, 100, 127, 128, 200, 255];
        for &p in &written {
            region.store_u64(p as usize * 4096 + 8, 0x1234_5678 + p);
        }
        memferry::memory::sync_all(&layout, &mut log, &mut dirty).unwrap();
        assert_eq!(dirty.iter_ones().collect::<Vec<_>>(), written);
        dirty.clear();
        memferry::memory::sync_all(&layout, &mut log, &mut dirty).unwrap();
        assert_eq!(dirty.count_ones(), 0, "pages reported twice");
        region.store_u64(50 * 4096, 1);
        region.store_u64(50 * 4096 + 16, 2);
        memferry::memory::sync_all(&layout, &mut log, &mut dirty).unwrap();
        assert_eq!(dirty.iter_ones().collect::<Vec<_>>(), [50]);
        assert!(log.cost().1 >= 4);
    }
}
