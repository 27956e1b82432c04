//! The kernel interface: userfaultfd in asynchronous write-protect mode and the `PAGEMAP_SCAN`
//! ioctl on `/proc/self/pagemap`, as raw ioctls (the constants and structures of the uapi
//! headers `linux/userfaultfd.h` and `linux/fs.h`, Linux 6.7 and later; distributions' headers
//! are often older, so they are spelled out here).
//!
//! Nothing here allocates: the agent calls these functions from inside the traced program,
//! where every heap write would be recorded as the program's.

use core::mem::size_of;

use libc::{c_int, c_ulong, c_void};

/// `UFFD_API`: the only userfaultfd API version.
pub const UFFD_API: u64 = 0xAA;
/// `userfaultfd(2)` flag: handle faults from user mode only (what an unprivileged process may
/// ask for; asynchronous write-protect faults never reach a handler anyway).
pub const UFFD_USER_MODE_ONLY: c_int = 1;
/// `UFFD_FEATURE_WP_UNPOPULATED`: write-protect mode applies to anonymous pages never touched.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC` (Linux 6.7): write-protect faults are resolved by the kernel, which
/// only clears the page's write-protect bit; `PAGEMAP_SCAN` reads the bits back.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `UFFDIO_REGISTER_MODE_WP`.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`: protect (without it: unprotect).
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `PAGE_IS_WPALLOWED`: the page's mapping is registered for asynchronous write-protect.
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
/// `PAGE_IS_WRITTEN`: present or swapped, and its write-protect bit is clear.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PAGE_IS_FILE`: backed by a file page (not anonymous; in a private mapping: not yet
/// copied on write).
pub const PAGE_IS_FILE: u64 = 1 << 2;
/// `PAGE_IS_PRESENT`.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// `PAGE_IS_SWAPPED`.
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// `PAGE_IS_PFNZERO`: the shared zero page (read, never written).
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// `PAGE_IS_HUGE`.
pub const PAGE_IS_HUGE: u64 = 1 << 6;
/// `PAGE_IS_GUARD` (Linux 6.15): a guard region installed by `MADV_GUARD_INSTALL`. Older
/// kernels refuse the bit (`EINVAL`), so the agent asks whether it is known first.
pub const PAGE_IS_GUARD: u64 = 1 << 8;

