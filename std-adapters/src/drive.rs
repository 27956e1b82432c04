//! The reference driver: runs the core's state machines over real connections with a real
//! clock. One loop per side serves one connection or many; the core decides everything, this
//! module only moves bytes, reads the clock and owns the threads.
//!
//! - [`run_source`]: one reader thread and one writer thread per channel. The engine thread
//!   offers each channel a free buffer, asks [`Source::poll_transmit`] to fill at most that
//!   much (so output is bounded by buffers the writers have handed back: back-pressure comes
//!   from the shape of the loop), reports bytes the transport wrote with
//!   [`Source::on_delivered`], feeds replies to [`Source::handle_input`] and calls
//!   [`Source::handle_timeout`] when [`Source::poll_timeout`] says (the peer timeout lives in
//!   the engine).
//! - [`run_destination`]: one reader thread per channel, one engine thread applying frames in
//!   arrival order per channel, replies written on channel 0.
//! - [`read_hello`] / [`read_join`]: read the opening frame of a connection, so a listener can
//!   size the guest and order the channels before it builds the destination.
//!
//! Errors keep their first cause: an engine error is returned as it is; a transport failure
//! cancels the engine (a paused source guest resumes before the commit point) and is returned
//! with the engine's view of it.

use std::fmt;
use std::io::{self, Read, Write};
use std::sync::mpsc::{self, Receiver as EventQueue, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use memferry::error::MigrationError;
use memferry::memory::{DestinationGuest, PageWrite, SourceHost};
use memferry::page::{MemoryLayout, PageSize, Region};
use memferry::receive::{Destination, DestinationStatus, PagePolicy};
use memferry::report::RoundReport;
use memferry::session::{Source, SourceStatus};
use memferry::strategy::Strategy;
use memferry::time::Nanos;
use memferry::wire::{self, Frame, WireError};

use crate::transport::{BoxRead, BoxWrite};

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
}

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

fn spawn_reader(channel: u16, mut reader: BoxRead, events: impl EventSink) {
    std::thread::Builder::new()
        .name(format!("memferry-read-{channel}"))
        .spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => {
                        let _ = events.send(Event::Closed(channel, None));
                        return;
                    }
                    Ok(n) => {
                        if events
                            .send(Event::Bytes(channel, buf[..n].to_vec()))
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = events.send(Event::Closed(channel, Some(e)));
                        return;
                    }
                }
            }
        })
        .expect("spawning a reader thread");
}

