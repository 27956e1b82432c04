//! The reference driver loop, written once: it runs a [`Source`] or a [`Destination`] over
//! any [`Link`]. The simulator's modelled link in virtual time, real connections with a real
//! clock and threads (`memferry-std`), and the tests' links with injected faults all implement
//! [`Link`]; none of them has a loop of its own, so a new strategy, channel feature or timer
//! is driven correctly everywhere as soon as the engine has it.
//!
//! A link owns the clock, the connections and their buffers. The loop:
//! 1. offers each channel a free buffer, if it has one, to the engine (`poll_transmit` writes
//!    at most its length) and hands what it wrote to [`Link::send`];
//! 2. stops when the migration is done;
//! 3. otherwise waits for one [`LinkEvent`] (bytes from the peer, bytes delivered, a closed
//!    connection), at most until the engine's next timer, and feeds it to the engine.
//!
//! Errors keep their first cause: an engine error is returned as it is; a connection that
//! fails cancels the engine and is returned beside the engine's view of it. After any failure
//! the loop gives the abort frame a moment ([`GRACE`]) to go out.

use alloc::format;
use alloc::vec::Vec;
use core::fmt;

use crate::error::{HostError, MigrationError};
use crate::memory::{DestinationGuest, PageWrite, SourceHost};
use crate::plan::{PagePlan, PlanOutcome};
use crate::receive::{Destination, DestinationStatus, PagePolicy};
use crate::report::RoundReport;
use crate::session::{ChannelId, Source, SourceStatus, Transmit};
use crate::strategy::Strategy;
use crate::time::Nanos;

/// How long the loop waits, after a failure, for the abort frame to go out and for the peer's
/// own abort (which explains more than a broken connection) to come in.
pub const GRACE: Nanos = Nanos::from_secs(1);

/// What the loop waits for.
#[derive(Debug)]
pub enum LinkEvent<E> {
    /// Bytes from the peer on `channel`, in order.
    Received {
        /// The connection they came on.
        channel: ChannelId,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// The link delivered this many of the bytes handed to [`Link::send`] (wrote them to the
    /// wire, or had them acknowledged): the engine's bandwidth comes from these.
    Delivered {
        /// Bytes delivered since the last report.
        bytes: u64,
    },
    /// A connection ended: cleanly (`error: None`, the peer closed it) or not.
    Closed {
        /// Which connection.
        channel: ChannelId,
        /// Why, if it failed.
        error: Option<E>,
    },
    /// A [`PagePlan`] handed to [`Link::send_plan`] was encoded.
    Encoded(PlanOutcome),
    /// Reading guest memory to encode a plan failed.
    HostFailed(HostError),
    /// Nothing happened before the deadline.
    Idle,
}

/// The clock and the connections of one side of a migration, as the loop sees them.
///
/// `H` is the host the engine is driven with; a link may use it while time passes (the
/// simulator runs its modelled guest), and most links ignore it.
pub trait Link<H: ?Sized> {
    /// Why a connection failed.
    type Error;

    /// The time now (monotonic).
    fn now(&mut self) -> Nanos;

    /// How many connections the migration uses (channel 0 first).
    fn channels(&self) -> u16;

    /// A buffer to fill with output for `channel`, or `None` while that channel has no room
    /// (its buffers are all in flight). The next [`Link::send`] for `channel` refers to it.
    fn buffer(&mut self, channel: ChannelId) -> Option<&mut [u8]>;

    /// Sends the first `len` bytes of the buffer [`Link::buffer`] gave for `channel`. `len` 0
    /// sends nothing and leaves the buffer free. A failure to send shows up later as a
    /// [`LinkEvent::Closed`] with an error.
    fn send(&mut self, host: &mut H, channel: ChannelId, len: usize);

    /// Waits for the next event, at most until `deadline` (`None`: as long as the link sees
    /// fit); [`LinkEvent::Idle`] if none came. A `deadline` at or before now polls without
    /// waiting.
    fn wait(&mut self, host: &mut H, deadline: Option<Nanos>) -> LinkEvent<Self::Error>;

    /// Whether bytes handed to [`Link::send`] are not yet delivered.
    fn sending(&self) -> bool;

    /// The loop is done with the bytes of a [`LinkEvent::Received`] from `channel`: a link may
    /// read into that buffer again. Default: dropped.
    fn recycle(&mut self, channel: ChannelId, bytes: Vec<u8>) {
        let _ = (channel, bytes);
    }

