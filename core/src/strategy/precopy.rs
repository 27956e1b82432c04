//! Iterative pre-copy (paper 002 after Clark et al.): round 1 sends every page, each later
//! round the pages dirtied during the previous one, at the round's bandwidth limit
//! ([`crate::schedule`]); when a stop rule fires the guest pauses and the last dirty set goes.
//!
//! With a writable-working-set predictor, pages predicted hot are held back from the round
//! (they would only be dirtied again) and always sent by the final round at the latest. A
//! predictor never costs downtime: it holds nothing until its guesses proved right in shadow
//! (what it would have held, against the next dirty-log sync); then at most an eighth of a
//! round, twice as much after a round proves it right, half as much after a half-right one,
//! and nothing once held pages mostly stay clean; held pages the
//! guest did not write again go in the next round or a short release round, never in the
//! pause. The
//! predictor is any [`Predictor`]: one of [`crate::track`]'s, chosen by [`PredictorKind`], or
//! your own through [`PreCopy::with_predictor`].

use alloc::boxed::Box;
use alloc::string::String;

use crate::bitmap::DirtyBitmap;
use crate::error::MigrationError;
use crate::memory::{sync_all, SourceHost};
use crate::report::StopReason;
use crate::schedule::{self, RatePlan, RoundOutcome, Scheduler, StopRules};
use crate::time::{ByteRate, Nanos};
use crate::track::{Predictor, PredictorKind};

use super::postcopy::PageRequests;
use super::{Decision, Strategy, StrategyContext};
use crate::wire::U64List;

/// Settings of a pre-copy migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreCopyConfig {
    /// Per-round bandwidth limits. Default: none.
    pub rate: RatePlan,
    /// When the rounds end.
    pub stop: StopRules,
    /// How many bytes the convenience driver [`crate::session::Source::poll`] offers per call.
    /// Default 1 MiB, the write size at which loopback TCP reaches full speed.
    pub batch_bytes: usize,
    /// Hash the source's memory after switchover and have the destination compare. Default on.
    pub verify: bool,
    /// With `verify`: compare before the destination starts instead (inside the downtime; see
    /// [`crate::session::SessionConfig::verify_before_start`]). Default off.
    pub verify_before_start: bool,
    /// Which of the built-in predictors holds hot pages back. Default none (plain pre-copy).
    pub predictor: PredictorKind,
    /// Dirty-log samples taken during round 1 to teach the predictor the working set before
    /// round 2 (paper 002's pre-processing phase). Default 4; ignored without a predictor.
    pub learning_samples: u32,
    /// When the guest outpaces the link ([`StopRules::outpaced_rounds`]): throttle it
    /// ([`crate::memory::SourceGuest::throttle`]: 20%, then 10% more each time, up to 99%) and
    /// go on, instead of stopping the rounds at once. A host that cannot throttle stops them.
    /// Default off.
    pub throttle_when_outpaced: bool,
    /// When the guest outpaces the link: hand over to post-copy (hybrid) instead of stopping
    /// the rounds or throttling. The guest pauses only for its device state; the pages still
    /// to send (named to the destination as stale, `Discard`) follow the switchover, those its
    /// guest asks for first. Needs a destination that places pages once
    /// ([`crate::receive::FirstCopyWins`]) and serves its guest's faults. Takes precedence over
    /// `throttle_when_outpaced`. Default off.
    pub post_copy_when_outpaced: bool,
}

impl Default for PreCopyConfig {
    fn default() -> Self {
        PreCopyConfig {
            rate: RatePlan::default(),
            stop: StopRules::default(),
            batch_bytes: 1 << 20,
            verify: true,
            verify_before_start: false,
            predictor: PredictorKind::None,
            learning_samples: 4,
            throttle_when_outpaced: false,
            post_copy_when_outpaced: false,
        }
    }
}

