//! A virtual-time simulator: the same core engine that runs over TCP, driven by a virtual
//! clock, a link model, a CPU cost model, a workload model and a content model.
//!
//! Nothing here is specific to a strategy: the simulator implements the core's host traits
//! ([`SimGuest`] on the source, [`SimDestination`] on the destination) and moves the engine's
//! bytes over a modelled link, so every strategy and option the core offers runs here with no
//! code of its own. The guest keeps writing while frames are in flight; downtime and the other
//! metrics are the engine's own report, measured on the virtual clock exactly as the real
//! driver measures them on a real one.
//!
//! Guest memory is never stored: a page's bytes are a function of the seed, the page and how
//! many times it was written ([`content`]), so a 1 TiB guest costs memory only for its
//! bitmaps and for the pages the workload touches.
//!
//! Modules: [`workload`] (write patterns), [`content`] (page contents), [`codec`] (the real page
//! codecs on the simulated pages, their CPU time modelled).

pub mod codec;
pub mod content;
pub mod workload;

use std::collections::{HashMap, VecDeque};

use memferry::bitmap::DirtyBitmap;
use memferry::drive::{self, Link, LinkEvent};
use memferry::error::HostError;
use memferry::memory::{DestinationGuest, DirtyLog, PageRead, PageWrite, SourceGuest};
use memferry::page::{Geometry, PageIndex, PageSize};
use memferry::page::{MemoryLayout, Region};
use memferry::receive::{Destination, DestinationConfig, DestinationStatus};
use memferry::report::MigrationReport;
use memferry::session::Source;
use memferry::strategy::PreCopyConfig;
use memferry::time::{ByteRate, Nanos};
use memferry::wire;
use serde::{Deserialize, Serialize};

pub use codec::{CodecFigures, CodecModel, SimCodec};
pub use content::ContentModel;
pub use workload::{WorkloadModel, WriteGenerator};

/// The link between the hosts.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LinkModel {
    /// Bandwidth.
    pub bandwidth: ByteRate,
    /// One-way latency.
    pub latency: Nanos,
    /// Bytes each frame costs beyond its own (e.g. amortised TCP/IP headers).
    pub per_frame_overhead: u32,
}

impl Default for LinkModel {
    /// 10 Gbit/s, 50 µs one way, no per-frame overhead.
    fn default() -> Self {
        LinkModel {
            bandwidth: ByteRate::from_bits_per_sec(10_000_000_000),
            latency: Nanos::from_micros(50),
            per_frame_overhead: 0,
        }
    }
}

/// What per-page work costs, as throughputs and per-page times. Defaults are round figures from
/// this project's benches on a 2-core machine: copying pages ~10 GB/s, xxh3 ~20 GB/s, zero
/// scans ~20 GB/s; a predictor's update per dirty page: history 6 ns, LRU 7 ns, WSClock 12 ns,
/// splay tree 110 ns (`cargo bench -p memferry-benches --bench predictors`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct CpuModel {
    /// Copying page bytes (read on the source, write on the destination).
    pub copy: ByteRate,
    /// Checksumming frame bytes (each side).
    pub checksum: ByteRate,
    /// Scanning a page for zeroes.
    pub zero_scan: ByteRate,
    /// A predictor's update per dirty page, in nanoseconds, by predictor name.
    pub predictor_ns_per_dirty_page: [(&'static str, u64); 4],
}

impl CpuModel {
    /// What observing `dirty_pages` costs the predictor called `name` (nothing for "none").
    pub fn predictor_cost(&self, name: &str, dirty_pages: u64) -> Nanos {
        let ns = self
            .predictor_ns_per_dirty_page
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, ns)| *ns);
        Nanos(ns.saturating_mul(dirty_pages))
    }
}

impl Default for CpuModel {
    fn default() -> Self {
        CpuModel {
            copy: ByteRate(10_000_000_000),
            checksum: ByteRate(20_000_000_000),
            zero_scan: ByteRate(20_000_000_000),
            predictor_ns_per_dirty_page: [
                ("history", 6),
                ("lru", 7),
                ("wsclock", 12),
                ("splay", 110),
            ],
        }
    }
}

/// One simulated migration: everything that decides its outcome.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Scenario {
    /// Guest memory in bytes.
    pub memory: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// Who writes what.
    pub workload: WorkloadModel,
    /// What the pages hold.
    pub content: ContentModel,
    /// The link.
    pub link: LinkModel,
    /// The CPU cost model.
    pub cpu: CpuModel,
    /// Seed of contents and writes.
    pub seed: u64,
    /// The engine's settings.
    #[serde(skip)]
    pub engine: PreCopyConfig,
    /// Check the destination's digest (8 bytes per page on the destination, and a read of the
    /// whole guest on the source after switchover, charged to resume time).
    pub verify: bool,
    /// How long the guest runs before migration starts (lets phase workloads settle).
    pub warmup: Nanos,
    /// Give up after this much virtual time.
    pub time_limit: Nanos,
    /// The page codec (`--codec`): the real encoders on the simulated pages.
    #[serde(skip_serializing_if = "CodecModel::is_none")]
    pub codec: CodecModel,
    /// The destination holds the image of another VM of the same application (the same
    /// content model under another seed, every page unwritten) and announces it hash-first
    /// (paper 000): round 1 sends the pages shared with it as hashes.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sibling_image: bool,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            memory: 1 << 30,
            page_size: 4096,
            workload: WorkloadModel::HotCold {
                rate: 200_000.0,
                hot_fraction: 0.05,
                hot_share: 0.9,
            },
            content: ContentModel::default(),
            link: LinkModel::default(),
            cpu: CpuModel::default(),
            seed: 1,
            engine: PreCopyConfig::default(),
            verify: true,
            warmup: Nanos::ZERO,
            time_limit: Nanos::from_secs(3600),
            codec: CodecModel::default(),
            sibling_image: false,
        }
    }
}

