//! The report as people and scripts read it: a table for the terminal, one progress line per
//! round, and the JSON object whose top-level fields are a contract (`verified`,
//! `total_time_ms`, `downtime_ms`, `bytes_sent`, `pages_sent`, `rounds`, `stop_reason`, …).

use memferry::report::{EncodingUse, MigrationReport, PagesAndBytes, RoundReport};
use memferry::time::{ByteRate, Nanos};
use serde::Serialize;

use crate::sim::workload::{TraceCoverage, TraceSummary};
use crate::sim::{ModelPrediction, Scenario, SimOutcome, WorkloadModel};
use crate::workload::WorkloadConfig;

fn ms(t: Nanos) -> f64 {
    (t.as_millis_f64() * 1000.0).round() / 1000.0
}

fn mb_per_s(rate: ByteRate) -> Option<f64> {
    (!rate.is_unlimited()).then(|| (rate.0 as f64 / 1e4).round() / 100.0)
}

/// One round in the JSON output.
#[derive(Serialize)]
pub struct RoundJson {
    /// Round number from 1.
    pub round: u32,
    /// Whether the guest was paused.
    pub stop_and_copy: bool,
    /// Start, ms after the migration started.
    pub start_ms: f64,
    /// Duration in ms.
    pub duration_ms: f64,
    /// Page frames sent.
    pub pages: u64,
    /// All-zero pages among them.
    pub zero_pages: u64,
    /// Bytes of page frames.
    pub bytes: u64,
    /// Pages dirtied during the round.
    pub dirty_pages: u64,
    /// Pages dirtied per second.
    pub dirty_rate_pages_per_s: u64,
    /// Measured bandwidth, MB/s.
    pub bandwidth_mb_s: Option<f64>,
    /// The round's limit, MB/s (null: unlimited).
    pub rate_limit_mb_s: Option<f64>,
    /// Downtime estimated at the end of the round, ms.
    pub estimated_downtime_ms: f64,
    /// Pages a predictor held back from this round.
    pub held_back: u64,
    /// Of those, pages dirtied again during the round (a correct prediction).
    pub held_back_redirtied: u64,
    /// Time the host spent fetching the dirty log in this round, ms.
    pub dirty_sync_ms: f64,
    /// Time the host spent re-arming the dirty log in this round, ms.
    pub dirty_clear_ms: f64,
}

impl From<&RoundReport> for RoundJson {
    fn from(r: &RoundReport) -> Self {
        RoundJson {
            round: r.round,
            stop_and_copy: r.stop_and_copy,
            start_ms: ms(r.start),
            duration_ms: ms(r.duration),
            pages: r.pages,
            zero_pages: r.zero_pages,
            bytes: r.bytes,
            dirty_pages: r.dirty_pages,
            dirty_rate_pages_per_s: r.dirty_rate_pages_per_sec,
            bandwidth_mb_s: mb_per_s(r.bandwidth),
            rate_limit_mb_s: mb_per_s(r.rate_limit),
            estimated_downtime_ms: ms(r.estimated_downtime),
            held_back: r.held_back,
            held_back_redirtied: r.held_back_redirtied,
            dirty_sync_ms: ms(r.dirty_sync_time),
            dirty_clear_ms: ms(r.dirty_clear_time),
        }
    }
}

