//! The metrics of a migration, one definition everywhere (engine, simulator, CLI, benches),
//! after paper 001's metrics and paper 002's stages:
//!
//! | metric | from | to |
//! | --- | --- | --- |
//! | preparation time | migration start | the source guest pauses |
//! | downtime | the source guest pauses | the destination guest runs |
//! | resume time | the destination guest runs | every page is on the destination and the source is released |
//! | total migration time | migration start | the source is released |
//!
//! Pages transferred count every page frame sent, re-sends included; bytes on the wire count
//! every byte of every frame, headers included.

use alloc::string::String;
use alloc::vec::Vec;

use crate::time::{ByteRate, Nanos};

/// Which stop rule ended the pre-copy rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum StopReason {
    /// Estimated downtime at or below the target.
    DowntimeTarget,
    /// The maximum number of rounds was reached.
    MaxRounds,
    /// The dirty set stopped shrinking, or the dirty rate reached the bandwidth.
    NotConverging,
    /// The overall deadline passed.
    Deadline,
    /// Post-copy: the strategy switches over at once by design.
    PostCopy,
    /// The caller asked for the switchover ([`crate::session::Source::switchover_now`]).
    Requested,
}

impl StopReason {
    /// The name used in JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::DowntimeTarget => "downtime_target",
            StopReason::MaxRounds => "max_rounds",
            StopReason::NotConverging => "not_converging",
            StopReason::Deadline => "deadline",
            StopReason::PostCopy => "post_copy",
            StopReason::Requested => "requested",
        }
    }
}

/// Pages and their payload bytes (entry headers excluded) under one encoding, and the CPU time
/// spent producing them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PagesAndBytes {
    /// Pages sent this way.
    pub pages: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// CPU time the source's encoder spent on the pages it produced this way, in nanoseconds
    /// (attempts that ended raw count under raw). The core has no clock and leaves it 0; a
    /// driver with one fills it (`memferry-std` measures its encoders; the engine's own zero
    /// check, dedup of known content and framing are not in it).
    #[cfg_attr(feature = "serde", serde(default))]
    pub cpu_nanos: u64,
}

/// What each content mechanism sent: pages and payload bytes per page encoding. A raw page's
/// payload is the page; every other encoding saved `pages × page size − bytes`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct EncodingUse {
    /// The page as is.
    pub raw: PagesAndBytes,
    /// All-zero pages (a header only; also the pages the host knew were free or never written).
    pub zero: PagesAndBytes,
    /// LZ4.
    pub lz4: PagesAndBytes,
    /// XBZRLE deltas against an earlier round's copy.
    pub delta: PagesAndBytes,
    /// XBZRLE deltas compressed with LZ4.
    pub delta_lz4: PagesAndBytes,
    /// References to content sent earlier in this migration (dedup).
    pub reference: PagesAndBytes,
    /// Hash-first: content the destination already held (its announced `Have` set).
    pub known: PagesAndBytes,
    /// Encodings defined outside the core (zstd: 16).
    pub other: PagesAndBytes,
}

impl EncodingUse {
    /// The position of `encoding`'s tally in [`EncodingUse::slots`] (0 raw … 7 other).
    pub fn slot_of(encoding: crate::wire::Encoding) -> usize {
        match encoding.0 {
            0..=6 => encoding.0 as usize,
            _ => 7,
        }
    }

    /// The tally of `encoding`.
    pub fn slot_mut(&mut self, encoding: crate::wire::Encoding) -> &mut PagesAndBytes {
        let i = Self::slot_of(encoding);
        let [a, b, c, d, e, f, g, h] = self.slots_mut();
        match i {
            0 => a,
            1 => b,
            2 => c,
            3 => d,
            4 => e,
            5 => f,
            6 => g,
            _ => h,
        }
    }

    /// Counts one page sent as `encoding` with `payload` bytes.
    pub fn add(&mut self, encoding: crate::wire::Encoding, payload: u64) {
        let slot = self.slot_mut(encoding);
        slot.pages += 1;
        slot.bytes += payload;
    }

    /// Adds another tally (pages, bytes and CPU time).
    pub fn merge(&mut self, other: &EncodingUse) {
        for (a, (_, b)) in self.slots_mut().into_iter().zip(other.slots()) {
            a.pages += b.pages;
            a.bytes += b.bytes;
            a.cpu_nanos += b.cpu_nanos;
        }
    }

    /// Adds only another tally's CPU time (a driver's measurement of the encoders, beside the
    /// engine's count of pages and bytes).
    pub fn merge_cpu(&mut self, other: &EncodingUse) {
        for (a, (_, b)) in self.slots_mut().into_iter().zip(other.slots()) {
            a.cpu_nanos += b.cpu_nanos;
        }
    }

    /// CPU time of every encoding, in nanoseconds.
    pub fn cpu_nanos(&self) -> u64 {
        self.slots().iter().map(|(_, s)| s.cpu_nanos).sum()
    }

