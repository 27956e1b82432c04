//! The jobs behind `memferry demo`, `memferry send` and `memferry listen`, as functions that
//! tests and benches call too.
//!
//! - [`prepare_source`]: maps and fills a guest, and starts a workload writing into it.
//! - [`migrate`]: runs the pre-copy source over a transport until the destination verified it.
//! - [`serve`]: accepts one migration on a destination, sized by the source's hello.
//! - [`run_demo`]: both sides in one process, over TCP on 127.0.0.1 or an in-process loopback.

use std::fmt;
use std::io::Write;
use std::net::TcpListener;
use std::sync::Arc;

use memferry::bitmap::AtomicDirtyBitmap;
use memferry::migrate::{PreCopyConfig, PreCopySource};
use memferry::page::{Geometry, PageSize};
use memferry::receive::{Receiver, ReceiverConfig};
use memferry::report::{MigrationReport, RoundReport};
use memferry::time::ByteRate;
use rand_core::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::drive::{self, Clock, DriveError, FrameBuffer};
use crate::memory::{DestinationHost, GuestRegion, SourceHost};
use crate::transport::{loopback, tcp, BoxRead, BoxWrite, RateLimited};
use crate::workload::{below, WorkloadConfig, WorkloadHandle};

/// The guest a source starts with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GuestOptions {
    /// Memory in bytes.
    pub memory: u64,
    /// Page size.
    pub page_size: PageSize,
    /// Share of pages that start all-zero (the rest hold random bytes).
    pub zero_fraction: f64,
    /// What writes into it while it migrates (`None`: nothing).
    pub workload: Option<WorkloadConfig>,
}

impl Default for GuestOptions {
    fn default() -> Self {
        GuestOptions {
            memory: 1 << 30,
            page_size: PageSize::DEFAULT,
            zero_fraction: 0.1,
            workload: Some(WorkloadConfig::default()),
        }
    }
}