/// The pre-copy strategy.
pub struct PreCopy {
    config: PreCopyConfig,
    scheduler: Scheduler,
    predictor: Option<Box<dyn Predictor + Send>>,
    /// Pages dirtied during the current round (at its end: everything still to send).
    dirty: DirtyBitmap,
    /// Scratch for one dirty-log sync.
    sample: DirtyBitmap,
    /// Pages held back as predicted hot, not yet sent since they were last dirtied.
    held: DirtyBitmap,
    /// Scratch for the predicted-hot set.
    hot: DirtyBitmap,
    next_sample_at: u64,
    sample_interval: u64,
    /// What the predictor's guesses have shown so far. It holds pages back only once its
    /// guesses proved right, judged in shadow (what it would have held, against the next
    /// sync) before it holds anything, and stops for good when pages it held stay clean.
    trust: Trust,
    /// Shadow judgment: the pages the predictor would have held since the last sync.
    shadow: DirtyBitmap,
    /// Shadow judgment so far: pages it would have held, and of those, pages written again.
    shadow_held: u64,
    shadow_redirtied: u64,
    /// The predictor has held pages back at least once.
    ever_held: bool,
    /// The most pages a hold may have, once a round judged one (before: an eighth of the
    /// round). Trust follows proof: a hold most of whose pages were written again lets the
    /// next be twice as large; one of which a quarter to a half were lets it be half as
    /// large; fewer, and the predictor stops.
    hold_cap: Option<u64>,
    /// A stop rule fired while pages held back were still unsent: this round sends them
    /// while the guest runs, and stop-and-copy follows for this reason.
    releasing: Option<StopReason>,
    /// The guest's throttle, in percent (0: none).
    throttle: u8,
    /// Scratch: held pages the guest did not write again.
    release: DirtyBitmap,
    /// The release round has run (it runs once).
    released: bool,
    /// The rounds handed over to post-copy: the pages still to send follow the switchover.
    post_copy: bool,
    /// Post-copy phase: the destination's page requests.
    requests: PageRequests,
    /// The caller asked for the switchover at the end of this round.
    switchover_requested: bool,
}

/// A predictor is judged once it held back (or, in shadow, would have held back) at least
/// this many pages.
const JUDGED_HOLD_BACK: u64 = 32;

/// What a predictor's guesses have shown on this workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trust {
    /// Not judged yet: it holds nothing; its guesses are checked in shadow.
    Unjudged,
    /// Most pages it held (or would have held) were written again: it holds pages back.
    Right,
    /// Most stayed clean: it holds nothing for the rest of the migration.
    Wrong,
}

impl PreCopy {
    /// Pre-copy with `config` (its predictor is built from `config.predictor`).
    pub fn new(config: PreCopyConfig) -> Self {
        let mut p = PreCopy {
            config,
            scheduler: Scheduler::new(config.rate, scheduler_rules(&config)),
            predictor: None,
            dirty: DirtyBitmap::new(0),
            sample: DirtyBitmap::new(0),
            held: DirtyBitmap::new(0),
            hot: DirtyBitmap::new(0),
            next_sample_at: u64::MAX,
            sample_interval: u64::MAX,
            trust: Trust::Unjudged,
            shadow: DirtyBitmap::new(0),
            shadow_held: 0,
            shadow_redirtied: 0,
            ever_held: false,
            hold_cap: None,
            releasing: None,
            throttle: 0,
            release: DirtyBitmap::new(0),
            released: false,
            post_copy: false,
            requests: PageRequests::default(),
            switchover_requested: false,
        };
        p.predictor = match config.predictor {
            PredictorKind::None => None,
            // Built at start, when the page count is known.
            _ => Some(Box::new(crate::track::NoPrediction)),
        };
        p
    }

    /// Pre-copy holding back the pages `predictor` says are hot: any [`Predictor`], from this
    /// crate or yours. `config.predictor` is ignored.
    pub fn with_predictor(config: PreCopyConfig, predictor: Box<dyn Predictor + Send>) -> Self {
        let mut p = Self::new(PreCopyConfig {
            predictor: PredictorKind::None,
            ..config
        });
        p.predictor = Some(predictor);
        p
    }