/// The JSON object `--json` prints. Field names are a contract for scripts. `W` is the
/// workload's view: the in-process workload's settings ([`WorkloadJson`]) for `demo` and
/// `send`, the simulated model ([`SimWorkloadJson`]) for `simulate`.
#[derive(Serialize)]
pub struct ReportJson<W = WorkloadJson> {
    /// Whether the destination's digest matched the source's.
    pub verified: bool,
    /// Start to source released, ms.
    pub total_time_ms: f64,
    /// Pause to destination running, ms.
    pub downtime_ms: f64,
    /// Start to pause, ms.
    pub preparation_time_ms: f64,
    /// Destination running to source released, ms.
    pub resume_time_ms: f64,
    /// Bytes the source put on the wire, headers included.
    pub bytes_sent: u64,
    /// Bytes the destination sent back.
    pub bytes_received: u64,
    /// Page frames sent, re-sends included.
    pub pages_sent: u64,
    /// All-zero page frames among them.
    pub zero_pages_sent: u64,
    /// Page frames beyond one per page.
    pub pages_resent: u64,
    /// Rounds, stop-and-copy included.
    pub rounds: usize,
    /// The rule that ended pre-copy.
    pub stop_reason: Option<&'static str>,
    /// Why that rule fired, with its figures.
    pub stop_detail: String,
    /// The most the guest was throttled to make pre-copy converge, percent (0: never).
    pub throttle_percent: u8,
    /// bytes_sent / total time, MB/s.
    pub throughput_mb_s: Option<f64>,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// The strategy.
    pub strategy: String,
    /// Source digest.
    pub source_digest: Option<String>,
    /// Destination digest.
    pub destination_digest: Option<String>,
    /// Connections the migration used.
    pub channels: u16,
    /// Time the source spent hashing its memory for verification (outside the downtime).
    pub verification_time_ms: f64,
    /// Whether the switchover was handed out (the destination may run the guest).
    pub committed: bool,
    /// Every round.
    pub per_round: Vec<RoundJson>,
    /// Pages, payload bytes and the encoder's CPU time (`cpu_nanos`: 0 where nothing measured
    /// it, as in the simulator) per page encoding (raw, zero, lz4, delta, delta_lz4, reference,
    /// known, other).
    pub encodings: memferry::report::EncodingUse,
    /// Payload bytes saved against sending every page raw.
    pub bytes_saved: u64,
    /// Hash-first: distinct pages of content the destination announced it holds.
    pub known_pages_announced: u64,
    /// Hybrid: pages the destination held that went stale and followed the switchover.
    pub discarded_pages: u64,
    /// Post-copy: pages sent ahead of the push because the destination asked.
    pub urgent_pages: u64,
    /// How long the host took to park the guest at the pause (part of the downtime), ms.
    pub guest_pause_ms: f64,
    /// The workload that ran, if any.
    pub workload: Option<W>,
}

/// The workload in the JSON output.
#[derive(Serialize)]
pub struct WorkloadJson {
    /// Its settings.
    #[serde(flatten)]
    pub config: WorkloadConfig,
    /// Writes it made before the pause.
    pub writes: u64,
}

impl<W> ReportJson<W> {
    /// The JSON view of `report`.
    pub fn new(report: &MigrationReport, workload: Option<W>) -> Self {
        ReportJson {
            verified: report.verified == Some(true),
            total_time_ms: ms(report.total_time),
            downtime_ms: ms(report.downtime),
            preparation_time_ms: ms(report.preparation_time),
            resume_time_ms: ms(report.resume_time),
            bytes_sent: report.bytes_sent,
            bytes_received: report.bytes_received,
            pages_sent: report.pages_sent,
            zero_pages_sent: report.zero_pages_sent,
            pages_resent: report.pages_resent(),
            rounds: report.rounds.len(),
            stop_reason: report.stop_reason.map(|r| r.as_str()),
            stop_detail: report.stop_detail.clone(),
            throttle_percent: report.throttle_percent,
            throughput_mb_s: mb_per_s(report.throughput()),
            memory_bytes: report.memory_bytes(),
            page_size: report.page_size,
            strategy: report.strategy.clone(),
            source_digest: report.source_digest.map(|d| format!("{d:032x}")),
            destination_digest: report.destination_digest.map(|d| format!("{d:032x}")),
            channels: report.channels,
            verification_time_ms: ms(report.verification_time),
            committed: report.committed,
            per_round: report.rounds.iter().map(RoundJson::from).collect(),
            encodings: report.encodings,
            bytes_saved: report.encodings.saved_bytes(report.page_size),
            known_pages_announced: report.known_pages_announced,
            discarded_pages: report.discarded_pages,
            urgent_pages: report.urgent_pages,
            guest_pause_ms: ms(report.guest_pause),
            workload,
        }
    }
}