/// The source guest of a simulation.
pub struct SimGuest {
    geometry: Geometry,
    content: ContentModel,
    seed: u64,
    /// For each page written at least once: how many writes (its version), and when the last
    /// one was (for the oracle's final working set). One map, one lookup per write.
    written: HashMap<u64, (u32, Nanos)>,
    dirty: DirtyBitmap,
    writer: WriteGenerator,
    paused: bool,
    pages_read: u64,
    pages_scanned: u64,
    /// Dirty pages the dirty log reported (each costs the predictor an update).
    dirty_reported: u64,
    /// The migration throttles the guest to this percent of its time taken away.
    throttle: u8,
    /// The guest's own clock: it runs slower than virtual time while throttled.
    guest_time: Nanos,
}

impl SimGuest {
    /// A guest of `scenario`.
    pub fn new(scenario: &Scenario) -> Result<Self, String> {
        let geometry = scenario_geometry(scenario)?;
        Ok(SimGuest {
            geometry,
            content: scenario.content,
            seed: scenario.seed,
            written: HashMap::new(),
            dirty: DirtyBitmap::new(geometry.page_count()),
            writer: WriteGenerator::try_new(
                scenario.workload.clone(),
                geometry.page_count(),
                scenario.seed,
            )?,
            paused: false,
            pages_read: 0,
            pages_scanned: 0,
            dirty_reported: 0,
            throttle: 0,
            guest_time: Nanos::ZERO,
        })
    }

    /// Lets the guest run from `from` to `to` (nothing happens while paused; a throttled guest
    /// gets only its share of the time).
    pub fn run(&mut self, from: Nanos, to: Nanos) {
        if self.paused || to <= from {
            return;
        }
        if self.guest_time == Nanos::ZERO {
            self.guest_time = from;
        }
        let share = 100 - u64::from(self.throttle.min(100));
        let start = self.guest_time;
        let end = start + Nanos(((to - from).0 as u128 * share as u128 / 100) as u64);
        self.guest_time = end;
        let (written, dirty) = (&mut self.written, &mut self.dirty);
        self.writer.advance(start, end, |page| {
            let entry = written.entry(page).or_insert((0, to));
            *entry = (entry.0 + 1, to);
            dirty.set(page);
        });
    }

    /// Writes made so far.
    pub fn writes(&self) -> u64 {
        self.writer.writes()
    }

    /// Distinct pages written so far.
    pub fn pages_written(&self) -> usize {
        self.written.len()
    }

    /// The version (writes so far) of `page`.
    pub fn version(&self, page: u64) -> u32 {
        self.written.get(&page).map_or(0, |&(version, _)| version)
    }

    /// Distinct pages last written after `since`.
    pub fn written_since(&self, since: Nanos) -> u64 {
        self.written.values().filter(|&&(_, t)| t > since).count() as u64
    }

    /// Pages read, pages scanned and dirty pages reported since the last call, for the CPU
    /// model.
    fn take_work(&mut self) -> (u64, u64, u64) {
        let work = (self.pages_read, self.pages_scanned, self.dirty_reported);
        self.pages_read = 0;
        self.pages_scanned = 0;
        self.dirty_reported = 0;
        work
    }
}

fn scenario_geometry(scenario: &Scenario) -> Result<Geometry, String> {
    let size = PageSize::new(scenario.page_size).map_err(|e| e.to_string())?;
    Geometry::for_memory(size, scenario.memory).map_err(|e| e.to_string())
}

