//! The destination side of a migration: a sans-IO state machine that checks and applies frames
//! from every channel through [`PageWrite`] and [`DestinationGuest`], and answers the source.
//!
//! What it does with an arriving copy of a page is the [`PagePolicy`]'s decision, which depends
//! on the strategy: pre-copy's [`NewestWins`] applies a copy only if no newer generation
//! (round) of that page arrived first on another channel; post-copy's [`FirstCopyWins`] places
//! each page once and ignores every later copy.
//!
//! It rejects, with a typed error and an abort frame for the source: undecodable frames and bad
//! checksums, a layout (region table) or page size other than its own, pages outside the guest,
//! payloads that do not decode to one page (decoders write into a scratch page, never straight
//! into guest memory), round markers out of order or with the wrong page count, frames out of
//! protocol order, a channel that joins with another session's id, and a switchover before
//! every page has arrived. It never writes outside the guest and never allocates from a length
//! it has not checked.
//!
//! The memory digest is kept up to date as pages land ([`crate::digest::MemoryDigest`]): at the
//! switchover it is read, not computed, so verification costs no downtime.

use alloc::boxed::Box;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use crate::bitmap::DirtyBitmap;
use crate::codec::PageDecoder;
use crate::digest::{page_hash, MemoryDigest};
use crate::error::{HostError, MigrationError};
use crate::memory::{DestinationGuest, PageWrite};
use crate::page::{MemoryLayout, PageIndex};
use crate::session::ChannelId;
use crate::time::Nanos;
use crate::wire::{
    AbortCode, ChecksumPolicy, Encoding, Frame, FrameKind, PageEntries, Verdict, WireError,
    APPLIED_STEP, FEATURES_KNOWN, FEATURE_APPLIED, FEATURE_CHANNELS, FEATURE_CHECKSUM,
    FEATURE_CONTENT, FEATURE_HASH_FIRST, PROTOCOL_VERSION,
};

/// Settings of the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestinationConfig {
    /// Keep the memory digest as pages land (16 bytes per page) so the source's can be
    /// checked. Default on.
    pub verify: bool,
    /// The most CPU/device state accepted, in bytes (announced to the source). Default 64 MiB.
    pub max_device_state: usize,
    /// The most connections one migration may use. Default 16.
    pub max_channels: u16,
    /// Agree to per-frame checksums when the source offers them. Default on.
    pub checksum: bool,
    /// How long to wait for the source before giving up. Default 60 s.
    pub peer_timeout: Nanos,
    /// Report the bytes taken in (`Applied`) when the source asks, so it measures the link
    /// end to end. Default on.
    pub report_applied: bool,
    /// When the source verifies before start: hash what the host reads back from guest memory
    /// ([`DestinationGuest::read_back`]) instead of the pages as they arrived, so a page
    /// written at a wrong offset (a memslot mistake) is caught. Costs a read of the whole guest
    /// inside the downtime. Default off.
    pub read_back: bool,
    /// Decode the core's content encodings (LZ4, XBZRLE delta, delta + LZ4, dedup references;
    /// [`crate::codec`]) and say so (`FEATURE_CONTENT`). Deltas and references are resolved
    /// from this side's own memory ([`DestinationGuest::read_back`]); the source may then send
    /// them. Default on.
    pub content_codecs: bool,
}

impl Default for DestinationConfig {
    fn default() -> Self {
        DestinationConfig {
            verify: true,
            max_device_state: 64 << 20,
            max_channels: 16,
            checksum: true,
            peer_timeout: Nanos::from_secs(60),
            report_applied: true,
            read_back: false,
            content_codecs: true,
        }
    }
}

/// Where the destination stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DestinationStatus {
    /// Waiting for the source's hello.
    AwaitingHello,
    /// Receiving memory.
    Receiving,
    /// The guest has been started; waiting for the source's digest.
    Running,
    /// Finished: the digest matched (or verification is off).
    Complete,
    /// Failed; see the error returned.
    Failed,
}

/// Decides whether an arriving copy of a page is applied.
pub trait PagePolicy: Send {
    /// The guest has `pages` pages; called once, before any page.
    fn prepare(&mut self, pages: u64);
    /// Whether a copy of `page` sent in `generation` (round, from 1) is applied.
    fn accept(&mut self, page: u64, generation: u32) -> bool;
    /// Whether a page, once placed in a generation, is never overwritten by another copy of
    /// that generation: required for post-copy, where the running guest may already have
    /// written a page the source pushes again. Default: no.
    fn places_once(&self) -> bool {
        false
    }
    /// Hybrid: copies of `page` from generations before `generation` are stale from now on
    /// (the source's discard list); only a copy of `generation` or later may be placed.
    /// Returns whether this policy can do that. Default: it cannot (the destination then
    /// refuses a hybrid switchover).
    fn discard(&mut self, page: u64, generation: u32) -> bool {
        let _ = (page, generation);
        false
    }
}

/// Pre-copy: the newest generation of a page wins, whatever order the channels deliver in.
/// 4 bytes per page.
#[derive(Clone, Debug, Default)]
pub struct NewestWins {
    generations: Vec<u32>,
}

impl PagePolicy for NewestWins {
    fn prepare(&mut self, pages: u64) {
        self.generations = vec![0; pages as usize];
    }
    fn accept(&mut self, page: u64, generation: u32) -> bool {
        let slot = &mut self.generations[page as usize];
        if generation >= *slot {
            *slot = generation;
            true
        } else {
            false
        }
    }
}

