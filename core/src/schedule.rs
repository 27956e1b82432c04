//! The round scheduler: Clark's round-bandwidth rule, the measured dirty rate and bandwidth,
//! and the rules that end the pre-copy rounds (paper 002 after Clark et al.; paper 004's
//! user-set maximum number of rounds).
//!
//! - [`RatePlan`]: round 1 runs at `first_round`; each later round's limit is raised by
//!   `increment` (and to at least the previous round's dirty rate plus `increment`, Clark's
//!   formulation), never above `max`. Stop-and-copy runs at `max`.
//! - [`StopRules`]: stop when the estimated downtime is at or below the target, after a maximum
//!   number of rounds, when the dirty set stops shrinking (or the dirty rate reaches the
//!   bandwidth) for k rounds, or at a deadline.
//! - [`Scheduler`]: applies both at the end of each round and says which rule fired.
//! - [`DeliveryEstimator`]: the link's real rate, from bytes the transport reports delivered
//!   (written to the wire or acknowledged by the peer) over a window of at least
//!   [`DeliveryEstimator::WINDOW`], not from bytes dropped into a socket buffer. A small last
//!   round handed to a deep buffer at memcpy speed says nothing about the link; timing it would
//!   make the downtime estimate far too low and stop-and-copy too early.

use alloc::collections::VecDeque;
use alloc::string::String;

use crate::report::StopReason;
use crate::time::{ByteRate, Nanos};

/// Estimates the link's rate from delivery reports while the link had a backlog.
#[derive(Clone, Debug, Default)]
pub struct DeliveryEstimator {
    /// (time, bytes delivered so far) since the backlog last emptied, oldest first.
    samples: VecDeque<(Nanos, u64)>,
    handed: u64,
    delivered: u64,
    reported: bool,
}

impl DeliveryEstimator {
    /// The shortest span a rate is measured over, when that much history exists.
    pub const WINDOW: Nanos = Nanos::from_millis(100);
    const MAX_SAMPLES: usize = 4096;

    /// An estimator with no history.
    pub fn new() -> Self {
        Self::default()
    }

    /// The engine handed `bytes` more to the transport at `now`.
    pub fn handed(&mut self, now: Nanos, bytes: u64) {
        if self.handed == self.delivered {
            // The link was idle until now: a window must not span the idle time.
            self.samples.clear();
            self.samples.push_back((now, self.delivered));
        }
        self.handed += bytes;
    }

    /// The transport reports `bytes` more delivered at `now`.
    pub fn delivered(&mut self, now: Nanos, bytes: u64) {
        self.reported = true;
        self.delivered = (self.delivered + bytes).min(self.handed);
        if self.samples.len() == Self::MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((now, self.delivered));
        // Keep only what the newest window needs: drop samples older than the newest one that
        // is already a full window old.
        while self.samples.len() > 2 && now - self.samples[1].0 >= Self::WINDOW {
            self.samples.pop_front();
        }
    }

    /// The transport (or the peer) reports everything up to a running total of `total` bytes
    /// delivered: reports the difference, if any.
    pub fn delivered_up_to(&mut self, now: Nanos, total: u64) {
        let total = total.min(self.handed);
        if total > self.delivered {
            self.delivered(now, total - self.delivered);
        } else {
            self.reported = true;
        }
    }

    /// `bytes` counted as handed were never sent after all (an encoding took less than planned).
    pub fn unhand(&mut self, bytes: u64) {
        self.handed = self.handed.saturating_sub(bytes).max(self.delivered);
    }

    /// Bytes handed to the transport so far.
    pub fn handed_total(&self) -> u64 {
        self.handed
    }

    /// Whether the transport ever reported a delivery.
    pub fn has_reports(&self) -> bool {
        self.reported
    }

    /// Bytes handed but not yet delivered (in socket buffers and in flight).
    pub fn backlog(&self) -> u64 {
        self.handed - self.delivered
    }

