//! The agent: the part of `libmemferry_recorder.so` that runs inside the traced program.
//!
//! `memferry record` starts the program with the library in `LD_PRELOAD` and the variables of
//! [`crate::protocol`] in its environment. At load, before the program's `main` (and before
//! its own constructors), [`init`] maps the agent's memory (one anonymous mapping named
//! `[anon:memferry-recorder]`: its state, buffers and its thread's stack), starts a thread
//! with every signal blocked, and waits until that thread has
//!
//! 1. opened a userfaultfd with `UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED` and
//!    `/proc/self/pagemap`, and turned transparent huge pages off for the process
//!    (`PR_SET_THP_DISABLE`, so pages are tracked 4 KiB at a time, as a hypervisor's dirty
//!    log does);
//! 2. registered every private writable mapping of `/proc/self/maps` (except its own memory
//!    and the library's own data) in write-protect mode, write-protected it
//!    (`UFFDIO_WRITEPROTECT`, which with `WP_UNPOPULATED` also marks the pages never
//!    populated), and sent its resident pages as the program's initial memory
//!    ([`protocol::BASE`]).
//!
//! Then, every interval, the thread re-reads `/proc/self/maps`, registers the mappings that
//! are new (or were replaced: it asks the kernel which ranges are not registered, with a
//! scan whose category is "not `PAGE_IS_WPALLOWED`"), and scans every private writable
//! mapping with `PM_SCAN_WP_MATCHING` for pages that are written (`PAGE_IS_WRITTEN`), not the
//! zero page and not a file page not yet copied on write: the kernel returns the pages
//! written since the previous scan and write-protects them again in the same walk. The pages
//! go to the recorder as [`protocol::DIRTY`] frames, closed by a [`protocol::TICK`].
//!
//! A write to a protected page costs one minor fault, resolved in the kernel (the agent is
//! not involved): about 1.5 µs, once per page per interval.
//!
//! The dirty scan does not pass `PM_SCAN_CHECK_WPASYNC`: a mapping that appears between the
//! registration step and the scan would make the ioctl fail with `EPERM` after it had already
//! reported and re-protected part of the range (their number is lost with the error). Without
//! the flag the scan skips such a mapping, and the next interval registers it and reports
//! every page written in it so far (its resident anonymous pages), so nothing is lost. The
//! probe ([`crate::sys::probe`]) uses the flag.
//!
//! The agent never allocates and never writes outside its own mapping, except its
//! constructor's and destructor's few stack bytes on the thread that runs them.
//!
//! At a normal exit, [`fini`] (the library's destructor, after the program's own) asks the
//! thread for a last interval and waits for it (at most 10 s). A program killed by a signal
//! or ending with `_exit` loses its last, partial interval. After `exec`, the new image loads
//! the library again and starts over with a new [`protocol::HELLO`].

use core::ffi::CStr;
use core::mem::size_of;
use core::ptr;
use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use libc::{c_int, c_long, c_void};

use crate::protocol::{self, Header};
use crate::sys::{self, PageRegion, PmScanArg};

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;

#[used]
#[link_section = ".fini_array"]
static FINI: extern "C" fn() = fini;

/// The agent of this process image, once started.
static AGENT: AtomicPtr<Shared> = AtomicPtr::new(ptr::null_mut());

const PAGE: u64 = 4096;
const VEC_LEN: usize = 4096;
const FOUND_LEN: usize = 16;
const SEND_CAP: usize = 64 * 1024;
const MAPS_CAP: usize = 64 * 1024;
const TEXT_CAP: usize = 1024;
const PATH_CAP: usize = 4096;
const MAX_WARNED: usize = 64;
const STACK_LEN: usize = 1 << 20;
const WAIT_NS: u64 = 10_000_000_000;
/// Mappings larger than this are not recorded: write-protecting a mapping allocates the page
/// tables of all of it (2 MiB per GiB), which for the terabytes of a sanitizer's shadow
/// memory would exhaust the machine.
const MAX_MAPPING: u64 = 256 << 30;

