//! Real connections with a real clock, for the core's one driver loop ([`memferry::drive`]):
//! this module implements its [`Link`] with threads and moves bytes; the loop and the engine
//! decide everything.
//!
//! - [`run_source`]: one reader thread and one writer thread per channel. Each channel has two
//!   1 MiB buffers; the engine fills a free one (never more than its length) and a writer
//!   writes it, so output is bounded by the buffers the writers have handed back. What counts
//!   as delivered: over TCP, the bytes the peer has acknowledged (the kernel's `TIOCOUTQ`, asked
//!   after each write and every millisecond while bytes wait); over other transports, a
//!   finished write.
//! - [`run_destination`]: the same threads; the engine applies frames in arrival order per
//!   channel, and a bounded queue holds a source faster than the destination back through
//!   TCP. Replies go out on channel 0.
//! - [`read_hello`] / [`read_join`]: read the opening frame of a connection, so a listener can
//!   size the guest and order the channels before it builds the destination.
//! - [`EncodeTimes`]: the CPU time of the source's encoders per encoding they produced, which
//!   [`run_source_encoding`] measures (the core has no clock) for the report's
//!   `encodings.*.cpu_nanos`; [`DecodeTimes`]: the same for a destination's decoders
//!   ([`timed_destination_decoders`]) and the known content it reads.
//!
//! Errors keep their first cause: an engine error is returned as it is; a transport failure
//! cancels the engine (a paused source guest resumes before the commit point) and is returned
//! with the engine's view of it.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver as EventQueue, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use memferry::codec::{PageDecoder, PageEncoder};
use memferry::drive::{self, DriveFailure, Link, LinkEvent};
use memferry::error::{HostError, MigrationError};
use memferry::hashfirst::ContentSource;
use memferry::memory::{DestinationGuest, PageWrite, SourceHost};
use memferry::page::{MemoryLayout, PageSize, Region};
use memferry::plan::{PagePlan, PlanOutcome, SharedPageRead};
use memferry::receive::{Destination, PagePolicy};
use memferry::report::{EncodingUse, RoundReport};
use memferry::session::Source;
use memferry::strategy::Strategy;
use memferry::time::Nanos;
use memferry::wire::{self, Frame, WireError};

use crate::transport::{BoxRead, BoxWrite, UnackedProbe};

/// A monotonic clock in the core's units, from an origin.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    origin: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock {
            origin: Instant::now(),
        }
    }
}

impl Clock {
    /// A clock whose zero is now.
    pub fn new() -> Self {
        Self::default()
    }

    /// Nanoseconds since the origin (at least 1, so that 0 can mean "not yet").
    pub fn now(&self) -> Nanos {
        Nanos(self.origin.elapsed().as_nanos() as u64 + 1)
    }

    /// Sleeps until `t` (no-op if it has passed).
    pub fn sleep_until(&self, t: Nanos) {
        let now = self.now();
        if t > now {
            std::thread::sleep(Duration::from_nanos((t - now).0));
        }
    }

    fn until(&self, t: Nanos) -> Duration {
        Duration::from_nanos(t.saturating_sub(self.now()).0)
    }
}

/// Why a driven migration failed.
#[derive(Debug)]
pub enum DriveError {
    /// The migration protocol failed (bad frame, abort, digest mismatch, host failure,
    /// timeout), or the engine was cancelled because the transport failed (then `transport`
    /// holds the I/O error that caused it).
    Migration {
        /// The engine's error.
        error: MigrationError,
        /// The transport failure behind it, if any.
        transport: Option<io::Error>,
    },
    /// The transport failed before the engine was involved (reading the hello).
    Transport(io::Error),
}

impl DriveError {
    /// The engine's error, if the engine was involved.
    pub fn migration(&self) -> Option<&MigrationError> {
        match self {
            DriveError::Migration { error, .. } => Some(error),
            DriveError::Transport(_) => None,
        }
    }
}

impl fmt::Display for DriveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriveError::Migration {
                error,
                transport: None,
            } => write!(f, "{error}"),
            DriveError::Migration {
                error,
                transport: Some(io),
            } => write!(f, "{error} (transport: {io})"),
            DriveError::Transport(e) => write!(f, "transport failed: {e}"),
        }
    }
}

impl std::error::Error for DriveError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DriveError::Migration { error, .. } => Some(error),
            DriveError::Transport(e) => Some(e),
        }
    }
}

impl From<MigrationError> for DriveError {
    fn from(error: MigrationError) -> Self {
        DriveError::Migration {
            error,
            transport: None,
        }
    }
}

/// The bytes each channel's writer takes per write: large writes carry loopback TCP at full
/// speed (4.6 GB/s with 1 MiB writes here, 1.8 GB/s with 128 KiB).
pub const WRITE_BYTES: usize = 1 << 20;
/// Buffers per channel in flight between the engine and its writer.
const BUFFERS_PER_CHANNEL: usize = 2;
/// The longest the engine thread sleeps without looking at its timers.
const MAX_WAIT: Duration = Duration::from_millis(250);

enum Event {
    Bytes(u16, Vec<u8>),
    Closed(u16, Option<io::Error>),
    Written(u16, Vec<u8>, usize),
    WriteFailed(u16, io::Error),
    Encoded(PlanOutcome),
    EncodeFailed(u16, Vec<u8>, HostError),
}

/// What a writer thread is given: bytes to write, or pages to read and encode, then write.
enum Job {
    Bytes(Vec<u8>, usize),
    Plan(Vec<u8>, PagePlan),
}

/// Guest memory the writer threads read pages from, each on its own.
pub type SharedMemory = Arc<dyn SharedPageRead + Send + Sync>;

/// Where reader threads put what they read: unbounded on the source (replies are small), bounded
/// on the destination, so a source faster than the destination applies pages is held back by
/// TCP instead of filling this process's memory.
trait EventSink: Send + 'static {
    fn send(&self, event: Event) -> Result<(), ()>;
}

impl EventSink for mpsc::Sender<Event> {
    fn send(&self, event: Event) -> Result<(), ()> {
        mpsc::Sender::send(self, event).map_err(|_| ())
    }
}

impl EventSink for SyncSender<Event> {
    fn send(&self, event: Event) -> Result<(), ()> {
        SyncSender::send(self, event).map_err(|_| ())
    }
}

/// Chunks read but not yet applied, per destination channel.
const DESTINATION_QUEUE_PER_CHANNEL: usize = 4;

