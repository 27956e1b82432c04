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
use memferry::page::{Geometry, MemoryLayout, PageSize};
use memferry::receive::{Destination, DestinationConfig};
use memferry::report::{MigrationReport, RoundReport};
use memferry::session::{SessionConfig, Source};
use memferry::strategy::{PreCopy, PreCopyConfig};
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
/// Returns the final report; on failure before the switchover the source guest runs again.
pub fn migrate(
    host: &mut SourceHost,
    config: PreCopyConfig,
    reader: BoxRead,
    writer: BoxWrite,
    link: ByteRate,
    on_round: impl FnMut(&RoundReport),
) -> Result<MigrationReport, JobError> {
    migrate_channels(host, config, vec![(reader, writer)], link, on_round)
}

/// [`migrate`] over several connections (channel 0 first): pages are sharded across them.
/// `link` is shared: each connection gets an equal part of it.
pub fn migrate_channels(
    host: &mut SourceHost,
    config: PreCopyConfig,
    channels: Vec<(BoxRead, BoxWrite)>,
    link: ByteRate,
    on_round: impl FnMut(&RoundReport),
) -> Result<MigrationReport, JobError> {
    let n = channels.len().max(1) as u64;
    let share = if link.is_unlimited() {
        link
    } else {
        ByteRate((link.0 / n).max(1))
    };
    let channels: Vec<(BoxRead, BoxWrite)> = channels
        .into_iter()
        .map(|(r, w)| (r, Box::new(RateLimited::new(w, share)) as BoxWrite))
        .collect();
    let session = SessionConfig {
        channels: channels.len() as u16,
        verify: config.verify,
        session_id: session_id(),
        ..SessionConfig::default()
    };
    let layout = MemoryLayout::single(host.region().geometry());
    let mut engine = Source::new(layout, session, PreCopy::new(config));
    let clock = Clock::new();
    let result = drive::run_source(&mut engine, host, channels, &clock, on_round);
    result?;
    Ok(engine.report().clone())
}

/// A random id for a migration (so a stray connection of another one is refused).
fn session_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// The largest guest a listener accepts unless told otherwise: 1 TiB.
pub const DEFAULT_MAX_GUEST: u64 = 1 << 40;

/// Receives one migration from (`reader`, `writer`): reads the hello, maps a guest of the size
/// it names (refusing more than `max_memory` bytes), and runs the receiver to completion.
pub fn serve(
    reader: BoxRead,
    writer: BoxWrite,
    max_memory: u64,
) -> Result<DestinationHost, JobError> {
    serve_channels(reader, writer, max_memory, || {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "this listener takes one connection per migration",
        ))
    })
}

/// [`serve`] for a source that may open several connections: `accept_more` accepts each
/// further one (they are ordered by the channel their `Join` names).
pub fn serve_channels(
    mut reader: BoxRead,
    mut writer: BoxWrite,
    max_memory: u64,
    mut accept_more: impl FnMut() -> std::io::Result<(BoxRead, BoxWrite)>,
) -> Result<DestinationHost, JobError> {
    let clock = Clock::new();
    let mut buffer = FrameBuffer::new();
    let hello = drive::read_hello(&mut reader, &mut buffer)?;
    let layout = hello.layout.clone();
    let geometry = Some(layout.geometry())
        .filter(|g| g.memory_bytes() <= max_memory && layout.regions().len() == 1)
        .ok_or_else(|| {
            let why = format!(
                "the source offers {} pages of {} bytes in {} region(s); this listener takes one region, limit {max_memory} bytes",
                layout.page_count(),
                layout.page_size().bytes(),
                layout.regions().len()
            );
            refuse(&mut writer, &why);
            JobError::Setup(why)
        })?;
    // Reservation reserves for real (every page is faulted in), so refuse a guest this host
    // cannot hold rather than let the kernel's OOM killer decide.
    if let Some(available) = available_memory() {
        let needed = geometry.memory_bytes() + geometry.page_count() * 20;
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
    // The extra connections announce their channel in their first frame.
    let mut extra: Vec<Option<(BoxRead, FrameBuffer, BoxWrite)>> =
        (1..hello.channels).map(|_| None).collect();
    for _ in 1..hello.channels {
        let (mut r, mut w) = accept_more().map_err(|e| {
            let why = format!("accepting another connection of the migration failed: {e}");
            refuse(&mut writer, &why);
            JobError::Setup(why)
        })?;
        let mut b = FrameBuffer::new();
        let (channel, session) = drive::read_join(&mut r, &mut b)?;
        let slot = (channel as usize)
            .checked_sub(1)
            .and_then(|i| extra.get_mut(i))
            .filter(|s| s.is_none() && session == hello.session_id);
        let Some(slot) = slot else {
            let why = format!("a connection joined as channel {channel} of session {session:#x}, which this migration does not expect");
            refuse(&mut w, &why);
            refuse(&mut writer, &why);
            return Err(JobError::Setup(why));
        };
        *slot = Some((r, b, w));
    }
    let mut channels = vec![(reader, buffer, writer)];
    channels.extend(extra.into_iter().flatten());
    let mut destination = Destination::new(layout, DestinationConfig::default());
    drive::run_destination(&mut destination, &mut host, channels, &clock)?;
    host.verdict = destination.verdict();
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
    run_demo_channels(guest, seed, config, link, transport, 1, on_round)
}

/// [`run_demo`] over `channels` connections.
pub fn run_demo_channels(
    guest: &GuestOptions,
    seed: u64,
    config: PreCopyConfig,
    link: ByteRate,
    transport: TransportKind,
    channels: u16,
    on_round: impl FnMut(&RoundReport),
) -> Result<DemoOutcome, JobError> {
    let channels = channels.max(1);
    let mut source = prepare_source(guest, seed)?;
    let (ends, dest_thread) = match transport {
        TransportKind::Tcp => {
            let listener = TcpListener::bind("127.0.0.1:0")
                .map_err(|e| JobError::Setup(format!("cannot listen on 127.0.0.1: {e}")))?;
            let addr = listener
                .local_addr()
                .map_err(|e| JobError::Setup(e.to_string()))?;
            let dest = std::thread::spawn(move || {
                let (r, w, _) = tcp::accept(&listener)
                    .map_err(|e| JobError::Setup(format!("accept failed: {e}")))?;
                serve_channels(r, w, u64::MAX, || {
                    tcp::accept(&listener).map(|(r, w, _)| (r, w))
                })
            });
            let mut ends = Vec::new();
            for _ in 0..channels {
                ends.push(
                    tcp::connect(addr)
                        .map_err(|e| JobError::Setup(format!("cannot connect to {addr}: {e}")))?,
                );
            }
            (ends, dest)
        }
        TransportKind::Loopback => {
            let mut ends = Vec::new();
            let mut far = Vec::new();
            for _ in 0..channels {
                let (src, dst) = loopback::pair();
                ends.push(src);
                far.push(dst);
            }
            let dest = std::thread::spawn(move || {
                let mut far = far.into_iter();
                let (r, w) = far.next().expect("one channel at least");
                serve_channels(r, w, u64::MAX, move || {
                    far.next().ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::NotFound, "no more connections")
                    })
                })
            });
            (ends, dest)
        }
    };
    let sent = migrate_channels(&mut source, config, ends, link, on_round);
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