    /// The scheduler (rate limits and stop rules), for inspection.
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Changes the downtime target mid-migration (it applies from the next round's end).
    pub fn set_downtime_target(&mut self, target: Nanos) {
        self.config.stop.downtime_target = target;
        self.scheduler.set_rules(scheduler_rules(&self.config));
    }

    /// Changes the largest downtime accepted mid-migration ([`StopRules::max_downtime`]).
    pub fn set_max_downtime(&mut self, max: Option<Nanos>) {
        self.config.stop.max_downtime = max;
        self.scheduler.set_rules(scheduler_rules(&self.config));
    }

    /// Changes the bandwidth plan mid-migration (it applies from the next round).
    pub fn set_rate(&mut self, rate: RatePlan) {
        self.config.rate = rate;
        self.scheduler.set_plan(rate);
    }

    fn predicting(&self) -> bool {
        self.predictor.is_some()
    }
}

impl Strategy for PreCopy {
    fn name(&self) -> String {
        match (&self.predictor, self.config.predictor) {
            (None, _) => String::from("pre-copy"),
            // Not built before `start`: name it from the configuration.
            (Some(_), kind) if kind != PredictorKind::None => {
                alloc::format!("pre-copy+{}", kind.name())
            }
            (Some(p), _) => alloc::format!("pre-copy+{}", p.name()),
        }
    }

    fn start(&mut self, _now: Nanos, cx: &mut StrategyContext<'_>) -> Result<(), MigrationError> {
        let pages = cx.layout.page_count();
        self.requests = PageRequests::new(pages);
        if self.config.predictor != PredictorKind::None {
            self.predictor = Some(self.config.predictor.build(pages));
        }
        self.dirty = DirtyBitmap::new(pages);
        if self.predicting() {
            self.sample = DirtyBitmap::new(pages);
            self.held = DirtyBitmap::new(pages);
            self.hot = DirtyBitmap::new(pages);
            self.shadow = DirtyBitmap::new(pages);
            if self.config.learning_samples > 0 {
                self.sample_interval = (pages / (self.config.learning_samples as u64 + 1)).max(1);
                self.next_sample_at = self.sample_interval;
            }
        }
        cx.send.fill();
        Ok(())
    }

    fn rate_limit(&self) -> ByteRate {
        self.scheduler.limit()
    }

    fn final_rate_limit(&self) -> ByteRate {
        self.scheduler.final_limit()
    }

    fn held_back(&self) -> u64 {
        if self.predicting() {
            self.held.count_ones()
        } else {
            0
        }
    }

    /// The pre-processing phase: short dirty-log samples during round 1, shown to the
    /// predictor so it knows the working set before round 2 decides what to hold back.
    fn during_round(
        &mut self,
        now: Nanos,
        cx: &mut StrategyContext<'_>,
        host: &mut dyn SourceHost,
    ) -> Result<(), MigrationError> {
        if cx.round.round != 1 || cx.round.pages < self.next_sample_at {
            return Ok(());
        }
        let Some(predictor) = self.predictor.as_mut() else {
            return Ok(());
        };
        self.sample.clear();
        sync_all(cx.layout, host, &mut self.sample)?;
        if self.trust == Trust::Unjudged {
            // Judge the guesses in shadow, as end_round does: what the predictor would have
            // held at the previous sample, against what the guest wrote since.
            self.hot.clear();
            predictor.predict(now, &mut self.hot);
            judge_shadow(
                &mut self.trust,
                &mut self.shadow,
                &self.hot,
                &self.sample,
                (&mut self.shadow_held, &mut self.shadow_redirtied),
            );
        }
        predictor.observe(&self.sample, now);
        self.dirty.union_with(&self.sample);
        self.next_sample_at = self.next_sample_at.saturating_add(self.sample_interval);
        Ok(())
    }

