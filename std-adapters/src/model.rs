//! Analytic models of a migration's cost, to print beside simulated and measured figures so a
//! researcher sees where a model is wrong, and lower bounds that no strategy can beat.
//!
//! Implementations:
//! - [`PreCopyModel`]: the pre-copy geometric series of Clark et al., as paper 002 states it
//!   ("the time for transferring memory in round i" from the dirty rate, the memory size and the
//!   bandwidth). Round 1 sends all memory, `V_1 = M`; each round takes `t_i = V_i / B`; the next
//!   round sends what the guest dirtied meanwhile, `V_{i+1} = D · t_i`; hence
//!   `t_i = M · D^(i-1) / B^i` (counting rounds from 1). The rounds end under the same rules as
//!   memferry's scheduler ([`memferry::schedule::StopRules`]), then stop-and-copy sends the rest
//!   and its transfer time is the downtime. [`PreCopyModel::predict`] plays the series round by
//!   round in integer bytes and nanoseconds; [`PreCopyModel::series_round_secs`] is the bare
//!   closed form.
//! - [`HybridModel`]: the timing model of paper 000's hybrid (profile + checkpoint + dirty pages)
//!   migration: `t1 = Vprof/Rtrans1`, `t2 = Vckpt/Rtrans`, `t3 = t4 = Vdp/Rtrans`,
//!   `Tmig = t1 + t2 + t3 + t4`, `Vmig = Vprof + Vckpt + Vdp` (its equations 1 to 6).
//! - [`PreCopyModel::predict_from_dirty_sets`]: the same rounds with the guest's writes read
//!   from its dirty sets ([`DirtySets`]: distinct pages written in each round's window; Akoush et
//!   al., MASCOTS 2010), zero pages sent as headers in round 1, and the drain of the transport
//!   before the pause ([`PreCopyModel::in_flight`]). The simulator feeds it the workload's own
//!   writes at each window's position and reports its error against every run.
//! - Lower bounds: [`least_bytes`] (memory once, minus zero and duplicate pages), which the
//!   simulator fills from the scenario alone, and [`least_downtime`] (a final writable working
//!   set over the bandwidth, for callers that know one).
//!
//! Units everywhere: bytes as `u64`, rates as [`ByteRate`] (bytes per second), times as
//! [`Nanos`]. Nothing here panics or divides by zero: a zero rate makes a transfer of one byte or
//! more take [`Nanos::MAX`], an unlimited rate makes it take no time (the rules of
//! [`ByteRate::time_for`]), and sums saturate.

use memferry::page::PageSize;
use memferry::report::StopReason;
use memferry::schedule::StopRules;
use memferry::time::{ByteRate, Nanos};
use memferry::wire;

/// The most push rounds [`PreCopyModel::predict`] plays out; a larger
/// [`PreCopyModel::max_rounds`] is treated as this many. It bounds the prediction's memory when a
/// caller asks for an effectively endless migration (say `u32::MAX` rounds of a guest that
/// dirties memory faster than the link carries it).
pub const MAX_MODELLED_ROUNDS: u32 = 10_000;

/// What carrying guest memory costs on the wire, per page.
///
/// `wire_bytes(m) = m + ceil(m / page_size) · per_page_overhead`. A `page_size` of zero, or
/// [`WireCost::NONE`], means no overhead: wire bytes equal memory bytes, as in Clark's series.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WireCost {
    /// The page size in bytes (0: no per-page overhead).
    pub page_size: u64,
    /// Bytes each page costs on the wire beyond its contents (headers, checksums).
    pub per_page_overhead: u64,
}

impl WireCost {
    /// No overhead: the wire carries exactly the memory bytes.
    pub const NONE: WireCost = WireCost {
        page_size: 0,
        per_page_overhead: 0,
    };

    /// The cost of memferry's own page entries for uncompressed pages of `page_size`: pages
    /// travel in batch frames, so each costs its entry header ([`wire::PAGE_ENTRY_LEN`]); the
    /// frame's own header is shared by up to a megabyte of pages and left out.
    pub const fn memferry(page_size: PageSize) -> WireCost {
        WireCost {
            page_size: page_size.bytes() as u64,
            per_page_overhead: wire::PAGE_ENTRY_LEN as u64,
        }
    }

    /// The bytes on the wire that carry `memory_bytes` of guest memory (saturating).
    pub fn wire_bytes(&self, memory_bytes: u64) -> u64 {
        if self.page_size == 0 || self.per_page_overhead == 0 {
            return memory_bytes;
        }
        let pages = memory_bytes.div_ceil(self.page_size);
        memory_bytes.saturating_add(pages.saturating_mul(self.per_page_overhead))
    }
}

