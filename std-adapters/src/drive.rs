//! Runs the core's state machines over a real transport with a real clock.
//!
//! The core decides everything; this module only moves bytes and reads the clock:
//! - [`run_source`]: polls a [`PreCopySource`], writes its frames in large batches, and feeds it
//!   the destination's replies, which a reader thread collects so an abort is seen at once.
//! - [`run_destination`]: reads the stream into a buffer sized for the largest legal frame,
//!   feeds whole frames to a [`Receiver`], and writes its replies.
//! - [`read_hello`]: reads the opening frame, so a listener can size the guest before it
//!   builds the receiver.
//!
//! On a transport failure the engine is cancelled: a paused source guest is resumed.

use std::fmt;
use std::io::{self, Read, Write};
use std::sync::mpsc::{self, Receiver as Channel, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use memferry::error::MigrationError;
use memferry::memory::{DestinationGuest, DirtyLog, PageRead, PageWrite, SourceGuest};
use memferry::migrate::{Poll, PreCopySource};
use memferry::receive::{Receiver, ReceiverStatus};
use memferry::report::RoundReport;
use memferry::time::Nanos;
use memferry::wire::{self, Frame, Hello, WireError};

use crate::transport::BoxRead;

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

    /// Nanoseconds since the origin.
    pub fn now(&self) -> Nanos {
        Nanos(self.origin.elapsed().as_nanos() as u64)
    }

    /// Sleeps until `t` (no-op if it has passed).
    pub fn sleep_until(&self, t: Nanos) {
        let now = self.now();
        if t > now {
            std::thread::sleep(Duration::from_nanos((t - now).0));
        }
    }
}

/// Why a driven migration failed.
#[derive(Debug)]
pub enum DriveError {
    /// The migration protocol failed (bad frame, abort, digest mismatch, host failure).
    Migration(MigrationError),
    /// The transport failed.
    Transport(io::Error),
}

impl fmt::Display for DriveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriveError::Migration(e) => write!(f, "{e}"),
            DriveError::Transport(e) => write!(f, "transport failed: {e}"),
        }
    }
}

impl std::error::Error for DriveError {}

impl From<MigrationError> for DriveError {
    fn from(e: MigrationError) -> Self {
        DriveError::Migration(e)
    }
}

/// How long a side waits for its peer before giving up.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(60);

enum Inbound {
    Bytes(Vec<u8>),
    Closed(Option<io::Error>),
}

fn spawn_reader(mut reader: BoxRead) -> Channel<Inbound> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("memferry-reply-reader".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => {
                        let _ = tx.send(Inbound::Closed(None));
                        return;
                    }
                    Ok(n) => {
                        if tx.send(Inbound::Bytes(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.send(Inbound::Closed(Some(e)));
                        return;
                    }
                }
            }
        })
        .expect("spawning the reply reader");
    rx
}

/// Runs `engine` to completion: frames go to `writer`, replies come from `reader`.
/// `on_round` is called with each round as it finishes (the stop-and-copy round last).
pub fn run_source<H>(
    engine: &mut PreCopySource,
    host: &mut H,
    reader: BoxRead,
    writer: &mut dyn Write,
    clock: &Clock,
    mut on_round: impl FnMut(&RoundReport),
) -> Result<(), DriveError>
where
    H: PageRead + DirtyLog + SourceGuest,
{
    let replies = spawn_reader(reader);
    let mut inbox: Vec<u8> = Vec::new();
    let result = source_loop(
        engine,
        host,
        &replies,
        &mut inbox,
        writer,
        clock,
        &mut on_round,
    );
    match result {
        Err(DriveError::Transport(e)) => Err(explain_write_failure(
            engine, host, &replies, &mut inbox, clock, e,
        )),
        other => other,
    }
}

/// A write failed: most often because the destination refused something and hung up. Its
/// abort frame (if it sent one) explains more than "broken pipe", so look for it.
fn explain_write_failure<H: SourceGuest>(
    engine: &mut PreCopySource,
    host: &mut H,
    replies: &Channel<Inbound>,
    inbox: &mut Vec<u8>,
    clock: &Clock,
    error: io::Error,
) -> DriveError {
    let mut sink = Vec::new();
    while let Ok(Inbound::Bytes(bytes)) = replies.recv_timeout(Duration::from_secs(1)) {
        inbox.extend_from_slice(&bytes);
        if let Err(e @ MigrationError::PeerAborted { .. }) =
            engine.receive(clock.now(), inbox, host, &mut sink)
        {
            return e.into();
        }
    }
    if !engine.is_finished() {
        engine.cancel(
            &format!("writing to the destination failed: {error}"),
            host,
            &mut sink,
        );
    }
    DriveError::Transport(error)
}