/// Why a job failed.
#[derive(Debug)]
pub enum JobError {
    /// Setting up (memory, sockets, bad options) failed.
    Setup(String),
    /// The migration failed.
    Drive(DriveError),
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobError::Setup(why) => write!(f, "{why}"),
            JobError::Drive(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for JobError {}

impl From<DriveError> for JobError {
    fn from(e: DriveError) -> Self {
        JobError::Drive(e)
    }
}

/// Maps a guest, fills it (deterministically from `seed`) and starts its workload.
pub fn prepare_source(options: &GuestOptions, seed: u64) -> Result<SourceHost, JobError> {
    let geometry = Geometry::for_memory(options.page_size, options.memory)
        .map_err(|e| JobError::Setup(format!("bad guest size: {e}")))?;
    let mut region = GuestRegion::new(geometry).map_err(|e| {
        JobError::Setup(format!(
            "cannot map {} bytes of guest memory: {e}",
            geometry.memory_bytes()
        ))
    })?;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ 0x6d65_6d66_6572_7279);
    let zero_threshold = (options.zero_fraction.clamp(0.0, 1.0) * u64::MAX as f64) as u64;
    region.fill_pages(|_, page| {
        if below(rng.next_u64(), u64::MAX) < zero_threshold {
            return;
        }
        for word in page.chunks_exact_mut(8) {
            word.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
    });
    let region = Arc::new(region);
    let dirty = Arc::new(AtomicDirtyBitmap::new(geometry.page_count()));
    let workload = options
        .workload
        .map(|w| WorkloadHandle::start(region.clone(), dirty.clone(), w));
    Ok(SourceHost::new(region, dirty, workload))
}

/// Migrates `host` over (`reader`, `writer`), limited to `link` bytes per second on the wire.
/// Returns the final report; on failure the source guest runs again.
pub fn migrate(
    host: &mut SourceHost,
    config: PreCopyConfig,
    reader: BoxRead,
    writer: BoxWrite,
    link: ByteRate,
    on_round: impl FnMut(&RoundReport),
) -> Result<MigrationReport, JobError> {
    let mut engine = PreCopySource::new(host.region().geometry(), config);
    let mut writer = RateLimited::new(writer, link);
    let clock = Clock::new();
    let result = drive::run_source(&mut engine, host, reader, &mut writer, &clock, on_round);
    result?;
    Ok(engine.report().clone())
}

/// The largest guest a listener accepts unless told otherwise: 1 TiB.
pub const DEFAULT_MAX_GUEST: u64 = 1 << 40;

/// Receives one migration from (`reader`, `writer`): reads the hello, maps a guest of the size
/// it names (refusing more than `max_memory` bytes), and runs the receiver to completion.
pub fn serve(
    mut reader: BoxRead,
    mut writer: BoxWrite,
    max_memory: u64,
) -> Result<DestinationHost, JobError> {
    let clock = Clock::new();
    let mut buffer = FrameBuffer::new();
    let hello = drive::read_hello(&mut reader, &mut buffer)?;
    let geometry = PageSize::new(1u64 << hello.page_shift)
        .ok()
        .and_then(|size| Geometry::new(size, hello.page_count).ok())
        .filter(|g| g.memory_bytes() <= max_memory)
        .ok_or_else(|| {
            let why = format!(
                "the source offers {} pages of 2^{} bytes, more than this listener's limit of {max_memory} bytes",
                hello.page_count, hello.page_shift
            );
            refuse(&mut writer, &why);
            JobError::Setup(why)
        })?;
    // Reservation reserves for real (every page is faulted in), so refuse a guest this host
    // cannot hold rather than let the kernel's OOM killer decide.
    if let Some(available) = available_memory() {
        let needed = geometry.memory_bytes() + geometry.page_count() * 8;
        if needed > available {
            let why = format!(
                "the guest needs {needed} bytes here (memory and page hashes) but this host has only {available} bytes available"
            );
            refuse(&mut writer, &why);
            return Err(JobError::Setup(why));
        }
    }
    let mut host = DestinationHost::new(geometry).map_err(|e| {
        JobError::Setup(format!(
            "cannot map {} bytes for the guest: {e}",
            geometry.memory_bytes()
        ))
    })?;
    let mut receiver = Receiver::new(geometry, ReceiverConfig::default());
    drive::run_destination(
        &mut receiver,
        &mut host,
        &mut reader,
        &mut writer,
        &mut buffer,
        &clock,
    )?;
    host.verdict = receiver.verdict();
    Ok(host)
}

/// Memory the kernel says it can give without swapping (`MemAvailable`), where it says.
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn refuse(writer: &mut BoxWrite, why: &str) {
    let mut out = Vec::new();
    memferry::wire::Frame::Abort {
        code: memferry::wire::AbortCode::Incompatible,
        message: memferry::wire::abort_message(why),
    }
    .emit(&mut out);
    let _ = writer.write_all(&out).and_then(|_| writer.flush());
}

/// How the demo connects its two sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportKind {
    /// TCP on 127.0.0.1.
    Tcp,
    /// In-process loopback (no sockets).
    Loopback,
}

/// What a demo run produced.
pub struct DemoOutcome {
    /// The source's report.
    pub report: MigrationReport,
    /// The source (paused for good: its memory is the image at switchover).
    pub source: SourceHost,
    /// The destination.
    pub destination: DestinationHost,
}

/// Migrates a fresh guest from a source thread to a destination thread in this process.
pub fn run_demo(
    guest: &GuestOptions,
    seed: u64,
    config: PreCopyConfig,
    link: ByteRate,
    transport: TransportKind,
    on_round: impl FnMut(&RoundReport),
) -> Result<DemoOutcome, JobError> {
    let mut source = prepare_source(guest, seed)?;
    let ((src_r, src_w), dest_thread) = match transport {
        TransportKind::Tcp => {
            let listener = TcpListener::bind("127.0.0.1:0")
                .map_err(|e| JobError::Setup(format!("cannot listen on 127.0.0.1: {e}")))?;
            let addr = listener
                .local_addr()
                .map_err(|e| JobError::Setup(e.to_string()))?;
            let dest = std::thread::spawn(move || {
                let (r, w, _) = tcp::accept(&listener)
                    .map_err(|e| JobError::Setup(format!("accept failed: {e}")))?;
                serve(r, w, u64::MAX)
            });
            let ends = tcp::connect(addr)
                .map_err(|e| JobError::Setup(format!("cannot connect to {addr}: {e}")))?;
            (ends, dest)
        }
        TransportKind::Loopback => {
            let (src, (dst_r, dst_w)) = loopback::pair();
            (
                src,
                std::thread::spawn(move || serve(dst_r, dst_w, u64::MAX)),
            )
        }
    };
    let sent = migrate(&mut source, config, src_r, src_w, link, on_round);
    let received = dest_thread
        .join()
        .map_err(|_| JobError::Setup("the destination thread panicked".into()))?;
    // The source's failure explains the destination's, so report it first.
    let report = sent?;
    let destination = received?;
    Ok(DemoOutcome {
        report,
        source,
        destination,
    })
}