/// `memferry simulate --json`: the report's contract fields, and beside them the lower bounds,
/// the analytic models' figures, the link and the seed.
#[derive(Serialize)]
pub struct SimReportJson {
    /// Every field of [`ReportJson`], at the top level.
    #[serde(flatten)]
    pub report: ReportJson<SimWorkloadJson>,
    /// Lower bounds no strategy can beat on this run's workload and link.
    pub bounds: BoundsJson,
    /// The analytic models' predictions for this run.
    pub models: ModelsJson,
    /// The simulated link.
    pub link: LinkJson,
    /// The seed of contents and writes.
    pub seed: u64,
    /// With a codec (or a sibling image): the codec, pages and bytes saved per mechanism, and
    /// the CPU time the codec cost (modelled: `sim::codec::CodecRates`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub codec: Option<CodecJson>,
}

/// The content figures in `simulate --json`.
#[derive(Serialize)]
pub struct CodecJson {
    /// The codec's name.
    pub codec: String,
    /// Per mechanism: pages, payload bytes, bytes saved.
    pub mechanisms: Vec<crate::sim::codec::MechanismUse>,
    /// Payload bytes saved in all.
    pub saved_bytes: u64,
    /// The source's encoding CPU time, ms, per mechanism.
    pub encode_cpu_ms: EncodeCpuJson,
    /// The destination's decoding CPU time, ms.
    pub decode_cpu_ms: f64,
}

/// Encoding CPU time per mechanism, ms.
#[derive(Serialize)]
pub struct EncodeCpuJson {
    /// LZ4 (pages and deltas).
    pub lz4: f64,
    /// zstd.
    pub zstd: f64,
    /// XBZRLE and the delta cache.
    pub delta: f64,
    /// Content hashing (dedup).
    pub hash: f64,
    /// In all.
    pub total: f64,
}

impl From<&crate::sim::CodecFigures> for CodecJson {
    fn from(f: &crate::sim::CodecFigures) -> Self {
        let c = &f.cpu;
        CodecJson {
            codec: f.codec.clone(),
            mechanisms: f.mechanisms.clone(),
            saved_bytes: f.saved_bytes,
            encode_cpu_ms: EncodeCpuJson {
                lz4: ms(c.lz4),
                zstd: ms(c.zstd),
                delta: ms(c.delta),
                hash: ms(c.hash),
                total: ms(c.encode()),
            },
            decode_cpu_ms: ms(c.decode),
        }
    }
}

/// The content figures as lines under `simulate`'s table (empty without a codec).
pub fn codec_lines(outcome: &SimOutcome) -> String {
    let Some(f) = &outcome.codec else {
        return String::new();
    };
    let mut text = format!(
        "codec {}: {} saved against raw pages; encoding {:.1} ms of CPU (lz4 {:.1}, zstd {:.1}, delta {:.1}, hash {:.1}), decoding {:.1} ms\n",
        f.codec,
        human_bytes(f.saved_bytes),
        f.cpu.encode().as_millis_f64(),
        f.cpu.lz4.as_millis_f64(),
        f.cpu.zstd.as_millis_f64(),
        f.cpu.delta.as_millis_f64(),
        f.cpu.hash.as_millis_f64(),
        f.cpu.decode.as_millis_f64(),
    );
    for m in &f.mechanisms {
        text.push_str(&format!(
            "  {:<10} {:>9} pages  {:>12} sent  {:>12} saved\n",
            m.mechanism,
            m.pages,
            human_bytes(m.bytes),
            human_bytes(m.saved_bytes)
        ));
    }
    text
}