/// Post-copy and hybrid: a newer generation replaces an older copy (the pre-copy rounds of a
/// hybrid), but within a generation the first copy wins and later ones are ignored (a page the
/// guest asked for and got is not overwritten when the background push sends it again).
/// 4 bytes per page.
#[derive(Clone, Debug, Default)]
pub struct FirstCopyWins {
    generations: Vec<u32>,
}

impl PagePolicy for FirstCopyWins {
    fn prepare(&mut self, pages: u64) {
        self.generations = vec![0; pages as usize];
    }
    fn accept(&mut self, page: u64, generation: u32) -> bool {
        let slot = &mut self.generations[page as usize];
        if generation > *slot {
            *slot = generation;
            true
        } else {
            false
        }
    }
    fn places_once(&self) -> bool {
        true
    }
    fn discard(&mut self, page: u64, generation: u32) -> bool {
        let slot = &mut self.generations[page as usize];
        *slot = (*slot).max(generation.saturating_sub(1));
        true
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct ChannelRx {
    joined: bool,
    /// The round whose pages this channel is sending, from 1.
    round: u32,
    pages_in_round: u64,
}

/// Post-copy's state on the destination once the guest runs.
#[derive(Clone, Copy, Debug)]
struct PostCopyRx {
    /// The generation of the pages that follow the switchover.
    final_round: u32,
    digest_follows: bool,
    /// The source's digest, if it came before the last page.
    source_digest: Option<u128>,
    /// Every page is here and every channel closed the final round.
    all_received: bool,
}

/// The destination of one migration, applying pages by policy `P`.
pub struct Destination<P: PagePolicy = NewestWins> {
    layout: MemoryLayout,
    config: DestinationConfig,
    policy: P,
    status: DestinationStatus,
    failure: Option<MigrationError>,
    channels: Vec<ChannelRx>,
    session_id: u64,
    checksum: bool,
    received: DirtyBitmap,
    received_count: u64,
    page_hashes: Vec<u128>,
    digest: MemoryDigest,
    zero_page: Vec<u8>,
    scratch: Vec<u8>,
    decoders: Vec<Box<dyn PageDecoder>>,
    /// `FEATURE_CONTENT` was agreed: references are resolved from this side's memory, hashed
    /// with the session id as seed (a guest cannot know it, so cannot craft collisions).
    reference_hasher: Option<crate::codec::dedup::ContentHasher>,
    /// Hash-first: content this side holds from earlier, until the hello (then indexed).
    content_source: Option<Box<dyn crate::hashfirst::ContentSource>>,
    /// Hash-first, agreed: that content by the session's keyed hash.
    known: Option<crate::hashfirst::ContentIndex>,
    device_state: Vec<u8>,
    device_state_seen: bool,
    switchover: Option<(u32, bool)>,
    /// Verification before start: the source's digest, sent right before its switchover.
    digest_before_start: Option<u128>,
    /// Post-copy: the guest runs while the final round's pages (this generation) arrive.
    post_copy: Option<PostCopyRx>,
    /// A post-copy switchover arrived; the guest starts once every channel closed the rounds
    /// before it (a late copy of an earlier round must land before the guest can touch it).
    post_copy_pending: bool,
    /// Hybrid: the pages the source's `Discard` frames named stale, and how far they cover.
    stale: DirtyBitmap,
    stale_covered: u64,
    verdict: Option<Verdict>,
    pages_received: u64,
    /// `pages_received` by encoding, with the entries' payload bytes.
    encodings: crate::report::EncodingUse,
    stale_pages: u64,
    bytes_received: u64,
    /// `FEATURE_APPLIED` was agreed: report `bytes_received` (`Applied`) as it grows.
    report_applied: bool,
    /// The total the last `Applied` carried.
    applied_reported: u64,
    /// A `RoundEnd` was taken in since the last `Applied`.
    round_end_unreported: bool,
    started_at: Option<Nanos>,
    last_heard: Option<Nanos>,
    out: Vec<u8>,
    out_sent: usize,
}

impl Destination<NewestWins> {
    /// A pre-copy destination for a guest of `layout` (its memory already exists here).
    pub fn new(layout: MemoryLayout, config: DestinationConfig) -> Self {
        Self::with_policy(layout, config, NewestWins::default())
    }
}

impl<P: PagePolicy> Destination<P> {
    /// A destination applying pages by `policy`.
    pub fn with_policy(layout: MemoryLayout, config: DestinationConfig, mut policy: P) -> Self {
        let pages = layout.page_count();
        let page_size = layout.page_size().bytes();
        policy.prepare(pages);
        Destination {
            config,
            policy,
            status: DestinationStatus::AwaitingHello,
            failure: None,
            channels: vec![ChannelRx::default()],
            session_id: 0,
            checksum: true,
            received: DirtyBitmap::new(pages),
            received_count: 0,
            page_hashes: if config.verify {
                vec![0; pages as usize]
            } else {
                Vec::new()
            },
            digest: MemoryDigest::new(),
            zero_page: vec![0; page_size],
            scratch: vec![0; page_size],
            decoders: Vec::new(),
            reference_hasher: None,
            content_source: None,
            known: None,
            device_state: Vec::new(),
            device_state_seen: false,
            switchover: None,
            digest_before_start: None,
            post_copy: None,
            post_copy_pending: false,
            stale: DirtyBitmap::new(0),
            stale_covered: 0,
            verdict: None,
            pages_received: 0,
            encodings: crate::report::EncodingUse::default(),
            stale_pages: 0,
            bytes_received: 0,
            report_applied: false,
            applied_reported: 0,
            round_end_unreported: false,
            started_at: None,
            last_heard: None,
            out: Vec::new(),
            out_sent: 0,
            layout,
        }
    }

    /// Decodes `decoder.encoding()` pages with `decoder` (the source's encoder produces them).
    pub fn with_decoder(mut self, decoder: Box<dyn PageDecoder>) -> Self {
        self.decoders.push(decoder);
        self
    }

    /// Where the migration stands.
    pub fn status(&self) -> DestinationStatus {
        self.status
    }

    /// The first error, if the migration failed.
    pub fn failure(&self) -> Option<&MigrationError> {
        self.failure.as_ref()
    }

    /// Page copies applied or skipped as stale (re-sends included).
    pub fn pages_received(&self) -> u64 {
        self.pages_received
    }

    /// [`Destination::pages_received`] by the encoding they arrived in, with their payload
    /// bytes (entry headers left out), the way the source's report counts what it sent.
    /// `cpu_nanos` stays 0: the core reads no clock (a driver with one may time decoders).
    pub fn encodings_received(&self) -> crate::report::EncodingUse {
        self.encodings
    }

    /// Copies skipped because a newer one had already arrived on another channel.
    pub fn stale_pages(&self) -> u64 {
        self.stale_pages
    }

    /// Bytes of frames consumed so far.
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received
    }

    /// Connections the source announced.
    pub fn channels(&self) -> u16 {
        self.channels.len() as u16
    }

    /// The destination's memory digest as of the pages applied so far (`None` when verification
    /// is off).
    pub fn digest(&self) -> Option<u128> {
        self.config.verify.then_some(self.digest.value())
    }

    /// The verdict on the source's digest: `None` until a digest arrived (or if the source
    /// sends none), `NotChecked` when this side keeps no page hashes.
    pub fn verdict(&self) -> Option<Verdict> {
        self.verdict
    }

    /// When the guest was started.
    pub fn started_at(&self) -> Option<Nanos> {
        self.started_at
    }

    /// Writes at most `buf.len()` bytes of replies (for channel 0) into `buf`.
    pub fn poll_transmit(&mut self, buf: &mut [u8]) -> usize {
        let pending = &self.out[self.out_sent..];
        let n = pending.len().min(buf.len());
        buf[..n].copy_from_slice(&pending[..n]);
        self.out_sent += n;
        if self.out_sent == self.out.len() {
            self.out.clear();
            self.out_sent = 0;
        }
        n
    }

    /// Bytes of replies queued and not yet taken by [`Destination::poll_transmit`].
    pub fn pending_replies(&self) -> usize {
        self.out.len() - self.out_sent
    }

    /// Appends every queued reply to `out`.
    pub fn drain_replies(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.out[self.out_sent..]);
        self.out.clear();
        self.out_sent = 0;
    }