/// Inputs of the pre-copy geometric series (Clark et al.; paper 002).
///
/// The guest dirties memory at a constant `dirty_rate` (distinct bytes of guest memory per
/// second, so a round never dirties more than `memory_bytes`); the link carries `bandwidth` wire
/// bytes per second in every round, stop-and-copy included (a fixed [`memferry::schedule::RatePlan`];
/// Clark's rising per-round limits are not modelled). Zero pages, compression, working-set
/// prediction, latency and the device state are not modelled either.
///
/// The stop fields mirror [`StopRules`] and are applied at the end of each push round in the
/// scheduler's order: downtime target, deadline, maximum rounds, non-convergence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreCopyModel {
    /// Guest memory size `M`, bytes.
    pub memory_bytes: u64,
    /// Dirty rate `D`, bytes of guest memory per second.
    pub dirty_rate: ByteRate,
    /// Link bandwidth `B`, wire bytes per second.
    pub bandwidth: ByteRate,
    /// What each page costs on the wire ([`WireCost::NONE`] for Clark's series as published).
    pub wire: WireCost,
    /// End the push rounds once the bytes left to send, over `B`, take at most this long.
    pub downtime_target: Nanos,
    /// End the push rounds after this many (round 1, the full copy, always runs, so 0 acts as
    /// 1). Values above [`MAX_MODELLED_ROUNDS`] are treated as that.
    pub max_rounds: u32,
    /// End the push rounds when, for this many consecutive rounds, the dirty set did not reach
    /// a new minimum (by [`PreCopyModel::min_shrink_permille`]) or the dirty rate was at least
    /// the bandwidth. 0 turns the rule off.
    pub non_convergence_rounds: u32,
    /// How much (thousandths) a dirty set must shrink below the smallest so far to count as
    /// progress.
    pub min_shrink_permille: u32,
    /// End the push rounds once this much time has passed since the migration started.
    pub deadline: Option<Nanos>,
    /// End the push rounds after this many consecutive rounds dirtying at
    /// [`PreCopyModel::outpaced_permille`] of the bandwidth or more without a shrinking dirty
    /// set (the scheduler's early non-convergence rule). 0 turns the rule off.
    pub outpaced_rounds: u32,
    /// The share (thousandths) of the bandwidth a dirty rate must reach to count as outpacing.
    pub outpaced_permille: u32,
    /// When a non-convergence rule fires on a round more than 10% above the smallest set seen,
    /// go on for up to this many rounds to stop near it (the scheduler's
    /// [`StopRules::settle_rounds`]).
    pub settle_rounds: u32,
    /// Bytes the transport holds in flight (0 in Clark's series). The source pauses only once
    /// they have drained, and the guest writes meanwhile: a round's estimate counts the pages
    /// it would dirty during the drain at the round's rate (as the engine's does), and the
    /// stop-and-copy sends what the last round and the drain dirtied.
    pub in_flight: u64,
}

/// A workload's dirty-set curve (Akoush et al., "Predicting the performance of virtual machine
/// migration", MASCOTS 2010): how many distinct pages it writes in a window of a given length.
/// Built from the time of each page's first write after an origin. It reads every window as if
/// it started at the origin: right for a workload whose writes do not change over time, wrong
/// for a program that changes phase or ends (see [`DirtySets`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DirtyCurve {
    /// Offsets of first writes from the origin, sorted.
    first_writes: Vec<Nanos>,
    /// How far the measurement went: windows longer than this are read as this long.
    horizon: Nanos,
}

impl DirtyCurve {
    /// A curve from the first-write offsets of distinct pages, measured up to `horizon`.
    pub fn new(mut first_writes: Vec<Nanos>, horizon: Nanos) -> Self {
        first_writes.sort_unstable();
        DirtyCurve {
            first_writes,
            horizon,
        }
    }

    /// Distinct pages written in a window of `length`.
    pub fn pages_in(&self, length: Nanos) -> u64 {
        let length = length.min(self.horizon);
        self.first_writes.partition_point(|&t| t <= length) as u64
    }

    /// How far the curve was measured.
    pub fn horizon(&self) -> Nanos {
        self.horizon
    }
}

/// Where [`PreCopyModel::predict_from_dirty_sets`] reads what the guest dirties: the distinct
/// pages it writes in the window of `length` that opens `start` after the migration started.
///
/// The dirty-set curve of Akoush et al. is the special case that depends on `length` alone
/// ([`DirtyCurve`]); a workload history read at the window's own position (what a trace
/// records) also sees a program change phase, go quiet or end. The model asks for consecutive
/// windows, each starting where the one before ended, except that the last may be asked again
/// with a longer length (the drain before the pause).
pub trait DirtySets {
    /// Distinct pages written in `(start, start + length]`.
    fn pages_written(&mut self, start: Nanos, length: Nanos) -> u64;
}

impl DirtySets for DirtyCurve {
    fn pages_written(&mut self, _start: Nanos, length: Nanos) -> u64 {
        self.pages_in(length)
    }
}