/// The simulated workload in `simulate --json`.
#[derive(Serialize)]
pub struct SimWorkloadJson {
    /// The model and its parameters (`"model": "hot_cold"`, `"rate"`, …).
    #[serde(flatten)]
    pub model: WorkloadModel,
    /// Its name in tables.
    pub name: String,
    /// Writes it made before the pause.
    pub writes: u64,
    /// Distinct pages it wrote.
    pub pages_written: u64,
    /// For a trace: what was replayed, and whether it looped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceJson>,
}

/// What a simulation replayed of a trace.
#[derive(Serialize)]
pub struct TraceJson {
    /// Guest memory the trace was recorded from, bytes.
    pub recorded_memory_bytes: u64,
    /// Intervals in the file.
    pub intervals: u64,
    /// The recording's length, ms.
    pub duration_ms: f64,
    /// Where the replayed part starts in the recording, ms.
    pub recorded_start_ms: f64,
    /// Where it ends, ms.
    pub recorded_end_ms: f64,
    /// One pass of it in replay time, ms.
    pub pass_ms: f64,
    /// Whether the replay loops (`--trace-loop`).
    pub loop_enabled: bool,
    /// Whether it did loop: the guest ran longer than one pass.
    pub looped: bool,
    /// Passes played (fractional).
    pub passes: f64,
    /// Time the guest ran with nothing left to replay (a replay that does not loop ended), ms.
    pub idle_after_end_ms: f64,
}

impl TraceJson {
    /// The JSON view of a trace and what a run replayed of it.
    pub fn new(summary: &TraceSummary, coverage: &TraceCoverage) -> Self {
        TraceJson {
            recorded_memory_bytes: summary.memory_bytes,
            intervals: summary.intervals,
            duration_ms: ms(summary.duration),
            recorded_start_ms: ms(coverage.recorded_start),
            recorded_end_ms: ms(coverage.recorded_end),
            pass_ms: ms(coverage.pass),
            loop_enabled: coverage.looped,
            looped: coverage.looped_over(),
            passes: (coverage.passes * 1000.0).round() / 1000.0,
            idle_after_end_ms: ms(coverage.idle_after_end),
        }
    }
}

/// Lower bounds in the JSON output.
#[derive(Serialize)]
pub struct BoundsJson {
    /// The least bytes any strategy could send.
    pub least_bytes: u64,
    /// The least downtime any strategy could have on this workload and link, ms.
    pub least_downtime_ms: f64,
    /// Not a bound: this run's oracle, what its own final working set allowed, ms.
    pub oracle_downtime_ms: f64,
}

/// One model's figures beside the simulation's.
#[derive(Serialize)]
pub struct ModelJson {
    /// Predicted total migration time, ms.
    pub total_time_ms: f64,
    /// Predicted downtime, ms (`None`: the model does not predict it).
    pub downtime_ms: Option<f64>,
    /// Predicted rounds, stop-and-copy included.
    pub rounds: Option<u32>,
    /// Predicted bytes on the wire.
    pub bytes: Option<u64>,
    /// The prediction's signed error against the simulated total time, percent.
    pub total_time_error_pct: Option<f64>,
    /// The same for downtime (`None`: the model does not predict it).
    pub downtime_error_pct: Option<f64>,
}

impl From<&ModelPrediction> for ModelJson {
    fn from(p: &ModelPrediction) -> Self {
        ModelJson {
            total_time_ms: ms(p.total_time),
            downtime_ms: p.downtime.map(ms),
            rounds: p.rounds,
            bytes: p.bytes,
            total_time_error_pct: p.total_time_error_pct,
            downtime_error_pct: p.downtime_error_pct,
        }
    }
}

/// The analytic models in the JSON output.
#[derive(Serialize)]
pub struct ModelsJson {
    /// The dirty rate fed to Clark's series (round 1's), MB/s of memory.
    pub dirty_rate_mb_s: Option<f64>,
    /// The verification every model's total includes (hashing memory once), ms.
    pub verification_ms: f64,
    /// Clark's geometric series (paper 002).
    pub clark: ModelJson,
    /// Paper 000's Tmig.
    pub paper000: ModelJson,
    /// Akoush et al.'s model fed the workload's dirty sets (distinct pages written in each
    /// predicted round's window).
    pub dirty_set_curve: ModelJson,
}