    /// When to call [`Destination::handle_timeout`]: the peer deadline while waiting for the
    /// source (after its first byte).
    pub fn poll_timeout(&self) -> Option<Nanos> {
        match self.status {
            DestinationStatus::Complete | DestinationStatus::Failed => None,
            _ => self.last_heard.map(|t| t + self.config.peer_timeout),
        }
    }

    /// Gives up on a source silent for longer than the peer timeout.
    pub fn handle_timeout(&mut self, now: Nanos) -> Result<(), MigrationError> {
        if let Some(deadline) = self.poll_timeout() {
            if now >= deadline {
                let heard = self.last_heard.unwrap_or(now);
                let waiting_for = match self.status {
                    DestinationStatus::Running => "the source's digest",
                    _ => "the source's next frame",
                };
                return self.fail(MigrationError::Timeout {
                    waiting_for,
                    after: now - heard,
                });
            }
        }
        Ok(())
    }

    /// Takes bytes that arrived on `channel`, applies every whole frame in them, and queues
    /// replies. Returns the bytes consumed: keep the rest and pass it again with more.
    pub fn handle_input<H>(
        &mut self,
        now: Nanos,
        channel: ChannelId,
        input: &[u8],
        host: &mut H,
    ) -> Result<usize, MigrationError>
    where
        H: PageWrite + DestinationGuest,
    {
        if let Some(e) = &self.failure {
            return Err(e.clone());
        }
        if channel as usize >= self.channels.len() {
            return self.fail(MigrationError::Incompatible(alloc::format!(
                "bytes on channel {channel}, but the source announced {} channel(s)",
                self.channels.len()
            )));
        }
        let policy = ChecksumPolicy::after_handshake(
            self.status != DestinationStatus::AwaitingHello,
            self.checksum,
        );
        let mut used = 0;
        while used < input.len() {
            let (frame, len) = match Frame::parse_with(&input[used..], policy) {
                Ok(parsed) => parsed,
                Err(WireError::Incomplete { .. }) => break,
                Err(_) if self.status == DestinationStatus::Complete => return Ok(input.len()),
                Err(e) => return self.fail(e.into()),
            };
            used += len;
            self.bytes_received += len as u64;
            self.last_heard = Some(now);
            if self.status == DestinationStatus::Complete && !matches!(frame, Frame::Abort { .. }) {
                // The guest runs and the migration is over: only the source's abort (it
                // disagrees with the verdict) is news; anything else cannot change it.
                continue;
            }
            if let Err(e) = self.on_frame(now, channel as usize, frame, host) {
                return self.fail(e);
            }
        }
        if self.report_applied
            && self.status == DestinationStatus::Receiving
            && (self.round_end_unreported
                || self.bytes_received - self.applied_reported >= APPLIED_STEP)
        {
            self.report_applied_bytes();
        }
        Ok(used)
    }