    /// The delivery rate over the newest window of at least [`Self::WINDOW`] (or all the
    /// history since the link was last idle, if shorter); `None` without delivery reports.
    pub fn rate(&self) -> Option<ByteRate> {
        let (&(t0, b0), &(t1, b1)) = (self.samples.front()?, self.samples.back()?);
        if t1 <= t0 || b1 <= b0 {
            return None;
        }
        Some(ByteRate::measured(b1 - b0, t1 - t0))
    }
}

/// Per-round bandwidth limits (Clark's rule). The default is no limit at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RatePlan {
    /// The limit of round 1.
    pub first_round: ByteRate,
    /// How much each later round's limit rises.
    pub increment: ByteRate,
    /// The highest limit, also used for stop-and-copy.
    pub max: ByteRate,
}

impl Default for RatePlan {
    fn default() -> Self {
        RatePlan::fixed(ByteRate::UNLIMITED)
    }
}

impl RatePlan {
    /// The same limit in every round (`ByteRate::UNLIMITED` for none).
    pub const fn fixed(rate: ByteRate) -> Self {
        RatePlan {
            first_round: rate,
            increment: ByteRate(0),
            max: rate,
        }
    }

    /// Clark's adaptive plan: start at `first_round`, rise by `increment`, cap at `max`.
    pub const fn adaptive(first_round: ByteRate, increment: ByteRate, max: ByteRate) -> Self {
        RatePlan {
            first_round,
            increment,
            max,
        }
    }

    /// The limit of the round after one that ran at `previous` while the guest dirtied memory at
    /// `dirty_rate` (bytes per second).
    pub fn next_limit(&self, previous: ByteRate, dirty_rate: ByteRate) -> ByteRate {
        let raised = previous
            .saturating_add(self.increment)
            .max(dirty_rate.saturating_add(self.increment));
        raised.min(self.max)
    }
}

/// When the pre-copy rounds end. Every rule can be turned off; defaults are documented per field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopRules {
    /// Stop once remaining dirty bytes / measured bandwidth is at or below this.
    /// Default 300 ms, as QEMU's and Cloud Hypervisor's default downtime limit.
    pub downtime_target: Nanos,
    /// Stop after this many pre-copy rounds (paper 004's user-set maximum). Default 30.
    pub max_rounds: u32,
    /// Stop when, for this many consecutive rounds, the dirty set did not reach a new minimum
    /// (by at least [`StopRules::min_shrink_permille`]) or the dirty rate was at least the
    /// bandwidth. Default 5; 0 turns the rule off.
    pub non_convergence_rounds: u32,
    /// How much (in thousandths) a dirty set must shrink below the smallest so far to count as
    /// progress. Default 50 (5%).
    pub min_shrink_permille: u32,
    /// Stop the rounds once this much time has passed since migration started. Default: none.
    pub deadline: Option<Nanos>,
    /// Early non-convergence: stop (or throttle, by policy) after this many consecutive rounds
    /// in which the guest dirtied memory at [`StopRules::outpaced_permille`] of the bandwidth
    /// or more and the dirty set did not shrink (round 1 counts: it has no earlier set). Such
    /// a migration can only resend memory. Default 2; 0 turns the rule off.
    pub outpaced_rounds: u32,
    /// What share (in thousandths) of the bandwidth a dirty rate must reach to outpace the
    /// link. Default 900.
    pub outpaced_permille: u32,
    /// The largest downtime accepted: when the rounds stop (for any reason) with a higher
    /// estimate, the migration is cancelled instead and the guest runs on at the source
    /// (Cloud Hypervisor's `TimeoutStrategy::Cancel`). Default: none (always switch over).
    pub max_downtime: Option<Nanos>,
    /// When a non-convergence rule fires on a round whose stop-and-copy set is more than 10%
    /// above the smallest seen, go on for up to this many more rounds, stopping at the first
    /// that comes back near that low. A guest whose dirty set swings from round to round
    /// (real programs do, by 2× and more) then pauses near a low, not wherever the rule
    /// happened to fire. Default 2; 0 stops at once (the pre-copy strategy uses 0 when its
    /// policy throttles or hands over to post-copy instead of stopping).
    pub settle_rounds: u32,
}

