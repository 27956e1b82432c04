//! # Recording the dirty pages of any Linux program
//!
//! [`record_program`] runs a command with the recorder library (`libmemferry_recorder.so`,
//! crate `memferry-recorder`) in `LD_PRELOAD`, receives the pages the program writes in every
//! interval, and writes them as a [trace](crate::trace) that
//! `memferry simulate --workload trace:FILE` replays. The program is unmodified; it must be
//! dynamically linked (a static binary ignores `LD_PRELOAD`, and so does a set-user-ID one).
//!
//! ## How pages are found
//!
//! Inside the program, the library's agent registers every private writable mapping with a
//! userfaultfd in asynchronous write-protect mode (`UFFD_FEATURE_WP_ASYNC |
//! UFFD_FEATURE_WP_UNPOPULATED`) and write-protects it; the first write to a protected page
//! faults once and the kernel simply unprotects it. Every interval, a thread of the agent runs
//! the `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap` over every registered range with
//! `PM_SCAN_WP_MATCHING` and category `PAGE_IS_WRITTEN`: it returns the pages written since
//! the previous scan and write-protects them again in the same walk. Mappings that appear
//! later (`mmap`, a thread's stack, a grown heap) are registered at the next interval, and the
//! pages already written in them count for that interval. The agent excludes its own memory
//! (one named mapping: its buffers and its thread's stack). Linux 6.7 or later
//! ([`kernel_support`] checks at run time). The mechanism is CRIU's where soft-dirty bits are
//! not compiled in.
//!
//! ## What the trace contains
//!
//! - One interval per sample, with its measured length; the last one ends when the program
//!   exits (a program killed by a signal, or ending with `_exit`, loses its last, partial
//!   interval: [`ProgramRecordSummary::complete`] says which).
//! - **The guest** is every 4 KiB page of the program's private writable mappings that was
//!   resident when recording started or was written during the recording, **in address
//!   order**: page index *i* of the trace is the *i*-th such page by virtual address
//!   ([`ProgramRecordSummary::page_map`] gives the runs of addresses). Address order keeps the
//!   program's locality (a sweep over an array stays a sweep; the trace's chunked encoding
//!   stays small), which first-seen order would scramble. Memory never written and not
//!   resident at the start (untouched reservations, code, read-only data, shared mappings)
//!   is not part of the guest.
//! - A page is "written" when a store reached it: a read that maps the zero page or a file
//!   page does not count, and neither does a page discarded (`MADV_DONTNEED`) before any
//!   scan saw it written.
//! - The process, through `exec`, is traced; its children are not (wrappers should `exec`
//!   the real program). After an `exec`, the new image's pages count as written in the
//!   interval in which they appeared, and its addresses share the same page indices.
//!
//! ## Cost
//!
//! The first write to a page in each interval is a write-protect fault resolved in the kernel,
//! about 1.5 µs; later writes to the page in the same interval cost nothing. Programs that
//! write many distinct pages per interval slow down most: real programs were measured 9–61%
//! slower, random writes over 1 GiB 33–54× slower. The scan itself walks the page tables of
//! every private writable mapping once per interval on the agent's thread. Transparent huge
//! pages are turned off for the traced process (`PR_SET_THP_DISABLE`) so that writes are seen
//! page by page, as a hypervisor's dirty log sees them.
//!
//! ## Finding the library
//!
//! [`find_library`]: [`ProgramRecordOptions::library`] if set, else the `MEMFERRY_RECORDER_LIB`
//! environment variable, else `libmemferry_recorder.so` next to the running executable, in its
//! `deps/` directory, or in its parent directory. Cargo builds the library whenever it builds
//! this crate with feature `research` (it is a dependency), so `target/<profile>/memferry`,
//! the tests and the examples find it in `target/<profile>/deps/`. An installed `memferry`
//! (`cargo install`) does not carry it: build it with
//! `cargo build --release -p memferry-recorder` and point to
//! `target/release/libmemferry_recorder.so`, or copy it next to the binary.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use memferry::page::{Geometry, PageSize};
use memferry::time::Nanos;
use memferry_recorder::protocol::{self, Header};

use crate::trace::{DirtySet, TraceHeader, TraceWriter, MAX_DESCRIPTION_LEN};

/// The file name of the recorder library.
pub const LIBRARY_NAME: &str = "libmemferry_recorder.so";
/// The environment variable [`find_library`] reads when no path is given.
pub const LIBRARY_ENV: &str = "MEMFERRY_RECORDER_LIB";