/// The simulated link in the JSON output.
#[derive(Serialize)]
pub struct LinkJson {
    /// Bandwidth, MB/s (`None`: unlimited).
    pub bandwidth_mb_s: Option<f64>,
    /// One-way latency, ms.
    pub latency_ms: f64,
}

impl SimReportJson {
    /// The JSON view of a simulation.
    pub fn new(scenario: &Scenario, outcome: &SimOutcome, trace: Option<TraceJson>) -> Self {
        let m = &outcome.models;
        SimReportJson {
            report: ReportJson::new(
                &outcome.report,
                Some(SimWorkloadJson {
                    model: scenario.workload.clone(),
                    name: scenario.workload.name(),
                    writes: outcome.writes,
                    pages_written: outcome.pages_written,
                    trace,
                }),
            ),
            bounds: BoundsJson {
                least_bytes: outcome.bounds.least_bytes,
                least_downtime_ms: ms(outcome.bounds.least_downtime),
                oracle_downtime_ms: ms(outcome.bounds.oracle_downtime),
            },
            models: ModelsJson {
                dirty_rate_mb_s: mb_per_s(m.dirty_rate),
                verification_ms: ms(m.verification),
                clark: (&m.clark).into(),
                paper000: (&m.paper000).into(),
                dirty_set_curve: (&m.dirty_set_curve).into(),
            },
            link: LinkJson {
                bandwidth_mb_s: mb_per_s(scenario.link.bandwidth),
                latency_ms: ms(scenario.link.latency),
            },
            seed: scenario.seed,
            codec: outcome.codec.as_ref().map(CodecJson::from),
        }
    }
}

/// The lower bounds and the models as lines under `simulate`'s table.
pub fn bounds_and_models(outcome: &SimOutcome) -> String {
    let m = &outcome.models;
    let figures = |p: &ModelPrediction| {
        let error = |e: Option<f64>| e.map_or(String::new(), |e| format!(" ({e:+.1}%)"));
        let mut text = format!(
            "total {:.1} ms{}",
            p.total_time.as_millis_f64(),
            error(p.total_time_error_pct)
        );
        if let Some(d) = p.downtime {
            text.push_str(&format!(
                ", downtime {:.1} ms{}",
                d.as_millis_f64(),
                error(p.downtime_error_pct)
            ));
        }
        if let Some(r) = p.rounds {
            text.push_str(&format!(", {r} rounds"));
        }
        if let Some(b) = p.bytes {
            text.push_str(&format!(", {}", human_bytes(b)));
        }
        text
    };
    let mut text = format!(
        "lower bounds: {} on the wire, {:.1} ms downtime (this run's oracle: {:.1} ms)\n\
         models, signed error against this run in brackets{}:\n\
         \x20 Clark {} [fed round 1's dirty rate, {}]\n\
         \x20 dirty-set curve {} [Akoush et al., fed the workload's own dirty pages]\n\
         \x20 paper000 Tmig {}\n",
        human_bytes(outcome.bounds.least_bytes),
        outcome.bounds.least_downtime.as_millis_f64(),
        outcome.bounds.oracle_downtime.as_millis_f64(),
        if m.verification > Nanos::ZERO {
            format!(
                " (totals include {:.1} ms of verification)",
                m.verification.as_millis_f64()
            )
        } else {
            String::new()
        },
        figures(&m.clark),
        rate_text(m.dirty_rate),
        figures(&m.dirty_set_curve),
        figures(&m.paper000).replacen("total ", "", 1),
    );
    if outcome.report.strategy.contains('+') || outcome.report.throttle_percent > 0 {
        text.push_str("  (the models predict plain pre-copy without throttling)\n");
    }
    text
}

/// A human-readable size.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

fn rate_text(rate: ByteRate) -> String {
    if rate.is_unlimited() {
        "-".into()
    } else {
        format!("{:.0} MB/s", rate.0 as f64 / 1e6)
    }
}