/// Bytes a reader thread reads at most at once.
const READ_BYTES: usize = 1 << 20;

/// Starts a reader thread; returns where to hand its buffers back once consumed (the same
/// few buffers go round, so reading faults in no fresh memory).
fn spawn_reader(
    channel: u16,
    mut reader: BoxRead,
    events: impl EventSink,
) -> mpsc::Sender<Vec<u8>> {
    let (recycle, spare) = mpsc::channel::<Vec<u8>>();
    std::thread::Builder::new()
        .name(format!("memferry-read-{channel}"))
        .spawn(move || loop {
            let mut buf = spare.try_recv().unwrap_or_default();
            buf.resize(READ_BYTES, 0);
            match reader.read(&mut buf) {
                Ok(0) => {
                    let _ = events.send(Event::Closed(channel, None));
                    return;
                }
                Ok(n) => {
                    buf.truncate(n);
                    if events.send(Event::Bytes(channel, buf)).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = events.send(Event::Closed(channel, Some(e)));
                    return;
                }
            }
        })
        .expect("spawning a reader thread");
    recycle
}

fn spawn_writer(
    channel: u16,
    mut writer: BoxWrite,
    events: impl EventSink,
    memory: Option<SharedMemory>,
    mut encoder: Option<Box<dyn PageEncoder>>,
) -> (SyncSender<Job>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::sync_channel::<Job>(BUFFERS_PER_CHANNEL);
    let thread = std::thread::Builder::new()
        .name(format!("memferry-write-{channel}"))
        .spawn(move || {
            let mut scratch = Vec::new();
            while let Ok(job) = rx.recv() {
                let (buf, n) = match job {
                    Job::Bytes(buf, n) => (buf, n),
                    Job::Plan(mut buf, plan) => {
                        let Some(memory) = &memory else {
                            continue;
                        };
                        // Pages are read and encoded here, on this channel's thread.
                        let encoder = encoder.as_deref_mut().map(|e| e as &mut dyn PageEncoder);
                        match plan.encode(&**memory, encoder, &mut scratch, &mut buf) {
                            Ok(outcome) => {
                                let _ = events.send(Event::Encoded(outcome));
                                (buf, outcome.bytes)
                            }
                            Err(e) => {
                                if events.send(Event::EncodeFailed(channel, buf, e)).is_err() {
                                    return;
                                }
                                continue;
                            }
                        }
                    }
                };
                match writer.write_all(&buf[..n]).and_then(|_| writer.flush()) {
                    Ok(()) => {
                        if events.send(Event::Written(channel, buf, n)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = events.send(Event::WriteFailed(channel, e));
                        return;
                    }
                }
            }
        })
        .expect("spawning a writer thread");
    (tx, thread)
}

/// The [`Link`] of real connections: a reader and a writer thread per channel, a real clock.
///
/// Each channel has [`BUFFERS_PER_CHANNEL`] buffers of [`WRITE_BYTES`]; a buffer is free again
/// when its writer has written it, and that write is what [`LinkEvent::Delivered`] reports.
struct ThreadLink {
    clock: Clock,
    events: EventQueue<Event>,
    writers: Vec<SyncSender<Job>>,
    /// The writer threads, waited for when the link is dropped if they encode pages (their
    /// timed encoders publish their last counts as the threads end).
    writer_threads: Vec<std::thread::JoinHandle<()>>,
    /// Where each channel's reader takes its buffers back.
    recyclers: Vec<mpsc::Sender<Vec<u8>>>,
    /// The writer threads read and encode pages themselves.
    encodes: bool,
    free: Vec<Vec<Vec<u8>>>,
    /// Buffers handed to writers and not yet back.
    in_flight: usize,
    /// Bytes read before the link started (what followed a hello in its read), delivered first.
    early: VecDeque<(u16, Vec<u8>)>,
    /// Every thread has ended: nothing more can happen.
    dead: bool,
    /// Per channel, for TCP: what the peer has acknowledged, which is what counts as delivered.
    acks: Vec<Option<Acks>>,
    /// Per channel: its reader has reported the connection closed.
    reader_closed: Vec<bool>,
    /// Events taken from the queue early (while a failed write waited for its reader), in order.
    deferred: VecDeque<LinkEvent<io::Error>>,
}

/// How long a dropped link waits for writer threads that encode pages to end (they do at once
/// when idle; one still writing to a peer that went away may not).
const WRITER_EXIT_WAIT: Duration = Duration::from_millis(500);

impl Drop for ThreadLink {
    fn drop(&mut self) {
        if !self.encodes {
            return;
        }
        // Closing the job queues ends the writer threads, which drop their encoders: timed
        // ones publish their last counts then ([`EncodeTimes`]), so wait for that, briefly.
        self.writers.clear();
        let deadline = Instant::now() + WRITER_EXIT_WAIT;
        while self.writer_threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            // No writer may block on a full event queue meanwhile.
            while self.events.try_recv().is_ok() {}
            std::thread::sleep(Duration::from_micros(200));
        }
        for thread in std::mem::take(&mut self.writer_threads) {
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

/// How long a failed write waits for its connection's reader: a peer that hangs up after it
/// refused something has sent its abort first, and the reader may still be handing it over.
/// The abort explains more than the broken pipe (an error keeps its first cause).
const WRITE_FAILURE_GRACE: Duration = Duration::from_millis(200);

/// Written and acknowledged bytes of one TCP connection.
struct Acks {
    probe: UnackedProbe,
    written: u64,
    reported: u64,
}

impl Acks {
    /// Bytes acknowledged since the last call.
    fn newly_acknowledged(&mut self) -> u64 {
        let unacked = self.probe.unacked().unwrap_or(0).min(self.written);
        let acked = self.written - unacked;
        let new = acked.saturating_sub(self.reported);
        self.reported = self.reported.max(acked);
        new
    }

    fn waiting(&self) -> bool {
        self.reported < self.written
    }
}

/// How often the link asks the kernel about acknowledgements while bytes wait for them.
const ACK_POLL: Duration = Duration::from_millis(1);

impl ThreadLink {
    fn new(
        clock: Clock,
        channels: Vec<(BoxRead, BoxWrite)>,
        early: VecDeque<(u16, Vec<u8>)>,
        queue_bound: Option<usize>,
        memory: Option<SharedMemory>,
        encoders: Vec<Box<dyn PageEncoder>>,
    ) -> Self {
        let encodes = memory.is_some();
        let mut encoders = encoders.into_iter();
        let (events_tx, events_sync, events) = match queue_bound {
            None => {
                let (tx, rx) = mpsc::channel();
                (Some(tx), None, rx)
            }
            Some(bound) => {
                let (tx, rx) = mpsc::sync_channel(bound);
                (None, Some(tx), rx)
            }
        };
        let mut writers = Vec::new();
        let mut writer_threads = Vec::new();
        let mut recyclers = Vec::new();
        let mut free = Vec::new();
        let mut acks = Vec::new();
        for (ch, (reader, writer)) in channels.into_iter().enumerate() {
            let ch = ch as u16;
            acks.push(UnackedProbe::for_writer(&*writer).map(|probe| Acks {
                probe,
                written: 0,
                reported: 0,
            }));
            match (&events_tx, &events_sync) {
                (Some(tx), _) => {
                    recyclers.push(spawn_reader(ch, reader, tx.clone()));
                    let (w, thread) =
                        spawn_writer(ch, writer, tx.clone(), memory.clone(), encoders.next());
                    writers.push(w);
                    writer_threads.push(thread);
                }
                (_, Some(tx)) => {
                    recyclers.push(spawn_reader(ch, reader, tx.clone()));
                    let (w, thread) =
                        spawn_writer(ch, writer, tx.clone(), memory.clone(), encoders.next());
                    writers.push(w);
                    writer_threads.push(thread);
                }
                _ => unreachable!("one of the two queues exists"),
            }
            free.push(
                (0..BUFFERS_PER_CHANNEL)
                    .map(|_| vec![0u8; WRITE_BYTES])
                    .collect(),
            );
        }
        ThreadLink {
            clock,
            events,
            writers,
            writer_threads,
            recyclers,
            encodes,
            free,
            in_flight: 0,
            early,
            dead: false,
            reader_closed: vec![false; acks.len()],
            acks,
            deferred: VecDeque::new(),
        }
    }

    /// A write failed on `channel`: first hand over what its reader still delivers (the peer's
    /// abort, then its close), for at most [`WRITE_FAILURE_GRACE`]; the failure comes last.
    fn write_failed(&mut self, channel: u16, error: io::Error) -> LinkEvent<io::Error> {
        self.in_flight -= 1;
        let closed = LinkEvent::Closed {
            channel,
            error: Some(error),
        };
        if self
            .reader_closed
            .get(channel as usize)
            .copied()
            .unwrap_or(true)
        {
            return closed;
        }
        let until = Instant::now() + WRITE_FAILURE_GRACE;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            let Ok(event) = self.events.recv_timeout(left) else {
                break;
            };
            let reader_done = matches!(event, Event::Closed(c, _) if c == channel);
            let event = match event {
                // Another failed write waits no longer: it queues behind this one's events.
                Event::WriteFailed(other, error) => {
                    self.in_flight -= 1;
                    LinkEvent::Closed {
                        channel: other,
                        error: Some(error),
                    }
                }
                event => self.event(event),
            };
            if !matches!(event, LinkEvent::Idle) {
                self.deferred.push_back(event);
            }
            if reader_done {
                break;
            }
        }
        self.deferred.push_back(closed);
        self.deferred.pop_front().expect("the failure at least")
    }

    /// Bytes the peers acknowledged since the last look, over every TCP channel.
    fn newly_acknowledged(&mut self) -> u64 {
        self.acks
            .iter_mut()
            .flatten()
            .map(Acks::newly_acknowledged)
            .sum()
    }

    fn awaiting_acks(&self) -> bool {
        self.acks.iter().flatten().any(Acks::waiting)
    }

    fn event(&mut self, event: Event) -> LinkEvent<io::Error> {
        match event {
            Event::Bytes(channel, bytes) => LinkEvent::Received { channel, bytes },
            Event::Written(channel, buf, n) => {
                self.free[channel as usize].push(buf);
                self.in_flight -= 1;
                match &mut self.acks[channel as usize] {
                    Some(acks) => {
                        // Written is not sent: count what the peer acknowledged.
                        acks.written += n as u64;
                        match self.newly_acknowledged() {
                            0 => LinkEvent::Idle,
                            bytes => LinkEvent::Delivered { bytes },
                        }
                    }
                    None => LinkEvent::Delivered { bytes: n as u64 },
                }
            }
            Event::Closed(channel, error) => {
                if let Some(closed) = self.reader_closed.get_mut(channel as usize) {
                    *closed = true;
                }
                LinkEvent::Closed { channel, error }
            }
            Event::WriteFailed(channel, error) => self.write_failed(channel, error),
            Event::Encoded(outcome) => LinkEvent::Encoded(outcome),
            Event::EncodeFailed(channel, buf, error) => {
                self.free[channel as usize].push(buf);
                self.in_flight -= 1;
                LinkEvent::HostFailed(error)
            }
        }
    }

    fn all_closed(&mut self) -> LinkEvent<io::Error> {
        self.dead = true;
        LinkEvent::Closed {
            channel: 0,
            error: Some(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "every connection closed",
            )),
        }
    }
}

impl<H: ?Sized> Link<H> for ThreadLink {
    type Error = io::Error;

    fn now(&mut self) -> Nanos {
        self.clock.now()
    }

    fn channels(&self) -> u16 {
        self.writers.len() as u16
    }

    fn buffer(&mut self, channel: u16) -> Option<&mut [u8]> {
        self.free
            .get_mut(channel as usize)?
            .last_mut()
            .map(|b| b.as_mut_slice())
    }

    fn send(&mut self, _host: &mut H, channel: u16, len: usize) {
        if len == 0 {
            return;
        }
        let ch = channel as usize;
        let Some(buf) = self.free[ch].pop() else {
            return;
        };
        // A writer that is gone has reported why (a WriteFailed event is queued).
        if self.writers[ch].send(Job::Bytes(buf, len)).is_ok() {
            self.in_flight += 1;
        }
    }

    fn encodes_pages(&self) -> bool {
        self.encodes
    }

    fn recycle(&mut self, channel: u16, bytes: Vec<u8>) {
        // A few buffers per reader are enough; the rest are dropped.
        if bytes.capacity() >= READ_BYTES {
            if let Some(r) = self.recyclers.get(channel as usize) {
                let _ = r.send(bytes);
            }
        }
    }

    fn send_plan(&mut self, _host: &mut H, plan: PagePlan) {
        let ch = plan.channel() as usize;
        let Some(buf) = self.free.get_mut(ch).and_then(Vec::pop) else {
            return;
        };
        if self.writers[ch].send(Job::Plan(buf, plan)).is_ok() {
            self.in_flight += 1;
        }
    }

    fn wait(&mut self, _host: &mut H, deadline: Option<Nanos>) -> LinkEvent<io::Error> {
        if let Some((channel, bytes)) = self.early.pop_front() {
            return LinkEvent::Received { channel, bytes };
        }
        if let Some(event) = self.deferred.pop_front() {
            return event;
        }
        if self.dead {
            return self.all_closed();
        }
        let awaiting_acks = self.awaiting_acks();
        if awaiting_acks {
            let bytes = self.newly_acknowledged();
            if bytes > 0 {
                return LinkEvent::Delivered { bytes };
            }
        }
        let mut wait = deadline.map_or(MAX_WAIT, |t| self.clock.until(t).min(MAX_WAIT));
        if awaiting_acks {
            wait = wait.min(ACK_POLL);
        }
        let event = if wait.is_zero() {
            match self.events.try_recv() {
                Ok(e) => e,
                Err(mpsc::TryRecvError::Empty) => return LinkEvent::Idle,
                Err(mpsc::TryRecvError::Disconnected) => return self.all_closed(),
            }
        } else {
            match self.events.recv_timeout(wait) {
                Ok(e) => e,
                Err(RecvTimeoutError::Timeout) => return LinkEvent::Idle,
                Err(RecvTimeoutError::Disconnected) => return self.all_closed(),
            }
        };
        self.event(event)
    }

    fn sending(&self) -> bool {
        self.in_flight > 0 || self.awaiting_acks()
    }
}

fn drive_error(failure: DriveFailure<io::Error>) -> DriveError {
    DriveError::Migration {
        error: failure.error,
        transport: failure.transport,
    }
}

/// Runs `engine` to completion over `channels` (one (reader, writer) per channel, channel 0
/// first; the engine's `SessionConfig::channels` must equal their number). `on_round` is
/// called with each round as it finishes (the stop-and-copy round last).
pub fn run_source<S, H>(
    engine: &mut Source<S>,
    host: &mut H,
    channels: Vec<(BoxRead, BoxWrite)>,
    clock: &Clock,
    mut on_round: impl FnMut(&RoundReport),
) -> Result<(), DriveError>
where
    S: Strategy,
    H: SourceHost,
{
    let mut link = ThreadLink::new(*clock, channels, VecDeque::new(), None, None, Vec::new());
    drive::drive_source(engine, host, &mut link, &mut on_round).map_err(drive_error)
}

/// [`run_source`] with pages read and encoded on the channels' writer threads, from `memory`
/// (N channels encode on N threads; the engine thread only chooses pages). `memory` must be
/// the guest `host` reads.
pub fn run_source_with_workers<S, H>(
    engine: &mut Source<S>,
    host: &mut H,
    memory: SharedMemory,
    channels: Vec<(BoxRead, BoxWrite)>,
    clock: &Clock,
    on_round: impl FnMut(&RoundReport),
) -> Result<(), DriveError>
where
    S: Strategy,
    H: SourceHost,
{
    run_source_with_encoders(engine, host, memory, channels, Vec::new(), clock, on_round)
}

/// Makes one encoder per channel with `make` (its `None`: pages go raw, and no more are made).
pub fn encoders_for<E>(
    channels: usize,
    mut make: impl FnMut() -> Result<Option<Box<dyn PageEncoder>>, E>,
) -> Result<Vec<Box<dyn PageEncoder>>, E> {
    let mut encoders = Vec::new();
    for _ in 0..channels.max(1) {
        match make()? {
            Some(e) => encoders.push(e),
            None => break,
        }
    }
    Ok(encoders)
}

/// Runs `engine` with `encoders` (one per channel, or none: raw pages), the way that
/// pipelines best: on one channel the engine thread reads and encodes (while the writer writes
/// the previous buffer); on several, each channel's writer thread reads `memory` and encodes
/// with its own encoder.
///
/// Returns the CPU time the encoders spent per encoding they produced ([`EncodeTimes`]: only
/// `cpu_nanos` is set); add it to the engine's report with [`EncodingUse::merge_cpu`].
pub fn run_source_encoding<S, H>(
    engine: &mut Source<S>,
    host: &mut H,
    memory: SharedMemory,
    channels: Vec<(BoxRead, BoxWrite)>,
    encoders: Vec<Box<dyn PageEncoder>>,
    clock: &Clock,
    on_round: impl FnMut(&RoundReport),
) -> Result<EncodingUse, DriveError>
where
    S: Strategy,
    H: SourceHost,
{
    let times = EncodeTimes::new();
    let mut encoders: Vec<_> = encoders.into_iter().map(|e| times.timed(e)).collect();
    if channels.len() == 1 {
        let timed = encoders.pop();
        let timed_some = timed.is_some();
        if let Some(encoder) = timed {
            engine.set_encoder(encoder);
        }
        let result = run_source(engine, host, channels, clock, on_round);
        if timed_some {
            // The timed encoder publishes its last counts when dropped: swap it out (the
            // migration is over, the engine encodes nothing more).
            engine.set_encoder(Box::new(memferry::codec::Raw));
        }
        result?;
        return Ok(times.totals());
    }
    if !encoders.is_empty() {
        // The engine offers the codec's features; the writer threads encode.
        engine.set_encoder(Box::new(memferry::codec::Raw));
    }
    run_source_with_encoders(engine, host, memory, channels, encoders, clock, on_round)?;
    Ok(times.totals())
}

/// Encoder calls between two timed ones: [`EncodeTimes`] samples 1 call in this many.
///
/// A pair of clock reads costs 65 to 100 ns on the 2-core test machine (`Instant`, vDSO over
/// the TSC), and the fastest encoding (an XBZRLE delta of a page with 0.1% changed, `cargo
/// bench --bench codec -- codec/xbzrle/encode`) takes about 250 ns, 610 ns with 1% changed:
/// timing every call would add a third to the first. Sampled 1 in 32, the wrapper measured 7
/// ns a call in all (its own dynamic call and counters included, about 3 ns of it the clock);
/// 1 in 64 halves the clock's share: about 1% of a 1%-changed delta, 2% of a 0.1% one, well
/// under 1% of LZ4 or zstd.
pub const TIME_ONE_IN: u64 = 64;

/// One timed coder's counts: per encoding slot ([`EncodingUse::slot_of`]), pages, pages timed
/// and their nanoseconds. Written by the one thread that runs the coder (at most every
/// [`TIME_ONE_IN`] calls, and when it is dropped), read after the run.
#[derive(Default)]
struct TimeShard {
    pages: [AtomicU64; 8],
    timed: [AtomicU64; 8],
    nanos: [AtomicU64; 8],
}

/// Shards of timed coders, and the estimate of their CPU time per encoding.
#[derive(Default)]
struct TimeTally {
    shards: Mutex<Vec<Arc<TimeShard>>>,
}

impl TimeTally {
    /// Counts for one more coder.
    fn sampler(&self) -> Sampler {
        let shard = Arc::new(TimeShard::default());
        if let Ok(mut shards) = self.shards.lock() {
            shards.push(shard.clone());
        }
        Sampler {
            shard,
            calls: 0,
            pages: [0; 8],
            timed: [0; 8],
            nanos: [0; 8],
            time_next: true,
        }
    }

    /// CPU time per encoding so far (only `cpu_nanos` is set), every coder's together: each
    /// encoding's timed calls scaled to all its pages; an encoding none of whose calls was
    /// timed gets the mean of all timed calls.
    fn totals(&self) -> EncodingUse {
        let mut pages = [0u64; 8];
        let mut timed = [0u64; 8];
        let mut nanos = [0u64; 8];
        if let Ok(shards) = self.shards.lock() {
            for shard in shards.iter() {
                for i in 0..8 {
                    pages[i] += shard.pages[i].load(Ordering::Relaxed);
                    timed[i] += shard.timed[i].load(Ordering::Relaxed);
                    nanos[i] += shard.nanos[i].load(Ordering::Relaxed);
                }
            }
        }
        let all_timed: u64 = timed.iter().sum();
        let mean = nanos
            .iter()
            .sum::<u64>()
            .checked_div(all_timed)
            .unwrap_or(0);
        let mut out = EncodingUse::default();
        let slots = [
            &mut out.raw,
            &mut out.zero,
            &mut out.lz4,
            &mut out.delta,
            &mut out.delta_lz4,
            &mut out.reference,
            &mut out.known,
            &mut out.other,
        ];
        for (i, slot) in slots.into_iter().enumerate() {
            let estimate = match timed[i] {
                0 => (pages[i] as u128) * mean as u128,
                t => (nanos[i] as u128) * (pages[i] as u128) / t as u128,
            };
            slot.cpu_nanos = u64::try_from(estimate).unwrap_or(u64::MAX);
        }
        out
    }
}

/// One coder's own counts, kept by the thread that runs it: the clock is read around 1 call in
/// [`TIME_ONE_IN`] (and around the next call after one that produced an encoding not timed
/// yet). The counts go to the shared shard with plain relaxed stores every [`TIME_ONE_IN`]
/// calls and when the sampler is dropped: no store at all on the other calls.
struct Sampler {
    shard: Arc<TimeShard>,
    calls: u64,
    pages: [u64; 8],
    timed: [u64; 8],
    nanos: [u64; 8],
    /// Time the next call (an encoding appeared that no timed call produced yet).
    time_next: bool,
}

impl Sampler {
    /// Counts a call; the clock's reading if this one is timed.
    #[inline]
    fn begin(&mut self) -> Option<Instant> {
        self.calls = self.calls.wrapping_add(1);
        (self.time_next || self.calls.is_multiple_of(TIME_ONE_IN)).then(Instant::now)
    }

    /// Ends the call [`Sampler::begin`] counted: it produced a page of encoding `slot`.
    #[inline]
    fn end(&mut self, slot: usize, started: Option<Instant>) {
        let slot = slot & 7;
        self.pages[slot] += 1;
        if let Some(started) = started {
            self.timed[slot] += 1;
            self.nanos[slot] += (started.elapsed().as_nanos() as u64).max(1);
            self.time_next = false;
        } else if self.timed[slot] == 0 {
            self.time_next = true;
        }
        if self.calls.is_multiple_of(TIME_ONE_IN) {
            self.publish();
        }
    }

    fn publish(&self) {
        for i in 0..8 {
            self.shard.pages[i].store(self.pages[i], Ordering::Relaxed);
            self.shard.timed[i].store(self.timed[i], Ordering::Relaxed);
            self.shard.nanos[i].store(self.nanos[i], Ordering::Relaxed);
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.publish();
    }
}

/// The CPU time a source's encoders spend, per encoding they produce (raw: attempts that did
/// not pay), measured with the real clock: the std side of the report's
/// `encodings.*.cpu_nanos`, which the clock-less core leaves 0.
///
/// Each encoder is wrapped ([`EncodeTimes::timed`]); the wrappers may run on any threads (one
/// per channel) and count into shards of their own, merged by [`EncodeTimes::totals`]. The
/// clock is read around 1 call in [`TIME_ONE_IN`] (and around the next call after one that
/// produced an encoding not timed yet), and each encoding's time is its timed calls' time
/// scaled to all its pages: an estimate, unbiased as long as the sampled calls are like the
/// others, that costs a few nanoseconds a page instead of a third of the fastest encoding.
/// A wrapper publishes its counts every [`TIME_ONE_IN`] calls and when it is dropped: read the
/// totals once the encoders are gone (as [`run_source_encoding`] does).
#[derive(Default)]
pub struct EncodeTimes {
    tally: TimeTally,
}

impl EncodeTimes {
    /// No encoders yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// `encoder`, timed into this tally.
    pub fn timed(&self, encoder: Box<dyn PageEncoder>) -> Box<dyn PageEncoder> {
        Box::new(TimedEncoder {
            inner: encoder,
            sampler: self.tally.sampler(),
        })
    }

    /// CPU time per encoding so far (only `cpu_nanos` is set), every encoder's together; the
    /// last calls of an encoder still running may not be in it yet.
    pub fn totals(&self) -> EncodingUse {
        self.tally.totals()
    }
}

/// An encoder whose calls [`EncodeTimes`] counts and samples.
struct TimedEncoder {
    inner: Box<dyn PageEncoder>,
    sampler: Sampler,
}

impl PageEncoder for TimedEncoder {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn encode(
        &mut self,
        index: u64,
        page: &[u8],
        out: &mut [u8],
    ) -> Option<(wire::Encoding, usize)> {
        let started = self.sampler.begin();
        let result = self.inner.encode(index, page, out);
        let slot = EncodingUse::slot_of(result.map_or(wire::Encoding::RAW, |(e, _)| e));
        self.sampler.end(slot, started);
        result
    }

    fn begin_generation(&mut self, generation: u32) {
        self.inner.begin_generation(generation);
    }

    fn sent_zero(&mut self, index: u64) {
        self.inner.sent_zero(index);
    }

    fn keeps_state(&self) -> bool {
        self.inner.keeps_state()
    }
}

/// The CPU time a destination spends decoding pages, per encoding, measured with the real
/// clock as [`EncodeTimes`] measures encoders (1 call in [`TIME_ONE_IN`] timed, scaled to all
/// pages; counts published every [`TIME_ONE_IN`] calls and when a wrapper is dropped, so read
/// the totals once the destination holding the wrappers is gone).
///
/// What is timed: the decoders ([`DecodeTimes::timed`]: LZ4, XBZRLE delta, delta + LZ4, zstd,
/// [`timed_destination_decoders`]), and for hash-first the reading of known content from the store
/// or image ([`DecodeTimes::timed_content`]; the engine's check of its hash is not in it). Raw
/// and zero pages are not decoded (their cost is the write into guest memory), and references
/// are resolved by the engine: those slots stay 0.
#[derive(Default)]
pub struct DecodeTimes {
    tally: TimeTally,
    /// Nanoseconds the content index took to build (reading and hashing every page of the
    /// store or image for the announcement), if content was offered and announced.
    index_nanos: Arc<AtomicU64>,
}

impl DecodeTimes {
    /// No decoders yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// `decoder`, timed into this tally (under the slot of the encoding it decodes).
    pub fn timed(&self, decoder: Box<dyn PageDecoder>) -> Box<dyn PageDecoder> {
        let slot = EncodingUse::slot_of(decoder.encoding());
        Box::new(TimedDecoder {
            inner: decoder,
            slot,
            sampler: self.tally.sampler(),
        })
    }

    /// `content` (hash-first), its reads of known pages timed into this tally's `known` slot.
    /// The engine reads every page once in order to build its index before the migration's
    /// first round (its first `page_count` reads): those are timed as the index's build
    /// ([`DecodeTimes::index_nanos`]), not as known pages.
    pub fn timed_content(&self, content: Box<dyn ContentSource>) -> Box<dyn ContentSource> {
        Box::new(TimedContent {
            index_reads: content.page_count(),
            inner: content,
            index_started: None,
            index_nanos: self.index_nanos.clone(),
            sampler: self.tally.sampler(),
        })
    }

    /// CPU time per encoding so far (only `cpu_nanos` is set), every decoder's together.
    pub fn totals(&self) -> EncodingUse {
        self.tally.totals()
    }

    /// How long the content index took to build (wall time from its first read to its last),
    /// in nanoseconds; 0 when no content was announced.
    pub fn index_nanos(&self) -> u64 {
        self.index_nanos.load(Ordering::Relaxed)
    }
}

/// Every decoder a destination registers beyond the engine's own (zstd, with the `zstd`
/// feature: `codec::destination_decoders`) and the engine's content decoders (LZ4, XBZRLE
/// delta, delta + LZ4), each timed into `times`. Registered before the hello, they take the
/// place of the copies the engine adds once the source offers content codecs; like zstd's, they
/// decode what arrives even when it did not (every decoder refuses a payload that is not one
/// page, into the scratch page only).
pub fn timed_destination_decoders(times: &DecodeTimes) -> Vec<Box<dyn PageDecoder>> {
    let core: [Box<dyn PageDecoder>; 3] = [
        Box::new(memferry::codec::lz4::Lz4Decoder),
        Box::new(memferry::codec::xbzrle::DeltaDecoder),
        Box::new(memferry::codec::lz4::DeltaLz4Decoder::default()),
    ];
    #[cfg(feature = "zstd")]
    let more = crate::codec::destination_decoders();
    #[cfg(not(feature = "zstd"))]
    let more = Vec::new();
    core.into_iter()
        .chain(more)
        .map(|d| times.timed(d))
        .collect()
}

/// What a destination saw of the migration it received (issue 17's accounting, the
/// destination's side): pages and bytes per encoding, the CPU time its decoders spent, and how
/// long it took.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReceiveStats {
    /// Page copies received per encoding (re-sends and stale copies included), their payload
    /// bytes, and the CPU time spent decoding them (`cpu_nanos`: an estimate from 1 call in
    /// [`TIME_ONE_IN`] timed, [`DecodeTimes`]; 0 for raw, zero and reference
    /// pages, which no decoder handles; for known pages, reading them from the store or image).
    pub encodings: memferry::report::EncodingUse,
    /// Bytes of frames received, headers included.
    pub bytes_received: u64,
    /// From the hello's arrival to the end of the migration.
    pub elapsed: Duration,
    /// Hash-first: how long reading and hashing the offered content for the announcement took
    /// (before round 1); zero when no content was announced.
    pub content_index: Duration,
}

impl ReceiveStats {
    /// What `destination` received, its decoders timed by `times`, since `hello_at`. Takes the
    /// destination (its migration is over) and drops it, so that the timed decoders it holds
    /// publish their last counts before they are read.
    pub fn collect<P: PagePolicy>(
        destination: Destination<P>,
        times: &DecodeTimes,
        hello_at: Instant,
    ) -> Self {
        let mut encodings = destination.encodings_received();
        let bytes_received = destination.bytes_received();
        drop(destination);
        encodings.merge_cpu(&times.totals());
        ReceiveStats {
            encodings,
            bytes_received,
            elapsed: hello_at.elapsed(),
            content_index: Duration::from_nanos(times.index_nanos()),
        }
    }

    /// CPU time spent decoding, every encoding's together, in nanoseconds.
    pub fn decode_cpu_nanos(&self) -> u64 {
        self.encodings.cpu_nanos()
    }

    /// Page copies received, every encoding's together.
    pub fn pages_received(&self) -> u64 {
        self.encodings.slots().iter().map(|(_, s)| s.pages).sum()
    }
}

/// A decoder whose calls [`DecodeTimes`] counts and samples.
struct TimedDecoder {
    inner: Box<dyn PageDecoder>,
    slot: usize,
    sampler: Sampler,
}

impl PageDecoder for TimedDecoder {
    fn encoding(&self) -> wire::Encoding {
        self.inner.encoding()
    }

    fn decode(
        &mut self,
        index: u64,
        payload: &[u8],
        scratch: &mut [u8],
    ) -> Result<(), &'static str> {
        let started = self.sampler.begin();
        let result = self.inner.decode(index, payload, scratch);
        self.sampler.end(self.slot, started);
        result
    }

    fn needs_current_page(&self) -> bool {
        self.inner.needs_current_page()
    }
}