const PAGE: u64 = 4096;
/// How long the program may run before the agent must have said hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a program has to exit after SIGTERM (at the duration limit) before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// How [`record_program`] records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramRecordOptions {
    /// The sampling interval (default 100 ms).
    pub interval: Duration,
    /// The recorder library; `None`: [`find_library`]'s search.
    pub library: Option<PathBuf>,
    /// Stop recording after this long: the program gets SIGTERM, and SIGKILL 5 s later if it
    /// is still running; the trace holds every interval until it ended. `None`: record until
    /// the program exits.
    pub duration: Option<Duration>,
    /// The trace's description; `None`: the command line and the settings.
    pub description: Option<String>,
}

impl Default for ProgramRecordOptions {
    fn default() -> Self {
        ProgramRecordOptions {
            interval: Duration::from_millis(100),
            library: None,
            duration: None,
            description: None,
        }
    }
}

/// A run of consecutive trace pages at consecutive addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    /// The trace's page index of the run's first page.
    pub first_page: u64,
    /// The virtual address of the run's first page in the program.
    pub address: u64,
    /// Pages in the run.
    pub pages: u64,
}

/// When one interval was closed, as the agent measured it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntervalTiming {
    /// CLOCK_MONOTONIC nanoseconds when the scan that closed the interval started: every write
    /// made before this instant is in this interval or an earlier one.
    pub scan_started_ns: u64,
    /// CLOCK_MONOTONIC nanoseconds when that scan ended: every write made after this instant
    /// is in a later interval.
    pub scan_ended_ns: u64,
    /// The interval's length as written to the trace (from the previous scan's start).
    pub duration: Duration,
    /// Pages written in the interval.
    pub dirty_pages: u64,
}

/// What [`record_program`] recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramRecordSummary {
    /// Intervals in the trace.
    pub intervals: u64,
    /// Dirty pages over all intervals.
    pub dirty_pages: u64,
    /// The most pages written in one interval.
    pub max_dirty_pages: u64,
    /// The trace's guest, in 4 KiB pages (see the module docs for what it holds).
    pub guest_pages: u64,
    /// Bytes of the trace file.
    pub file_bytes: u64,
    /// From the start of tracking to the program's end.
    pub elapsed: Duration,
    /// How the program ended.
    pub status: ExitStatus,
    /// Whether the program's last interval was recorded (it exited normally rather than by a
    /// signal or `_exit`).
    pub complete: bool,
    /// Whether the duration limit stopped the program.
    pub stopped_at_limit: bool,
    /// How many times the program `exec`ed while traced.
    pub execs: u64,
    /// What the agent could not track (mappings it could not register, failed scans).
    pub warnings: Vec<String>,
    /// Trace pages to addresses: runs in increasing order of both.
    pub page_map: Vec<PageRun>,
    /// Every interval's timing, in order.
    pub timings: Vec<IntervalTiming>,
    /// The library that was preloaded.
    pub library: PathBuf,
}

impl ProgramRecordSummary {
    /// The guest's size in bytes.
    pub fn guest_bytes(&self) -> u64 {
        self.guest_pages * PAGE
    }

    /// The trace page of virtual address `address`, if that page is in the guest.
    pub fn page_of_address(&self, address: u64) -> Option<u64> {
        let page = address / PAGE * PAGE;
        let i = self.page_map.partition_point(|run| run.address <= page);
        let run = self.page_map.get(i.checked_sub(1)?)?;
        let offset = (page - run.address) / PAGE;
        (offset < run.pages).then_some(run.first_page + offset)
    }
}

/// Why a program could not be recorded.
#[derive(Debug)]
pub enum ProgramRecordError {
    /// The options or the command make no sense.
    InvalidOptions(String),
    /// This kernel (or this user) cannot record: what is missing.
    Unsupported(String),
    /// The kernel has what recording needs, but tracking a page of this process did not give
    /// the expected answer: what went wrong.
    KernelCheckFailed(String),
    /// The recorder library was not found where it was looked for.
    LibraryNotFound {
        /// The paths tried, in order.
        searched: Vec<PathBuf>,
    },
    /// The command does not exist.
    CommandNotFound(OsString),
    /// The command exists but could not be started.
    Spawn(OsString, io::Error),
    /// The agent never reported from inside the program.
    NoAgent(String),
    /// The agent inside the program reported that it cannot track it (the program was
    /// stopped).
    AgentFailed(String),
    /// The agent sent something this recorder does not understand (a library from another
    /// version?).
    Protocol(String),
    /// Talking to the program, or writing the trace, failed.
    Io(io::Error),
}

