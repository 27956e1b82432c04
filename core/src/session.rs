//! The source side of a migration: one [`Source`] session per migration, a sans-IO state
//! machine in quinn-proto's style.
//!
//! The session owns the handshake (version, features by intersection, session id, region
//! table, the destination's device-state limit), the channels, control frames, pacing, the
//! encoding of pages, timers, the switchover (commit point) and the report. Which pages go and
//! when the rounds stop is the [`Strategy`]'s business ([`crate::strategy`]).
//!
//! # Driving it
//! The caller owns sockets, threads and the clock, and bounds the output:
//! - [`Source::poll_transmit`]`(now, channel, buf, host)` writes at most `buf.len()` bytes for
//!   `channel` into `buf` and returns how many. The engine never produces output the transport
//!   has no room for. Write those bytes to that channel's connection, in order.
//! - [`Source::handle_input`]`(now, channel, bytes, host)` takes the destination's bytes and
//!   returns how many it consumed (whole frames; keep the rest).
//! - [`Source::poll_timeout`] says when to call [`Source::handle_timeout`] (the peer timeout,
//!   and when a rate-limited round may send again). A time at or before now means "call
//!   `poll_transmit` again now".
//! - [`Source::on_delivered`]`(now, bytes)` reports bytes the transport has really delivered
//!   (written to the wire, or acknowledged: for TCP, written minus what `TIOCOUTQ` says is still
//!   queued). The bandwidth the stop rules use comes from these reports, over a window of at
//!   least 100 ms; a driver that never reports falls back to timing its writes.
//!
//! A loop that serves every driver (simulator, real clock, tests):
//! ```text
//! loop {
//!     for ch in channels { while room(ch) { n = poll_transmit(now, ch, buf, host)?; if n == 0 { break } write(ch, buf[..n]) } }
//!     if status is Done or Failed { break }
//!     wait for input or until poll_timeout(); handle_input(..) / handle_timeout(..)
//! }
//! ```
//! [`Source::poll`] is that loop's body for one channel and a `Vec`, for simple drivers.
//!
//! # Failures and the commit point
//! Any error is returned by the call that met it; an abort frame for the destination is then
//! queued on channel 0 (keep calling `poll_transmit(0)` until it returns 0 to send it), and
//! every later call returns `Ok(0)` / the same error from [`Source::failure`]. Before the
//! switchover frame is handed to the transport, a failure resumes a paused guest: the source
//! loses nothing. After it (the destination may be running the guest) the source **never
//! resumes on its own**: [`Source::status`] says the guest is paused and committed, and the
//! caller decides, with [`Source::resume_source`] only once it knows the destination's copy is
//! not running. One exception is safe: an abort from the destination before its `Ready` (a
//! destination that failed never starts the guest) resumes the source as before the commit.

use alloc::boxed::Box;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use crate::bitmap::DirtyBitmap;
use crate::codec::{self, PageEncoder};
use crate::digest::MemoryDigest;
use crate::error::{HostError, MigrationError};
use crate::hashfirst::KnownContent;
use crate::memory::{sync_all, PauseProgress, SourceHost};
use crate::page::{MemoryLayout, PageIndex};
use crate::plan::{self, PagePlan, PlanOutcome};
use crate::report::{MigrationReport, RoundReport, StopReason};
use crate::schedule::DeliveryEstimator;
use crate::strategy::{Decision, PreCopy, PreCopyConfig, Strategy, StrategyContext};
use crate::time::{ByteRate, Nanos};
use crate::wire::{
    self, AbortCode, ChannelRole, ChecksumPolicy, Frame, FrameKind, Hello, PagesWriter, Verdict,
    WireError, FEATURE_APPLIED, FEATURE_CHANNELS, FEATURE_CHECKSUM, FEATURE_CONTENT,
    FEATURE_HASH_FIRST, PROTOCOL_VERSION,
};
use alloc::sync::Arc;

/// A connection of a migration: 0 carries the control frames (and pages), 1.. carry pages.
pub type ChannelId = u16;

/// Settings of the session, whatever the strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// Connections the driver opens (1 to [`wire::MAX_CHANNELS`]). Default 1.
    pub channels: u16,
    /// Offer per-frame checksums. Default on; turn off under TLS or when sending from live
    /// memory. Used only if the destination agrees.
    pub checksum: bool,
    /// Hash the source's memory after the destination starts and compare the digests.
    /// Default on.
    pub verify: bool,
    /// With `verify`: hash the paused source's memory before the switchover instead, and have
    /// the destination start only if its digest matches (slower: the hashing is inside the
    /// downtime; safe: a mismatch leaves the source to resume). Default off.
    pub verify_before_start: bool,
    /// How long to wait for the destination when waiting for it. Default 60 s.
    pub peer_timeout: Nanos,
    /// Names the migration on every connection; pick it at random per migration. Default 0.
    pub session_id: u64,
    /// Bytes hashed per `poll_transmit` call while verifying (keeps each call short).
    pub hash_batch_bytes: usize,
    /// The longest the link may deliver nothing while bytes wait to go, before the migration
    /// fails with [`MigrationError::Stalled`] (before the commit point the guest resumes).
    /// Applies only when the driver reports deliveries ([`Source::on_delivered`]). Default 10 s.
    pub stall_timeout: Nanos,
    /// Offer hash-first transfer: if the destination announces content it already holds, round
    /// 1 sends pages with that content as 16-byte hashes ([`crate::hashfirst`]). Default on
    /// (it costs nothing unless the destination holds content).
    pub hash_first: bool,
    /// The longest a pause may stay pending ([`crate::memory::SourceGuest::request_pause`]
    /// returned `Pending`) before the migration fails and the guest resumes. Default 10 s.
    pub pause_timeout: Nanos,
    /// Each page always goes on the same channel: pages are dealt in blocks of
    /// [`AFFINITY_BLOCK_PAGES`], block `b` to channel `b % channels`. A driver that encodes
    /// each channel with its own stateful encoder (XBZRLE delta, dedup, adaptive: one per
    /// channel, [`Source::poll_plan`]) needs it: each encoder then sees every version of its
    /// pages, and the destination gets them in order (a delta must not overtake its base on
    /// another connection). Default off: pages go to whichever channel has room.
    pub channel_affinity: bool,
}

/// With [`SessionConfig::channel_affinity`]: pages per block dealt to one channel (256 KiB of
/// 4 KiB pages: small enough that a hot region spreads over the channels).
pub const AFFINITY_BLOCK_PAGES: u64 = 64;

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            channels: 1,
            checksum: true,
            verify: true,
            verify_before_start: false,
            peer_timeout: Nanos::from_secs(60),
            session_id: 0,
            hash_batch_bytes: 1 << 20,
            stall_timeout: Nanos::from_secs(10),
            hash_first: true,
            pause_timeout: Nanos::from_secs(10),
            channel_affinity: false,
        }
    }
}

/// Where a source session stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceStatus {
    /// Hello sent; waiting for the destination's accept.
    Handshake,
    /// Sending pages (the guest runs, or is paused in the final round).
    Sending,
    /// Everything handed to the transport; waiting for the destination to run.
    AwaitingDestination,
    /// The destination runs; hashing and comparing digests.
    Verifying,
    /// Done: the destination runs the guest; the source stays paused and is released.
    Done,
    /// Failed. `source_paused` is true only if the failure came after the commit point: the
    /// destination may run the guest, so the source was left paused for the caller to decide.
    Failed {
        /// Whether the source guest is still paused.
        source_paused: bool,
    },
}

/// What [`Source::poll_plan`] produced.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transmit {
    /// This many control bytes were written into the buffer (0: nothing for now).
    Bytes(usize),
    /// Pages to read, encode and send on the channel, after what came before on it.
    Plan(PagePlan),
}

/// What [`Source::poll`] wants next. In every case, first write out what it appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Next {
    /// More to do now: call `poll` again.
    Continue,
    /// The round's bandwidth limit is used up: call `poll` again at or after this time.
    WaitUntil(Nanos),
    /// Waiting for the destination: feed its bytes to `receive`, then call `poll`.
    WaitForPeer,
    /// The migration is complete; `report()` is final and the source is released.
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Start,
    AwaitAccept,
    Sending,
    AwaitReady,
    Hashing { next: u64 },
    AwaitVerdict,
    Done,
    Failed,
}