fn source_loop<H>(
    engine: &mut PreCopySource,
    host: &mut H,
    replies: &Channel<Inbound>,
    inbox: &mut Vec<u8>,
    writer: &mut dyn Write,
    clock: &Clock,
    on_round: &mut impl FnMut(&RoundReport),
) -> Result<(), DriveError>
where
    H: PageRead + DirtyLog + SourceGuest,
{
    let mut out = Vec::with_capacity(2 << 20);
    let mut rounds_reported = 0;
    loop {
        let polled = engine.poll(clock.now(), host, &mut out);
        send(writer, &mut out)?;
        while rounds_reported < engine.report().rounds.len() {
            on_round(&engine.report().rounds[rounds_reported]);
            rounds_reported += 1;
        }
        let inbound = match polled? {
            Poll::Done => return Ok(()),
            Poll::Continue => match replies.try_recv() {
                Ok(msg) => Some(msg),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => Some(Inbound::Closed(None)),
            },
            Poll::WaitUntil(t) => {
                let wait = Duration::from_nanos((t - clock.now()).0);
                match replies.recv_timeout(wait) {
                    Ok(msg) => Some(msg),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => Some(Inbound::Closed(None)),
                }
            }
            Poll::WaitForPeer => match replies.recv_timeout(PEER_TIMEOUT) {
                Ok(msg) => Some(msg),
                Err(RecvTimeoutError::Timeout) => {
                    let e =
                        engine.cancel("the destination did not answer within 60 s", host, &mut out);
                    let _ = send(writer, &mut out);
                    return Err(e.into());
                }
                Err(RecvTimeoutError::Disconnected) => Some(Inbound::Closed(None)),
            },
        };
        match inbound {
            None => {}
            Some(Inbound::Bytes(bytes)) => {
                inbox.extend_from_slice(&bytes);
                let used = engine.receive(clock.now(), inbox, host, &mut out);
                send(writer, &mut out)?;
                inbox.drain(..used?);
            }
            Some(Inbound::Closed(err)) => {
                let why = match err {
                    Some(e) => format!("reading from the destination failed: {e}"),
                    None => "the destination closed the connection".to_string(),
                };
                return Err(engine.cancel(&why, host, &mut out).into());
            }
        }
    }
}

/// Writes and clears `out`.
fn send(writer: &mut dyn Write, out: &mut Vec<u8>) -> Result<(), DriveError> {
    if out.is_empty() {
        return Ok(());
    }
    let written = writer.write_all(out).and_then(|_| writer.flush());
    out.clear();
    written.map_err(DriveError::Transport)
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

/// Reads until the opening hello has arrived and returns it. Its bytes stay in `buffer` for the
/// receiver to consume.
pub fn read_hello(reader: &mut dyn Read, buffer: &mut FrameBuffer) -> Result<Hello, DriveError> {
    loop {
        match Frame::parse(buffer.pending()) {
            Ok((Frame::Hello(hello), _)) => return Ok(hello),
            Ok((other, _)) => {
                return Err(MigrationError::UnexpectedFrame {
                    expected: "Hello",
                    got: other.kind(),
                }
                .into())
            }
            Err(WireError::Incomplete { .. }) => {}
            Err(e) => return Err(MigrationError::Frame(e).into()),
        }
        if buffer.fill_from(reader).map_err(DriveError::Transport)? == 0 {
            return Err(MigrationError::Cancelled(
                "the source closed the connection before its hello".into(),
            )
            .into());
        }
    }
}

/// Runs `receiver` until the migration completes: frames from `reader` (after any already in
/// `buffer`), replies to `writer`.
pub fn run_destination<H>(
    receiver: &mut Receiver,
    host: &mut H,
    reader: &mut dyn Read,
    writer: &mut dyn Write,
    buffer: &mut FrameBuffer,
    clock: &Clock,
) -> Result<(), DriveError>
where
    H: PageWrite + DestinationGuest,
{
    let mut out = Vec::new();
    loop {
        if !buffer.pending().is_empty() {
            let result = receiver.receive(clock.now(), buffer.pending(), host, &mut out);
            if !out.is_empty() {
                let written = writer.write_all(&out).and_then(|_| writer.flush());
                out.clear();
                if let Err(e) = written {
                    // A failed write after an error is moot; otherwise it is the failure.
                    result?;
                    return Err(DriveError::Transport(e));
                }
            }
            buffer.consume(result?);
        }
        if receiver.status() == ReceiverStatus::Complete {
            return Ok(());
        }
        let n = buffer.fill_from(reader).map_err(DriveError::Transport)?;
        if n == 0 {
            let e = receiver.cancel("the source closed the connection mid-migration", &mut out);
            let _ = writer.write_all(&out);
            return Err(e.into());
        }
    }
}