    fn end_round(
        &mut self,
        now: Nanos,
        cx: &mut StrategyContext<'_>,
        host: &mut dyn SourceHost,
    ) -> Result<Decision, MigrationError> {
        if let Some(predictor) = self.predictor.as_mut() {
            self.sample.clear();
            sync_all(cx.layout, host, &mut self.sample)?;
            // Predict before observing this sync: the recency predictors count the sync just
            // observed as recent, so predicting after it would hold back everything dirty.
            self.hot.clear();
            predictor.predict(now, &mut self.hot);
            predictor.observe(&self.sample, now);
            self.dirty.union_with(&self.sample);
        } else {
            sync_all(cx.layout, host, &mut self.dirty)?;
        }
        let dirty_pages = self.dirty.count_ones();
        let held_back = cx.round.held_back;
        let redirtied = if held_back > 0 {
            self.held.count_intersection(&self.dirty)
        } else {
            0
        };
        // A predictor whose held pages mostly stay clean is wrong on this workload: it only
        // delays pages to the end. Half right, it may hold half as much next round; mostly
        // wrong (or shrunk to nothing), it stops holding back for the rest of the migration.
        if self.trust == Trust::Right && held_back >= JUDGED_HOLD_BACK {
            if redirtied * 2 >= held_back {
                let grown = held_back.saturating_mul(2);
                self.hold_cap = Some(self.hold_cap.map_or(grown, |cap| cap.max(grown)));
            } else if redirtied * 4 >= held_back && held_back / 2 >= JUDGED_HOLD_BACK {
                self.hold_cap = Some(held_back / 2);
            } else {
                self.trust = Trust::Wrong;
            }
        }
        // Before it holds anything, its guesses are judged in shadow: a wrong guess would
        // have delayed a page to a later, longer round, and that costs downtime.
        if self.trust == Trust::Unjudged && self.predicting() {
            judge_shadow(
                &mut self.trust,
                &mut self.shadow,
                &self.hot,
                &self.sample,
                (&mut self.shadow_held, &mut self.shadow_redirtied),
            );
        }
        // Held pages the guest did not write again (after a release round: pages kept for
        // stop-and-copy that it did not write again either).
        let unsent_held = held_back - redirtied;
        let releasing = self.releasing.take();
        if unsent_held > 0 && releasing.is_none() {
            self.release.clone_from(&self.held);
            self.release.difference_with(&self.dirty);
        }
        // Everything still to send: this round's dirt and what it held back.
        if self.predicting() {
            self.dirty.union_with(&self.held);
            self.held.clear();
        }
        // The downtime a stop now would cost: this round's dirt. Held pages the guest did not
        // write again are sent in a short release round before the pause, never in the
        // downtime; after that round, everything pending goes in the downtime.
        let downtime_pages = if releasing.is_some() {
            dirty_pages + unsent_held
        } else {
            dirty_pages
        };
        // The session pauses only once the transport's buffers have drained; the guest keeps
        // writing meanwhile, at this round's rate, and those pages join the final round.
        let drain = cx
            .link_rate
            .map_or(Nanos::ZERO, |rate| rate.time_for(cx.backlog_bytes));
        let backlog_pages = if cx.round.duration == Nanos::ZERO {
            0
        } else {
            ((dirty_pages as u128 * drain.0 as u128).div_ceil(cx.round.duration.0 as u128))
                .min(self.dirty.len() as u128) as u64
        };
        let r = &mut *cx.round;
        let decision = self.scheduler.end_round(
            RoundOutcome {
                round: r.round,
                bytes: r.bytes,
                duration: r.duration,
                dirty_pages,
                pending_pages: dirty_pages + unsent_held + backlog_pages,
                downtime_pages: downtime_pages + backlog_pages,
                payload_pages: r.pages.saturating_sub(r.zero_pages),
            },
            cx.elapsed,
            cx.page_wire_bytes,
            cx.link_rate,
        );
        r.dirty_pages = dirty_pages;
        r.held_back_redirtied = redirtied;
        r.dirty_rate_pages_per_sec = ByteRate::measured(dirty_pages, r.duration)
            .0
            .min(u64::MAX - 1);
        r.bandwidth = self
            .scheduler
            .bandwidth()
            .unwrap_or(ByteRate::measured(r.bytes, r.duration));
        r.estimated_downtime = self.scheduler.estimated_downtime();

        // Next round sends what is pending, less what is predicted hot.
        core::mem::swap(cx.send, &mut self.dirty);
        self.dirty.clear();
        let decision = match (decision, releasing) {
            (schedule::Decision::Continue { .. }, _) if self.switchover_requested => {
                schedule::Decision::StopAndCopy(StopReason::Requested)
            }
            // The release round was the last before the pause: more rounds, holding nothing,
            // would only let the pending set grow back (a rule waiting for a low, say).
            (schedule::Decision::Continue { .. }, Some(reason)) => {
                schedule::Decision::StopAndCopy(reason)
            }
            (d, _) => d,
        };
        // Cancel rather than pause for longer than the largest downtime accepted (Cloud
        // Hypervisor's TimeoutStrategy::Cancel): the guest runs on here, nothing lost.
        if let (schedule::Decision::StopAndCopy(reason), Some(max)) =
            (decision, self.config.stop.max_downtime)
        {
            let estimate = self.scheduler.estimated_downtime();
            if estimate > max && !self.config.post_copy_when_outpaced {
                return Err(MigrationError::Cancelled(alloc::format!(
                    "the rounds stopped ({}) with an estimated downtime of {estimate}, above the most accepted ({max}): cancelled instead, the guest runs on here",
                    reason.as_str()
                )));
            }
        }
        let hand_over = self.config.post_copy_when_outpaced
            && matches!(
                decision,
                schedule::Decision::StopAndCopy(StopReason::NotConverging)
            )
            && self.scheduler.outpaced();
        let decision = match decision {
            // Hybrid: nothing pending costs downtime once pages follow the switchover, so no
            // release round either.
            schedule::Decision::StopAndCopy(reason) if hand_over => {
                self.post_copy = true;
                return Ok(Decision::StopAndCopy(reason));
            }
            schedule::Decision::StopAndCopy(reason)
                if unsent_held > 0 && releasing.is_none() && !self.released =>
            {
                self.released = true;
                // Held pages the guest did not write again would go in the downtime: send
                // them alone in one short round while the guest runs. The rest waits for the
                // pause (as the "held back" of that round), with what the guest writes
                // meanwhile.
                self.releasing = Some(reason);
                self.held.clone_from(cx.send);
                self.held.difference_with(&self.release);
                cx.send.clone_from(&self.release);
                return Ok(Decision::NextRound);
            }
            schedule::Decision::StopAndCopy(StopReason::NotConverging)
                if self.config.throttle_when_outpaced
                    && self.scheduler.outpaced()
                    && self.throttle < 99 =>
            {
                // Slow the guest down and go on (QEMU's auto-converge).
                let next = if self.throttle == 0 {
                    20
                } else {
                    (self.throttle + 10).min(99)
                };
                match host.throttle(next) {
                    Ok(()) => {
                        self.throttle = next;
                        self.scheduler.restart_convergence();
                        schedule::Decision::Continue {
                            limit: self.scheduler.limit(),
                        }
                    }
                    Err(_) => decision,
                }
            }
            d => d,
        };
        match decision {
            schedule::Decision::StopAndCopy(reason) => Ok(Decision::StopAndCopy(reason)),
            schedule::Decision::Continue { .. } => {
                // After the release round the migration is at its end: hold nothing more, and
                // let the rules decide on what is left.
                if self.predicting() && self.trust == Trust::Right && !self.released {
                    // Only pages the guest wrote in this round may be held back again.
                    self.hot.intersect_with(&self.sample);
                    self.held.union_with(cx.send);
                    self.held.intersect_with(&self.hot);
                    // Right in shadow (on round 1's shorter samples, say) is not yet right on
                    // rounds, and right on 40 pages is not right on 4,000: a hold is at most an
                    // eighth of the round until a round judged one, then what `hold_cap` says,
                    // so a wrong guess costs little (a recorded SQLite run: proven on 38 pages,
                    // it then held 2,490 of which 14 were written again).
                    let cap = self
                        .hold_cap
                        .unwrap_or_else(|| (cx.send.count_ones() / 8).max(JUDGED_HOLD_BACK));
                    self.held.keep_first_ones(cap);
                    cx.send.difference_with(&self.held);
                    self.ever_held |= self.held.count_ones() > 0;
                }
                Ok(Decision::NextRound)
            }
        }
    }