impl PreCopyModel {
    /// A model of `memory_bytes` dirtied at `dirty_rate` over a link of `bandwidth`, with no wire
    /// overhead and the scheduler's default stop rules ([`StopRules::default`]).
    pub fn new(memory_bytes: u64, dirty_rate: ByteRate, bandwidth: ByteRate) -> Self {
        PreCopyModel {
            memory_bytes,
            dirty_rate,
            bandwidth,
            wire: WireCost::NONE,
            downtime_target: Nanos::ZERO,
            max_rounds: 0,
            non_convergence_rounds: 0,
            min_shrink_permille: 0,
            deadline: None,
            outpaced_rounds: 0,
            outpaced_permille: 1000,
            settle_rounds: 0,
            in_flight: 0,
        }
        .with_stop_rules(&StopRules::default())
    }

    /// This model with the stop fields copied from `rules`.
    pub fn with_stop_rules(mut self, rules: &StopRules) -> Self {
        self.downtime_target = rules.downtime_target;
        self.max_rounds = rules.max_rounds;
        self.non_convergence_rounds = rules.non_convergence_rounds;
        self.min_shrink_permille = rules.min_shrink_permille;
        self.deadline = rules.deadline;
        self.outpaced_rounds = rules.outpaced_rounds;
        self.outpaced_permille = rules.outpaced_permille;
        self.settle_rounds = rules.settle_rounds;
        self
    }

    /// This model with `bytes` in flight on the transport.
    pub fn with_in_flight(mut self, bytes: u64) -> Self {
        self.in_flight = bytes;
        self
    }

    /// This model with the given wire cost.
    pub fn with_wire(mut self, wire: WireCost) -> Self {
        self.wire = wire;
        self
    }

    /// Whether the dirty rate, counted in wire bytes, is below the bandwidth: the series' ratio
    /// `D/B` is below 1, each round is shorter than the one before, and with enough rounds any
    /// downtime target is reached. An unlimited bandwidth always converges; a zero bandwidth never
    /// does (its first round never ends).
    pub fn converges(&self) -> bool {
        if self.bandwidth.is_unlimited() {
            return true;
        }
        if self.bandwidth.0 == 0 {
            return false;
        }
        if self.dirty_rate.is_unlimited() {
            return false;
        }
        // D · (page + overhead) / page < B, in integers.
        let (num, den) = self.wire_factor();
        (self.dirty_rate.0 as u128) * num < (self.bandwidth.0 as u128) * den
    }

    /// The series' ratio `D/B` (dirty rate in wire bytes over bandwidth): 0 at unlimited
    /// bandwidth or no dirtying, `f64::INFINITY` at zero bandwidth with dirtying.
    pub fn ratio(&self) -> f64 {
        if self.bandwidth.is_unlimited() || self.dirty_rate.0 == 0 {
            return 0.0;
        }
        if self.bandwidth.0 == 0 || self.dirty_rate.is_unlimited() {
            return f64::INFINITY;
        }
        let (num, den) = self.wire_factor();
        (self.dirty_rate.0 as f64 * num as f64) / (self.bandwidth.0 as f64 * den as f64)
    }

    /// Clark's closed form, `t_i = M · D^(i-1) / B^i` seconds for round `i` (from 1; round 0 is
    /// treated as 1), with `M` and `D` in wire bytes. It ignores the cap that a round cannot
    /// dirty more than all of memory and every stop rule; [`PreCopyModel::predict`] applies
    /// both. 0 at unlimited bandwidth, `f64::INFINITY` at zero bandwidth (unless `M` is 0).
    pub fn series_round_secs(&self, round: u32) -> f64 {
        let memory = self.wire.wire_bytes(self.memory_bytes) as f64;
        if memory == 0.0 || self.bandwidth.is_unlimited() {
            return 0.0;
        }
        if self.bandwidth.0 == 0 {
            return f64::INFINITY;
        }
        let first = memory / self.bandwidth.0 as f64;
        first * pow_u32(self.ratio(), round.max(1) - 1)
    }

    /// Plays the series round by round and returns the predicted migration.
    ///
    /// Round `i` sends `V_i` wire bytes and lasts `B.time_for(V_i)` (rounded up to whole
    /// nanoseconds); meanwhile the guest dirties `D.bytes_in(t_i)` bytes, capped at the memory
    /// size; the next round sends those. After each push round the stop rules are checked as the
    /// scheduler checks them; then one stop-and-copy round sends what is left, and its duration
    /// is the downtime.
    ///
    /// With only the downtime target and the maximum rounds in force, more bandwidth never
    /// predicts a longer migration or more bytes, and a higher dirty rate never a shorter one.
    /// The non-convergence rule and the deadline break that: a slightly slower link can make the
    /// scheduler give up after a few rounds where a faster one keeps going (see the test
    /// `non_convergence_rule_breaks_monotonicity`).
    pub fn predict(&self) -> PreCopyPrediction {
        let (rate, memory) = (self.dirty_rate, self.memory_bytes);
        self.predict_with(self.wire.wire_bytes(memory), |_, duration| {
            rate.bytes_in(duration).min(memory)
        })
    }