impl PageRead for SimGuest {
    fn read_page(&mut self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError> {
        let version = self.version(page.0);
        self.content.fill(self.seed, page.0, version, buf);
        self.pages_read += 1;
        self.pages_scanned += 1;
        Ok(())
    }

    fn is_known_zero(&mut self, page: PageIndex) -> bool {
        // Like a hypervisor that knows which memory the guest never touched.
        self.version(page.0) == 0 && self.content.is_zero(self.seed, page.0, 0)
    }
}

impl DirtyLog for SimGuest {
    fn sync_region(
        &mut self,
        _region: &Region,
        _first_page: u64,
        into: &mut DirtyBitmap,
    ) -> Result<(), HostError> {
        // One region covering the guest (a trace reads as one region too).
        self.dirty_reported += self.dirty.count_ones();
        into.union_with(&self.dirty);
        self.dirty.clear();
        Ok(())
    }
}

impl SourceGuest for SimGuest {
    fn pause(&mut self) -> Result<(), HostError> {
        self.paused = true;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), HostError> {
        self.paused = false;
        Ok(())
    }
    fn throttle(&mut self, percent: u8) -> Result<(), HostError> {
        self.throttle = percent.min(99);
        Ok(())
    }
    fn save_state(&mut self) -> Result<Vec<u8>, HostError> {
        Ok(b"simulated vCPU and device state".to_vec())
    }
}

/// The destination of a simulation: counts what it is given; the receiver's digest checks it.
/// With a codec whose pages decode onto what the destination holds (deltas, references), it
/// keeps the pages written (all-zero ones as nothing) and reads them back
/// ([`DestinationGuest::read_back`]); otherwise it keeps nothing.
#[derive(Default)]
pub struct SimDestination {
    pages_written: u64,
    started: bool,
    pages: Option<HashMap<u64, Box<[u8]>>>,
}

impl SimDestination {
    /// A destination that keeps its pages to read them back.
    pub fn keeping_pages() -> Self {
        SimDestination {
            pages: Some(HashMap::new()),
            ..SimDestination::default()
        }
    }
}

impl PageWrite for SimDestination {
    fn write_page(&mut self, page: PageIndex, data: &[u8]) -> Result<(), HostError> {
        self.pages_written += 1;
        if let Some(pages) = &mut self.pages {
            match pages.get_mut(&page.0) {
                Some(held) if held.len() == data.len() => held.copy_from_slice(data),
                _ => {
                    pages.insert(page.0, data.into());
                }
            }
        }
        Ok(())
    }
    fn write_zero_page(&mut self, page: PageIndex, _zeroes: &[u8]) -> Result<(), HostError> {
        self.pages_written += 1;
        if let Some(pages) = &mut self.pages {
            pages.remove(&page.0);
        }
        Ok(())
    }
}

impl DestinationGuest for SimDestination {
    fn restore_state(&mut self, _state: &[u8]) -> Result<(), HostError> {
        Ok(())
    }
    fn start(&mut self) -> Result<(), HostError> {
        self.started = true;
        Ok(())
    }
    fn read_back(&mut self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError> {
        let Some(pages) = &self.pages else {
            return Err(HostError::new(
                "this simulated destination keeps no pages (no codec needs them)",
            ));
        };
        // A page never written is still the zero page the destination's memory starts as.
        match pages.get(&page.0) {
            Some(held) if held.len() == buf.len() => buf.copy_from_slice(held),
            Some(_) => return Err(HostError::new("a page of another size")),
            None => buf.fill(0),
        }
        Ok(())
    }
}

/// The image of a sibling VM (same application, another seed) the destination holds.
struct SiblingImage {
    content: ContentModel,
    seed: u64,
    pages: u64,
}

impl memferry::hashfirst::ContentSource for SiblingImage {
    fn page_count(&self) -> u64 {
        self.pages
    }
    fn read_content(&mut self, index: u64, buf: &mut [u8]) -> Result<(), HostError> {
        self.content.fill(self.seed, index, 0, buf);
        Ok(())
    }
}

/// The seed of the sibling VM whose image the destination holds.
pub fn sibling_seed(seed: u64) -> u64 {
    seed ^ 0x5eed_0f51_b11e_0001
}

/// Bounds no strategy can beat on this workload and link: they depend on the scenario alone,
/// never on how a run went, so every strategy is held to the same ones.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LowerBounds {
    /// Memory sent once: every page once, with the pages that start zero and the duplicates
    /// of an earlier page's content as bare entry headers.
    pub least_bytes: u64,
    /// A round trip: the switchover must reach the destination and its answer come back.
    /// (Milestone 1 reported the final writable working set of the run's own last moments
    /// here, which depended on the run: a predictor's run could show a "bound" above plain
    /// pre-copy's achieved downtime. That figure is `oracle_downtime` now.)
    pub least_downtime: Nanos,
    /// Not a bound: this run's oracle, the pages written in the last moments before this run's
    /// pause (a window no longer than its final push round or its stop-and-copy) over the
    /// bandwidth, plus a round trip. Depends on the run; shown to compare a run with what its
    /// own final working set allowed.
    pub oracle_downtime: Nanos,
}

/// One analytic model's figures for a run, beside the simulated ones, and how far off they are.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrediction {
    /// Predicted total migration time: the model's rounds, plus the verification the scenario
    /// asks for ([`ModelFigures::verification`]).
    pub total_time: Nanos,
    /// Predicted downtime (`None`: the model does not predict it).
    pub downtime: Option<Nanos>,
    /// Predicted rounds, stop-and-copy included.
    pub rounds: Option<u32>,
    /// Predicted bytes on the wire.
    pub bytes: Option<u64>,
    /// The model's error on total time against the simulated run, signed, in percent of the
    /// simulated figure, to 0.01 (`None` when the run took no time).
    pub total_time_error_pct: Option<f64>,
    /// The same for downtime (`None` when the model does not predict it or the run had none).
    pub downtime_error_pct: Option<f64>,
}

/// The signed error of `predicted` against `simulated`, in percent of `simulated`, rounded to
/// 0.01 (a value that survives a trip through JSON exactly); `None` if `simulated` is zero.
pub fn error_pct(predicted: Nanos, simulated: Nanos) -> Option<f64> {
    (simulated > Nanos::ZERO).then(|| {
        let error = (predicted.0 as f64 - simulated.0 as f64) / simulated.0 as f64 * 100.0;
        (error * 100.0).round() / 100.0
    })
}

impl ModelPrediction {
    /// A model's figures with their errors against `report`.
    pub fn new(
        total_time: Nanos,
        downtime: Option<Nanos>,
        rounds: Option<u32>,
        bytes: Option<u64>,
        report: &MigrationReport,
    ) -> Self {
        ModelPrediction {
            total_time,
            downtime,
            rounds,
            bytes,
            total_time_error_pct: error_pct(total_time, report.total_time),
            downtime_error_pct: downtime.and_then(|d| error_pct(d, report.downtime)),
        }
    }
}

/// The analytic models' figures for a run, to print beside the simulated ones so a researcher
/// sees where a model is wrong (each with its error against the run). They predict plain
/// pre-copy: a predictor's run differs from them by what the predictor changed, and neither a
/// rate plan nor throttling is modelled.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFigures {
    /// The dirty rate fed to Clark's series: round 1's, in memory bytes per second.
    pub dirty_rate: ByteRate,
    /// The verification every model's total time includes (and its downtime too, with
    /// `verify_before_start`): reading and hashing all of memory at the CPU model's copy and
    /// checksum rates; zero when the run does not verify. No model predicts it; it is there so
    /// that total times compare like with like.
    pub verification: Nanos,
    /// Clark's geometric series (paper 002), fed round 1's measured dirty rate: every page at
    /// full size, a constant dirty rate.
    pub clark: ModelPrediction,
    /// Paper 000's Tmig with Vprof = 0, Vckpt = round 1's bytes, Vdp = the later rounds' bytes
    /// (fed this run's measured bytes; total time only).
    pub paper000: ModelPrediction,
    /// Akoush et al.'s model fed the workload's dirty sets (distinct pages written in each
    /// predicted round's window, read from the workload itself at the window's position), with
    /// the pages that start all-zero sent as bare headers in round 1, the link or the source's
    /// CPU (whichever is slower) as the rate, and a round trip in the downtime.
    pub dirty_set_curve: ModelPrediction,
}

/// What a simulation produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimOutcome {
    /// The engine's report, on the virtual clock.
    pub report: MigrationReport,
    /// Lower bounds for this run.
    pub bounds: LowerBounds,
    /// The analytic models' figures.
    pub models: ModelFigures,
    /// Writes the guest made before the pause.
    pub writes: u64,
    /// Distinct pages it wrote.
    pub pages_written: u64,
    /// With a codec or a sibling image: what each content mechanism saved and the CPU the
    /// codec cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codec: Option<CodecFigures>,
}