const FUTEX_WAIT_BITSET_PRIVATE: c_int = 9 | 128;
const FUTEX_WAKE_PRIVATE: c_int = 1 | 128;
const FUTEX_BITSET_MATCH_ANY: u32 = u32::MAX;

/// What the constructor, the destructor and the thread share (the thread owns [`State`]).
#[repr(C)]
struct Shared {
    /// 0 while running; 1: take a last sample and stop (the destructor).
    command: AtomicU32,
    /// 0 until set up; 1: tracking; 2: failed.
    ready: AtomicU32,
    /// 1 once the thread has stopped (after the last sample, or on failure).
    done: AtomicU32,
    /// Never changes: the thread waits on it once it has stopped.
    parked: AtomicU32,
    /// The pid that started the agent (a forked child runs the destructor too).
    pid: c_int,
}

/// The thread's state, in the agent's own mapping.
#[repr(C)]
struct State {
    sock: c_int,
    uffd: c_int,
    pagemap: c_int,
    pid: c_int,
    interval_ns: u64,
    arena_start: u64,
    arena_end: u64,
    lib_path: [u8; PATH_CAP],
    lib_path_len: usize,
    /// `PAGE_IS_GUARD` if the kernel knows it, else 0.
    guard: u64,
    /// Set once the initial registration is done: later registrations count as writes.
    started: bool,
    /// Set when the recorder stopped listening: the agent stops.
    broken: bool,
    warned: [u64; MAX_WARNED],
    warned_len: usize,
    /// Starts of mappings whose registration failed once: a mapping unmapped while the agent
    /// registered it fails too, so a warning waits for a second failure.
    suspects: [u64; MAX_WARNED],
    suspects_next: usize,
    frame_kind: u32,
    frame_count: u64,
    send_len: usize,
    send: [u8; SEND_CAP],
    text: [u8; TEXT_CAP],
    text_len: usize,
    path: [u8; 256],
    path_len: usize,
    maps: [u8; MAPS_CAP],
    found: [PageRegion; FOUND_LEN],
    vec: [PageRegion; VEC_LEN],
}

const fn round_up(n: usize) -> usize {
    (n + PAGE as usize - 1) & !(PAGE as usize - 1)
}

const SHARED_LEN: usize = round_up(size_of::<Shared>());
const STATE_LEN: usize = round_up(size_of::<State>());
const ARENA_LEN: usize = SHARED_LEN + STATE_LEN + STACK_LEN;

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Waits while `word` is `expected`, until woken or until `deadline` (CLOCK_MONOTONIC ns).
fn futex_wait_until(word: &AtomicU32, expected: u32, deadline: Option<u64>) {
    let ts = deadline.map(|d| libc::timespec {
        tv_sec: (d / 1_000_000_000) as libc::time_t,
        tv_nsec: (d % 1_000_000_000) as c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: FUTEX_WAIT_BITSET on a live u32 with an absolute CLOCK_MONOTONIC timeout.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            FUTEX_WAIT_BITSET_PRIVATE,
            expected,
            ts_ptr,
            ptr::null::<u32>(),
            FUTEX_BITSET_MATCH_ANY,
        )
    };
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a live u32.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), FUTEX_WAKE_PRIVATE, i32::MAX) };
}

/// Waits (at most [`WAIT_NS`]) until `word` is no longer `value`.
fn wait_while(word: &AtomicU32, value: u32) {
    let deadline = monotonic_ns() + WAIT_NS;
    while word.load(Ordering::Acquire) == value && monotonic_ns() < deadline {
        futex_wait_until(word, value, Some(deadline));
    }
}

