//! The jobs behind `memferry demo`, `memferry send` and `memferry listen`, as functions that
//! tests and benches call too.
//!
//! - [`prepare_source`]: maps and fills a guest, and starts a workload writing into it.
//! - [`migrate`]: runs the pre-copy source over a transport until the destination verified it.
//! - [`serve`]: accepts one migration on a destination, sized by the source's hello;
//!   [`serve_listener`]: the same on a TCP listener open to strangers (limits and timeouts);
//!   [`receive_listener`] returns with the guest what the destination saw ([`Received`]: pages
//!   per encoding, decoding CPU time, what a kept image offered).
//! - [`run_demo`]: both sides in one process, over TCP on 127.0.0.1 or an in-process loopback.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memferry::bitmap::AtomicDirtyBitmap;
use memferry::error::MigrationError;
use memferry::page::{Geometry, MemoryLayout, PageSize, Region};
use memferry::receive::{Destination, DestinationConfig, FirstCopyWins};

use crate::codec::CodecOptions;
use memferry::report::{MigrationReport, RoundReport};
use memferry::session::{SessionConfig, Source};
use memferry::strategy::{PreCopy, PreCopyConfig};
use memferry::time::ByteRate;
use memferry::wire::{self, AbortCode, Frame, WireError};
use rand_core::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::drive::{self, Clock, DriveError, FrameBuffer};
use crate::memory::{DestinationHost, GuestRegion, SourceHost};
use crate::output;
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

/// Why a job failed. Its `Display` escapes control characters ([`printable`]): the text may
/// quote the peer.
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
            // Both may quote the peer (an abort's message): never let its control characters
            // reach a terminal.
            JobError::Setup(why) => f.write_str(&printable(why)),
            JobError::Drive(e) => f.write_str(&printable(&e.to_string())),
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
    migrate_with(
        host,
        config,
        channels,
        link,
        &SourceOptions::default(),
        on_round,
    )
}

/// [`migrate_channels`] with a page codec and a choice of dirty log ([`SourceOptions`]).
pub fn migrate_with(
    host: &mut SourceHost,
    config: PreCopyConfig,
    channels: Vec<(BoxRead, BoxWrite)>,
    link: ByteRate,
    options: &SourceOptions,
    on_round: impl FnMut(&RoundReport),
) -> Result<MigrationReport, JobError> {
    options
        .codec
        .choice
        .check_channels(channels.len() as u16)
        .map_err(JobError::Setup)?;
    #[cfg(target_os = "linux")]
    if options.kernel_dirty_log && !host.has_dirty_log() {
        let memory = host.region().snapshot();
        let log = crate::kernel_dirty::KernelDirtyLog::new(
            memory.as_ptr(),
            memory.len(),
            host.region().geometry().page_size().bytes(),
        )
        .map_err(|e| JobError::Setup(format!("the kernel dirty log cannot run: {e}")))?;
        host.set_dirty_log(Box::new(log));
    }
    #[cfg(not(target_os = "linux"))]
    if options.kernel_dirty_log {
        return Err(JobError::Setup("the kernel dirty log needs Linux".into()));
    }
    let channels = rate_limited(channels, link);
    let session = SessionConfig {
        channels: channels.len() as u16,
        verify: config.verify,
        verify_before_start: config.verify_before_start,
        session_id: session_id(),
        ..SessionConfig::default()
    };
    let layout = MemoryLayout::single(host.region().geometry());
    let page_size = layout.page_size().bytes();
    // The adaptive codec weighs each encoder against the link, measured on this guest's pages.
    let rates = (options.codec.choice == crate::codec::CodecChoice::Adaptive).then(|| {
        let geometry = host.region().geometry();
        let sample = crate::codec::sample_memory(
            host.region().as_ref(),
            geometry.page_count(),
            geometry.page_size().bytes(),
            CALIBRATION_PAGES,
        );
        crate::codec::adaptive_rates(&sample, link, options.link_estimate, channels.len() as u32)
    });
    // One encoder per channel, each with its share of the delta cache and dedup index.
    let per_channel = options.codec.per_channel(channels.len() as u16);
    let encoders = drive::encoders_for(channels.len(), || {
        per_channel
            .encoder(session.session_id, page_size, rates.as_ref())
            .map_err(JobError::Setup)
    })?;
    let mut engine = Source::new(layout, session, PreCopy::new(config));
    let clock = Clock::new();
    // With several connections, pages are read and encoded on their writer threads (one per
    // channel); with one, the engine thread reads them while the writer writes the previous
    // buffer, which pipelines better (measured on 2 cores: ~1.2 vs ~1.1 GB/s).
    let memory: drive::SharedMemory = host.region().clone();
    let result = drive::run_source_encoding(
        &mut engine,
        host,
        memory,
        channels,
        encoders,
        &clock,
        on_round,
    );
    // The encoders' CPU time, measured here (the core has no clock), beside its counts.
    let cpu = result?;
    let mut report = engine.report().clone();
    report.encodings.merge_cpu(&cpu);
    Ok(report)
}

/// `channels` with `link` shared among them: each writes at most an equal part of it.
fn rate_limited(channels: Vec<(BoxRead, BoxWrite)>, link: ByteRate) -> Vec<(BoxRead, BoxWrite)> {
    let n = channels.len().max(1) as u64;
    let share = if link.is_unlimited() {
        link
    } else {
        ByteRate((link.0 / n).max(1))
    };
    channels
        .into_iter()
        .map(|(r, w)| (r, Box::new(RateLimited::new(w, share)) as BoxWrite))
        .collect()
}