/// Runs `scenario` to completion in virtual time.
pub fn simulate(scenario: &Scenario) -> Result<SimOutcome, String> {
    simulate_with_progress(scenario, |_| {})
}

/// [`simulate`], calling `on_round` with each round as it ends (for progress on long runs).
pub fn simulate_with_progress(
    scenario: &Scenario,
    mut on_round: impl FnMut(&memferry::report::RoundReport),
) -> Result<SimOutcome, String> {
    let mut guest = SimGuest::new(scenario)?;
    let geometry = guest.geometry;
    guest.run(Nanos::ZERO, scenario.warmup);
    let engine_config = PreCopyConfig {
        verify: scenario.verify && scenario.engine.verify,
        ..scenario.engine
    };
    let layout = MemoryLayout::single(geometry);
    let mut engine = Source::pre_copy(layout.clone(), engine_config);
    let work = codec::SharedWork::default();
    let encoder = codec::MeteredEncoder::new(
        &scenario.codec,
        0,
        scenario.page_size as usize,
        scenario.link.bandwidth,
        work.clone(),
    )?;
    if let Some(encoder) = encoder {
        engine = engine.with_encoder(Box::new(encoder));
    }
    let mut receiver = Destination::new(
        layout,
        DestinationConfig {
            verify: scenario.verify,
            ..DestinationConfig::default()
        },
    );
    if !scenario.codec.is_none() {
        for decoder in codec::destination_decoders() {
            receiver = receiver.with_decoder(decoder);
        }
    }
    if scenario.sibling_image {
        receiver = receiver.with_content(Box::new(SiblingImage {
            content: scenario.content,
            seed: sibling_seed(scenario.seed),
            pages: geometry.page_count(),
        }));
    }
    let mut link = SimLink::new(scenario, receiver);
    if scenario.codec.codec.needs_read_back() {
        link.destination = SimDestination::keeping_pages();
    }
    if !scenario.codec.is_none() {
        link.codec_work = Some(work.clone());
    }
    let driven = drive::drive_source(&mut engine, &mut guest, &mut link, &mut on_round);
    if let Err(failure) = driven {
        return Err(match failure.transport {
            Some(why) => why,
            None => failure.error.to_string(),
        });
    }
    if let Some(e) = guest.writer.error() {
        return Err(format!("the workload's trace failed: {e}"));
    }
    if scenario.verify && link.receiver.status() != DestinationStatus::Complete {
        return Err("the destination did not complete".into());
    }
    let report = engine.report().clone();
    let classes = ContentClasses::of(scenario, geometry);
    let bounds = LowerBounds {
        oracle_downtime: oracle_downtime(scenario, &guest, &report),
        ..scenario_bounds(scenario, geometry, &classes)
    };
    let models = model_figures(scenario, &report, geometry, classes.zero);
    let codec = (!scenario.codec.is_none() || scenario.sibling_image).then(|| {
        let cpu = work.lock().expect("codec work lock").total;
        CodecFigures::new(
            scenario.codec.codec,
            &report.encodings,
            scenario.page_size,
            cpu,
        )
    });
    Ok(SimOutcome {
        report,
        bounds,
        models,
        writes: guest.writes(),
        pages_written: guest.pages_written() as u64,
        codec,
    })
}

/// The simulator's [`Link`]: a modelled link to a destination engine, in virtual time.
///
/// - Producing a batch costs the source's CPU (copying and scanning its pages, checksumming,
///   and the predictor's update for pages the dirty log reported); the guest runs meanwhile.
/// - The link sends buffers one after another at its bandwidth (plus a per-frame overhead).
///   Output goes in buffers of at most [`SimLink::CHUNK`] bytes (a stream is pipelined: the
///   destination applies the first bytes while the last are produced), and at most two
///   batches' worth is in flight, as in the real driver; a buffer is free (delivered) once the
///   link has carried it and the destination has taken it.
/// - The destination engine applies a batch when it arrives (one latency later) and has spent
///   its CPU on it; its replies reach the source one latency after that.
pub struct SimLink {
    now: Nanos,
    link: LinkModel,
    cpu: CpuModel,
    predictor: &'static str,
    page_size: u64,
    time_limit: Nanos,
    buffer: Vec<u8>,
    /// Buffers in flight at most.
    buffers: usize,
    /// When the link has carried everything handed to it so far.
    link_free_at: Nanos,
    /// When the destination has applied everything that reached it so far.
    destination_free_at: Nanos,
    /// Batches in flight: (when their buffer is free again, bytes).
    deliveries: VecDeque<(Nanos, u64)>,
    /// Replies on their way to the source: (arrival, bytes).
    replies: VecDeque<(Nanos, Vec<u8>)>,
    receiver: Destination,
    destination: SimDestination,
    /// Bytes that reached the destination but do not yet make a whole frame.
    inbox: Vec<u8>,
    /// The destination's first error, reported to the source's loop as a broken link.
    failure: Option<String>,
    /// The codec's CPU time not yet charged (with a codec).
    codec_work: Option<codec::SharedWork>,
}

impl SimLink {
    /// The largest buffer the engine fills at once.
    pub const CHUNK: usize = 256 << 10;

    /// The buffer size and how many buffers may be in flight: two batches' worth.
    fn buffers(scenario: &Scenario) -> (usize, usize) {
        let page_frame = wire::page_frame_len(scenario.page_size as usize);
        let batch = scenario.engine.batch_bytes.max(page_frame);
        let chunk = batch.min(Self::CHUNK).max(page_frame);
        (chunk, (2 * batch).div_ceil(chunk).max(2))
    }

    /// The most bytes in flight on the link.
    fn in_flight(scenario: &Scenario) -> usize {
        let (chunk, buffers) = Self::buffers(scenario);
        chunk * buffers
    }