impl Default for StopRules {
    fn default() -> Self {
        StopRules {
            downtime_target: Nanos::from_millis(300),
            max_rounds: 30,
            non_convergence_rounds: 5,
            min_shrink_permille: 50,
            deadline: None,
            outpaced_rounds: 2,
            outpaced_permille: 900,
            max_downtime: None,
            settle_rounds: 2,
        }
    }
}

/// What the scheduler learnt from one finished pre-copy round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundOutcome {
    /// The round that finished, from 1.
    pub round: u32,
    /// Bytes the round put on the wire.
    pub bytes: u64,
    /// How long the round took, transmission included.
    pub duration: Nanos,
    /// Pages dirtied while the round ran.
    pub dirty_pages: u64,
    /// Pages stop-and-copy would have to send now: the dirtied pages and any held back as
    /// predicted hot. Equal to `dirty_pages` without a predictor.
    pub pending_pages: u64,
    /// Of those, the pages that would cross the link inside the downtime (a predictor's
    /// strategy may send its held pages in a release round first). The downtime estimate
    /// counts these; convergence is judged on all pending pages.
    pub downtime_pages: u64,
    /// Pages the round sent with a payload (not as zero pages): with `bytes`, what a dirty
    /// page costs on the wire once a codec shrinks pages. 0: not measured (raw pages assumed).
    pub payload_pages: u64,
}

/// The scheduler's verdict at the end of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run another round at this limit.
    Continue {
        /// The next round's bandwidth limit.
        limit: ByteRate,
    },
    /// Pause the guest and copy what is left.
    StopAndCopy(StopReason),
}

/// Round-by-round bookkeeping for [`RatePlan`] and [`StopRules`].
#[derive(Clone, Debug)]
pub struct Scheduler {
    plan: RatePlan,
    rules: StopRules,
    limit: ByteRate,
    bandwidth: Option<ByteRate>,
    smallest_dirty: u64,
    stalled_rounds: u32,
    /// Consecutive rounds the dirty rate outran the link without the dirty set shrinking.
    outpaced_rounds: u32,
    last_dirty_rate: ByteRate,
    last_estimate: Nanos,
    /// The smallest stop-and-copy set (pages) any round ended with.
    smallest_downtime_pages: u64,
    /// Extra rounds taken so far waiting for a low after a non-convergence rule fired.
    settling: u32,
    /// Why the last decision was taken, in words (for the report).
    why: String,
    /// Wire bytes a dirty page costs, measured on the last round after the first that sent
    /// enough pages with a payload ([`MIN_COST_PAGES`]); `None` until then (a raw page is
    /// assumed).
    page_cost: Option<u64>,
}

/// A round must send at least this many pages with a payload for its bytes per page to be
/// taken as what a dirty page costs.
const MIN_COST_PAGES: u64 = 64;

/// Rounds shorter than this or smaller than [`MIN_SAMPLE_BYTES`] give a noisy bandwidth sample;
/// the previous estimate is kept instead.
const MIN_SAMPLE_TIME: Nanos = Nanos::from_millis(1);
const MIN_SAMPLE_BYTES: u64 = 1 << 20;

impl Scheduler {
    /// A scheduler at the start of round 1.
    pub fn new(plan: RatePlan, rules: StopRules) -> Self {
        Scheduler {
            plan,
            rules,
            limit: plan.first_round,
            bandwidth: None,
            smallest_dirty: u64::MAX,
            stalled_rounds: 0,
            outpaced_rounds: 0,
            last_dirty_rate: ByteRate(0),
            last_estimate: Nanos::ZERO,
            smallest_downtime_pages: u64::MAX,
            settling: 0,
            why: String::new(),
            page_cost: None,
        }
    }

    /// Why the last decision was taken: which rule fired and on what figures.
    pub fn explanation(&self) -> &str {
        &self.why
    }