    /// Tells the source how many bytes this side has taken in (`Applied`).
    fn report_applied_bytes(&mut self) {
        Frame::Applied {
            bytes: self.bytes_received,
        }
        .emit_with(&mut self.out, self.checksum);
        self.applied_reported = self.bytes_received;
        self.round_end_unreported = false;
    }

    /// For single-channel drivers: [`Destination::handle_input`] on channel 0, with the
    /// replies (and on error the abort frame) appended to `out`.
    pub fn receive<H>(
        &mut self,
        now: Nanos,
        input: &[u8],
        host: &mut H,
        out: &mut Vec<u8>,
    ) -> Result<usize, MigrationError>
    where
        H: PageWrite + DestinationGuest,
    {
        let result = self.handle_input(now, 0, input, host);
        self.drain_replies(out);
        result
    }

    /// Gives up (the transport closed, or an operator asked): queues an abort frame.
    pub fn cancel(&mut self, why: &str) -> MigrationError {
        match self.fail::<()>(MigrationError::Cancelled(why.to_string())) {
            Err(e) => e,
            Ok(()) => unreachable!("fail always returns an error"),
        }
    }

    fn fail<T>(&mut self, error: MigrationError) -> Result<T, MigrationError> {
        if let Some(first) = &self.failure {
            return Err(first.clone());
        }
        if self.started_at.is_some() && !matches!(error, MigrationError::PeerAborted { .. }) {
            // The guest has run here: whatever went wrong, the source must not resume its
            // copy on the strength of this abort (its Ready may have been lost).
            let message = alloc::format!("the destination's guest has started; {error}");
            Frame::Abort {
                code: AbortCode::GuestStarted,
                message: crate::wire::abort_message(&message),
            }
            .emit(&mut self.out);
        } else {
            error.emit_abort(&mut self.out);
        }
        self.status = DestinationStatus::Failed;
        self.failure = Some(error.clone());
        Err(error)
    }

    fn unexpected(&self, got: FrameKind) -> MigrationError {
        MigrationError::UnexpectedFrame {
            expected: match self.status {
                DestinationStatus::AwaitingHello => "Hello",
                DestinationStatus::Receiving => "Pages, RoundEnd, DeviceState or Switchover",
                DestinationStatus::Running => "Complete",
                _ => "nothing more",
            },
            got,
        }
    }

    fn on_frame<H>(
        &mut self,
        now: Nanos,
        ch: usize,
        frame: Frame<'_>,
        host: &mut H,
    ) -> Result<(), MigrationError>
    where
        H: PageWrite + DestinationGuest,
    {
        let Some(kind) = frame.kind() else {
            return Ok(()); // an ignorable frame of a later version
        };
        if let Frame::Abort { code, message } = frame {
            return Err(MigrationError::PeerAborted {
                code,
                message: String::from_utf8_lossy(message).into_owned(),
            });
        }
        if ch > 0 && !self.channels[ch].joined {
            let Frame::Join {
                channel,
                session_id,
                ..
            } = frame
            else {
                return Err(MigrationError::UnexpectedFrame {
                    expected: "Join (the first frame of an extra channel)",
                    got: kind,
                });
            };
            if channel as usize != ch || session_id != self.session_id {
                return Err(MigrationError::Incompatible(alloc::format!(
                    "a connection joined as channel {channel} of session {session_id:#x}; expected channel {ch} of session {:#x}",
                    self.session_id
                )));
            }
            self.channels[ch].joined = true;
            return Ok(());
        }
        match (self.status, frame) {
            (DestinationStatus::AwaitingHello, Frame::Hello(hello)) if ch == 0 => {
                self.on_hello(&hello)
            }
            (
                DestinationStatus::Receiving,
                Frame::Pages {
                    generation,
                    entries,
                },
            ) => self.apply_pages(ch, generation, entries, host),
            (
                DestinationStatus::Receiving,
                Frame::RoundEnd {
                    round,
                    channel,
                    pages,
                },
            ) => {
                self.close_round(ch, round, channel, pages)?;
                self.try_switchover(now, host)
            }
            (DestinationStatus::Receiving, Frame::DeviceState(bytes)) if ch == 0 => {
                if self.channels[0].pages_in_round != 0 || self.switchover.is_some() {
                    return Err(MigrationError::RoundMismatch {
                        round: self.channels[0].round,
                        reason: "device state inside an open round",
                    });
                }
                if self.device_state.len() + bytes.len() > self.config.max_device_state {
                    return Err(MigrationError::Incompatible(alloc::format!(
                        "device state exceeds this side's limit of {} bytes",
                        self.config.max_device_state
                    )));
                }
                self.device_state.extend_from_slice(bytes);
                self.device_state_seen = true;
                Ok(())
            }
            (
                DestinationStatus::Receiving,
                Frame::Switchover {
                    rounds,
                    digest_follows,
                    pages_follow,
                    device_state_len,
                    check_before_start,
                },
            ) if ch == 0 => {
                if !self.device_state_seen || self.switchover.is_some() {
                    return Err(self.unexpected(FrameKind::Switchover));
                }
                if check_before_start != self.digest_before_start.is_some()
                    || (check_before_start && (pages_follow || digest_follows))
                {
                    return Err(MigrationError::UnexpectedFrame {
                        expected: "a Complete right before a switchover that checks before start, and no other",
                        got: FrameKind::Switchover,
                    });
                }
                if self.device_state.len() as u64 != device_state_len {
                    return Err(MigrationError::Incompatible(alloc::format!(
                        "the device state has {} bytes, the switchover says {device_state_len}: a chunk was lost",
                        self.device_state.len()
                    )));
                }
                if pages_follow {
                    self.accept_post_copy(rounds)?;
                    self.switchover = Some((rounds, digest_follows));
                    self.post_copy_pending = true;
                    return self.try_switchover(now, host);
                }
                if rounds.checked_add(1) != Some(self.channels[0].round) {
                    return Err(MigrationError::RoundMismatch {
                        round: rounds,
                        reason: "switchover names a different round count",
                    });
                }
                self.switchover = Some((rounds, digest_follows));
                self.try_switchover(now, host)
            }
            (
                DestinationStatus::Receiving,
                Frame::Discard {
                    first_page,
                    bits,
                    words,
                },
            ) if ch == 0 && self.switchover.is_none() => self.take_discard(first_page, bits, words),
            (DestinationStatus::Receiving, Frame::Complete { digest })
                if ch == 0
                    && self.device_state_seen
                    && self.switchover.is_none()
                    && self.digest_before_start.is_none() =>
            {
                // Verification before start: the switchover follows.
                self.digest_before_start = Some(digest);
                Ok(())
            }
            (
                DestinationStatus::Running,
                Frame::Pages {
                    generation,
                    entries,
                },
            ) if self.post_copy.is_some() => {
                self.apply_pages(ch, generation, entries, host)?;
                self.finish_post_copy()
            }
            (
                DestinationStatus::Running,
                Frame::RoundEnd {
                    round,
                    channel,
                    pages,
                },
            ) if self.post_copy.is_some() => {
                self.close_round(ch, round, channel, pages)?;
                self.finish_post_copy()
            }
            (DestinationStatus::Running, Frame::Complete { digest })
                if ch == 0 && self.post_copy.as_ref().is_some_and(|p| !p.all_received) =>
            {
                // The verdict waits until every page has arrived.
                let pc = self.post_copy.as_mut().expect("post-copy");
                if pc.source_digest.replace(digest).is_some() {
                    return Err(self.unexpected(FrameKind::Complete));
                }
                Ok(())
            }
            (DestinationStatus::Running, Frame::Complete { digest }) if ch == 0 => {
                self.judge(digest)
            }
            (_, frame) => Err(self.unexpected(frame.kind().unwrap_or(kind))),
        }
    }