    fn new(scenario: &Scenario, receiver: Destination) -> Self {
        let (chunk, buffers) = Self::buffers(scenario);
        SimLink {
            buffers,
            now: scenario.warmup,
            link: scenario.link,
            cpu: scenario.cpu,
            predictor: scenario.engine.predictor.name(),
            page_size: scenario.page_size,
            time_limit: scenario.time_limit,
            buffer: vec![0; chunk],
            link_free_at: Nanos::ZERO,
            destination_free_at: Nanos::ZERO,
            deliveries: VecDeque::new(),
            replies: VecDeque::new(),
            receiver,
            destination: SimDestination::default(),
            inbox: Vec::new(),
            failure: None,
            codec_work: None,
        }
    }

    /// Moves virtual time to `t`; the guest runs meanwhile.
    fn advance(&mut self, guest: &mut SimGuest, t: Nanos) {
        if t > self.now {
            guest.run(self.now, t);
            self.now = t;
        }
    }

    /// The destination applies `len` bytes of the buffer that arrive at `arrival`.
    fn deliver(&mut self, arrival: Nanos, len: usize, pages: u64, decode: Nanos) -> Nanos {
        let receive_cpu = self.cpu.checksum.time_for(len as u64)
            + self.cpu.copy.time_for(pages * self.page_size)
            + decode;
        let applied = arrival.max(self.destination_free_at) + receive_cpu;
        self.destination_free_at = applied;
        let bytes = &self.buffer[..len];
        let mut replies = Vec::new();
        let result = if self.inbox.is_empty() {
            // Whole frames go straight from the buffer; only a frame cut between two batches
            // waits in `inbox`.
            self.receiver
                .receive(applied, bytes, &mut self.destination, &mut replies)
                .map(|used| self.inbox.extend_from_slice(&bytes[used..]))
        } else {
            self.inbox.extend_from_slice(bytes);
            self.receiver
                .receive(applied, &self.inbox, &mut self.destination, &mut replies)
                .map(|used| {
                    self.inbox.drain(..used);
                })
        };
        if let Err(e) = result {
            self.failure
                .get_or_insert(format!("the destination failed: {e}"));
        }
        if !replies.is_empty() {
            self.replies
                .push_back((applied + self.link.latency, replies));
        }
        applied
    }
}

impl Link<SimGuest> for SimLink {
    type Error = String;

    fn now(&mut self) -> Nanos {
        self.now
    }

    fn channels(&self) -> u16 {
        1
    }

    fn buffer(&mut self, _channel: u16) -> Option<&mut [u8]> {
        (self.deliveries.len() < self.buffers).then_some(self.buffer.as_mut_slice())
    }

    fn send(&mut self, guest: &mut SimGuest, _channel: u16, len: usize) {
        // The source's CPU produced the batch while the guest ran.
        let (pages, scanned, dirty) = guest.take_work();
        // The codec encoded this batch's pages (and the destination will decode them).
        let (encode, decode) = match &self.codec_work {
            Some(work) => {
                let mut w = work.lock().expect("codec work lock");
                let taken = (w.pending_encode, w.pending_decode);
                w.pending_encode = Nanos::ZERO;
                w.pending_decode = Nanos::ZERO;
                taken
            }
            None => (Nanos::ZERO, Nanos::ZERO),
        };
        let produce = self.cpu.copy.time_for(pages * self.page_size)
            + self.cpu.zero_scan.time_for(scanned * self.page_size)
            + self.cpu.checksum.time_for(len as u64)
            + self.cpu.predictor_cost(self.predictor, dirty)
            + encode;
        self.advance(guest, self.now + produce);
        if len == 0 {
            return;
        }
        let frames = count_frames(&self.buffer[..len]);
        let wire_bytes = len as u64 + frames * self.link.per_frame_overhead as u64;
        let carried = self.now.max(self.link_free_at) + self.link.bandwidth.time_for(wire_bytes);
        self.link_free_at = carried;
        let applied = self.deliver(carried + self.link.latency, len, pages, decode);
        // The buffer is free once the destination took the bytes (TCP's window): a destination
        // slower than the link holds the source back.
        self.deliveries
            .push_back((carried.max(applied - self.link.latency), len as u64));
    }

    fn wait(&mut self, guest: &mut SimGuest, deadline: Option<Nanos>) -> LinkEvent<String> {
        if let Some(why) = self.failure.take() {
            return LinkEvent::Closed {
                channel: 0,
                error: Some(why),
            };
        }
        if self.now > self.time_limit {
            return LinkEvent::Closed {
                channel: 0,
                error: Some(format!(
                    "no completion within {} of virtual time",
                    self.time_limit
                )),
            };
        }
        let delivery = self.deliveries.front().map(|d| d.0);
        let reply = self.replies.front().map(|r| r.0);
        let next = match (delivery, reply) {
            (Some(d), Some(r)) => Some(d.min(r)),
            (d, r) => d.or(r),
        };
        match (next, deadline) {
            (Some(t), Some(d)) if d < t => {
                self.advance(guest, d);
                LinkEvent::Idle
            }
            (Some(t), _) => {
                self.advance(guest, t);
                if delivery == Some(t) {
                    let (_, bytes) = self.deliveries.pop_front().expect("a delivery is due");
                    LinkEvent::Delivered { bytes }
                } else {
                    let (_, bytes) = self.replies.pop_front().expect("a reply is due");
                    LinkEvent::Received { channel: 0, bytes }
                }
            }
            (None, Some(d)) => {
                self.advance(guest, d);
                LinkEvent::Idle
            }
            (None, None) => LinkEvent::Closed {
                channel: 0,
                error: Some("the engine waits for a reply that will never come".into()),
            },
        }
    }

    fn sending(&self) -> bool {
        !self.deliveries.is_empty()
    }
}