/// One line per finished round, for progress on stderr.
pub fn progress_line(r: &RoundReport, page_size: u64) -> String {
    if r.stop_and_copy {
        format!(
            "stop-and-copy (round {}): guest paused, {} pages ({}) in {:.1} ms",
            r.round,
            r.pages,
            human_bytes(r.bytes),
            r.duration.as_millis_f64()
        )
    } else {
        format!(
            "round {:>2}: {:>9} pages ({:>10}) in {:>8.1} ms at {:>10}; {:>8} pages dirtied ({}/s); est. downtime {:.1} ms",
            r.round,
            r.pages,
            human_bytes(r.bytes),
            r.duration.as_millis_f64(),
            rate_text(r.bandwidth),
            r.dirty_pages,
            human_bytes(r.dirty_rate_pages_per_sec.saturating_mul(page_size)),
            r.estimated_downtime.as_millis_f64()
        ) + &held_text(r)
    }
}

fn held_text(r: &RoundReport) -> String {
    if r.held_back == 0 {
        return String::new();
    }
    format!(
        "; held back {} hot pages, {} dirtied again",
        r.held_back, r.held_back_redirtied
    )
}

/// The report as a table.
pub fn table(report: &MigrationReport) -> String {
    table_with_decoding(report, None)
}

/// [`table`] with, after the encoders' CPU time, the destination's decoders' (`decode`: the
/// destination's pages per encoding with their `cpu_nanos`, [`decoder_cpu_line`]).
pub fn table_with_decoding(report: &MigrationReport, decode: Option<&EncodingUse>) -> String {
    let mut s = String::new();
    let verdict = match report.verified {
        Some(true) => "yes (digests match)".to_string(),
        Some(false) => "NO: digests differ".to_string(),
        None => "not checked".to_string(),
    };
    let rows: Vec<(&str, String)> = vec![
        ("strategy", report.strategy.clone()),
        (
            "guest memory",
            format!(
                "{} ({} pages of {} B)",
                human_bytes(report.memory_bytes()),
                report.page_count,
                report.page_size
            ),
        ),
        ("verified", verdict),
        (
            "total migration time",
            format!("{:.1} ms", report.total_time.as_millis_f64()),
        ),
        (
            "  preparation",
            format!("{:.1} ms", report.preparation_time.as_millis_f64()),
        ),
        (
            "  downtime",
            format!("{:.1} ms", report.downtime.as_millis_f64()),
        ),
        (
            "  resume (verification)",
            format!("{:.1} ms", report.resume_time.as_millis_f64()),
        ),
        (
            "rounds",
            if report.stop_detail.is_empty() {
                format!(
                    "{} (stopped by {})",
                    report.rounds.len(),
                    report.stop_reason.map_or("-", |r| r.as_str())
                )
            } else {
                format!(
                    "{} (stopped by {}: {})",
                    report.rounds.len(),
                    report.stop_reason.map_or("-", |r| r.as_str()),
                    report.stop_detail
                )
            },
        ),
        (
            "pages sent",
            format!(
                "{} ({} zero, {} re-sent)",
                report.pages_sent,
                report.zero_pages_sent,
                report.pages_resent()
            ),
        ),
        (
            "bytes on the wire",
            format!(
                "{} sent, {} received",
                human_bytes(report.bytes_sent),
                human_bytes(report.bytes_received)
            ),
        ),
        ("throughput", rate_text(report.throughput())),
    ];
    for (k, v) in rows {
        s.push_str(&format!("{k:<24} {v}\n"));
    }
    // What each content mechanism carried, when anything but raw and zero pages went.
    let used: Vec<String> = report
        .encodings
        .slots()
        .iter()
        .filter(|(name, use_)| use_.pages > 0 && !matches!(*name, "raw" | "zero"))
        .map(|(name, use_)| format!("{name} {} pages ({})", use_.pages, human_bytes(use_.bytes)))
        .collect();
    if !used.is_empty() {
        s.push_str(&format!(
            "{:<24} {}; {} saved against raw pages\n",
            "encodings",
            used.join(", "),
            human_bytes(report.encodings.saved_bytes(report.page_size))
        ));
    }
    // The encoders' CPU time per encoding they produced (a driver with a clock measures it).
    if report.encodings.cpu_nanos() > 0 {
        let per: Vec<String> = report
            .encodings
            .slots()
            .iter()
            .filter(|(_, use_)| use_.cpu_nanos > 0)
            .map(|(name, use_)| {
                let name = if *name == "raw" { "raw (tried)" } else { name };
                format!("{name} {:.1} ms", use_.cpu_nanos as f64 / 1e6)
            })
            .collect();
        s.push_str(&format!(
            "{:<24} {:.1} ms: {}\n",
            "encoder CPU time",
            report.encodings.cpu_nanos() as f64 / 1e6,
            per.join(", ")
        ));
    }
    if let Some(line) = decode.and_then(decoder_cpu_line) {
        s.push_str(&line);
    }
    if report.guest_pause > Nanos::ZERO {
        s.push_str(&format!(
            "{:<24} {:.2} ms (part of the downtime)\n",
            "guest pause",
            report.guest_pause.as_millis_f64()
        ));
    }
    if report.discarded_pages > 0 || report.urgent_pages > 0 {
        s.push_str(&format!(
            "{:<24} {} pages followed the switchover as stale, {} sent on request\n",
            "post-copy", report.discarded_pages, report.urgent_pages
        ));
    }
    s.push_str("\nround  pages      bytes        time       bandwidth   dirtied   est. downtime\n");
    for r in &report.rounds {
        s.push_str(&format!(
            "{:<6} {:<10} {:<12} {:<10} {:<11} {:<9} {}\n",
            if r.stop_and_copy {
                format!("{}*", r.round)
            } else {
                r.round.to_string()
            },
            r.pages,
            human_bytes(r.bytes),
            format!("{:.1} ms", r.duration.as_millis_f64()),
            rate_text(r.bandwidth),
            r.dirty_pages,
            if r.stop_and_copy {
                "-".to_string()
            } else {
                format!("{:.1} ms", r.estimated_downtime.as_millis_f64())
            },
        ));
    }
    s.push_str("(* stop-and-copy, guest paused)\n");
    s
}

