//! Virtual-time tests of pre-copy: [`PreCopySource`] against [`Receiver`] over a simulated link,
//! with no real clock and no threads.
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

use std::collections::VecDeque;

use memferry::digest::memory_digest;
use memferry::prelude::*;
use memferry::track::PredictorKind;
use memferry::wire::{
    self, AbortCode, Frame, FrameKind, Hello, PageEncoding, Verdict, WireError, PROTOCOL_VERSION,
};
use proptest::prelude::*;

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
    fn sync(&mut self, into: &mut DirtyBitmap) -> Result<(), HostError> {
        into.union_with(&self.dirty);
        self.dirty.clear();
        // A running guest's vCPUs do not stop for the sync: a few writes land right after the
        // log was fetched, before the engine's next action (e.g. the pause).
        if !self.paused && self.workload.writes_per_sec > 0 {
            for _ in 0..self.rng.below(3) {
                self.write_once();
                self.racing_writes += 1;
            }
        }
        Ok(())
    }
}

impl SourceGuest for SourceHost {
    fn pause(&mut self) -> Result<(), HostError> {
        assert!(!self.paused, "the engine paused a paused guest");
        self.paused = true;
        self.pause_calls += 1;
        self.paused_at = Some(self.clock);
        self.snapshot = Some(self.mem.clone());
        Ok(())
    }

    fn resume(&mut self) -> Result<(), HostError> {
        assert!(self.paused, "the engine resumed a running guest");
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
        let at = page.0 as usize * PAGE;
        self.mem[at..at + PAGE].copy_from_slice(data);
        self.page_writes += 1;
        Ok(())
    }
}

impl DestinationGuest for DestHost {
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
    complete: Option<u64>,
    aborts: Vec<AbortCode>,
}