fn model_figures(
    scenario: &Scenario,
    report: &MigrationReport,
    geometry: Geometry,
    zero_pages: u64,
) -> ModelFigures {
    use crate::model::{HybridModel, PreCopyModel, WireCost};
    let page_size = geometry.page_size().bytes() as u64;
    let memory = geometry.memory_bytes();
    let first = report.rounds.first();
    let dirty_rate = first.map_or(ByteRate(0), |r| {
        ByteRate::measured(r.dirty_pages * page_size, r.duration)
    });
    let bandwidth = scenario.link.bandwidth;
    let cpu = &scenario.cpu;
    let verify = scenario.verify && scenario.engine.verify;
    let verification = if verify {
        cpu.copy.time_for(memory) + cpu.checksum.time_for(memory)
    } else {
        Nanos::ZERO
    };
    let in_downtime = if scenario.engine.verify_before_start {
        verification
    } else {
        Nanos::ZERO
    };
    let clark = PreCopyModel::new(memory, dirty_rate, bandwidth)
        .with_stop_rules(&scenario.engine.stop)
        .with_wire(WireCost::memferry(geometry.page_size()))
        .predict();
    // The source reads, scans and checksums every page it sends: a link faster than that
    // waits for the CPU.
    let cpu_rate = ByteRate::measured(
        page_size,
        cpu.copy.time_for(page_size)
            + cpu.zero_scan.time_for(page_size)
            + cpu.checksum.time_for(page_size),
    );
    let rate = if cpu_rate.0 > 0 && cpu_rate < bandwidth {
        cpu_rate
    } else {
        bandwidth
    };
    let round_trip = scenario.link.latency + scenario.link.latency;
    let curve = PreCopyModel::new(memory, dirty_rate, rate)
        .with_stop_rules(&scenario.engine.stop)
        .with_wire(WireCost::memferry(geometry.page_size()))
        .with_in_flight(SimLink::in_flight(scenario) as u64)
        .predict_from_dirty_sets(
            &mut WorkloadHistory::new(scenario, geometry),
            page_size,
            zero_pages,
        );
    let first_bytes = first.map_or(0, |r| r.bytes);
    let later_bytes: u64 = report.rounds.iter().skip(1).map(|r| r.bytes).sum();
    let hybrid = HybridModel {
        v_prof: 0,
        v_ckpt: first_bytes,
        v_dp: later_bytes,
        r_trans1: bandwidth,
        r_trans: bandwidth,
    }
    .predict();
    ModelFigures {
        dirty_rate,
        verification,
        clark: ModelPrediction::new(
            clark.total_time + verification,
            Some(clark.downtime + in_downtime),
            Some(clark.rounds.len() as u32),
            Some(clark.bytes_sent),
            report,
        ),
        paper000: ModelPrediction::new(hybrid.t_mig + verification, None, None, None, report),
        dirty_set_curve: ModelPrediction::new(
            curve.total_time + round_trip + verification,
            Some(curve.downtime + round_trip + in_downtime),
            Some(curve.rounds.len() as u32),
            Some(curve.bytes_sent),
            report,
        ),
    }
}

/// The workload's own writes, read window by window for the dirty-set model: a fresh copy of
/// the workload, brought to where the migration starts, then run through each window the model
/// asks for (the model's windows follow one another; a window that starts where the last one
/// started extends it). No window reaches past the scenario's time limit.
struct WorkloadHistory {
    writer: Option<WriteGenerator>,
    /// Where the migration starts (the end of the warm-up).
    origin: Nanos,
    /// How far the copy has run.
    at: Nanos,
    /// The time limit, from the start.
    end: Nanos,
    /// The last window's start, and the distinct pages written in it so far.
    window: (Nanos, u64),
    seen: DirtyBitmap,
}

impl WorkloadHistory {
    fn new(scenario: &Scenario, geometry: Geometry) -> Self {
        let mut writer = WriteGenerator::try_new(
            scenario.workload.clone(),
            geometry.page_count(),
            scenario.seed,
        )
        .ok();
        if let Some(w) = &mut writer {
            w.advance(Nanos::ZERO, scenario.warmup, |_| {});
        }
        WorkloadHistory {
            writer,
            origin: scenario.warmup,
            at: scenario.warmup,
            end: scenario.warmup + scenario.time_limit,
            window: (Nanos::MAX, 0),
            seen: DirtyBitmap::new(geometry.page_count()),
        }
    }
}

impl crate::model::DirtySets for WorkloadHistory {
    fn pages_written(&mut self, start: Nanos, length: Nanos) -> u64 {
        let Some(writer) = &mut self.writer else {
            return 0;
        };
        let from = (self.origin + start).min(self.end);
        if from != self.window.0 {
            // A new window: forget the last one's pages, skip to its start.
            self.seen.clear();
            let from = from.max(self.at);
            writer.advance(self.at, from, |_| {});
            self.at = from;
            self.window = (from, 0);
        }
        let to = (self.origin + start + length).clamp(self.at, self.end);
        let (seen, mut pages) = (&mut self.seen, self.window.1);
        writer.advance(self.at, to, |page| {
            if !seen.get(page) {
                seen.set(page);
                pages += 1;
            }
        });
        self.at = to;
        self.window.1 = pages;
        pages
    }
}

fn count_frames(bytes: &[u8]) -> u64 {
    let mut at = 0;
    let mut frames = 0;
    while let Ok(Some(len)) = wire::peek_frame_len(&bytes[at..]) {
        at += len;
        frames += 1;
    }
    frames
}

/// How many pages start all-zero, and how many duplicate an earlier page's content.
struct ContentClasses {
    zero: u64,
    duplicates: u64,
}

impl ContentClasses {
    fn of(scenario: &Scenario, geometry: Geometry) -> Self {
        let mut classes = ContentClasses {
            zero: 0,
            duplicates: 0,
        };
        let mut templates_seen = std::collections::HashSet::new();
        for page in 0..geometry.page_count() {
            match scenario.content.class(scenario.seed, page) {
                content::PageClass::Zero => classes.zero += 1,
                content::PageClass::Duplicate(t) if !templates_seen.insert(t) => {
                    classes.duplicates += 1
                }
                _ => {}
            }
        }
        classes
    }
}