    /// [`PreCopyModel::predict`] with the guest's writes given by its dirty sets instead of a
    /// constant dirty rate (Akoush et al.'s model): a round that starts at `s` and lasts `t`
    /// leaves `sets.pages_written(s, t)` pages of `page_size` bytes to send. `zero_pages` of
    /// memory are all-zero when round 1 reaches them and cost only their per-page overhead
    /// there (pages the guest writes are never zero again). `dirty_rate` is ignored.
    pub fn predict_from_dirty_sets(
        &self,
        sets: &mut impl DirtySets,
        page_size: u64,
        zero_pages: u64,
    ) -> PreCopyPrediction {
        let memory = self.memory_bytes;
        let zero = zero_pages.saturating_mul(page_size).min(memory);
        let zero_pages = zero.checked_div(page_size).unwrap_or(0);
        let zero_overhead = if self.wire.page_size == 0 {
            0
        } else {
            zero_pages.saturating_mul(self.wire.per_page_overhead)
        };
        let first = self
            .wire
            .wire_bytes(memory - zero)
            .saturating_add(zero_overhead);
        self.predict_with(first, |start, duration| {
            sets.pages_written(start, duration)
                .saturating_mul(page_size)
                .min(memory)
        })
    }

    /// The series played out: round 1 sends `first_round` wire bytes; a round that starts at
    /// `s` (after the migration started) and lasts `t` leaves `dirtied(s, t)` memory bytes for
    /// the next.
    fn predict_with(
        &self,
        first_round: u64,
        mut dirtied: impl FnMut(Nanos, Nanos) -> u64,
    ) -> PreCopyPrediction {
        let max_rounds = self.max_rounds.clamp(1, MAX_MODELLED_ROUNDS);
        let mut rounds = Vec::new();
        let mut elapsed = Nanos::ZERO;
        // Wire bytes the next round sends.
        let mut to_send = first_round;
        let mut smallest_dirty = u64::MAX;
        let mut stalled_rounds = 0u32;
        let mut outpaced_rounds = 0u32;
        let mut smallest_pending = u64::MAX;
        let mut settling = 0u32;
        let mut round = 0u32;
        // The last round's start, length, drain and dirt.
        let mut last: (Nanos, Nanos, Nanos, u64);
        let stop_reason = loop {
            round += 1;
            let bytes = to_send;
            let duration = self.bandwidth.time_for(bytes);
            let start = elapsed;
            elapsed += duration;
            rounds.push(PredictedRound {
                bytes,
                duration,
                stop_and_copy: false,
            });

            let dirty = dirtied(start, duration);
            let dirty_wire = self.wire.wire_bytes(dirty);
            // The engine's estimate: this round's dirt, and what the guest would dirty at this
            // round's rate while the transport drains before the pause.
            let drain = self.bandwidth.time_for(self.in_flight.min(bytes));
            let backlog = if duration == Nanos::ZERO {
                0
            } else {
                (dirty as u128 * drain.0 as u128).div_ceil(duration.0 as u128) as u64
            };
            let pending = dirty
                .saturating_add(backlog)
                .min(self.memory_bytes.max(dirty));
            let estimate = self.bandwidth.time_for(self.wire.wire_bytes(pending));
            // The scheduler's dirty rate is the wire bytes dirtied over the round's duration.
            let dirty_rate = if duration == Nanos::ZERO {
                ByteRate(if dirty_wire == 0 { 0 } else { u64::MAX - 1 })
            } else {
                ByteRate::measured(dirty_wire, duration)
            };
            let shrank = (pending as u128) * 1000
                < (smallest_dirty as u128) * (1000 - self.min_shrink_permille.min(1000)) as u128;
            let outpaced = dirty_rate >= self.bandwidth && dirty > 0;
            if shrank && !outpaced {
                stalled_rounds = 0;
            } else {
                stalled_rounds = stalled_rounds.saturating_add(1);
            }
            let near_link = (dirty_rate.0 as u128) * 1000
                >= (self.bandwidth.0 as u128) * self.outpaced_permille as u128
                && dirty > 0;
            if near_link && (smallest_dirty == u64::MAX || !shrank) {
                outpaced_rounds = outpaced_rounds.saturating_add(1);
            } else {
                outpaced_rounds = 0;
            }
            smallest_dirty = smallest_dirty.min(pending);
            smallest_pending = smallest_pending.min(pending);
            to_send = dirty_wire;
            last = (start, duration, drain, dirty);

            if estimate <= self.downtime_target {
                break StopReason::DowntimeTarget;
            }
            if self.deadline.is_some_and(|d| elapsed >= d) {
                break StopReason::Deadline;
            }
            if round >= max_rounds {
                break StopReason::MaxRounds;
            }
            let fired = (self.outpaced_rounds > 0 && outpaced_rounds >= self.outpaced_rounds)
                || (self.non_convergence_rounds > 0
                    && stalled_rounds >= self.non_convergence_rounds);
            if fired {
                // As the scheduler: on a peak, wait up to `settle_rounds` for a round near
                // the low.
                let near_low = (pending as u128) * 10 <= (smallest_pending as u128) * 11;
                if near_low || settling >= self.settle_rounds {
                    break StopReason::NotConverging;
                }
                settling += 1;
            } else {
                settling = 0;
            }
        };
        // The pause waits for the drain; what the guest wrote meanwhile joins the last set.
        let (start, duration, drain, dirty) = last;
        let bytes = if drain > Nanos::ZERO {
            self.wire
                .wire_bytes(dirtied(start, duration + drain).max(dirty))
        } else {
            to_send
        };
        let downtime = self.bandwidth.time_for(bytes);
        rounds.push(PredictedRound {
            bytes,
            duration: downtime,
            stop_and_copy: true,
        });
        let total_time = rounds.iter().fold(drain, |t, r| t + r.duration);
        let bytes_sent = rounds.iter().fold(0u64, |b, r| b.saturating_add(r.bytes));
        PreCopyPrediction {
            rounds,
            total_time,
            downtime,
            bytes_sent,
            converges: self.converges(),
            stop_reason,
        }
    }