    /// Whether this link reads and encodes pages itself, on its own threads: the loop then
    /// asks the engine for [`PagePlan`]s ([`Source::poll_plan`]) and hands them to
    /// [`Link::send_plan`]. Default: no.
    fn encodes_pages(&self) -> bool {
        false
    }

    /// Encodes `plan` into the buffer [`Link::buffer`] gave for its channel and sends it after
    /// what came before on that channel; reports a [`LinkEvent::Encoded`] (or
    /// [`LinkEvent::HostFailed`]). Called only if [`Link::encodes_pages`]; the default drops
    /// the plan.
    fn send_plan(&mut self, host: &mut H, plan: PagePlan) {
        let _ = (host, plan);
    }
}

/// A migration driven by the loop failed.
#[derive(Debug)]
pub struct DriveFailure<E> {
    /// The engine's error (its first).
    pub error: MigrationError,
    /// The connection failure behind it, if one caused it.
    pub transport: Option<E>,
}

impl<E> From<MigrationError> for DriveFailure<E> {
    fn from(error: MigrationError) -> Self {
        DriveFailure {
            error,
            transport: None,
        }
    }
}

impl<E: fmt::Display> fmt::Display for DriveFailure<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.transport {
            None => write!(f, "{}", self.error),
            Some(t) => write!(f, "{} (transport: {t})", self.error),
        }
    }
}

/// Bytes that arrived on each channel but do not yet make a whole frame.
struct Inboxes(Vec<Vec<u8>>);

impl Inboxes {
    fn new(channels: u16) -> Self {
        Inboxes((0..channels.max(1)).map(|_| Vec::new()).collect())
    }

    /// Feeds `bytes` (after what is already waiting on `channel`) to `consume`, which returns
    /// how many it took; keeps the rest. Whole frames go straight from `bytes`, without a copy,
    /// when nothing was waiting.
    fn feed<T>(
        &mut self,
        channel: ChannelId,
        bytes: &[u8],
        consume: impl FnOnce(&[u8]) -> Result<usize, T>,
    ) -> Result<(), T> {
        let Some(inbox) = self.0.get_mut(channel as usize) else {
            // A link never reports channels it does not have; the engine refuses them anyway.
            return consume(bytes).map(|_| ());
        };
        if inbox.is_empty() {
            let used = consume(bytes)?;
            inbox.extend_from_slice(&bytes[used.min(bytes.len())..]);
        } else {
            inbox.extend_from_slice(bytes);
            let used = consume(inbox)?;
            inbox.drain(..used.min(inbox.len()));
        }
        Ok(())
    }
}

/// Runs `engine` to completion over `link`. `on_round` is called with each round as it
/// finishes (the stop-and-copy round last), on success and on failure.
///
/// On failure the abort frame is given [`GRACE`] to go out; whether the source guest was
/// resumed is in `engine.status()` (it never is once the destination may run the guest).
pub fn drive_source<S, H, L>(
    engine: &mut Source<S>,
    host: &mut H,
    link: &mut L,
    on_round: &mut dyn FnMut(&RoundReport),
) -> Result<(), DriveFailure<L::Error>>
where
    S: Strategy,
    H: SourceHost,
    L: Link<H>,
{
    let mut rounds_reported = 0;
    let mut inboxes = Inboxes::new(link.channels());
    let result = source_loop(
        engine,
        host,
        link,
        &mut inboxes,
        on_round,
        &mut rounds_reported,
    );
    report_rounds(engine, on_round, &mut rounds_reported);
    if result.is_err() {
        flush_source(engine, host, link);
    }
    result
}

fn report_rounds<S: Strategy>(
    engine: &Source<S>,
    on_round: &mut dyn FnMut(&RoundReport),
    reported: &mut usize,
) {
    let rounds = &engine.report().rounds;
    while *reported < rounds.len() {
        on_round(&rounds[*reported]);
        *reported += 1;
    }
}