/// `PM_SCAN_WP_MATCHING`: write-protect the pages the scan reports, in the same walk.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail with `EPERM` on a mapping not registered for asynchronous
/// write-protect.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> c_ulong {
    ((dir << 30) | ((size as u32) << 16) | (ty << 8) | nr) as c_ulong
}

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioApi {
    /// Must be [`UFFD_API`].
    pub api: u64,
    /// Features asked for; on return, the features the file descriptor has.
    pub features: u64,
    /// On return: the ioctls available.
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioRange {
    /// Page-aligned start.
    pub start: u64,
    /// Length in bytes, a multiple of the page size.
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioRegister {
    /// The range to register.
    pub range: UffdioRange,
    /// `UFFDIO_REGISTER_MODE_*`.
    pub mode: u64,
    /// On return: the ioctls available on the range.
    pub ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioWriteprotect {
    /// The range to (un)protect.
    pub range: UffdioRange,
    /// `UFFDIO_WRITEPROTECT_MODE_*`.
    pub mode: u64,
}

/// `struct page_region`: one run of pages with the same categories.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRegion {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// `PAGE_IS_*` bits (those of the scan's `return_mask`).
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PmScanArg {
    /// `size_of::<PmScanArg>()` (96).
    pub size: u64,
    /// `PM_SCAN_*`.
    pub flags: u64,
    /// First byte to scan (page-aligned).
    pub start: u64,
    /// One past the last byte to scan.
    pub end: u64,
    /// On return: where the walk stopped (`end` unless the output vector filled up).
    pub walk_end: u64,
    /// Address of the output `PageRegion` array.
    pub vec: u64,
    /// Its length in entries.
    pub vec_len: u64,
    /// At most this many pages reported (0: no limit).
    pub max_pages: u64,
    /// Categories whose bit is inverted before the masks are applied.
    pub category_inverted: u64,
    /// Categories a page must all have.
    pub category_mask: u64,
    /// Categories a page must have one of (0: no condition).
    pub category_anyof_mask: u64,
    /// Categories reported in `PageRegion::categories`.
    pub return_mask: u64,
}

/// `UFFDIO_API` = `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
pub const UFFDIO_API: c_ulong = ioc(IOC_READ | IOC_WRITE, 0xAA, 0x3F, size_of::<UffdioApi>());
/// `UFFDIO_REGISTER` = `_IOWR(0xAA, 0x00, struct uffdio_register)`.
pub const UFFDIO_REGISTER: c_ulong = ioc(
    IOC_READ | IOC_WRITE,
    0xAA,
    0x00,
    size_of::<UffdioRegister>(),
);
/// `UFFDIO_WRITEPROTECT` = `_IOWR(0xAA, 0x06, struct uffdio_writeprotect)`.
pub const UFFDIO_WRITEPROTECT: c_ulong = ioc(
    IOC_READ | IOC_WRITE,
    0xAA,
    0x06,
    size_of::<UffdioWriteprotect>(),
);
/// `USERFAULTFD_IOC_NEW` = `_IO(0xAA, 0x00)`, on `/dev/userfaultfd`.
pub const USERFAULTFD_IOC_NEW: c_ulong = ioc(0, 0xAA, 0x00, 0);
/// `PAGEMAP_SCAN` = `_IOWR('f', 16, struct pm_scan_arg)`.
pub const PAGEMAP_SCAN: c_ulong = ioc(
    IOC_READ | IOC_WRITE,
    b'f' as u32,
    16,
    size_of::<PmScanArg>(),
);

const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);
const _: () = assert!(PAGEMAP_SCAN == 0xc060_6610);

/// An `errno` value.
pub type Errno = c_int;

fn errno() -> Errno {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Opens a userfaultfd (close-on-exec, non-blocking, user-mode faults only): the
/// `userfaultfd(2)` system call, or `/dev/userfaultfd` where the system call is not permitted
/// (`vm.unprivileged_userfaultfd = 0` without the `UFFD_USER_MODE_ONLY` exemption).
pub fn open_userfaultfd() -> Result<c_int, Errno> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
    // SAFETY: a system call with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        return Ok(fd as c_int);
    }
    let first = errno();
    // SAFETY: a NUL-terminated path.
    let dev = unsafe { libc::open(c"/dev/userfaultfd".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if dev < 0 {
        return Err(first);
    }
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument.
    let fd = unsafe { libc::ioctl(dev, USERFAULTFD_IOC_NEW as _, flags) };
    let err = errno();
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(dev) };
    if fd < 0 {
        Err(err)
    } else {
        Ok(fd)
    }
}

/// `UFFDIO_API` with `features`; returns the features the descriptor has. Allowed once per
/// descriptor.
pub fn uffd_api(uffd: c_int, features: u64) -> Result<u64, Errno> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: the ioctl reads and writes one UffdioApi.
    let rc = unsafe { libc::ioctl(uffd, UFFDIO_API as _, &mut api as *mut UffdioApi) };
    if rc < 0 {
        Err(errno())
    } else {
        Ok(api.features)
    }
}

/// Registers `[start, start + len)` for write-protect mode.
pub fn uffd_register_wp(uffd: c_int, start: u64, len: u64) -> Result<(), Errno> {
    let mut reg = UffdioRegister {
        range: UffdioRange { start, len },
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    // SAFETY: the ioctl reads and writes one UffdioRegister.
    let rc = unsafe { libc::ioctl(uffd, UFFDIO_REGISTER as _, &mut reg as *mut UffdioRegister) };
    if rc < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// Write-protects `[start, start + len)` (registered in write-protect mode). With
/// `UFFD_FEATURE_WP_UNPOPULATED` this also marks pages never populated (allocating the page
/// tables of the whole range): without the marks, Linux reports such pages as written.
pub fn uffd_writeprotect(uffd: c_int, start: u64, len: u64) -> Result<(), Errno> {
    let mut wp = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode: UFFDIO_WRITEPROTECT_MODE_WP,
    };
    // SAFETY: the ioctl reads one UffdioWriteprotect.
    let rc = unsafe {
        libc::ioctl(
            uffd,
            UFFDIO_WRITEPROTECT as _,
            &mut wp as *mut UffdioWriteprotect,
        )
    };
    if rc < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// One `PAGEMAP_SCAN` call: fills `out` from `arg.start` and returns how many regions it
/// wrote; `arg.walk_end` says where it stopped. `arg.size`, `vec` and `vec_len` are set here.
pub fn pagemap_scan(
    pagemap: c_int,
    arg: &mut PmScanArg,
    out: &mut [PageRegion],
) -> Result<usize, Errno> {
    arg.size = size_of::<PmScanArg>() as u64;
    arg.vec = out.as_mut_ptr() as u64;
    arg.vec_len = out.len() as u64;
    // SAFETY: the kernel writes at most vec_len PageRegions to vec (which `out` owns) and
    // walk_end in `arg`.
    let rc = unsafe { libc::ioctl(pagemap, PAGEMAP_SCAN as _, arg as *mut PmScanArg) };
    if rc < 0 {
        Err(errno())
    } else {
        Ok(rc as usize)
    }
}

/// Opens `/proc/self/pagemap` (close-on-exec).
pub fn open_pagemap() -> Result<c_int, Errno> {
    // SAFETY: a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c"/proc/self/pagemap".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        Err(errno())
    } else {
        Ok(fd)
    }
}

/// The name of an `errno` value the recorder can meet, for messages.
pub fn errno_name(e: Errno) -> &'static str {
    match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EINVAL => "EINVAL",
        libc::ENOTTY => "ENOTTY",
        libc::ENOSYS => "ENOSYS",
        libc::EPIPE => "EPIPE",
        libc::ENOSPC => "ENOSPC",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        _ => "errno",
    }
}