    /// `(page + overhead, page)`: wire bytes per memory byte as a fraction (`(1, 1)` with no
    /// overhead).
    fn wire_factor(&self) -> (u128, u128) {
        if self.wire.page_size == 0 {
            (1, 1)
        } else {
            (
                self.wire.page_size as u128 + self.wire.per_page_overhead as u128,
                self.wire.page_size as u128,
            )
        }
    }
}

/// One predicted round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PredictedRound {
    /// Wire bytes the round sends.
    pub bytes: u64,
    /// How long it takes.
    pub duration: Nanos,
    /// Whether this is the final stop-and-copy round (guest paused).
    pub stop_and_copy: bool,
}

/// What [`PreCopyModel::predict`] foresees.
#[derive(Clone, Debug, PartialEq)]
pub struct PreCopyPrediction {
    /// Every round in order: the push rounds, then exactly one stop-and-copy round (the last).
    /// At most `max(max_rounds, 1) + 1` entries.
    pub rounds: Vec<PredictedRound>,
    /// The sum of all round durations, and the drain before the pause (saturating).
    pub total_time: Nanos,
    /// The stop-and-copy round's duration.
    pub downtime: Nanos,
    /// Wire bytes over all rounds (saturating).
    pub bytes_sent: u64,
    /// [`PreCopyModel::converges`]: the dirty rate is below the bandwidth.
    pub converges: bool,
    /// The rule that ended the push rounds.
    pub stop_reason: StopReason,
}

impl PreCopyPrediction {
    /// The number of push rounds (all rounds but stop-and-copy).
    pub fn push_rounds(&self) -> usize {
        self.rounds.len().saturating_sub(1)
    }

    /// The time before the guest pauses: the push rounds' durations (saturating).
    pub fn preparation_time(&self) -> Nanos {
        self.total_time - self.downtime
    }
}

/// `base^exp` by repeated squaring, the same on every platform (`f64::powi`'s precision is
/// unspecified and may differ between targets).
fn pow_u32(base: f64, mut exp: u32) -> f64 {
    let mut result = 1.0;
    let mut square = base;
    while exp > 0 {
        if exp & 1 == 1 {
            result *= square;
        }
        exp >>= 1;
        if exp > 0 {
            square *= square;
        }
    }
    result
}

/// Inputs of paper 000's hybrid migration model: the destination fetches the VM's boot profile
/// from network-attached storage, then the source sends its last checkpoint (execution log),
/// then the pages dirtied since that checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HybridModel {
    /// `Vprof`: size of the profiling file, bytes.
    pub v_prof: u64,
    /// `Vckpt`: size of the checkpoint file, bytes.
    pub v_ckpt: u64,
    /// `Vdp`: size of the pages dirtied after the last checkpoint, bytes.
    pub v_dp: u64,
    /// `Rtrans1`: rate from the NAS device to the destination.
    pub r_trans1: ByteRate,
    /// `Rtrans`: rate from the source to the destination.
    pub r_trans: ByteRate,
}

/// The figures of paper 000's model (its equations 1 to 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HybridPrediction {
    /// `t1 = Vprof / Rtrans1`: fetching the profile from the NAS.
    pub t1: Nanos,
    /// `t2 = Vckpt / Rtrans`: sending the last checkpoint.
    pub t2: Nanos,
    /// `t3 = Vdp / Rtrans`: sending the dirty pages.
    pub t3: Nanos,
    /// `t4 = Vdp / Rtrans`: the paper's estimate of service downtime.
    pub t4: Nanos,
    /// `Tmig = t1 + t2 + t3 + t4` (saturating). As published, the dirty pages' transfer time
    /// is counted twice: once as `t3` and once as the downtime `t4`.
    pub t_mig: Nanos,
    /// `Vmig = Vprof + Vckpt + Vdp` (saturating); the profile crosses the NAS link, the rest
    /// the source-to-destination link.
    pub v_mig: u64,
}