impl fmt::Display for ProgramRecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProgramRecordError::InvalidOptions(why) => write!(f, "cannot record: {why}"),
            ProgramRecordError::Unsupported(why) => {
                write!(
                    f,
                    "this system cannot record a program's dirty pages: {why}"
                )
            }
            ProgramRecordError::KernelCheckFailed(why) => {
                write!(
                    f,
                    "the kernel's dirty-page tracking failed its self-test: {why}"
                )
            }
            ProgramRecordError::LibraryNotFound { searched } => {
                write!(
                    f,
                    "the recorder library {LIBRARY_NAME} was not found (looked at"
                )?;
                for (i, path) in searched.iter().enumerate() {
                    write!(f, "{}{}", if i == 0 { " " } else { ", " }, path.display())?;
                }
                write!(
                    f,
                    "); build it with `cargo build --release -p memferry-recorder` and give its \
                     path (target/release/{LIBRARY_NAME}) in {LIBRARY_ENV}, or put it next to \
                     the memferry binary"
                )
            }
            ProgramRecordError::CommandNotFound(cmd) => {
                write!(f, "command not found: {}", cmd.to_string_lossy())
            }
            ProgramRecordError::Spawn(cmd, e) => {
                write!(f, "cannot start {}: {e}", cmd.to_string_lossy())
            }
            ProgramRecordError::NoAgent(why) => write!(f, "the program was not traced: {why}"),
            ProgramRecordError::AgentFailed(why) => write!(
                f,
                "the recorder inside the program could not track it ({why}); the program was \
                 stopped"
            ),
            ProgramRecordError::Protocol(why) => {
                write!(f, "unexpected data from the recorder library: {why}")
            }
            ProgramRecordError::Io(e) => write!(f, "recording failed: {e}"),
        }
    }
}

impl std::error::Error for ProgramRecordError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProgramRecordError::Spawn(_, e) | ProgramRecordError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ProgramRecordError {
    fn from(e: io::Error) -> Self {
        ProgramRecordError::Io(e)
    }
}

/// Checks that this kernel and this user can record (Linux 6.7+: asynchronous userfaultfd
/// write-protect and `PAGEMAP_SCAN`), by tracking one page of this process:
/// [`ProgramRecordError::Unsupported`] says what is missing,
/// [`ProgramRecordError::KernelCheckFailed`] what did not behave as it should.
pub fn kernel_support() -> Result<(), ProgramRecordError> {
    memferry_recorder::sys::probe().map_err(|e| {
        if e.missing {
            ProgramRecordError::Unsupported(e.what)
        } else {
            ProgramRecordError::KernelCheckFailed(e.what)
        }
    })
}

/// Finds the recorder library: `explicit` if given (it must exist), else the path in the
/// `MEMFERRY_RECORDER_LIB` environment variable, else `libmemferry_recorder.so` in the running
/// executable's directory, its `deps/` subdirectory, or its parent directory. Returns a
/// canonical path.
pub fn find_library(explicit: Option<&Path>) -> Result<PathBuf, ProgramRecordError> {
    let mut candidates = Vec::new();
    if let Some(path) = explicit {
        candidates.push(path.to_path_buf());
    } else if let Some(path) = std::env::var_os(LIBRARY_ENV).filter(|p| !p.is_empty()) {
        candidates.push(PathBuf::from(path));
    } else if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        candidates.push(dir.join(LIBRARY_NAME));
        candidates.push(dir.join("deps").join(LIBRARY_NAME));
        if let Some(parent) = dir.parent() {
            candidates.push(parent.join(LIBRARY_NAME));
        }
    }
    for path in &candidates {
        if path.is_file() {
            return Ok(path.canonicalize()?);
        }
    }
    Err(ProgramRecordError::LibraryNotFound {
        searched: candidates,
    })
}