/// Up to `count` pages spread over the guest, for calibrating encoders on real content.
/// Pages of the guest the adaptive codec's calibration measures.
const CALIBRATION_PAGES: u64 = 256;

/// The rate of `transport` on this host (128 MiB, ~50 ms on loopback TCP), for the adaptive
/// codec on an unlimited link; `None` if it cannot be measured.
fn probe_link(transport: TransportKind) -> Option<ByteRate> {
    let ends = match transport {
        TransportKind::Tcp => tcp::pair(),
        TransportKind::Loopback => Ok(loopback::pair()),
    };
    ends.and_then(|ends| crate::transport::probe_rate(ends, 128 << 20))
        .ok()
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

/// The largest guest a listener accepts unless told otherwise: 4 GiB. The hello that names the
/// guest's size comes from a peer nobody has authenticated, so this is how much memory a
/// stranger may make the listener commit; raise it (`listen --max-memory`) for bigger guests.
pub const DEFAULT_MAX_GUEST: u64 = 4 << 30;

/// How long a listener waits for each connection's opening frame, and for each further
/// connection a source announced, unless told otherwise: 10 s.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a listener accepts from a source it knows nothing about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenOptions {
    /// The largest guest accepted, in bytes. A guest larger than the memory this host has
    /// available is refused too.
    pub max_memory: u64,
    /// The longest the listener waits for a connection's opening frame (the hello, or a further
    /// connection's join) to arrive in full, counted from the connection's accept, and for each
    /// further connection the hello announced. The whole frame must arrive in that time, so a
    /// peer that sends nothing, half a frame, or a byte now and then cannot hold the listener.
    /// Once the handshake is over the engine's own peer timeout applies instead.
    pub idle_timeout: Duration,
    /// A shared page store ([`crate::store::PageStore`]) this host can read: its content is
    /// announced to the source (hash-first), which then sends pages found there as hashes and
    /// this side copies them from the store. Default: none.
    pub content: Option<std::path::PathBuf>,
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            max_memory: DEFAULT_MAX_GUEST,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            content: None,
        }
    }
}

/// How the source of a demo or `send` encodes its pages, and where its dirty log comes from.
#[derive(Clone, Debug, Default)]
pub struct SourceOptions {
    /// The page codec (`--codec`).
    pub codec: CodecOptions,
    /// Take dirty pages from the kernel (userfaultfd write-protect + `PAGEMAP_SCAN`) instead
    /// of the workload's own marks (`--dirty-log kernel`).
    pub kernel_dirty_log: bool,
    /// What an unlimited link really carries (bytes per second), measured
    /// ([`crate::transport::probe_rate`]): the adaptive codec weighs its encoders against it
    /// when no `--bandwidth` is set. `None`: unknown, every encoder is allowed.
    pub link_estimate: Option<ByteRate>,
}

/// Receives one migration from (`reader`, `writer`): reads the hello, maps a guest of the size
/// it names (refusing more than `max_memory` bytes), and runs the receiver to completion.
///
/// # Memory
/// The hello is checked in full (version, page size, layout, size against `max_memory` and
/// the memory available, channels and features) before anything is mapped, and every refusal
/// is answered with an abort frame. The guest is then mapped lazily
/// ([`DestinationHost::new_lazy`]): nothing is faulted in until the source's pages arrive;
/// the first page written in a 2 MiB chunk faults in that chunk and the 64 MiB after it
/// (one `MADV_POPULATE_WRITE` per chunk, not a fault per page), and all-zero pages never
/// written take nothing. This used to reserve every page up front (`MAP_POPULATE`) as soon as
/// the hello arrived, so one 80-byte hello from a peer that then sent nothing made the
/// listener fault in the whole guest (8 GiB: 8 GiB resident after 6.5 to 14 s); now it takes
/// nothing until pages come, and no more than it is sent plus 64 MiB ahead. Prefaulting only
/// after the handshake was the other way; it would still fault in `max_memory` for a peer
/// that stops right after it. The 1 GiB demo costs the same either way (total time within
/// measurement noise): the faulting moves from before round 1 into it, and the read-ahead
/// keeps it out of the downtime.
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
///
/// Nothing here limits how long a peer may take to send its opening frames: over TCP from
/// strangers use [`serve_listener`], which does.
pub fn serve_channels(
    reader: BoxRead,
    writer: BoxWrite,
    max_memory: u64,
    accept_more: impl FnMut() -> std::io::Result<(BoxRead, BoxWrite)>,
) -> Result<DestinationHost, JobError> {
    serve_with(reader, writer, max_memory, None, None, accept_more, || {
        Ok(())
    })
    .map(|received| received.host)
}

/// Accepts one migration on `listener`: waits for a source to connect (as long as it takes),
/// calls `on_connection` with its address, and receives the migration, within the limits of
/// `options`:
///
/// - the hello is checked (version, page size, layout, size against `options.max_memory` and
///   the memory available, channels and features) before any guest memory is mapped;
/// - the hello, and each further connection and its join, must arrive within
///   `options.idle_timeout` ([`ListenOptions::idle_timeout`]);
/// - every refusal, a timeout included, is answered with an abort frame where the connection
///   still takes one.
///
/// The handshake's read and write timeouts are removed before the migration runs: from then
/// on the engine's peer timeout (60 s by default) decides.
pub fn serve_listener(
    listener: &TcpListener,
    options: &ListenOptions,
    on_connection: impl FnOnce(SocketAddr),
) -> Result<DestinationHost, JobError> {
    receive_listener(listener, options, on_connection).map(|received| received.host)
}