    /// A channel's `RoundEnd`: checks it against what the channel delivered.
    fn close_round(
        &mut self,
        ch: usize,
        round: u32,
        channel: u16,
        pages: u64,
    ) -> Result<(), MigrationError> {
        let rx = &mut self.channels[ch];
        if channel as usize != ch {
            return Err(MigrationError::RoundMismatch {
                round,
                reason: "round marker names another channel",
            });
        }
        if round != rx.round {
            return Err(MigrationError::RoundMismatch {
                round,
                reason: "round markers must count up from 1",
            });
        }
        if pages != rx.pages_in_round {
            return Err(MigrationError::RoundMismatch {
                round,
                reason: "page count differs from the pages received",
            });
        }
        rx.round = rx.round.saturating_add(1);
        rx.pages_in_round = 0;
        self.round_end_unreported = true;
        Ok(())
    }

    /// Compares the source's digest with this side's and answers with the verdict.
    fn judge(&mut self, digest: u128) -> Result<(), MigrationError> {
        let ours = self.digest();
        let verdict = match ours {
            None => Verdict::NotChecked,
            Some(d) if d == digest => Verdict::Match,
            Some(_) => Verdict::Mismatch,
        };
        Frame::Verified {
            verdict,
            digest: ours.unwrap_or(0),
        }
        .emit_with(&mut self.out, self.checksum);
        self.verdict = Some(verdict);
        if verdict == Verdict::Mismatch {
            return Err(MigrationError::DigestMismatch {
                source: digest,
                destination: ours.unwrap_or_default(),
            });
        }
        self.status = DestinationStatus::Complete;
        Ok(())
    }

    /// Hash-first: indexes this side's content under the session's key and announces it
    /// (`Have` frames, then an empty one).
    fn announce_content(&mut self, session_id: u64) -> Result<(), MigrationError> {
        let Some(source) = self.content_source.take() else {
            return Ok(());
        };
        let page_size = self.layout.page_size().bytes();
        let index = crate::hashfirst::ContentIndex::build(source, session_id, page_size)
            .map_err(MigrationError::Host)?;
        let per_frame = (crate::wire::MAX_BODY_LEN - 8) / 16;
        let hashes: Vec<u128> = index.hashes().collect();
        let mut storage = Vec::new();
        for chunk in hashes.chunks(per_frame) {
            let list = crate::wire::u128_list(chunk, &mut storage);
            Frame::Have(list).emit_with(&mut self.out, self.checksum);
        }
        let empty = crate::wire::u128_list(&[], &mut storage);
        Frame::Have(empty).emit_with(&mut self.out, self.checksum);
        self.known = Some(index);
        Ok(())
    }

    /// Hash-first: this side already holds `content` (the image a VM left here, images of VMs
    /// of the same application, a shared store). If the source agrees (`FEATURE_HASH_FIRST`),
    /// round 1 sends pages with that content as 16-byte hashes ([`crate::hashfirst`]).
    pub fn with_content(mut self, content: Box<dyn crate::hashfirst::ContentSource>) -> Self {
        self.content_source = Some(content);
        self
    }