/// Runs `command` (program and arguments) with the recorder library preloaded, records the
/// pages it writes every `options.interval` until it exits (or until `options.duration`), and
/// writes the trace to `out`: one region of 4 KiB pages, one interval per sample (see the
/// module docs for what the guest is).
///
/// Before starting the program it checks that the kernel can record ([`kernel_support`]) and
/// finds the library ([`find_library`]). The program inherits this process's standard input,
/// output and error. While it runs, this process ignores SIGINT and SIGQUIT (a Ctrl-C at the
/// terminal reaches the program, which ends, and the trace is still written), as `time(1)`
/// does; the previous dispositions are restored before returning. The trace is written when
/// the program has ended (the guest's size is known only then); intervals wait in an
/// unlinked temporary file meanwhile.
pub fn record_program(
    command: &[OsString],
    options: &ProgramRecordOptions,
    out: impl Write,
) -> Result<ProgramRecordSummary, ProgramRecordError> {
    let Some((program, args)) = command.split_first() else {
        return Err(ProgramRecordError::InvalidOptions(
            "no command to run".into(),
        ));
    };
    let interval_ns = u64::try_from(options.interval.as_nanos())
        .ok()
        .filter(|&n| n >= 1_000_000)
        .ok_or_else(|| {
            ProgramRecordError::InvalidOptions(format!(
                "the sampling interval must be at least 1 ms, not {:?}",
                options.interval
            ))
        })?;
    if let Some(description) = &options.description {
        if description.len() > MAX_DESCRIPTION_LEN {
            return Err(ProgramRecordError::InvalidOptions(format!(
                "the description is {} bytes; at most {MAX_DESCRIPTION_LEN} fit",
                description.len()
            )));
        }
    }
    kernel_support()?;
    let library = find_library(options.library.as_deref())?;
    let lib_bytes = library.as_os_str().as_bytes();
    if lib_bytes
        .iter()
        .any(|&b| b == b':' || b == b' ' || b == b'\t')
    {
        return Err(ProgramRecordError::InvalidOptions(format!(
            "the library's path {} contains a space or a colon, which LD_PRELOAD cannot hold",
            library.display()
        )));
    }

    let (ours, theirs) = UnixStream::pair()?;
    let their_fd = theirs.as_raw_fd();
    // SAFETY: fstat of a live descriptor into a zeroed stat.
    let inode = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(their_fd, &mut st) != 0 {
            return Err(io::Error::last_os_error().into());
        }
        st.st_ino
    };
    let mut preload = library.as_os_str().to_os_string();
    if let Some(existing) = std::env::var_os("LD_PRELOAD").filter(|p| !p.is_empty()) {
        preload.push(":");
        preload.push(existing);
    }
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("LD_PRELOAD", &preload)
        .env(protocol::ENV_FD, their_fd.to_string())
        .env(protocol::ENV_PARENT, std::process::id().to_string())
        .env(protocol::ENV_LIB, &library)
        .env(protocol::ENV_INTERVAL, interval_ns.to_string())
        .env(protocol::ENV_INODE, inode.to_string());
    // SAFETY: fcntl is async-signal-safe; it lets the agent's end of the socket survive exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(their_fd, libc::F_SETFD, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut store = Store::new(temp_file()?);
    let wall_start = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_nanos()).ok());
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ProgramRecordError::CommandNotFound(program.clone()))
        }
        Err(e) => return Err(ProgramRecordError::Spawn(program.clone(), e)),
    };
    drop(theirs);
    let mut child = ChildGuard(Some(child));
    let _interrupts = IgnoreInterrupts::new();
    let started = Instant::now();
    let mut receiver = Receiver::new(child.id(), &library);
    let status = receive(
        &mut child,
        ours,
        options,
        &mut receiver,
        &mut store,
        started,
    )?;

    // The trace.
    let page_map = receiver.page_map();
    let guest_pages = page_map.last().map_or(0, |r| r.first_page + r.pages);
    let geometry = Geometry::new(PageSize::DEFAULT, guest_pages.max(1))
        .map_err(|e| ProgramRecordError::InvalidOptions(format!("{e:?}")))?;
    let description = match &options.description {
        Some(d) => d.clone(),
        None => default_description(command, options.interval),
    };
    let mut header = TraceHeader::new(geometry, Nanos(interval_ns)).with_description(description);
    header.start_unix_nanos = wall_start.filter(|&n| n != 0);
    let mut writer = TraceWriter::new(BufWriter::new(out), &header)?;
    let mut reader = store.finish()?;
    let mut pages = Vec::new();
    let mut max_dirty_pages = 0;
    for timing in &receiver.timings {
        reader.next_interval(|start, end| {
            let i = page_map.partition_point(|run| run.address <= start * PAGE) - 1;
            let run = page_map[i];
            let first = run.first_page + (start - run.address / PAGE);
            pages.extend(first..first + (end - start));
        })?;
        let duration = u64::try_from(timing.duration.as_nanos()).unwrap_or(u64::MAX);
        let written =
            writer.write_interval_lasting(DirtySet::SortedPages(&pages), Nanos(duration))?;
        max_dirty_pages = max_dirty_pages.max(written.dirty_pages);
        pages.clear();
    }
    let (_, totals) = writer.finish()?;
    Ok(ProgramRecordSummary {
        intervals: totals.intervals,
        dirty_pages: totals.dirty_pages,
        max_dirty_pages,
        guest_pages,
        file_bytes: totals.bytes,
        elapsed: receiver.elapsed(),
        status,
        complete: receiver.ended,
        stopped_at_limit: receiver.stopped_at_limit,
        execs: receiver.hellos.saturating_sub(1),
        warnings: receiver.warnings,
        page_map,
        timings: receiver.timings,
        library,
    })
}