#[derive(Default)]
struct ChannelTx {
    /// Control bytes waiting to go out on this channel, from `sent`.
    queue: Vec<u8>,
    sent: usize,
    /// Page entries this channel sent in the current round.
    pages_in_round: u64,
    /// With channel affinity: where this channel's walk of the round stands (the page count
    /// once it reached the end).
    cursor: u64,
}

impl ChannelTx {
    fn pending(&self) -> &[u8] {
        &self.queue[self.sent..]
    }

    fn drain_into(&mut self, buf: &mut [u8]) -> usize {
        let n = self.pending().len().min(buf.len());
        buf[..n].copy_from_slice(&self.queue[self.sent..self.sent + n]);
        self.sent += n;
        if self.sent == self.queue.len() {
            self.queue.clear();
            self.sent = 0;
        }
        n
    }
}

/// The source side of one migration, with strategy `S` (pre-copy by default).
pub struct Source<S: Strategy = PreCopy> {
    layout: MemoryLayout,
    config: SessionConfig,
    strategy: S,
    state: State,
    /// Pages the current round sends; `cursor` is where the walk stands.
    send: DirtyBitmap,
    cursor: u64,
    /// Every page of the round is handed out; the round ends at the next call (so its
    /// duration covers the write of its last batch).
    exhausted: bool,
    round: u32,
    round_start: Nanos,
    round_report: RoundReport,
    stop_and_copy: bool,
    channels: Vec<ChannelTx>,
    checksum: bool,
    max_device_state: u64,
    estimator: DeliveryEstimator,
    /// The destination reports what it has taken in (`FEATURE_APPLIED`): that, not the
    /// driver's delivery reports, measures the link.
    applied_reports: bool,
    /// When the link last made progress (delivered bytes, or got bytes while it had none).
    link_progress: Nanos,
    /// The strategy chose stop-and-copy: the guest pauses once the link has delivered what
    /// it holds (bytes in socket buffers would otherwise go out inside the downtime).
    draining: Option<StopReason>,
    /// Stop-and-copy waits for the guest's vCPUs to park: why it stops, and when the pause
    /// was asked for.
    pausing: Option<(StopReason, Nanos)>,
    start: Nanos,
    paused: bool,
    paused_at: Nanos,
    ready_at: Nanos,
    /// The switchover frame is queued on channel 0 (committed once it is handed out).
    switchover_queued: bool,
    /// Where in channel 0's queue the device state and switchover begin.
    switchover_from: usize,
    /// The room [`Source::poll`] offers.
    poll_room: usize,
    /// The destination said Ready: the downtime is measured and final.
    ready_seen: bool,
    /// Post-copy: the switchover went before the final round's pages.
    post_copy: bool,
    /// Post-copy: an urgent page taken from the strategy that did not fit the last buffer.
    pending_urgent: Option<u64>,
    last_heard: Nanos,
    last_now: Nanos,
    rate_wake: Option<Nanos>,
    digest: MemoryDigest,
    hash_started: Nanos,
    encoder: Option<Box<dyn PageEncoder>>,
    /// Dirty logging was started and not yet stopped.
    logging: bool,
    /// Hash-first: the content the destination announced (round 1 sends it as hashes).
    known: Option<Arc<KnownContent>>,
    /// Hash-first: the destination accepted (version, features, largest device state) and is
    /// announcing its content; round 1 starts after its last `Have`.
    announced: Option<(KnownContent, u16, u64, u64)>,
    scratch: Vec<u8>,
    report: MigrationReport,
    failure: Option<MigrationError>,
    resume_error: Option<HostError>,
}

impl Source<PreCopy> {
    /// A pre-copy migration of a guest of `layout`, configured as milestone 1's engine was:
    /// one channel, checksums and verification per `config.verify`.
    pub fn pre_copy(layout: MemoryLayout, config: PreCopyConfig) -> Self {
        let mut source = Source::new(
            layout,
            SessionConfig {
                verify: config.verify,
                verify_before_start: config.verify_before_start,
                ..SessionConfig::default()
            },
            PreCopy::new(config),
        );
        source.poll_room = config.batch_bytes.max(1);
        source
    }
}

impl<S: Strategy> Source<S> {
    /// Turns [`SessionConfig::channel_affinity`] on or off. Only before the first round (a
    /// driver that finds its per-channel encoders keep state, [`PageEncoder::keeps_state`],
    /// calls it before it starts); later calls are ignored. Returns whether it is now on.
    pub fn set_channel_affinity(&mut self, on: bool) -> bool {
        if self.round == 0 {
            self.config.channel_affinity = on;
        }
        self.config.channel_affinity
    }

    /// A migration of a guest of `layout`, run by `strategy`.
    pub fn new(layout: MemoryLayout, config: SessionConfig, strategy: S) -> Self {
        let pages = layout.page_count();
        let channels = config.channels.clamp(1, wire::MAX_CHANNELS);
        let report = MigrationReport {
            strategy: strategy.name(),
            page_size: layout.page_size().bytes() as u64,
            page_count: pages,
            channels,
            ..MigrationReport::default()
        };
        Source {
            config: SessionConfig { channels, ..config },
            strategy,
            state: State::Start,
            send: DirtyBitmap::new(pages),
            cursor: 0,
            exhausted: false,
            round: 0,
            round_start: Nanos::ZERO,
            round_report: RoundReport::default(),
            stop_and_copy: false,
            channels: (0..channels).map(|_| ChannelTx::default()).collect(),
            checksum: true,
            max_device_state: u64::MAX,
            estimator: DeliveryEstimator::new(),
            link_progress: Nanos::ZERO,
            applied_reports: false,
            draining: None,
            pausing: None,
            start: Nanos::ZERO,
            paused: false,
            paused_at: Nanos::ZERO,
            ready_at: Nanos::ZERO,
            switchover_queued: false,
            switchover_from: 0,
            poll_room: 1 << 20,
            ready_seen: false,
            post_copy: false,
            pending_urgent: None,
            last_heard: Nanos::ZERO,
            last_now: Nanos::ZERO,
            rate_wake: None,
            digest: MemoryDigest::new(),
            hash_started: Nanos::ZERO,
            encoder: None,
            known: None,
            announced: None,
            logging: false,
            scratch: vec![0; layout.page_size().bytes()],
            report,
            failure: None,
            resume_error: None,
            layout,
        }
    }

    /// Encodes pages with `encoder` (after the zero check) instead of sending them raw. The
    /// destination must have a decoder for every encoding it produces. This one encoder serves
    /// every channel that [`Source::poll_transmit`] fills. An encoder that keeps state
    /// ([`PageEncoder::keeps_state`]) must not serve several channels this way (a delta or a
    /// reference could overtake, on another connection, what it builds on): give it one
    /// channel, or give each channel its own encoder ([`Source::poll_plan`]) with
    /// [`SessionConfig::channel_affinity`].
    pub fn with_encoder(mut self, encoder: Box<dyn PageEncoder>) -> Self {
        self.set_encoder(encoder);
        self
    }

    /// [`Source::with_encoder`] on a source already built (before the migration starts).
    pub fn set_encoder(&mut self, encoder: Box<dyn PageEncoder>) {
        self.encoder = Some(encoder);
    }

    /// The layout being migrated.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The strategy, for inspection.
    pub fn strategy(&self) -> &S {
        &self.strategy
    }

    /// The report so far (final once the status is `Done` or `Failed`).
    pub fn report(&self) -> &MigrationReport {
        &self.report
    }

    /// The round in progress (0 before round 1).
    pub fn round(&self) -> u32 {
        self.round
    }