/// The destination's decoding CPU time as a line of the table: `decoder CPU time         12.3
/// ms: lz4 10.1 ms, delta 2.2 ms` (the encodings with time measured), or `None` when nothing
/// was decoded by a timed decoder.
pub fn decoder_cpu_line(decode: &EncodingUse) -> Option<String> {
    let total = decode.cpu_nanos();
    if total == 0 {
        return None;
    }
    let per: Vec<String> = decode
        .slots()
        .iter()
        .filter(|(_, use_)| use_.cpu_nanos > 0)
        .map(|(name, use_)| format!("{name} {:.1} ms", use_.cpu_nanos as f64 / 1e6))
        .collect();
    Some(format!(
        "{:<24} {:.1} ms: {}\n",
        "decoder CPU time",
        total as f64 / 1e6,
        per.join(", ")
    ))
}

/// One encoding's line in the destination's JSON: pages received and the CPU time spent
/// decoding them.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct DecodeSlotJson {
    /// Page copies received in this encoding.
    pub pages: u64,
    /// Estimated CPU time spent decoding them, ns (0 where no decoder runs: raw, zero,
    /// reference).
    pub cpu_nanos: u64,
}

impl From<PagesAndBytes> for DecodeSlotJson {
    fn from(p: PagesAndBytes) -> Self {
        DecodeSlotJson {
            pages: p.pages,
            cpu_nanos: p.cpu_nanos,
        }
    }
}