fn source_loop<S, H, L>(
    engine: &mut Source<S>,
    host: &mut H,
    link: &mut L,
    inboxes: &mut Inboxes,
    on_round: &mut dyn FnMut(&RoundReport),
    rounds_reported: &mut usize,
) -> Result<(), DriveFailure<L::Error>>
where
    S: Strategy,
    H: SourceHost,
    L: Link<H>,
{
    let channels = link.channels();
    loop {
        // One buffer per channel, then a look at the events (without waiting): input such as
        // the destination's abort is seen between two buffers, not after a whole round.
        let mut progress = false;
        let plans = link.encodes_pages();
        for ch in 0..channels {
            let now = link.now();
            let Some(buf) = link.buffer(ch) else { continue };
            if plans {
                match engine.poll_plan(now, ch, buf, host)? {
                    Transmit::Plan(plan) => {
                        link.send_plan(host, plan);
                        progress = true;
                    }
                    Transmit::Bytes(n) => {
                        link.send(host, ch, n);
                        progress |= n > 0;
                    }
                }
            } else {
                let n = engine.poll_transmit(now, ch, buf, host)?;
                link.send(host, ch, n);
                progress |= n > 0;
            }
        }
        report_rounds(engine, on_round, rounds_reported);
        if engine.status() == SourceStatus::Done {
            return Ok(());
        }
        let now = link.now();
        let deadline = match engine.poll_timeout() {
            _ if progress => Some(now),
            Some(t) if t <= now => {
                engine.handle_timeout(now, host)?;
                // Work is due (hashing, a round's end, queued frames): with room, call again
                // at once (after a look at the events); with none, wait for the link, but
                // never past the engine's own deadlines (a stalled link, a silent peer).
                if (0..channels).any(|ch| link.buffer(ch).is_some()) {
                    Some(now)
                } else {
                    engine.next_deadline()
                }
            }
            other => other,
        };
        match link.wait(host, deadline) {
            LinkEvent::Idle => {
                let now = link.now();
                if engine.poll_timeout().is_some_and(|t| t <= now) {
                    engine.handle_timeout(now, host)?;
                }
            }
            LinkEvent::Delivered { bytes } => {
                let now = link.now();
                engine.on_delivered(now, bytes);
            }
            LinkEvent::Encoded(outcome) => engine.on_encoded(outcome),
            LinkEvent::HostFailed(error) => {
                let now = link.now();
                return Err(engine
                    .fail_with(now, MigrationError::Host(error), host)
                    .into());
            }
            LinkEvent::Received { channel, bytes } => {
                let now = link.now();
                let fed = inboxes.feed(channel, &bytes, |input| {
                    engine.handle_input(now, channel, input, host)
                });
                link.recycle(channel, bytes);
                fed?;
            }
            LinkEvent::Closed {
                channel,
                error: None,
            } if channel != 0 => {
                // A bulk channel closed cleanly: the destination finished, or went away (then
                // channel 0 tells, or a write fails, or a timer fires). Its replies come on
                // channel 0 and may still be on their way.
            }
            LinkEvent::Closed { channel, error } => {
                // A failed write may be the destination hanging up after it refused something:
                // its abort explains more than the broken connection, so look for it first.
                let grace = if error.is_some() && channel != 0 {
                    link.now() + GRACE
                } else {
                    link.now()
                };
                if let Err(e) = source_drain(engine, host, link, inboxes, grace) {
                    return Err(DriveFailure {
                        error: e,
                        transport: error,
                    });
                }
                if engine.status() == SourceStatus::Done {
                    return Ok(());
                }
                let why = match error {
                    Some(_) => format!("the connection of channel {channel} failed"),
                    None => format!("the destination closed channel {channel}"),
                };
                let now = link.now();
                return Err(DriveFailure {
                    error: engine.cancel(now, &why, host),
                    transport: error,
                });
            }
        }
    }
}

/// Feeds the source what the link still holds (until `deadline`, or channel 0 closes).
fn source_drain<S, H, L>(
    engine: &mut Source<S>,
    host: &mut H,
    link: &mut L,
    inboxes: &mut Inboxes,
    deadline: Nanos,
) -> Result<(), MigrationError>
where
    S: Strategy,
    H: SourceHost,
    L: Link<H>,
{
    loop {
        if engine.status() == SourceStatus::Done {
            return Ok(());
        }
        match link.wait(host, Some(deadline)) {
            LinkEvent::Received { channel, bytes } => {
                let now = link.now();
                let fed = inboxes.feed(channel, &bytes, |input| {
                    engine.handle_input(now, channel, input, host)
                });
                link.recycle(channel, bytes);
                fed?;
            }
            LinkEvent::Encoded(outcome) => engine.on_encoded(outcome),
            LinkEvent::Delivered { .. } | LinkEvent::HostFailed(_) => {}
            LinkEvent::Closed { channel: 0, .. } => return Ok(()),
            LinkEvent::Closed { .. } => {}
            LinkEvent::Idle if link.now() >= deadline => return Ok(()),
            LinkEvent::Idle => {}
        }
    }
}

