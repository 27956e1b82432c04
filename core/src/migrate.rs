//! The source side of a migration, as a sans-IO state machine (quinn-proto's style): the caller
//! passes `now`, the host and an output buffer; the engine appends frames and says what it is
//! waiting for ([`Poll`]). Bytes from the destination come back through `receive`.
//!
//! Strategies: [`PreCopySource`] (iterative pre-copy, then stop-and-copy). Post-copy, hybrid and
//! soft migration will sit beside it, sharing the wire format, scheduler and report.
//!
//! Pre-copy, stage by stage (paper 002's six stages):
//! 1. hello, and the destination's accept (initialisation, reservation);
//! 2. round 1 sends every page; each later round sends the pages dirtied during the previous one,
//!    at the round's bandwidth limit ([`crate::schedule`]);
//! 3. when a stop rule fires, the guest pauses; the last dirty set and the device state go out,
//!    then a switchover frame (stop-and-copy);
//! 4. the destination answers `Ready` when it runs (downtime ends);
//! 5. the source hashes its frozen memory and sends the digest; the destination's verdict
//!    releases the source (commitment). On any failure the source guest resumes.

use alloc::boxed::Box;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::bitmap::DirtyBitmap;
use crate::digest::DigestBuilder;
use crate::error::{HostError, MigrationError};
use crate::memory::{DirtyLog, PageRead, SourceGuest};
use crate::page::{Geometry, PageIndex};
use crate::report::{MigrationReport, RoundReport, StopReason};
use crate::schedule::{Decision, RatePlan, RoundOutcome, Scheduler, StopRules};
use crate::time::{ByteRate, Nanos};
use crate::track::{Predictor, PredictorKind};
use crate::wire::{
    self, Frame, Hello, PageEncoding, PageFrameWriter, Verdict, WireError, PROTOCOL_VERSION,
};

/// What the engine wants next. In every case, first write out what it appended to `out`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poll {
    /// More to send now: call `poll` again.
    Continue,
    /// The round's bandwidth limit is used up: call `poll` again at or after this time.
    WaitUntil(Nanos),
    /// Waiting for the destination: feed its bytes to `receive`, then call `poll`.
    WaitForPeer,
    /// The migration is complete and verified; `report()` is final and the source is released.
    Done,
}

/// Settings of a pre-copy migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreCopyConfig {
    /// Per-round bandwidth limits. Default: none.
    pub rate: RatePlan,
    /// When the rounds end.
    pub stop: StopRules,
    /// How many bytes one `poll` appends at most (the driver's write size). Default 1 MiB, the
    /// write size at which loopback TCP reaches full speed.
    pub batch_bytes: usize,
    /// Hash the source's memory after switchover and have the destination compare. Default on.
    pub verify: bool,
    /// Which writable-working-set predictor holds hot pages back to stop-and-copy.
    /// Default none (plain pre-copy).
    pub predictor: PredictorKind,
    /// Dirty-log samples taken during round 1 to teach the predictor the working set before
    /// round 2 (paper 002's pre-processing phase). Default 4; ignored without a predictor.
    pub learning_samples: u32,
}

impl Default for PreCopyConfig {
    fn default() -> Self {
        PreCopyConfig {
            rate: RatePlan::default(),
            stop: StopRules::default(),
            batch_bytes: 1 << 20,
            verify: true,
            predictor: PredictorKind::None,
            learning_samples: 4,
        }
    }
}

#[derive(Clone)]
enum State {
    Start,
    AwaitAccept,
    /// Sending the pages of `to_send` at or after `cursor`.
    Sending {
        cursor: u64,
    },
    /// The round's last frame is handed to the driver; the round ends at the next poll, once
    /// the driver has written it, so that its duration includes transmission.
    Drained,
    AwaitReady,
    /// Boxed: the hasher's state is large and this state is brief.
    Hashing {
        next: u64,
        builder: Box<DigestBuilder>,
    },
    AwaitVerdict,
    Done,
    Failed(MigrationError),
}

/// Pages sent in round 1 between two learning samples.
fn learning_interval(pages: u64, config: &PreCopyConfig) -> u64 {
    if config.predictor == PredictorKind::None || config.learning_samples == 0 {
        u64::MAX
    } else {
        (pages / (config.learning_samples as u64 + 1)).max(1)
    }
}

fn strategy_name(config: &PreCopyConfig) -> String {
    match config.predictor {
        PredictorKind::None => String::from("pre-copy"),
        p => alloc::format!("pre-copy+{}", p.name()),
    }
}

