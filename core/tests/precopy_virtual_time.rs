//! Virtual-time tests of pre-copy (engine v2): [`Source`] against [`Destination`] over a
//! simulated link, with no real clock and no threads.
//!
//! The harness in this file is deterministic and small:
//! - a source guest: memory in a `Vec<u8>` (4 KiB pages), a [`DirtyBitmap`] dirty log, pause and
//!   resume flags, and a workload that keeps writing (random bytes at random offsets, sometimes a
//!   whole zero page, a hot set) at a given rate of writes per *virtual* second, and never while
//!   paused;
//! - a link with a bandwidth and a latency: whatever the source emits advances virtual time by
//!   bytes / bandwidth and arrives `latency` later, cut into random chunks so that the receiver
//!   sees partial frames; replies come back after the same latency;
//! - a destination: memory that starts as garbage, a recorded device state and start.
//!
//! The migration runs in the crate's one driver loop (`memferry::drive::drive_source`), the
//! same loop the simulator and the real driver use; the harness is a `Link` over the simulated
//! link, and it reports every batch as delivered once it has crossed.
//!
//! The property test ("for random write schedules, memory sizes and bandwidths, pre-copy
//! terminates and the destination equals the source") runs random guests, workloads, links and
//! engine configurations, and checks that the migration ends within a bounded number of steps,
//! that the destination equals the source memory as it was when the guest paused, that the
//! device state arrived, and that the report adds up (against an independent tap on the wire).
//!
//! Deterministic tests cover the failure paths: a corrupted page frame before and during
//! stop-and-copy, a hello for another geometry, frames out of protocol order on both sides, a
//! tampered digest, plus determinism, a device state larger than one frame, and a degenerate
//! batch size.
//!
//! Engine v2 additions: several channels delivered out of order, region tables with holes,
//! caller-bounded output (`poll_transmit` never exceeds its room), a predictor defined outside
//! the crate, and the delivery-based bandwidth estimate behind a deep send buffer.
//!
//! Changed promise (v2): once the switchover frame has been handed to the transport
//! (`report.committed`), a failure no longer resumes the source guest; the source reports
//! `SourceStatus::Failed { source_paused: true }` and the caller decides with `resume_source`.

use std::collections::VecDeque;

use memferry::digest::memory_digest;
use memferry::drive::{drive_source, Link, LinkEvent};
use memferry::memory::DirtyCost;
use memferry::plan::{PagePlan, SharedPageRead};
use memferry::prelude::*;
use memferry::track::PredictorKind;
use memferry::wire::{
    self, AbortCode, Encoding, Frame, FrameKind, Hello, PagesWriter, Verdict, WireError,
    PROTOCOL_VERSION,
};
use proptest::prelude::*;
use proptest::strategy::Strategy;

const PAGE: usize = 4096;

// ---------------------------------------------------------------------------------------------
// A tiny deterministic PRNG (splitmix64).