/// After a failure: hands the abort frame (queued on channel 0) to the link and waits, at most
/// [`GRACE`], for it to be delivered.
fn flush_source<S, H, L>(engine: &mut Source<S>, host: &mut H, link: &mut L)
where
    S: Strategy,
    H: SourceHost,
    L: Link<H>,
{
    let deadline = link.now() + GRACE;
    loop {
        let now = link.now();
        if let Some(buf) = link.buffer(0) {
            let n = engine.poll_transmit(now, 0, buf, host).unwrap_or(0);
            link.send(host, 0, n);
            if n > 0 {
                continue;
            }
            if !link.sending() {
                return;
            }
        }
        if now >= deadline {
            return;
        }
        if let LinkEvent::Closed { channel: 0, .. } = link.wait(host, Some(deadline)) {
            return;
        }
    }
}

/// Runs `destination` until the migration completes and its last replies are delivered.
///
/// On failure the abort frame is given [`GRACE`] to go out.
pub fn drive_destination<P, H, L>(
    destination: &mut Destination<P>,
    host: &mut H,
    link: &mut L,
) -> Result<(), DriveFailure<L::Error>>
where
    P: PagePolicy,
    H: PageWrite + DestinationGuest,
    L: Link<H>,
{
    let mut inboxes = Inboxes::new(link.channels());
    let result = destination_loop(destination, host, link, &mut inboxes);
    let deadline = link.now() + GRACE;
    flush_destination(destination, host, link, deadline);
    result
}

fn destination_loop<P, H, L>(
    destination: &mut Destination<P>,
    host: &mut H,
    link: &mut L,
    inboxes: &mut Inboxes,
) -> Result<(), DriveFailure<L::Error>>
where
    P: PagePolicy,
    H: PageWrite + DestinationGuest,
    L: Link<H>,
{
    loop {
        transmit_replies(destination, host, link);
        if destination.status() == DestinationStatus::Complete {
            return Ok(());
        }
        let deadline = destination.poll_timeout();
        match link.wait(host, deadline) {
            LinkEvent::Idle => {
                let now = link.now();
                destination.handle_timeout(now)?;
            }
            LinkEvent::Delivered { .. } | LinkEvent::Encoded(_) | LinkEvent::HostFailed(_) => {}
            LinkEvent::Received { channel, bytes } => {
                let now = link.now();
                let fed = inboxes.feed(channel, &bytes, |input| {
                    destination.handle_input(now, channel, input, host)
                });
                link.recycle(channel, bytes);
                fed?;
            }
            LinkEvent::Closed { channel, error } => {
                if destination.status() == DestinationStatus::Complete {
                    return Ok(());
                }
                let why = match error {
                    Some(_) => format!("the connection of channel {channel} failed"),
                    None => format!("the source closed channel {channel} mid-migration"),
                };
                return Err(DriveFailure {
                    error: destination.cancel(&why),
                    transport: error,
                });
            }
        }
    }
}

fn transmit_replies<P, H, L>(destination: &mut Destination<P>, host: &mut H, link: &mut L)
where
    P: PagePolicy,
    L: Link<H>,
{
    while let Some(buf) = link.buffer(0) {
        let n = destination.poll_transmit(buf);
        link.send(host, 0, n);
        if n == 0 {
            return;
        }
    }
}

/// Sends what the destination still has queued (its last replies, or its abort) and waits,
/// until `deadline`, for the link to deliver it.
fn flush_destination<P, H, L>(
    destination: &mut Destination<P>,
    host: &mut H,
    link: &mut L,
    deadline: Nanos,
) where
    P: PagePolicy,
    L: Link<H>,
{
    loop {
        transmit_replies(destination, host, link);
        if (!link.sending() && destination.pending_replies() == 0) || link.now() >= deadline {
            return;
        }
        if let LinkEvent::Closed { channel: 0, .. } = link.wait(host, Some(deadline)) {
            return;
        }
    }
}