    /// Whether the last stop came from the early rule: the guest outpaces the link.
    pub fn outpaced(&self) -> bool {
        self.rules.outpaced_rounds > 0 && self.outpaced_rounds >= self.rules.outpaced_rounds
    }

    /// The guest was throttled after the link was outpaced: count afresh.
    pub fn restart_convergence(&mut self) {
        self.outpaced_rounds = 0;
        self.stalled_rounds = 0;
        self.smallest_dirty = u64::MAX;
    }

    /// New stop rules, from the next round's end on.
    pub fn set_rules(&mut self, rules: StopRules) {
        self.rules = rules;
    }

    /// A new bandwidth plan, from the next round on (the round in progress keeps its limit
    /// unless the new plan's first limit is lower).
    pub fn set_plan(&mut self, plan: RatePlan) {
        self.plan = plan;
        if plan.first_round.0 < self.limit.0 {
            self.limit = plan.first_round;
        }
    }

    /// The current round's bandwidth limit.
    pub fn limit(&self) -> ByteRate {
        self.limit
    }

    /// The stop-and-copy limit.
    pub fn final_limit(&self) -> ByteRate {
        self.plan.max
    }

    /// The bandwidth measured so far (bytes per second), if any round has been measured.
    pub fn bandwidth(&self) -> Option<ByteRate> {
        self.bandwidth
    }

    /// The dirty rate of the last finished round, in bytes per second.
    pub fn dirty_rate(&self) -> ByteRate {
        self.last_dirty_rate
    }

    /// The downtime estimated at the end of the last round.
    pub fn estimated_downtime(&self) -> Nanos {
        self.last_estimate
    }

    /// Wire bytes one dirty page costs, as last measured (`None`: a raw page).
    pub fn page_cost(&self) -> Option<u64> {
        self.page_cost
    }