    /// Every encoding with its name, in a fixed order.
    pub fn slots(&self) -> [(&'static str, PagesAndBytes); 8] {
        [
            ("raw", self.raw),
            ("zero", self.zero),
            ("lz4", self.lz4),
            ("delta", self.delta),
            ("delta_lz4", self.delta_lz4),
            ("reference", self.reference),
            ("known", self.known),
            ("other", self.other),
        ]
    }

    fn slots_mut(&mut self) -> [&mut PagesAndBytes; 8] {
        [
            &mut self.raw,
            &mut self.zero,
            &mut self.lz4,
            &mut self.delta,
            &mut self.delta_lz4,
            &mut self.reference,
            &mut self.known,
            &mut self.other,
        ]
    }

    /// Payload bytes saved against sending every page raw, for pages of `page_size` bytes.
    pub fn saved_bytes(&self, page_size: u64) -> u64 {
        self.slots()
            .iter()
            .map(|(_, s)| (s.pages * page_size).saturating_sub(s.bytes))
            .sum()
    }
}

/// One round: a pre-copy push round, or the final stop-and-copy.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RoundReport {
    /// Round number, from 1.
    pub round: u32,
    /// Whether this is the stop-and-copy round (guest paused).
    pub stop_and_copy: bool,
    /// When the round started, relative to the migration start.
    pub start: Nanos,
    /// How long it took, transmission included.
    pub duration: Nanos,
    /// Page frames sent.
    pub pages: u64,
    /// Of those, all-zero pages (sent without payload).
    pub zero_pages: u64,
    /// Bytes of page frames sent.
    pub bytes: u64,
    /// Pages the guest dirtied while this round ran.
    pub dirty_pages: u64,
    /// Dirty rate during the round, pages per second.
    pub dirty_rate_pages_per_sec: u64,
    /// Measured bandwidth of the round.
    pub bandwidth: ByteRate,
    /// The round's bandwidth limit.
    pub rate_limit: ByteRate,
    /// Downtime the scheduler estimated at the end of the round.
    pub estimated_downtime: Nanos,
    /// Pages a predictor held back from this round as hot (they go in a later round or in
    /// stop-and-copy; correctness never depends on the prediction).
    pub held_back: u64,
    /// Of those, pages the guest dirtied again during the round: holding them back saved a
    /// re-send. `held_back - held_back_redirtied` were held back for nothing.
    pub held_back_redirtied: u64,
    /// Time the host spent fetching the dirty log during this round ([`crate::memory::DirtyLog::take_cost`]).
    pub dirty_sync_time: Nanos,
    /// Time the host spent re-arming the dirty log during this round.
    pub dirty_clear_time: Nanos,
}

/// Everything measured about one migration.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MigrationReport {
    /// The strategy, e.g. `"pre-copy"`.
    pub strategy: alloc::string::String,
    /// Page size in bytes.
    pub page_size: u64,
    /// Pages in the guest.
    pub page_count: u64,
    /// Migration start to pause.
    pub preparation_time: Nanos,
    /// Pause to the destination running.
    pub downtime: Nanos,
    /// The destination running to the source released.
    pub resume_time: Nanos,
    /// Start to the source released.
    pub total_time: Nanos,
    /// Page frames sent, re-sends included.
    pub pages_sent: u64,
    /// Of those, all-zero pages.
    pub zero_pages_sent: u64,
    /// Post-copy: pages sent ahead of the push because the destination's guest asked for them.
    pub urgent_pages: u64,
    /// Pages and payload bytes per page encoding (what each content mechanism sent and saved).
    pub encodings: EncodingUse,
    /// Hash-first: distinct pages of content the destination announced it holds.
    pub known_pages_announced: u64,
    /// How long the host took to park the guest when it paused (part of the downtime), if it
    /// measures it ([`crate::memory::SourceGuest::last_pause_time`]).
    pub guest_pause: Nanos,
    /// Hybrid (pre-copy rounds, then post-copy): pages the destination held from earlier
    /// rounds that went stale and followed the switchover (the `Discard` list).
    pub discarded_pages: u64,
    /// Bytes the source put on the wire, all frames, headers included.
    pub bytes_sent: u64,
    /// Bytes the destination sent back (accept, ready, verdict).
    pub bytes_received: u64,
    /// Bytes of frames other than pages sent by the source (hello, markers, device state…).
    pub control_bytes: u64,
    /// Size of the CPU and device state.
    pub device_state_bytes: u64,
    /// Connections the migration used (1 unless the driver opened more).
    pub channels: u16,
    /// Time the source spent hashing its memory for verification (after the destination
    /// started, so outside the downtime).
    pub verification_time: Nanos,
    /// Whether the switchover was handed to the transport: from then on the destination may
    /// run the guest, and the source never resumes its own copy on its own.
    pub committed: bool,
    /// Every round, stop-and-copy last.
    pub rounds: Vec<RoundReport>,
    /// The rule that ended the pre-copy rounds.
    pub stop_reason: Option<StopReason>,
    /// Why that rule fired, with its figures.
    pub stop_detail: String,
    /// The most the guest was throttled (percent of its time taken away) to make pre-copy
    /// converge; 0 when it never was.
    pub throttle_percent: u8,
    /// Whether the destination's digest matched (None when verification was off or not reached).
    pub verified: Option<bool>,
    /// The source's memory digest at switchover.
    pub source_digest: Option<u128>,
    /// The destination's memory digest at switchover.
    pub destination_digest: Option<u128>,
}

impl MigrationReport {
    /// Guest memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.page_size * self.page_count
    }

    /// Pages sent more than once (pages sent minus the guest's page count, at least zero).
    pub fn pages_resent(&self) -> u64 {
        self.pages_sent.saturating_sub(self.page_count)
    }

    /// Average throughput of the source's bytes over the total time.
    pub fn throughput(&self) -> ByteRate {
        ByteRate::measured(self.bytes_sent, self.total_time)
    }
}