    /// Whether the guest is paused by this migration right now.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Whether the migration has finished (successfully or not).
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Done | State::Failed)
    }

    /// The first error the migration met, if it failed.
    pub fn failure(&self) -> Option<&MigrationError> {
        self.failure.as_ref()
    }

    /// If resuming the source guest after a failure itself failed: why.
    pub fn resume_error(&self) -> Option<&HostError> {
        self.resume_error.as_ref()
    }

    /// Whether the destination said it runs the guest (its `Ready` arrived).
    pub fn destination_started(&self) -> bool {
        self.ready_seen
    }

    /// Whether the destination may be running the guest (the switchover was handed out).
    pub fn is_committed(&self) -> bool {
        self.report.committed
    }

    /// Where the migration stands.
    pub fn status(&self) -> SourceStatus {
        match self.state {
            State::Start | State::AwaitAccept => SourceStatus::Handshake,
            State::Sending => SourceStatus::Sending,
            State::AwaitReady => SourceStatus::AwaitingDestination,
            State::Hashing { .. } | State::AwaitVerdict => SourceStatus::Verifying,
            State::Done => SourceStatus::Done,
            State::Failed => SourceStatus::Failed {
                source_paused: self.paused,
            },
        }
    }

    /// Resumes the source guest after a failure past the commit point. Safe only when the
    /// caller knows the destination's copy does not run and never will (it reported failure
    /// before starting, or its process is gone for good); otherwise two copies of the guest run.
    /// Does nothing if the guest is not paused.
    pub fn resume_source<H: SourceHost>(&mut self, host: &mut H) -> Result<(), HostError> {
        if self.paused && self.state == State::Failed {
            host.resume()?;
            self.paused = false;
        }
        Ok(())
    }

    /// Bytes the transport reports delivered since the last report (see the module docs).
    pub fn on_delivered(&mut self, now: Nanos, bytes: u64) {
        self.last_now = self.last_now.max(now);
        if self.applied_reports {
            // The destination's own reports measure the link end to end (its read queue and
            // the socket buffers on both sides included).
            return;
        }
        self.estimator.delivered(now, bytes);
        if bytes > 0 {
            self.link_progress = now;
        }
    }

    /// The destination has taken in `total` bytes of everything this side handed out.
    fn on_applied(&mut self, now: Nanos, total: u64) {
        let before = self.estimator.backlog();
        self.estimator.delivered_up_to(now, total);
        if self.estimator.backlog() < before {
            self.link_progress = now;
        }
    }

    /// When the link counts as stalled, if bytes wait and the driver reports deliveries.
    fn stall_deadline(&self) -> Option<Nanos> {
        (self.estimator.has_reports() && self.estimator.backlog() > 0)
            .then(|| self.link_progress + self.config.stall_timeout)
    }

    /// The link's rate as measured from delivery reports.
    pub fn link_rate(&self) -> Option<ByteRate> {
        self.estimator.rate()
    }

    /// When to call [`Source::handle_timeout`] (or `poll_transmit`, if the time has come).
    /// `None`: nothing is due until input arrives or the caller offers room.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        if self.channels.iter().any(|c| !c.pending().is_empty()) {
            // Frames are queued (perhaps by a call for another channel): send them now.
            return Some(self.last_now);
        }
        let state = match self.state {
            State::Start | State::Hashing { .. } => Some(self.last_now),
            State::AwaitAccept | State::AwaitReady | State::AwaitVerdict => {
                Some(self.last_heard + self.config.peer_timeout)
            }
            State::Sending if self.pausing.is_some() => {
                Some(self.last_now + crate::memory::PAUSE_POLL_INTERVAL)
            }
            State::Sending if self.exhausted => Some(self.last_now),
            State::Sending if self.draining.is_some() && self.estimator.backlog() == 0 => {
                Some(self.last_now)
            }
            State::Sending if self.draining.is_some() => None,
            State::Sending => self.rate_wake,
            State::Done | State::Failed => return None,
        };
        match (state, self.stall_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The engine's deadlines alone (a stalled link, a silent destination), leaving out work
    /// that is due: what a driver that has no room to offer waits for at most.
    pub fn next_deadline(&self) -> Option<Nanos> {
        let peer = match self.state {
            State::AwaitAccept | State::AwaitReady | State::AwaitVerdict => {
                Some(self.last_heard + self.config.peer_timeout)
            }
            _ => None,
        };
        match (peer, self.stall_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Handles the timers due at `now`: gives up on a silent destination.
    pub fn handle_timeout<H: SourceHost>(
        &mut self,
        now: Nanos,
        host: &mut H,
    ) -> Result<(), MigrationError> {
        self.last_now = self.last_now.max(now);
        if matches!(self.state, State::Done | State::Failed) {
            return Ok(());
        }
        if let Some(deadline) = self.stall_deadline() {
            if now >= deadline {
                let error = MigrationError::Stalled {
                    after: now - self.link_progress,
                    undelivered: self.estimator.backlog(),
                };
                return self.fail(now, error, host);
            }
        }
        if self.pausing.is_some() {
            return match self.poll_pending_pause(now, host) {
                Ok(()) => Ok(()),
                Err(e) => self.fail(now, e, host),
            };
        }
        let waiting_for = match self.state {
            State::AwaitAccept => "its accept",
            State::AwaitReady => "it to run the guest",
            State::AwaitVerdict => "its verdict on the digest",
            _ => return Ok(()),
        };
        if now >= self.last_heard + self.config.peer_timeout {
            let error = MigrationError::Timeout {
                waiting_for,
                after: now - self.last_heard,
            };
            return self.fail(now, error, host);
        }
        Ok(())
    }

    /// Writes at most `buf.len()` bytes of output for `channel` into `buf`; returns how many.
    /// Also advances the migration (ends rounds, verifies). See the module docs.
    pub fn poll_transmit<H: SourceHost>(
        &mut self,
        now: Nanos,
        channel: ChannelId,
        buf: &mut [u8],
        host: &mut H,
    ) -> Result<usize, MigrationError> {
        let ch = channel as usize;
        if let Some(done) = self.begin_output(now, ch, buf, host)? {
            return Ok(done);
        }
        let mut n = self.channels[ch].drain_into(buf);
        if self.post_copy
            && ch == 0
            && n > 0
            && self.switchover_queued
            && !self.report.committed
            && self.channels[ch].pending().is_empty()
        {
            // Post-copy: the switchover goes out in its own write, not behind a buffer of
            // pages: the destination starts as soon as it arrives.
            self.account(now, n);
            return Ok(n);
        }
        if n < buf.len()
            && self.state == State::Sending
            && !self.exhausted
            && self.draining.is_none()
            && self.pausing.is_none()
            && self.channels[ch].pending().is_empty()
        {
            match self.send_pages(now, ch, &mut buf[n..], host) {
                Ok(m) => n += m,
                Err(e) => {
                    self.account(now, n);
                    return self.fail(now, e, host);
                }
            }
            if self.exhausted {
                // The round's RoundEnd (and, after the final round, the state and switchover)
                // may fit behind the pages.
                n += self.channels[ch].drain_into(&mut buf[n..]);
            }
        }
        self.account(now, n);
        Ok(n)
    }

    /// What every output call does first: `Some(bytes)` when the call is over (an unknown
    /// channel, or after a failure only the queued abort drains), else advances the migration.
    fn begin_output<H: SourceHost>(
        &mut self,
        now: Nanos,
        ch: usize,
        buf: &mut [u8],
        host: &mut H,
    ) -> Result<Option<usize>, MigrationError> {
        self.last_now = self.last_now.max(now);
        if ch >= self.channels.len() {
            return Ok(Some(0));
        }
        if self.failure.is_some() {
            let n = self.channels[ch].drain_into(buf);
            self.account(now, n);
            return Ok(Some(n));
        }
        if let Err(e) = self.advance(now, host) {
            return self.fail(now, e, host);
        }
        Ok(None)
    }

    fn account(&mut self, now: Nanos, n: usize) {
        if n == 0 {
            return;
        }
        self.report.bytes_sent += n as u64;
        if self.estimator.backlog() == 0 {
            self.link_progress = now;
        }
        self.estimator.handed(now, n as u64);
        if self.switchover_queued && self.channels[0].pending().is_empty() && !self.report.committed
        {
            self.report.committed = true;
        }
    }

    /// [`Source::poll_transmit`] for drivers that read and encode pages on their own threads:
    /// control bytes for `channel` come as [`Transmit::Bytes`] written into `buf`; pages come
    /// as a [`PagePlan`] that fits `buf.len()` bytes, which the caller encodes with
    /// [`PagePlan::encode`] (anywhere, any time, in order with this channel's other output)
    /// and whose [`PlanOutcome`] it returns with [`Source::on_encoded`].
    pub fn poll_plan<H: SourceHost>(
        &mut self,
        now: Nanos,
        channel: ChannelId,
        buf: &mut [u8],
        host: &mut H,
    ) -> Result<Transmit, MigrationError> {
        let ch = channel as usize;
        if let Some(done) = self.begin_output(now, ch, buf, host)? {
            return Ok(Transmit::Bytes(done));
        }
        let n = self.channels[ch].drain_into(buf);
        if n > 0 {
            self.account(now, n);
            return Ok(Transmit::Bytes(n));
        }
        if self.state != State::Sending
            || self.exhausted
            || self.draining.is_some()
            || self.pausing.is_some()
        {
            return Ok(Transmit::Bytes(0));
        }
        match self.plan_pages(now, ch, buf.len(), host) {
            Ok(Some(plan)) => {
                self.account(now, plan.planned_bytes);
                Ok(Transmit::Plan(plan))
            }
            Ok(None) => {
                // The walk may have ended: its markers are queued.
                let n = self.channels[ch].drain_into(buf);
                self.account(now, n);
                Ok(Transmit::Bytes(n))
            }
            Err(e) => self.fail(now, e, host),
        }
    }

    /// What encoding a [`PagePlan`] produced: the report and the link measure count the bytes
    /// it really took and its zero pages.
    pub fn on_encoded(&mut self, outcome: PlanOutcome) {
        self.report.encodings.merge(&outcome.encodings);
        let saved = outcome.planned_bytes.saturating_sub(outcome.bytes) as u64;
        self.report.bytes_sent = self.report.bytes_sent.saturating_sub(saved);
        self.estimator.unhand(saved);
        let open = self.round_report.round == outcome.generation && !self.round_closed();
        let round = if open {
            Some(&mut self.round_report)
        } else {
            self.report
                .rounds
                .iter_mut()
                .find(|r| r.round == outcome.generation)
        };
        if let Some(r) = round {
            r.bytes = r.bytes.saturating_sub(saved);
            r.zero_pages += outcome.zero_pages;
            if !open {
                self.report.zero_pages_sent += outcome.zero_pages;
            }
        }
    }

    /// Takes bytes from the destination that arrived on `channel`. Returns how many were
    /// consumed (whole frames only: keep the rest and pass it again with more).
    pub fn handle_input<H: SourceHost>(
        &mut self,
        now: Nanos,
        channel: ChannelId,
        input: &[u8],
        host: &mut H,
    ) -> Result<usize, MigrationError> {
        let _ = channel;
        self.last_now = self.last_now.max(now);
        if let Some(e) = &self.failure {
            return Err(e.clone());
        }
        if self.state == State::Done {
            // The migration is over: nothing the destination says can change it now.
            return Ok(input.len());
        }
        let mut used = 0;
        while used < input.len() {
            // After the accept (hash-first: while the destination announces its content) the
            // negotiated checksum setting applies.
            let policy = ChecksumPolicy::after_handshake(
                self.state != State::AwaitAccept || self.announced.is_some(),
                self.checksum,
            );
            let (frame, len) = match Frame::parse_with(&input[used..], policy) {
                Ok(parsed) => parsed,
                Err(WireError::Incomplete { .. }) => break,
                Err(e) => return self.fail(now, e.into(), host),
            };
            used += len;
            self.last_heard = now;
            self.report.bytes_received += len as u64;
            if let Err(e) = self.on_frame(now, frame, host) {
                return self.fail(now, e, host);
            }
            if self.state == State::Done {
                self.stop_logging(host);
                return Ok(input.len());
            }
        }
        Ok(used)
    }

    /// Dirty logging ends with the migration, whatever the outcome.
    fn stop_logging<H: SourceHost>(&mut self, host: &mut H) {
        if core::mem::take(&mut self.logging) {
            host.stop_logging();
        }
    }

    /// Ends the pre-copy rounds at the end of the current one and switches over, whatever the
    /// stop rules say (an operator's "switchover now"). The final round then sends what is
    /// left with the guest paused.
    pub fn switchover_now(&mut self) {
        self.strategy.switchover_now();
    }

    /// The strategy, to change its settings mid-migration (for pre-copy:
    /// [`crate::strategy::PreCopy::set_downtime_target`], [`crate::strategy::PreCopy::set_rate`]).
    pub fn strategy_mut(&mut self) -> &mut S {
        &mut self.strategy
    }

    /// Fails the migration with `error` (a driver's own failure, such as a worker thread's
    /// failed read); as any failure: before the commit point the guest resumes, and an abort
    /// frame is queued on channel 0. Returns the first error (an earlier one if there was).
    pub fn fail_with<H: SourceHost>(
        &mut self,
        now: Nanos,
        error: MigrationError,
        host: &mut H,
    ) -> MigrationError {
        match self.fail::<(), H>(now, error, host) {
            Err(e) => e,
            Ok(()) => unreachable!("fail always returns an error"),
        }
    }

    /// Cancels the migration (an operator's request, or a transport that closed). Before the
    /// commit point the guest resumes; an abort frame is queued on channel 0.
    pub fn cancel<H: SourceHost>(&mut self, now: Nanos, why: &str, host: &mut H) -> MigrationError {
        match self.fail::<(), H>(now, MigrationError::Cancelled(why.to_string()), host) {
            Err(e) => e,
            Ok(()) => unreachable!("fail always returns an error"),
        }
    }

    /// One step for a single-channel driver that writes everything it is given: offers
    /// `batch_bytes` (1 MiB by default) of room on channel 0, appends what comes to `out`, and
    /// says what to wait for. On error an abort frame is appended too.
    pub fn poll<H: SourceHost>(
        &mut self,
        now: Nanos,
        host: &mut H,
        out: &mut Vec<u8>,
    ) -> Result<Next, MigrationError> {
        self.poll_with_room(now, host, out, self.poll_room)
    }

    /// [`Source::poll`] with an explicit room.
    pub fn poll_with_room<H: SourceHost>(
        &mut self,
        now: Nanos,
        host: &mut H,
        out: &mut Vec<u8>,
        room: usize,
    ) -> Result<Next, MigrationError> {
        let at = out.len();
        out.resize(at + room.max(wire::page_frame_len(self.scratch.len())), 0);
        let result = self.poll_transmit(now, 0, &mut out[at..], host);
        match result {
            Ok(n) => out.truncate(at + n),
            Err(e) => {
                out.truncate(at);
                self.drain_channel(0, out);
                return Err(e);
            }
        }
        if let Some(e) = &self.failure {
            return Err(e.clone());
        }
        if !self.channels[0].pending().is_empty() {
            // Output that did not fit the room is still queued (a device state larger than
            // the room, say): the caller must poll again before waiting for the peer.
            return Ok(Next::Continue);
        }
        Ok(match self.state {
            State::Done => Next::Done,
            State::AwaitAccept | State::AwaitReady | State::AwaitVerdict => Next::WaitForPeer,
            State::Sending if out.len() == at && !self.exhausted => match self.rate_wake {
                Some(t) => Next::WaitUntil(t.max(now + Nanos(1))),
                None => Next::Continue,
            },
            _ => Next::Continue,
        })
    }

    /// For single-channel drivers: takes the destination's bytes; on error the abort frame is
    /// appended to `out`.
    pub fn receive<H: SourceHost>(
        &mut self,
        now: Nanos,
        input: &[u8],
        host: &mut H,
        out: &mut Vec<u8>,
    ) -> Result<usize, MigrationError> {
        let result = self.handle_input(now, 0, input, host);
        if result.is_err() {
            self.drain_channel(0, out);
        }
        result
    }

    /// Appends everything queued on `channel` to `out` (abort frames after a failure).
    pub fn drain_channel(&mut self, channel: ChannelId, out: &mut Vec<u8>) {
        if let Some(tx) = self.channels.get_mut(channel as usize) {
            let pending = tx.pending().len();
            let at = out.len();
            out.resize(at + pending, 0);
            let n = tx.drain_into(&mut out[at..]);
            self.account(self.last_now, n);
        }
    }

    fn fail<T, H: SourceHost>(
        &mut self,
        now: Nanos,
        error: MigrationError,
        host: &mut H,
    ) -> Result<T, MigrationError> {
        if let Some(first) = &self.failure {
            return Err(first.clone());
        }
        self.stop_logging(host);
        self.report.throttle_percent = self.strategy.throttle_percent();
        if !self.paused && self.report.throttle_percent > 0 {
            // The guest runs on here: at full speed again.
            let _ = host.throttle(0);
        }
        if self.paused {
            if !self.ready_seen {
                self.report.downtime = now - self.paused_at;
            }
            // Before the commit point the source loses nothing by resuming; after it, the
            // destination may run the guest, and resuming here would run it twice. Except:
            // a destination that aborts before it said Ready has refused for good (a failed
            // destination never starts), so its abort proves the guest runs nowhere else.
            let destination_refused = !self.ready_seen
                && matches!(&error, MigrationError::PeerAborted { code, .. }
                    if *code != AbortCode::GuestStarted);
            if !self.report.committed || destination_refused {
                if self.strategy.throttle_percent() > 0 {
                    // The guest runs on here: at full speed again.
                    let _ = host.throttle(0);
                }
                match host.resume() {
                    Ok(()) => self.paused = false,
                    Err(e) => self.resume_error = Some(e),
                }
            }
        }
        if self.start != Nanos::ZERO || self.round > 0 {
            self.report.total_time = now - self.start;
        }
        if self.round_report.round == self.round && self.round > 0 && !self.round_closed() {
            self.round_report.duration = now - self.round_start;
            self.report.rounds.push(self.round_report.clone());
        }
        if self.switchover_queued && !self.report.committed {
            // Never let the switchover go out behind a failure: the source guest runs again.
            // A frame cut short reaches the destination as a bad frame before the abort.
            let tx = &mut self.channels[0];
            let cut = self.switchover_from.max(tx.sent);
            tx.queue.truncate(cut);
            if tx.sent == tx.queue.len() {
                tx.queue.clear();
                tx.sent = 0;
            }
            self.switchover_queued = false;
        }
        let mut abort = Vec::new();
        error.emit_abort(&mut abort);
        self.report.control_bytes += abort.len() as u64;
        self.channels[0].queue.extend_from_slice(&abort);
        self.state = State::Failed;
        self.failure = Some(error.clone());
        Err(error)
    }

    fn round_closed(&self) -> bool {
        self.report
            .rounds
            .last()
            .is_some_and(|r| r.round == self.round)
    }

    fn queue(&mut self, channel: usize, frame: Frame<'_>) {
        let n = frame.emit_with(&mut self.channels[channel].queue, self.checksum);
        self.report.control_bytes += n as u64;
    }

    fn on_frame<H: SourceHost>(
        &mut self,
        now: Nanos,
        frame: Frame<'_>,
        host: &mut H,
    ) -> Result<(), MigrationError> {
        match frame {
            Frame::Abort { code, message } => {
                return Err(MigrationError::PeerAborted {
                    code,
                    message: String::from_utf8_lossy(message).into_owned(),
                })
            }
            Frame::Ignored { .. } => return Ok(()),
            Frame::PageRequest(pages) => return self.strategy.on_page_request(now, pages),
            Frame::Applied { bytes } if self.applied_reports => {
                self.on_applied(now, bytes);
                return Ok(());
            }
            // A destination's Ready or verdict means it took in everything before.
            Frame::Ready | Frame::Verified { .. } if self.applied_reports => {
                self.on_applied(now, self.estimator.handed_total());
            }
            _ => {}
        }
        if frame == Frame::Ready && !self.report.committed {
            // The switchover has not been handed out whole: no honest destination runs yet.
            return Err(MigrationError::UnexpectedFrame {
                expected: "nothing before the switchover is sent",
                got: FrameKind::Ready,
            });
        }
        if self.state == State::Sending && self.stop_and_copy && frame == Frame::Ready {
            if self.post_copy {
                // Post-copy: the destination runs while the final round's pages follow.
                if self.ready_seen {
                    return Err(MigrationError::UnexpectedFrame {
                        expected: "one Ready",
                        got: FrameKind::Ready,
                    });
                }
                self.on_ready(now);
                return Ok(());
            }
            if self.exhausted {
                // The destination answered before the driver polled again.
                self.close_final_round(now);
            }
        }
        match (self.state, frame) {
            (
                State::AwaitAccept,
                Frame::Accept {
                    version,
                    features,
                    max_device_state,
                },
            ) if self.announced.is_none() => {
                if features & FEATURE_HASH_FIRST != 0
                    && self.offered_features() & FEATURE_HASH_FIRST != 0
                {
                    // The destination announces its content first; round 1 waits for it.
                    self.checksum = features & FEATURE_CHECKSUM != 0;
                    let limit = (self.layout.page_count() as usize)
                        .saturating_mul(4)
                        .max(1 << 16);
                    let known = KnownContent::new(self.config.session_id, limit);
                    self.announced = Some((known, version, features, max_device_state));
                    return Ok(());
                }
                self.on_accept(now, version, features, max_device_state, host)
            }
            (State::AwaitAccept, Frame::Have(hashes)) if self.announced.is_some() => {
                if !hashes.is_empty() {
                    let (known, ..) = self.announced.as_mut().expect("announcing");
                    return known.extend(hashes.iter()).map_err(|why| {
                        MigrationError::Incompatible(alloc::format!("hash-first: {why}"))
                    });
                }
                let (known, version, features, max_device_state) =
                    self.announced.take().expect("announcing");
                self.report.known_pages_announced = known.len() as u64;
                if !known.is_empty() {
                    self.known = Some(Arc::new(known));
                }
                self.on_accept(now, version, features, max_device_state, host)
            }
            (State::AwaitReady, Frame::Ready) => {
                if self.checks_before_start() && self.report.verified.is_none() {
                    return Err(MigrationError::UnexpectedFrame {
                        expected: "Verified before Ready (verification before start)",
                        got: FrameKind::Ready,
                    });
                }
                self.on_ready(now);
                self.after_ready(now);
                Ok(())
            }
            (State::AwaitReady, Frame::Verified { verdict, digest })
                if self.checks_before_start() && self.report.verified.is_none() =>
            {
                // The destination checked before it starts; the source compares itself.
                let ours = self.digest.value();
                self.report.destination_digest = Some(digest);
                let matches = digest == ours && verdict == Verdict::Match;
                self.report.verified = Some(matches);
                if !matches {
                    return Err(MigrationError::DigestMismatch {
                        source: ours,
                        destination: digest,
                    });
                }
                Ok(())
            }
            (State::AwaitVerdict, Frame::Verified { verdict, digest }) => {
                let ours = self.digest.value();
                if verdict == Verdict::NotChecked {
                    self.report.verified = None;
                    self.finish(now);
                    return Ok(());
                }
                self.report.destination_digest = Some(digest);
                // The source compares the digests itself: a verdict is never trusted.
                let matches = digest == ours;
                self.report.verified = Some(matches && verdict == Verdict::Match);
                if !matches || verdict != Verdict::Match {
                    return Err(MigrationError::DigestMismatch {
                        source: ours,
                        destination: digest,
                    });
                }
                self.finish(now);
                Ok(())
            }
            (state, frame) => Err(MigrationError::UnexpectedFrame {
                expected: match state {
                    State::AwaitAccept => "Accept",
                    State::AwaitReady => "Ready",
                    State::AwaitVerdict => "Verified",
                    _ => "nothing from the destination at this point",
                },
                got: frame.kind().unwrap_or(FrameKind::Abort),
            }),
        }
    }

    fn on_accept<H: SourceHost>(
        &mut self,
        now: Nanos,
        version: u16,
        features: u64,
        max_device_state: u64,
        host: &mut H,
    ) -> Result<(), MigrationError> {
        let offered = self.offered_features();
        if version != PROTOCOL_VERSION || features & !offered != 0 {
            return Err(MigrationError::Incompatible(alloc::format!(
                "destination accepted with version {version} and features {features:#x}; this source speaks version {PROTOCOL_VERSION} and offered {offered:#x}"
            )));
        }
        if self.channels.len() > 1 && features & FEATURE_CHANNELS == 0 {
            return Err(MigrationError::Incompatible(alloc::format!(
                "the destination takes one connection; this source opened {}",
                self.channels.len()
            )));
        }
        self.checksum = features & FEATURE_CHECKSUM != 0;
        self.applied_reports = features & FEATURE_APPLIED != 0;
        self.max_device_state = max_device_state;
        self.check_state_hint(host)?;
        host.start_logging(&self.layout)?;
        self.logging = true;
        self.send.clear();
        let mut round = RoundReport::default();
        let mut cx =
            StrategyContext::new(&self.layout, &mut self.send, &mut round, now - self.start);
        self.strategy.start(now, &mut cx)?;
        self.begin_round(now);
        self.state = State::Sending;
        Ok(())
    }

    fn check_state_hint<H: SourceHost>(&mut self, host: &mut H) -> Result<(), MigrationError> {
        if let Some(size) = host.device_state_size_hint() {
            if size > self.max_device_state {
                return Err(MigrationError::Incompatible(alloc::format!(
                    "the device state ({size} bytes) exceeds the destination's limit of {} bytes",
                    self.max_device_state
                )));
            }
        }
        Ok(())
    }

    fn offered_features(&self) -> u64 {
        let mut f = FEATURE_APPLIED;
        if self.config.checksum {
            f |= FEATURE_CHECKSUM;
        }
        if self.channels.len() > 1 {
            f |= FEATURE_CHANNELS;
        }
        if self.encoder.is_some() {
            f |= FEATURE_CONTENT;
        }
        if self.config.hash_first {
            f |= FEATURE_HASH_FIRST;
        }
        f
    }

    fn finish(&mut self, now: Nanos) {
        self.report.resume_time = now - self.ready_at;
        self.report.total_time = now - self.start;
        // The source is released: it stays paused for good, and is no longer ours to resume.
        self.paused = false;
        self.state = State::Done;
    }

    fn begin_round(&mut self, now: Nanos) {
        self.round += 1;
        self.round_start = now;
        self.cursor = 0;
        self.exhausted = false;
        self.rate_wake = None;
        for ch in &mut self.channels {
            ch.pages_in_round = 0;
            ch.cursor = 0;
        }
        if let Some(encoder) = self.encoder.as_mut() {
            encoder.begin_generation(self.round);
        }
        self.round_report = RoundReport {
            round: self.round,
            stop_and_copy: self.stop_and_copy,
            start: now - self.start,
            rate_limit: if self.stop_and_copy {
                self.strategy.final_rate_limit()
            } else {
                self.strategy.rate_limit()
            },
            held_back: if self.stop_and_copy {
                0
            } else {
                self.strategy.held_back()
            },
            ..RoundReport::default()
        };
    }

    fn close_final_round(&mut self, now: Nanos) {
        self.round_report.duration = now - self.round_start;
        self.round_report.bandwidth =
            ByteRate::measured(self.round_report.bytes, self.round_report.duration);
        self.report.pages_sent += self.round_report.pages;
        self.report.zero_pages_sent += self.round_report.zero_pages;
        self.report.rounds.push(self.round_report.clone());
        self.exhausted = false;
        // The wait for the destination starts now, not at its last word.
        self.last_heard = now;
        self.state = State::AwaitReady;
        if self.ready_seen {
            // Post-copy: the destination has run since the switchover.
            self.after_ready(now);
        }
    }

    /// The destination runs the guest: the downtime is over.
    fn on_ready(&mut self, now: Nanos) {
        self.ready_at = now;
        self.ready_seen = true;
        self.report.downtime = now - self.paused_at;
    }

    /// Everything is sent and the destination runs: verify, or finish.
    fn after_ready(&mut self, now: Nanos) {
        if self.config.verify && !self.checks_before_start() {
            self.hash_started = now;
            self.state = State::Hashing { next: 0 };
        } else {
            self.finish(now);
        }
    }

    fn advance<H: SourceHost>(&mut self, now: Nanos, host: &mut H) -> Result<(), MigrationError> {
        match self.state {
            State::Start => {
                self.start = now;
                self.last_heard = now;
                // Starts dirty logging afresh: round 1 sends everything anyway.
                sync_all(&self.layout, host, &mut self.send)?;
                self.send.clear();
                let mut table = Vec::new();
                let regions = wire::region_table(self.layout.regions(), &mut table);
                let hello = Hello {
                    version: PROTOCOL_VERSION,
                    page_shift: self.layout.page_size().shift() as u8,
                    channels: self.channels.len() as u16,
                    session_id: self.config.session_id,
                    features: self.offered_features(),
                    regions,
                };
                self.queue(0, Frame::Hello(hello));
                // Each extra connection opens with its Join, so a listener can order the
                // connections before it answers the hello. The destination must see channel
                // 0's hello before another channel's bytes.
                for ch in 1..self.channels.len() {
                    self.queue(
                        ch,
                        Frame::Join {
                            channel: ch as u16,
                            session_id: self.config.session_id,
                            role: ChannelRole::Bulk,
                        },
                    );
                }
                self.state = State::AwaitAccept;
            }
            State::Sending if self.pausing.is_some() => self.poll_pending_pause(now, host)?,
            State::Sending if self.draining.is_some() && self.estimator.backlog() == 0 => {
                let reason = self.draining.take().expect("draining");
                self.enter_stop_and_copy(now, reason, host)?;
            }
            State::Sending if self.draining.is_some() => {}
            State::Sending if self.exhausted => {
                if self.stop_and_copy {
                    self.close_final_round(now);
                } else {
                    self.end_round(now, host)?;
                }
            }
            State::Hashing { next } => {
                let page_size = self.layout.page_size().bytes();
                let batch = (self.config.hash_batch_bytes / page_size).max(1) as u64;
                let end = (next + batch).min(self.layout.page_count());
                for page in next..end {
                    host.read_page(PageIndex(page), &mut self.scratch)?;
                    self.digest.add_page(page, &self.scratch);
                }
                if end < self.layout.page_count() {
                    self.state = State::Hashing { next: end };
                } else {
                    let digest = self.digest.value();
                    self.report.source_digest = Some(digest);
                    self.report.verification_time = now - self.hash_started;
                    if self.checks_before_start() && !self.ready_seen {
                        // Before start: the state, the digest and the switchover go now; the
                        // final round closes at the next call.
                        self.queue_switchover(host, false)?;
                        self.state = State::Sending;
                    } else {
                        self.queue(0, Frame::Complete { digest });
                        self.state = State::AwaitVerdict;
                        self.last_heard = now;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn end_round<H: SourceHost>(&mut self, now: Nanos, host: &mut H) -> Result<(), MigrationError> {
        self.round_report.duration = now - self.round_start;
        self.report.pages_sent += self.round_report.pages;
        self.report.zero_pages_sent += self.round_report.zero_pages;
        self.send.clear();
        let link_rate = if self.estimator.has_reports() {
            self.estimator.rate()
        } else {
            None
        };
        let backlog_bytes = if self.estimator.has_reports() {
            self.estimator.backlog()
        } else {
            0
        };
        let mut cx = StrategyContext::new(
            &self.layout,
            &mut self.send,
            &mut self.round_report,
            now - self.start,
        );
        cx.link_rate = link_rate;
        cx.backlog_bytes = backlog_bytes;
        let decision = self.strategy.end_round(now, &mut cx, host)?;
        if let Some(cost) = host.take_cost() {
            self.round_report.dirty_sync_time += cost.sync;
            self.round_report.dirty_clear_time += cost.clear;
        }
        self.report.rounds.push(self.round_report.clone());
        match decision {
            Decision::StopAndCopy(reason)
                if self.estimator.has_reports() && self.estimator.backlog() > 0 =>
            {
                // Pause once the link has delivered what it holds: those bytes would
                // otherwise cross the link inside the downtime. The guest runs meanwhile and
                // the final sync picks up what it writes.
                self.exhausted = false;
                self.draining = Some(reason);
            }
            Decision::StopAndCopy(reason) => self.enter_stop_and_copy(now, reason, host)?,
            _ => self.begin_round(now),
        }
        Ok(())
    }

    fn enter_stop_and_copy<H: SourceHost>(
        &mut self,
        now: Nanos,
        reason: StopReason,
        host: &mut H,
    ) -> Result<(), MigrationError> {
        self.check_state_hint(host)?;
        // Paused from the request on: a failure while the pause is pending resumes (cancels)
        // it, and the downtime counts the wait for the vCPUs.
        let progress = host.request_pause()?;
        self.paused = true;
        self.paused_at = now;
        match progress {
            PauseProgress::Parked => {
                self.report.guest_pause = host.last_pause_time().unwrap_or(Nanos::ZERO);
                self.guest_parked(now, reason, host)
            }
            PauseProgress::Pending => {
                self.pausing = Some((reason, now));
                Ok(())
            }
        }
    }

    /// Asks the host whether the pause it left pending completed; goes on with stop-and-copy
    /// once it did, fails once it took longer than the session's `pause_timeout`.
    fn poll_pending_pause<H: SourceHost>(
        &mut self,
        now: Nanos,
        host: &mut H,
    ) -> Result<(), MigrationError> {
        let Some((reason, asked)) = self.pausing else {
            return Ok(());
        };
        match host.poll_pause()? {
            PauseProgress::Parked => {
                self.pausing = None;
                self.report.guest_pause = host.last_pause_time().unwrap_or(now - asked);
                self.guest_parked(now, reason, host)
            }
            PauseProgress::Pending if now - asked > self.config.pause_timeout => {
                Err(MigrationError::Host(HostError::new(alloc::format!(
                    "the guest's vCPUs did not park within {} of the pause request (the pause timeout)",
                    now - asked
                ))))
            }
            PauseProgress::Pending => Ok(()),
        }
    }

    /// Stop-and-copy with the guest parked: the final sync and round.
    fn guest_parked<H: SourceHost>(
        &mut self,
        now: Nanos,
        reason: StopReason,
        host: &mut H,
    ) -> Result<(), MigrationError> {
        self.stop_and_copy = true;
        self.report.stop_reason = Some(reason);
        self.report.stop_detail = self.strategy.explain_stop();
        self.report.throttle_percent = self.strategy.throttle_percent();
        // Until the pause was asked for; the wait for the vCPUs is downtime.
        self.report.preparation_time = self.paused_at - self.start;
        let mut round = RoundReport::default();
        let mut cx =
            StrategyContext::new(&self.layout, &mut self.send, &mut round, now - self.start);
        self.strategy.final_round(now, &mut cx, host)?;
        // The final round is the downtime: it starts with the pause request.
        self.begin_round(self.paused_at);
        if let Some(cost) = host.take_cost() {
            // The final sync, inside the downtime.
            self.round_report.dirty_sync_time += cost.sync;
            self.round_report.dirty_clear_time += cost.clear;
        }
        if self.strategy.pages_after_switchover() {
            // Post-copy: the destination starts now; the final round's pages follow.
            self.post_copy = true;
            self.queue_switchover(host, true)?;
        }
        Ok(())
    }

    /// Fills `buf` with `Pages` frames of the current round for channel `ch`, within the
    /// round's rate limit. Marks the round exhausted (and queues its markers) when the walk
    /// reaches the end.
    fn send_pages<H: SourceHost>(
        &mut self,
        now: Nanos,
        ch: usize,
        buf: &mut [u8],
        host: &mut H,
    ) -> Result<usize, MigrationError> {
        let Some(room) = self.round_room(now, buf.len(), host)? else {
            return Ok(0);
        };
        let page_size = self.layout.page_size().bytes();
        let mut written = 0;
        if self.post_copy {
            written += self.send_urgent(ch, &mut buf[..room], host)?;
        }
        let mut next = self.next_to_send(ch, self.walk_position(ch));
        while next.is_some() {
            let Some(mut writer) =
                PagesWriter::new(&mut buf[written..room], self.round, self.checksum)
            else {
                break;
            };
            let mut entries = 0u64;
            let mut zeros = 0u64;
            while let Some(p) = next {
                let encoded = Self::encode_one(
                    &mut writer,
                    p,
                    page_size,
                    host,
                    self.encoder.as_mut().filter(|_| !self.post_copy),
                    self.known.as_deref().filter(|_| self.round == 1),
                    &mut self.scratch,
                )?;
                let Some(encoded) = encoded else { break };
                entries += 1;
                if encoded.encoding == wire::Encoding::ZERO {
                    zeros += 1;
                }
                self.report.encodings.add(
                    encoded.encoding,
                    (encoded.wire_bytes - wire::PAGE_ENTRY_LEN) as u64,
                );
                next = self.next_to_send(ch, p + 1);
            }
            let len = writer.finish();
            if len == 0 {
                break;
            }
            written += len;
            self.round_report.pages += entries;
            self.round_report.zero_pages += zeros;
            self.round_report.bytes += len as u64;
            self.channels[ch].pages_in_round += entries;
        }
        match next {
            Some(p) => self.set_walk_position(ch, p),
            None => {
                if self.walk_ends(ch) {
                    self.finish_walk(now, host)?;
                }
            }
        }
        Ok(written)
    }

    /// The channel page `page` goes on under channel affinity.
    fn affine_channel(&self, page: u64) -> usize {
        ((page / AFFINITY_BLOCK_PAGES) % self.channels.len() as u64) as usize
    }

    /// Where channel `ch`'s walk of the round stands (the round's one walk without affinity).
    fn walk_position(&self, ch: usize) -> u64 {
        if self.config.channel_affinity {
            self.channels[ch].cursor
        } else {
            self.cursor
        }
    }

    fn set_walk_position(&mut self, ch: usize, page: u64) {
        if self.config.channel_affinity {
            self.channels[ch].cursor = page;
        } else {
            self.cursor = page;
        }
    }

    /// Once channel `ch`'s walk reached the end: whether the round's walk is over (every
    /// channel's, under affinity).
    fn walk_ends(&mut self, ch: usize) -> bool {
        let end = self.layout.page_count();
        self.set_walk_position(ch, end);
        !self.config.channel_affinity || self.channels.iter().all(|c| c.cursor >= end)
    }

    /// Whether the round's walk has gone past `page` (it is sent, or waits for the next round).
    fn walked_past(&self, page: u64) -> bool {
        let ch = if self.config.channel_affinity {
            self.affine_channel(page)
        } else {
            0
        };
        page < self.walk_position(ch)
    }

    /// The first page at or after `from` that the round sends on channel `ch`.
    fn next_to_send(&self, ch: usize, from: u64) -> Option<u64> {
        let mut at = from;
        loop {
            let p = self.send.iter_ones_from(at).next()?;
            if !self.config.channel_affinity {
                return Some(p);
            }
            let owner = self.affine_channel(p);
            if owner == ch {
                return Some(p);
            }
            // Skip to the next block dealt to `ch`.
            let n = self.channels.len();
            let block = p / AFFINITY_BLOCK_PAGES;
            let ahead = ((ch + n - owner) % n) as u64;
            at = (block + ahead) * AFFINITY_BLOCK_PAGES;
        }
    }

    /// Before a batch of the current round: lets the strategy sample the dirty log, then says
    /// how much of `room` the round's rate limit leaves; `None` (with a wake-up time) while not
    /// even one page frame fits.
    fn round_room<H: SourceHost>(
        &mut self,
        now: Nanos,
        room: usize,
        host: &mut H,
    ) -> Result<Option<usize>, MigrationError> {
        if !self.stop_and_copy {
            let mut cx = StrategyContext::new(
                &self.layout,
                &mut self.send,
                &mut self.round_report,
                now - self.start,
            );
            self.strategy.during_round(now, &mut cx, host)?;
        }
        let one_page = wire::page_frame_len(self.layout.page_size().bytes());
        let limit = self.round_report.rate_limit;
        let allowed = limit
            .bytes_in(now - self.round_start)
            .saturating_sub(self.round_report.bytes);
        if (allowed as usize) < one_page {
            let wake = self.round_start + limit.time_for(self.round_report.bytes + one_page as u64);
            self.rate_wake = Some(wake.max(now + Nanos(1)));
            return Ok(None);
        }
        self.rate_wake = None;
        Ok(Some(room.min(allowed.min(usize::MAX as u64) as usize)))
    }

    /// Encodes page `p` into `writer`: zero pages the host knows of as headers only, then the
    /// encoder's choice, else raw (read straight into its slot). `None` if it does not fit.
    fn encode_one<H: SourceHost>(
        writer: &mut PagesWriter<'_>,
        p: u64,
        page_size: usize,
        host: &mut H,
        encoder: Option<&mut Box<dyn PageEncoder>>,
        known: Option<&KnownContent>,
        scratch: &mut [u8],
    ) -> Result<Option<codec::Encoded>, MigrationError> {
        let mut encoder = encoder;
        if let Some(known) = known.filter(|_| !host.is_known_zero(PageIndex(p))) {
            // Hash-first: content the destination holds goes as its hash.
            if !writer.fits(page_size) {
                return Ok(None);
            }
            host.read_page(PageIndex(p), scratch)?;
            if let Some(e) = crate::hashfirst::encode_known(writer, p, scratch, known) {
                return Ok(Some(e));
            }
            return Ok(match encoder.as_mut() {
                Some(encoder) => {
                    codec::encode_page(writer, p, Some(scratch), page_size, encoder.as_mut())
                }
                None => codec::encode_page(writer, p, Some(scratch), page_size, &mut codec::Raw),
            });
        }
        Ok(if host.is_known_zero(PageIndex(p)) {
            // A stateful encoder hears of the zero page too (its picture of the destination).
            match encoder.as_mut() {
                Some(encoder) => codec::encode_page(writer, p, None, page_size, encoder.as_mut()),
                None => codec::encode_page(writer, p, None, page_size, &mut codec::Raw),
            }
        } else if let Some(encoder) = encoder.as_mut() {
            if !writer.fits(page_size) {
                None
            } else {
                host.read_page(PageIndex(p), scratch)?;
                codec::encode_page(writer, p, Some(scratch), page_size, encoder.as_mut())
            }
        } else {
            codec::encode_page_raw(writer, p, page_size, |slot| {
                host.read_page(PageIndex(p), slot)
            })?
        })
    }

    /// Post-copy: the next page the destination waits for that the push has not sent yet.
    fn next_urgent(&mut self) -> Option<u64> {
        if let Some(p) = self.pending_urgent.take() {
            return Some(p);
        }
        while let Some(p) = self.strategy.next_urgent_page() {
            if !self.walked_past(p) && p < self.layout.page_count() && self.send.get(p) {
                return Some(p);
            }
        }
        None
    }

    /// Post-copy: one frame of the pages the destination waits for, at the start of `buf`.
    fn send_urgent<H: SourceHost>(
        &mut self,
        ch: usize,
        buf: &mut [u8],
        host: &mut H,
    ) -> Result<usize, MigrationError> {
        let Some(first) = self.next_urgent() else {
            return Ok(0);
        };
        let page_size = self.layout.page_size().bytes();
        let Some(mut writer) = PagesWriter::new(buf, self.round, self.checksum) else {
            self.pending_urgent = Some(first);
            return Ok(0);
        };
        let (mut entries, mut zeros) = (0u64, 0u64);
        let mut next = Some(first);
        while let Some(p) = next {
            let encoded = Self::encode_one(
                &mut writer,
                p,
                page_size,
                host,
                self.encoder.as_mut().filter(|_| !self.post_copy),
                self.known.as_deref().filter(|_| self.round == 1),
                &mut self.scratch,
            )?;
            let Some(encoded) = encoded else {
                self.pending_urgent = Some(p);
                break;
            };
            // Sent: the push skips it.
            self.send.unset(p);
            entries += 1;
            if encoded.encoding == wire::Encoding::ZERO {
                zeros += 1;
            }
            self.report.encodings.add(
                encoded.encoding,
                (encoded.wire_bytes - wire::PAGE_ENTRY_LEN) as u64,
            );
            next = self.next_urgent();
        }
        let len = writer.finish();
        self.round_report.pages += entries;
        self.round_report.zero_pages += zeros;
        self.round_report.bytes += len as u64;
        self.report.urgent_pages += entries;
        self.channels[ch].pages_in_round += entries;
        Ok(len)
    }

    /// Chooses the pages of the current round for one buffer of `room` bytes on channel `ch`,
    /// within the round's rate limit (as [`Source::send_pages`] does, without reading them).
    fn plan_pages<H: SourceHost>(
        &mut self,
        now: Nanos,
        ch: usize,
        room: usize,
        host: &mut H,
    ) -> Result<Option<PagePlan>, MigrationError> {
        let Some(room) = self.round_room(now, room, host)? else {
            return Ok(None);
        };
        let page_size = self.layout.page_size().bytes();
        let (most, _) = plan::pages_that_fit(room, page_size, self.checksum);
        let mut pages = Vec::new();
        if self.post_copy {
            // Pages the destination waits for go first; the push skips them.
            while (pages.len() as u64) < most {
                let Some(p) = self.next_urgent() else { break };
                self.send.unset(p);
                self.report.urgent_pages += 1;
                pages.push(p);
            }
        }
        let mut next = self.next_to_send(ch, self.walk_position(ch));
        while let Some(p) = next {
            if pages.len() as u64 == most {
                break;
            }
            pages.push(p);
            next = self.next_to_send(ch, p + 1);
        }
        let walk_over = match next {
            Some(p) => {
                self.set_walk_position(ch, p);
                false
            }
            None => self.walk_ends(ch),
        };
        if pages.is_empty() {
            if walk_over {
                self.finish_walk(now, host)?;
            }
            return Ok(None);
        }
        // Full frames of raw pages: exactly what `PagePlan::encode` writes at most.
        let planned_bytes = plan::room_for(pages.len() as u64, page_size, self.checksum);
        let count = pages.len() as u64;
        self.round_report.pages += count;
        self.round_report.bytes += planned_bytes as u64;
        self.channels[ch].pages_in_round += count;
        if walk_over {
            self.finish_walk(now, host)?;
        }
        Ok(Some(PagePlan {
            channel: ch as ChannelId,
            generation: self.round,
            checksum: self.checksum,
            page_size,
            pages,
            planned_bytes,
            raw_only: self.post_copy,
            known: self.known.clone().filter(|_| self.round == 1),
        }))
    }

    /// The round's last page is handed out: queue each channel's round marker, and after the
    /// final round the device state and the switchover.
    fn finish_walk<H: SourceHost>(
        &mut self,
        now: Nanos,
        host: &mut H,
    ) -> Result<(), MigrationError> {
        self.cursor = self.layout.page_count();
        self.exhausted = true;
        for ch in 0..self.channels.len() {
            let pages = self.channels[ch].pages_in_round;
            self.queue(
                ch,
                Frame::RoundEnd {
                    round: self.round,
                    channel: ch as u16,
                    pages,
                },
            );
        }
        if !self.stop_and_copy || self.post_copy {
            return Ok(());
        }
        if self.checks_before_start() {
            // Hash the paused guest first; the digest and the switchover follow.
            self.hash_started = now;
            self.state = State::Hashing { next: 0 };
            return Ok(());
        }
        self.queue_switchover(host, false)
    }

    fn checks_before_start(&self) -> bool {
        self.config.verify && self.config.verify_before_start && !self.post_copy
    }

    /// Hybrid: names the pages sent in earlier rounds that go again after the switchover (the
    /// final round's set: what the guest wrote since they were sent, and pages held back).
    /// The destination's guest must not touch its old copies. The frames cover every page.
    fn queue_discard(&mut self) {
        let pages = self.layout.page_count();
        let words_per_frame = wire::MAX_BODY_LEN / 8 - 2;
        let mut storage = Vec::new();
        for (i, chunk) in self.send.as_words().chunks(words_per_frame).enumerate() {
            let first_page = (i * words_per_frame) as u64 * 64;
            let bits = (pages - first_page).min(chunk.len() as u64 * 64);
            let frame = Frame::Discard {
                first_page,
                bits,
                words: wire::u64_list(chunk, &mut storage),
            };
            self.report.control_bytes +=
                frame.emit_with(&mut self.channels[0].queue, self.checksum) as u64;
        }
        self.report.discarded_pages = self.send.count_ones();
    }

    /// Queues the device state and the switchover on channel 0 (the commit point, once they
    /// are handed out). `pages_follow`: post-copy, before the final round's pages.
    fn queue_switchover<H: SourceHost>(
        &mut self,
        host: &mut H,
        pages_follow: bool,
    ) -> Result<(), MigrationError> {
        let state = host.save_state()?;
        self.report.device_state_bytes = state.len() as u64;
        if state.len() as u64 > self.max_device_state {
            return Err(MigrationError::Incompatible(alloc::format!(
                "the device state ({} bytes) exceeds the destination's limit of {} bytes",
                state.len(),
                self.max_device_state
            )));
        }
        self.switchover_from = self.channels[0].queue.len();
        for chunk in state.chunks(wire::MAX_BODY_LEN) {
            self.queue(0, Frame::DeviceState(chunk));
        }
        if state.is_empty() {
            self.queue(0, Frame::DeviceState(&[]));
        }
        if pages_follow && self.report.pages_sent > 0 {
            self.queue_discard();
        }
        if self.checks_before_start() {
            // The digest of the paused memory goes right before the switchover.
            let digest = self.digest.value();
            self.queue(0, Frame::Complete { digest });
        }
        self.queue(
            0,
            Frame::Switchover {
                // Post-copy names the rounds closed before it; the final one follows.
                rounds: if pages_follow {
                    self.round - 1
                } else {
                    self.round
                },
                digest_follows: self.config.verify && !self.checks_before_start(),
                pages_follow,
                device_state_len: state.len() as u64,
                check_before_start: self.checks_before_start(),
            },
        );
        self.switchover_queued = true;
        Ok(())
    }
}