impl Tap {
    fn feed(&mut self, bytes: &[u8]) {
        let mut at = 0;
        while at < bytes.len() {
            let (frame, len) = Frame::parse(&bytes[at..])
                .unwrap_or_else(|e| panic!("the source emitted a bad or partial frame: {e}"));
            at += len;
            let len = len as u64;
            self.total += len;
            match frame {
                Frame::Page { encoding, .. } => {
                    self.open.pages += 1;
                    self.open.bytes += len;
                    if encoding == PageEncoding::Zero {
                        self.open.zero_pages += 1;
                    }
                }
                Frame::Abort { code, .. } => {
                    self.abort_bytes += len;
                    self.aborts.push(code);
                }
                other => {
                    self.control_bytes += len;
                    match other {
                        Frame::RoundEnd { round, pages } => {
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
    }
}

/// What the destination said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reply {
    Accept,
    Ready,
    Verified(Verdict),
    Abort(AbortCode),
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
            other => Reply::Other(other.kind()),
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
        xor: u64,
    },
}

#[derive(Debug)]
enum End {
    Done,
    SourceFailed(MigrationError),
}

type InFlight = VecDeque<(Nanos, Vec<u8>)>;

struct Sim {
    sc: Scenario,
    now: Nanos,
    bandwidth: ByteRate,
    chunk_rng: Rng,
    guest: SourceHost,
    target: DestHost,
    source: PreCopySource,
    dest: Receiver,
    to_dest: InFlight,
    to_src: InFlight,
    dest_inbox: Vec<u8>,
    src_inbox: Vec<u8>,
    dest_error: Option<MigrationError>,
    source_error: Option<MigrationError>,
    tap: Tap,
    replies: Vec<Reply>,
    tamper: Tamper,
    tampered: bool,
    wire_to_dest: u64,
    wire_to_src: u64,
    last_src_delivery: Option<Nanos>,
    /// Chunks handed to the source so far.
    src_deliveries: u64,
    dest_start_seen: bool,
    polls: u64,
}

impl Sim {
    fn new(sc: &Scenario, tamper: Tamper) -> Self {
        let geometry = Geometry::new(PageSize::DEFAULT, sc.pages).unwrap();
        let dest_geometry = Geometry::new(PageSize::DEFAULT, sc.dest_pages).unwrap();
        Sim {
            sc: sc.clone(),
            now: sc.start_at,
            bandwidth: ByteRate(sc.bandwidth),
            chunk_rng: Rng(sc.seed ^ 0xc4a2_11f0_9d3e_5b77),
            guest: SourceHost::new(sc),
            target: DestHost::new(sc.dest_pages),
            source: PreCopySource::new(geometry, sc.config),
            dest: Receiver::new(
                dest_geometry,
                ReceiverConfig {
                    verify: sc.dest_verify,
                    ..ReceiverConfig::default()
                },
            ),
            to_dest: VecDeque::new(),
            to_src: VecDeque::new(),
            dest_inbox: Vec::new(),
            src_inbox: Vec::new(),
            dest_error: None,
            source_error: None,
            tap: Tap::default(),
            replies: Vec::new(),
            tamper,
            tampered: false,
            wire_to_dest: 0,
            wire_to_src: 0,
            last_src_delivery: None,
            src_deliveries: 0,
            dest_start_seen: false,
            polls: 0,
        }
    }

    fn chunk_len(&mut self, left: usize) -> usize {
        (1 + self.chunk_rng.below(self.sc.max_chunk as u64) as usize).min(left)
    }

    /// Moves virtual time to `t`; the guest runs meanwhile (until the source has failed: from
    /// then on the guest's memory is left as the failure found it).
    fn set_time(&mut self, t: Nanos) {
        assert!(
            t >= self.now,
            "virtual time went backwards: {t} < {}",
            self.now
        );
        self.now = t;
        if self.source_error.is_none() {
            self.guest.advance(t);
        }
    }

    /// Puts the source's bytes on the link, to arrive at `sent + latency`.
    fn queue_to_dest(&mut self, sent: Nanos, mut bytes: Vec<u8>) {
        self.tap.feed(&bytes);
        self.apply_tamper(&mut bytes);
        self.wire_to_dest += bytes.len() as u64;
        self.to_dest.push_back((sent + self.sc.latency, bytes));
    }

    fn apply_tamper(&mut self, bytes: &mut [u8]) {
        if self.tampered || self.tamper == Tamper::None {
            return;
        }
        let mut at = 0;
        while at < bytes.len() {
            let (frame, len) = Frame::parse(&bytes[at..]).expect("tapped already");
            match (self.tamper, frame) {
                (Tamper::CorruptPage { while_paused }, Frame::Page { payload, .. })
                    if self.source.is_paused() == while_paused =>
                {
                    // A payload byte if there is one, else a byte of the page index.
                    let flip = if payload.is_empty() {
                        at + wire::HEADER_LEN
                    } else {
                        at + wire::HEADER_LEN + wire::PAGE_BODY_FIXED + payload.len() / 2
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

    fn deliver_to_dest(&mut self, at: Nanos, bytes: &[u8]) {
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
                    self.guest.paused,
                    "the destination started while the source guest was running"
                );
            }
            if !out.is_empty() {
                self.replies.extend(parse_replies(&out));
                self.wire_to_src += out.len() as u64;
                self.to_src.push_back((at + self.sc.latency, out));
            }
        }
    }

    fn deliver_to_src(&mut self, at: Nanos, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            if self.source_error.is_some() {
                // A failed source's driver has closed the transport.
                return;
            }
            let n = self.chunk_len(rest.len());
            self.src_inbox.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            self.last_src_delivery = Some(at);
            self.src_deliveries += 1;
            let mut out = Vec::new();
            match self
                .source
                .receive(at, &self.src_inbox, &mut self.guest, &mut out)
            {
                Ok(used) => {
                    assert!(used <= self.src_inbox.len());
                    self.src_inbox.drain(..used);
                }
                Err(e) => self.source_error = Some(e),
            }
            if !out.is_empty() {
                self.queue_to_dest(at, out);
            }
        }
    }

    /// Runs the link until `target`, delivering every chunk due by then in time order.
    fn advance_to(&mut self, target: Nanos) {
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
            self.set_time(at);
            if to_dest {
                self.deliver_to_dest(at, &bytes);
            } else {
                self.deliver_to_src(at, &bytes);
            }
        }
        if target > self.now {
            self.set_time(target);
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
    fn flush(&mut self) {
        while let Some(t) = self.next_arrival() {
            self.advance_to(t.max(self.now));
        }
    }

    /// A generous bound on polls: a round takes at most two polls per page (a batch and a wait
    /// each sending at least one page) plus a few, hashing at most one per page, and waiting for
    /// the peer one per message.
    fn poll_cap(&self) -> u64 {
        let rounds = self.sc.config.stop.max_rounds.min(1000) as u64 + 1;
        rounds * (2 * self.sc.pages + 16) + self.sc.pages + 1000
    }

    fn run(&mut self) -> End {
        let cap = self.poll_cap();
        loop {
            if let Some(e) = self.source_error.clone() {
                self.flush();
                return End::SourceFailed(e);
            }
            self.polls += 1;
            assert!(
                self.polls <= cap,
                "pre-copy did not terminate within {cap} polls: round {}, now {}, rounds so far {:?}",
                self.source.round(),
                self.now,
                self.source.report().rounds,
            );
            let polled_at = self.now;
            let deliveries = self.src_deliveries;
            let mut out = Vec::new();
            let poll = self.source.poll(self.now, &mut self.guest, &mut out);
            if let Err(e) = &poll {
                self.source_error = Some(e.clone());
            }
            if !out.is_empty() {
                let sent = self.now + self.bandwidth.time_for(out.len() as u64);
                self.queue_to_dest(sent, out);
                self.advance_to(sent);
            }
            match poll {
                Err(_) | Ok(Poll::Continue) => {}
                Ok(Poll::WaitUntil(t)) => {
                    assert!(
                        t > polled_at,
                        "WaitUntil({t}) is not after now ({polled_at})"
                    );
                    self.advance_to(t);
                }
                Ok(Poll::WaitForPeer) => match self.next_arrival() {
                    Some(t) => self.advance_to(t.max(self.now)),
                    // The answer already arrived while the output was on the wire.
                    None if self.src_deliveries > deliveries => {}
                    None => panic!(
                        "deadlock: the source waits for the peer but nothing is in flight \
                         (destination {:?}, error {:?})",
                        self.dest.status(),
                        self.dest_error
                    ),
                },
                Ok(Poll::Done) => return End::Done,
            }
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
    prop_assert!(sim.dest_inbox.is_empty() && sim.src_inbox.is_empty());

    // The guest was paused once, at switchover, and stays paused: the source is released.
    let guest = &sim.guest;
    prop_assert_eq!(guest.pause_calls, 1);
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
        ReceiverStatus::Complete
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
    prop_assert!(
        rounds.len() as u64 <= stop.max_rounds as u64 + 1,
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
        if round.stop_and_copy || sc.config.predictor == PredictorKind::None {
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
            prop_assert_eq!(
                round.start,
                rounds[i - 1].start + rounds[i - 1].duration,
                "round {} starts when round {} ends",
                i + 1,
                i
            );
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
        Some(StopReason::DowntimeTarget) => {
            prop_assert!(last_push.estimated_downtime <= stop.downtime_target)
        }
        Some(StopReason::MaxRounds) => prop_assert_eq!(push_rounds, stop.max_rounds),
        Some(StopReason::NotConverging) => prop_assert!(
            stop.non_convergence_rounds > 0 && push_rounds >= stop.non_convergence_rounds
        ),
        Some(StopReason::Deadline) => {
            prop_assert!(stop.deadline.is_some_and(|d| r.preparation_time >= d))
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
    prop_assert_eq!(&sim.replies[..], expected_replies);

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
    prop_assert_eq!(Some(sc.start_at + r.preparation_time), guest.paused_at);
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
    )
        .prop_map(
            |(target_us, max_rounds, nc, shrink, deadline_us)| StopRules {
                downtime_target: Nanos::from_micros(target_us),
                max_rounds,
                non_convergence_rounds: nc,
                min_shrink_permille: shrink,
                deadline: deadline_us.map(Nanos::from_micros),
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
                predictor: PredictorKind::parse(predictor).expect("a valid predictor"),
                learning_samples,
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
        non_convergence_rounds: 0,
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
    assert_eq!(a.polls, b.polls);
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

fn corrupt_page(while_paused: bool) {
    let mut sc = busy_scenario(64);
    sc.config.stop.max_rounds = 1;
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
    assert_eq!(sim.dest.status(), ReceiverStatus::Failed);
    assert_eq!(
        sim.replies,
        [Reply::Accept, Reply::Abort(AbortCode::BadFrame)]
    );
    assert_eq!(sim.target.start_calls, 0);

    // The source took the abort, and its guest runs again.
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
    assert!(!sim.source.is_paused());
    assert!(!sim.guest.paused, "the source guest must run again");
    let expected_pauses = u32::from(while_paused);
    assert_eq!(sim.guest.pause_calls, expected_pauses);
    assert_eq!(sim.guest.resume_calls, expected_pauses);
    assert!(
        sim.tap.aborts.is_empty(),
        "the source must not answer an abort with an abort"
    );
    assert_eq!(sim.source.report().bytes_sent, sim.tap.total);

    // The failure left the source's memory alone (the idle-guest test checks the other case).
    if while_paused {
        assert_eq!(sim.guest.snapshot.as_ref(), Some(&sim.guest.mem));
        assert_eq!(sim.source.report().stop_reason, Some(StopReason::MaxRounds));
        assert!(sim.tap.rounds[1].pages > 0, "stop-and-copy sent no page");
    }

    // Every later call repeats the error and emits nothing.
    let mut out = Vec::new();
    assert_eq!(
        sim.source.poll(sim.now, &mut sim.guest, &mut out),
        Err(error.clone())
    );
    assert!(out.is_empty());
    assert_eq!(sim.guest.resume_calls, expected_pauses, "resumed twice");
}

#[test]
fn corrupted_page_before_stop_and_copy_aborts_both_sides() {
    corrupt_page(false);
}

#[test]
fn corrupted_page_during_stop_and_copy_aborts_and_resumes_the_source() {
    corrupt_page(true);
}

#[test]
fn corrupted_page_of_an_idle_guest_leaves_its_memory_untouched() {
    let sc = quiet_scenario(32);
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

#[test]
fn tampered_digest_fails_both_sides_and_resumes_the_source() {
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
            Reply::Abort(AbortCode::DigestMismatch)
        ]
    );
    match end {
        End::SourceFailed(MigrationError::DigestMismatch { .. }) => {}
        other => panic!("source: {other:?}"),
    }
    let r = sim.source.report();
    assert_eq!(r.verified, Some(false));
    assert_eq!(r.source_digest, Some(true_digest));
    assert!(!sim.source.is_paused());
    assert!(!sim.guest.paused, "the source guest must run again");
    assert_eq!((sim.guest.pause_calls, sim.guest.resume_calls), (1, 1));
    assert_eq!(sim.tap.aborts, [AbortCode::DigestMismatch]);
    assert_eq!(
        r.bytes_sent, sim.tap.total,
        "the abort counts as bytes sent"
    );
    assert_eq!(
        r.bytes_sent,
        r.rounds.iter().map(|x| x.bytes).sum::<u64>() + r.control_bytes + sim.tap.abort_bytes
    );
    assert_eq!(sim.guest.snapshot.as_ref(), Some(&sim.guest.mem));
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

fn encode(frames: &[Frame<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        f.emit(&mut out);
    }
    out
}

fn hello(pages: u64) -> Frame<'static> {
    Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        page_shift: 12,
        page_count: pages,
        features: 0,
    })
}

fn raw(index: u64, page: &[u8]) -> Frame<'_> {
    Frame::Page {
        index,
        encoding: PageEncoding::Raw,
        payload: page,
    }
}

fn zero(index: u64) -> Frame<'static> {
    Frame::Page {
        index,
        encoding: PageEncoding::Zero,
        payload: &[],
    }
}

/// Feeds `frames` to a fresh receiver of `pages` pages; it must fail with an error `check`
/// accepts, say so with an abort of `code`, stay failed, and never start the guest.
fn expect_rejected(
    pages: u64,
    frames: &[Frame<'_>],
    code: AbortCode,
    check: impl Fn(&MigrationError) -> bool,
) -> DestHost {
    let geometry = Geometry::new(PageSize::DEFAULT, pages).unwrap();
    let mut rx = Receiver::new(geometry, ReceiverConfig::default());
    let mut host = DestHost::new(pages);
    let bytes = encode(frames);
    let mut out = Vec::new();
    let err = match rx.receive(Nanos::ZERO, &bytes, &mut host, &mut out) {
        Err(e) => e,
        Ok(used) => panic!("accepted {frames:?} ({used} bytes)"),
    };
    assert!(check(&err), "{frames:?}: got {err:?}");
    assert_eq!(rx.status(), ReceiverStatus::Failed);
    assert_eq!(parse_replies(&out).last(), Some(&Reply::Abort(code)));
    let mut again = Vec::new();
    assert_eq!(
        rx.receive(Nanos(1), &encode(&[zero(0)]), &mut host, &mut again),
        Err(err)
    );
    assert!(again.is_empty());
    assert_eq!(host.start_calls, 0);
    host
}

#[test]
fn receiver_rejects_frames_out_of_order() {
    use MigrationError as E;
    let page = vec![7u8; PAGE];
    let pv = AbortCode::ProtocolViolation;
    let unexpected =
        |kind: FrameKind| move |e: &E| matches!(e, E::UnexpectedFrame { got, .. } if *got == kind);

    // Anything before the hello.
    expect_rejected(2, &[zero(0)], pv, unexpected(FrameKind::Page));
    // A Complete right after the hello, and one after every page but before the switchover.
    expect_rejected(
        2,
        &[hello(2), Frame::Complete { digest: 1 }],
        pv,
        unexpected(FrameKind::Complete),
    );
    expect_rejected(
        2,
        &[
            hello(2),
            raw(0, &page),
            zero(1),
            Frame::RoundEnd { round: 1, pages: 2 },
            Frame::DeviceState(b"cpu"),
            Frame::Complete { digest: 1 },
        ],
        pv,
        unexpected(FrameKind::Complete),
    );
    // A second hello.
    expect_rejected(2, &[hello(2), hello(2)], pv, unexpected(FrameKind::Hello));
    // A frame only the destination sends.
    expect_rejected(
        2,
        &[hello(2), Frame::Ready],
        pv,
        unexpected(FrameKind::Ready),
    );

    // Round markers: the wrong page count, the wrong round.
    let host = expect_rejected(
        3,
        &[
            hello(3),
            raw(0, &page),
            Frame::RoundEnd { round: 1, pages: 2 },
        ],
        pv,
        |e| matches!(e, E::RoundMismatch { round: 1, .. }),
    );
    assert_eq!(host.page_writes, 1);
    expect_rejected(
        3,
        &[
            hello(3),
            raw(0, &page),
            Frame::RoundEnd { round: 2, pages: 1 },
        ],
        pv,
        |e| matches!(e, E::RoundMismatch { round: 2, .. }),
    );
    // Device state inside an open round.
    expect_rejected(
        3,
        &[hello(3), raw(0, &page), Frame::DeviceState(b"cpu")],
        pv,
        |e| matches!(e, E::RoundMismatch { .. }),
    );

    // Pages outside the guest are refused before anything is written.
    for index in [3, 4, 64, u64::MAX] {
        let host = expect_rejected(3, &[hello(3), raw(0, &page), raw(index, &page)], pv, |e| {
            *e == E::PageOutOfRange {
                page: index,
                page_count: 3,
            }
        });
        assert_eq!(host.page_writes, 1);
        assert!(host.mem[PAGE..].iter().all(|&b| b == 0xa5));
        let host = expect_rejected(3, &[hello(3), zero(index)], pv, |e| {
            *e == E::PageOutOfRange {
                page: index,
                page_count: 3,
            }
        });
        assert_eq!(host.page_writes, 0);
    }
    // Payloads that do not fit their encoding.
    expect_rejected(2, &[hello(2), raw(1, &page[..PAGE - 1])], pv, |e| {
        matches!(e, E::BadPagePayload { page: 1, .. })
    });
    expect_rejected(
        2,
        &[
            hello(2),
            Frame::Page {
                index: 1,
                encoding: PageEncoding::Zero,
                payload: b"x",
            },
        ],
        pv,
        |e| matches!(e, E::BadPagePayload { page: 1, .. }),
    );

    // Switchover: before every page arrived, without device state, naming the wrong rounds.
    expect_rejected(
        3,
        &[
            hello(3),
            raw(0, &page),
            zero(2),
            Frame::RoundEnd { round: 1, pages: 2 },
            Frame::DeviceState(b"cpu"),
            Frame::Switchover {
                rounds: 1,
                digest_follows: true,
            },
        ],
        pv,
        |e| matches!(e, E::BadPagePayload { page: 1, .. }),
    );
    expect_rejected(
        1,
        &[
            hello(1),
            zero(0),
            Frame::RoundEnd { round: 1, pages: 1 },
            Frame::Switchover {
                rounds: 1,
                digest_follows: true,
            },
        ],
        pv,
        unexpected(FrameKind::Switchover),
    );
    expect_rejected(
        1,
        &[
            hello(1),
            zero(0),
            Frame::RoundEnd { round: 1, pages: 1 },
            Frame::DeviceState(b"cpu"),
            Frame::Switchover {
                rounds: 2,
                digest_follows: true,
            },
        ],
        pv,
        |e| matches!(e, E::RoundMismatch { round: 2, .. }),
    );

    // Other geometries and versions.
    let incompatible = |e: &E| matches!(e, E::Incompatible(_));
    let ic = AbortCode::Incompatible;
    expect_rejected(2, &[hello(3)], ic, incompatible);
    expect_rejected(
        2,
        &[Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            page_shift: 13,
            page_count: 1,
            features: 0,
        })],
        ic,
        incompatible,
    );
    expect_rejected(
        2,
        &[Frame::Hello(Hello {
            version: PROTOCOL_VERSION + 1,
            page_shift: 12,
            page_count: 2,
            features: 0,
        })],
        ic,
        incompatible,
    );
    expect_rejected(
        2,
        &[Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            page_shift: 12,
            page_count: 2,
            features: 1,
        })],
        ic,
        incompatible,
    );

    // And the same stream in order is accepted: the rejections above are about order.
    let geometry = Geometry::new(PageSize::DEFAULT, 2).unwrap();
    let mut rx = Receiver::new(geometry, ReceiverConfig::default());
    let mut host = DestHost::new(2);
    let mut out = Vec::new();
    let bytes = encode(&[
        hello(2),
        raw(0, &page),
        zero(1),
        Frame::RoundEnd { round: 1, pages: 2 },
        Frame::DeviceState(b"cpu"),
        Frame::Switchover {
            rounds: 1,
            digest_follows: true,
        },
    ]);
    assert_eq!(
        rx.receive(Nanos::ZERO, &bytes, &mut host, &mut out),
        Ok(bytes.len())
    );
    assert_eq!(rx.status(), ReceiverStatus::Running);
    assert_eq!(parse_replies(&out), [Reply::Accept, Reply::Ready]);
    assert_eq!(&host.mem[..PAGE], &page[..]);
    assert!(host.mem[PAGE..].iter().all(|&b| b == 0));
    assert_eq!(host.restored.as_deref(), Some(&b"cpu"[..]));
}

#[test]
fn source_rejects_frames_out_of_order() {
    let sc = quiet_scenario(4);
    let geometry = Geometry::new(PageSize::DEFAULT, 4).unwrap();
    let start = |guest: &mut SourceHost| {
        let mut source = PreCopySource::new(geometry, PreCopyConfig::default());
        let mut out = Vec::new();
        assert_eq!(
            source.poll(Nanos::ZERO, guest, &mut out),
            Ok(Poll::WaitForPeer)
        );
        source
    };

    // A Ready while waiting for the accept.
    let mut guest = SourceHost::new(&sc);
    let mut source = start(&mut guest);
    let mut out = Vec::new();
    let err = source
        .receive(Nanos(1), &encode(&[Frame::Ready]), &mut guest, &mut out)
        .unwrap_err();
    assert!(
        matches!(
            err,
            MigrationError::UnexpectedFrame {
                got: FrameKind::Ready,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        parse_replies(&out),
        [Reply::Abort(AbortCode::ProtocolViolation)]
    );
    assert!(source.is_finished());

    // A page sent back to the source.
    let mut guest = SourceHost::new(&sc);
    let mut source = start(&mut guest);
    let mut out = Vec::new();
    let err = source
        .receive(Nanos(1), &encode(&[zero(0)]), &mut guest, &mut out)
        .unwrap_err();
    assert!(
        matches!(
            err,
            MigrationError::UnexpectedFrame {
                got: FrameKind::Page,
                ..
            }
        ),
        "{err:?}"
    );

    // An accept of another protocol version.
    let mut guest = SourceHost::new(&sc);
    let mut source = start(&mut guest);
    let mut out = Vec::new();
    let accept = encode(&[Frame::Accept {
        version: PROTOCOL_VERSION + 1,
        features: 0,
    }]);
    let err = source
        .receive(Nanos(1), &accept, &mut guest, &mut out)
        .unwrap_err();
    assert!(matches!(err, MigrationError::Incompatible(_)), "{err:?}");
    assert_eq!(parse_replies(&out), [Reply::Abort(AbortCode::Incompatible)]);
    assert_eq!(guest.reads, 0);

    // Garbage from the destination.
    let mut guest = SourceHost::new(&sc);
    let mut source = start(&mut guest);
    let mut out = Vec::new();
    let mut bad = encode(&[Frame::Accept {
        version: PROTOCOL_VERSION,
        features: 0,
    }]);
    bad[9] ^= 1;
    let err = source
        .receive(Nanos(1), &bad, &mut guest, &mut out)
        .unwrap_err();
    assert!(
        matches!(err, MigrationError::Frame(WireError::BadChecksum { .. })),
        "{err:?}"
    );
    assert_eq!(parse_replies(&out), [Reply::Abort(AbortCode::BadFrame)]);
    assert_eq!(source.report().bytes_sent, {
        let mut hello_len = Vec::new();
        hello(4).emit(&mut hello_len);
        (hello_len.len() + out.len()) as u64
    });
}