/// Iterative pre-copy, source side.
pub struct PreCopySource {
    geometry: Geometry,
    config: PreCopyConfig,
    state: State,
    scheduler: Scheduler,
    /// Pages the current round sends.
    to_send: DirtyBitmap,
    /// Pages dirtied during the current round (then, at its end, everything still to send).
    dirty: DirtyBitmap,
    /// Scratch for one dirty-log sync.
    sample: DirtyBitmap,
    /// Pages held back as predicted hot, not yet sent since they were last dirtied.
    held: DirtyBitmap,
    /// Scratch for the predicted-hot set.
    hot: DirtyBitmap,
    predictor: Box<dyn Predictor + Send>,
    /// Round-1 page count at which the next learning sample is taken.
    next_sample_at: u64,
    round: u32,
    round_start: Nanos,
    round_report: RoundReport,
    paused: bool,
    stop_and_copy: bool,
    start: Nanos,
    paused_at: Nanos,
    ready_at: Nanos,
    page_buf: Vec<u8>,
    report: MigrationReport,
}

impl PreCopySource {
    /// A pre-copy migration of a guest of `geometry`.
    pub fn new(geometry: Geometry, config: PreCopyConfig) -> Self {
        let pages = geometry.page_count();
        PreCopySource {
            geometry,
            config,
            state: State::Start,
            scheduler: Scheduler::new(config.rate, config.stop),
            to_send: DirtyBitmap::new(pages),
            dirty: DirtyBitmap::new(pages),
            // Without a predictor these stay empty: no memory for them.
            sample: DirtyBitmap::new(if config.predictor == PredictorKind::None {
                0
            } else {
                pages
            }),
            held: DirtyBitmap::new(if config.predictor == PredictorKind::None {
                0
            } else {
                pages
            }),
            hot: DirtyBitmap::new(if config.predictor == PredictorKind::None {
                0
            } else {
                pages
            }),
            predictor: config.predictor.build(pages),
            next_sample_at: learning_interval(pages, &config),
            round: 0,
            round_start: Nanos::ZERO,
            round_report: RoundReport::default(),
            paused: false,
            stop_and_copy: false,
            start: Nanos::ZERO,
            paused_at: Nanos::ZERO,
            ready_at: Nanos::ZERO,
            page_buf: Vec::new(),
            report: MigrationReport {
                strategy: strategy_name(&config),
                page_size: geometry.page_size().bytes() as u64,
                page_count: pages,
                ..MigrationReport::default()
            },
        }
    }