    fn explain_stop(&self) -> String {
        let mut why = String::from(self.scheduler.explanation());
        if self.throttle > 0 {
            why.push_str(&alloc::format!(" (guest throttled to {}%)", self.throttle));
        }
        if self.predicting() && self.trust == Trust::Wrong {
            why.push_str(if self.ever_held {
                "; the predictor stopped holding pages back: most stayed clean"
            } else {
                "; the predictor held no page back: most of the pages it would have held stayed clean"
            });
        } else if self.predicting() && self.trust == Trust::Unjudged {
            why.push_str("; the predictor held no page back: too few guesses to judge them");
        }
        if self.post_copy {
            why.push_str("; handed over to post-copy: the pages still to send follow the switchover, those the destination's guest asks for first");
        }
        why
    }

    fn pages_after_switchover(&self) -> bool {
        self.post_copy
    }

    fn switchover_now(&mut self) {
        self.switchover_requested = true;
    }

    fn on_page_request(&mut self, _now: Nanos, pages: U64List<'_>) -> Result<(), MigrationError> {
        if !self.post_copy {
            return Err(MigrationError::UnexpectedFrame {
                expected: "no page requests before a hand-over to post-copy",
                got: crate::wire::FrameKind::PageRequest,
            });
        }
        self.requests.take(pages)
    }