#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }

    fn chance(&mut self, permille: u32) -> bool {
        self.below(1000) < permille as u64
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let r = self.next().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scenario: everything random about one migration.

/// How the guest writes its memory while it runs.
#[derive(Clone, Copy, Debug)]
struct Workload {
    /// Writes per virtual second (0: an idle guest).
    writes_per_sec: u64,
    /// Size of the hot set, in thousandths of memory (at least one page).
    hot_permille: u32,
    /// Share of writes that land in the hot set, in thousandths.
    hot_bias_permille: u32,
    /// Share of writes that zero a whole page, in thousandths.
    zero_permille: u32,
}

#[derive(Clone, Debug)]
struct Scenario {
    pages: u64,
    /// The destination's page count (equal to `pages` except when testing a refusal).
    dest_pages: u64,
    seed: u64,
    /// Share of pages that start all-zero, in thousandths.
    initial_zero_permille: u32,
    workload: Workload,
    /// Link bandwidth, bytes per second.
    bandwidth: u64,
    /// One-way link latency.
    latency: Nanos,
    /// Largest chunk the link hands to a side at once (chunks are 1..=max_chunk bytes).
    max_chunk: usize,
    /// The virtual time of the first poll.
    start_at: Nanos,
    /// Size of the CPU and device state.
    state_len: usize,
    config: PreCopyConfig,
    dest_verify: bool,
    /// The source's region table (its pages add up to `pages`); empty: one region at 0.
    regions: Vec<Region>,
    /// The destination's region table; empty: one region at 0 of `dest_pages`.
    dest_regions: Vec<Region>,
    /// The link reads and encodes pages itself from `PagePlan`s (as the std driver's worker
    /// threads do) instead of taking the engine's bytes.
    plans: bool,
}

impl Scenario {
    fn layouts(&self) -> (MemoryLayout, MemoryLayout) {
        let layout = |regions: &[Region], pages: u64| {
            if regions.is_empty() {
                MemoryLayout::single(Geometry::new(PageSize::DEFAULT, pages).unwrap())
            } else {
                MemoryLayout::new(PageSize::DEFAULT, regions.to_vec()).unwrap()
            }
        };
        let source = layout(&self.regions, self.pages);
        assert_eq!(source.page_count(), self.pages);
        (source, layout(&self.dest_regions, self.dest_pages))
    }
}

/// A quiet guest on a 100 MB/s link: the base of the deterministic tests.
fn quiet_scenario(pages: u64) -> Scenario {
    Scenario {
        pages,
        dest_pages: pages,
        seed: 0x5eed,
        initial_zero_permille: 150,
        workload: Workload {
            writes_per_sec: 0,
            hot_permille: 250,
            hot_bias_permille: 900,
            zero_permille: 20,
        },
        bandwidth: 100_000_000,
        latency: Nanos::from_micros(250),
        max_chunk: 3000,
        start_at: Nanos::from_secs(3),
        state_len: 333,
        config: PreCopyConfig::default(),
        dest_verify: true,
        regions: Vec::new(),
        dest_regions: Vec::new(),
        plans: false,
    }
}

// ---------------------------------------------------------------------------------------------
// Source host: memory, dirty log, workload, pause/resume.

struct SourceHost {
    mem: Vec<u8>,
    pages: u64,
    dirty: DirtyBitmap,
    workload: Workload,
    rng: Rng,
    hot_start: u64,
    hot_len: u64,
    /// The virtual time the guest has been advanced to.
    clock: Nanos,
    /// Virtual nanoseconds the guest has spent running.
    running_ns: u128,
    /// Writes accounted for (done or dropped by the per-step cap).
    writes_accounted: u128,
    /// Writes actually made.
    writes: u64,
    paused: bool,
    paused_at: Option<Nanos>,
    pause_calls: u32,
    resume_calls: u32,
    /// Memory as it was when the guest paused (the switchover moment).
    snapshot: Option<Vec<u8>>,
    state: Vec<u8>,
    save_calls: u32,
    reads: u64,
    /// Make every page read fail while the guest is paused.
    fail_reads_while_paused: bool,
    /// Writes made right after a sync.
    racing_writes: u64,
    /// A broken dirty log: the final sync (guest paused) reports nothing.
    drop_dirty_while_paused: bool,
    /// Dirty logging turned on and off by the engine.
    log_starts: u32,
    log_stops: u32,
    /// Syncs since the engine last took the cost (each costs 1 µs, re-arming 2 µs).
    uncosted_syncs: u64,
    /// Region syncs.
    syncs: u64,
    /// (region id, first dense page) of every region sync.
    synced_regions: Vec<(u32, u64)>,
    /// An asynchronous pause: the vCPUs park this long after the request (`None`: the pause
    /// is synchronous; `Some(Nanos::MAX)`: they never park).
    park_delay: Option<Nanos>,
    /// When the engine asked for the pending pause.
    pause_asked_at: Option<Nanos>,
    /// Times the engine asked whether the pending pause completed.
    pause_polls: u32,
}

impl SourceHost {
    fn new(sc: &Scenario) -> Self {
        let mut rng = Rng(sc.seed);
        let mut mem = vec![0u8; sc.pages as usize * PAGE];
        for page in mem.chunks_mut(PAGE) {
            if !rng.chance(sc.initial_zero_permille) {
                rng.fill(page);
            }
        }
        let mut state = vec![0u8; sc.state_len];
        rng.fill(&mut state);
        let hot_len = (sc.pages * sc.workload.hot_permille as u64 / 1000).clamp(1, sc.pages);
        let hot_start = rng.below(sc.pages);
        SourceHost {
            mem,
            pages: sc.pages,
            dirty: DirtyBitmap::new(sc.pages),
            workload: sc.workload,
            rng,
            hot_start,
            hot_len,
            clock: sc.start_at,
            running_ns: 0,
            writes_accounted: 0,
            writes: 0,
            paused: false,
            paused_at: None,
            pause_calls: 0,
            resume_calls: 0,
            snapshot: None,
            state,
            save_calls: 0,
            reads: 0,
            fail_reads_while_paused: false,
            racing_writes: 0,
            drop_dirty_while_paused: false,
            log_starts: 0,
            log_stops: 0,
            uncosted_syncs: 0,
            syncs: 0,
            synced_regions: Vec::new(),
            park_delay: None,
            pause_asked_at: None,
            pause_polls: 0,
        }
    }

    /// Lets the guest run until `to`: it makes the writes its rate allows (none while paused).
    fn advance(&mut self, to: Nanos) {
        if to <= self.clock {
            return;
        }
        let dt = (to - self.clock).0 as u128;
        self.clock = to;
        if self.paused || self.workload.writes_per_sec == 0 {
            return;
        }
        self.running_ns += dt;
        let due = self.running_ns * self.workload.writes_per_sec as u128 / 1_000_000_000;
        // A guest cannot do unbounded work between two engine steps; past a few writes per page
        // more writes only change bytes that are already dirty.
        let cap = 2 * self.pages as u128 + 64;
        let n = (due - self.writes_accounted).min(cap);
        self.writes_accounted = due;
        for _ in 0..n {
            self.write_once();
        }
    }

    fn write_once(&mut self) {
        let page = if self.rng.chance(self.workload.hot_bias_permille) {
            (self.hot_start + self.rng.below(self.hot_len)) % self.pages
        } else {
            self.rng.below(self.pages)
        };
        let base = page as usize * PAGE;
        if self.rng.chance(self.workload.zero_permille) {
            self.mem[base..base + PAGE].fill(0);
        } else {
            let off = self.rng.below(PAGE as u64) as usize;
            let len = (1 + self.rng.below(64) as usize).min(PAGE - off);
            let mut bytes = [0u8; 64];
            self.rng.fill(&mut bytes[..len]);
            self.mem[base + off..base + off + len].copy_from_slice(&bytes[..len]);
        }
        self.dirty.set(page);
        self.writes += 1;
    }
}

impl SharedPageRead for SourceHost {
    fn read_page_shared(&self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError> {
        assert!(
            page.0 < self.pages,
            "a plan read page {} of {}",
            page.0,
            self.pages
        );
        if self.fail_reads_while_paused && self.paused {
            return Err(HostError::new(format!("page {} is unreadable", page.0)));
        }
        let at = page.0 as usize * PAGE;
        buf.copy_from_slice(&self.mem[at..at + PAGE]);
        Ok(())
    }
}

impl PageRead for SourceHost {
    fn read_page(&mut self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError> {
        assert!(
            page.0 < self.pages,
            "the engine read page {} of a {}-page guest",
            page.0,
            self.pages
        );
        assert_eq!(buf.len(), PAGE, "the engine read with a wrong buffer size");
        if self.fail_reads_while_paused && self.paused {
            return Err(HostError::new(format!("page {} is unreadable", page.0)));
        }
        let at = page.0 as usize * PAGE;
        buf.copy_from_slice(&self.mem[at..at + PAGE]);
        self.reads += 1;
        Ok(())
    }
}

impl DirtyLog for SourceHost {
    fn start_logging(&mut self, layout: &MemoryLayout) -> Result<(), HostError> {
        assert_eq!(layout.page_count(), self.pages);
        assert_eq!(self.log_starts, self.log_stops, "logging started twice");
        self.log_starts += 1;
        Ok(())
    }

    fn stop_logging(&mut self) {
        assert_eq!(
            self.log_starts,
            self.log_stops + 1,
            "logging stopped while off"
        );
        self.log_stops += 1;
    }

    fn take_cost(&mut self) -> Option<DirtyCost> {
        let syncs = std::mem::take(&mut self.uncosted_syncs);
        Some(DirtyCost {
            sync: Nanos::from_micros(syncs),
            clear: Nanos::from_micros(2 * syncs),
        })
    }

    fn sync_region(
        &mut self,
        region: &Region,
        first_page: u64,
        into: &mut DirtyBitmap,
    ) -> Result<(), HostError> {
        let end = first_page + region.pages;
        self.uncosted_syncs += 1;
        assert!(
            end <= self.pages && into.len() == self.pages,
            "sync of region {region:?} at page {first_page} of a {}-page guest",
            self.pages
        );
        for page in self
            .dirty
            .iter_ones_from(first_page)
            .take_while(|&p| p < end)
            .collect::<Vec<_>>()
        {
            if !self.drop_dirty_while_paused || !self.paused {
                into.set(page);
            }
            self.dirty.unset(page);
        }
        self.syncs += 1;
        self.synced_regions.push((region.id, first_page));
        // A running guest's vCPUs do not stop for the sync: a few writes land right after the
        // log was fetched (after the last region's), before the engine's next action (e.g. the
        // pause).
        if end == self.pages && !self.paused && self.workload.writes_per_sec > 0 {
            for _ in 0..self.rng.below(3) {
                self.write_once();
                self.racing_writes += 1;
            }
        }
        Ok(())
    }
}

impl SourceGuest for SourceHost {
    fn last_pause_time(&self) -> Option<Nanos> {
        // Parking the vCPUs took 3 ms (the engine reports what the host measured).
        Some(Nanos::from_millis(3))
    }

    fn pause(&mut self) -> Result<(), HostError> {
        assert!(!self.paused, "the engine paused a paused guest");
        self.paused = true;
        self.pause_calls += 1;
        self.paused_at = Some(self.clock);
        self.snapshot = Some(self.mem.clone());
        Ok(())
    }

    fn request_pause(&mut self) -> Result<PauseProgress, HostError> {
        if self.park_delay.is_none() {
            return self.pause().map(|()| PauseProgress::Parked);
        }
        assert!(
            self.pause_asked_at.is_none(),
            "the pause was asked for twice"
        );
        self.pause_asked_at = Some(self.clock);
        Ok(PauseProgress::Pending)
    }

    fn poll_pause(&mut self) -> Result<PauseProgress, HostError> {
        self.pause_polls += 1;
        let (Some(asked), Some(delay)) = (self.pause_asked_at, self.park_delay) else {
            panic!("the engine polled a pause it never asked for");
        };
        if self.paused {
            return Ok(PauseProgress::Parked);
        }
        if self.clock.0.saturating_sub(asked.0) >= delay.0 {
            // The vCPUs park now: the guest's writes so far are in memory.
            self.pause()?;
            return Ok(PauseProgress::Parked);
        }
        Ok(PauseProgress::Pending)
    }

    fn resume(&mut self) -> Result<(), HostError> {
        assert!(
            self.paused || self.pause_asked_at.is_some(),
            "the engine resumed a running guest"
        );
        self.pause_asked_at = None;
        self.paused = false;
        self.resume_calls += 1;
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<u8>, HostError> {
        assert!(self.paused, "device state saved while the guest runs");
        self.save_calls += 1;
        Ok(self.state.clone())
    }
}

// ---------------------------------------------------------------------------------------------
// Destination host.

struct DestHost {
    mem: Vec<u8>,
    /// A host bug: this page is written one page further on (a memslot mistake).
    misplaced: Option<u64>,
    pages: u64,
    page_writes: u64,
    restored: Option<Vec<u8>>,
    restore_calls: u32,
    start_calls: u32,
}

impl DestHost {
    fn new(pages: u64) -> Self {
        DestHost {
            // Garbage, so that every page (zero pages included) must really be written.
            mem: vec![0xa5; pages as usize * PAGE],
            misplaced: None,
            pages,
            page_writes: 0,
            restored: None,
            restore_calls: 0,
            start_calls: 0,
        }
    }
}

impl PageWrite for DestHost {
    fn write_page(&mut self, page: PageIndex, data: &[u8]) -> Result<(), HostError> {
        assert!(
            page.0 < self.pages,
            "the receiver wrote page {} of a {}-page guest",
            page.0,
            self.pages
        );
        assert_eq!(data.len(), PAGE, "the receiver wrote a partial page");
        assert_eq!(
            self.start_calls, 0,
            "a page was written after the guest started"
        );
        let slot = if self.misplaced == Some(page.0) {
            (page.0 + 1) % self.pages
        } else {
            page.0
        };
        let at = slot as usize * PAGE;
        self.mem[at..at + PAGE].copy_from_slice(data);
        self.page_writes += 1;
        Ok(())
    }
}

impl DestinationGuest for DestHost {
    fn read_back(&mut self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError> {
        let at = page.0 as usize * PAGE;
        buf.copy_from_slice(&self.mem[at..at + PAGE]);
        Ok(())
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), HostError> {
        assert_eq!(self.start_calls, 0, "state restored into a running guest");
        self.restored = Some(state.to_vec());
        self.restore_calls += 1;
        Ok(())
    }

    fn start(&mut self) -> Result<(), HostError> {
        assert!(
            self.restored.is_some(),
            "guest started before its state was restored"
        );
        self.start_calls += 1;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Independent accounting of what crossed the link.

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct TapRound {
    pages: u64,
    zero_pages: u64,
    bytes: u64,
}

/// Decodes the source's output as it is emitted (before any tampering).
#[derive(Default)]
struct Tap {
    rounds: Vec<TapRound>,
    open: TapRound,
    control_bytes: u64,
    abort_bytes: u64,
    total: u64,
    device_state: Vec<u8>,
    device_state_frames: u32,
    switchover: Option<u32>,
    complete: Option<u128>,
    aborts: Vec<AbortCode>,
    /// The start of a frame whose rest is still to come (v2's output is bounded by the
    /// caller's room, so a control frame may be cut between two calls).
    partial: Vec<u8>,
}

impl Tap {
    fn feed(&mut self, bytes: &[u8]) {
        let mut stream = core::mem::take(&mut self.partial);
        stream.extend_from_slice(bytes);
        let mut at = 0;
        while at < stream.len() {
            let (frame, len) = match Frame::parse(&stream[at..]) {
                Ok(parsed) => parsed,
                Err(WireError::Incomplete { .. }) => break,
                Err(e) => panic!("the source emitted a bad frame: {e}"),
            };
            at += len;
            let len = len as u64;
            self.total += len;
            match frame {
                Frame::Pages { entries, .. } => {
                    self.open.bytes += len;
                    for entry in entries.iter() {
                        let entry = entry.expect("the source emitted a bad page entry");
                        self.open.pages += 1;
                        if entry.encoding == Encoding::ZERO {
                            self.open.zero_pages += 1;
                        }
                    }
                }
                Frame::Abort { code, .. } => {
                    self.abort_bytes += len;
                    self.aborts.push(code);
                }
                other => {
                    self.control_bytes += len;
                    match other {
                        Frame::RoundEnd {
                            round,
                            channel,
                            pages,
                        } => {
                            assert_eq!(channel, 0, "one channel");
                            assert_eq!(round as usize, self.rounds.len() + 1, "round marker");
                            assert_eq!(pages, self.open.pages, "round {round} marker count");
                            self.rounds.push(core::mem::take(&mut self.open));
                        }
                        Frame::DeviceState(b) => {
                            self.device_state.extend_from_slice(b);
                            self.device_state_frames += 1;
                        }
                        Frame::Switchover { rounds, .. } => self.switchover = Some(rounds),
                        Frame::Complete { digest } => self.complete = Some(digest),
                        _ => {}
                    }
                }
            }
        }
        self.partial = stream[at..].to_vec();
    }
}

/// What the destination said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reply {
    Accept,
    Ready,
    Verified(Verdict),
    Abort(AbortCode),
    /// The destination's running total of bytes taken in (`FEATURE_APPLIED`).
    Applied(u64),
    Other(FrameKind),
}

fn parse_replies(bytes: &[u8]) -> Vec<Reply> {
    let mut at = 0;
    let mut replies = Vec::new();
    while at < bytes.len() {
        let (frame, len) = Frame::parse(&bytes[at..])
            .unwrap_or_else(|e| panic!("a side emitted a bad or partial frame: {e}"));
        at += len;
        replies.push(match frame {
            Frame::Accept { .. } => Reply::Accept,
            Frame::Ready => Reply::Ready,
            Frame::Verified { verdict, .. } => Reply::Verified(verdict),
            Frame::Abort { code, .. } => Reply::Abort(code),
            Frame::Applied { bytes } => Reply::Applied(bytes),
            other => Reply::Other(other.kind().expect("a known frame kind")),
        });
    }
    replies
}

// ---------------------------------------------------------------------------------------------
// The simulator.

/// Interference on the source → destination stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tamper {
    None,
    /// Flip one byte of the first page frame emitted while the source's guest is (or is not)
    /// paused.
    CorruptPage {
        while_paused: bool,
    },
    /// Re-encode the Complete frame with its digest XORed with this.
    CompleteDigest {
        xor: u128,
    },
    /// Re-encode the destination's Verified reply as a Match carrying its digest XORed with
    /// this (a lying or broken destination).
    VerifiedDigest {
        xor: u128,
    },
}

#[derive(Debug)]
enum End {
    Done,
    SourceFailed(MigrationError),
}

type InFlight = VecDeque<(Nanos, Vec<u8>)>;

/// A migration under test: the source engine and its guest, driven by the crate's one driver
/// loop (`memferry::drive::drive_source`) over [`Net`], the simulated link that owns the
/// destination. `Sim` derefs to its `Net`.
struct Sim {
    guest: SourceHost,
    source: Source,
    net: Net,
}

/// The link, the destination and the instruments: everything but the source.
struct Net {
    sc: Scenario,
    now: Nanos,
    bandwidth: ByteRate,
    chunk_rng: Rng,
    target: DestHost,
    dest: Destination,
    to_dest: InFlight,
    to_src: InFlight,
    /// Events the source's loop has not yet taken: replies cut into chunks, and deliveries.
    src_events: VecDeque<LinkEvent<String>>,
    dest_inbox: Vec<u8>,
    out: Vec<u8>,
    scratch: Vec<u8>,
    dest_error: Option<MigrationError>,
    source_error: Option<MigrationError>,
    tap: Tap,
    /// The destination's replies, `Applied` reports aside.
    replies: Vec<Reply>,
    /// The totals of its `Applied` reports, in order.
    applied: Vec<u64>,
    tamper: Tamper,
    tampered: bool,
    wire_to_dest: u64,
    wire_to_src: u64,
    last_src_delivery: Option<Nanos>,
    dest_start_seen: bool,
    /// Calls from the loop (send and wait), against a cap that proves termination.
    steps: u64,
}

impl std::ops::Deref for Sim {
    type Target = Net;
    fn deref(&self) -> &Net {
        &self.net
    }
}

impl std::ops::DerefMut for Sim {
    fn deref_mut(&mut self) -> &mut Net {
        &mut self.net
    }
}

impl Sim {
    fn new(sc: &Scenario, tamper: Tamper) -> Self {
        let (layout, dest_layout) = sc.layouts();
        let room = sc.config.batch_bytes.max(wire::page_frame_len(PAGE));
        Sim {
            guest: SourceHost::new(sc),
            source: Source::pre_copy(layout, sc.config),
            net: Net {
                sc: sc.clone(),
                now: sc.start_at,
                bandwidth: ByteRate(sc.bandwidth),
                chunk_rng: Rng(sc.seed ^ 0xc4a2_11f0_9d3e_5b77),
                target: DestHost::new(sc.dest_pages),
                dest: Destination::new(
                    dest_layout,
                    DestinationConfig {
                        verify: sc.dest_verify,
                        ..DestinationConfig::default()
                    },
                ),
                to_dest: VecDeque::new(),
                to_src: VecDeque::new(),
                src_events: VecDeque::new(),
                dest_inbox: Vec::new(),
                out: vec![0; room],
                scratch: Vec::new(),
                dest_error: None,
                source_error: None,
                tap: Tap::default(),
                replies: Vec::new(),
                applied: Vec::new(),
                tamper,
                tampered: false,
                wire_to_dest: 0,
                wire_to_src: 0,
                last_src_delivery: None,
                dest_start_seen: false,
                steps: 0,
            },
        }
    }

    /// Runs the migration with the crate's driver loop; then delivers what is still in flight
    /// (a failed source's abort frame, say).
    fn run(&mut self) -> End {
        let Sim { guest, source, net } = self;
        let result = drive_source(source, guest, net, &mut |_| {});
        net.flush(guest);
        match result {
            Ok(()) => End::Done,
            Err(failure) => {
                net.source_error = Some(failure.error.clone());
                End::SourceFailed(failure.error)
            }
        }
    }
}

impl Net {
    fn chunk_len(&mut self, left: usize) -> usize {
        (1 + self.chunk_rng.below(self.sc.max_chunk as u64) as usize).min(left)
    }

    /// Moves virtual time to `t`; the guest runs meanwhile (until the source has failed and
    /// resumed it: from then on the guest's memory is left as the failure found it, for the
    /// tests to compare with the snapshot).
    fn set_time(&mut self, guest: &mut SourceHost, t: Nanos) {
        assert!(
            t >= self.now,
            "virtual time went backwards: {t} < {}",
            self.now
        );
        self.now = t;
        if self.source_error.is_none() && guest.resume_calls == 0 {
            guest.advance(t);
        }
    }

    /// Puts the source's bytes on the link, to arrive at `sent + latency`.
    fn queue_to_dest(&mut self, paused: bool, sent: Nanos, mut bytes: Vec<u8>) {
        // Page frames are never cut (the engine writes whole frames into the room it gets), so
        // tampering looks only at chunks that start on a frame boundary.
        let aligned = self.tap.partial.is_empty();
        self.tap.feed(&bytes);
        if aligned {
            self.apply_tamper(paused, &mut bytes);
        }
        self.wire_to_dest += bytes.len() as u64;
        self.to_dest.push_back((sent + self.sc.latency, bytes));
    }

    fn apply_tamper(&mut self, paused: bool, bytes: &mut [u8]) {
        if self.tampered || self.tamper == Tamper::None {
            return;
        }
        let mut at = 0;
        while at < bytes.len() {
            let Ok((frame, len)) = Frame::parse(&bytes[at..]) else {
                return; // a control frame cut at the end of the chunk
            };
            match (self.tamper, frame) {
                (Tamper::CorruptPage { while_paused }, Frame::Pages { entries, .. })
                    if paused == while_paused =>
                {
                    // A payload byte of the first entry if it has one, else a byte of its page
                    // index.
                    let first = entries.iter().next().unwrap().unwrap();
                    let entry_at = at + wire::HEADER_LEN + wire::PAGES_HEADER_LEN;
                    let flip = if first.payload.is_empty() {
                        entry_at
                    } else {
                        entry_at + wire::PAGE_ENTRY_LEN + first.payload.len() / 2
                    };
                    bytes[flip] ^= 0x20;
                    self.tampered = true;
                    return;
                }
                (Tamper::CompleteDigest { xor }, Frame::Complete { digest }) => {
                    let mut forged = Vec::new();
                    Frame::Complete {
                        digest: digest ^ xor,
                    }
                    .emit(&mut forged);
                    assert_eq!(forged.len(), len);
                    bytes[at..at + len].copy_from_slice(&forged);
                    self.tampered = true;
                    return;
                }
                _ => {}
            }
            at += len;
        }
    }

    fn apply_reply_tamper(&mut self, bytes: &mut [u8]) {
        let Tamper::VerifiedDigest { xor } = self.tamper else {
            return;
        };
        if self.tampered {
            return;
        }
        let mut at = 0;
        while at < bytes.len() {
            let (frame, len) = Frame::parse(&bytes[at..]).expect("parsed already");
            if let Frame::Verified { digest, .. } = frame {
                let mut forged = Vec::new();
                Frame::Verified {
                    verdict: Verdict::Match,
                    digest: digest ^ xor,
                }
                .emit(&mut forged);
                assert_eq!(forged.len(), len);
                bytes[at..at + len].copy_from_slice(&forged);
                self.tampered = true;
                return;
            }
            at += len;
        }
    }

    fn deliver_to_dest(&mut self, guest: &SourceHost, at: Nanos, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = self.chunk_len(rest.len());
            self.dest_inbox.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            let failed_before = self.dest_error.is_some();
            let mut out = Vec::new();
            match self
                .dest
                .receive(at, &self.dest_inbox, &mut self.target, &mut out)
            {
                Ok(used) => {
                    assert!(used <= self.dest_inbox.len());
                    self.dest_inbox.drain(..used);
                }
                Err(e) => {
                    match &self.dest_error {
                        None => self.dest_error = Some(e),
                        Some(first) => {
                            assert_eq!(&e, first, "the receiver must repeat its first error")
                        }
                    }
                    self.dest_inbox.clear();
                }
            }
            if failed_before {
                assert!(out.is_empty(), "a failed receiver emitted more frames");
            }
            if !self.dest_start_seen && self.target.start_calls > 0 {
                self.dest_start_seen = true;
                assert!(
                    guest.paused,
                    "the destination started while the source guest was running"
                );
            }
            if !out.is_empty() {
                for reply in parse_replies(&out) {
                    match reply {
                        Reply::Applied(total) => self.applied.push(total),
                        other => self.replies.push(other),
                    }
                }
                self.apply_reply_tamper(&mut out);
                self.wire_to_src += out.len() as u64;
                self.to_src.push_back((at + self.sc.latency, out));
            }
        }
    }

    /// Replies reach the source's transport: cut into random chunks, each one event for the
    /// loop (so the engine sees partial frames).
    fn deliver_to_src(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = self.chunk_len(rest.len());
            self.src_events.push_back(LinkEvent::Received {
                channel: 0,
                bytes: rest[..n].to_vec(),
            });
            rest = &rest[n..];
        }
    }

    /// Runs the link until `target`, delivering every chunk due by then in time order.
    fn advance_to(&mut self, guest: &mut SourceHost, target: Nanos) {
        loop {
            let d = self.to_dest.front().map(|x| x.0).filter(|&t| t <= target);
            let s = self.to_src.front().map(|x| x.0).filter(|&t| t <= target);
            let to_dest = match (d, s) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some(a), Some(b)) => a <= b,
            };
            let queue = if to_dest {
                &mut self.to_dest
            } else {
                &mut self.to_src
            };
            let (at, bytes) = queue.pop_front().unwrap();
            self.set_time(guest, at);
            if to_dest {
                self.deliver_to_dest(guest, at, &bytes);
            } else {
                self.deliver_to_src(&bytes);
            }
        }
        if target > self.now {
            self.set_time(guest, target);
        }
    }

    fn next_arrival(&self) -> Option<Nanos> {
        let d = self.to_dest.front().map(|x| x.0);
        let s = self.to_src.front().map(|x| x.0);
        match (d, s) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Delivers everything still in flight.
    fn flush(&mut self, guest: &mut SourceHost) {
        while let Some(t) = self.next_arrival() {
            self.advance_to(guest, t.max(self.now));
        }
    }

    /// A generous bound on the loop's calls: a round takes at most a few per page (a batch, a
    /// delivery and a wait each sending at least one page, and the destination's `Applied`
    /// reports, which arrive a byte at a time on the slowest links) plus a few, hashing at most
    /// one per page, and waiting for the peer a few per message.
    fn step_cap(&self) -> u64 {
        // The push rounds, a predictor's release round, and stop-and-copy.
        let rounds = self.sc.config.stop.max_rounds.min(1000) as u64 + 2;
        rounds * (8 * self.sc.pages + 64) + 2 * self.sc.pages + 4000
    }

    fn step(&mut self) {
        self.steps += 1;
        let cap = self.step_cap();
        assert!(
            self.steps <= cap,
            "the migration did not terminate within {cap} steps of the driver loop, now {}",
            self.now
        );
    }
}

impl Link<SourceHost> for Net {
    type Error = String;

    fn now(&mut self) -> Nanos {
        self.now
    }

    fn channels(&self) -> u16 {
        1
    }

    fn buffer(&mut self, _channel: u16) -> Option<&mut [u8]> {
        // The link takes everything at once; the source's time goes by while it is carried.
        Some(&mut self.out)
    }

    fn send(&mut self, guest: &mut SourceHost, _channel: u16, len: usize) {
        self.step();
        if len == 0 {
            return;
        }
        let bytes = self.out[..len].to_vec();
        let sent = self.now + self.bandwidth.time_for(len as u64);
        self.queue_to_dest(guest.paused, sent, bytes);
        self.advance_to(guest, sent);
        self.src_events
            .push_back(LinkEvent::Delivered { bytes: len as u64 });
    }

    fn wait(&mut self, guest: &mut SourceHost, deadline: Option<Nanos>) -> LinkEvent<String> {
        self.step();
        loop {
            if let Some(event) = self.src_events.pop_front() {
                if let LinkEvent::Received { .. } = &event {
                    self.last_src_delivery = Some(self.now);
                }
                return event;
            }
            match (self.next_arrival(), deadline) {
                (Some(t), Some(d)) if d < t => {
                    self.advance_to(guest, d.max(self.now));
                    return LinkEvent::Idle;
                }
                (Some(t), _) => self.advance_to(guest, t.max(self.now)),
                (None, Some(d)) => {
                    self.advance_to(guest, d.max(self.now));
                    return LinkEvent::Idle;
                }
                (None, None) => panic!(
                    "deadlock: the source waits but nothing is in flight (destination {:?}, error {:?})",
                    self.dest.status(),
                    self.dest_error
                ),
            }
        }
    }

    fn sending(&self) -> bool {
        false
    }

    fn encodes_pages(&self) -> bool {
        self.sc.plans
    }

    fn send_plan(&mut self, guest: &mut SourceHost, plan: PagePlan) {
        let channel = plan.channel();
        assert!(
            plan.planned_bytes() <= self.out.len(),
            "a plan larger than its buffer"
        );
        match plan.encode(&*guest, None, &mut self.scratch, &mut self.out) {
            Ok(outcome) => {
                assert!(outcome.bytes <= outcome.planned_bytes);
                self.src_events.push_back(LinkEvent::Encoded(outcome));
                self.send(guest, channel, outcome.bytes);
            }
            Err(e) => self.src_events.push_back(LinkEvent::HostFailed(e)),
        }
    }
}

fn first_diff_page(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(PAGE).zip(b.chunks(PAGE)).position(|(x, y)| x != y)
}

// ---------------------------------------------------------------------------------------------
// The property: pre-copy terminates and the destination equals the source.

/// Runs `sc` to completion and checks everything a successful migration promises.
fn check_migration(sc: &Scenario) -> Result<(), TestCaseError> {
    let mut sim = Sim::new(sc, Tamper::None);
    check_sim(sc, &mut sim, false)
}

/// Runs `sim` (built for `sc`) and checks everything a successful migration promises.
/// `custom_predictor`: the source's strategy holds pages back with a predictor that
/// `sc.config.predictor` does not name.
fn check_sim(sc: &Scenario, sim: &mut Sim, custom_predictor: bool) -> Result<(), TestCaseError> {
    let end = sim.run();
    prop_assert!(
        matches!(end, End::Done),
        "migration failed: {:?} (destination error {:?})",
        end,
        sim.dest_error
    );
    prop_assert!(sim.dest_error.is_none(), "{:?}", sim.dest_error);
    prop_assert!(
        sim.to_dest.is_empty() && sim.to_src.is_empty(),
        "bytes still in flight after Done"
    );
    prop_assert!(sim.dest_inbox.is_empty());
    prop_assert!(
        !sim.src_events
            .iter()
            .any(|e| matches!(e, LinkEvent::Received { .. })),
        "replies left unread"
    );

    // The guest was paused once, at switchover, and stays paused: the source is released.
    let guest = &sim.guest;
    prop_assert_eq!(guest.pause_calls, 1);
    // Dirty logging ran for the migration and ended with it.
    prop_assert_eq!((guest.log_starts, guest.log_stops), (1, 1));
    let r = sim.source.report();
    prop_assert_eq!(r.guest_pause, Nanos::from_millis(3));
    // Every sync's cost is in some round (1 µs a sync, 2 µs re-arming).
    let synced: u64 = r.rounds.iter().map(|r| r.dirty_sync_time.0).sum();
    let cleared: u64 = r.rounds.iter().map(|r| r.dirty_clear_time.0).sum();
    prop_assert!(
        synced > 0 && cleared == 2 * synced,
        "{} {}",
        synced,
        cleared
    );
    prop_assert_eq!(guest.resume_calls, 0);
    prop_assert!(guest.paused);
    prop_assert_eq!(guest.save_calls, 1);
    prop_assert!(sim.source.is_finished());
    prop_assert!(
        !sim.source.is_paused(),
        "a released source must not claim the guest"
    );
    let snapshot = guest.snapshot.as_ref().unwrap();
    prop_assert!(
        first_diff_page(&guest.mem, snapshot).is_none(),
        "the source memory changed while paused"
    );

    // The destination equals the source at switchover, byte for byte, and has its state.
    if let Some(page) = first_diff_page(&sim.target.mem, snapshot) {
        return Err(TestCaseError::fail(format!(
            "destination page {page} differs from the source at switchover ({} guest writes)",
            guest.writes
        )));
    }
    prop_assert_eq!(sim.target.restored.as_deref(), Some(&guest.state[..]));
    prop_assert_eq!(sim.target.restore_calls, 1);
    prop_assert_eq!(sim.target.start_calls, 1);
    prop_assert_eq!(
        sim.dest.status(),
        // Without a digest to come, the destination completes when its guest starts.
        DestinationStatus::Complete
    );

    let r = sim.source.report();
    let rounds = &r.rounds;
    let stop = sc.config.stop;
    prop_assert_eq!(r.page_count, sc.pages);
    prop_assert_eq!(r.page_size, PAGE as u64);

    // Verification.
    let digest = memory_digest(snapshot, PAGE);
    if sc.config.verify {
        prop_assert_eq!(r.source_digest, Some(digest));
        prop_assert_eq!(sim.tap.complete, Some(digest));
        if sc.dest_verify {
            prop_assert_eq!(r.verified, Some(true));
            prop_assert_eq!(r.destination_digest, Some(digest));
            prop_assert_eq!(sim.dest.digest(), Some(digest));
        } else {
            // A destination that keeps no hashes says so; nothing was checked.
            prop_assert_eq!(r.verified, None);
            prop_assert_eq!(r.destination_digest, None);
        }
    } else {
        prop_assert_eq!(r.verified, None);
        prop_assert_eq!(r.source_digest, None);
        prop_assert_eq!(sim.tap.complete, None);
    }

    // Rounds: numbered from 1, stop-and-copy last and only last, within the round budget.
    prop_assert!(
        rounds.len() >= 2,
        "at least one push round and stop-and-copy"
    );
    // A predictor may add one release round: its held-back pages go while the guest runs.
    let release = u64::from(sc.config.predictor != PredictorKind::None || custom_predictor);
    prop_assert!(
        rounds.len() as u64 <= stop.max_rounds as u64 + 1 + release,
        "{} rounds with max_rounds {}",
        rounds.len(),
        stop.max_rounds
    );
    for (i, round) in rounds.iter().enumerate() {
        prop_assert_eq!(round.round as usize, i + 1);
        prop_assert_eq!(
            round.stop_and_copy,
            i + 1 == rounds.len(),
            "round {}",
            i + 1
        );
        let prev = i.checked_sub(1).map(|p| &rounds[p]);
        // What is pending after the previous round: its dirt, plus what it held back and the
        // guest did not dirty again (those pages were not in its dirt).
        let pending = prev.map(|p| p.dirty_pages + p.held_back - p.held_back_redirtied);
        if let Some(p) = prev {
            prop_assert!(p.held_back_redirtied <= p.held_back);
            prop_assert!(p.held_back_redirtied <= p.dirty_pages);
        }
        if round.stop_and_copy || (sc.config.predictor == PredictorKind::None && !custom_predictor)
        {
            prop_assert_eq!(round.held_back, 0, "round {}", i + 1);
        }
        if let (Some(pending), false) = (pending, round.stop_and_copy) {
            // Each push round sends exactly what is pending, less what it holds back.
            prop_assert_eq!(round.pages + round.held_back, pending, "round {}", i + 1);
        }
        if let Some(pending) = pending {
            // Stop-and-copy sends everything pending, held-back pages included, and adds what
            // was written between the last sync and the pause.
            if round.stop_and_copy {
                prop_assert!(round.pages >= pending, "round {}: {:?}", i + 1, rounds);
            }
            // A push round starts when the previous one ends; stop-and-copy starts at the pause,
            // once the transport has delivered what it held.
            let previous_end = rounds[i - 1].start + rounds[i - 1].duration;
            if round.stop_and_copy {
                prop_assert!(round.start >= previous_end, "round {}", i + 1);
            } else {
                prop_assert_eq!(
                    round.start,
                    previous_end,
                    "round {} starts when round {} ends",
                    i + 1,
                    i
                );
            }
        }
        // The round's bandwidth limit was respected.
        if !round.rate_limit.is_unlimited() {
            prop_assert!(
                round.bytes <= round.rate_limit.bytes_in(round.duration),
                "round {} sent {} bytes in {} at limit {}",
                i + 1,
                round.bytes,
                round.duration,
                round.rate_limit
            );
        }
    }
    prop_assert_eq!(rounds[0].pages, sc.pages, "round 1 sends every page");
    prop_assert_eq!(rounds[0].rate_limit, sc.config.rate.first_round);
    prop_assert_eq!(rounds.last().unwrap().rate_limit, sc.config.rate.max);

    // The stop reason is set and true.
    let push_rounds = rounds.len() as u32 - 1;
    let last_push = &rounds[rounds.len() - 2];
    match r.stop_reason {
        None => return Err(TestCaseError::fail("no stop reason")),
        // The caller asked (`switchover_now`): nothing to check against the rules.
        Some(StopReason::Requested) => {}
        // After a release round the rounds stop for the reason that started it: the rule held
        // for the round before.
        Some(StopReason::DowntimeTarget) => prop_assert!(
            last_push.estimated_downtime <= stop.downtime_target
                || (release == 1
                    && rounds.len() >= 3
                    && rounds[rounds.len() - 3].estimated_downtime <= stop.downtime_target),
            "{}",
            r.stop_detail
        ),
        Some(StopReason::MaxRounds) => prop_assert!(
            push_rounds as u64 >= stop.max_rounds as u64
                && push_rounds as u64 <= stop.max_rounds as u64 + release
        ),
        Some(StopReason::NotConverging) => prop_assert!(
            (stop.non_convergence_rounds > 0 && push_rounds >= stop.non_convergence_rounds)
                || (stop.outpaced_rounds > 0 && push_rounds >= stop.outpaced_rounds),
            "{}",
            r.stop_detail
        ),
        Some(StopReason::Deadline) => {
            prop_assert!(stop.deadline.is_some_and(|d| r.preparation_time >= d))
        }
        Some(other) => {
            return Err(TestCaseError::fail(format!(
                "pre-copy stopped by {other:?}"
            )))
        }
    }

    // Counts add up, and match an independent decoding of the stream.
    let sum = |f: fn(&RoundReport) -> u64| rounds.iter().map(f).sum::<u64>();
    prop_assert_eq!(r.pages_sent, sum(|x| x.pages));
    prop_assert_eq!(r.zero_pages_sent, sum(|x| x.zero_pages));
    prop_assert_eq!(r.bytes_sent, sum(|x| x.bytes) + r.control_bytes);
    prop_assert_eq!(sim.tap.rounds.len(), rounds.len());
    for (i, (tap, round)) in sim.tap.rounds.iter().zip(rounds).enumerate() {
        let reported = TapRound {
            pages: round.pages,
            zero_pages: round.zero_pages,
            bytes: round.bytes,
        };
        prop_assert_eq!(*tap, reported, "round {} on the wire vs reported", i + 1);
    }
    prop_assert_eq!(
        sim.tap.open,
        TapRound::default(),
        "pages after the last marker"
    );
    prop_assert_eq!(sim.tap.control_bytes, r.control_bytes);
    prop_assert!(sim.tap.aborts.is_empty());
    prop_assert_eq!(sim.tap.total, r.bytes_sent);
    prop_assert_eq!(sim.wire_to_dest, r.bytes_sent);
    prop_assert_eq!(sim.wire_to_src, r.bytes_received);
    prop_assert_eq!(sim.dest.bytes_received(), r.bytes_sent);
    prop_assert_eq!(sim.dest.pages_received(), r.pages_sent);
    prop_assert_eq!(sim.dest.stale_pages(), 0, "one channel delivers in order");
    prop_assert!(r.committed);
    prop_assert_eq!(r.channels, 1);
    prop_assert_eq!(sim.target.page_writes, r.pages_sent);
    prop_assert_eq!(sim.tap.switchover, Some(rounds.len() as u32));
    prop_assert_eq!(&sim.tap.device_state, &guest.state);
    prop_assert_eq!(r.device_state_bytes, sc.state_len as u64);
    let expected_replies: &[Reply] = if sc.config.verify && sc.dest_verify {
        &[Reply::Accept, Reply::Ready, Reply::Verified(Verdict::Match)]
    } else if sc.config.verify {
        &[
            Reply::Accept,
            Reply::Ready,
            Reply::Verified(Verdict::NotChecked),
        ]
    } else {
        &[Reply::Accept, Reply::Ready]
    };
    // (Hash-first: the destination's content announcement comes between them.)
    let replies: Vec<&Reply> = sim
        .replies
        .iter()
        .filter(|r| !matches!(r, Reply::Other(FrameKind::Have)))
        .collect();
    let expected_replies: Vec<&Reply> = expected_replies.iter().collect();
    prop_assert_eq!(replies, expected_replies);
    // The destination reported what it took in after every push round's end, counting up, never
    // more than it received.
    prop_assert!(sim.applied.len() >= rounds.len() - 1, "{:?}", sim.applied);
    prop_assert!(sim.applied.windows(2).all(|w| w[0] < w[1]));
    prop_assert!(sim
        .applied
        .last()
        .is_some_and(|&t| t <= sim.dest.bytes_received()));

    // Times: the stages tile the migration, and match the virtual clock.
    prop_assert_eq!(
        r.preparation_time + r.downtime + r.resume_time,
        r.total_time,
        "preparation {} + downtime {} + resume {} != total {}",
        r.preparation_time,
        r.downtime,
        r.resume_time,
        r.total_time
    );
    // The preparation ends when the engine asked for the pause (an asynchronous pause parks
    // later, inside the downtime).
    prop_assert_eq!(
        Some(sc.start_at + r.preparation_time),
        guest.pause_asked_at.or(guest.paused_at)
    );
    prop_assert_eq!(rounds.last().unwrap().start, r.preparation_time);
    // Downtime covers the pause until the destination ran, and at most one link latency more
    // (the source learns of the start from the destination's Ready).
    let started = sim.dest.started_at().unwrap();
    let downtime_end = sc.start_at + r.preparation_time + r.downtime;
    prop_assert!(
        started <= downtime_end && downtime_end <= started + sc.latency,
        "downtime ends at {}, the destination started at {}, latency {}",
        downtime_end,
        started,
        sc.latency
    );
    prop_assert_eq!(Some(sc.start_at + r.total_time), sim.last_src_delivery);
    if !sc.config.verify {
        prop_assert_eq!(r.resume_time, Nanos::ZERO);
    }
    Ok(())
}

/// `lo..hi`, log-uniformly.
fn log_u64(lo: f64, hi: f64) -> impl Strategy<Value = u64> {
    (lo.ln()..hi.ln()).prop_map(|x| x.exp() as u64)
}

fn workload() -> impl Strategy<Value = Workload> {
    (
        prop_oneof![1 => Just(0u64), 4 => log_u64(10.0, 1_000_000.0)],
        1u32..=1000,
        0u32..=1000,
        prop_oneof![Just(0u32), 1u32..=100],
    )
        .prop_map(|(writes_per_sec, hot, bias, zero)| Workload {
            writes_per_sec,
            hot_permille: hot,
            hot_bias_permille: bias,
            zero_permille: zero,
        })
}

fn rate_plan() -> impl Strategy<Value = RatePlan> {
    prop_oneof![
        Just(RatePlan::fixed(ByteRate::UNLIMITED)),
        log_u64(1e6, 1e10).prop_map(|r| RatePlan::fixed(ByteRate(r))),
        (
            log_u64(1e6, 1e9),
            log_u64(1e5, 1e9),
            prop_oneof![
                log_u64(1e6, 1e10).prop_map(ByteRate),
                Just(ByteRate::UNLIMITED)
            ],
        )
            .prop_map(|(first, inc, max)| RatePlan::adaptive(
                ByteRate(first),
                ByteRate(inc),
                max
            )),
    ]
}

fn stop_rules() -> impl Strategy<Value = StopRules> {
    (
        prop_oneof![Just(0u64), 0u64..=2_000, 0u64..=500_000],
        1u32..=10,
        0u32..=5,
        0u32..=300,
        proptest::option::of(0u64..=3_000_000),
        (0u32..=3, 500u32..=1200, 0u32..=2),
    )
        .prop_map(
            |(target_us, max_rounds, nc, shrink, deadline_us, (outpaced, permille, settle))| {
                StopRules {
                    downtime_target: Nanos::from_micros(target_us),
                    max_rounds,
                    non_convergence_rounds: nc,
                    min_shrink_permille: shrink,
                    deadline: deadline_us.map(Nanos::from_micros),
                    outpaced_rounds: outpaced,
                    outpaced_permille: permille,
                    max_downtime: None,
                    settle_rounds: settle,
                }
            },
        )
}

fn config() -> impl Strategy<Value = PreCopyConfig> {
    (
        rate_plan(),
        stop_rules(),
        prop_oneof![
            Just(1usize << 20),
            Just(1usize),
            log_u64(1.0, (1u64 << 21) as f64).prop_map(|b| b.max(1) as usize)
        ],
        any::<bool>(),
        // With any predictor, the destination must still equal the source.
        prop_oneof![
            Just("none"),
            Just("wsclock"),
            Just("lru"),
            Just("splay"),
            Just("history"),
            Just("lru:syncs=1,cap=8"),
            Just("history:m=1,n=2")
        ],
        0u32..6,
    )
        .prop_map(
            |(rate, stop, batch_bytes, verify, predictor, learning_samples)| PreCopyConfig {
                rate,
                stop,
                batch_bytes,
                verify,
                // Verification before start has its own tests (its replies come in another order).
                verify_before_start: false,
                predictor: PredictorKind::parse(predictor).expect("a valid predictor"),
                learning_samples,
                throttle_when_outpaced: false,
                post_copy_when_outpaced: false,
            },
        )
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        (
            prop_oneof![1u64..=130, 1u64..=600],
            any::<u64>(),
            0u32..=1000,
            workload(),
        ),
        (
            log_u64(1e6, 1e10),
            prop_oneof![Just(0u64), 1u64..=50_000],
            prop_oneof![
                Just(1usize),
                1usize..=64,
                log_u64(1.0, 2e6).prop_map(|c| c.max(1) as usize)
            ],
            0u64..=1_000_000_000_000,
        ),
        (0usize..=20_000, config(), any::<bool>()),
    )
        .prop_map(
            |(
                (pages, seed, initial_zero_permille, workload),
                (bandwidth, latency_us, max_chunk, start_at),
                (state_len, config, dest_verify),
            )| Scenario {
                pages,
                dest_pages: pages,
                seed,
                initial_zero_permille,
                workload,
                bandwidth,
                latency: Nanos::from_micros(latency_us),
                max_chunk,
                start_at: Nanos(start_at),
                state_len,
                config,
                dest_verify,
                regions: Vec::new(),
                dest_regions: Vec::new(),
                plans: seed & 1 == 1,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn precopy_terminates_and_destination_equals_source(sc in scenario()) {
        check_migration(&sc)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic scenarios.

/// A busy guest (a hot set written fast) on a slower link, to get several rounds and a
/// non-empty stop-and-copy.
fn busy_scenario(pages: u64) -> Scenario {
    let mut sc = quiet_scenario(pages);
    sc.workload = Workload {
        writes_per_sec: 50_000,
        hot_permille: 200,
        hot_bias_permille: 950,
        zero_permille: 50,
    };
    sc.bandwidth = 20_000_000;
    sc.config.stop = StopRules {
        downtime_target: Nanos::ZERO,
        max_rounds: 4,
        // This guest outpaces its link on purpose (every round resends the hot set): the
        // scenario is about several rounds, so neither convergence rule stops it early.
        non_convergence_rounds: 0,
        outpaced_rounds: 0,
        ..StopRules::default()
    };
    sc.config.batch_bytes = 64 << 10;
    sc
}

#[test]
fn busy_guest_migrates_over_several_rounds() {
    let sc = busy_scenario(256);
    check_migration(&sc).unwrap();
    // The scenario is only useful if it really exercised re-sends and a non-empty final round.
    let mut sim = Sim::new(&sc, Tamper::None);
    assert!(matches!(sim.run(), End::Done));
    let r = sim.source.report();
    assert_eq!(r.stop_reason, Some(StopReason::MaxRounds));
    assert_eq!(r.rounds.len(), 5);
    assert!(r.rounds.last().unwrap().pages > 0);
    assert!(r.zero_pages_sent > 0);
    assert!(r.pages_resent() > 0);
    assert!(sim.guest.racing_writes > 0);
}

#[test]
fn same_inputs_give_the_same_migration() {
    let sc = busy_scenario(128);
    let mut a = Sim::new(&sc, Tamper::None);
    let mut b = Sim::new(&sc, Tamper::None);
    assert!(matches!(a.run(), End::Done));
    assert!(matches!(b.run(), End::Done));
    assert_eq!(a.source.report(), b.source.report());
    assert_eq!(a.target.mem, b.target.mem);
    assert_eq!(a.steps, b.steps);
}

#[test]
fn device_state_larger_than_a_frame_is_split_and_reassembled() {
    let mut sc = quiet_scenario(8);
    sc.state_len = wire::MAX_BODY_LEN + 1234;
    check_migration(&sc).unwrap();
    let mut sim = Sim::new(&sc, Tamper::None);
    assert!(matches!(sim.run(), End::Done));
    assert_eq!(sim.tap.device_state_frames, 2);
}

/// Engine bug found by the port (fixed in `Source::poll_with_room`): after the final round,
/// `poll` said `WaitForPeer` while part of the device state (and the switchover behind it) was
/// still queued on channel 0 because it did not fit the room; a driver that believes `Next`
/// then waits forever. `poll` must say `Continue` while it has output queued.
#[test]
fn device_state_larger_than_the_room_is_not_left_queued() {
    let mut sc = quiet_scenario(4);
    sc.state_len = 20_000;
    sc.config.batch_bytes = 1;
    // Nothing in flight to wake the driver up when the source wrongly says WaitForPeer.
    sc.latency = Nanos::ZERO;
    check_migration(&sc).unwrap();
}

#[test]
fn empty_device_state_still_switches_over() {
    let mut sc = quiet_scenario(8);
    sc.state_len = 0;
    check_migration(&sc).unwrap();
}

/// `batch_bytes` is "how many bytes one poll appends at most"; with 0 the engine must still make
/// progress (or refuse the configuration), not spin on `Poll::Continue` forever.
#[test]
fn zero_batch_bytes_still_terminates() {
    let mut sc = quiet_scenario(4);
    sc.config.batch_bytes = 0;
    check_migration(&sc).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Failure paths through the simulator.

/// A corrupted page frame, before or during stop-and-copy. `one_page_per_poll` makes the
/// source hand out one page frame per poll, so the destination's abort comes back before the
/// switchover is handed out (before the commit point); otherwise the whole final round and the
/// switchover go out in one poll and the abort arrives after the commit point.
fn corrupt_page(while_paused: bool, one_page_per_poll: bool) -> Sim {
    let mut sc = busy_scenario(64);
    sc.config.stop.max_rounds = 1;
    sc.config.batch_bytes = if one_page_per_poll {
        wire::page_frame_len(PAGE)
    } else {
        1 << 20
    };
    let mut sim = Sim::new(&sc, Tamper::CorruptPage { while_paused });
    let end = sim.run();
    assert!(sim.tampered, "no page frame was sent to corrupt");

    // The destination caught it and said so.
    assert!(
        matches!(
            sim.dest_error,
            Some(MigrationError::Frame(WireError::BadChecksum { .. }))
        ),
        "destination: {:?}",
        sim.dest_error
    );
    assert_eq!(sim.dest.status(), DestinationStatus::Failed);
    assert_eq!(
        sim.replies,
        [Reply::Accept, Reply::Abort(AbortCode::BadFrame)]
    );
    assert_eq!(sim.target.start_calls, 0);

    // The source took the abort.
    let error = match end {
        End::SourceFailed(e) => e,
        End::Done => panic!("migration completed over a corrupted frame"),
    };
    assert!(
        matches!(
            error,
            MigrationError::PeerAborted {
                code: AbortCode::BadFrame,
                ..
            }
        ),
        "source: {error:?}"
    );
    assert!(sim.source.is_finished());
    assert_eq!(sim.source.failure(), Some(&error));
    let expected_pauses = u32::from(while_paused);
    assert_eq!(sim.guest.pause_calls, expected_pauses);
    assert!(
        sim.tap.aborts.is_empty(),
        "the source must not answer an abort with an abort"
    );
    assert_eq!(sim.source.report().bytes_sent, sim.tap.total);
    if while_paused {
        assert_eq!(sim.guest.snapshot.as_ref(), Some(&sim.guest.mem));
        assert_eq!(sim.source.report().stop_reason, Some(StopReason::MaxRounds));
        assert!(sim.tap.rounds[0].pages > 0);
    }

    // Every later call repeats the error and emits nothing.
    let mut out = Vec::new();
    assert_eq!(
        sim.source.poll(sim.now, &mut sim.guest, &mut out),
        Err(error.clone())
    );
    assert!(out.is_empty());
    sim
}

/// The source's guest runs again and nothing is left for the caller to decide.
fn assert_resumed(sim: &Sim) {
    assert!(!sim.source.report().committed);
    assert_eq!(
        sim.source.status(),
        SourceStatus::Failed {
            source_paused: false
        }
    );
    assert!(!sim.source.is_paused());
    assert!(!sim.guest.paused, "the source guest must run again");
    assert_eq!(
        sim.guest.resume_calls, sim.guest.pause_calls,
        "resumed once"
    );
}

/// Changed promise (v2): past the commit point the source stays paused and says so; the caller
/// resumes it with `resume_source` (here safe: the destination aborted before starting).
fn assert_paused_then_resumable(sim: &mut Sim) {
    assert!(sim.source.report().committed);
    assert_eq!(
        sim.source.status(),
        SourceStatus::Failed {
            source_paused: true
        }
    );
    assert!(sim.source.is_paused());
    assert!(sim.guest.paused, "the engine resumed a committed source");
    assert_eq!(sim.guest.resume_calls, 0);
    sim.source.resume_source(&mut sim.guest).unwrap();
    assert!(!sim.guest.paused && !sim.source.is_paused());
    assert_eq!(sim.guest.resume_calls, 1);
    assert_eq!(
        sim.source.status(),
        SourceStatus::Failed {
            source_paused: false
        }
    );
    // A second call does nothing.
    sim.source.resume_source(&mut sim.guest).unwrap();
    assert_eq!(sim.guest.resume_calls, 1);
}

#[test]
fn corrupted_page_before_stop_and_copy_aborts_both_sides() {
    let sim = corrupt_page(false, true);
    assert_resumed(&sim);
}

#[test]
fn corrupted_page_during_stop_and_copy_aborts_and_resumes_the_source() {
    let sim = corrupt_page(true, true);
    assert_resumed(&sim);
    assert_eq!(sim.guest.resume_calls, 1);
}

/// The same corruption, but the switchover was handed out before the destination's abort came
/// back: the source is past the commit point, yet the abort (sent before any `Ready`) proves the
/// destination refused for good and never runs the guest, so the source resumes.
#[test]
fn corrupted_page_after_the_commit_point_resumes_on_the_destinations_abort() {
    let sim = corrupt_page(true, false);
    assert!(sim.source.report().committed);
    assert_eq!(
        sim.source.status(),
        SourceStatus::Failed {
            source_paused: false
        }
    );
    assert!(!sim.guest.paused, "the source guest runs again");
    assert_eq!(sim.guest.resume_calls, 1);
}

#[test]
fn corrupted_page_of_an_idle_guest_leaves_its_memory_untouched() {
    let mut sc = quiet_scenario(32);
    // One page per poll: the abort comes back long before the switchover (with 1 MiB per poll
    // an idle guest's migration is committed before the abort arrives; see the test above).
    sc.config.batch_bytes = wire::page_frame_len(PAGE);
    let initial = SourceHost::new(&sc).mem;
    let mut sim = Sim::new(
        &sc,
        Tamper::CorruptPage {
            while_paused: false,
        },
    );
    assert!(matches!(
        sim.run(),
        End::SourceFailed(MigrationError::PeerAborted { .. })
    ));
    assert!(sim.tampered);
    assert_eq!(sim.guest.writes, 0);
    assert!(sim.guest.mem == initial, "source memory changed");
    assert!(!sim.guest.paused && !sim.source.is_paused());
    assert_eq!(sim.guest.pause_calls, sim.guest.resume_calls);
    assert!(!sim.source.report().committed);
}

#[test]
fn hello_for_another_page_count_is_refused() {
    let mut sc = quiet_scenario(16);
    sc.dest_pages = 17;
    let mut sim = Sim::new(&sc, Tamper::None);
    let end = sim.run();
    match &sim.dest_error {
        Some(MigrationError::Incompatible(why)) => {
            assert!(why.contains("16") && why.contains("17"), "message: {why}")
        }
        other => panic!("destination: {other:?}"),
    }
    assert_eq!(sim.replies, [Reply::Abort(AbortCode::Incompatible)]);
    assert!(
        matches!(
            end,
            End::SourceFailed(MigrationError::PeerAborted {
                code: AbortCode::Incompatible,
                ..
            })
        ),
        "source: {end:?}"
    );
    assert_eq!(sim.target.page_writes, 0);
    assert_eq!(sim.guest.pause_calls, 0);
    assert_eq!(sim.guest.reads, 0);
}

/// Was `tampered_digest_fails_both_sides_and_resumes_the_source`. Changed promise (v2): the
/// digest is checked after the destination runs, i.e. past the commit point, so the source is
/// no longer resumed: it reports the failure, stays paused, and `resume_source` is the
/// caller's decision.
#[test]
fn tampered_digest_fails_both_sides_and_leaves_the_source_paused() {
    let sc = busy_scenario(64);
    let mut sim = Sim::new(&sc, Tamper::CompleteDigest { xor: 0x5a5a });
    let end = sim.run();
    assert!(sim.tampered, "no Complete frame was sent");
    let true_digest = memory_digest(sim.guest.snapshot.as_ref().unwrap(), PAGE);
    assert_eq!(
        sim.dest_error,
        Some(MigrationError::DigestMismatch {
            source: true_digest ^ 0x5a5a,
            destination: true_digest,
        })
    );
    assert_eq!(
        sim.replies,
        [
            Reply::Accept,
            Reply::Ready,
            Reply::Verified(Verdict::Mismatch),
            // Changed promise: a destination that started says so in its abort, so the source
            // never resumes on it.
            Reply::Abort(AbortCode::GuestStarted)
        ]
    );
    // The source failed on the Mismatch verdict (the destination's digest equals its own, but
    // a mismatch verdict is never taken as success).
    match end {
        End::SourceFailed(MigrationError::DigestMismatch { source, .. }) => {
            assert_eq!(source, true_digest)
        }
        other => panic!("source: {other:?}"),
    }
    let r = sim.source.report().clone();
    assert_eq!(r.verified, Some(false));
    assert_eq!(r.source_digest, Some(true_digest));
    assert_eq!(sim.guest.pause_calls, 1);
    assert_eq!(sim.tap.aborts, [AbortCode::DigestMismatch]);
    assert_eq!(
        r.bytes_sent, sim.tap.total,
        "the abort counts as bytes sent"
    );
    // v2 counts the abort in control_bytes too.
    assert_eq!(
        r.bytes_sent,
        r.rounds.iter().map(|x| x.bytes).sum::<u64>() + r.control_bytes
    );
    assert_eq!(sim.guest.snapshot.as_ref(), Some(&sim.guest.mem));
    assert_eq!(sim.target.start_calls, 1, "the destination runs the guest");
    assert_paused_then_resumable(&mut sim);
}

/// v2: the source compares the digests itself. A destination that answers Match but reports a
/// digest other than the source's fails the migration (past the commit point: the source
/// stays paused).
#[test]
fn destination_claiming_a_match_with_a_wrong_digest_fails_the_source() {
    let sc = busy_scenario(64);
    let mut sim = Sim::new(&sc, Tamper::VerifiedDigest { xor: 0x77 });
    let end = sim.run();
    assert!(sim.tampered, "no Verified frame was sent");
    let true_digest = memory_digest(sim.guest.snapshot.as_ref().unwrap(), PAGE);
    match end {
        End::SourceFailed(MigrationError::DigestMismatch {
            source,
            destination,
        }) => {
            assert_eq!(source, true_digest);
            assert_eq!(destination, true_digest ^ 0x77);
        }
        other => panic!("source: {other:?}"),
    }
    let r = sim.source.report().clone();
    assert_eq!(r.verified, Some(false));
    assert_eq!(r.destination_digest, Some(true_digest ^ 0x77));
    assert_eq!(sim.tap.aborts, [AbortCode::DigestMismatch]);
    // The destination believed it matched, then got the source's abort.
    assert!(
        matches!(
            sim.dest_error,
            Some(MigrationError::PeerAborted {
                code: AbortCode::DigestMismatch,
                ..
            })
        ),
        "destination: {:?}",
        sim.dest_error
    );
    assert_paused_then_resumable(&mut sim);
}

/// A simulation whose source verifies before the destination starts (`verify_before_start`);
/// `read_back`: the destination hashes what its host reads back.
fn before_start_sim(sc: &Scenario, read_back: bool) -> Sim {
    let mut sim = Sim::new(sc, Tamper::None);
    let (layout, dest_layout) = sc.layouts();
    sim.source = Source::new(
        layout,
        SessionConfig {
            verify_before_start: true,
            ..SessionConfig::default()
        },
        PreCopy::new(sc.config),
    );
    sim.net.dest = Destination::new(
        dest_layout,
        DestinationConfig {
            read_back,
            ..DestinationConfig::default()
        },
    );
    sim
}

#[test]
fn verify_before_start_checks_inside_the_downtime() {
    let sc = busy_scenario(128);
    let mut sim = before_start_sim(&sc, false);
    assert!(matches!(sim.run(), End::Done));
    let r = sim.source.report();
    assert_eq!(r.verified, Some(true));
    assert!(r.verification_time > Nanos::ZERO && r.verification_time <= r.downtime);
    assert_eq!(
        r.resume_time,
        Nanos::ZERO,
        "nothing is hashed after the start"
    );
    assert_eq!(
        sim.replies,
        [Reply::Accept, Reply::Verified(Verdict::Match), Reply::Ready]
    );
    assert_eq!(sim.target.start_calls, 1);
    assert!(first_diff_page(&sim.target.mem, sim.guest.snapshot.as_ref().unwrap()).is_none());
}

/// A dirty log that loses the writes of the last moments: checked before start, the destination
/// refuses to run the wrong memory and the source resumes; checked after start (the default),
/// the wrong memory already runs and the source can only stay paused and say so.
#[test]
fn verify_before_start_catches_a_dirty_log_that_drops_writes() {
    let mut sc = busy_scenario(128);
    sc.workload.writes_per_sec = 400_000;
    let mut sim = before_start_sim(&sc, false);
    sim.guest.drop_dirty_while_paused = true;
    match sim.run() {
        End::SourceFailed(MigrationError::PeerAborted { code, .. }) => {
            assert_eq!(code, AbortCode::DigestMismatch)
        }
        other => panic!("source: {other:?}"),
    }
    assert_eq!(sim.target.start_calls, 0, "the wrong memory must not run");
    assert_eq!(sim.guest.resume_calls, 1);
    assert!(!sim.guest.paused && !sim.source.is_paused());

    let mut after = Sim::new(&sc, Tamper::None);
    after.guest.drop_dirty_while_paused = true;
    match after.run() {
        End::SourceFailed(MigrationError::DigestMismatch { .. }) => {}
        other => panic!("after start: {other:?}"),
    }
    assert_eq!(
        after.target.start_calls, 1,
        "checked after start, it already runs"
    );
    assert!(after.guest.paused, "and the source must not resume");
}

/// A host that writes a page at a wrong offset: the stream's digest cannot see it; reading
/// back can, before the guest starts.
#[test]
fn read_back_catches_a_page_written_at_the_wrong_offset() {
    let sc = quiet_scenario(32);
    let mut blind = before_start_sim(&sc, false);
    blind.net.target.misplaced = Some(3);
    assert!(matches!(blind.run(), End::Done));
    assert_eq!(
        blind.source.report().verified,
        Some(true),
        "the stream was right"
    );
    assert!(first_diff_page(&blind.target.mem, blind.guest.snapshot.as_ref().unwrap()).is_some());

    let mut reading = before_start_sim(&sc, true);
    reading.net.target.misplaced = Some(3);
    match reading.run() {
        End::SourceFailed(MigrationError::PeerAborted { code, .. }) => {
            assert_eq!(code, AbortCode::DigestMismatch)
        }
        other => panic!("source: {other:?}"),
    }
    assert_eq!(reading.target.start_calls, 0);
    assert!(!reading.guest.paused);
}

/// Pages read and encoded by the link (as the std driver's worker threads do) give the same
/// migration guarantees, and the report counts what the encoding really produced.
#[test]
fn pages_encoded_by_the_link_migrate_byte_exact() {
    let mut sc = busy_scenario(256);
    sc.plans = true;
    check_migration(&sc).unwrap();
    let mut sim = Sim::new(&sc, Tamper::None);
    assert!(matches!(sim.run(), End::Done));
    let r = sim.source.report();
    assert!(r.rounds.len() >= 3 && r.zero_pages_sent > 0, "{r:?}");
    // The engine itself read pages only to hash them for the digest, once each.
    assert_eq!(sim.guest.reads, sc.pages);
}

#[test]
fn host_read_failure_while_encoding_a_plan_resumes_and_aborts() {
    let mut sc = busy_scenario(64);
    sc.config.stop.max_rounds = 1;
    sc.plans = true;
    let mut sim = Sim::new(&sc, Tamper::None);
    sim.guest.fail_reads_while_paused = true;
    match sim.run() {
        End::SourceFailed(MigrationError::Host(e)) => {
            assert!(e.message.contains("unreadable"), "{e}")
        }
        other => panic!("source: {other:?}"),
    }
    assert_eq!((sim.guest.pause_calls, sim.guest.resume_calls), (1, 1));
    assert!(!sim.guest.paused && !sim.source.is_paused());
    assert_eq!(sim.target.start_calls, 0);
}

#[test]
fn host_read_failure_during_stop_and_copy_resumes_and_aborts() {
    let mut sc = busy_scenario(64);
    sc.config.stop.max_rounds = 1;
    let mut sim = Sim::new(&sc, Tamper::None);
    sim.guest.fail_reads_while_paused = true;
    let end = sim.run();
    match &end {
        End::SourceFailed(MigrationError::Host(e)) => {
            assert!(e.message.contains("unreadable"), "{e}")
        }
        other => panic!("source: {other:?}"),
    }
    assert_eq!((sim.guest.pause_calls, sim.guest.resume_calls), (1, 1));
    assert!(!sim.guest.paused && !sim.source.is_paused());
    assert_eq!(sim.tap.aborts, [AbortCode::HostFailure]);
    assert!(
        matches!(
            sim.dest_error,
            Some(MigrationError::PeerAborted {
                code: AbortCode::HostFailure,
                ..
            })
        ),
        "destination: {:?}",
        sim.dest_error
    );
    assert_eq!(sim.target.start_calls, 0);
    assert_eq!(sim.replies, [Reply::Accept], "no abort echoed back");
    let r = sim.source.report();
    assert_eq!(
        r.bytes_sent, sim.tap.total,
        "the abort counts as bytes sent"
    );
    assert_eq!(sim.guest.snapshot.as_ref(), Some(&sim.guest.mem));
}

// ---------------------------------------------------------------------------------------------
// Frames out of order, handcrafted.
//
// In v2 pages travel in `Pages` batches, so the helpers below return encoded bytes rather than
// frames, and a stream is a list of encoded parts.

fn f(frame: Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    frame.emit(&mut out);
    out
}

fn encode(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

fn hello_with(
    version: u16,
    page_shift: u8,
    channels: u16,
    features: u64,
    regions: &[Region],
) -> Vec<u8> {
    let mut storage = Vec::new();
    let regions = wire::region_table(regions, &mut storage);
    let hello = Hello {
        version,
        page_shift,
        channels,
        session_id: 0,
        features,
        regions,
    };
    let mut out = f(Frame::Hello(hello));
    if version != PROTOCOL_VERSION {
        // `emit` writes the version given; nothing else to do. (Kept explicit: the parser
        // refuses other versions before looking at the rest.)
        assert_eq!(u16::from_le_bytes([out[12], out[13]]), version);
    }
    out.shrink_to_fit();
    out
}

fn one_region(pages: u64) -> [Region; 1] {
    [Region {
        id: 0,
        guest_base: 0,
        pages,
    }]
}

fn hello(pages: u64) -> Vec<u8> {
    hello_with(
        PROTOCOL_VERSION,
        12,
        1,
        wire::FEATURE_CHECKSUM,
        &one_region(pages),
    )
}

/// A `Pages` frame of `generation` holding `entries` (index, encoding, payload) as given, even
/// when they are malformed.
fn pages_frame(generation: u32, entries: &[(u64, Encoding, &[u8])]) -> Vec<u8> {
    let mut buf = vec![0u8; 64 + entries.iter().map(|e| 16 + e.2.len()).sum::<usize>()];
    let mut w = PagesWriter::new(&mut buf, generation, true).unwrap();
    for &(index, encoding, payload) in entries {
        let slot = w.begin_page(index, payload.len()).unwrap();
        slot.copy_from_slice(payload);
        w.commit_page(encoding, payload.len());
    }
    let len = w.finish();
    buf.truncate(len);
    buf
}

fn raw(index: u64, page: &[u8]) -> Vec<u8> {
    pages_frame(1, &[(index, Encoding::RAW, page)])
}

fn zero(index: u64) -> Vec<u8> {
    pages_frame(1, &[(index, Encoding::ZERO, &[])])
}

fn round_end(round: u32, pages: u64) -> Vec<u8> {
    f(Frame::RoundEnd {
        round,
        channel: 0,
        pages,
    })
}

fn switchover(rounds: u32) -> Vec<u8> {
    f(Frame::Switchover {
        rounds,
        digest_follows: true,
        pages_follow: false,
        // Every handcrafted switchover here follows `DeviceState(b"cpu")`.
        device_state_len: 3,
        check_before_start: false,
    })
}

fn accept(version: u16, features: u64) -> Vec<u8> {
    f(Frame::Accept {
        version,
        features,
        max_device_state: 64 << 20,
    })
}

fn kinds(bytes: &[u8]) -> Vec<FrameKind> {
    let mut at = 0;
    let mut kinds = Vec::new();
    while let Ok((frame, len)) = Frame::parse(&bytes[at..]) {
        kinds.push(frame.kind().unwrap());
        at += len;
    }
    kinds
}

/// Feeds `parts` (each on its channel) to a fresh destination of `pages` pages (one region,
/// announced channels per the hello); it must fail with an error `check` accepts, say so with
/// an abort of `code`, stay failed, and never start the guest.
fn expect_rejected_on(
    pages: u64,
    parts: &[(u16, Vec<u8>)],
    code: AbortCode,
    check: impl Fn(&MigrationError) -> bool,
) -> DestHost {
    let layout = MemoryLayout::single(Geometry::new(PageSize::DEFAULT, pages).unwrap());
    let mut rx = Destination::new(layout, DestinationConfig::default());
    let mut host = DestHost::new(pages);
    let mut result = Ok(0);
    for (ch, bytes) in parts {
        result = rx.handle_input(Nanos::ZERO, *ch, bytes, &mut host);
        if result.is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    rx.drain_replies(&mut out);
    let shown: Vec<_> = parts.iter().map(|(ch, b)| (*ch, kinds(b))).collect();
    let err = match result {
        Err(e) => e,
        Ok(_) => panic!("accepted {shown:?}"),
    };
    assert!(check(&err), "{shown:?}: got {err:?}");
    assert_eq!(rx.status(), DestinationStatus::Failed);
    assert_eq!(rx.failure(), Some(&err));
    assert_eq!(parse_replies(&out).last(), Some(&Reply::Abort(code)));
    let mut again = Vec::new();
    assert_eq!(
        rx.receive(Nanos(1), &zero(0), &mut host, &mut again),
        Err(err)
    );
    assert!(again.is_empty());
    assert_eq!(host.start_calls, 0);
    host
}

/// A content encoding (LZ4 here) is decoded only once the hello agreed to content codecs, even
/// if the caller registered a decoder for it before the hello (as the std destination does to
/// time its decoders): without `FEATURE_CONTENT` the page is refused, not written.
#[test]
fn content_encodings_need_the_feature_whatever_decoders_are_registered() {
    let page: Vec<u8> = (0..PAGE).map(|i| (i / 64) as u8).collect();
    let mut packed = vec![0u8; PAGE];
    let n = memferry::codec::lz4::Lz4Compressor::default()
        .compress(&page, &mut packed)
        .expect("a compressible page");
    let frame = pages_frame(1, &[(0, Encoding::LZ4, &packed[..n])]);
    for features in [
        wire::FEATURE_CHECKSUM,
        wire::FEATURE_CHECKSUM | wire::FEATURE_CONTENT,
    ] {
        let layout = MemoryLayout::single(Geometry::new(PageSize::DEFAULT, 2).unwrap());
        let mut rx = Destination::new(layout, DestinationConfig::default())
            .with_decoder(Box::new(memferry::codec::lz4::Lz4Decoder));
        let mut host = DestHost::new(2);
        let hello = hello_with(PROTOCOL_VERSION, 12, 1, features, &one_region(2));
        rx.handle_input(Nanos::ZERO, 0, &hello, &mut host).unwrap();
        let got = rx.handle_input(Nanos::ZERO, 0, &frame, &mut host);
        if features & wire::FEATURE_CONTENT != 0 {
            got.unwrap();
            assert_eq!(&host.mem[..PAGE], &page[..]);
        } else {
            let err = got.unwrap_err();
            assert!(
                matches!(err, MigrationError::BadPagePayload { page: 0, reason } if reason.contains("did not negotiate")),
                "{err:?}"
            );
            assert_eq!(host.page_writes, 0);
        }
    }
}

fn expect_rejected(
    pages: u64,
    parts: &[Vec<u8>],
    code: AbortCode,
    check: impl Fn(&MigrationError) -> bool,
) -> DestHost {
    let parts: Vec<_> = parts.iter().map(|p| (0u16, p.clone())).collect();
    expect_rejected_on(pages, &parts, code, check)
}

#[test]
fn destination_rejects_frames_out_of_order() {
    use MigrationError as E;
    let page = vec![7u8; PAGE];
    let pv = AbortCode::ProtocolViolation;
    let unexpected =
        |kind: FrameKind| move |e: &E| matches!(e, E::UnexpectedFrame { got, .. } if *got == kind);

    // Anything before the hello.
    expect_rejected(2, &[zero(0)], pv, unexpected(FrameKind::Pages));
    // A Complete right after the hello; and one between the device state and a switchover
    // that does not check before start (v2: only that switchover may follow such a Complete).
    expect_rejected(
        2,
        &[hello(2), f(Frame::Complete { digest: 1 })],
        pv,
        unexpected(FrameKind::Complete),
    );
    expect_rejected(
        2,
        &[
            hello(2),
            raw(0, &page),
            zero(1),
            round_end(1, 2),
            f(Frame::DeviceState(b"cpu")),
            f(Frame::Complete { digest: 1 }),
            switchover(1),
        ],
        pv,
        unexpected(FrameKind::Switchover),
    );
    // A second hello.
    expect_rejected(2, &[hello(2), hello(2)], pv, unexpected(FrameKind::Hello));
    // A frame only the destination sends.
    expect_rejected(
        2,
        &[hello(2), f(Frame::Ready)],
        pv,
        unexpected(FrameKind::Ready),
    );

    // Round markers: the wrong page count, the wrong round, another channel's marker.
    let host = expect_rejected(3, &[hello(3), raw(0, &page), round_end(1, 2)], pv, |e| {
        matches!(e, E::RoundMismatch { round: 1, .. })
    });
    assert_eq!(host.page_writes, 1);
    expect_rejected(3, &[hello(3), raw(0, &page), round_end(2, 1)], pv, |e| {
        matches!(e, E::RoundMismatch { round: 2, .. })
    });
    expect_rejected(
        3,
        &[
            hello(3),
            raw(0, &page),
            f(Frame::RoundEnd {
                round: 1,
                channel: 1,
                pages: 1,
            }),
        ],
        pv,
        |e| matches!(e, E::RoundMismatch { round: 1, .. }),
    );
    // Pages of a generation other than the open round (v2: generations are checked).
    expect_rejected(
        3,
        &[hello(3), pages_frame(2, &[(0, Encoding::RAW, &page)])],
        pv,
        |e| matches!(e, E::RoundMismatch { round: 2, .. }),
    );
    // Device state inside an open round.
    expect_rejected(
        3,
        &[hello(3), raw(0, &page), f(Frame::DeviceState(b"cpu"))],
        pv,
        |e| matches!(e, E::RoundMismatch { .. }),
    );

    // Pages outside the guest are refused before anything is written, alone in their frame or
    // behind a good entry of the same batch.
    for index in [3, 4, 64, u64::MAX] {
        let out_of_range = move |e: &E| {
            *e == E::PageOutOfRange {
                page: index,
                page_count: 3,
            }
        };
        let host = expect_rejected(
            3,
            &[hello(3), raw(0, &page), raw(index, &page)],
            pv,
            out_of_range,
        );
        assert_eq!(host.page_writes, 1);
        assert!(host.mem[PAGE..].iter().all(|&b| b == 0xa5));
        let host = expect_rejected(3, &[hello(3), zero(index)], pv, out_of_range);
        assert_eq!(host.page_writes, 0);
        let host = expect_rejected(
            3,
            &[
                hello(3),
                pages_frame(
                    1,
                    &[(1, Encoding::RAW, &page), (index, Encoding::RAW, &page)],
                ),
            ],
            pv,
            out_of_range,
        );
        assert_eq!(host.page_writes, 1);
        assert!(host.mem[..PAGE].iter().all(|&b| b == 0xa5));
        assert!(host.mem[2 * PAGE..].iter().all(|&b| b == 0xa5));
    }
    // Payloads that do not fit their encoding, and an encoding nobody registered a decoder for.
    expect_rejected(2, &[hello(2), raw(1, &page[..PAGE - 1])], pv, |e| {
        matches!(e, E::BadPagePayload { page: 1, .. })
    });
    expect_rejected(
        2,
        &[hello(2), pages_frame(1, &[(1, Encoding::ZERO, b"x")])],
        pv,
        |e| matches!(e, E::BadPagePayload { page: 1, .. }),
    );
    let host = expect_rejected(
        2,
        &[hello(2), pages_frame(1, &[(1, Encoding(7), &page)])],
        pv,
        |e| matches!(e, E::BadPagePayload { page: 1, .. }),
    );
    assert_eq!(host.page_writes, 0);

    // Switchover: before every page arrived, without device state, naming the wrong rounds.
    expect_rejected(
        3,
        &[
            hello(3),
            raw(0, &page),
            zero(2),
            round_end(1, 2),
            f(Frame::DeviceState(b"cpu")),
            switchover(1),
        ],
        pv,
        |e| matches!(e, E::BadPagePayload { page: 1, .. }),
    );
    expect_rejected(
        1,
        &[hello(1), zero(0), round_end(1, 1), switchover(1)],
        pv,
        unexpected(FrameKind::Switchover),
    );
    expect_rejected(
        1,
        &[
            hello(1),
            zero(0),
            round_end(1, 1),
            f(Frame::DeviceState(b"cpu")),
            switchover(2),
        ],
        pv,
        |e| matches!(e, E::RoundMismatch { round: 2, .. }),
    );

    // Other layouts, page sizes, channel counts and versions.
    let incompatible = |e: &E| matches!(e, E::Incompatible(_));
    let ic = AbortCode::Incompatible;
    expect_rejected(2, &[hello(3)], ic, incompatible);
    expect_rejected(
        2,
        &[hello_with(PROTOCOL_VERSION, 13, 1, 0, &one_region(1))],
        ic,
        incompatible,
    );
    expect_rejected(
        2,
        &[hello_with(
            PROTOCOL_VERSION,
            12,
            1,
            0,
            &[Region {
                id: 0,
                guest_base: 1 << 20,
                pages: 2,
            }],
        )],
        ic,
        incompatible,
    );
    expect_rejected(
        2,
        &[hello_with(PROTOCOL_VERSION, 12, 17, 0, &one_region(2))],
        ic,
        incompatible,
    );
    // Changed in v2: a hello of another version is a frame error (the parser refuses it
    // before anything else, with UnsupportedVersion), aborted as BadFrame.
    expect_rejected(
        2,
        &[hello_with(PROTOCOL_VERSION + 1, 12, 1, 0, &one_region(2))],
        AbortCode::BadFrame,
        |e| {
            matches!(
                e,
                E::Frame(WireError::UnsupportedVersion(v)) if *v == PROTOCOL_VERSION + 1
            )
        },
    );

    // Channels: bytes on a channel the hello did not announce; an extra channel whose first
    // frame is not a Join; a Join of another session or naming another channel.
    let two = hello_with(
        PROTOCOL_VERSION,
        12,
        2,
        wire::FEATURE_CHANNELS | wire::FEATURE_CHECKSUM,
        &one_region(2),
    );
    let join = |channel: u16, session_id: u64| {
        f(Frame::Join {
            channel,
            session_id,
            role: wire::ChannelRole::Bulk,
        })
    };
    expect_rejected_on(2, &[(0, hello(2)), (1, join(1, 0))], ic, incompatible);
    expect_rejected_on(
        2,
        &[(0, two.clone()), (1, zero(0))],
        pv,
        unexpected(FrameKind::Pages),
    );
    expect_rejected_on(2, &[(0, two.clone()), (1, join(1, 99))], ic, incompatible);
    expect_rejected_on(2, &[(0, two.clone()), (1, join(2, 0))], ic, incompatible);

    // And the same stream in order is accepted: the rejections above are about order.
    let layout = MemoryLayout::single(Geometry::new(PageSize::DEFAULT, 2).unwrap());
    let mut rx = Destination::new(layout, DestinationConfig::default());
    let mut host = DestHost::new(2);
    let mut out = Vec::new();
    let bytes = encode(&[
        hello(2),
        raw(0, &page),
        zero(1),
        round_end(1, 2),
        f(Frame::DeviceState(b"cpu")),
        switchover(1),
    ]);
    assert_eq!(
        rx.receive(Nanos::ZERO, &bytes, &mut host, &mut out),
        Ok(bytes.len())
    );
    assert_eq!(rx.status(), DestinationStatus::Running);
    assert_eq!(parse_replies(&out), [Reply::Accept, Reply::Ready]);
    assert_eq!(&host.mem[..PAGE], &page[..]);
    assert!(host.mem[PAGE..].iter().all(|&b| b == 0));
    assert_eq!(host.restored.as_deref(), Some(&b"cpu"[..]));
}

/// Changed in v2: features are negotiated by intersection, so a hello offering a feature bit
/// this version does not know is accepted (v1 refused it), and the accept carries only the
/// known bits both sides use.
#[test]
fn destination_accepts_unknown_features_by_intersection() {
    let layout = MemoryLayout::single(Geometry::new(PageSize::DEFAULT, 2).unwrap());
    let mut rx = Destination::new(layout, DestinationConfig::default());
    let mut host = DestHost::new(2);
    let mut out = Vec::new();
    let offered = wire::FEATURE_CHECKSUM | (1 << 40);
    let bytes = hello_with(PROTOCOL_VERSION, 12, 1, offered, &one_region(2));
    assert_eq!(
        rx.receive(Nanos::ZERO, &bytes, &mut host, &mut out),
        Ok(bytes.len())
    );
    assert_eq!(rx.status(), DestinationStatus::Receiving);
    match Frame::parse(&out).unwrap().0 {
        Frame::Accept {
            version, features, ..
        } => {
            assert_eq!(version, PROTOCOL_VERSION);
            assert_eq!(features, wire::FEATURE_CHECKSUM);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn source_rejects_frames_out_of_order() {
    let sc = quiet_scenario(4);
    let layout = MemoryLayout::single(Geometry::new(PageSize::DEFAULT, 4).unwrap());
    let start = |guest: &mut SourceHost| {
        let mut source = Source::pre_copy(layout.clone(), PreCopyConfig::default());
        let mut out = Vec::new();
        assert_eq!(
            source.poll(Nanos::ZERO, guest, &mut out),
            Ok(Next::WaitForPeer)
        );
        source
    };
    let expect_error =
        |input: Vec<u8>, code: AbortCode, check: &dyn Fn(&MigrationError) -> bool| {
            let mut guest = SourceHost::new(&sc);
            let mut source = start(&mut guest);
            let mut out = Vec::new();
            let err = source
                .receive(Nanos(1), &input, &mut guest, &mut out)
                .unwrap_err();
            assert!(check(&err), "{err:?}");
            assert_eq!(parse_replies(&out), [Reply::Abort(code)]);
            assert!(source.is_finished());
            assert_eq!(
                source.status(),
                SourceStatus::Failed {
                    source_paused: false
                }
            );
            assert_eq!(source.failure(), Some(&err));
            assert_eq!(guest.reads, 0);
            assert_eq!(guest.pause_calls, 0);
            // Every later call repeats the error and emits nothing.
            let mut again = Vec::new();
            assert_eq!(
                source.poll(Nanos(2), &mut guest, &mut again),
                Err(err.clone())
            );
            assert!(again.is_empty());
            (source, out)
        };
    let unexpected = |kind: FrameKind| move |e: &MigrationError| matches!(e, MigrationError::UnexpectedFrame { got, .. } if *got == kind);
    let pv = AbortCode::ProtocolViolation;

    // A Ready (or a verdict) while waiting for the accept.
    expect_error(f(Frame::Ready), pv, &unexpected(FrameKind::Ready));
    expect_error(
        f(Frame::Verified {
            verdict: Verdict::Match,
            digest: 0,
        }),
        pv,
        &unexpected(FrameKind::Verified),
    );
    // Pages sent back to the source.
    expect_error(zero(0), pv, &unexpected(FrameKind::Pages));
    // A page request: pre-copy never takes one.
    let mut storage = Vec::new();
    let list = wire::u64_list(&[1], &mut storage);
    expect_error(
        f(Frame::PageRequest(list)),
        pv,
        &unexpected(FrameKind::PageRequest),
    );

    // An accept of another protocol version, and one naming a feature the source did not offer.
    let incompatible = |e: &MigrationError| matches!(e, MigrationError::Incompatible(_));
    expect_error(
        accept(PROTOCOL_VERSION + 1, 0),
        AbortCode::Incompatible,
        &incompatible,
    );
    expect_error(
        accept(PROTOCOL_VERSION, wire::FEATURE_CHANNELS),
        AbortCode::Incompatible,
        &incompatible,
    );

    // Garbage from the destination.
    let mut bad = accept(PROTOCOL_VERSION, 0);
    bad[9] ^= 1;
    let (source, out) = expect_error(bad, AbortCode::BadFrame, &|e| {
        matches!(e, MigrationError::Frame(WireError::BadChecksum { .. }))
    });
    assert_eq!(
        source.report().bytes_sent,
        (hello(4).len() + out.len()) as u64
    );
}

// ---------------------------------------------------------------------------------------------
// Engine v2: several channels, out of order.

/// A link per channel: in order on each channel, with independent random delays, so frames of
/// different channels arrive interleaved, out of order and late.
struct MultiLink {
    /// Per channel: (arrival, bytes), arrivals non-decreasing.
    to_dest: Vec<VecDeque<(Nanos, Vec<u8>)>>,
    /// Replies, in order, to the source's channel 0.
    to_src: VecDeque<(Nanos, Vec<u8>)>,
    last_arrival: Vec<Nanos>,
    rng: Rng,
    max_delay_ns: u64,
}

impl MultiLink {
    fn send(&mut self, ch: usize, sent: Nanos, bytes: Vec<u8>) {
        let at = (sent + Nanos(self.rng.below(self.max_delay_ns + 1))).max(self.last_arrival[ch]);
        self.last_arrival[ch] = at;
        self.to_dest[ch].push_back((at, bytes));
    }

    /// The earliest arrival: Some((time, Some(channel))) toward the destination, or
    /// Some((time, None)) toward the source.
    fn next(&self) -> Option<(Nanos, Option<usize>)> {
        let mut best = self.to_src.front().map(|x| (x.0, None));
        for (ch, q) in self.to_dest.iter().enumerate() {
            if let Some(&(t, _)) = q.front() {
                if best.is_none_or(|(b, _)| t < b) {
                    best = Some((t, Some(ch)));
                }
            }
        }
        best
    }
}

#[derive(Clone, Debug)]
struct MultiScenario {
    sc: Scenario,
    channels: u16,
    max_delay: Nanos,
    room: usize,
    /// One content encoder per channel ([`content_encoder`]), pages planned and encoded per
    /// channel ([`Source::poll_plan`]), as the std driver does; `None`: raw, `poll_transmit`.
    codec: Option<usize>,
    /// [`SessionConfig::channel_affinity`].
    affinity: bool,
}

fn multi_scenario() -> impl Strategy<Value = MultiScenario> {
    (
        1u16..=4,
        1u64..=200,
        any::<u64>(),
        workload(),
        log_u64(1e6, 1e9),
        0u64..=5_000,
        prop_oneof![
            Just(wire::page_frame_len(PAGE)),
            wire::page_frame_len(PAGE)..200_000
        ],
        (stop_rules(), rate_plan(), 0usize..10_000),
    )
        .prop_map(
            |(
                channels,
                pages,
                seed,
                workload,
                bandwidth,
                delay_us,
                room,
                (stop, rate, state_len),
            )| {
                let mut sc = quiet_scenario(pages);
                sc.seed = seed;
                sc.workload = workload;
                sc.bandwidth = bandwidth;
                sc.state_len = state_len;
                sc.config.stop = stop;
                sc.config.rate = rate;
                MultiScenario {
                    sc,
                    channels,
                    max_delay: Nanos::from_micros(delay_us),
                    room,
                    codec: None,
                    affinity: false,
                }
            },
        )
}

/// Runs a migration over `ms.channels` channels; returns the finished source, destination and
/// hosts.
fn run_multi(ms: &MultiScenario) -> (Source, Destination, SourceHost, DestHost) {
    let sc = &ms.sc;
    let (layout, dest_layout) = sc.layouts();
    let n = ms.channels as usize;
    let mut source = Source::new(
        layout,
        SessionConfig {
            channels: ms.channels,
            session_id: if ms.codec.is_some() {
                CODEC_SESSION
            } else {
                sc.seed ^ 0xfeed
            },
            channel_affinity: ms.affinity,
            ..SessionConfig::default()
        },
        PreCopy::new(sc.config),
    );
    // Per-channel encoders: the engine's own only announces the content codecs.
    let mut encoders: Option<Vec<Box<dyn memferry::codec::PageEncoder>>> = ms
        .codec
        .map(|which| (0..n).map(|_| content_encoder(which)).collect());
    if encoders.is_some() {
        source.set_encoder(Box::new(memferry::codec::Raw));
    }
    let mut scratch = Vec::new();
    let mut dest = Destination::new(dest_layout, DestinationConfig::default());
    let mut guest = SourceHost::new(sc);
    let mut target = DestHost::new(sc.dest_pages);
    let mut link = MultiLink {
        to_dest: (0..n).map(|_| VecDeque::new()).collect(),
        to_src: VecDeque::new(),
        last_arrival: vec![Nanos::ZERO; n],
        rng: Rng(sc.seed ^ 0x1234_5678),
        max_delay_ns: ms.max_delay.0,
    };
    let mut inbox: Vec<Vec<u8>> = vec![Vec::new(); n];
    let mut src_inbox = Vec::new();
    let mut buf = vec![0u8; ms.room];
    let bandwidth = ByteRate(sc.bandwidth);
    let mut now = sc.start_at;
    let mut steps = 0u64;
    let cap = 1_000_000;
    while !source.is_finished() {
        steps += 1;
        assert!(
            steps < cap,
            "no end after {cap} steps: {:?}",
            source.report()
        );
        // Offer room on every channel (a few writes each, round robin).
        let mut sent_any = false;
        for ch in 0..n {
            for _ in 0..4 {
                let k = match encoders.as_mut() {
                    None => source.poll_transmit(now, ch as u16, &mut buf, &mut guest),
                    Some(encoders) => {
                        match source.poll_plan(now, ch as u16, &mut buf, &mut guest) {
                            Ok(memferry::session::Transmit::Plan(plan)) => {
                                assert_eq!(plan.channel(), ch as u16);
                                let outcome = plan
                                    .encode(
                                        &guest,
                                        Some(encoders[ch].as_mut()),
                                        &mut scratch,
                                        &mut buf,
                                    )
                                    .expect("reading the test guest");
                                let k = outcome.bytes;
                                source.on_encoded(outcome);
                                Ok(k)
                            }
                            Ok(memferry::session::Transmit::Bytes(k)) => Ok(k),
                            Ok(other) => panic!("unexpected output {other:?}"),
                            Err(e) => Err(e),
                        }
                    }
                }
                .unwrap_or_else(|e| {
                    panic!("source failed: {e} (destination {:?})", dest.failure())
                });
                assert!(k <= buf.len());
                if k == 0 {
                    break;
                }
                sent_any = true;
                now += bandwidth.time_for(k as u64);
                guest.advance(now);
                link.send(ch, now, buf[..k].to_vec());
            }
        }
        if source.is_finished() {
            break;
        }
        if !sent_any {
            match (link.next(), source.poll_timeout()) {
                (Some((t, _)), _) => now = now.max(t),
                (None, Some(t)) if t > now => now = t,
                _ => now += Nanos::from_micros(1),
            }
            guest.advance(now);
        }
        // Deliver everything due, in time order across channels.
        while let Some((t, which)) = link.next().filter(|&(t, _)| t <= now) {
            match which {
                Some(ch) => {
                    let (_, bytes) = link.to_dest[ch].pop_front().unwrap();
                    inbox[ch].extend_from_slice(&bytes);
                    // Like a listener, hold the extra channels' bytes (their Join comes right
                    // after the hello, before the accept) until channel 0's hello is in.
                    for (c, held) in inbox.iter_mut().enumerate() {
                        if held.is_empty()
                            || (c > 0 && dest.status() == DestinationStatus::AwaitingHello)
                        {
                            continue;
                        }
                        let used = dest
                            .handle_input(t, c as u16, held, &mut target)
                            .unwrap_or_else(|e| panic!("destination failed on channel {c}: {e}"));
                        held.drain(..used);
                    }
                    let mut reply = vec![0u8; 4096];
                    loop {
                        let k = dest.poll_transmit(&mut reply);
                        if k == 0 {
                            break;
                        }
                        let at = t + Nanos(link.rng.below(link.max_delay_ns + 1));
                        let at = at.max(link.to_src.back().map_or(at, |x| x.0));
                        link.to_src.push_back((at, reply[..k].to_vec()));
                    }
                }
                None => {
                    let (_, bytes) = link.to_src.pop_front().unwrap();
                    src_inbox.extend_from_slice(&bytes);
                    let used = source
                        .handle_input(t, 0, &src_inbox, &mut guest)
                        .unwrap_or_else(|e| panic!("source failed on a reply: {e}"));
                    src_inbox.drain(..used);
                }
            }
        }
    }
    (source, dest, guest, target)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Several channels, each in order but with independent random delays: pages of different
    /// rounds overtake each other across channels. The destination still equals the source at
    /// switchover, and both sides finish.
    #[test]
    fn channels_delivered_out_of_order_still_give_the_source_memory(ms in multi_scenario()) {
        let (source, dest, guest, target) = run_multi(&ms);
        prop_assert_eq!(source.status(), SourceStatus::Done);
        prop_assert_eq!(dest.status(), DestinationStatus::Complete);
        prop_assert_eq!(dest.channels(), ms.channels);
        let r = source.report();
        prop_assert_eq!(r.channels, ms.channels);
        prop_assert_eq!(r.verified, Some(true));
        prop_assert!(r.committed);
        let snapshot = guest.snapshot.as_ref().unwrap();
        if let Some(page) = first_diff_page(&target.mem, snapshot) {
            return Err(TestCaseError::fail(format!(
                "destination page {page} differs from the source at switchover"
            )));
        }
        prop_assert_eq!(&guest.mem, snapshot);
        prop_assert_eq!(target.restored.as_deref(), Some(&guest.state[..]));
        prop_assert_eq!(dest.pages_received(), r.pages_sent);
    }
}

/// The out-of-order property is only meaningful if stale copies really happen: a busy guest on
/// four channels with large delays makes some late copies lose to newer generations.
#[test]
fn out_of_order_channels_really_deliver_stale_copies() {
    let mut sc = busy_scenario(256);
    sc.config.stop.max_rounds = 6;
    // Rounds of about a millisecond, delays of up to 50 ms: later rounds overtake earlier ones.
    sc.bandwidth = 1_000_000_000;
    let ms = MultiScenario {
        sc,
        channels: 4,
        max_delay: Nanos::from_millis(50),
        room: wire::page_frame_len(PAGE),
        codec: None,
        affinity: false,
    };
    let (source, dest, guest, target) = run_multi(&ms);
    assert_eq!(source.status(), SourceStatus::Done);
    assert!(dest.stale_pages() > 0, "no copy arrived after a newer one");
    assert_eq!(&target.mem, guest.snapshot.as_ref().unwrap());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Stateful codecs (delta, delta + LZ4, dedup, adaptive) with one encoder per channel, the
    /// channels each in order but delayed independently: with channel affinity every version of
    /// a page goes through the same encoder and connection, and the destination equals the
    /// source at switchover.
    #[test]
    fn stateful_codecs_over_several_channels_with_affinity_keep_the_destination_exact(
        ms in multi_scenario(),
        which in 1usize..5,
        channels in 2u16..=4,
    ) {
        let ms = MultiScenario { channels, codec: Some(which), affinity: true, ..ms };
        let (source, dest, guest, target) = run_multi(&ms);
        prop_assert_eq!(source.status(), SourceStatus::Done);
        prop_assert_eq!(dest.status(), DestinationStatus::Complete);
        let r = source.report();
        prop_assert_eq!(r.verified, Some(true));
        let snapshot = guest.snapshot.as_ref().unwrap();
        if let Some(page) = first_diff_page(&target.mem, snapshot) {
            return Err(TestCaseError::fail(format!(
                "destination page {page} differs from the source at switchover"
            )));
        }
        let pages: u64 = r.encodings.slots().iter().map(|(_, s)| s.pages).sum();
        prop_assert_eq!(pages, r.pages_sent);
    }
}

/// The scenario of the affinity test below: a busy guest over four channels delayed up to
/// 20 ms, ten rounds, XBZRLE deltas (encoder 1) per channel.
fn busy_delta_channels(affinity: bool) -> MultiScenario {
    let mut sc = busy_scenario(256);
    // Ten rounds that resend the hot set: deltas from round 3 on.
    sc.config.stop.max_rounds = 10;
    MultiScenario {
        sc,
        channels: 4,
        max_delay: Nanos::from_millis(20),
        room: wire::page_frame_len(PAGE),
        codec: Some(1),
        affinity,
    }
}

/// Affinity is what makes per-channel deltas right: without it the same busy migration sends a
/// page's versions through different encoders and connections, and the destination ends up
/// wrong (or refuses a delta); with it, exact, and deltas really went out.
#[test]
fn per_channel_deltas_need_channel_affinity() {
    let (source, _, guest, target) = run_multi(&busy_delta_channels(true));
    assert_eq!(source.status(), SourceStatus::Done);
    assert_eq!(&target.mem, guest.snapshot.as_ref().unwrap());
    assert!(source.report().encodings.delta.pages > 0, "no delta sent");

    // The run without affinity is expected to fail (the destination refuses a delta, and the
    // test loop panics with its reason, which the test output shows).
    let without = std::panic::catch_unwind(|| {
        let (source, _, guest, target) = run_multi(&busy_delta_channels(false));
        source.report().verified == Some(true) && &target.mem == guest.snapshot.as_ref().unwrap()
    });
    assert!(
        !matches!(without, Ok(true)),
        "without affinity the per-channel deltas still gave an exact destination: the affinity test proves nothing"
    );
}

// ---------------------------------------------------------------------------------------------
// Engine v2: region tables with holes.

fn holey_regions() -> Vec<Region> {
    vec![
        Region {
            id: 7,
            guest_base: 1 << 32,
            pages: 5,
        },
        Region {
            id: 2,
            guest_base: 0,
            pages: 9,
        },
        Region {
            id: 4,
            guest_base: 64 << 20,
            pages: 3,
        },
    ]
}

#[test]
fn regions_with_holes_migrate_byte_exact() {
    let mut sc = busy_scenario(17);
    sc.regions = holey_regions();
    sc.dest_regions = holey_regions();
    sc.config.stop.max_rounds = 3;
    check_migration(&sc).unwrap();
    let mut sim = Sim::new(&sc, Tamper::None);
    assert!(matches!(sim.run(), End::Done));
    // Every region was synced with its own dense offset (the host asserts the range).
    let mut synced = sim.guest.synced_regions.clone();
    synced.sort_unstable();
    synced.dedup();
    assert_eq!(synced, [(2, 5), (4, 14), (7, 0)]);
    assert!(sim.guest.writes > 0 && sim.source.report().pages_resent() > 0);
}

fn refused_layout(dest_regions: Vec<Region>) {
    let mut sc = busy_scenario(17);
    sc.regions = holey_regions();
    sc.dest_pages = dest_regions.iter().map(|r| r.pages).sum();
    sc.dest_regions = dest_regions;
    let mut sim = Sim::new(&sc, Tamper::None);
    let end = sim.run();
    assert!(
        matches!(sim.dest_error, Some(MigrationError::Incompatible(_))),
        "destination: {:?}",
        sim.dest_error
    );
    assert!(
        matches!(
            end,
            End::SourceFailed(MigrationError::PeerAborted {
                code: AbortCode::Incompatible,
                ..
            })
        ),
        "source: {end:?}"
    );
    assert_eq!(sim.replies, [Reply::Abort(AbortCode::Incompatible)]);
    // The source keeps running: never paused, nothing read, nothing to decide.
    assert_eq!(sim.guest.pause_calls, 0);
    assert!(!sim.guest.paused && !sim.source.is_paused());
    assert_eq!(sim.guest.reads, 0);
    assert_eq!(
        sim.source.status(),
        SourceStatus::Failed {
            source_paused: false
        }
    );
    assert!(!sim.source.report().committed);
    assert_eq!(sim.target.page_writes, 0);
}

#[test]
fn destination_with_another_region_base_refuses() {
    let mut regions = holey_regions();
    regions[2].guest_base = 128 << 20;
    refused_layout(regions);
}

#[test]
fn destination_missing_a_region_refuses() {
    let mut regions = holey_regions();
    regions.remove(1);
    refused_layout(regions);
}

#[test]
fn destination_with_regions_in_another_order_refuses() {
    let mut regions = holey_regions();
    regions.swap(0, 1);
    refused_layout(regions);
}

// ---------------------------------------------------------------------------------------------
// Engine v2: output bounded by the caller.

/// Drives one channel with rooms taken in turn from `rooms`, replies with rooms from `rooms`
/// too; checks every call stays within its room. Returns whether the migration finished within
/// `max_calls` calls.
fn run_with_rooms(
    sc: &Scenario,
    rooms: &[usize],
    max_calls: usize,
) -> (bool, Source, SourceHost, DestHost) {
    let (layout, dest_layout) = sc.layouts();
    let mut source = Source::pre_copy(layout, sc.config);
    let mut dest = Destination::new(dest_layout, DestinationConfig::default());
    let mut guest = SourceHost::new(sc);
    let mut target = DestHost::new(sc.dest_pages);
    let (mut to_dest, mut to_src) = (Vec::new(), Vec::new());
    let mut now = sc.start_at;
    let mut buf = vec![0u8; rooms.iter().copied().max().unwrap_or(0)];
    for call in 0..max_calls {
        if source.is_finished() {
            break;
        }
        let room = rooms[call % rooms.len()];
        let k = source
            .poll_transmit(now, 0, &mut buf[..room], &mut guest)
            .unwrap_or_else(|e| panic!("source failed: {e}"));
        assert!(
            k <= room,
            "poll_transmit wrote {k} bytes into a room of {room}"
        );
        to_dest.extend_from_slice(&buf[..k]);
        let used = dest
            .handle_input(now, 0, &to_dest, &mut target)
            .unwrap_or_else(|e| panic!("destination failed: {e}"));
        to_dest.drain(..used);
        let reply_room = rooms[(call + 1) % rooms.len()];
        let k = dest.poll_transmit(&mut buf[..reply_room]);
        assert!(
            k <= reply_room,
            "destination wrote {k} bytes into a room of {reply_room}"
        );
        to_src.extend_from_slice(&buf[..k]);
        let used = source
            .handle_input(now, 0, &to_src, &mut guest)
            .unwrap_or_else(|e| panic!("source failed: {e}"));
        to_src.drain(..used);
        now = now + ByteRate(sc.bandwidth).time_for(room as u64) + Nanos(1);
        if let Some(t) = source.poll_timeout() {
            now = now.max(t.min(now + Nanos::from_millis(1)));
        }
        guest.advance(now);
    }
    (source.is_finished(), source, guest, target)
}

fn room_sizes() -> impl Strategy<Value = Vec<usize>> {
    let frame = wire::page_frame_len(PAGE);
    prop::collection::vec(
        prop_oneof![
            1usize..100,
            (50usize..2000).prop_map(|r| r | 1),
            100usize..frame,
            frame..frame + 3,
            frame..200_000,
        ],
        1..12,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The engine never writes more than the room it is given, on either side; the migration
    /// completes whenever some room in the cycle holds a page frame, and byte-exact.
    #[test]
    fn output_never_exceeds_the_room(rooms in room_sizes(), pages in 1u64..64, seed in any::<u64>(), busy in any::<bool>()) {
        let mut sc = if busy { busy_scenario(pages) } else { quiet_scenario(pages) };
        sc.seed = seed;
        sc.state_len = 6000;
        let fits_a_page = rooms.iter().any(|&r| r >= wire::page_frame_len(PAGE));
        let (finished, source, guest, target) = run_with_rooms(&sc, &rooms, 200_000);
        if fits_a_page {
            prop_assert!(finished, "no end with rooms {:?}: {:?}", rooms, source.report());
            prop_assert_eq!(source.status(), SourceStatus::Done);
            prop_assert_eq!(source.report().verified, Some(true));
            prop_assert_eq!(&target.mem, guest.snapshot.as_ref().unwrap());
        } else {
            // No page frame fits: no page may go, and nothing may break.
            prop_assert!(!finished);
            prop_assert_eq!(source.report().pages_sent, 0);
            prop_assert_eq!(target.page_writes, 0);
        }
    }
}

#[test]
fn rooms_of_exactly_one_page_frame_complete() {
    let sc = busy_scenario(32);
    let (finished, source, guest, target) =
        run_with_rooms(&sc, &[wire::page_frame_len(PAGE)], 100_000);
    assert!(
        finished && source.status() == SourceStatus::Done,
        "{:?}",
        source.report()
    );
    assert_eq!(&target.mem, guest.snapshot.as_ref().unwrap());
}

// ---------------------------------------------------------------------------------------------
// Engine v2: a predictor defined outside the crate.

/// Predicts hot every page dirtied in either of the last two syncs; counts its calls.
struct TwoSyncPredictor {
    observed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    predicted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    last: Vec<u64>,
    before: Vec<u64>,
}

impl Predictor for TwoSyncPredictor {
    fn name(&self) -> &'static str {
        "two-sync-test"
    }
    fn observe(&mut self, dirty: &DirtyBitmap, _now: Nanos) {
        self.observed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.before = core::mem::take(&mut self.last);
        self.last = dirty.iter_ones().collect();
    }
    fn predict(&mut self, _now: Nanos, hot: &mut DirtyBitmap) {
        self.predicted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for &p in self.last.iter().chain(&self.before) {
            hot.set(p);
        }
    }
    fn tracked_pages(&self) -> usize {
        self.last.len() + self.before.len()
    }
    fn heap_bytes(&self) -> usize {
        8 * (self.last.capacity() + self.before.capacity())
    }
}

impl Sim {
    /// A simulation whose source runs `strategy` instead of the one `sc.config` describes.
    fn with_strategy(sc: &Scenario, strategy: PreCopy) -> Self {
        let mut sim = Sim::new(sc, Tamper::None);
        let (layout, _) = sc.layouts();
        sim.source = Source::new(
            layout,
            SessionConfig {
                verify: sc.config.verify,
                ..SessionConfig::default()
            },
            strategy,
        );
        sim
    }
}

#[test]
fn a_predictor_from_outside_the_crate_runs_in_a_migration() {
    use std::sync::atomic::Ordering;
    let mut sc = busy_scenario(256);
    sc.config.learning_samples = 3;
    let observed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let predicted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let predictor = TwoSyncPredictor {
        observed: observed.clone(),
        predicted: predicted.clone(),
        last: Vec::new(),
        before: Vec::new(),
    };
    let strategy = PreCopy::with_predictor(sc.config, Box::new(predictor));
    let mut sim = Sim::with_strategy(&sc, strategy);
    check_sim(&sc, &mut sim, true).unwrap();
    let r = sim.source.report();
    assert!(
        r.strategy.contains("two-sync-test"),
        "strategy name {:?}",
        r.strategy
    );
    let push_rounds = r.rounds.len() as u64 - 1;
    // One observation per learning sample and per end of round; a prediction per end of round,
    // and per learning sample while its guesses are judged in shadow.
    let predictions = predicted.load(Ordering::Relaxed);
    assert!(
        (push_rounds..=push_rounds + 3).contains(&predictions),
        "{predictions} predictions in {push_rounds} rounds"
    );
    assert!(observed.load(Ordering::Relaxed) > push_rounds);
    assert!(
        r.rounds.iter().any(|x| x.held_back > 0),
        "the predictor never held a page back: {:?}",
        r.rounds
    );
}

// ---------------------------------------------------------------------------------------------
// Engine v2: the bandwidth estimate behind a deep send buffer.

struct DeepBufferRun {
    report: MigrationReport,
    /// Pause to the destination running, measured by the simulation.
    actual_downtime: Nanos,
}

/// A transport that accepts writes at memory speed into a deep buffer (`buffer` bytes) and
/// drains it onto a link of `link` bytes per second. With `report_deliveries`, the driver calls
/// `on_delivered` with the bytes drained.
fn deep_buffer_migration(report_deliveries: bool) -> DeepBufferRun {
    const BUFFER: u64 = 64 << 20;
    const LINK: u64 = 100_000_000;
    const MEMCPY: u64 = 10_000_000_000;
    let mut sc = busy_scenario(4096); // 16 MiB
    sc.workload.writes_per_sec = 200_000;
    sc.config.stop = StopRules {
        downtime_target: Nanos::ZERO,
        max_rounds: 3,
        non_convergence_rounds: 0,
        ..StopRules::default()
    };
    let (layout, dest_layout) = sc.layouts();
    let mut source = Source::pre_copy(layout, sc.config);
    // Without reports: a destination that does not report what it took in either (as in v1).
    let mut dest = Destination::new(
        dest_layout,
        DestinationConfig {
            report_applied: report_deliveries,
            ..DestinationConfig::default()
        },
    );
    let mut guest = SourceHost::new(&sc);
    let mut target = DestHost::new(sc.dest_pages);
    let latency = Nanos::from_micros(100);
    // Bytes in the send buffer, as (time they were written, bytes).
    let mut queued: VecDeque<Vec<u8>> = VecDeque::new();
    let mut queued_bytes = 0u64;
    let mut in_flight: VecDeque<(Nanos, Vec<u8>)> = VecDeque::new();
    let mut replies: VecDeque<(Nanos, Vec<u8>)> = VecDeque::new();
    let (mut inbox, mut src_inbox) = (Vec::new(), Vec::new());
    let mut now = sc.start_at;
    let mut link_free_at = now;
    // Writes of 64 KiB: the transport reports each one when the link has drained it.
    let mut buf = vec![0u8; 64 << 10];
    let mut started_at = None;
    for _ in 0..10_000_000u64 {
        if source.is_finished() {
            break;
        }
        // The link drains the buffer, one write at a time, up to now.
        while let Some(chunk) = queued.front() {
            let done = link_free_at + ByteRate(LINK).time_for(chunk.len() as u64);
            if done > now {
                break;
            }
            let chunk = queued.pop_front().unwrap();
            queued_bytes -= chunk.len() as u64;
            link_free_at = done;
            if report_deliveries {
                source.on_delivered(done, chunk.len() as u64);
            }
            in_flight.push_back((done + latency, chunk));
        }
        if queued.is_empty() {
            link_free_at = link_free_at.max(now);
        }
        while let Some((t, chunk)) = in_flight.front().filter(|x| x.0 <= now).cloned() {
            in_flight.pop_front();
            inbox.extend_from_slice(&chunk);
            let used = dest
                .handle_input(t, 0, &inbox, &mut target)
                .expect("destination");
            inbox.drain(..used);
            if started_at.is_none() {
                started_at = dest.started_at();
            }
            let mut out = Vec::new();
            dest.drain_replies(&mut out);
            if !out.is_empty() {
                replies.push_back((t + latency, out));
            }
        }
        while let Some((t, bytes)) = replies.front().filter(|x| x.0 <= now).cloned() {
            replies.pop_front();
            src_inbox.extend_from_slice(&bytes);
            let used = source
                .handle_input(t, 0, &src_inbox, &mut guest)
                .expect("source");
            src_inbox.drain(..used);
        }
        if source.is_finished() {
            break;
        }
        source
            .handle_timeout(now, &mut guest)
            .expect("source timer");
        // Write while the buffer has room, at memory speed.
        let room = (BUFFER - queued_bytes).min(buf.len() as u64) as usize;
        let k = if room >= wire::page_frame_len(PAGE) {
            source
                .poll_transmit(now, 0, &mut buf[..room], &mut guest)
                .expect("source")
        } else {
            0
        };
        if k > 0 {
            queued.push_back(buf[..k].to_vec());
            queued_bytes += k as u64;
            now += ByteRate(MEMCPY).time_for(k as u64);
            guest.advance(now);
            continue;
        }
        // Nothing to write now: jump to the next event (the link finishing a write, an
        // arrival, or a timer).
        let link_done = queued
            .front()
            .map(|c| link_free_at + ByteRate(LINK).time_for(c.len() as u64));
        let next = [
            source.poll_timeout().filter(|&t| t > now),
            link_done,
            in_flight.front().map(|x| x.0),
            replies.front().map(|x| x.0),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(now + Nanos::from_micros(10))
        .max(now + Nanos(1));
        now = next;
        guest.advance(now);
    }
    assert_eq!(source.status(), SourceStatus::Done, "{:?}", source.report());
    assert_eq!(&target.mem, guest.snapshot.as_ref().unwrap());
    let actual_downtime = started_at.unwrap() - guest.paused_at.unwrap();
    DeepBufferRun {
        report: source.report().clone(),
        actual_downtime,
    }
}

/// Behind a 64 MiB send buffer drained at 100 MB/s, bytes handed to the transport say nothing
/// about the link. Without delivery reports (the v1 behaviour) the last pre-copy round's
/// bandwidth is memory speed and its downtime estimate far too low; with `on_delivered`
/// reports the bandwidth is the link's rate, within 2x (50..200 MB/s).
#[test]
fn delivery_reports_make_the_bandwidth_estimate_honest_behind_a_deep_buffer() {
    const LINK: u64 = 100_000_000;
    let blind = deep_buffer_migration(false);
    let honest = deep_buffer_migration(true);
    let last_push = |r: &MigrationReport| r.rounds[r.rounds.len() - 2].clone();
    let (b, h) = (last_push(&blind.report), last_push(&honest.report));
    eprintln!(
        "without reports: bandwidth {} estimate {} actual downtime {}; with reports: bandwidth {} estimate {} actual downtime {}",
        b.bandwidth, b.estimated_downtime, blind.actual_downtime, h.bandwidth, h.estimated_downtime, honest.actual_downtime
    );
    // Without reports: at least 10x too optimistic.
    assert!(
        b.bandwidth.0 >= 10 * LINK,
        "bandwidth without reports {}",
        b.bandwidth
    );
    assert!(
        b.estimated_downtime.0 * 10 <= blind.actual_downtime.0,
        "estimate {} vs actual downtime {}",
        b.estimated_downtime,
        blind.actual_downtime
    );
    // With reports: the link's rate, within 2x.
    assert!(
        h.bandwidth.0 >= LINK / 2 && h.bandwidth.0 <= 2 * LINK,
        "bandwidth with reports {}",
        h.bandwidth
    );
    for round in &honest.report.rounds[1..honest.report.rounds.len() - 1] {
        assert!(round.bandwidth.0 <= 2 * LINK, "round {round:?}");
    }
}

/// With delivery reports the downtime estimate also counts the bytes still in the send buffer
/// (`DeliveryEstimator::backlog`), which the destination must receive before it can start:
/// behind a 64 MiB buffer, leaving them out gave ~0.2 ms for a real downtime of ~150 ms.
#[test]
fn downtime_estimate_counts_the_send_backlog() {
    let honest = deep_buffer_migration(true);
    let r = &honest.report;
    let estimate = r.rounds[r.rounds.len() - 2].estimated_downtime;
    assert!(
        estimate.0 * 2 >= honest.actual_downtime.0,
        "estimate {estimate} vs actual downtime {}",
        honest.actual_downtime
    );
}

// ---------------------------------------------------------------------------------------------
// The content pipeline through the session.

/// The session id the codec scenarios use: the dedup index is seeded with it, as the
/// destination's reference check is.
const CODEC_SESSION: u64 = 0x5eed_cafe_f00d_0001;

/// The core's content encoders, by number: LZ4, XBZRLE delta, delta + LZ4, dedup, adaptive.
fn content_encoder(which: usize) -> Box<dyn memferry::codec::PageEncoder> {
    use memferry::codec::adaptive::Adaptive;
    use memferry::codec::dedup::{DedupEncoder, DedupIndex};
    use memferry::codec::lz4::{DeltaLz4Encoder, Lz4Encoder};
    use memferry::codec::xbzrle::{DeltaEncoder, XbzrleCache};
    let delta = || DeltaEncoder::new(XbzrleCache::new(256 * PAGE, PAGE));
    let dedup = || DedupEncoder::new(DedupIndex::new(CODEC_SESSION, 4096));
    match which {
        0 => Box::new(Lz4Encoder::default()),
        1 => Box::new(delta()),
        2 => Box::new(DeltaLz4Encoder::new(delta())),
        3 => Box::new(dedup()),
        _ => Box::new(Adaptive::new(Some(dedup()), Some(delta()), true)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// Every content encoder through the session, round after round while the guest writes:
    /// deltas apply onto the destination's copy and references resolve from its memory, and
    /// the destination still equals the source at switchover.
    #[test]
    fn content_codecs_keep_the_destination_exact(sc in scenario(), which in 0usize..5) {
        let sc = Scenario { plans: false, ..sc };
        let mut sim = Sim::new(&sc, Tamper::None);
        let (layout, _) = sc.layouts();
        sim.source = Source::new(
            layout,
            SessionConfig {
                verify: sc.config.verify,
                session_id: CODEC_SESSION,
                ..SessionConfig::default()
            },
            PreCopy::new(sc.config),
        )
        .with_encoder(content_encoder(which));
        check_sim(&sc, &mut sim, false)?;
        // The per-encoding tally accounts for every page sent, raw pages at a page each.
        let r = sim.source.report();
        let e = r.encodings;
        let pages: u64 = e.slots().iter().map(|(_, s)| s.pages).sum();
        prop_assert_eq!(pages, r.pages_sent);
        prop_assert_eq!(e.zero.pages, r.zero_pages_sent);
        prop_assert_eq!(e.raw.bytes, e.raw.pages * PAGE as u64);
        prop_assert_eq!(e.zero.bytes, 0);
        prop_assert!(e.saved_bytes(PAGE as u64) >= e.zero.pages * PAGE as u64);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Hash-first: the destination holds part of the guest's content from earlier (in another
    /// order, with pages of its own); round 1 sends that content as hashes, the rest as usual,
    /// with or without a content encoder, and the destination still equals the source.
    #[test]
    fn hash_first_sends_known_content_as_hashes(
        sc in scenario(),
        share in 0u64..=100,
        which in prop_oneof![Just(None), (0usize..5).prop_map(Some)],
    ) {
        let sc = Scenario { plans: false, ..sc };
        let mut sim = Sim::new(&sc, Tamper::None);
        let (layout, dest_layout) = sc.layouts();
        // Content the destination holds: `share`% of the guest's pages as they are now,
        // reversed, and a few pages the guest does not have.
        let pages = sim.guest.mem.len() / PAGE;
        let mut content: Vec<Vec<u8>> = sim
            .guest
            .mem
            .chunks(PAGE)
            .take(pages * share as usize / 100)
            .map(|p| p.to_vec())
            .collect();
        content.reverse();
        content.extend((0..3u8).map(|i| vec![0xA0 + i; PAGE]));
        let mut source = Source::new(
            layout,
            SessionConfig {
                verify: sc.config.verify,
                session_id: CODEC_SESSION,
                ..SessionConfig::default()
            },
            PreCopy::new(sc.config),
        );
        if let Some(which) = which {
            source = source.with_encoder(content_encoder(which));
        }
        sim.source = source;
        sim.net.dest = Destination::new(
            dest_layout,
            DestinationConfig {
                verify: sc.dest_verify,
                ..DestinationConfig::default()
            },
        )
        .with_content(Box::new(content.clone()));
        check_sim(&sc, &mut sim, false)?;
        let r = sim.source.report();
        let distinct: std::collections::HashSet<&Vec<u8>> =
            content.iter().filter(|p| p.iter().any(|&b| b != 0)).collect();
        prop_assert_eq!(r.known_pages_announced, distinct.len() as u64);
        // Known content only in round 1, and never more pages than it had.
        prop_assert!(r.encodings.known.pages <= r.rounds[0].pages);
        prop_assert_eq!(r.encodings.known.bytes, 16 * r.encodings.known.pages);
        if share == 100 && sc.workload.writes_per_sec == 0 {
            // A quiet guest's pages are all as announced when round 1 reads them (a busy one
            // may rewrite a tiny guest before it is read: then nothing matches).
            prop_assert!(r.encodings.known.pages > 0 || distinct.len() <= 3);
        }
    }
}

/// A VM returning to a host that kept its image (paper 003): with the whole image there and a
/// quiet guest, round 1 sends every non-zero page as a 16-byte hash.
#[test]
fn a_returning_guest_sends_hashes_for_what_the_destination_kept() {
    let sc = Scenario {
        plans: false,
        ..quiet_scenario(256)
    };
    let run = |with_image: bool| {
        let mut sim = Sim::new(&sc, Tamper::None);
        let (layout, dest_layout) = sc.layouts();
        let image: Vec<Vec<u8>> = sim.guest.mem.chunks(PAGE).map(|p| p.to_vec()).collect();
        sim.source = Source::new(
            layout,
            SessionConfig {
                session_id: CODEC_SESSION,
                ..SessionConfig::default()
            },
            PreCopy::new(sc.config),
        );
        let dest = Destination::new(dest_layout, DestinationConfig::default());
        sim.net.dest = if with_image {
            dest.with_content(Box::new(image.clone()))
        } else {
            dest
        };
        check_sim(&sc, &mut sim, false).unwrap();
        let nonzero = image.iter().filter(|p| p.iter().any(|&b| b != 0)).count() as u64;
        (sim.source.report().clone(), nonzero)
    };
    let (with, nonzero) = run(true);
    let (without, _) = run(false);
    assert!(nonzero > 100);
    assert_eq!(with.encodings.known.pages, nonzero);
    assert_eq!(with.encodings.raw.pages, 0);
    eprintln!(
        "256 pages, {nonzero} non-zero: {} bytes with the image kept, {} without",
        with.bytes_sent, without.bytes_sent
    );
    assert!(with.bytes_sent * 20 < without.bytes_sent);
}

/// A busy guest with a downtime target it never meets: the rounds go on until another rule.
/// A pause that completes asynchronously (a VMM's vCPU threads confirm later): the engine
/// sends nothing while it is pending, polls it, counts the wait as downtime, and the final
/// round still carries every write the guest made before it parked.
#[test]
fn an_asynchronous_pause_is_waited_for_and_counted_as_downtime() {
    let sc = busy_scenario(256);
    let mut plain = Sim::new(&sc, Tamper::None);
    check_sim(&sc, &mut plain, false).unwrap();
    let park = Nanos::from_millis(7);
    let mut sim = Sim::new(&sc, Tamper::None);
    sim.guest.park_delay = Some(park);
    check_sim(&sc, &mut sim, false).unwrap();
    let guest = &sim.guest;
    let asked = guest.pause_asked_at.expect("the engine asked for a pause");
    let parked = guest.paused_at.expect("the guest parked");
    assert!(
        parked - asked >= park,
        "parked {parked} after asking {asked}"
    );
    assert!(guest.pause_polls >= 2, "{} polls", guest.pause_polls);
    let r = sim.source.report();
    assert!(
        r.downtime >= park,
        "downtime {} does not count the {park} the vCPUs took to park",
        r.downtime
    );
    // The final round (the downtime) starts at the request; check_sim checked that the
    // destination holds memory as it was when the vCPUs parked, writes made while the pause
    // was pending included.
    let last = r.rounds.last().unwrap();
    assert!(last.stop_and_copy);
    assert_eq!(last.start, asked - sc.start_at);
    assert!(last.duration >= park);
}

/// vCPUs that never confirm the pause: the migration fails at the pause timeout and the guest
/// runs on at the source, which stays the only copy.
#[test]
fn a_pause_that_never_completes_fails_and_resumes_the_guest() {
    let sc = busy_scenario(256);
    let mut sim = Sim::new(&sc, Tamper::None);
    let (layout, _) = sc.layouts();
    sim.source = Source::new(
        layout,
        SessionConfig {
            verify: sc.config.verify,
            pause_timeout: Nanos::from_millis(20),
            ..SessionConfig::default()
        },
        PreCopy::new(sc.config),
    );
    sim.guest.park_delay = Some(Nanos(u64::MAX));
    let end = sim.run();
    let End::SourceFailed(error) = end else {
        panic!("the migration did not fail: {end:?}");
    };
    assert!(
        error.to_string().contains("did not park"),
        "unexpected error: {error}"
    );
    assert_eq!(sim.guest.resume_calls, 1);
    assert!(!sim.guest.paused);
    assert!(!sim.source.destination_started());
    assert_eq!((sim.guest.log_starts, sim.guest.log_stops), (1, 1));
}

fn busy_scenario_never_within_target() -> Scenario {
    let base = busy_scenario(256);
    Scenario {
        config: PreCopyConfig {
            stop: StopRules {
                downtime_target: Nanos::from_micros(1),
                ..StopRules::default()
            },
            ..base.config
        },
        ..base
    }
}

/// The caller's switchover request ends the rounds at the end of the current one.
#[test]
fn switchover_now_ends_the_rounds_at_the_round_end() {
    let sc = busy_scenario_never_within_target();
    let mut plain = Sim::new(&sc, Tamper::None);
    check_sim(&sc, &mut plain, false).unwrap();
    assert!(
        plain.source.report().rounds.len() > 3,
        "the busy guest needs several rounds"
    );
    let mut sim = Sim::new(&sc, Tamper::None);
    sim.source.switchover_now();
    check_sim(&sc, &mut sim, false).unwrap();
    let r = sim.source.report();
    assert_eq!(r.stop_reason, Some(StopReason::Requested));
    assert_eq!(r.rounds.len(), 2, "round 1, then the stop-and-copy");
}

/// A migration whose downtime would exceed the most accepted is cancelled before the pause:
/// the guest never stops, and dirty logging is off again.
#[test]
fn a_downtime_above_the_maximum_cancels_instead() {
    let base = busy_scenario(256);
    let sc = Scenario {
        config: PreCopyConfig {
            stop: StopRules {
                downtime_target: Nanos::from_micros(1),
                max_rounds: 3,
                max_downtime: Some(Nanos::from_micros(2)),
                ..StopRules::default()
            },
            ..base.config
        },
        ..base
    };
    let mut sim = Sim::new(&sc, Tamper::None);
    let end = sim.run();
    let End::SourceFailed(MigrationError::Cancelled(why)) = end else {
        panic!("not cancelled: {end:?}")
    };
    assert!(why.contains("above the most accepted"), "{why}");
    assert_eq!(sim.guest.pause_calls, 0, "the guest was paused");
    assert_eq!((sim.guest.log_starts, sim.guest.log_stops), (1, 1));
    // The same migration with a bound it meets switches over.
    let sc = Scenario {
        config: PreCopyConfig {
            stop: StopRules {
                max_downtime: Some(Nanos::from_secs(10)),
                ..sc.config.stop
            },
            ..sc.config
        },
        ..sc
    };
    let mut sim = Sim::new(&sc, Tamper::None);
    check_sim(&sc, &mut sim, false).unwrap();
}

/// Settings changed mid-migration apply: a downtime target raised after round 1 ends the
/// rounds at once.
#[test]
fn the_downtime_target_can_change_mid_migration() {
    let sc = busy_scenario_never_within_target();
    let mut sim = Sim::new(&sc, Tamper::None);
    sim.source
        .strategy_mut()
        .set_downtime_target(Nanos::from_secs(100));
    assert!(matches!(sim.run(), End::Done));
    let snapshot = sim.guest.snapshot.as_ref().unwrap();
    assert!(first_diff_page(&sim.target.mem, snapshot).is_none());
    let r = sim.source.report();
    assert_eq!(r.stop_reason, Some(StopReason::DowntimeTarget));
    assert_eq!(r.rounds.len(), 2);
}