fn default_description(command: &[OsString], interval: Duration) -> String {
    let mut line = String::new();
    for (i, word) in command.iter().enumerate() {
        if i > 0 {
            line.push(' ');
        }
        line.push_str(&word.to_string_lossy());
    }
    let mut text = format!(
        "memferry record -- {line}: pages the program wrote every {interval:?} (userfaultfd \
         WP_ASYNC + PAGEMAP_SCAN, from a preloaded agent); guest = pages of its private \
         writable mappings resident at the start or written, in address order"
    );
    if text.len() > MAX_DESCRIPTION_LEN {
        let mut cut = MAX_DESCRIPTION_LEN;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// Reads the agent's frames until the program has ended; returns how it ended.
fn receive(
    child: &mut ChildGuard,
    mut sock: UnixStream,
    options: &ProgramRecordOptions,
    receiver: &mut Receiver,
    store: &mut Store,
    started: Instant,
) -> Result<ExitStatus, ProgramRecordError> {
    sock.set_nonblocking(true)?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let mut eof = false;
    let mut term_sent: Option<Instant> = None;
    loop {
        if !eof {
            let mut fds = libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one live descriptor.
            unsafe { libc::poll(&mut fds, 1, 50) };
            eof = read_available(&mut sock, &mut chunk, &mut buf)?;
            receiver.parse(&mut buf, store)?;
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(status) = child.try_wait()? {
            // Everything the program sent is in the socket: take it all.
            read_available(&mut sock, &mut chunk, &mut buf)?;
            receiver.parse(&mut buf, store)?;
            if receiver.hellos == 0 {
                return Err(ProgramRecordError::NoAgent(no_agent_reason(status)));
            }
            return Ok(status);
        }
        let now = Instant::now();
        if receiver.hellos == 0 && now - started > HELLO_TIMEOUT {
            child.kill();
            return Err(ProgramRecordError::NoAgent(format!(
                "the recorder library did not report within {HELLO_TIMEOUT:?} of the start \
                 (a statically linked or set-user-ID program ignores LD_PRELOAD); the program \
                 was stopped"
            )));
        }
        if let Some(limit) = options.duration {
            match term_sent {
                None if now - started >= limit => {
                    child.signal(libc::SIGTERM);
                    receiver.stopped_at_limit = true;
                    term_sent = Some(now);
                }
                Some(at) if now - at >= TERM_GRACE => {
                    child.signal(libc::SIGKILL);
                }
                _ => {}
            }
        }
    }
}

fn no_agent_reason(status: ExitStatus) -> String {
    format!(
        "it ended ({status}) without the recorder library reporting from inside it (a \
         statically linked or set-user-ID program ignores LD_PRELOAD, and a program that \
         exits before its libraries' constructors run cannot be traced){}",
        match status.code() {
            Some(126) | Some(127) =>
                "; exit status 126/127 usually means the shell could not run the command",
            _ => "",
        }
    )
}

/// Reads what the socket has; returns whether the other end is closed.
fn read_available(sock: &mut UnixStream, chunk: &mut [u8], buf: &mut Vec<u8>) -> io::Result<bool> {
    loop {
        match sock.read(chunk) {
            Ok(0) => return Ok(true),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The state of a recording as frames arrive.
struct Receiver {
    child_pid: u32,
    library: PathBuf,
    hellos: u64,
    started_ns: Option<u64>,
    mark_ns: u64,
    last_tick_ns: u64,
    pending: Vec<(u64, u64)>,
    /// Every page of the guest: disjoint, non-adjacent runs of page numbers, start -> end.
    guest: BTreeMap<u64, u64>,
    timings: Vec<IntervalTiming>,
    warnings: Vec<String>,
    ended: bool,
    stopped_at_limit: bool,
}

impl Receiver {
    fn new(child_pid: u32, library: &Path) -> Self {
        Receiver {
            child_pid,
            library: library.to_path_buf(),
            hellos: 0,
            started_ns: None,
            mark_ns: 0,
            last_tick_ns: 0,
            pending: Vec::new(),
            guest: BTreeMap::new(),
            timings: Vec::new(),
            warnings: Vec::new(),
            ended: false,
            stopped_at_limit: false,
        }
    }

    fn elapsed(&self) -> Duration {
        Duration::from_nanos(
            self.last_tick_ns
                .saturating_sub(self.started_ns.unwrap_or(self.last_tick_ns)),
        )
    }

    /// Handles every complete frame in `buf` and removes it.
    fn parse(&mut self, buf: &mut Vec<u8>, store: &mut Store) -> Result<(), ProgramRecordError> {
        let mut at = 0;
        while buf.len() - at >= protocol::HEADER_LEN {
            let header = Header::decode(buf[at..at + protocol::HEADER_LEN].try_into().unwrap());
            let len = header.payload_len().ok_or_else(|| {
                ProgramRecordError::Protocol(format!(
                    "frame kind {} with count {} (is {} from another version of memferry?)",
                    header.kind,
                    header.count,
                    self.library.display()
                ))
            })?;
            if buf.len() - at - protocol::HEADER_LEN < len {
                break;
            }
            let payload = &buf[at + protocol::HEADER_LEN..at + protocol::HEADER_LEN + len];
            self.frame(header, payload, store)?;
            at += protocol::HEADER_LEN + len;
        }
        buf.drain(..at);
        Ok(())
    }

    fn frame(
        &mut self,
        header: Header,
        payload: &[u8],
        store: &mut Store,
    ) -> Result<(), ProgramRecordError> {
        if self.hellos == 0 && !matches!(header.kind, protocol::HELLO | protocol::FAIL) {
            return Err(ProgramRecordError::Protocol(format!(
                "frame kind {} before the hello",
                header.kind
            )));
        }
        match header.kind {
            protocol::HELLO => {
                if header.aux != protocol::VERSION {
                    return Err(ProgramRecordError::Protocol(format!(
                        "{} speaks protocol version {}, this memferry version {}: rebuild the \
                         library from the same sources (cargo build -p memferry-recorder)",
                        self.library.display(),
                        header.aux,
                        protocol::VERSION
                    )));
                }
                if header.a != u64::from(self.child_pid) || header.b != PAGE {
                    return Err(ProgramRecordError::Protocol(format!(
                        "hello from pid {} with {}-byte pages; expected pid {} and 4096",
                        header.a, header.b, self.child_pid
                    )));
                }
                self.hellos += 1;
            }
            protocol::BASE | protocol::DIRTY => {
                let initial = header.kind == protocol::BASE && self.hellos == 1;
                for pair in payload.chunks_exact(16) {
                    let start = u64::from_ne_bytes(pair[..8].try_into().unwrap());
                    let end = u64::from_ne_bytes(pair[8..].try_into().unwrap());
                    if start >= end || !start.is_multiple_of(PAGE) || !end.is_multiple_of(PAGE) {
                        return Err(ProgramRecordError::Protocol(format!(
                            "bad page range {start:#x}-{end:#x}"
                        )));
                    }
                    if initial {
                        insert_run(&mut self.guest, start / PAGE, end / PAGE);
                    } else {
                        // After an exec, the new image's initial pages were written during
                        // the recording.
                        self.pending.push((start / PAGE, end / PAGE));
                    }
                }
            }
            protocol::STARTED => {
                if self.started_ns.is_none() {
                    self.started_ns = Some(header.a);
                    self.mark_ns = header.a;
                    self.last_tick_ns = header.a;
                }
            }
            protocol::TICK => {
                let runs = merge(&mut self.pending);
                let mut dirty_pages = 0;
                for &(start, end) in &runs {
                    insert_run(&mut self.guest, start, end);
                    dirty_pages += end - start;
                }
                store.interval(&runs)?;
                self.pending.clear();
                self.timings.push(IntervalTiming {
                    scan_started_ns: header.a,
                    scan_ended_ns: header.b,
                    duration: Duration::from_nanos(header.a.saturating_sub(self.mark_ns)),
                    dirty_pages,
                });
                self.mark_ns = header.a;
                self.last_tick_ns = header.b;
            }
            protocol::WARN => self
                .warnings
                .push(String::from_utf8_lossy(payload).into_owned()),
            protocol::FAIL => {
                return Err(ProgramRecordError::AgentFailed(format!(
                    "{} ({})",
                    String::from_utf8_lossy(payload),
                    io::Error::from_raw_os_error(header.a as i32)
                )))
            }
            protocol::END => self.ended = true,
            _ => unreachable!("payload_len accepts known kinds only"),
        }
        Ok(())
    }

    /// The guest's runs, numbered in address order.
    fn page_map(&self) -> Vec<PageRun> {
        let mut next = 0;
        self.guest
            .iter()
            .map(|(&start, &end)| {
                let run = PageRun {
                    first_page: next,
                    address: start * PAGE,
                    pages: end - start,
                };
                next += end - start;
                run
            })
            .collect()
    }
}

/// Sorts and merges page ranges (overlapping or adjacent ones become one).
fn merge(ranges: &mut [(u64, u64)]) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(start, end) in ranges.iter() {
        match out.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

/// Adds `[start, end)` to a set of disjoint, non-adjacent runs.
fn insert_run(runs: &mut BTreeMap<u64, u64>, mut start: u64, mut end: u64) {
    if let Some((&s, &e)) = runs.range(..=start).next_back() {
        if e >= start {
            start = s;
            end = end.max(e);
            runs.remove(&s);
        }
    }
    while let Some((&s, &e)) = runs.range(start..=end).next() {
        end = end.max(e);
        runs.remove(&s);
    }
    runs.insert(start, end);
}

/// Intervals waiting for the guest's size: varints in an unlinked temporary file.
struct Store {
    out: BufWriter<File>,
    bytes: Vec<u8>,
}

impl Store {
    fn new(file: File) -> Self {
        Store {
            out: BufWriter::with_capacity(1 << 20, file),
            bytes: Vec::new(),
        }
    }

    /// Appends an interval: its runs of page numbers, sorted and disjoint.
    fn interval(&mut self, runs: &[(u64, u64)]) -> io::Result<()> {
        self.bytes.clear();
        put_varint(&mut self.bytes, runs.len() as u64);
        let mut previous = 0;
        for &(start, end) in runs {
            put_varint(&mut self.bytes, start - previous);
            put_varint(&mut self.bytes, end - start);
            previous = end;
        }
        self.out.write_all(&self.bytes)
    }

    fn finish(self) -> io::Result<StoreReader> {
        let mut file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.seek(SeekFrom::Start(0))?;
        Ok(StoreReader {
            input: BufReader::with_capacity(1 << 20, file),
        })
    }
}

struct StoreReader {
    input: BufReader<File>,
}

impl StoreReader {
    /// Reads the next interval, handing each run to `run(start, end)` in order.
    fn next_interval(&mut self, mut run: impl FnMut(u64, u64)) -> io::Result<()> {
        let count = self.varint()?;
        let mut previous = 0;
        for _ in 0..count {
            let start = previous + self.varint()?;
            let end = start + self.varint()?;
            run(start, end);
            previous = end;
        }
        Ok(())
    }

    fn varint(&mut self) -> io::Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let mut byte = [0u8];
            self.input.read_exact(&mut byte)?;
            value |= u64::from(byte[0] & 0x7f) << shift;
            if byte[0] & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "varint too long",
        ))
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A temporary file, already unlinked.
fn temp_file() -> io::Result<File> {
    let dir = std::env::temp_dir();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    for attempt in 0..100u32 {
        let path = dir.join(format!(
            "memferry-record-{}-{nanos}-{attempt}",
            std::process::id()
        ));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(file) => {
                let _ = std::fs::remove_file(&path);
                return Ok(file);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "cannot create a temporary file",
    ))
}

/// The traced program: killed (and reaped) if recording fails while it runs.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        let Some(child) = self.0.as_mut() else {
            return Ok(Some(ExitStatus::from_raw(0)));
        };
        let status = child.try_wait()?;
        if status.is_some() {
            self.0 = None;
        }
        Ok(status)
    }

    fn signal(&mut self, signal: libc::c_int) {
        if let Some(child) = &self.0 {
            // SAFETY: signalling our own child, which has not been reaped (its pid is ours).
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGINT and SIGQUIT ignored in this process while it lives.
struct IgnoreInterrupts {
    old: [libc::sigaction; 2],
}

const INTERRUPTS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGQUIT];

impl IgnoreInterrupts {
    fn new() -> Self {
        // SAFETY: sigaction with zeroed (then filled) structures.
        unsafe {
            let mut ignore: libc::sigaction = std::mem::zeroed();
            ignore.sa_sigaction = libc::SIG_IGN;
            libc::sigemptyset(&mut ignore.sa_mask);
            let mut old: [libc::sigaction; 2] = std::mem::zeroed();
            for (signal, old) in INTERRUPTS.iter().zip(old.iter_mut()) {
                libc::sigaction(*signal, &ignore, old);
            }
            IgnoreInterrupts { old }
        }
    }
}

impl Drop for IgnoreInterrupts {
    fn drop(&mut self) {
        for (signal, old) in INTERRUPTS.iter().zip(self.old.iter()) {
            // SAFETY: restoring what `new` saved.
            unsafe { libc::sigaction(*signal, old, std::ptr::null_mut()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_and_stay_disjoint() {
        let mut runs = BTreeMap::new();
        insert_run(&mut runs, 10, 12);
        insert_run(&mut runs, 20, 22);
        insert_run(&mut runs, 12, 13); // adjacent: merges
        insert_run(&mut runs, 30, 31);
        assert_eq!(
            runs.iter().map(|(&s, &e)| (s, e)).collect::<Vec<_>>(),
            [(10, 13), (20, 22), (30, 31)]
        );
        insert_run(&mut runs, 11, 25); // spans two
        assert_eq!(
            runs.iter().map(|(&s, &e)| (s, e)).collect::<Vec<_>>(),
            [(10, 25), (30, 31)]
        );
        insert_run(&mut runs, 5, 40);
        assert_eq!(
            runs.iter().map(|(&s, &e)| (s, e)).collect::<Vec<_>>(),
            [(5, 40)]
        );
        let mut ranges = vec![(7, 9), (1, 3), (3, 4), (8, 12), (20, 21)];
        assert_eq!(merge(&mut ranges), [(1, 4), (7, 12), (20, 21)]);
    }

    #[test]
    fn the_store_round_trips() {
        let mut store = Store::new(temp_file().unwrap());
        store
            .interval(&[(3, 5), (300, 301), (1 << 40, (1 << 40) + 2)])
            .unwrap();
        store.interval(&[]).unwrap();
        store.interval(&[(0, 1)]).unwrap();
        let mut reader = store.finish().unwrap();
        let mut got = Vec::new();
        for _ in 0..3 {
            let mut one = Vec::new();
            reader.next_interval(|s, e| one.push((s, e))).unwrap();
            got.push(one);
        }
        assert_eq!(
            got,
            [
                vec![(3, 5), (300, 301), (1 << 40, (1 << 40) + 2)],
                vec![],
                vec![(0, 1)]
            ]
        );
    }

    #[test]
    fn addresses_map_to_pages() {
        let summary_map = vec![
            PageRun {
                first_page: 0,
                address: 0x1000,
                pages: 2,
            },
            PageRun {
                first_page: 2,
                address: 0x10000,
                pages: 3,
            },
        ];
        let summary = ProgramRecordSummary {
            intervals: 0,
            dirty_pages: 0,
            max_dirty_pages: 0,
            guest_pages: 5,
            file_bytes: 0,
            elapsed: Duration::ZERO,
            status: ExitStatus::from_raw(0),
            complete: true,
            stopped_at_limit: false,
            execs: 0,
            warnings: Vec::new(),
            page_map: summary_map,
            timings: Vec::new(),
            library: PathBuf::new(),
        };
        assert_eq!(summary.page_of_address(0x0fff), None);
        assert_eq!(summary.page_of_address(0x1000), Some(0));
        assert_eq!(summary.page_of_address(0x2fff), Some(1));
        assert_eq!(summary.page_of_address(0x3000), None);
        assert_eq!(summary.page_of_address(0x12345), Some(4));
        assert_eq!(summary.page_of_address(0x13000), None);
    }
}