    /// Hybrid: one `Discard` frame, pages sent earlier that went stale. The frames cover
    /// every page in order from page 0, so a lost frame shows at the switchover.
    fn take_discard(
        &mut self,
        first_page: u64,
        bits: u64,
        words: crate::wire::U64List<'_>,
    ) -> Result<(), MigrationError> {
        let pages = self.layout.page_count();
        let bad = |reason| MigrationError::BadDiscard {
            first_page,
            bits,
            reason,
        };
        if first_page != self.stale_covered {
            return Err(bad(
                "discard frames must cover the pages in order from page 0",
            ));
        }
        if bits > pages - first_page {
            return Err(bad("names pages beyond the guest"));
        }
        if self.stale.len() != pages {
            self.stale = DirtyBitmap::new(pages);
        }
        let mut at = first_page;
        let mut left = bits;
        for word in words.iter() {
            let take = left.min(64);
            let mask = if take == 64 {
                u64::MAX
            } else {
                (1u64 << take) - 1
            };
            self.stale.or_words_at(at, &[word & mask]);
            at += take;
            left -= take;
        }
        self.stale_covered = first_page + bits;
        Ok(())
    }

    /// A post-copy switchover: checks this destination can take it, and after pre-copy
    /// rounds (hybrid) takes back the pages the source named stale.
    fn accept_post_copy(&mut self, rounds: u32) -> Result<(), MigrationError> {
        if !self.policy.places_once() {
            return Err(MigrationError::Incompatible(
                "the source switches over before its last pages (post-copy), but this destination's page policy may overwrite pages the running guest wrote (use FirstCopyWins)".into(),
            ));
        }
        if rounds.checked_add(1) != Some(self.channels[0].round)
            || self.channels[0].pages_in_round != 0
        {
            return Err(MigrationError::RoundMismatch {
                round: rounds,
                reason: "switchover names a different round count",
            });
        }
        if self.pages_received == 0 {
            return Ok(()); // plain post-copy: nothing here can be stale
        }
        // Hybrid: without the whole discard list the guest could run on an old copy.
        if self.stale_covered != self.layout.page_count() {
            return Err(MigrationError::BadDiscard {
                first_page: self.stale_covered,
                bits: 0,
                reason: "a post-copy switchover after pre-copy rounds needs discard frames covering every page",
            });
        }
        let final_round = rounds + 1;
        let stale = core::mem::replace(&mut self.stale, DirtyBitmap::new(0));
        for page in stale.iter_ones() {
            if !self.policy.discard(page, final_round) {
                return Err(MigrationError::Incompatible(
                    "this destination's page policy cannot take back stale pages (hybrid post-copy)"
                        .into(),
                ));
            }
        }
        self.received_count -= self.received.count_intersection(&stale);
        self.received.difference_with(&stale);
        Ok(())
    }

    /// Post-copy: starts the guest once every channel closed the rounds before the switchover;
    /// the final round's pages follow.
    fn start_post_copy<H>(
        &mut self,
        now: Nanos,
        rounds: u32,
        digest_follows: bool,
        host: &mut H,
    ) -> Result<(), MigrationError>
    where
        H: PageWrite + DestinationGuest,
    {
        self.post_copy_pending = false;
        self.switchover = None;
        host.restore_state(&self.device_state)?;
        host.start()?;
        self.started_at = Some(now);
        Frame::Ready.emit_with(&mut self.out, self.checksum);
        self.status = DestinationStatus::Running;
        self.post_copy = Some(PostCopyRx {
            final_round: rounds + 1,
            digest_follows,
            source_digest: None,
            all_received: false,
        });
        self.finish_post_copy()
    }

    /// Post-copy: once every page has arrived and every channel closed the final round, the
    /// migration ends (with the verdict, if the source's digest is here).
    fn finish_post_copy(&mut self) -> Result<(), MigrationError> {
        let Some(pc) = &self.post_copy else {
            return Ok(());
        };
        if pc.all_received {
            return Ok(());
        }
        let final_round = pc.final_round;
        let closed = self
            .channels
            .iter()
            .all(|c| c.joined && c.round == final_round + 1);
        if !closed {
            return Ok(());
        }
        let missing = self.layout.page_count() - self.received_count;
        if missing != 0 {
            return Err(MigrationError::BadPagePayload {
                page: self.received_gap(),
                reason: "never received in post-copy's final round",
            });
        }
        let pc = self.post_copy.as_mut().expect("post-copy");
        pc.all_received = true;
        match (pc.digest_follows, pc.source_digest) {
            (false, _) => {
                self.status = DestinationStatus::Complete;
                Ok(())
            }
            (true, Some(digest)) => self.judge(digest),
            (true, None) => Ok(()),
        }
    }

    /// Post-copy: whether page `page` (dense index) has arrived; the guest may touch it only
    /// then (a VMM resolves the fault with it).
    pub fn is_received(&self, page: u64) -> bool {
        page < self.received.len() && self.received.get(page)
    }

    /// Post-copy: the running guest needs `pages` now; asks the source for those not yet
    /// here (a `PageRequest` frame queued for channel 0). Returns how many were asked for.
    pub fn request_pages(&mut self, pages: &[u64]) -> usize {
        if self.post_copy.as_ref().is_none_or(|p| p.all_received) || self.failure.is_some() {
            return 0;
        }
        let wanted: Vec<u64> = pages
            .iter()
            .copied()
            .filter(|&p| p < self.layout.page_count() && !self.received.get(p))
            .collect();
        if wanted.is_empty() {
            return 0;
        }
        let mut storage = Vec::new();
        let list = crate::wire::u64_list(&wanted, &mut storage);
        Frame::PageRequest(list).emit_with(&mut self.out, self.checksum);
        wanted.len()
    }