/// [`serve_listener`], returning with the guest what this side saw of the migration
/// ([`Received`]: pages per encoding, decoding CPU time, what a kept image offered).
pub fn receive_listener(
    listener: &TcpListener,
    options: &ListenOptions,
    on_connection: impl FnOnce(SocketAddr),
) -> Result<Received, JobError> {
    if options.idle_timeout.is_zero() {
        return Err(JobError::Setup("the idle timeout must be positive".into()));
    }
    let (stream, peer) = listener
        .accept()
        .map_err(|e| JobError::Setup(format!("accept failed: {e}")))?;
    on_connection(peer);
    let handshake_over = Arc::new(AtomicBool::new(false));
    // Clones of every connection, to lift the handshake's timeouts once it is over.
    let streams = RefCell::new(Vec::new());
    let open = |stream: TcpStream| -> std::io::Result<(BoxRead, BoxWrite)> {
        let deadline = Instant::now() + options.idle_timeout;
        stream.set_nodelay(true)?;
        // So that an abort to a peer that reads nothing cannot block either.
        stream.set_write_timeout(Some(options.idle_timeout))?;
        let reader = HandshakeReader {
            stream: stream.try_clone()?,
            deadline,
            handshake_over: handshake_over.clone(),
        };
        streams.borrow_mut().push(stream.try_clone()?);
        Ok((Box::new(reader), Box::new(stream)))
    };
    let (reader, writer) = open(stream)
        .map_err(|e| JobError::Setup(format!("setting up the connection failed: {e}")))?;
    let accept_more = || {
        let (stream, _) = accept_until(listener, Instant::now() + options.idle_timeout)?;
        open(stream)
    };
    let handshake_done = || {
        handshake_over.store(true, Ordering::Release);
        for stream in streams.borrow().iter() {
            stream.set_read_timeout(None)?;
            stream.set_write_timeout(None)?;
        }
        Ok(())
    };
    serve_with(
        reader,
        writer,
        options.max_memory,
        Some(options.idle_timeout),
        options.content.as_deref(),
        accept_more,
        handshake_done,
    )
}

/// The reading half of a connection while the listener waits for its opening frame: each read
/// waits at most until `deadline`, then fails with [`ErrorKind::TimedOut`]. Once
/// `handshake_over` is set it reads as the plain stream does.
struct HandshakeReader {
    stream: TcpStream,
    deadline: Instant,
    handshake_over: Arc<AtomicBool>,
}

impl Read for HandshakeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.handshake_over.load(Ordering::Acquire) {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ErrorKind::TimedOut.into());
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        self.stream.read(buf)
    }
}