/// Content whose reads [`DecodeTimes`] times: the first `index_reads` build the index, the
/// rest resolve known pages.
struct TimedContent {
    inner: Box<dyn ContentSource>,
    index_reads: u64,
    index_started: Option<Instant>,
    index_nanos: Arc<AtomicU64>,
    sampler: Sampler,
}

impl ContentSource for TimedContent {
    fn page_count(&self) -> u64 {
        self.inner.page_count()
    }

    fn read_content(&mut self, index: u64, buf: &mut [u8]) -> Result<(), HostError> {
        if self.index_reads > 0 {
            let started = *self.index_started.get_or_insert_with(Instant::now);
            let result = self.inner.read_content(index, buf);
            self.index_reads -= 1;
            if self.index_reads == 0 {
                let nanos = started.elapsed().as_nanos() as u64;
                self.index_nanos.store(nanos.max(1), Ordering::Relaxed);
            }
            return result;
        }
        let started = self.sampler.begin();
        let result = self.inner.read_content(index, buf);
        self.sampler
            .end(EncodingUse::slot_of(wire::Encoding::KNOWN), started);
        result
    }
}

/// [`run_source_with_workers`] with an encoder per channel (`encoders[ch]`; channels beyond
/// the list send pages raw): each channel's writer thread encodes its pages with its own. With
/// encoders that keep state (delta, dedup, adaptive: [`PageEncoder::keeps_state`]), the
/// engine is switched to channel affinity, so that each page keeps to one channel and its
/// encoder.
pub fn run_source_with_encoders<S, H>(
    engine: &mut Source<S>,
    host: &mut H,
    memory: SharedMemory,
    channels: Vec<(BoxRead, BoxWrite)>,
    encoders: Vec<Box<dyn PageEncoder>>,
    clock: &Clock,
    mut on_round: impl FnMut(&RoundReport),
) -> Result<(), DriveError>
where
    S: Strategy,
    H: SourceHost,
{
    if encoders.iter().any(|e| e.keeps_state()) {
        // Each channel's encoder must see every version of its pages, in order on its
        // connection: pages keep to one channel each.
        engine.set_channel_affinity(true);
    }
    let mut link = ThreadLink::new(
        *clock,
        channels,
        VecDeque::new(),
        None,
        Some(memory),
        encoders,
    );
    drive::drive_source(engine, host, &mut link, &mut on_round).map_err(drive_error)
}