/// An environment variable as an unsigned number.
fn env_u64(name: &CStr) -> Option<u64> {
    // SAFETY: getenv with a NUL-terminated name; the result is read before anything can
    // change the environment (the program has not started yet).
    let value = unsafe { libc::getenv(name.as_ptr()) };
    if value.is_null() {
        return None;
    }
    // SAFETY: getenv returns a NUL-terminated string.
    parse_u64(unsafe { CStr::from_ptr(value) }.to_bytes())
}

fn parse_u64(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in bytes {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}

fn parse_hex(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() || bytes.len() > 16 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in bytes {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        n = (n << 4) | u64::from(digit);
    }
    Some(n)
}

/// Sends a [`protocol::FAIL`] frame straight to `sock` (before the agent's memory exists).
fn fail_early(sock: c_int, errno: c_int, what: &str) {
    let header = Header {
        kind: protocol::FAIL,
        aux: 0,
        a: errno as u64,
        b: 0,
        count: what.len() as u64,
    }
    .encode();
    // SAFETY: sending bytes this function owns.
    unsafe {
        libc::send(
            sock,
            header.as_ptr().cast(),
            header.len(),
            libc::MSG_NOSIGNAL,
        );
        libc::send(sock, what.as_ptr().cast(), what.len(), libc::MSG_NOSIGNAL);
    }
}

extern "C" fn init() {
    // SAFETY: runs once, at load, before the program's code.
    unsafe { init_inner() }
}

unsafe fn init_inner() {
    let Some(sock) = env_u64(c"MEMFERRY_RECORD_FD") else {
        return;
    };
    let sock = sock as c_int;
    let parent = env_u64(c"MEMFERRY_RECORD_PARENT").unwrap_or(0);
    if libc::getppid() as u64 != parent {
        // A child of the traced program: not traced. If it inherited the agent's socket, it
        // lets go of it, so that only the traced process holds it.
        let mut st: libc::stat = core::mem::zeroed();
        if let Some(inode) = env_u64(c"MEMFERRY_RECORD_INODE") {
            if libc::fstat(sock, &mut st) == 0
                && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
                && st.st_ino == inode
            {
                libc::close(sock);
            }
        }
        return;
    }
    // Only the copy of the agent that LD_PRELOAD loaded runs (not one linked into a binary).
    let lib = libc::getenv(c"MEMFERRY_RECORD_LIB".as_ptr());
    let mut info: libc::Dl_info = core::mem::zeroed();
    if lib.is_null()
        || libc::dladdr(init as *const c_void, &mut info) == 0
        || info.dli_fname.is_null()
        || CStr::from_ptr(info.dli_fname) != CStr::from_ptr(lib)
    {
        return;
    }
    if !AGENT.load(Ordering::Acquire).is_null() {
        return;
    }
    let interval_ns = env_u64(c"MEMFERRY_RECORD_INTERVAL_NS")
        .filter(|&n| n > 0)
        .unwrap_or(100_000_000);
    if libc::sysconf(libc::_SC_PAGESIZE) != PAGE as c_long {
        fail_early(sock, libc::EINVAL, "the recorder supports 4 KiB pages only");
        return;
    }

    let arena = libc::mmap(
        ptr::null_mut(),
        ARENA_LEN,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        -1,
        0,
    );
    if arena == libc::MAP_FAILED {
        fail_early(sock, libc::ENOMEM, "cannot map the recorder's memory");
        return;
    }
    // A name for /proc/PID/maps (needs CONFIG_ANON_VMA_NAME; harmless without).
    libc::prctl(
        libc::PR_SET_VMA,
        libc::PR_SET_VMA_ANON_NAME as libc::c_ulong,
        arena as libc::c_ulong,
        ARENA_LEN as libc::c_ulong,
        c"memferry-recorder".as_ptr() as libc::c_ulong,
    );
    let shared = arena as *mut Shared;
    let state = (arena as *mut u8).add(SHARED_LEN) as *mut State;
    let stack = (arena as *mut u8).add(SHARED_LEN + STATE_LEN);
    // The mapping is zeroed: every field starts at 0 / false.
    (*shared).pid = libc::getpid();
    let st = &mut *state;
    st.sock = sock;
    st.uffd = -1;
    st.pagemap = -1;
    st.pid = (*shared).pid;
    st.interval_ns = interval_ns;
    st.arena_start = arena as u64;
    st.arena_end = arena as u64 + ARENA_LEN as u64;
    let lib = CStr::from_ptr(lib).to_bytes();
    let n = lib.len().min(PATH_CAP);
    st.lib_path[..n].copy_from_slice(&lib[..n]);
    st.lib_path_len = n;
    AGENT.store(shared, Ordering::Release);

    // The thread runs with every signal blocked: the program's handlers never run on it.
    let mut all: libc::sigset_t = core::mem::zeroed();
    let mut old: libc::sigset_t = core::mem::zeroed();
    libc::sigfillset(&mut all);
    libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    let mut attr: libc::pthread_attr_t = core::mem::zeroed();
    libc::pthread_attr_init(&mut attr);
    libc::pthread_attr_setstack(&mut attr, stack.cast(), STACK_LEN);
    let mut thread: libc::pthread_t = 0;
    let rc = libc::pthread_create(&mut thread, &attr, thread_main, arena);
    libc::pthread_attr_destroy(&mut attr);
    libc::pthread_sigmask(libc::SIG_SETMASK, &old, ptr::null_mut());
    if rc != 0 {
        AGENT.store(ptr::null_mut(), Ordering::Release);
        fail_early(sock, rc, "cannot start the recorder's thread");
        return;
    }
    libc::pthread_detach(thread);
    wait_while(&(*shared).ready, 0);
}

extern "C" fn fini() {
    let shared = AGENT.load(Ordering::Acquire);
    if shared.is_null() {
        return;
    }
    // SAFETY: the agent's mapping lives as long as the process image.
    let shared = unsafe { &*shared };
    // SAFETY: getpid has no preconditions.
    if shared.pid != unsafe { libc::getpid() } || shared.ready.load(Ordering::Acquire) != 1 {
        return;
    }
    shared.command.store(1, Ordering::Release);
    futex_wake(&shared.command);
    wait_while(&shared.done, 0);
}

extern "C" fn thread_main(arena: *mut c_void) -> *mut c_void {
    // SAFETY: `arena` is the agent's mapping: Shared, then State, which only this thread uses.
    let shared = unsafe { &*(arena as *const Shared) };
    let state = unsafe { &mut *((arena as *mut u8).add(SHARED_LEN) as *mut State) };
    state.run(shared);
    shared.done.store(1, Ordering::Release);
    futex_wake(&shared.done);
    loop {
        futex_wait_until(&shared.parked, 0, None);
    }
}

impl State {
    fn run(&mut self, shared: &Shared) {
        if let Err((errno, what)) = self.setup() {
            self.fail(errno, what);
            shared.ready.store(2, Ordering::Release);
            futex_wake(&shared.ready);
            self.stop();
            return;
        }
        shared.ready.store(1, Ordering::Release);
        futex_wake(&shared.ready);
        let interval = self.interval_ns;
        let mut next = monotonic_ns() + interval;
        loop {
            while shared.command.load(Ordering::Acquire) == 0 && monotonic_ns() < next {
                futex_wait_until(&shared.command, 0, Some(next));
            }
            let last = shared.command.load(Ordering::Acquire) != 0;
            self.sample();
            if last {
                self.control(protocol::END, 0, 0, 0);
            }
            if self.broken || last {
                self.stop();
                return;
            }
            let now = monotonic_ns();
            while next <= now {
                next += interval;
            }
        }
    }

    /// Opens the kernel interfaces, registers and protects the program's memory, and tells
    /// the recorder what it started with.
    fn setup(&mut self) -> Result<(), (c_int, &'static str)> {
        self.uffd = sys::open_userfaultfd().map_err(|e| (e, "cannot open a userfaultfd"))?;
        let wanted = sys::UFFD_FEATURE_WP_ASYNC | sys::UFFD_FEATURE_WP_UNPOPULATED;
        match sys::uffd_api(self.uffd, wanted) {
            Ok(have) if have & wanted == wanted => {}
            Ok(_) => return Err((libc::EINVAL, "the kernel lacks UFFD_FEATURE_WP_ASYNC")),
            Err(e) => return Err((e, "the kernel lacks UFFD_FEATURE_WP_ASYNC (UFFDIO_API)")),
        }
        self.pagemap = sys::open_pagemap().map_err(|e| (e, "cannot open /proc/self/pagemap"))?;
        // Does the kernel know PAGE_IS_GUARD? (An empty scan checks the masks only.)
        let mut arg = PmScanArg {
            start: self.arena_start,
            end: self.arena_start,
            category_inverted: sys::PAGE_IS_GUARD,
            category_mask: sys::PAGE_IS_GUARD,
            ..PmScanArg::default()
        };
        self.guard = match sys::pagemap_scan(self.pagemap, &mut arg, &mut self.found) {
            Ok(_) => sys::PAGE_IS_GUARD,
            Err(libc::EINVAL) => 0,
            Err(e) => return Err((e, "the kernel lacks PAGEMAP_SCAN")),
        };
        // SAFETY: a prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1 as libc::c_ulong, 0, 0, 0) };
        self.control(protocol::HELLO, protocol::VERSION, self.pid as u64, PAGE);
        self.walk_maps();
        self.started = true;
        self.control(protocol::STARTED, 0, monotonic_ns(), 0);
        if self.broken {
            return Err((libc::EPIPE, "the recorder stopped listening"));
        }
        Ok(())
    }

    /// One interval: register new mappings, collect and re-protect the written pages.
    fn sample(&mut self) {
        let started = monotonic_ns();
        self.walk_maps();
        let ended = monotonic_ns();
        self.control(protocol::TICK, 0, started, ended);
    }

    /// Stops tracking: closing the userfaultfd unregisters every mapping, so the program
    /// runs on without write-protect faults.
    fn stop(&mut self) {
        if self.uffd >= 0 {
            // SAFETY: closing descriptors the agent opened.
            unsafe { libc::close(self.uffd) };
            self.uffd = -1;
        }
        if self.pagemap >= 0 {
            // SAFETY: as above.
            unsafe { libc::close(self.pagemap) };
            self.pagemap = -1;
        }
    }

    /// Reads `/proc/self/maps` and handles every private writable mapping in it.
    fn walk_maps(&mut self) {
        // SAFETY: a NUL-terminated path.
        let fd = unsafe {
            libc::open(
                c"/proc/self/maps".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            self.warn_text(b"cannot open /proc/self/maps");
            return;
        }
        let mut len = 0;
        loop {
            // SAFETY: reading into the free end of the agent's buffer.
            let n =
                unsafe { libc::read(fd, self.maps.as_mut_ptr().add(len).cast(), MAPS_CAP - len) };
            if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            if n <= 0 {
                break;
            }
            len += n as usize;
            let mut pos = 0;
            while let Some(nl) = self.maps[pos..len].iter().position(|&b| b == b'\n') {
                self.line(pos, pos + nl);
                pos += nl + 1;
            }
            self.maps.copy_within(pos..len, 0);
            len -= pos;
            if len == MAPS_CAP {
                len = 0; // a line longer than the buffer: cannot be a maps line
            }
        }
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(fd) };
        self.flush_frame();
    }

    /// One line of `/proc/self/maps`: `start-end perms offset dev inode [path]`.
    fn line(&mut self, from: usize, to: usize) {
        let line = &self.maps[from..to];
        let mut fields = line.split(|&b| b == b' ').filter(|f| !f.is_empty());
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            return;
        };
        if perms.len() < 4 || perms[1] != b'w' || perms[3] != b'p' {
            return;
        }
        let Some(dash) = range.iter().position(|&b| b == b'-') else {
            return;
        };
        let (Some(start), Some(end)) = (parse_hex(&range[..dash]), parse_hex(&range[dash + 1..]))
        else {
            return;
        };
        // The path: what follows the fifth field (it may contain spaces).
        let mut seen = 0;
        let mut at = line.len();
        let mut in_field = false;
        for (i, &b) in line.iter().enumerate() {
            if b != b' ' && !in_field {
                in_field = true;
                seen += 1;
                if seen == 6 {
                    at = i;
                    break;
                }
            } else if b == b' ' {
                in_field = false;
            }
        }
        let path = &line[at..];
        if !path.is_empty() && path == &self.lib_path[..self.lib_path_len] {
            return; // the library's own data
        }
        let n = path.len().min(self.path.len());
        let (dst, src) = (&mut self.path, &self.maps[from + at..from + at + n]);
        dst[..n].copy_from_slice(src);
        self.path_len = n;

        // The agent's own memory is never tracked.
        let (a0, a1) = (self.arena_start, self.arena_end);
        if end <= a0 || start >= a1 {
            self.track(start, end);
        } else {
            if start < a0 {
                self.track(start, a0);
            }
            if end > a1 {
                self.track(a1, end);
            }
        }
    }

    /// Registers the parts of `[start, end)` not registered yet, then (once started)
    /// collects the pages written in it.
    fn track(&mut self, start: u64, end: u64) {
        let mut pos = start;
        while pos < end {
            let mut arg = PmScanArg {
                start: pos,
                end,
                category_inverted: sys::PAGE_IS_WPALLOWED,
                category_mask: sys::PAGE_IS_WPALLOWED,
                ..PmScanArg::default()
            };
            let found = match sys::pagemap_scan(self.pagemap, &mut arg, &mut self.found) {
                Ok(n) => n,
                Err(e) => {
                    self.warn_range(start, end, b"PAGEMAP_SCAN", e);
                    return;
                }
            };
            for i in 0..found {
                let region = self.found[i];
                self.register(region.start, region.end);
            }
            if found < FOUND_LEN || arg.walk_end <= pos || arg.walk_end >= end {
                break;
            }
            pos = arg.walk_end;
        }
        if self.started {
            // Written, and not the zero page nor a file page not yet copied on write (both
            // mapped by reads, unprotected when mapped into a page the scan had not marked).
            let hidden = sys::PAGE_IS_PFNZERO | sys::PAGE_IS_FILE | self.guard;
            self.scan(
                start,
                end,
                sys::PM_SCAN_WP_MATCHING,
                hidden,
                sys::PAGE_IS_WRITTEN | hidden,
                sys::PAGE_IS_WRITTEN,
            );
        }
    }

    /// Registers `[start, end)` for write-protect, protects it, and reports its resident
    /// pages: as the initial memory before the recording starts, as written during it (a new
    /// mapping's pages were written since it appeared, before the agent saw it).
    ///
    /// `UFFDIO_WRITEPROTECT` marks every page, populated or not (`WP_UNPOPULATED`); a page
    /// Linux finds unmarked reads as written. Pages written before the protection are still
    /// resident anonymous pages after it, which the scan that follows finds (without
    /// protecting anything); pages written after it are also found by the dirty scan: no write
    /// falls between the two.
    fn register(&mut self, start: u64, end: u64) {
        if end - start > MAX_MAPPING {
            self.warn_too_large(start, end);
            return;
        }
        if let Err(e) = sys::uffd_register_wp(self.uffd, start, end - start) {
            if self.suspects.contains(&start) {
                self.warn_range(start, end, b"UFFDIO_REGISTER", e);
            } else {
                self.suspects[self.suspects_next] = start;
                self.suspects_next = (self.suspects_next + 1) % MAX_WARNED;
            }
            return;
        }
        if let Err(e) = sys::uffd_writeprotect(self.uffd, start, end - start) {
            self.warn_range(start, end, b"UFFDIO_WRITEPROTECT", e);
            return;
        }
        let hidden = sys::PAGE_IS_PFNZERO | self.guard;
        self.scan(
            start,
            end,
            0,
            hidden,
            sys::PAGE_IS_PRESENT | hidden,
            sys::PAGE_IS_PRESENT | sys::PAGE_IS_FILE,
        );
    }

    /// A scan of `[start, end)` (write-protecting what it finds if `flags` says so); every
    /// region found is sent: file pages and pages found before the recording started as
    /// initial memory, the others as written.
    fn scan(&mut self, start: u64, end: u64, flags: u64, inverted: u64, mask: u64, returned: u64) {
        let mut pos = start;
        while pos < end && !self.broken {
            let mut arg = PmScanArg {
                flags,
                start: pos,
                end,
                category_inverted: inverted,
                category_mask: mask,
                return_mask: returned,
                ..PmScanArg::default()
            };
            let n = match sys::pagemap_scan(self.pagemap, &mut arg, &mut self.vec) {
                Ok(n) => n,
                Err(e) => {
                    self.warn_range(start, end, b"PAGEMAP_SCAN", e);
                    return;
                }
            };
            for i in 0..n {
                let r = self.vec[i];
                let kind = if !self.started || r.categories & sys::PAGE_IS_FILE != 0 {
                    protocol::BASE
                } else {
                    protocol::DIRTY
                };
                self.push_range(kind, r.start, r.end);
            }
            if n < VEC_LEN || arg.walk_end <= pos || arg.walk_end >= end {
                break;
            }
            pos = arg.walk_end;
        }
    }

    fn push_range(&mut self, kind: u32, start: u64, end: u64) {
        let full = self.send_len + 16 > SEND_CAP || self.frame_count >= protocol::MAX_RANGES;
        if self.send_len > 0 && (self.frame_kind != kind || full) {
            self.flush_frame();
        }
        if self.send_len == 0 {
            self.send_len = protocol::HEADER_LEN;
            self.frame_kind = kind;
            self.frame_count = 0;
        }
        let at = self.send_len;
        self.send[at..at + 8].copy_from_slice(&start.to_ne_bytes());
        self.send[at + 8..at + 16].copy_from_slice(&end.to_ne_bytes());
        self.send_len += 16;
        self.frame_count += 1;
    }

    /// Sends the frame of ranges being built, if any.
    fn flush_frame(&mut self) {
        if self.send_len == 0 {
            return;
        }
        let header = Header {
            kind: self.frame_kind,
            aux: 0,
            a: 0,
            b: 0,
            count: self.frame_count,
        }
        .encode();
        self.send[..protocol::HEADER_LEN].copy_from_slice(&header);
        let len = self.send_len;
        self.send_len = 0;
        self.send_bytes(len);
    }

    /// Sends a frame without payload (after the ranges gathered so far).
    fn control(&mut self, kind: u32, aux: u32, a: u64, b: u64) {
        self.flush_frame();
        let header = Header {
            kind,
            aux,
            a,
            b,
            count: 0,
        }
        .encode();
        self.send[..protocol::HEADER_LEN].copy_from_slice(&header);
        self.send_bytes(protocol::HEADER_LEN);
    }

    /// Sends a text frame with the text in `self.text`.
    fn text_frame(&mut self, kind: u32, a: u64) {
        self.flush_frame();
        let len = self.text_len;
        let header = Header {
            kind,
            aux: 0,
            a,
            b: 0,
            count: len as u64,
        }
        .encode();
        self.send[..protocol::HEADER_LEN].copy_from_slice(&header);
        let (dst, src) = (&mut self.send, &self.text);
        dst[protocol::HEADER_LEN..protocol::HEADER_LEN + len].copy_from_slice(&src[..len]);
        self.send_bytes(protocol::HEADER_LEN + len);
    }

    /// Sends `self.send[..len]`; on failure the recorder is gone and the agent stops.
    fn send_bytes(&mut self, len: usize) {
        let mut sent = 0;
        while sent < len && !self.broken {
            // SAFETY: sending bytes of the agent's buffer.
            let n = unsafe {
                libc::send(
                    self.sock,
                    self.send.as_ptr().add(sent).cast(),
                    len - sent,
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                self.broken = true;
            } else {
                sent += n as usize;
            }
        }
    }

    fn fail(&mut self, errno: c_int, what: &str) {
        self.text_len = 0;
        self.text_push(what.as_bytes());
        self.text_push(b": ");
        self.text_push(sys::errno_name(errno).as_bytes());
        self.text_frame(protocol::FAIL, errno as u64);
    }

    fn warn_text(&mut self, what: &[u8]) {
        self.text_len = 0;
        self.text_push(what);
        self.text_frame(protocol::WARN, 0);
    }

    /// Warns (once per mapping start) that `[start, end)` could not be tracked.
    fn warn_range(&mut self, start: u64, end: u64, call: &[u8], errno: c_int) {
        if self.warned[..self.warned_len].contains(&start) {
            return;
        }
        if self.warned_len == MAX_WARNED {
            return;
        }
        self.warned[self.warned_len] = start;
        self.warned_len += 1;
        self.text_len = 0;
        self.text_push(b"not recording 0x");
        self.text_push_hex(start);
        self.text_push(b"-0x");
        self.text_push_hex(end);
        if self.path_len > 0 {
            self.text_push(b" (");
            let (n, path) = (self.path_len, self.path);
            self.text_push(&path[..n]);
            self.text_push(b")");
        }
        self.text_push(b": ");
        self.text_push(call);
        self.text_push(b" failed with ");
        self.text_push(sys::errno_name(errno).as_bytes());
        match errno {
            libc::EBUSY => self.text_push(b" (the program registered it with its own userfaultfd)"),
            libc::EINVAL => self.text_push(b" (this kind of mapping cannot be write-protected)"),
            _ => {}
        }
        self.text_frame(protocol::WARN, errno as u64);
    }

    fn warn_too_large(&mut self, start: u64, end: u64) {
        if self.warned[..self.warned_len].contains(&start) || self.warned_len == MAX_WARNED {
            return;
        }
        self.warned[self.warned_len] = start;
        self.warned_len += 1;
        self.text_len = 0;
        self.text_push(b"not recording 0x");
        self.text_push_hex(start);
        self.text_push(b"-0x");
        self.text_push_hex(end);
        self.text_push(
            b": larger than 256 GiB (write-protecting it would allocate page tables for all of it)",
        );
        self.text_frame(protocol::WARN, 0);
    }

    fn text_push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(TEXT_CAP - self.text_len);
        self.text[self.text_len..self.text_len + n].copy_from_slice(&bytes[..n]);
        self.text_len += n;
    }

    fn text_push_hex(&mut self, value: u64) {
        let mut digits = [0u8; 16];
        let mut n = 0;
        let mut v = value;
        loop {
            let d = (v & 15) as u8;
            digits[15 - n] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
            n += 1;
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        self.text_push(&digits[16 - n..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_parse() {
        assert_eq!(parse_u64(b"123"), Some(123));
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"12a"), None);
        assert_eq!(parse_hex(b"7f00aB"), Some(0x7f00ab));
        assert_eq!(parse_hex(b"x"), None);
    }

    #[test]
    fn the_arena_holds_the_state_and_the_stack() {
        assert_eq!(ARENA_LEN % PAGE as usize, 0);
        assert!(STATE_LEN >= size_of::<State>());
    }
}