    /// Records a finished round and decides what comes next. `elapsed` is the time since the
    /// migration started; `page_wire_bytes` is what one raw dirty page costs on the wire (a
    /// codec's pages cost what the rounds measure, [`RoundOutcome::payload_pages`], never more);
    /// `link_rate` is the delivery-based estimate ([`DeliveryEstimator::rate`]), used in place
    /// of the round's own bytes over duration when the transport reports deliveries.
    pub fn end_round(
        &mut self,
        outcome: RoundOutcome,
        elapsed: Nanos,
        page_wire_bytes: u64,
        link_rate: Option<ByteRate>,
    ) -> Decision {
        if let Some(rate) = link_rate {
            // Measured from deliveries: the only honest figure when the transport buffers.
            self.bandwidth = Some(rate);
        } else {
            let sample = ByteRate::measured(outcome.bytes, outcome.duration);
            let trustworthy =
                outcome.duration >= MIN_SAMPLE_TIME || outcome.bytes >= MIN_SAMPLE_BYTES;
            if trustworthy || self.bandwidth.is_none() {
                self.bandwidth = Some(sample);
            }
        }
        let bandwidth = self.bandwidth.unwrap_or(ByteRate::UNLIMITED);
        // A page a codec shrinks costs its encoded size, in the same unit as the bandwidth:
        // counting it raw against a rate of encoded bytes would overstate the downtime by the
        // compression ratio (20x on a mostly idle guest) and call a converging guest outpaced.
        // Round 1 says little about later rounds: it sends content the destination already
        // holds as 16-byte hashes (hash-first) and has no earlier copy to send deltas against.
        // From round 2 on, a round's pages are dirty pages, as the downtime's are.
        if outcome.round >= 2 && outcome.payload_pages >= MIN_COST_PAGES {
            self.page_cost = Some(
                outcome
                    .bytes
                    .div_ceil(outcome.payload_pages)
                    .clamp(1, page_wire_bytes.max(1)),
            );
        }
        let page_wire_bytes = self.page_cost.unwrap_or(page_wire_bytes);
        let dirty_bytes = outcome.dirty_pages.saturating_mul(page_wire_bytes);
        self.last_dirty_rate = if outcome.duration == Nanos::ZERO {
            ByteRate(if dirty_bytes == 0 { 0 } else { u64::MAX - 1 })
        } else {
            ByteRate::measured(dirty_bytes, outcome.duration)
        };
        let pending_bytes = outcome.downtime_pages.saturating_mul(page_wire_bytes);
        self.last_estimate = bandwidth.time_for(pending_bytes);

        let shrank = (outcome.pending_pages as u128) * 1000
            < (self.smallest_dirty as u128)
                * (1000 - self.rules.min_shrink_permille.min(1000)) as u128;
        let outpaced = self.last_dirty_rate >= bandwidth && outcome.dirty_pages > 0;
        if shrank && !outpaced {
            self.stalled_rounds = 0;
        } else {
            self.stalled_rounds += 1;
        }
        // Round 1 has no earlier set to shrink from: its rate alone decides.
        let near_link = (self.last_dirty_rate.0 as u128) * 1000
            >= (bandwidth.0 as u128) * self.rules.outpaced_permille as u128
            && outcome.dirty_pages > 0;
        let first = self.smallest_dirty == u64::MAX;
        if near_link && (first || !shrank) {
            self.outpaced_rounds += 1;
        } else {
            self.outpaced_rounds = 0;
        }
        self.smallest_dirty = self.smallest_dirty.min(outcome.pending_pages);
        self.smallest_downtime_pages = self.smallest_downtime_pages.min(outcome.downtime_pages);

        if self.last_estimate <= self.rules.downtime_target {
            self.why = alloc::format!(
                "estimated downtime {} is within the target {}",
                self.last_estimate,
                self.rules.downtime_target
            );
            return Decision::StopAndCopy(StopReason::DowntimeTarget);
        }
        if let Some(deadline) = self.rules.deadline.filter(|&d| elapsed >= d) {
            self.why = alloc::format!("{elapsed} of pre-copy passed the deadline {deadline}");
            return Decision::StopAndCopy(StopReason::Deadline);
        }
        if outcome.round >= self.rules.max_rounds {
            self.why = alloc::format!("{} rounds, the most allowed", outcome.round);
            return Decision::StopAndCopy(StopReason::MaxRounds);
        }
        let why = if self.rules.outpaced_rounds > 0
            && self.outpaced_rounds >= self.rules.outpaced_rounds
        {
            Some(alloc::format!(
                "the guest dirtied memory at {} against a link of {} for {} round(s) and the dirty set did not shrink: more rounds would only resend memory",
                self.last_dirty_rate,
                bandwidth,
                self.outpaced_rounds
            ))
        } else if self.rules.non_convergence_rounds > 0
            && self.stalled_rounds >= self.rules.non_convergence_rounds
        {
            Some(alloc::format!(
                "the dirty set made no new low (by {}‰) for {} rounds",
                self.rules.min_shrink_permille,
                self.stalled_rounds
            ))
        } else {
            None
        };
        if let Some(why) = why {
            // Near the low: within 10% of the smallest stop-and-copy set seen.
            let near_low = (outcome.downtime_pages as u128) * 10
                <= (self.smallest_downtime_pages as u128) * 11;
            if !near_low && self.settling < self.rules.settle_rounds {
                self.settling += 1;
                self.why = alloc::format!(
                    "{why}; this round's set ({} pages) is above the low ({} pages): one more round ({} of at most {}) to stop nearer it",
                    outcome.downtime_pages,
                    self.smallest_downtime_pages,
                    self.settling,
                    self.rules.settle_rounds
                );
                self.limit = self.plan.next_limit(self.limit, self.last_dirty_rate);
                return Decision::Continue { limit: self.limit };
            }
            self.why = if self.settling > 0 {
                alloc::format!(
                    "{why}; stopped {} round(s) later, with {} pages to copy against a low of {}",
                    self.settling,
                    outcome.downtime_pages,
                    self.smallest_downtime_pages
                )
            } else {
                why
            };
            return Decision::StopAndCopy(StopReason::NotConverging);
        }
        self.settling = 0;
        self.why.clear();
        self.limit = self.plan.next_limit(self.limit, self.last_dirty_rate);
        Decision::Continue { limit: self.limit }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(round: u32, mb: u64, ms: u64, dirty_pages: u64) -> RoundOutcome {
        RoundOutcome {
            round,
            bytes: mb << 20,
            duration: Nanos::from_millis(ms),
            dirty_pages,
            pending_pages: dirty_pages,
            downtime_pages: dirty_pages,
            payload_pages: 0,
        }
    }

    #[test]
    fn clark_rule_raises_the_limit() {
        let mb = |n: u64| ByteRate(n * 1_000_000);
        let plan = RatePlan::adaptive(mb(10), mb(5), mb(40));
        assert_eq!(plan.next_limit(mb(10), mb(1)), mb(15));
        assert_eq!(plan.next_limit(mb(10), mb(30)), mb(35));
        assert_eq!(plan.next_limit(mb(38), mb(0)), mb(40));
        let rules = StopRules {
            downtime_target: Nanos::ZERO,
            non_convergence_rounds: 0,
            ..StopRules::default()
        };
        let mut s = Scheduler::new(plan, rules);
        assert_eq!(s.limit(), mb(10));
        assert_eq!(
            s.end_round(outcome(1, 10, 1000, 100), Nanos::from_secs(1), 4096, None),
            Decision::Continue { limit: mb(15) }
        );
    }

    #[test]
    fn stops_when_downtime_target_met() {
        let mut s = Scheduler::new(RatePlan::default(), StopRules::default());
        // 100 MiB/s measured; 1000 dirty pages of 4 KiB take ~41 ms.
        let d = s.end_round(outcome(1, 100, 1000, 1000), Nanos::from_secs(1), 4096, None);
        assert_eq!(d, Decision::StopAndCopy(StopReason::DowntimeTarget));
        assert!(s.estimated_downtime() < Nanos::from_millis(50));
    }

    #[test]
    fn a_page_a_codec_shrinks_costs_its_encoded_size() {
        let rules = StopRules {
            downtime_target: Nanos::from_millis(20),
            ..StopRules::default()
        };
        // 10,000 pages sent in 10 ms as 1 MB: 100 bytes each, 100 MB/s of encoded bytes.
        let round = |dirty, payload_pages| RoundOutcome {
            round: 2,
            bytes: 1_000_000,
            duration: Nanos::from_millis(10),
            dirty_pages: dirty,
            pending_pages: dirty,
            downtime_pages: dirty,
            payload_pages,
        };
        // Counted raw, 2,000 dirty pages would take 82 ms: no stop, and a guest dirtying
        // 800 MB/s of raw pages against 100 MB/s looks outpaced.
        let mut raw = Scheduler::new(RatePlan::default(), rules);
        assert!(matches!(
            raw.end_round(round(2000, 0), Nanos::from_secs(1), 4096, None),
            Decision::Continue { .. }
        ));
        assert!(raw.estimated_downtime() > Nanos::from_millis(80));
        assert_eq!(raw.page_cost(), None);
        // At 100 bytes a page they take 2 ms: stop-and-copy.
        let mut shrunk = Scheduler::new(RatePlan::default(), rules);
        assert_eq!(
            shrunk.end_round(round(2000, 10_000), Nanos::from_secs(1), 4096, None),
            Decision::StopAndCopy(StopReason::DowntimeTarget)
        );
        assert_eq!(shrunk.page_cost(), Some(100));
        assert_eq!(shrunk.estimated_downtime(), Nanos::from_millis(2));
        // Round 1 does not measure (hash-first pages, no deltas yet).
        let mut first = Scheduler::new(RatePlan::default(), rules);
        first.end_round(
            RoundOutcome {
                round: 1,
                ..round(2000, 10_000)
            },
            Nanos::from_secs(1),
            4096,
            None,
        );
        assert_eq!(first.page_cost(), None);
        // A page never costs more than raw, and a round of few pages does not measure.
        let mut few = Scheduler::new(RatePlan::default(), rules);
        few.end_round(round(2000, 10), Nanos::from_secs(1), 4096, None);
        assert_eq!(few.page_cost(), None);
        few.end_round(round(2000, 100), Nanos::from_secs(1), 4096, None);
        assert_eq!(few.page_cost(), Some(4096));
    }

    #[test]
    fn max_rounds_and_deadline_and_non_convergence() {
        // 80 MB dirty per second against ~105 MB/s: under the bandwidth, never under the target.
        let many = 20_000;
        let rules = StopRules {
            max_rounds: 2,
            non_convergence_rounds: 0,
            ..StopRules::default()
        };
        let mut s = Scheduler::new(RatePlan::default(), rules);
        assert!(matches!(
            s.end_round(outcome(1, 100, 1000, many), Nanos::ZERO, 4096, None),
            Decision::Continue { .. }
        ));
        assert_eq!(
            s.end_round(outcome(2, 100, 1000, many / 2), Nanos::ZERO, 4096, None),
            Decision::StopAndCopy(StopReason::MaxRounds)
        );

        let rules = StopRules {
            deadline: Some(Nanos::from_secs(5)),
            ..StopRules::default()
        };
        let mut s = Scheduler::new(RatePlan::default(), rules);
        assert_eq!(
            s.end_round(outcome(1, 100, 1000, many), Nanos::from_secs(6), 4096, None),
            Decision::StopAndCopy(StopReason::Deadline)
        );

        let rules = StopRules {
            non_convergence_rounds: 3,
            ..StopRules::default()
        };
        let mut s = Scheduler::new(RatePlan::default(), rules);
        let mut decisions = Vec::new();
        for r in 1..=5 {
            decisions.push(s.end_round(outcome(r, 100, 1000, many), Nanos::ZERO, 4096, None));
        }
        // Round 1 sets the first minimum; rounds 2, 3, 4 do not shrink it.
        assert!(matches!(decisions[2], Decision::Continue { .. }));
        assert_eq!(
            decisions[3],
            Decision::StopAndCopy(StopReason::NotConverging)
        );
    }

    /// A non-convergence rule that fires on a round well above the low waits (at most
    /// `settle_rounds`) for a round near the low; without a low in reach it stops anyway.
    #[test]
    fn non_convergence_stops_near_the_low() {
        let rules = StopRules {
            non_convergence_rounds: 2,
            outpaced_rounds: 0,
            ..StopRules::default()
        };
        let run = |sets: &[u64], settle: u32| {
            let mut s = Scheduler::new(
                RatePlan::default(),
                StopRules {
                    settle_rounds: settle,
                    ..rules
                },
            );
            for (i, &pages) in sets.iter().enumerate() {
                let d = s.end_round(
                    outcome(i as u32 + 1, 100, 1000, pages),
                    Nanos::ZERO,
                    4096,
                    None,
                );
                if let Decision::StopAndCopy(reason) = d {
                    assert_eq!(reason, StopReason::NotConverging);
                    return (i + 1, pages, String::from(s.explanation()));
                }
            }
            panic!("never stopped");
        };
        // A swinging set: the rule fires on round 3 (30,000 pages, low 20,000).
        let swing = [20_000, 25_000, 30_000, 21_000, 30_000, 30_000, 30_000];
        assert_eq!(run(&swing, 0).0, 3);
        let (round, pages, why) = run(&swing, 2);
        assert_eq!((round, pages), (4, 21_000));
        assert!(why.contains("stopped 1 round(s) later"), "{why}");
        // No low within reach: it stops after the extra rounds.
        let climbing = [20_000, 25_000, 30_000, 35_000, 40_000, 45_000];
        assert_eq!(run(&climbing, 2).0, 5);
    }
}