    /// The report so far (final once `poll` returned [`Poll::Done`]).
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
        matches!(self.state, State::Done | State::Failed(_))
    }

    /// Advances the migration. Appends frames to `out` (at most about `batch_bytes` per call)
    /// and says what to wait for. On error the guest has been resumed, an abort frame for the
    /// destination is in `out`, and every later call returns the same error.
    pub fn poll<H>(
        &mut self,
        now: Nanos,
        host: &mut H,
        out: &mut Vec<u8>,
    ) -> Result<Poll, MigrationError>
    where
        H: PageRead + DirtyLog + SourceGuest,
    {
        let before = out.len();
        let result = self.step(now, host, out);
        self.report.bytes_sent += (out.len() - before) as u64;
        result.or_else(|e| self.fail(e, host, out))
    }

    /// Takes bytes from the destination. Returns how many were consumed (whole frames only:
    /// keep the rest and pass it again with more).
    pub fn receive<H>(
        &mut self,
        now: Nanos,
        input: &[u8],
        host: &mut H,
        out: &mut Vec<u8>,
    ) -> Result<usize, MigrationError>
    where
        H: SourceGuest,
    {
        let mut used = 0;
        while used < input.len() {
            let (frame, len) = match Frame::parse(&input[used..]) {
                Ok(parsed) => parsed,
                Err(WireError::Incomplete { .. }) => break,
                Err(e) => return self.fail(e.into(), host, out),
            };
            used += len;
            self.report.bytes_received += len as u64;
            if let Err(e) = self.on_frame(now, frame) {
                return self.fail(e, host, out);
            }
        }
        Ok(used)
    }

    /// Cancels the migration (an operator's request, or a transport that closed): resumes the
    /// guest if it was paused and appends an abort frame for the destination.
    pub fn cancel<H: SourceGuest>(
        &mut self,
        why: &str,
        host: &mut H,
        out: &mut Vec<u8>,
    ) -> MigrationError {
        match self.fail::<(), H>(MigrationError::Cancelled(why.to_string()), host, out) {
            Err(e) => e,
            Ok(_) => unreachable!("fail always returns an error"),
        }
    }

    fn fail<T, H: SourceGuest>(
        &mut self,
        error: MigrationError,
        host: &mut H,
        out: &mut Vec<u8>,
    ) -> Result<T, MigrationError> {
        if let State::Failed(first) = &self.state {
            return Err(first.clone());
        }
        let mut error = error;
        if self.paused {
            if let Err(e) = host.resume() {
                error = MigrationError::Host(HostError::new(alloc::format!(
                    "{error}; and resuming the source guest failed too: {e}"
                )));
            } else {
                self.paused = false;
            }
        }
        self.report.bytes_sent += error.emit_abort(out) as u64;
        self.state = State::Failed(error.clone());
        Err(error)
    }

    fn on_frame(&mut self, now: Nanos, frame: Frame<'_>) -> Result<(), MigrationError> {
        if let Frame::Abort { code, message } = frame {
            return Err(MigrationError::PeerAborted {
                code,
                message: String::from_utf8_lossy(message).into_owned(),
            });
        }
        if matches!(self.state, State::Drained) && self.stop_and_copy && frame == Frame::Ready {
            // The destination answered before the driver polled again.
            self.close_stop_and_copy(now);
        }
        match (&self.state, frame) {
            (State::AwaitAccept, Frame::Accept { version, features }) => {
                if version != PROTOCOL_VERSION || features != 0 {
                    return Err(MigrationError::Incompatible(alloc::format!(
                        "destination accepted with version {version} and features {features:#x}; this source speaks version {PROTOCOL_VERSION} with none"
                    )));
                }
                self.to_send.fill();
                self.begin_round(now);
                self.state = State::Sending { cursor: 0 };
                Ok(())
            }
            (State::AwaitReady, Frame::Ready) => {
                self.ready_at = now;
                self.report.downtime = now - self.paused_at;
                self.state = if self.config.verify {
                    State::Hashing {
                        next: 0,
                        builder: Box::default(),
                    }
                } else {
                    self.finish(now);
                    State::Done
                };
                Ok(())
            }
            (State::AwaitVerdict, Frame::Verified { verdict, digest }) => {
                let checked = verdict != Verdict::NotChecked;
                self.report.destination_digest = checked.then_some(digest);
                self.report.verified = checked.then_some(verdict == Verdict::Match);
                if verdict == Verdict::Mismatch {
                    return Err(MigrationError::DigestMismatch {
                        source: self.report.source_digest.unwrap_or_default(),
                        destination: digest,
                    });
                }
                self.finish(now);
                self.state = State::Done;
                Ok(())
            }
            (state, frame) => Err(MigrationError::UnexpectedFrame {
                expected: match state {
                    State::AwaitAccept => "Accept",
                    State::AwaitReady => "Ready",
                    State::AwaitVerdict => "Verified",
                    _ => "nothing from the destination at this point",
                },
                got: frame.kind(),
            }),
        }
    }

    fn close_stop_and_copy(&mut self, now: Nanos) {
        self.round_report.duration = now - self.round_start;
        self.round_report.bandwidth =
            ByteRate::measured(self.round_report.bytes, self.round_report.duration);
        self.report.rounds.push(self.round_report.clone());
        self.state = State::AwaitReady;
    }

    fn finish(&mut self, now: Nanos) {
        self.report.resume_time = now - self.ready_at;
        self.report.total_time = now - self.start;
        // The source is released: it stays paused for good, and is no longer ours to resume.
        self.paused = false;
    }

    fn begin_round(&mut self, now: Nanos) {
        self.round += 1;
        self.round_start = now;
        self.round_report = RoundReport {
            round: self.round,
            stop_and_copy: self.stop_and_copy,
            start: now - self.start,
            rate_limit: if self.stop_and_copy {
                self.scheduler.final_limit()
            } else {
                self.scheduler.limit()
            },
            ..RoundReport::default()
        };
    }

    fn step<H>(
        &mut self,
        now: Nanos,
        host: &mut H,
        out: &mut Vec<u8>,
    ) -> Result<Poll, MigrationError>
    where
        H: PageRead + DirtyLog + SourceGuest,
    {
        match &mut self.state {
            State::Start => {
                self.start = now;
                // Starts dirty logging afresh: round 1 sends everything anyway.
                host.sync(&mut self.dirty)?;
                self.dirty.clear();
                let hello = Hello {
                    version: PROTOCOL_VERSION,
                    page_shift: self.geometry.page_size().shift() as u8,
                    page_count: self.geometry.page_count(),
                    features: 0,
                };
                self.emit_control(out, Frame::Hello(hello));
                self.state = State::AwaitAccept;
                Ok(Poll::WaitForPeer)
            }
            State::AwaitAccept | State::AwaitReady | State::AwaitVerdict => Ok(Poll::WaitForPeer),
            State::Sending { cursor } => {
                let cursor = *cursor;
                self.send_pages(now, cursor, host, out)
            }
            State::Drained => {
                if self.stop_and_copy {
                    self.close_stop_and_copy(now);
                    return Ok(Poll::WaitForPeer);
                }
                self.end_round(now, host)?;
                Ok(Poll::Continue)
            }
            State::Hashing { next, builder } => {
                let page_size = self.geometry.page_size().bytes();
                self.page_buf.resize(page_size, 0);
                let batch = (self.config.batch_bytes / page_size).max(1) as u64;
                let end = (*next + batch).min(self.geometry.page_count());
                for page in *next..end {
                    host.read_page(PageIndex(page), &mut self.page_buf)?;
                    builder.push_page(&self.page_buf);
                }
                *next = end;
                if end < self.geometry.page_count() {
                    return Ok(Poll::Continue);
                }
                let digest = builder.finish();
                self.report.source_digest = Some(digest);
                self.emit_control(out, Frame::Complete { digest });
                self.state = State::AwaitVerdict;
                Ok(Poll::WaitForPeer)
            }
            State::Done => Ok(Poll::Done),
            State::Failed(e) => Err(e.clone()),
        }
    }

    fn emit_control(&mut self, out: &mut Vec<u8>, frame: Frame<'_>) {
        self.report.control_bytes += frame.emit(out) as u64;
    }

    fn send_pages<H>(
        &mut self,
        now: Nanos,
        cursor: u64,
        host: &mut H,
        out: &mut Vec<u8>,
    ) -> Result<Poll, MigrationError>
    where
        H: PageRead + DirtyLog + SourceGuest,
    {
        if self.round == 1 && !self.stop_and_copy && self.round_report.pages >= self.next_sample_at
        {
            self.take_learning_sample(now, host)?;
        }
        let page_size = self.geometry.page_size().bytes();
        let max_frame = wire::page_frame_len(page_size) as u64;
        let limit = self.round_report.rate_limit;
        let mut allowed = limit
            .bytes_in(now - self.round_start)
            .saturating_sub(self.round_report.bytes);
        // At least one frame per poll, whatever the batch size.
        let batch_end = out.len() + self.config.batch_bytes.max(1);
        let mut pages = self.to_send.iter_ones_from(cursor);
        loop {
            if out.len() >= batch_end {
                let next = pages.next().unwrap_or(self.geometry.page_count());
                self.state = State::Sending { cursor: next };
                return Ok(Poll::Continue);
            }
            if allowed < max_frame {
                let next = pages.next().unwrap_or(self.geometry.page_count());
                self.state = State::Sending { cursor: next };
                let wake = self.round_start + limit.time_for(self.round_report.bytes + max_frame);
                return Ok(Poll::WaitUntil(wake.max(now + Nanos(1))));
            }
            let Some(page) = pages.next() else { break };
            let (len, encoding) = if host.is_known_zero(PageIndex(page)) {
                let frame = Frame::Page {
                    index: page,
                    encoding: PageEncoding::Zero,
                    payload: &[],
                };
                (frame.emit(out), PageEncoding::Zero)
            } else {
                PageFrameWriter::write(out, page, page_size, |buf| {
                    host.read_page(PageIndex(page), buf)
                })?
            };
            self.round_report.pages += 1;
            self.round_report.bytes += len as u64;
            allowed -= len as u64;
            if encoding == PageEncoding::Zero {
                self.round_report.zero_pages += 1;
            }
        }
        self.report.pages_sent += self.round_report.pages;
        self.report.zero_pages_sent += self.round_report.zero_pages;
        self.emit_control(
            out,
            Frame::RoundEnd {
                round: self.round,
                pages: self.round_report.pages,
            },
        );
        if self.stop_and_copy {
            let state = host.save_state()?;
            self.report.device_state_bytes = state.len() as u64;
            for chunk in state.chunks(wire::MAX_BODY_LEN) {
                self.emit_control(out, Frame::DeviceState(chunk));
            }
            if state.is_empty() {
                self.emit_control(out, Frame::DeviceState(&[]));
            }
            self.emit_control(
                out,
                Frame::Switchover {
                    rounds: self.round,
                    digest_follows: self.config.verify,
                },
            );
        }
        self.state = State::Drained;
        Ok(Poll::Continue)
    }

    fn predicting(&self) -> bool {
        self.config.predictor != PredictorKind::None
    }

    /// The pre-processing phase: a short dirty-log sample during round 1, shown to the
    /// predictor so it knows the working set before round 2 decides what to hold back.
    fn take_learning_sample<H: DirtyLog>(
        &mut self,
        now: Nanos,
        host: &mut H,
    ) -> Result<(), MigrationError> {
        self.sample.clear();
        host.sync(&mut self.sample)?;
        self.predictor.observe(&self.sample, now);
        self.dirty.union_with(&self.sample);
        self.next_sample_at += learning_interval(self.geometry.page_count(), &self.config);
        Ok(())
    }

    fn end_round<H>(&mut self, now: Nanos, host: &mut H) -> Result<(), MigrationError>
    where
        H: PageRead + DirtyLog + SourceGuest,
    {
        if self.predicting() {
            self.sample.clear();
            host.sync(&mut self.sample)?;
            // Predict before observing this sync: the recency predictors count the sync just
            // observed as recent, so predicting after it would hold back everything dirty.
            self.hot.clear();
            self.predictor.predict(now, &mut self.hot);
            self.predictor.observe(&self.sample, now);
            self.dirty.union_with(&self.sample);
        } else {
            host.sync(&mut self.dirty)?;
        }
        let dirty_pages = self.dirty.count_ones();
        let held_back = self.round_report.held_back;
        let redirtied = if held_back > 0 {
            self.held.count_intersection(&self.dirty)
        } else {
            0
        };
        // Everything stop-and-copy would send now: this round's dirt and what is held back.
        if self.predicting() {
            self.dirty.union_with(&self.held);
            self.held.clear();
        }
        let pending_pages = dirty_pages + held_back - redirtied;
        let duration = now - self.round_start;
        let page_wire = wire::page_frame_len(self.geometry.page_size().bytes()) as u64;
        let decision = self.scheduler.end_round(
            RoundOutcome {
                round: self.round,
                bytes: self.round_report.bytes,
                duration,
                dirty_pages,
                pending_pages,
            },
            now - self.start,
            page_wire,
        );
        let r = &mut self.round_report;
        r.duration = duration;
        r.dirty_pages = dirty_pages;
        r.held_back_redirtied = redirtied;
        r.dirty_rate_pages_per_sec = ByteRate::measured(dirty_pages, duration)
            .0
            .min(u64::MAX - 1);
        r.bandwidth = ByteRate::measured(r.bytes, duration);
        r.estimated_downtime = self.scheduler.estimated_downtime();
        self.report.rounds.push(self.round_report.clone());

        // Next round sends what is pending, less what is predicted hot.
        core::mem::swap(&mut self.to_send, &mut self.dirty);
        self.dirty.clear();
        if let Decision::StopAndCopy(reason) = decision {
            self.enter_stop_and_copy(now, reason, host)?;
        } else if self.predicting() {
            self.held.union_with(&self.to_send);
            self.held.intersect_with(&self.hot);
            self.to_send.difference_with(&self.hot);
        }
        self.begin_round(now);
        self.round_report.held_back = if self.predicting() {
            self.held.count_ones()
        } else {
            0
        };
        self.state = State::Sending { cursor: 0 };
        Ok(())
    }

    fn enter_stop_and_copy<H>(
        &mut self,
        now: Nanos,
        reason: StopReason,
        host: &mut H,
    ) -> Result<(), MigrationError>
    where
        H: PageRead + DirtyLog + SourceGuest,
    {
        host.pause()?;
        self.paused = true;
        self.paused_at = now;
        self.stop_and_copy = true;
        self.report.stop_reason = Some(reason);
        self.report.preparation_time = now - self.start;
        // Pages written between the last sync and the pause.
        host.sync(&mut self.to_send)?;
        Ok(())
    }
}