    fn next_urgent_page(&mut self) -> Option<u64> {
        self.requests.pop()
    }

    fn throttle_percent(&self) -> u8 {
        self.throttle
    }

    fn final_round(
        &mut self,
        _now: Nanos,
        cx: &mut StrategyContext<'_>,
        host: &mut dyn SourceHost,
    ) -> Result<(), MigrationError> {
        // Pages written between the last sync and the pause.
        sync_all(cx.layout, host, cx.send)?;
        Ok(())
    }
}

/// One shadow judgment of a predictor that holds nothing yet: `shadow` (the pages it would
/// have held at the previous sync) against `written` (the pages written since); then the next
/// shadow, `hot ∩ written`, exactly the set it would hold now. Once it would have held
/// [`JUDGED_HOLD_BACK`] pages in all, it is right if most of them were written again.
fn judge_shadow(
    trust: &mut Trust,
    shadow: &mut DirtyBitmap,
    hot: &DirtyBitmap,
    written: &DirtyBitmap,
    (held, redirtied): (&mut u64, &mut u64),
) {
    let would_hold = shadow.count_ones();
    if would_hold > 0 {
        *held += would_hold;
        *redirtied += shadow.count_intersection(written);
    }
    if *held >= JUDGED_HOLD_BACK {
        *trust = if *redirtied * 2 >= *held {
            Trust::Right
        } else {
            Trust::Wrong
        };
    }
    shadow.clone_from(hot);
    shadow.intersect_with(written);
}

/// The stop rules the scheduler applies: a policy that acts on non-convergence other than by
/// stopping (throttle, hand over to post-copy) acts at once, without waiting for a low.
fn scheduler_rules(config: &PreCopyConfig) -> StopRules {
    let mut rules = config.stop;
    if config.throttle_when_outpaced || config.post_copy_when_outpaced {
        rules.settle_rounds = 0;
    }
    rules
}