    fn on_hello(&mut self, hello: &crate::wire::Hello<'_>) -> Result<(), MigrationError> {
        let ours = &self.layout;
        let mut problems = Vec::new();
        if hello.page_shift as u32 != ours.page_size().shift() {
            problems.push(alloc::format!(
                "page size {} (this side has {})",
                1u64 << hello.page_shift,
                ours.page_size().bytes()
            ));
        }
        let same_table = hello.regions.len() == ours.regions().len()
            && hello
                .regions
                .iter()
                .zip(ours.regions())
                .all(|(a, b)| a == *b);
        if !same_table {
            if hello.regions.len() == 1 && ours.regions().len() == 1 {
                let (theirs, mine) = (hello.regions.iter().next(), ours.regions()[0]);
                let theirs = theirs.unwrap_or(mine);
                if theirs.pages != mine.pages {
                    problems.push(alloc::format!(
                        "{} pages (this side has {})",
                        theirs.pages,
                        mine.pages
                    ));
                } else {
                    problems.push(alloc::format!(
                        "region {} at {:#x} (this side has region {} at {:#x})",
                        theirs.id,
                        theirs.guest_base,
                        mine.id,
                        mine.guest_base
                    ));
                }
            } else {
                problems.push(alloc::format!(
                    "a layout of {} region(s), {} pages, that differs from this side's {} region(s), {} pages",
                    hello.regions.len(),
                    hello.page_count(),
                    ours.regions().len(),
                    ours.page_count()
                ));
            }
        }
        if hello.channels > self.config.max_channels {
            problems.push(alloc::format!(
                "{} channels (this side takes at most {})",
                hello.channels,
                self.config.max_channels
            ));
        }
        if !problems.is_empty() {
            return Err(MigrationError::Incompatible(alloc::format!(
                "source offers {}",
                problems.join(", ")
            )));
        }
        let mut ours_features = FEATURE_CHANNELS;
        if self.config.report_applied {
            ours_features |= FEATURE_APPLIED;
        }
        if self.config.checksum {
            ours_features |= FEATURE_CHECKSUM;
        }
        if self.config.content_codecs {
            ours_features |= FEATURE_CONTENT;
        }
        if self.content_source.is_some() {
            ours_features |= FEATURE_HASH_FIRST;
        }
        let features = hello.features & FEATURES_KNOWN & ours_features;
        if features & FEATURE_CONTENT != 0 {
            // Deltas apply onto this side's copy; references are resolved below.
            self.decoders.push(Box::new(crate::codec::lz4::Lz4Decoder));
            self.decoders
                .push(Box::new(crate::codec::xbzrle::DeltaDecoder));
            self.decoders
                .push(Box::new(crate::codec::lz4::DeltaLz4Decoder::default()));
        }
        self.reference_hasher = (features & FEATURE_CONTENT != 0)
            .then(|| crate::codec::dedup::ContentHasher::new(hello.session_id));
        self.checksum = features & FEATURE_CHECKSUM != 0;
        self.report_applied = features & FEATURE_APPLIED != 0;
        self.session_id = hello.session_id;
        self.channels = vec![
            ChannelRx {
                joined: false,
                round: 1,
                pages_in_round: 0,
            };
            hello.channels as usize
        ];
        self.channels[0].joined = true;
        Frame::Accept {
            version: PROTOCOL_VERSION,
            features,
            max_device_state: self.config.max_device_state as u64,
        }
        .emit(&mut self.out);
        if features & FEATURE_HASH_FIRST != 0 {
            self.announce_content(hello.session_id)?;
        }
        self.status = DestinationStatus::Receiving;
        Ok(())
    }

    /// Starts the guest once the switchover arrived and every channel closed the final round.
    fn try_switchover<H>(&mut self, now: Nanos, host: &mut H) -> Result<(), MigrationError>
    where
        H: PageWrite + DestinationGuest,
    {
        let Some((rounds, digest_follows)) = self.switchover else {
            return Ok(());
        };
        if self.channels.iter().any(|c| {
            // Post-copy: a channel may already close the final round meanwhile.
            !c.joined || c.round < rounds + 1 || (c.round != rounds + 1 && !self.post_copy_pending)
        }) {
            return Ok(()); // another channel still delivers the final round
        }
        if self.post_copy_pending {
            return self.start_post_copy(now, rounds, digest_follows, host);
        }
        let missing = self.layout.page_count() - self.received_count;
        if missing != 0 {
            return Err(MigrationError::BadPagePayload {
                page: self.received_gap(),
                reason: if missing == 1 {
                    "never received before switchover"
                } else {
                    "and others never received before switchover"
                },
            });
        }
        if let Some(source_digest) = self.digest_before_start {
            // Start only if the memory is the source's.
            let ours = if self.config.read_back {
                Some(self.read_back_digest(host)?)
            } else {
                self.digest()
            };
            let Some(ours) = ours else {
                return Err(MigrationError::Incompatible(
                    "the source asks for verification before start, but this destination keeps no digest (DestinationConfig::verify is off)".into(),
                ));
            };
            if ours != source_digest {
                return Err(MigrationError::DigestMismatch {
                    source: source_digest,
                    destination: ours,
                });
            }
            Frame::Verified {
                verdict: Verdict::Match,
                digest: ours,
            }
            .emit_with(&mut self.out, self.checksum);
            self.verdict = Some(Verdict::Match);
        }
        host.restore_state(&self.device_state)?;
        host.start()?;
        self.started_at = Some(now);
        Frame::Ready.emit_with(&mut self.out, self.checksum);
        self.switchover = None;
        // Without a digest to come, the migration is over once the guest runs.
        self.status = if digest_follows {
            DestinationStatus::Running
        } else {
            DestinationStatus::Complete
        };
        Ok(())
    }