impl HybridModel {
    /// Evaluates the model.
    pub fn predict(&self) -> HybridPrediction {
        let t1 = self.r_trans1.time_for(self.v_prof);
        let t2 = self.r_trans.time_for(self.v_ckpt);
        let t3 = self.r_trans.time_for(self.v_dp);
        let t4 = t3;
        HybridPrediction {
            t1,
            t2,
            t3,
            t4,
            t_mig: t1 + t2 + t3 + t4,
            v_mig: self
                .v_prof
                .saturating_add(self.v_ckpt)
                .saturating_add(self.v_dp),
        }
    }
}

/// The least bytes any strategy could put on the wire for one run: memory once, minus the
/// contents of all-zero pages and of duplicate pages (copies of a page whose content was already
/// sent, the first copy not counted).
///
/// `least = page_count · per_page_overhead + (page_count − zero_pages − duplicate_pages) ·
/// page_size`: every page is named once at `per_page_overhead` bytes (memferry's header-only page
/// frame is [`wire::page_frame_len`]`(0)`; pass 0 for a bound that ignores framing), and only
/// distinct non-zero pages carry their `page_size` bytes of contents. It bounds strategies that
/// send page contents uncompressed; compressing text-like pages can go below it. Zero and
/// duplicate counts beyond `page_count` leave no contents; the result saturates at `u64::MAX`.
pub fn least_bytes(
    page_count: u64,
    zero_pages: u64,
    duplicate_pages: u64,
    page_size: u64,
    per_page_overhead: u64,
) -> u64 {
    let distinct = page_count
        .saturating_sub(zero_pages)
        .saturating_sub(duplicate_pages);
    let bytes =
        page_count as u128 * per_page_overhead as u128 + distinct as u128 * page_size as u128;
    bytes.min(u64::MAX as u128) as u64
}