impl LowerBounds {
    /// The bounds of `scenario`: they read its guest, contents and link, nothing a strategy
    /// chooses and nothing a run measures (`oracle_downtime`, which needs a run, is zero here).
    pub fn of(scenario: &Scenario) -> Result<LowerBounds, String> {
        let geometry = scenario_geometry(scenario)?;
        Ok(scenario_bounds(
            scenario,
            geometry,
            &ContentClasses::of(scenario, geometry),
        ))
    }
}

fn scenario_bounds(
    scenario: &Scenario,
    geometry: Geometry,
    classes: &ContentClasses,
) -> LowerBounds {
    // Classes of the initial contents: what the workload writes later only costs more.
    let least_bytes = crate::model::least_bytes(
        geometry.page_count(),
        classes.zero,
        classes.duplicates,
        geometry.page_size().bytes() as u64,
        wire::PAGE_ENTRY_LEN as u64,
    );
    LowerBounds {
        least_bytes,
        least_downtime: scenario.link.latency + scenario.link.latency,
        oracle_downtime: Nanos::ZERO,
    }
}

/// This run's oracle: every page written in the last w before the pause must cross the link
/// while the guest is paused, where w is no longer than the last push round (whose writes all
/// land in the final dirty set) nor the stop-and-copy itself.
fn oracle_downtime(scenario: &Scenario, guest: &SimGuest, report: &MigrationReport) -> Nanos {
    let full = guest.geometry.page_size().bytes() as u64 + wire::PAGE_ENTRY_LEN as u64;
    let pause = report.preparation_time + scenario.warmup;
    let push = report
        .rounds
        .iter()
        .rev()
        .find(|r| !r.stop_and_copy)
        .map_or(Nanos::ZERO, |r| r.duration);
    let copy = report.rounds.last().map_or(Nanos::ZERO, |r| r.duration);
    let wws = guest.written_since(pause - push.min(copy));
    let round_trip = scenario.link.latency + scenario.link.latency;
    scenario.link.bandwidth.time_for(wws * full) + round_trip
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(workload: WorkloadModel) -> Scenario {
        Scenario {
            memory: 16 << 20,
            workload,
            link: LinkModel {
                bandwidth: ByteRate(100_000_000),
                ..LinkModel::default()
            },
            ..Scenario::default()
        }
    }

    #[test]
    fn simulation_is_deterministic_and_verified() {
        let s = small(WorkloadModel::HotCold {
            rate: 50_000.0,
            hot_fraction: 0.05,
            hot_share: 0.9,
        });
        let a = simulate(&s).unwrap();
        let b = simulate(&s).unwrap();
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
        assert_eq!(a.report.verified, Some(true));
        assert!(a.report.rounds.len() >= 2);
        assert!(a.writes > 0);
        assert!(
            a.report.bytes_sent >= a.bounds.least_bytes,
            "{} < {}",
            a.report.bytes_sent,
            a.bounds.least_bytes
        );
        assert!(
            a.report.downtime >= a.bounds.least_downtime,
            "{:?} < {:?}",
            a.report.downtime,
            a.bounds.least_downtime
        );
    }

    /// A guest that dirties memory faster than the link carries it: the rounds stop within
    /// two, not after sending memory several times, and the report says why.
    #[test]
    fn an_outpacing_guest_is_stopped_within_two_rounds() {
        let mut s = small(WorkloadModel::Uniform { rate: 200_000.0 });
        s.engine.stop.non_convergence_rounds = 0;
        s.engine.stop.downtime_target = Nanos::from_millis(10);
        let o = simulate(&s).unwrap();
        let r = &o.report;
        assert_eq!(
            r.stop_reason,
            Some(memferry::report::StopReason::NotConverging)
        );
        assert!(r.rounds.len() <= 3, "{} rounds", r.rounds.len());
        assert!(r.bytes_sent < 3 * s.memory, "{} bytes", r.bytes_sent);
        assert!(
            r.stop_detail.contains("against a link of"),
            "{}",
            r.stop_detail
        );
        // With the early rule off, the old rules take longer and send more.
        let mut late = s.clone();
        late.engine.stop.outpaced_rounds = 0;
        late.engine.stop.non_convergence_rounds = 5;
        let l = simulate(&late).unwrap();
        assert!(l.report.bytes_sent > r.bytes_sent);
    }

    /// Throttling (auto-converge) slows the simulated guest until pre-copy converges.
    #[test]
    fn throttling_an_outpacing_guest_lowers_its_downtime() {
        let mut s = small(WorkloadModel::Uniform { rate: 40_000.0 });
        s.engine.stop.non_convergence_rounds = 0;
        s.engine.stop.downtime_target = Nanos::from_millis(20);
        let stopped = simulate(&s).unwrap();
        s.engine.throttle_when_outpaced = true;
        let throttled = simulate(&s).unwrap();
        assert_eq!(stopped.report.throttle_percent, 0);
        assert!(throttled.report.throttle_percent >= 20);
        assert!(
            throttled.report.downtime < stopped.report.downtime,
            "{} vs {}",
            throttled.report.downtime,
            stopped.report.downtime
        );
        assert_eq!(throttled.report.verified, Some(true));
    }

    fn workload() -> impl proptest::strategy::Strategy<Value = WorkloadModel> {
        use proptest::prelude::*;
        prop_oneof![
            (1_000.0f64..300_000.0).prop_map(|rate| WorkloadModel::Uniform { rate }),
            (1_000.0f64..300_000.0, 0.01f64..0.3, 0.5f64..0.99).prop_map(
                |(rate, hot_fraction, hot_share)| WorkloadModel::HotCold {
                    rate,
                    hot_fraction,
                    hot_share
                }
            ),
            (1_000.0f64..300_000.0, 0.5f64..1.5)
                .prop_map(|(rate, exponent)| WorkloadModel::Zipf { rate, exponent }),
            (
                10_000.0f64..300_000.0,
                0.02f64..0.3,
                0.7f64..0.99,
                20u64..2_000
            )
                .prop_map(|(rate, hot_fraction, hot_share, period_ms)| {
                    WorkloadModel::Phases {
                        rate,
                        hot_fraction,
                        hot_share,
                        period: Nanos::from_millis(period_ms),
                    }
                }),
            (1_000.0f64..100_000.0, 0.0f64..0.5, 0.05f64..0.5).prop_map(
                |(rate, start_fraction, length_fraction)| WorkloadModel::Sweep {
                    rate,
                    start_fraction,
                    length_fraction
                }
            ),
        ]
    }

    const SEED: u64 = 2;

    proptest::proptest! {
        // A fixed seed, so CI runs the same 48 cases every time: with it the test fails on
        // the engine without the release rules, and it failed (sweeps a recency predictor got
        // wrong in its first hold round: 26.4 vs 22.3 ms) until an unproven predictor's hold
        // was capped at an eighth of a round, and again (a phases workload whose 41 ms phases
        // round 1's shadow samples saw as stable: 50.9 vs 38.1 ms) until that cap also applied
        // to a predictor right only in shadow. Seeds 2, 4 and 7 pass now.
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 48,
            rng_seed: proptest::test_runner::RngSeed::Fixed(SEED),
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// A predictor never costs downtime: on random workloads and links, every predictor's
        /// stop-and-copy is at most plain pre-copy's, within 2% + 0.2 ms (the noise measured
        /// on the built-in workloads was below 0.03%: pages the guest writes during a short
        /// release round), within the downtime target or not. A pre-copy that does not
        /// converge stops on whichever round its rules fire, so there the bound is the largest
        /// of plain pre-copy's own later dirty sets (a phases workload swung 27% between
        /// plain's rounds).
        #[test]
        fn a_predictor_never_costs_downtime(
            workload in workload(),
            megabytes in 8u64..=32,
            mbit in 100u64..=4_000,
            seed in 0u64..1_000,
            target_ms in 1u64..=50,
        ) {
            let mut base = Scenario {
                memory: megabytes << 20,
                workload,
                link: LinkModel {
                    bandwidth: ByteRate::from_bits_per_sec(mbit * 1_000_000),
                    ..LinkModel::default()
                },
                seed,
                verify: false,
                ..Scenario::default()
            };
            // Several rounds: a tight target, and the slow rules off.
            base.engine.stop.downtime_target = Nanos::from_millis(target_ms);
            base.engine.stop.max_rounds = 12;
            let plain = simulate(&base).unwrap();
            for predictor in ["wsclock", "lru", "history"] {
                let mut s = base.clone();
                s.engine.predictor = memferry::track::PredictorKind::parse(predictor).unwrap();
                let with = simulate(&s).unwrap();
                let (d, p) = (with.report.downtime.0 as f64, plain.report.downtime.0 as f64);
                // A pre-copy that does not converge stops on whichever round the rules fire,
                // and its dirty set swings from round to round: the predictor's stop may not
                // be worse than the worst of plain pre-copy's own last rounds.
                let swing = if plain.report.stop_reason
                    == Some(memferry::report::StopReason::NotConverging)
                {
                    let push = &plain.report.rounds[..plain.report.rounds.len() - 1];
                    let last = push.last().map_or(1, |r| r.dirty_pages.max(1)) as f64;
                    push.iter()
                        .skip(1)
                        .map(|r| r.dirty_pages as f64 / last)
                        .fold(1.0, f64::max)
                } else {
                    1.0
                };
                let allowed = p * swing * 1.02 + 2e5;
                proptest::prop_assert!(
                    d <= allowed,
                    "{predictor}: downtime {} vs plain {} ({:?})",
                    with.report.downtime,
                    plain.report.downtime,
                    base.workload
                );
                // Total time and bytes are not bounded here: on random workloads a predictor's
                // different trajectory can postpone the non-convergence rules (a wrong hold in
                // round 2 shrank the pending set below plain's, a 25 MiB phases guest then ran
                // 8 rounds against 4: downtime 66 vs 80 ms, total 563 vs 332 ms). The results
                // page (scripts/results.sh) checks them on the built-in workloads and traces.
            }
        }
    }

    /// A predictor whose guesses prove wrong in shadow, before it held anything, never holds a
    /// page: the run is plain pre-copy's, round for round. A sequential sweep writes each page
    /// once per pass, so the recency predictors' "hot" pages stay clean (the SQLite trace did
    /// this: holding its guesses cost 1.6 ms of downtime before they were judged in shadow).
    #[test]
    fn a_predictor_wrong_in_shadow_holds_nothing() {
        let mut s = small(WorkloadModel::Sweep {
            rate: 5_000.0,
            start_fraction: 0.0,
            length_fraction: 1.0,
        });
        s.verify = false;
        s.engine.stop.downtime_target = Nanos::from_millis(5);
        let plain = simulate(&s).unwrap().report;
        for predictor in ["wsclock", "lru", "history"] {
            s.engine.predictor = memferry::track::PredictorKind::parse(predictor).unwrap();
            let with = simulate(&s).unwrap().report;
            let held: u64 = with.rounds.iter().map(|r| r.held_back).sum();
            assert_eq!(held, 0, "{predictor} held pages back");
            assert_eq!(with.bytes_sent, plain.bytes_sent, "{predictor}");
            assert_eq!(with.rounds.len(), plain.rounds.len(), "{predictor}");
            assert!(
                with.stop_detail.contains("held no page back"),
                "{predictor}: {}",
                with.stop_detail
            );
            // The shadow's extra dirty-log syncs in round 1 move the rounds by nanoseconds.
            let (d, p) = (with.downtime.0 as f64, plain.downtime.0 as f64);
            assert!((d - p).abs() <= p * 0.001, "{predictor}: {d} vs {p}");
        }
    }

    #[test]
    fn idle_guest_sends_memory_once() {
        let s = small(WorkloadModel::Idle);
        let o = simulate(&s).unwrap();
        assert_eq!(o.report.pages_sent, o.report.page_count);
        assert_eq!(o.report.rounds.len(), 2);
        assert_eq!(o.report.rounds[1].pages, 0);
    }
}