/// Per encoding slot, with the names of the report's `encodings`.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct DecodeJson {
    /// The page as is.
    pub raw: DecodeSlotJson,
    /// All-zero pages.
    pub zero: DecodeSlotJson,
    /// LZ4.
    pub lz4: DecodeSlotJson,
    /// XBZRLE deltas.
    pub delta: DecodeSlotJson,
    /// XBZRLE deltas with LZ4.
    pub delta_lz4: DecodeSlotJson,
    /// References to content sent before (dedup).
    pub reference: DecodeSlotJson,
    /// Hash-first: content this side held (time: reading it from the store or image).
    pub known: DecodeSlotJson,
    /// Encodings defined outside the core (zstd).
    pub other: DecodeSlotJson,
}

impl From<&EncodingUse> for DecodeJson {
    fn from(e: &EncodingUse) -> Self {
        DecodeJson {
            raw: e.raw.into(),
            zero: e.zero.into(),
            lz4: e.lz4.into(),
            delta: e.delta.into(),
            delta_lz4: e.delta_lz4.into(),
            reference: e.reference.into(),
            known: e.known.into(),
            other: e.other.into(),
        }
    }
}

/// What the destination saw, in `--json`: `demo`'s `destination` object, and fields of
/// `listen`'s summary.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct DestinationJson {
    /// CPU time spent decoding pages, every encoding's together, ns (estimated from sampled
    /// calls).
    pub decode_cpu_nanos: u64,
    /// Pages received and decoding CPU time per encoding.
    pub decode: DecodeJson,
    /// Page copies received, re-sends included.
    pub pages_received: u64,
    /// Bytes of frames received, headers included.
    pub bytes_received: u64,
    /// From the hello's arrival to the end of the migration, ms.
    pub elapsed_ms: f64,
    /// Hash-first: reading and hashing the offered content for the announcement, ms (0 when
    /// none was announced).
    pub content_index_ms: f64,
}

impl DestinationJson {
    /// The view of a destination's figures: `encodings` received (with decoding `cpu_nanos`),
    /// the bytes received, the time from the hello to the end and the content index's build.
    pub fn new(stats: &crate::drive::ReceiveStats) -> Self {
        let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        DestinationJson {
            decode_cpu_nanos: stats.decode_cpu_nanos(),
            decode: (&stats.encodings).into(),
            pages_received: stats.pages_received(),
            bytes_received: stats.bytes_received,
            elapsed_ms: ms(stats.elapsed),
            content_index_ms: ms(stats.content_index),
        }
    }
}

/// What a destination received, as lines for the terminal (`memferry listen`): pages and bytes
/// per encoding, pages taken from the content it holds, the decoders' CPU time and the time
/// from the hello to the end.
pub fn received_lines(stats: &crate::drive::ReceiveStats) -> String {
    let crate::drive::ReceiveStats {
        encodings,
        bytes_received,
        elapsed,
        content_index,
    } = *stats;
    let encodings = &encodings;
    let pages = stats.pages_received();
    let mut s = format!(
        "{:<24} {pages} ({} of frames)\n",
        "pages received",
        human_bytes(bytes_received)
    );
    let per: Vec<String> = encodings
        .slots()
        .iter()
        .filter(|(_, use_)| use_.pages > 0)
        .map(|(name, use_)| format!("{name} {} pages ({})", use_.pages, human_bytes(use_.bytes)))
        .collect();
    if !per.is_empty() {
        s.push_str(&format!("{:<24} {}\n", "encodings", per.join(", ")));
    }
    if encodings.known.pages > 0 || !content_index.is_zero() {
        s.push_str(&format!(
            "{:<24} {} pages from the content this host holds (hash-first; its index took {:.1} ms)\n",
            "known content",
            encodings.known.pages,
            content_index.as_secs_f64() * 1e3
        ));
    }
    if let Some(line) = decoder_cpu_line(encodings) {
        s.push_str(&line);
    }
    s.push_str(&format!(
        "{:<24} {:.1} ms from the hello to the end\n",
        "elapsed",
        elapsed.as_secs_f64() * 1e3
    ));
    s
}