    /// The digest of what the host holds, read back page by page (before the guest starts).
    fn read_back_digest<H: DestinationGuest>(&mut self, host: &mut H) -> Result<u128, HostError> {
        let mut digest = MemoryDigest::new();
        for page in 0..self.layout.page_count() {
            host.read_back(PageIndex(page), &mut self.scratch)?;
            digest.add_page(page, &self.scratch);
        }
        Ok(digest.value())
    }

    /// The first page never received (for the error message).
    fn received_gap(&self) -> u64 {
        // Word by word: bits past the end are clear, and a gap exists when this is called.
        let words = self.received.as_words();
        words
            .iter()
            .position(|&w| w != u64::MAX)
            .map_or(0, |i| i as u64 * 64 + (!words[i]).trailing_zeros() as u64)
    }

    fn apply_pages<H: PageWrite + DestinationGuest>(
        &mut self,
        ch: usize,
        generation: u32,
        entries: PageEntries<'_>,
        host: &mut H,
    ) -> Result<(), MigrationError> {
        if self.switchover.is_some() && ch == 0 && !self.post_copy_pending {
            return Err(self.unexpected(FrameKind::Pages));
        }
        if generation != self.channels[ch].round {
            return Err(MigrationError::RoundMismatch {
                round: generation,
                reason: "pages of a generation other than the channel's open round",
            });
        }
        for entry in entries.iter() {
            let entry = entry?;
            self.apply_page(generation, entry.index, entry.encoding, entry.payload, host)?;
            self.channels[ch].pages_in_round += 1;
        }
        Ok(())
    }

    fn apply_page<H: PageWrite + DestinationGuest>(
        &mut self,
        generation: u32,
        index: u64,
        encoding: Encoding,
        payload: &[u8],
        host: &mut H,
    ) -> Result<(), MigrationError> {
        if index >= self.layout.page_count() {
            return Err(MigrationError::PageOutOfRange {
                page: index,
                page_count: self.layout.page_count(),
            });
        }
        let page_size = self.layout.page_size().bytes();
        self.pages_received += 1;
        self.encodings.add(encoding, payload.len() as u64);
        // Check the payload before the policy sees the copy: a bad copy is an error even if
        // it would have been stale.
        let data: &[u8] = match encoding {
            Encoding::RAW => {
                if payload.len() != page_size {
                    return Err(MigrationError::BadPagePayload {
                        page: index,
                        reason: "raw payload is not one page long",
                    });
                }
                payload
            }
            Encoding::ZERO => {
                if !payload.is_empty() {
                    return Err(MigrationError::BadPagePayload {
                        page: index,
                        reason: "zero page with a payload",
                    });
                }
                &self.zero_page
            }
            Encoding::KNOWN if self.known.is_some() => {
                let known = self.known.as_mut().expect("hash-first agreed");
                known
                    .resolve(payload, &mut self.scratch)
                    .map_err(|reason| MigrationError::BadPagePayload {
                        page: index,
                        reason,
                    })?;
                &self.scratch
            }
            Encoding::REFERENCE if self.reference_hasher.is_some() => {
                // A page whose content this side already holds at another index: copied from
                // guest memory and checked against the reference's hash (a collision, or a page
                // changed since, is an error, never a silent wrong copy).
                let pages = self.layout.page_count();
                let mut read = |i: u64, buf: &mut [u8]| {
                    if i >= pages {
                        return Err("the reference names a page outside the guest");
                    }
                    host.read_back(PageIndex(i), buf).map_err(|_| {
                        "this destination cannot read its memory back to resolve a reference"
                    })
                };
                let hasher = self
                    .reference_hasher
                    .as_ref()
                    .expect("content codecs agreed");
                crate::codec::dedup::resolve(payload, hasher, &mut read, &mut self.scratch)
                    .map_err(|e| MigrationError::BadPagePayload {
                        page: index,
                        reason: e.as_str(),
                    })?;
                &self.scratch
            }
            other => {
                // Every other encoding is a content codec: only once both sides agreed to them
                // (`FEATURE_CONTENT`), whatever decoders the caller registered beforehand.
                if self.reference_hasher.is_none() {
                    return Err(MigrationError::BadPagePayload {
                        page: index,
                        reason: "a content encoding the source did not negotiate",
                    });
                }
                let Some(decoder) = self.decoders.iter_mut().find(|d| d.encoding() == other) else {
                    return Err(MigrationError::BadPagePayload {
                        page: index,
                        reason: "an encoding this destination has no decoder for",
                    });
                };
                if decoder.needs_current_page() {
                    // A delta applies onto the copy this side holds.
                    host.read_back(PageIndex(index), &mut self.scratch)
                        .map_err(|_| MigrationError::BadPagePayload {
                            page: index,
                            reason: "a delta needs this destination to read its memory back (DestinationGuest::read_back)",
                        })?;
                }
                decoder
                    .decode(index, payload, &mut self.scratch)
                    .map_err(|reason| MigrationError::BadPagePayload {
                        page: index,
                        reason,
                    })?;
                &self.scratch
            }
        };
        if !self.policy.accept(index, generation) {
            self.stale_pages += 1;
            return Ok(());
        }
        if encoding == Encoding::ZERO {
            host.write_zero_page(PageIndex(index), data)?;
        } else {
            host.write_page(PageIndex(index), data)?;
        }
        if self.config.verify {
            let hash = page_hash(index, data);
            let slot = &mut self.page_hashes[index as usize];
            self.digest.replace(*slot, hash);
            *slot = hash;
        }
        if !self.received.get(index) {
            self.received.set(index);
            self.received_count += 1;
        }
        Ok(())
    }
}