/// A read buffer that always has room for the largest legal frame.
pub struct FrameBuffer {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Default for FrameBuffer {
    fn default() -> Self {
        FrameBuffer {
            buf: vec![0; 2 * wire::MAX_FRAME_LEN],
            start: 0,
            end: 0,
        }
    }
}

impl FrameBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bytes received but not yet consumed.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Marks `n` pending bytes as consumed.
    pub fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more bytes from `reader`. Returns 0 at end of stream.
    pub fn fill_from(&mut self, reader: &mut dyn Read) -> io::Result<usize> {
        if self.buf.len() - self.end < wire::MAX_FRAME_LEN {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        loop {
            match reader.read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// What a hello says about the migration, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloInfo {
    /// The source's layout.
    pub layout: MemoryLayout,
    /// Connections the source will open, this one included.
    pub channels: u16,
    /// The migration's id.
    pub session_id: u64,
}

fn read_first_frame<T>(
    reader: &mut dyn Read,
    buffer: &mut FrameBuffer,
    what: &'static str,
    mut take: impl FnMut(Frame<'_>) -> Option<Result<T, MigrationError>>,
) -> Result<T, DriveError> {
    loop {
        match Frame::parse(buffer.pending()) {
            Ok((frame, _)) => {
                if let Frame::Abort { code, message } = frame {
                    return Err(MigrationError::PeerAborted {
                        code,
                        message: String::from_utf8_lossy(message).into_owned(),
                    }
                    .into());
                }
                let kind = frame.kind();
                return match take(frame) {
                    Some(r) => r.map_err(DriveError::from),
                    None => Err(MigrationError::UnexpectedFrame {
                        expected: what,
                        got: kind.unwrap_or(wire::FrameKind::Abort),
                    }
                    .into()),
                };
            }
            Err(WireError::Incomplete { .. }) => {}
            Err(e) => return Err(MigrationError::Frame(e).into()),
        }
        if buffer.fill_from(reader).map_err(DriveError::Transport)? == 0 {
            return Err(MigrationError::Cancelled(format!(
                "the source closed the connection before its {what}"
            ))
            .into());
        }
    }
}

/// Reads until the opening hello has arrived and returns what it says. Its bytes stay in
/// `buffer` for the destination to consume.
pub fn read_hello(
    reader: &mut dyn Read,
    buffer: &mut FrameBuffer,
) -> Result<HelloInfo, DriveError> {
    read_first_frame(reader, buffer, "Hello", |frame| {
        let Frame::Hello(hello) = frame else {
            return None;
        };
        let regions: Vec<Region> = hello.regions.iter().collect();
        let layout = PageSize::new(1u64 << hello.page_shift)
            .map_err(|e| e.to_string())
            .and_then(|size| MemoryLayout::new(size, regions).map_err(|e| e.to_string()))
            .map_err(|e| MigrationError::Incompatible(format!("the source's layout: {e}")));
        Some(layout.map(|layout| HelloInfo {
            layout,
            channels: hello.channels,
            session_id: hello.session_id,
        }))
    })
}

/// Reads the `Join` that opens an extra channel; returns (channel, session id). Its bytes stay
/// in `buffer`.
pub fn read_join(
    reader: &mut dyn Read,
    buffer: &mut FrameBuffer,
) -> Result<(u16, u64), DriveError> {
    read_first_frame(reader, buffer, "Join", |frame| match frame {
        Frame::Join {
            channel,
            session_id,
            ..
        } => Some(Ok((channel, session_id))),
        _ => None,
    })
}

/// Runs `destination` until the migration completes. `channels[i]` is channel i: its reader,
/// the buffer holding what was read from it already (its hello or join), and its writer
/// (replies go to channel 0's).
pub fn run_destination<P, H>(
    destination: &mut Destination<P>,
    host: &mut H,
    channels: Vec<(BoxRead, FrameBuffer, BoxWrite)>,
    clock: &Clock,
) -> Result<(), DriveError>
where
    P: PagePolicy,
    H: PageWrite + DestinationGuest,
{
    let mut early = VecDeque::new();
    let mut ends = Vec::new();
    let bound = DESTINATION_QUEUE_PER_CHANNEL * channels.len().max(1);
    for (ch, (reader, buffer, writer)) in channels.into_iter().enumerate() {
        if !buffer.pending().is_empty() {
            early.push_back((ch as u16, buffer.pending().to_vec()));
        }
        ends.push((reader, writer));
    }
    let mut link = ThreadLink::new(*clock, ends, early, Some(bound), None, Vec::new());
    drive::drive_destination(destination, host, &mut link).map_err(drive_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// LZ4 for even pages, raw for odd ones, after a little work.
    struct Alternate;

    impl PageEncoder for Alternate {
        fn name(&self) -> &'static str {
            "alternate"
        }
        fn encode(
            &mut self,
            index: u64,
            page: &[u8],
            out: &mut [u8],
        ) -> Option<(wire::Encoding, usize)> {
            out[..page.len()].copy_from_slice(page);
            std::hint::black_box(memferry::digest::content_hash(page));
            index.is_multiple_of(2).then_some((wire::Encoding::LZ4, 10))
        }
    }

    #[test]
    fn encode_times_go_to_the_encodings_produced_only() {
        let times = EncodeTimes::new();
        let mut a = times.timed(Box::new(Alternate));
        let mut b = times.timed(Box::new(Alternate));
        let page = vec![7u8; 4096];
        let mut out = vec![0u8; 4096];
        for i in 0..1000 {
            a.encode(i, &page, &mut out);
        }
        // The second encoder on another thread, as a writer thread would run it.
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..10 {
                    b.encode(i, &page, &mut out);
                }
            });
        });
        // Counts go out every TIME_ONE_IN calls and when an encoder is dropped.
        drop((a, b));
        let t = times.totals();
        assert!(t.lz4.cpu_nanos > 0 && t.raw.cpu_nanos > 0, "{t:?}");
        for (name, slot) in t.slots() {
            if !matches!(name, "lz4" | "raw") {
                assert_eq!(slot.cpu_nanos, 0, "{name}");
            }
        }
        assert_eq!(EncodeTimes::new().totals(), EncodingUse::default());
    }