fn spawn_writer(
    channel: u16,
    mut writer: BoxWrite,
    events: mpsc::Sender<Event>,
) -> SyncSender<(Vec<u8>, usize)> {
    let (tx, rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(BUFFERS_PER_CHANNEL);
    std::thread::Builder::new()
        .name(format!("memferry-write-{channel}"))
        .spawn(move || {
            while let Ok((buf, n)) = rx.recv() {
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
    tx
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
    let (events_tx, events) = mpsc::channel();
    let mut writers = Vec::new();
    let mut free: Vec<Vec<Vec<u8>>> = Vec::new();
    for (ch, (reader, writer)) in channels.into_iter().enumerate() {
        spawn_reader(ch as u16, reader, events_tx.clone());
        writers.push(spawn_writer(ch as u16, writer, events_tx.clone()));
        free.push(
            (0..BUFFERS_PER_CHANNEL)
                .map(|_| vec![0u8; WRITE_BYTES])
                .collect(),
        );
    }
    drop(events_tx);
    let mut inbox: Vec<u8> = Vec::new();
    let mut rounds_reported = 0;
    let result = source_loop(
        engine,
        host,
        &events,
        &writers,
        &mut free,
        &mut inbox,
        clock,
        &mut on_round,
        &mut rounds_reported,
    );
    while rounds_reported < engine.report().rounds.len() {
        on_round(&engine.report().rounds[rounds_reported]);
        rounds_reported += 1;
    }
    if result.is_err() {
        // Hand the abort frame (queued on channel 0) to the writer, and give it a moment.
        flush_abort(engine, host, &events, &writers, &mut free, clock);
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn source_loop<S: Strategy, H: SourceHost>(
    engine: &mut Source<S>,
    host: &mut H,
    events: &EventQueue<Event>,
    writers: &[SyncSender<(Vec<u8>, usize)>],
    free: &mut [Vec<Vec<u8>>],
    inbox: &mut Vec<u8>,
    clock: &Clock,
    on_round: &mut impl FnMut(&RoundReport),
    rounds_reported: &mut usize,
) -> Result<(), DriveError> {
    loop {
        let mut progress = false;
        for ch in 0..writers.len() {
            while let Some(mut buf) = free[ch].pop() {
                let n = engine.poll_transmit(clock.now(), ch as u16, &mut buf, host)?;
                if n == 0 {
                    free[ch].push(buf);
                    break;
                }
                progress = true;
                if writers[ch].send((buf, n)).is_err() {
                    // The writer stopped because a write failed: find out why.
                    let mut error = io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        format!("the connection of channel {ch} failed"),
                    );
                    let deadline = Instant::now() + Duration::from_secs(1);
                    while let Ok(event) =
                        events.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    {
                        match event {
                            Event::WriteFailed(_, e) => {
                                error = e;
                                break;
                            }
                            Event::Bytes(_, bytes) => inbox.extend_from_slice(&bytes),
                            _ => {}
                        }
                    }
                    return Err(explain_write_failure(
                        engine, host, events, inbox, clock, ch as u16, error,
                    ));
                }
            }
        }
        while *rounds_reported < engine.report().rounds.len() {
            on_round(&engine.report().rounds[*rounds_reported]);
            *rounds_reported += 1;
        }
        if engine.status() == SourceStatus::Done {
            return Ok(());
        }
        let now = clock.now();
        let wait = match engine.poll_timeout() {
            _ if progress => Duration::ZERO,
            Some(t) if t <= now => {
                engine.handle_timeout(now, host)?;
                // Work is due (hashing, a round's end, queued frames). With a free buffer, call
                // again at once (after a look at the events, so writers' hand-backs and
                // replies are seen); with none, wait for a writer to hand one back.
                if free.iter().any(|f| !f.is_empty()) {
                    Duration::ZERO
                } else {
                    MAX_WAIT
                }
            }
            Some(t) => clock.until(t).min(MAX_WAIT),
            None => MAX_WAIT,
        };
        let event = if wait.is_zero() {
            match events.try_recv() {
                Ok(e) => Some(e),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err(engine
                        .cancel(clock.now(), "all connections closed", host)
                        .into())
                }
            }
        } else {
            match events.recv_timeout(wait) {
                Ok(e) => Some(e),
                Err(RecvTimeoutError::Timeout) => {
                    engine.handle_timeout(clock.now(), host)?;
                    None
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(engine
                        .cancel(clock.now(), "all connections closed", host)
                        .into())
                }
            }
        };
        let Some(event) = event else { continue };
        match event {
            Event::Written(ch, buf, n) => {
                free[ch as usize].push(buf);
                engine.on_delivered(clock.now(), n as u64);
            }
            Event::Bytes(ch, bytes) => {
                inbox.extend_from_slice(&bytes);
                let used = engine.handle_input(clock.now(), ch, inbox, host)?;
                inbox.drain(..used);
            }
            Event::Closed(ch, None) if ch != 0 => {
                // A bulk channel closed cleanly: the destination finished, or went away (then
                // channel 0 tells, or a write fails, or the peer timeout fires). Its replies,
                // Verified among them, come on channel 0 and may still be queued.
            }
            Event::Closed(ch, err) => {
                // Replies read before the close may still be queued behind it.
                while let Ok(Event::Bytes(c, bytes)) = events.try_recv() {
                    inbox.extend_from_slice(&bytes);
                    let used = engine.handle_input(clock.now(), c, inbox, host)?;
                    inbox.drain(..used);
                }
                if engine.status() == SourceStatus::Done {
                    return Ok(());
                }
                let why = match &err {
                    Some(e) => format!("reading from the destination (channel {ch}) failed: {e}"),
                    None => format!("the destination closed channel {ch}"),
                };
                let error = engine.cancel(clock.now(), &why, host);
                return Err(DriveError::Migration {
                    error,
                    transport: err,
                });
            }
            Event::WriteFailed(ch, e) => {
                return Err(explain_write_failure(
                    engine, host, events, inbox, clock, ch, e,
                ))
            }
        }
    }
}

/// A write failed: most often because the destination refused something and hung up. Its
/// abort frame (if it sent one) explains more than "broken pipe", so look for it first.
fn explain_write_failure<S: Strategy, H: SourceHost>(
    engine: &mut Source<S>,
    host: &mut H,
    events: &EventQueue<Event>,
    inbox: &mut Vec<u8>,
    clock: &Clock,
    channel: u16,
    error: io::Error,
) -> DriveError {
    if !inbox.is_empty() {
        if let Err(e @ MigrationError::PeerAborted { .. }) =
            engine.handle_input(clock.now(), 0, inbox, host)
        {
            return DriveError::Migration {
                error: e,
                transport: Some(error),
            };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while let Ok(event) = events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if let Event::Bytes(ch, bytes) = event {
            inbox.extend_from_slice(&bytes);
            if let Err(e @ MigrationError::PeerAborted { .. }) =
                engine.handle_input(clock.now(), ch, inbox, host)
            {
                return DriveError::Migration {
                    error: e,
                    transport: Some(error),
                };
            }
        }
    }
    let why = format!("writing to the destination (channel {channel}) failed: {error}");
    let e = engine.cancel(clock.now(), &why, host);
    DriveError::Migration {
        error: e,
        transport: Some(error),
    }
}

fn flush_abort<S: Strategy, H: SourceHost>(
    engine: &mut Source<S>,
    host: &mut H,
    events: &EventQueue<Event>,
    writers: &[SyncSender<(Vec<u8>, usize)>],
    free: &mut [Vec<Vec<u8>>],
    clock: &Clock,
) {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        if let Some(mut buf) = free[0].pop() {
            match engine.poll_transmit(clock.now(), 0, &mut buf, host) {
                Ok(n) if n > 0 => {
                    if writers[0].send((buf, n)).is_err() {
                        return;
                    }
                    continue;
                }
                _ => return,
            }
        }
        match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Event::Written(0, buf, _)) => free[0].push(buf),
            Ok(_) => {}
            Err(_) => return,
        }
    }
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
    let (events_tx, events) =
        mpsc::sync_channel(DESTINATION_QUEUE_PER_CHANNEL * channels.len().max(1));
    let mut writers = Vec::new();
    let mut inboxes = Vec::new();
    for (ch, (reader, buffer, writer)) in channels.into_iter().enumerate() {
        inboxes.push(buffer.pending().to_vec());
        spawn_reader(ch as u16, reader, events_tx.clone());
        writers.push(writer);
    }
    drop(events_tx);
    let mut out = Vec::new();
    // Whatever arrived with the opening frames.
    for (ch, inbox) in inboxes.iter_mut().enumerate() {
        if !inbox.is_empty() {
            let bytes = std::mem::take(inbox);
            let r = apply(destination, host, ch as u16, &bytes, inbox, clock);
            reply(destination, &mut writers[0], &mut out, r)?;
        }
    }
    loop {
        if destination.status() == DestinationStatus::Complete {
            return Ok(());
        }
        let wait = destination
            .poll_timeout()
            .map_or(MAX_WAIT, |t| clock.until(t).min(MAX_WAIT));
        match events.recv_timeout(wait) {
            Ok(Event::Bytes(ch, bytes)) => {
                let inbox = &mut inboxes[ch as usize];
                let r = if inbox.is_empty() {
                    apply(destination, host, ch, &bytes, inbox, clock)
                } else {
                    inbox.extend_from_slice(&bytes);
                    let all = std::mem::take(inbox);
                    apply(destination, host, ch, &all, inbox, clock)
                };
                reply(destination, &mut writers[0], &mut out, r)?;
            }
            Ok(Event::Closed(ch, err)) => {
                if destination.status() == DestinationStatus::Complete {
                    return Ok(());
                }
                let why = match &err {
                    Some(e) => format!("reading from the source (channel {ch}) failed: {e}"),
                    None => format!("the source closed channel {ch} mid-migration"),
                };
                let error = destination.cancel(&why);
                let _ = reply(destination, &mut writers[0], &mut out, Ok(()));
                return Err(DriveError::Migration {
                    error,
                    transport: err,
                });
            }
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => {
                let r = destination.handle_timeout(clock.now());
                reply(destination, &mut writers[0], &mut out, r)?;
            }
            Err(RecvTimeoutError::Disconnected) => {
                let error = destination.cancel("every connection closed");
                return Err(error.into());
            }
        }
    }
}

/// Feeds `bytes` to the destination; what does not make a whole frame goes to `rest`.
fn apply<P: PagePolicy, H: PageWrite + DestinationGuest>(
    destination: &mut Destination<P>,
    host: &mut H,
    channel: u16,
    bytes: &[u8],
    rest: &mut Vec<u8>,
    clock: &Clock,
) -> Result<(), MigrationError> {
    let used = destination.handle_input(clock.now(), channel, bytes, host)?;
    rest.extend_from_slice(&bytes[used..]);
    Ok(())
}

/// Writes the destination's replies (an abort too, after an error), then returns `result`.
fn reply<P: PagePolicy>(
    destination: &mut Destination<P>,
    writer: &mut BoxWrite,
    out: &mut Vec<u8>,
    result: Result<(), MigrationError>,
) -> Result<(), DriveError> {
    destination.drain_replies(out);
    if !out.is_empty() {
        let written = writer.write_all(out).and_then(|_| writer.flush());
        out.clear();
        if let Err(e) = written {
            // A failed write after an error is moot; otherwise it is the failure.
            result?;
            let error = destination.cancel(&format!("writing to the source failed: {e}"));
            return Err(DriveError::Migration {
                error,
                transport: Some(e),
            });
        }
    }
    result.map_err(DriveError::from)
}