/// Accepts a connection on `listener`, giving up at `deadline` with [`ErrorKind::TimedOut`].
fn accept_until(
    listener: &TcpListener,
    deadline: Instant,
) -> std::io::Result<(TcpStream, SocketAddr)> {
    listener.set_nonblocking(true)?;
    let accepted = loop {
        match listener.accept() {
            Ok(c) => break Ok(c),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    break Err(ErrorKind::TimedOut.into());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    listener.set_nonblocking(false)?;
    let (stream, peer) = accepted?;
    stream.set_nonblocking(false)?;
    Ok((stream, peer))
}

pub use crate::drive::ReceiveStats;

/// A migration a destination received: the guest, and what it saw.
pub struct Received {
    /// The guest's memory and device state.
    pub host: DestinationHost,
    /// Pages per encoding, decoding CPU time, bytes and time.
    pub stats: ReceiveStats,
    /// When the content offered was a kept image (`memferry save`): what its keep rules kept
    /// and dropped (paper 003), as of the migration's end.
    pub reuse: Option<crate::image::KeepStats>,
}

/// The handshake and the migration, for any transport. `idle` is the idle timeout the reads
/// and `accept_more` enforce, if any (for the messages); `handshake_done` is called once every
/// connection has opened, before memory is mapped and the engine runs. `content`: a page-store
/// directory, or an image file offered with its keep rules (then [`Received::reuse`] says what
/// they kept and dropped).
fn serve_with(
    mut reader: BoxRead,
    mut writer: BoxWrite,
    max_memory: u64,
    idle: Option<Duration>,
    content: Option<&std::path::Path>,
    mut accept_more: impl FnMut() -> std::io::Result<(BoxRead, BoxWrite)>,
    handshake_done: impl FnOnce() -> std::io::Result<()>,
) -> Result<Received, JobError> {
    let config = DestinationConfig::default();
    let mut buffer = FrameBuffer::new();
    let offer = read_opening(&mut reader, &mut buffer, "hello", idle, |frame| {
        check_hello(frame, max_memory, config.max_channels)
    })
    .map_err(|refused| refused.answer(&mut writer))?;
    let hello_at = Instant::now();
    // The extra connections announce their channel in their first frame.
    let mut extra: Vec<Option<(BoxRead, FrameBuffer, BoxWrite)>> =
        (1..offer.channels).map(|_| None).collect();
    for opened in 1..offer.channels {
        let (mut r, mut w) = accept_more().map_err(|e| {
            let refused = match (e.kind(), idle) {
                (ErrorKind::TimedOut | ErrorKind::WouldBlock, Some(idle)) => Refused::new(
                    AbortCode::Timeout,
                    format!(
                        "the source announced {} connections but opened only {opened} within {idle:?} (--idle-timeout)",
                        offer.channels
                    ),
                ),
                _ => Refused::new(
                    AbortCode::Cancelled,
                    format!("accepting another connection of the migration failed: {e}"),
                ),
            };
            refused.answer(&mut writer)
        })?;
        let mut b = FrameBuffer::new();
        let joined = read_opening(&mut r, &mut b, "join", idle, check_join);
        let (channel, session) = match joined {
            Ok(j) => j,
            Err(refused) => {
                refused.tell(&mut w);
                return Err(refused.answer(&mut writer));
            }
        };
        let slot = (channel as usize)
            .checked_sub(1)
            .and_then(|i| extra.get_mut(i))
            .filter(|s| s.is_none() && session == offer.session_id);
        let Some(slot) = slot else {
            let refused = Refused::new(
                AbortCode::ProtocolViolation,
                format!("a connection joined as channel {channel} of session {session:#x}, which this migration does not expect"),
            );
            refused.tell(&mut w);
            return Err(refused.answer(&mut writer));
        };
        *slot = Some((r, b, w));
    }
    handshake_done().map_err(|e| {
        Refused::new(
            AbortCode::Cancelled,
            format!("lifting the handshake's timeouts failed: {e}"),
        )
        .answer(&mut writer)
    })?;
    let geometry = offer.layout.geometry();
    let mut host = DestinationHost::new_lazy(geometry).map_err(|e| {
        Refused::new(
            AbortCode::HostFailure,
            format!(
                "cannot map {} bytes for the guest: {e}",
                geometry.memory_bytes()
            ),
        )
        .answer(&mut writer)
    })?;
    // First copy wins: pre-copy is served the same, and a source that hands over to post-copy
    // (hybrid) finds a destination that never overwrites a page its running guest wrote.
    let page_size = offer.layout.page_size().bytes();
    let mut destination = Destination::with_policy(offer.layout, config, FirstCopyWins::default());
    // Every decoder timed (the core has no clock): registered before the hello, they stand in
    // for the engine's own.
    let times = drive::DecodeTimes::new();
    for decoder in drive::timed_destination_decoders(&times) {
        destination = destination.with_decoder(decoder);
    }
    let mut reuse = None;
    if let Some(path) = content {
        let (source, stats) = open_content(path, page_size)
            .map_err(|why| Refused::new(AbortCode::HostFailure, why).answer(&mut writer))?;
        reuse = stats;
        destination = destination.with_content(times.timed_content(source));
    }
    let mut channels = vec![(reader, buffer, writer)];
    channels.extend(extra.into_iter().flatten());
    let clock = Clock::new();
    drive::run_destination(&mut destination, &mut host, channels, &clock)?;
    host.verdict = destination.verdict();
    let stats = ReceiveStats::collect(destination, &times, hello_at);
    let reuse = reuse.map(|r| r.lock().map(|s| *s).unwrap_or_default());
    Ok(Received { host, stats, reuse })
}

/// What a kept image's keep rules kept and dropped, filled in as the migration reads it.
type ReuseHandle = Arc<std::sync::Mutex<crate::image::KeepStats>>;

/// The content a destination offers (hash-first) at `path`: a directory is a shared page store;
/// a file, an image this host kept (a VM that left it, returning), offered with the keep rules
/// its keep map recorded (paper 003), with the handle its figures are counted into.
fn open_content(
    path: &std::path::Path,
    page_size: usize,
) -> Result<
    (
        Box<dyn memferry::hashfirst::ContentSource>,
        Option<ReuseHandle>,
    ),
    String,
> {
    if path.is_dir() {
        let store = crate::store::PageStore::open(path, page_size)
            .map_err(|e| format!("cannot open the page store {}: {e}", path.display()))?;
        return Ok((Box::new(store), None));
    }
    let stats = ReuseHandle::default();
    let image = crate::image::KeptImage::open_with(
        path,
        crate::image::Limits::default(),
        None,
        stats.clone(),
    )
    .map_err(|e| format!("cannot open the image {}: {e}", path.display()))?;
    if image.image().page_size() != page_size {
        return Err(format!(
            "the image {} has pages of {} bytes; the source's guest has pages of {page_size}",
            path.display(),
            image.image().page_size()
        ));
    }
    Ok((Box::new(image), Some(stats)))
}

/// Checks that `path` is content a listener can offer (`--content`): a page-store directory,
/// or an image file that opens. For a clear error before a source connects; the page size is
/// checked when the source's hello says it.
pub fn check_content(path: &std::path::Path) -> Result<(), JobError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| JobError::Setup(format!("--content {}: {e}", path.display())))?;
    if meta.is_dir() {
        return Ok(());
    }
    crate::image::KeptImage::open(path, crate::image::Limits::default())
        .map(drop)
        .map_err(|e| {
            JobError::Setup(format!(
                "--content {}: neither a page-store directory nor an image that opens: {e}",
                path.display()
            ))
        })
}

/// What a hello offers, checked against this listener's limits.
struct Offer {
    layout: MemoryLayout,
    channels: u16,
    session_id: u64,
}

/// A connection's opening refused: the error to return, and the abort to send the peer (none
/// when the peer aborted itself).
struct Refused {
    error: JobError,
    abort: Option<AbortCode>,
}

impl Refused {
    fn new(code: AbortCode, why: String) -> Self {
        Refused {
            error: JobError::Setup(why),
            abort: Some(code),
        }
    }