    #[test]
    fn counts_are_published_in_batches_and_when_dropped() {
        let times = EncodeTimes::new();
        let mut a = times.timed(Box::new(Alternate));
        assert_eq!(a.name(), "alternate");
        // What the engine asks of the encoder is the wrapped one's answer.
        assert!(!a.keeps_state());
        let delta = memferry::codec::xbzrle::DeltaEncoder::new(
            memferry::codec::xbzrle::XbzrleCache::new(1 << 20, 4096),
        );
        assert!(times.timed(Box::new(delta)).keeps_state());
        let page = vec![7u8; 4096];
        let mut out = vec![0u8; 4096];
        // Fewer calls than a batch: nothing published yet, no store on the way.
        for i in 0..TIME_ONE_IN - 1 {
            a.encode(i * 2, &page, &mut out);
        }
        assert_eq!(times.totals(), EncodingUse::default());
        // The batch's last call publishes.
        a.encode(0, &page, &mut out);
        let batch = times.totals().lz4.cpu_nanos;
        assert!(batch > 0);
        // Calls after it are out until the encoder is dropped; then all of them count (the
        // estimate scales the timed calls' time to every page).
        for i in 0..TIME_ONE_IN / 2 {
            a.encode(i * 2, &page, &mut out);
        }
        assert_eq!(times.totals().lz4.cpu_nanos, batch);
        drop(a);
        let all = times.totals().lz4;
        assert!(all.cpu_nanos > batch, "{all:?} vs {batch}");
    }