/// Why this kernel (or this process's permissions) cannot record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsupported {
    /// What is missing or wrong, in a sentence.
    pub what: String,
    /// `true`: a feature is missing (old kernel, no permission); `false`: the features exist
    /// but did not behave as expected (a bug here or in the kernel).
    pub missing: bool,
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

impl std::error::Error for Unsupported {}

struct Fd(c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: closing a descriptor this guard owns.
        unsafe { libc::close(self.0) };
    }
}

struct Map(*mut c_void, usize);

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmapping a mapping this guard owns.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

/// Checks, in this process, that the kernel can record: a userfaultfd with
/// `UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED`, write-protect registration, and a
/// `PAGEMAP_SCAN` (with `PM_SCAN_CHECK_WPASYNC`) that reports a page written after it was
/// protected, only that page, and nothing once it has protected it again.
pub fn probe() -> Result<(), Unsupported> {
    let fail = |what: String| {
        Err(Unsupported {
            what,
            missing: true,
        })
    };
    let broken = |what: String| {
        Err(Unsupported {
            what,
            missing: false,
        })
    };
    let uffd = match open_userfaultfd() {
        Ok(fd) => Fd(fd),
        Err(e) => {
            return fail(format!(
                "cannot open a userfaultfd ({}: {}); userfaultfd needs Linux 4.3+ built with \
                 CONFIG_USERFAULTFD, and an unprivileged user needs Linux 5.11+ (user-mode-only \
                 faults), vm.unprivileged_userfaultfd = 1 or access to /dev/userfaultfd",
                errno_name(e),
                std::io::Error::from_raw_os_error(e)
            ))
        }
    };
    let wanted = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
    match uffd_api(uffd.0, wanted) {
        Ok(have) if have & wanted == wanted => {}
        Ok(_) | Err(libc::EINVAL) => {
            return fail(
                "the kernel lacks asynchronous userfaultfd write-protect \
                 (UFFD_FEATURE_WP_ASYNC and UFFD_FEATURE_WP_UNPOPULATED: Linux 6.7 or later, \
                 with CONFIG_PTE_MARKER_UFFD_WP)"
                    .into(),
            )
        }
        Err(e) => {
            return broken(format!(
                "UFFDIO_API failed: {}",
                std::io::Error::from_raw_os_error(e)
            ))
        }
    }
    let pagemap = match open_pagemap() {
        Ok(fd) => Fd(fd),
        Err(e) => {
            return fail(format!(
                "cannot open /proc/self/pagemap: {}",
                std::io::Error::from_raw_os_error(e)
            ))
        }
    };
    let len = 4 * 4096;
    // SAFETY: an anonymous private mapping, owned by the guard below.
    let addr = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return broken(format!("mmap failed: {}", std::io::Error::last_os_error()));
    }
    let map = Map(addr, len);
    let start = map.0 as u64;
    if let Err(e) = uffd_register_wp(uffd.0, start, len as u64) {
        return fail(format!(
            "UFFDIO_REGISTER in write-protect mode failed ({}): the kernel lacks userfaultfd \
             write-protect for anonymous memory (CONFIG_HAVE_ARCH_USERFAULTFD_WP)",
            std::io::Error::from_raw_os_error(e)
        ));
    }
    if let Err(e) = uffd_writeprotect(uffd.0, start, len as u64) {
        return broken(format!(
            "UFFDIO_WRITEPROTECT failed: {}",
            std::io::Error::from_raw_os_error(e)
        ));
    }
    let mut out = [PageRegion::default(); 8];
    let scan = |out: &mut [PageRegion]| {
        let mut arg = PmScanArg {
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            start,
            end: start + len as u64,
            category_inverted: PAGE_IS_PFNZERO | PAGE_IS_FILE,
            category_mask: PAGE_IS_WRITTEN | PAGE_IS_PFNZERO | PAGE_IS_FILE,
            return_mask: PAGE_IS_WRITTEN,
            ..PmScanArg::default()
        };
        pagemap_scan(pagemap.0, &mut arg, out)
    };
    match scan(&mut out) {
        Ok(0) => {}
        Ok(n) => {
            return broken(format!(
                "PAGEMAP_SCAN reported pages written in memory nobody wrote: {:?}",
                &out[..n]
            ))
        }
        Err(libc::ENOTTY) | Err(libc::EINVAL) => {
            return fail(
                "the kernel lacks the PAGEMAP_SCAN ioctl on /proc/PID/pagemap (Linux 6.7 or \
                 later)"
                    .into(),
            )
        }
        Err(e) => {
            return broken(format!(
                "PAGEMAP_SCAN failed: {}",
                std::io::Error::from_raw_os_error(e)
            ))
        }
    }
    // SAFETY: the third page of the mapping above.
    unsafe { core::ptr::write_volatile((start as *mut u8).add(2 * 4096), 1) };
    let found = scan(&mut out).map_err(|e| Unsupported {
        what: format!(
            "PAGEMAP_SCAN failed: {}",
            std::io::Error::from_raw_os_error(e)
        ),
        missing: false,
    })?;
    let expected = PageRegion {
        start: start + 2 * 4096,
        end: start + 3 * 4096,
        categories: PAGE_IS_WRITTEN,
    };
    if found != 1 || out[0] != expected {
        return broken(format!(
            "PAGEMAP_SCAN did not report exactly the page written: {:?}",
            &out[..found]
        ));
    }
    if scan(&mut out).ok() != Some(0) {
        return broken("PAGEMAP_SCAN did not write-protect the page it reported".into());
    }
    drop(map);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structures_have_the_kernel_sizes() {
        assert_eq!(size_of::<UffdioApi>(), 24);
        assert_eq!(size_of::<UffdioRegister>(), 32);
        assert_eq!(size_of::<PageRegion>(), 24);
        assert_eq!(size_of::<PmScanArg>(), 96);
    }
}