    /// Sends the peer the abort, if there is one (failing quietly: the connection may be gone).
    fn tell(&self, writer: &mut BoxWrite) {
        if let Some(code) = self.abort {
            let why = self.error.to_string();
            let mut out = Vec::new();
            Frame::Abort {
                code,
                message: wire::abort_message(&why),
            }
            .emit(&mut out);
            let _ = writer.write_all(&out).and_then(|_| writer.flush());
        }
    }

    /// [`Refused::tell`], then the error.
    fn answer(self, writer: &mut BoxWrite) -> JobError {
        self.tell(writer);
        self.error
    }
}

/// Reads until the first frame of a connection (its `what`: hello or join) has arrived and
/// hands it to `take`. Its bytes, and whatever followed them, stay in `buffer` for the engine.
fn read_opening<T>(
    reader: &mut dyn Read,
    buffer: &mut FrameBuffer,
    what: &str,
    idle: Option<Duration>,
    take: impl FnOnce(Frame<'_>) -> Result<T, Refused>,
) -> Result<T, Refused> {
    loop {
        let needed = match Frame::parse(buffer.pending()) {
            Ok((Frame::Abort { code, message }, _)) => {
                return Err(Refused {
                    error: JobError::Drive(
                        MigrationError::PeerAborted {
                            code,
                            message: String::from_utf8_lossy(message).into_owned(),
                        }
                        .into(),
                    ),
                    abort: None,
                })
            }
            Ok((frame, _)) => return take(frame),
            Err(WireError::Incomplete { needed }) => needed,
            Err(e @ WireError::UnsupportedVersion(_)) => {
                return Err(Refused::new(
                    AbortCode::Incompatible,
                    format!("the source's {what} is refused: {e}"),
                ))
            }
            Err(e) => {
                return Err(Refused::new(
                    AbortCode::BadFrame,
                    format!("the source's {what} is not a valid memferry frame: {e}"),
                ))
            }
        };
        let got = buffer.pending().len();
        let so_far = || match got {
            0 => "it sent nothing".to_string(),
            _ => format!("it sent {got} of the {needed} bytes of its first frame"),
        };
        match buffer.fill_from(reader) {
            Ok(0) => {
                return Err(Refused::new(
                    AbortCode::Cancelled,
                    format!(
                        "the source closed the connection before its {what} arrived ({})",
                        so_far()
                    ),
                ))
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                let within =
                    idle.map_or(String::new(), |d| format!(" within {d:?} (--idle-timeout)"));
                return Err(Refused::new(
                    AbortCode::Timeout,
                    format!("no {what} from the source{within}: {}", so_far()),
                ));
            }
            Err(e) => {
                return Err(Refused::new(
                    AbortCode::Cancelled,
                    format!("reading the source's {what} failed: {e}"),
                ))
            }
        }
    }
}

/// Checks a hello against what this listener takes, before any memory is mapped for it.
fn check_hello(frame: Frame<'_>, max_memory: u64, max_channels: u16) -> Result<Offer, Refused> {
    let incompatible = |why: String| Refused::new(AbortCode::Incompatible, why);
    let Frame::Hello(hello) = frame else {
        return Err(Refused::new(
            AbortCode::ProtocolViolation,
            format!(
                "the source opened with a {} frame instead of a hello",
                frame
                    .kind()
                    .map_or("(skippable)".into(), |k| format!("{k:?}"))
            ),
        ));
    };
    // Frame::parse checked the magic, the version, the page shift and the table's shape.
    let pages = hello.page_count();
    if pages == 0 {
        return Err(incompatible(
            "the source offers a guest of 0 pages: there is nothing to migrate".into(),
        ));
    }
    let regions: Vec<Region> = hello.regions.iter().collect();
    let layout = PageSize::new(1u64 << hello.page_shift)
        .and_then(|size| MemoryLayout::new(size, regions))
        .map_err(|e| incompatible(format!("the source's memory layout is not valid: {e}")))?;
    if layout.regions().len() != 1 {
        return Err(incompatible(format!(
            "the source offers a guest of {} regions; this listener takes one region",
            layout.regions().len()
        )));
    }
    let geometry = layout.geometry();
    let bytes = geometry.memory_bytes();
    let mut over = Vec::new();
    if bytes > max_memory {
        over.push(format!(
            "this listener's limit of {} (--max-memory)",
            output::human_bytes(max_memory)
        ));
    }
    // Page hashes and bookkeeping: 20 bytes a page.
    let needed = bytes.saturating_add(pages.saturating_mul(20));
    if let Some(available) = available_memory().filter(|&a| needed > a) {
        over.push(format!(
            "the {} this host has available (it needs {} with its page hashes)",
            output::human_bytes(available),
            output::human_bytes(needed)
        ));
    }
    if !over.is_empty() {
        return Err(incompatible(format!(
            "the source offers a guest of {} ({pages} pages of {} bytes), more than {}",
            output::human_bytes(bytes),
            geometry.page_size().bytes(),
            over.join(" and ")
        )));
    }
    if hello.channels > max_channels {
        return Err(incompatible(format!(
            "the source asks for {} connections; this listener takes at most {max_channels}",
            hello.channels
        )));
    }
    if hello.channels > 1 && hello.features & wire::FEATURE_CHANNELS == 0 {
        return Err(incompatible(format!(
            "the source asks for {} connections but does not offer the channels feature",
            hello.channels
        )));
    }
    Ok(Offer {
        layout,
        channels: hello.channels,
        session_id: hello.session_id,
    })
}

/// Checks a further connection's opening frame: a join, giving (channel, session id).
fn check_join(frame: Frame<'_>) -> Result<(u16, u64), Refused> {
    match frame {
        Frame::Join {
            channel,
            session_id,
            ..
        } => Ok((channel, session_id)),
        other => Err(Refused::new(
            AbortCode::ProtocolViolation,
            format!(
                "a further connection opened with a {} frame instead of a join",
                other
                    .kind()
                    .map_or("(skippable)".into(), |k| format!("{k:?}"))
            ),
        )),
    }
}

/// Memory the kernel says it can give without swapping (`MemAvailable`), where it says.
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `text` with its control characters escaped as Rust escapes them (`\n`, `\u{1b}`), and the
/// bidirectional-text controls too, so that words from a peer printed on a terminal cannot
/// move the cursor, clear the screen, or forge a line of output. Printable text, backslashes
/// included, is left as it is, so escaping twice changes nothing more.
pub fn printable(text: &str) -> Cow<'_, str> {
    fn escape(c: char) -> bool {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if !text.chars().any(escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
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
    /// When the destination was offered a kept image (`content`): what its keep rules kept
    /// and dropped (paper 003).
    pub reuse: Option<crate::image::KeepStats>,
    /// What the destination saw: pages per encoding and its decoders' CPU time.
    pub received: ReceiveStats,
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
    run_demo_with(
        guest,
        seed,
        config,
        link,
        transport,
        channels,
        &SourceOptions::default(),
        None,
        on_round,
    )
}

/// [`run_demo_channels`] with a page codec and dirty-log choice for the source, and a shared
/// page store (`content`) the destination announces (hash-first).
#[allow(clippy::too_many_arguments)]
pub fn run_demo_with(
    guest: &GuestOptions,
    seed: u64,
    config: PreCopyConfig,
    link: ByteRate,
    transport: TransportKind,
    channels: u16,
    options: &SourceOptions,
    content: Option<std::path::PathBuf>,
    on_round: impl FnMut(&RoundReport),
) -> Result<DemoOutcome, JobError> {
    let channels = channels.max(1);
    options
        .codec
        .choice
        .check_channels(channels)
        .map_err(JobError::Setup)?;
    let mut source = prepare_source(guest, seed)?;
    // An unlimited link is as fast as the transport: measure it (128 MiB, ~50 ms on loopback
    // TCP) so the adaptive codec does not compress slower than it carries.
    let mut probed;
    let options = if link.is_unlimited()
        && options.link_estimate.is_none()
        && options.codec.choice == crate::codec::CodecChoice::Adaptive
    {
        probed = options.clone();
        probed.link_estimate = probe_link(transport);
        &probed
    } else {
        options
    };
    let (ends, dest_thread) = match transport {
        TransportKind::Tcp => {
            let listener = TcpListener::bind("127.0.0.1:0")
                .map_err(|e| JobError::Setup(format!("cannot listen on 127.0.0.1: {e}")))?;
            let addr = listener
                .local_addr()
                .map_err(|e| JobError::Setup(e.to_string()))?;
            let content = content.clone();
            let dest = std::thread::spawn(move || {
                let (r, w, _) = tcp::accept(&listener)
                    .map_err(|e| JobError::Setup(format!("accept failed: {e}")))?;
                serve_with(
                    r,
                    w,
                    u64::MAX,
                    None,
                    content.as_deref(),
                    || tcp::accept(&listener).map(|(r, w, _)| (r, w)),
                    || Ok(()),
                )
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
                serve_with(
                    r,
                    w,
                    u64::MAX,
                    None,
                    content.as_deref(),
                    move || {
                        far.next().ok_or_else(|| {
                            std::io::Error::new(std::io::ErrorKind::NotFound, "no more connections")
                        })
                    },
                    || Ok(()),
                )
            });
            (ends, dest)
        }
    };
    let sent = migrate_with(&mut source, config, ends, link, options, on_round);
    let received = dest_thread
        .join()
        .map_err(|_| JobError::Setup("the destination thread panicked".into()))?;
    // The source's failure explains the destination's, so report it first.
    let report = sent?;
    let received = received?;
    Ok(DemoOutcome {
        report,
        source,
        destination: received.host,
        reuse: received.reuse,
        received: received.stats,
    })
}

/// The KVM guest's jobs: `memferry demo` with a KVM guest, `send --kvm`, `listen --kvm`.
#[cfg(target_os = "linux")]
pub mod kvm {
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

    use memferry::report::{MigrationReport, RoundReport};
    use memferry::strategy::PreCopyConfig;
    use memferry::time::ByteRate;

    use super::JobError;
    use crate::kvm::dirty::{DirtyLogMode, DirtySample};
    use crate::kvm::guest::{self, GuestConfig};
    use crate::kvm::run::{self, KvmRunError, Received};
    use crate::kvm::{KvmSource, SourceMachine};
    use crate::transport::{tcp, BoxRead, BoxWrite};

    impl From<KvmRunError> for JobError {
        fn from(e: KvmRunError) -> Self {
            match e {
                KvmRunError::Drive(d) => JobError::Drive(d),
                KvmRunError::Kvm(k) => JobError::Setup(k.to_string()),
                KvmRunError::Codec(c) => JobError::Setup(c),
            }
        }
    }

    fn setup(e: impl std::fmt::Display) -> JobError {
        JobError::Setup(e.to_string())
    }

    /// A running KVM guest, ready to migrate.
    pub struct KvmGuest {
        /// Its VM.
        pub machine: SourceMachine,
        /// The source host (dirty logging on).
        pub source: KvmSource,
    }

    /// Creates the VM of `config`, starts the guest, waits until it has done `warmup_writes`
    /// writes (at most a second), and starts dirty logging in `mode`.
    pub fn start_guest(
        config: &GuestConfig,
        mode: DirtyLogMode,
        warmup_writes: u64,
    ) -> Result<KvmGuest, JobError> {
        start_guest_from(None, config, mode, warmup_writes)
    }

    /// [`start_guest`], booting the multiboot `kernel` when given (in a VM of `config.memory`
    /// bytes: [`SourceMachine::boot_kernel`]); the warm-up reads the generated guest's progress,
    /// which another kernel does not report (it then lasts the second).
    pub fn start_guest_from(
        kernel: Option<&[u8]>,
        config: &GuestConfig,
        mode: DirtyLogMode,
        warmup_writes: u64,
    ) -> Result<KvmGuest, JobError> {
        let (machine, mut vcpus) = match kernel {
            Some(image) => SourceMachine::boot_kernel(image, config, mode),
            None => SourceMachine::create(config, mode),
        }
        .map_err(setup)?;
        vcpus.start().map_err(setup)?;
        let t0 = Instant::now();
        while machine.status().map_or(0, |s| s.progress) < warmup_writes {
            if let Some(end) = vcpus.threads()[0].end() {
                return Err(setup(format!(
                    "the guest ended during its warm-up: {end:?}"
                )));
            }
            if t0.elapsed() > Duration::from_secs(1) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let memory = machine.memory().map_err(setup)?;
        let source = KvmSource::new(machine.vm.fd().clone(), memory, vcpus, mode).map_err(setup)?;
        Ok(KvmGuest { machine, source })
    }

    /// Migrates `guest` over `channels` at most `link` bytes per second (shared).
    pub fn send(
        guest: &mut KvmGuest,
        config: PreCopyConfig,
        channels: Vec<(BoxRead, BoxWrite)>,
        link: ByteRate,
        codec: &crate::codec::CodecOptions,
        on_round: impl FnMut(&RoundReport),
    ) -> Result<MigrationReport, JobError> {
        send_over(guest, config, channels, link, None, codec, on_round)
    }

    /// [`send`] over this host's own transport, unlimited, whose rate `probed` says: the
    /// adaptive codec weighs its encoders against it and the CPUs it shares with them
    /// ([`crate::codec::adaptive_rates`]).
    pub fn send_over(
        guest: &mut KvmGuest,
        config: PreCopyConfig,
        channels: Vec<(BoxRead, BoxWrite)>,
        link: ByteRate,
        probed: Option<ByteRate>,
        codec: &crate::codec::CodecOptions,
        on_round: impl FnMut(&RoundReport),
    ) -> Result<MigrationReport, JobError> {
        codec
            .choice
            .check_channels(channels.len() as u16)
            .map_err(JobError::Setup)?;
        let channels = super::rate_limited(channels, link);
        let layout = guest.source.layout().clone();
        let page_size = layout.page_size().bytes();
        // The adaptive codec weighs each encoder against the link, measured on this guest's
        // pages.
        let rates = (codec.choice == crate::codec::CodecChoice::Adaptive).then(|| {
            let sample = crate::codec::sample_memory(
                guest.source.shared_memory().as_ref(),
                layout.page_count(),
                page_size,
                super::CALIBRATION_PAGES,
            );
            crate::codec::adaptive_rates(&sample, link, probed, channels.len() as u32)
        });
        let per_channel = codec.per_channel(channels.len() as u16);
        let encoder_for = |session: u64| per_channel.encoder(session, page_size, rates.as_ref());
        Ok(run::migrate_source_with(
            &mut guest.source,
            config,
            channels,
            &encoder_for,
            on_round,
        )?)
    }

    /// [`receive`] with an idle timeout: a source that does not connect within `idle`, a
    /// further connection it announced that does not come within `idle`, or a source silent
    /// for `idle` (no byte read on a connection for that long) ends the reception with an
    /// error that says so. The guest must also fit the memory this host has available
    /// ([`run::check_guest_memory`]), checked before anything is mapped.
    pub fn receive_within(
        listener: &TcpListener,
        max_memory: u64,
        idle: Duration,
        on_connection: impl FnOnce(std::net::SocketAddr),
    ) -> Result<Received, JobError> {
        if idle.is_zero() {
            return Err(setup("the idle timeout must be positive"));
        }
        let open = |stream: std::net::TcpStream| -> std::io::Result<(BoxRead, BoxWrite)> {
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(idle))?;
            stream.set_write_timeout(Some(idle))?;
            Ok((Box::new(stream.try_clone()?), Box::new(stream)))
        };
        let (stream, peer) = super::accept_until(listener, Instant::now() + idle).map_err(|e| {
            if e.kind() == std::io::ErrorKind::TimedOut {
                setup(format!(
                    "no source connected within the idle timeout ({idle:?})"
                ))
            } else {
                setup(format!("accept failed: {e}"))
            }
        })?;
        on_connection(peer);
        let (r, w) =
            open(stream).map_err(|e| setup(format!("setting up the connection failed: {e}")))?;
        let received = run::receive(r, w, max_memory, || {
            let (stream, _) = super::accept_until(listener, Instant::now() + idle)?;
            open(stream)
        });
        let timed_out = |e: &std::io::Error| {
            matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            )
        };
        received.map_err(|e| match e {
            KvmRunError::Drive(
                ref d @ (crate::drive::DriveError::Transport(ref io)
                | crate::drive::DriveError::Migration {
                    transport: Some(ref io),
                    ..
                }),
            ) if timed_out(io) => setup(format!(
                "the source went silent for the idle timeout ({idle:?}): {d}"
            )),
            other => other.into(),
        })
    }

    /// Accepts one KVM migration on `listener`: a VM with the source's layout (at most
    /// `max_memory` bytes), running the guest once the migration is over.
    pub fn receive(
        listener: &TcpListener,
        max_memory: u64,
        on_connection: impl FnOnce(std::net::SocketAddr),
    ) -> Result<Received, JobError> {
        let (r, w, peer) =
            tcp::accept(listener).map_err(|e| setup(format!("accept failed: {e}")))?;
        on_connection(peer);
        Ok(run::receive(r, w, max_memory, || {
            tcp::accept(listener).map(|(r, w, _)| (r, w))
        })?)
    }

    /// What a KVM demo showed.
    pub struct KvmDemoOutcome {
        /// The source's report.
        pub report: MigrationReport,
        /// The dirty log used.
        pub mode: DirtyLogMode,
        /// How long the pause took to park the source's vCPU.
        pub vcpu_pause: Duration,
        /// From the source's pause to the destination's vCPU running.
        pub pause_to_running: Option<Duration>,
        /// The dirty log's cost, per sync.
        pub dirty_syncs: Vec<DirtySample>,
        /// Zero pages the destination did not write (fresh memory).
        pub zero_pages_skipped: u64,
        /// The guest's final hash on the destination and the reference, when it was run to
        /// its end.
        pub final_hash: Option<(u64, u64)>,
    }

    /// Runs `config`'s guest in a VM (booted from the multiboot `kernel` when given: the
    /// generated guest of the same `config`, [`crate::kvm::multiboot::guest_elf`], for the hash
    /// to compare) and migrates it to a second VM in this process over TCP on 127.0.0.1. A
    /// finite guest (`iterations > 0`) then runs to its end on the destination and its final
    /// hash is compared with the reference.
    #[allow(clippy::too_many_arguments)]
    pub fn run_demo(
        kernel: Option<&[u8]>,
        config: &GuestConfig,
        mode: DirtyLogMode,
        engine: PreCopyConfig,
        link: ByteRate,
        channels: u16,
        transport: super::TransportKind,
        codec: &crate::codec::CodecOptions,
        on_round: impl FnMut(&RoundReport),
    ) -> Result<KvmDemoOutcome, JobError> {
        // An unlimited link is this host's transport: measured for the adaptive codec first.
        let probed = (link.is_unlimited() && codec.choice == crate::codec::CodecChoice::Adaptive)
            .then(|| super::probe_link(transport))
            .flatten();
        let mut guest = start_guest_from(kernel, config, mode, 1 << 16)?;
        let finite = config.iterations > 0;
        let channels = channels.max(1);
        let mut ends = Vec::new();
        // The destination's connections: a listener, or the far ends of loopback pairs.
        let (listener, mut far) = match transport {
            super::TransportKind::Tcp => {
                let l = TcpListener::bind("127.0.0.1:0")
                    .map_err(|e| setup(format!("cannot listen on 127.0.0.1: {e}")))?;
                (Some(l), Vec::new())
            }
            super::TransportKind::Loopback => {
                let mut far = Vec::new();
                for _ in 0..channels {
                    let (near, f) = crate::transport::loopback::pair();
                    ends.push(near);
                    far.push(f);
                }
                far.reverse();
                (None, far)
            }
        };
        let addr = listener
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()
            .map_err(setup)?;
        let destination = std::thread::spawn(move || -> Result<_, JobError> {
            let received = match &listener {
                Some(l) => receive(l, u64::MAX, |_| {})?,
                None => {
                    let no_more =
                        || std::io::Error::new(std::io::ErrorKind::NotFound, "no more connections");
                    let (r, w) = far.pop().ok_or_else(|| setup("no connection"))?;
                    run::receive(r, w, u64::MAX, || far.pop().ok_or_else(no_more))?
                }
            };
            let running = received.host.vcpus().threads()[0].running_since();
            let skipped = received.host.zero_pages_skipped();
            let hash = if finite {
                run::wait_finished(received.host.vcpus(), Duration::from_secs(3600))
                    .map_err(setup)?;
                received.machine.status().map(|s| s.hash)
            } else {
                None
            };
            Ok((running, skipped, hash))
        });
        if let Some(addr) = addr {
            for _ in 0..channels {
                ends.push(
                    tcp::connect(addr)
                        .map_err(|e| setup(format!("cannot connect to {addr}: {e}")))?,
                );
            }
        }
        let sent = send_over(&mut guest, engine, ends, link, probed, codec, on_round);
        let received = destination
            .join()
            .map_err(|_| setup("the destination thread panicked"))?;
        let report = sent?;
        let (running, zero_pages_skipped, hash) = received?;
        let expected = match hash {
            Some(h) => Some((h, guest::expected_hash(config).map_err(setup)?)),
            None => None,
        };
        Ok(KvmDemoOutcome {
            report,
            mode,
            vcpu_pause: guest.source.pause_times().iter().sum(),
            pause_to_running: match (guest.source.paused_at(), running) {
                (Some(p), Some(r)) => Some(r.saturating_duration_since(p)),
                _ => None,
            },
            dirty_syncs: guest.source.dirty_samples().to_vec(),
            zero_pages_skipped,
            final_hash: expected,
        })
    }
}