    /// Content of `pages` distinct pages, counting its reads.
    struct Pages(u64);

    impl ContentSource for Pages {
        fn page_count(&self) -> u64 {
            self.0
        }
        fn read_content(&mut self, index: u64, buf: &mut [u8]) -> Result<(), HostError> {
            buf.fill(index as u8 | 1);
            Ok(())
        }
    }

    #[test]
    fn decode_times_go_to_the_decoded_encodings_and_known_reads_after_the_index() {
        let times = DecodeTimes::new();
        let mut decoders = timed_destination_decoders(&times);
        let lz4 = decoders
            .iter_mut()
            .find(|d| d.encoding() == wire::Encoding::LZ4)
            .expect("an LZ4 decoder");
        let page = vec![3u8; 4096];
        let mut compressed = vec![0u8; 4096];
        let n = memferry::codec::lz4::Lz4Compressor::default()
            .compress(&page, &mut compressed)
            .expect("a page of one byte compresses");
        let mut scratch = vec![0u8; 4096];
        for i in 0..200 {
            lz4.decode(i, &compressed[..n], &mut scratch).unwrap();
        }
        assert_eq!(scratch, page);
        // A bad payload is timed too, and still an error.
        assert!(lz4.decode(0, &compressed[..n / 2], &mut scratch).is_err());
        assert!(decoders.iter().any(|d| d.needs_current_page()));
        let mut content = times.timed_content(Box::new(Pages(10)));
        let mut buf = vec![0u8; 4096];
        for i in 0..10 {
            content.read_content(i, &mut buf).unwrap();
        }
        drop(decoders);
        // The index's reads are its build, not known pages.
        assert!(times.index_nanos() > 0);
        assert_eq!(times.totals().known.cpu_nanos, 0);
        content.read_content(4, &mut buf).unwrap();
        drop(content);
        let t = times.totals();
        assert!(t.lz4.cpu_nanos > 0 && t.known.cpu_nanos > 0, "{t:?}");
        for (name, slot) in t.slots() {
            if !matches!(name, "lz4" | "known") {
                assert_eq!(slot.cpu_nanos, 0, "{name}");
            }
        }
    }
}