/// The least downtime any strategy could reach for one run: the final writable working set
/// (the pages an oracle knows the guest writes after the last moment they could be sent, in
/// bytes) over the bandwidth. Zero bandwidth gives [`Nanos::MAX`] unless the set is empty.
pub fn least_downtime(final_wws_bytes: u64, bandwidth: ByteRate) -> Nanos {
    bandwidth.time_for(final_wws_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MB: u64 = 1_000_000;

    fn clark(memory: u64, dirty: u64, bandwidth: u64) -> PreCopyModel {
        PreCopyModel::new(memory, ByteRate(dirty), ByteRate(bandwidth))
    }

    #[test]
    fn hand_computed_series_one_gib() {
        // M = 1 GiB, D = 100 MB/s, B = 1 GB/s, target 1 ms.
        // t_1 = 1.073741824 s; V_2 = floor(0.1 · 1073741824) = 107374182 B, t_2 = 0.107374182 s;
        // V_3 = 10737418 B, t_3 = 10.737418 ms; V_4 = 1073741 B, t_4 = 1.073741 ms;
        // V_5 = 107374 B -> 0.107374 ms <= 1 ms: stop; downtime 0.107374 ms.
        let mut m = clark(GIB, 100 * MB, 1000 * MB);
        m.downtime_target = Nanos::from_millis(1);
        let p = m.predict();
        let expect = [
            (1_073_741_824, 1_073_741_824),
            (107_374_182, 107_374_182),
            (10_737_418, 10_737_418),
            (1_073_741, 1_073_741),
            (107_374, 107_374),
        ];
        assert_eq!(p.rounds.len(), expect.len());
        for (r, (bytes, ns)) in p.rounds.iter().zip(expect) {
            assert_eq!(r.bytes, bytes);
            assert_eq!(r.duration, Nanos(ns));
        }
        assert!(p.rounds[4].stop_and_copy);
        assert!(p.rounds[..4].iter().all(|r| !r.stop_and_copy));
        assert_eq!(p.push_rounds(), 4);
        assert_eq!(p.downtime, Nanos(107_374));
        assert_eq!(p.total_time, Nanos(expect.iter().map(|e| e.1).sum()));
        assert_eq!(p.bytes_sent, expect.iter().map(|e| e.0).sum::<u64>());
        assert_eq!(p.preparation_time(), p.total_time - p.downtime);
        assert!(p.converges);
        assert_eq!(p.stop_reason, StopReason::DowntimeTarget);
        assert!((m.ratio() - 0.1).abs() < 1e-12);
    }

    #[test]
    fn default_target_stops_after_the_full_copy() {
        // Same guest, default 300 ms target: V_2 takes 107 ms, so one push round suffices.
        let p = clark(GIB, 100 * MB, 1000 * MB).predict();
        assert_eq!(p.push_rounds(), 1);
        assert_eq!(p.downtime, Nanos(107_374_182));
        assert_eq!(p.stop_reason, StopReason::DowntimeTarget);
    }

    #[test]
    fn closed_form_matches_the_played_series() {
        let mut m = clark(GIB, 100 * MB, 1000 * MB);
        m.downtime_target = Nanos::from_millis(1);
        let p = m.predict();
        for (i, r) in p.rounds.iter().enumerate() {
            let closed = m.series_round_secs(i as u32 + 1);
            // Integer truncation loses under a nanosecond per round.
            let err = closed - r.duration.as_secs_f64();
            assert!(err.abs() < 1e-8, "round {i}: {closed} vs {}", r.duration);
        }
        assert_eq!(m.series_round_secs(0), m.series_round_secs(1));
        assert!((m.series_round_secs(1) - 1.073741824).abs() < 1e-12);
        assert!((m.series_round_secs(2) - 0.1073741824).abs() < 1e-12);
    }

    #[test]
    fn diverging_guest_ends_by_non_convergence_or_max_rounds() {
        // D = 2 B: every round re-sends all memory (dirtying is capped at M).
        let m = clark(GIB, 2000 * MB, 1000 * MB);
        assert!(!m.converges());
        assert!(m.ratio() > 1.0);
        // The early rule: the dirty rate outpaces the link from round 1, so it ends after 2.
        let p = m.predict();
        assert_eq!(p.stop_reason, StopReason::NotConverging);
        assert_eq!(p.push_rounds(), 2);
        assert!(p.rounds.iter().all(|r| r.bytes == GIB));
        assert_eq!(p.downtime, Nanos(1_073_741_824));
        // Without it, the slow rule takes 5.
        let mut slow = m;
        slow.outpaced_rounds = 0;
        let p = slow.predict();
        assert_eq!(p.stop_reason, StopReason::NotConverging);
        assert_eq!(p.push_rounds(), 5);

        let mut m = m;
        m.outpaced_rounds = 0;
        m.non_convergence_rounds = 0;
        m.max_rounds = 7;
        let p = m.predict();
        assert_eq!(p.stop_reason, StopReason::MaxRounds);
        assert_eq!(p.rounds.len(), 8);

        // D = B exactly diverges too.
        assert!(!clark(GIB, 1000 * MB, 1000 * MB).converges());
    }

    #[test]
    fn slow_shrinking_series_is_judged_not_converging() {
        // Ratio 0.96 shrinks by less than the scheduler's 5%, at 96% of the link: the early
        // rule ends it after 2 rounds; without it, rounds 2..=6 stall.
        let m = clark(GIB, 960 * MB, 1000 * MB);
        let p = m.predict();
        assert!(p.converges);
        assert_eq!(p.stop_reason, StopReason::NotConverging);
        assert_eq!(p.push_rounds(), 2);
        let mut slow = m;
        slow.outpaced_rounds = 0;
        assert_eq!(slow.predict().push_rounds(), 6);
    }

    #[test]
    fn deadline_ends_the_rounds() {
        let mut m = clark(GIB, 500 * MB, 1000 * MB);
        m.downtime_target = Nanos::ZERO;
        m.deadline = Some(Nanos::from_millis(1500));
        let p = m.predict();
        // 1.07 s, then 0.54 s: past the deadline after round 2.
        assert_eq!(p.stop_reason, StopReason::Deadline);
        assert_eq!(p.push_rounds(), 2);
    }

    #[test]
    fn zero_unlimited_and_empty_inputs_do_not_panic() {
        // Unlimited bandwidth: everything is instantaneous.
        let p = clark(GIB, 100 * MB, u64::MAX).predict();
        assert_eq!(p.total_time, Nanos::ZERO);
        assert_eq!(p.downtime, Nanos::ZERO);
        assert_eq!(p.bytes_sent, GIB);
        assert!(p.converges);
        assert_eq!(m_ratio(GIB, 100 * MB, u64::MAX), 0.0);

        // Zero bandwidth: the first round never ends.
        let m = clark(GIB, 100 * MB, 0);
        let p = m.predict();
        assert_eq!(p.total_time, Nanos::MAX);
        assert!(!p.converges);
        assert_eq!(m.ratio(), f64::INFINITY);
        assert_eq!(m.series_round_secs(3), f64::INFINITY);

        // Unlimited dirty rate: every round re-sends all memory.
        let p = clark(GIB, u64::MAX, 1000 * MB).predict();
        assert!(!p.converges);
        assert!(p.rounds.iter().all(|r| r.bytes == GIB));

        // Both unlimited.
        let p = clark(GIB, u64::MAX, u64::MAX).predict();
        assert_eq!(p.total_time, Nanos::ZERO);

        // Nothing to send, and an idle guest.
        let p = clark(0, 100 * MB, 1000 * MB).predict();
        assert_eq!(
            (p.bytes_sent, p.total_time, p.rounds.len()),
            (0, Nanos::ZERO, 2)
        );
        let p = clark(GIB, 0, 1000 * MB).predict();
        assert_eq!(p.bytes_sent, GIB);
        assert_eq!(p.downtime, Nanos::ZERO);

        // Endless request is bounded.
        let mut m = clark(4096, u64::MAX, 0);
        m.max_rounds = u32::MAX;
        m.non_convergence_rounds = 0;
        m.outpaced_rounds = 0;
        let p = m.predict();
        assert_eq!(p.push_rounds(), MAX_MODELLED_ROUNDS as usize);
        assert_eq!(p.total_time, Nanos::MAX);

        // max_rounds 0 still runs the full copy.
        let mut m = clark(GIB, 2000 * MB, 1000 * MB);
        m.max_rounds = 0;
        assert_eq!(m.predict().push_rounds(), 1);
    }

    fn m_ratio(memory: u64, dirty: u64, bandwidth: u64) -> f64 {
        clark(memory, dirty, bandwidth).ratio()
    }

    #[test]
    fn wire_cost_adds_per_page_overhead() {
        let w = WireCost::memferry(PageSize::DEFAULT);
        assert_eq!(w.per_page_overhead, 16);
        assert_eq!(w.wire_bytes(4096 * 10), 4112 * 10);
        assert_eq!(w.wire_bytes(1), 17);
        assert_eq!(w.wire_bytes(0), 0);
        assert_eq!(WireCost::NONE.wire_bytes(12345), 12345);
        assert_eq!(w.wire_bytes(u64::MAX), u64::MAX);

        let m = clark(GIB, 100 * MB, 1000 * MB).with_wire(w);
        let p = m.predict();
        assert_eq!(p.rounds[0].bytes, (GIB / 4096) * 4112);
        assert!((m.ratio() - 0.1 * 4112.0 / 4096.0).abs() < 1e-12);
        // A dirty rate just under B in memory bytes is over B in wire bytes.
        assert!(clark(GIB, 998 * MB, 1000 * MB).converges());
        assert!(!clark(GIB, 998 * MB, 1000 * MB).with_wire(w).converges());
    }

    #[test]
    fn stop_rules_are_copied() {
        let rules = StopRules {
            downtime_target: Nanos::from_millis(7),
            max_rounds: 3,
            non_convergence_rounds: 2,
            min_shrink_permille: 10,
            deadline: Some(Nanos::from_secs(9)),
            ..StopRules::default()
        };
        let m = clark(1, 1, 1).with_stop_rules(&rules);
        assert_eq!(m.downtime_target, rules.downtime_target);
        assert_eq!(m.max_rounds, 3);
        assert_eq!(m.non_convergence_rounds, 2);
        assert_eq!(m.min_shrink_permille, 10);
        assert_eq!(m.deadline, rules.deadline);
    }

    #[test]
    fn pow_by_squaring() {
        assert_eq!(pow_u32(2.0, 0), 1.0);
        assert_eq!(pow_u32(2.0, 10), 1024.0);
        assert_eq!(pow_u32(0.5, 3), 0.125);
        assert_eq!(pow_u32(f64::INFINITY, 2), f64::INFINITY);
    }

    #[test]
    fn hybrid_model_of_paper_000() {
        // 100 MB profile at 50 MB/s, 200 MB checkpoint and 50 MB dirty at 100 MB/s.
        let h = HybridModel {
            v_prof: 100 * MB,
            v_ckpt: 200 * MB,
            v_dp: 50 * MB,
            r_trans1: ByteRate(50 * MB),
            r_trans: ByteRate(100 * MB),
        };
        let p = h.predict();
        assert_eq!(p.t1, Nanos::from_secs(2));
        assert_eq!(p.t2, Nanos::from_secs(2));
        assert_eq!(p.t3, Nanos::from_millis(500));
        assert_eq!(p.t4, Nanos::from_millis(500));
        assert_eq!(p.t_mig, Nanos::from_secs(5));
        assert_eq!(p.v_mig, 350 * MB);

        let dead = HybridModel {
            r_trans1: ByteRate(0),
            r_trans: ByteRate::UNLIMITED,
            v_prof: u64::MAX,
            v_ckpt: u64::MAX,
            ..h
        }
        .predict();
        assert_eq!(dead.t1, Nanos::MAX);
        assert_eq!(dead.t_mig, Nanos::MAX);
        assert_eq!(dead.t2, Nanos::ZERO);
        assert_eq!(dead.v_mig, u64::MAX);
    }

    #[test]
    fn lower_bounds() {
        assert_eq!(least_bytes(100, 10, 5, 4096, 25), 85 * 4121 + 15 * 25);
        assert_eq!(least_bytes(100, 0, 0, 4096, 0), 100 * 4096);
        assert_eq!(least_bytes(100, 10, 5, 4096, 0), 85 * 4096);
        assert_eq!(least_bytes(10, 8, 8, 4096, 25), 250);
        assert_eq!(least_bytes(10, 8, 8, 4096, 0), 0);
        assert_eq!(least_bytes(u64::MAX, 0, 0, 4096, 25), u64::MAX);
        assert_eq!(
            least_downtime(100 * MB, ByteRate(1000 * MB)),
            Nanos::from_millis(100)
        );
        assert_eq!(least_downtime(0, ByteRate(0)), Nanos::ZERO);
        assert_eq!(least_downtime(1, ByteRate(0)), Nanos::MAX);
        assert_eq!(least_downtime(1, ByteRate::UNLIMITED), Nanos::ZERO);
    }
}
