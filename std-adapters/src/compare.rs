//! `memferry compare`: strategies × workloads × seeds in the simulator, summarised as a table
//! (medians and spread over seeds), CSV, JSON and SVG plots.
//!
//! Each paper's comparison is a named [`Preset`]; a preset may carry the paper's claimed figure,
//! printed beside the measured one. Every number comes from the deterministic simulator, so a
//! preset prints the same table on every run and every machine; only the wall-clock line on
//! stderr varies.

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use memferry::schedule::{RatePlan, StopRules};
use memferry::strategy::PreCopyConfig;
use memferry::time::{ByteRate, Nanos};
use memferry::track::PredictorKind;
use serde::{Deserialize, Serialize};

use crate::output::human_bytes;
use crate::sim::workload::{fit_guest, TraceCoverage, TraceSummary};
use crate::sim::{
    simulate, CodecModel, ContentModel, LinkModel, ModelPrediction, Scenario, SimCodec, SimOutcome,
    WorkloadModel,
};

/// One strategy: a name and the engine settings that make it.
#[derive(Clone, Debug)]
pub struct Strategy {
    /// Name in tables.
    pub name: String,
    /// Engine settings.
    pub engine: PreCopyConfig,
    /// The page codec (none: raw pages).
    pub codec: CodecModel,
    /// The destination holds a sibling VM's image and announces it hash-first.
    pub sibling_image: bool,
}

/// A figure a paper claims, to print beside the measurement.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    /// Which paper and what it claims, in words.
    pub text: String,
    /// The claimed figures, each measured on every workload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub figures: Vec<ClaimFigure>,
}

/// What a claimed figure measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimMetric {
    /// Change of total migration time against the baseline, percent.
    TotalTime,
    /// Change of downtime against the baseline, percent.
    Downtime,
    /// Change of bytes on the wire against the baseline, percent.
    Bytes,
    /// Share of the guest's pages sent as hashes of content the destination held, percent.
    KnownPages,
    /// Share of the pages sent that went without their bytes (zero pages, dedup references,
    /// hash-first), percent.
    DeduplicatedPages,
}

impl ClaimMetric {
    /// In words.
    pub fn name(self) -> &'static str {
        match self {
            ClaimMetric::TotalTime => "total time",
            ClaimMetric::Downtime => "downtime",
            ClaimMetric::Bytes => "bytes",
            ClaimMetric::KnownPages => "pages sent as hashes",
            ClaimMetric::DeduplicatedPages => "pages deduplicated",
        }
    }

    /// Whether the figure is a change against the baseline (else a share of one run).
    pub fn is_change(self) -> bool {
        matches!(
            self,
            ClaimMetric::TotalTime | ClaimMetric::Downtime | ClaimMetric::Bytes
        )
    }
}

/// One figure a paper claims: `metric` of `strategy` (against the baseline for a change).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClaimFigure {
    /// Which paper.
    pub paper: String,
    /// What is measured.
    pub metric: ClaimMetric,
    /// The strategy measured.
    pub strategy: String,
    /// The paper's figure, percent (negative: a reduction).
    pub claimed_pct: f64,
    /// How the paper states it (`"-34%"`, `"up to 96%"`, `"> 30%"`).
    pub claimed: String,
}

/// A claimed figure beside the measured one, on one workload.
#[derive(Clone, Debug, Serialize)]
pub struct ClaimCheck {
    /// The claim.
    #[serde(flatten)]
    pub figure: ClaimFigure,
    /// The workload.
    pub workload: String,
    /// The measured figure, percent (median over seeds); `None` without the runs it needs.
    pub measured_pct: Option<f64>,
}

/// A named comparison.
#[derive(Clone, Debug)]
pub struct Preset {
    /// Name on the command line.
    pub name: &'static str,
    /// What it compares.
    pub description: &'static str,
    /// The strategies.
    pub strategies: Vec<Strategy>,
    /// The workloads.
    pub workloads: Vec<WorkloadModel>,
    /// The seeds.
    pub seeds: Vec<u64>,
    /// Everything else about each run.
    pub base: Scenario,
    /// What the source paper claims, if anything.
    pub claim: Option<Claim>,
    /// The strategy the others are measured against, if any: the table then shows each
    /// strategy's change in total time and bytes relative to it.
    pub baseline: Option<&'static str>,
}

fn precopy(name: &str, stop: StopRules, rate: RatePlan) -> Strategy {
    Strategy {
        name: name.into(),
        engine: PreCopyConfig {
            stop,
            rate,
            ..PreCopyConfig::default()
        },
        codec: CodecModel::default(),
        sibling_image: false,
    }
}

/// Pre-copy under the default stop rules with `codec`, named `pre-copy+CODEC`.
fn with_codec(codec: SimCodec) -> Strategy {
    let mut s = precopy(
        &format!("pre-copy+{}", codec.name()),
        StopRules::default(),
        RatePlan::default(),
    );
    s.codec = CodecModel::with(codec);
    s
}

fn claim_figure(
    paper: &str,
    metric: ClaimMetric,
    strategy: &str,
    claimed_pct: f64,
    claimed: &str,
) -> ClaimFigure {
    ClaimFigure {
        paper: paper.into(),
        metric,
        strategy: strategy.into(),
        claimed_pct,
        claimed: claimed.into(),
    }
}

/// Pre-copy with each predictor in `specs` (`"none"` is plain pre-copy), all under `stop`.
fn with_predictors(specs: &[&str], stop: StopRules) -> Vec<Strategy> {
    specs
        .iter()
        .map(|&spec| Strategy {
            name: if spec == "none" {
                "pre-copy".into()
            } else {
                format!("pre-copy+{spec}")
            },
            engine: PreCopyConfig {
                predictor: PredictorKind::parse(spec).expect("a known predictor"),
                stop,
                ..PreCopyConfig::default()
            },
            codec: CodecModel::default(),
            sibling_image: false,
        })
        .collect()
}

fn standard_workloads(rate: f64) -> Vec<WorkloadModel> {
    ["idle", "uniform", "hotcold", "zipf", "sweep", "phases"]
        .iter()
        .map(|name| WorkloadModel::named(name, rate).expect("a built-in workload"))
        .collect()
}

/// The presets `memferry compare --preset` knows.
pub fn presets() -> Vec<Preset> {
    let base = Scenario {
        memory: 256 << 20,
        link: LinkModel {
            bandwidth: ByteRate::from_bits_per_sec(1_000_000_000),
            ..LinkModel::default()
        },
        ..Scenario::default()
    };
    let defaults = StopRules::default();
    // The predictor comparisons hold every strategy to one, tight, downtime target.
    let predictor_stop = StopRules {
        downtime_target: Nanos::from_millis(50),
        ..defaults
    };
    vec![
        Preset {
            name: "default",
            description: "pre-copy variants on six workloads (256 MiB guest, 1 Gbit/s link, 30k writes/s)",
            strategies: vec![
                precopy("pre-copy", defaults, RatePlan::default()),
                precopy("pre-copy 50ms", StopRules { downtime_target: Nanos::from_millis(50), ..defaults }, RatePlan::default()),
                precopy("stop-after-1", StopRules { max_rounds: 1, ..defaults }, RatePlan::default()),
                precopy(
                    "clark-adaptive",
                    defaults,
                    RatePlan::adaptive(ByteRate(25_000_000), ByteRate(25_000_000), ByteRate::from_bits_per_sec(1_000_000_000)),
                ),
            ],
            workloads: standard_workloads(30_000.0),
            seeds: vec![1, 2, 3],
            base: base.clone(),
            claim: None,
            baseline: Some("pre-copy"),
        },
        Preset {
            name: "clark-model",
            description: "simulated pre-copy beside Clark's geometric series (paper 002) on uniform writes, no compression",
            strategies: vec![precopy("pre-copy 30ms", StopRules { downtime_target: Nanos::from_millis(30), ..defaults }, RatePlan::default())],
            workloads: vec![WorkloadModel::Uniform { rate: 5_000.0 }, WorkloadModel::Uniform { rate: 15_000.0 }],
            seeds: vec![1, 2, 3],
            base: Scenario { content: crate::sim::ContentModel { zero_fraction: 0.0, text_fraction: 0.0, duplicate_fraction: 0.0, ..Default::default() }, ..base.clone() },
            claim: Some(Claim { text: "paper 002 (Clark): round i lasts M·D^i/B^(i+1); the model's columns are printed beside the simulation".into(), ..Claim::default() }),
            baseline: None,
        },
        Preset {
            name: "max-rounds",
            description: "a user-set maximum number of pre-copy rounds (paper 004) on a hot/cold workload",
            strategies: [1u32, 2, 4, 8, 30]
                .iter()
                .map(|&n| precopy(&format!("max {n} rounds"), StopRules { max_rounds: n, downtime_target: Nanos::from_millis(5), non_convergence_rounds: 0, ..defaults }, RatePlan::default()))
                .collect(),
            workloads: vec![WorkloadModel::HotCold { rate: 30_000.0, hot_fraction: 0.05, hot_share: 0.9 }],
            seeds: vec![1, 2, 3],
            base: base.clone(),
            claim: Some(Claim { text: "paper 004: more rounds trade total time and bytes for downtime".into(), ..Claim::default() }),
            baseline: None,
        },
        Preset {
            name: "frequent-pages",
            description: "a bitmap of frequently updated pages held back to the last round (papers 001 and 003: the history predictor) on skewed workloads (1 GiB, 10 Gbit/s, 50 ms target)",
            strategies: with_predictors(&["none", "history:m=2,n=4", "history:m=3,n=6"], predictor_stop),
            workloads: vec![
                WorkloadModel::HotCold { rate: 1_000_000.0, hot_fraction: 0.05, hot_share: 0.95 },
                WorkloadModel::Zipf { rate: 1_000_000.0, exponent: 1.1 },
                WorkloadModel::Phases { rate: 1_000_000.0, hot_fraction: 0.05, hot_share: 0.95, period: Nanos::from_millis(300) },
            ],
            seeds: vec![1, 2, 3],
            base: Scenario { memory: 1 << 30, ..Scenario::default() },
            claim: Some(Claim {
                text: "paper 001: holding frequently updated pages to the last round sends 34% less data in 32.5% less time; paper 003: hot pages recognised from the history of dirty pages are sent at the end".into(),
                ..Claim::default()
            }),
            baseline: Some("pre-copy"),
        },
        Preset {
            name: "wsclock-vs-precopy",
            description: "writable-working-set predictors against plain pre-copy at the same downtime target (1 GiB guest, 10 Gbit/s link, hot/cold at 1M writes/s, uniform at 50k writes/s)",
            strategies: with_predictors(&["none", "wsclock", "lru", "splay", "history"], predictor_stop),
            workloads: vec![
                WorkloadModel::HotCold { rate: 1_000_000.0, hot_fraction: 0.05, hot_share: 0.95 },
                WorkloadModel::HotCold { rate: 1_000_000.0, hot_fraction: 0.10, hot_share: 0.95 },
                WorkloadModel::Uniform { rate: 50_000.0 },
            ],
            seeds: vec![1, 2, 3],
            base: Scenario { memory: 1 << 30, ..Scenario::default() },
            claim: Some(Claim {
                text: "paper 004 (Zaw and Thein, LRU/splay): -11.45% total migration time, -23.67% data; paper 002: WSClock improves on it. Predictors must not hurt on uniform writes (within 2%).".into(),
                ..Claim::default()
            }),
            baseline: Some("pre-copy"),
        },
        Preset {
            name: "paper001-delta",
            description: "XBZRLE delta compression of pages sent again (paper 001) against raw pages: real encoders on the default content model (writes change 64 B of a page), 256 MiB guest, 1 Gbit/s",
            strategies: vec![precopy("pre-copy", defaults, RatePlan::default()), with_codec(SimCodec::Delta)],
            workloads: codec_workloads(),
            seeds: vec![1, 2, 3],
            base: base.clone(),
            claim: Some(Claim {
                text: "paper 001: delta compression of frequently updated pages sends 34% less data in 32.5% less time".into(),
                figures: vec![
                    claim_figure("paper 001", ClaimMetric::Bytes, "pre-copy+delta", -34.0, "-34%"),
                    claim_figure("paper 001", ClaimMetric::TotalTime, "pre-copy+delta", -32.5, "-32.5%"),
                ],
            }),
            baseline: Some("pre-copy"),
        },
        Preset {
            name: "paper004-adaptive",
            description: "adaptive compression (paper 004 after Jin et al.: per page a dedup reference, a delta, LZ4 or raw, encoders weighed against the link) against raw pages, LZ4 and delta alone: real encoders on the default content model, 256 MiB guest, 1 Gbit/s",
            strategies: vec![
                precopy("pre-copy", defaults, RatePlan::default()),
                with_codec(SimCodec::Lz4),
                with_codec(SimCodec::Delta),
                with_codec(SimCodec::Adaptive),
            ],
            workloads: codec_workloads(),
            seeds: vec![1, 2, 3],
            base: base.clone(),
            claim: Some(Claim {
                text: "paper 004 (Jin et al.'s adaptive compression): -27.1% downtime, -32% total time, -68.8% data".into(),
                figures: vec![
                    claim_figure("paper 004", ClaimMetric::Downtime, "pre-copy+adaptive", -27.1, "-27.1%"),
                    claim_figure("paper 004", ClaimMetric::TotalTime, "pre-copy+adaptive", -32.0, "-32%"),
                    claim_figure("paper 004", ClaimMetric::Bytes, "pre-copy+adaptive", -68.8, "-68.8%"),
                ],
            }),
            baseline: Some("pre-copy"),
        },
        Preset {
            name: "paper000-shared-image",
            description: "a destination that holds the image of another VM of the same application (paper 000), announced hash-first: round 1 sends the pages it holds as hashes (content model app-image: 96% of pages shared until written, the paper's figure taken as the input), 256 MiB guest, 1 Gbit/s",
            strategies: vec![precopy("pre-copy", defaults, RatePlan::default()), {
                let mut s = precopy("pre-copy+sibling image", defaults, RatePlan::default());
                s.sibling_image = true;
                s
            }],
            workloads: codec_workloads(),
            seeds: vec![1, 2, 3],
            base: Scenario {
                content: ContentModel::named("app-image").expect("a built-in content model"),
                ..base.clone()
            },
            claim: Some(Claim {
                text: "paper 000: VMs of one application share up to 96% of their image (kept on shared storage, so a migration need not send it)".into(),
                figures: vec![claim_figure("paper 000", ClaimMetric::KnownPages, "pre-copy+sibling image", 96.0, "up to 96%")],
            }),
            baseline: Some("pre-copy"),
        },
        Preset {
            name: "paper004-dedup",
            description: "deduplication (zero pages and references to content sent before, the adaptive codec) against raw pages on the default content model (20% zero pages, 5% duplicates of 16 pages); paper 004's figure is for VM images on shared storage, a migration dedups within one guest: 256 MiB guest, 1 Gbit/s",
            strategies: vec![precopy("pre-copy", defaults, RatePlan::default()), with_codec(SimCodec::Adaptive)],
            workloads: codec_workloads(),
            seeds: vec![1, 2, 3],
            base,
            claim: Some(Claim {
                text: "paper 004: deduplication on shared storage saves more than 30%".into(),
                figures: vec![
                    claim_figure("paper 004", ClaimMetric::DeduplicatedPages, "pre-copy+adaptive", 30.0, "> 30%"),
                    claim_figure("paper 004", ClaimMetric::Bytes, "pre-copy+adaptive", -30.0, "> 30% less"),
                ],
            }),
            baseline: Some("pre-copy"),
        },
    ]
}

/// The workloads of the codec presets: skewed and uniform writes at 30k writes/s.
fn codec_workloads() -> Vec<WorkloadModel> {
    ["hotcold", "zipf", "uniform"]
        .iter()
        .map(|name| WorkloadModel::named(name, 30_000.0).expect("a built-in workload"))
        .collect()
}

/// One run of the matrix.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    /// Strategy name.
    pub strategy: String,
    /// Workload name (with the link, when a comparison sweeps several).
    pub workload: String,
    /// Seed.
    pub seed: u64,
    /// The outcome.
    pub outcome: SimOutcome,
    /// For a trace workload: what the run replayed of it, and whether it looped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceCoverage>,
}

/// Median, minimum and maximum of one metric over seeds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Spread {
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n == 0 {
            0.0
        } else if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Spread {
            median,
            min: values.first().copied().unwrap_or(0.0),
            max: values.last().copied().unwrap_or(0.0),
        }
    }
}

/// One row of the summary: a strategy on a workload, over all seeds.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Strategy name.
    pub strategy: String,
    /// Workload name.
    pub workload: String,
    /// Total migration time, ms.
    pub total_time_ms: Spread,
    /// Downtime, ms.
    pub downtime_ms: Spread,
    /// Preparation time, ms.
    pub preparation_time_ms: Spread,
    /// Resume time, ms.
    pub resume_time_ms: Spread,
    /// Bytes on the wire (source to destination).
    pub bytes_sent: Spread,
    /// Page frames beyond one per page.
    pub pages_resent: Spread,
    /// Rounds, stop-and-copy included.
    pub rounds: Spread,
    /// The least bytes any strategy could send.
    pub least_bytes: Spread,
    /// The least downtime any strategy could have, ms.
    pub least_downtime_ms: Spread,
    /// Clark's geometric series.
    pub clark: ModelRow,
    /// The dirty-set model (Akoush et al.).
    pub dirty_set_curve: ModelRow,
    /// Paper 000's Tmig, ms.
    pub paper000_total_time_ms: Spread,
    /// With a codec or a sibling image: what each mechanism saved, and the codec's CPU time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<ContentRow>,
}

/// A row's content figures, over seeds.
#[derive(Clone, Debug, Serialize)]
pub struct ContentRow {
    /// The codec.
    pub codec: String,
    /// Payload bytes saved per mechanism (zero, lz4, zstd, delta, reference, known).
    pub saved_bytes: Vec<(String, Spread)>,
    /// Payload bytes saved in all.
    pub saved_total: Spread,
    /// The source's encoding CPU time, ms.
    pub encode_cpu_ms: Spread,
    /// The destination's decoding CPU time, ms.
    pub decode_cpu_ms: Spread,
}

/// The mechanisms the content columns show, in order.
pub const MECHANISMS: [&str; 6] = ["zero", "lz4", "zstd", "delta", "reference", "known"];

/// One model's figures in a row, over seeds, with its signed error against the simulated runs
/// in percent (`None`: not predicted, or nothing to compare with).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ModelRow {
    /// Predicted total time, ms.
    pub total_time_ms: Spread,
    /// Predicted downtime, ms.
    pub downtime_ms: Option<Spread>,
    /// Error on total time, percent.
    pub total_time_error_pct: Option<Spread>,
    /// Error on downtime, percent.
    pub downtime_error_pct: Option<Spread>,
}

impl ModelRow {
    fn of(predictions: &[&ModelPrediction]) -> ModelRow {
        let every = |f: &dyn Fn(&ModelPrediction) -> Option<f64>| {
            predictions
                .iter()
                .map(|p| f(p))
                .collect::<Option<Vec<f64>>>()
                .map(Spread::of)
        };
        ModelRow {
            total_time_ms: Spread::of(
                predictions
                    .iter()
                    .map(|p| p.total_time.as_millis_f64())
                    .collect(),
            ),
            downtime_ms: every(&|p| p.downtime.map(|d| d.as_millis_f64())),
            total_time_error_pct: every(&|p| p.total_time_error_pct),
            downtime_error_pct: every(&|p| p.downtime_error_pct),
        }
    }
}

/// The result of a comparison.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    /// Preset name.
    pub preset: String,
    /// What it compares.
    pub description: String,
    /// The paper's claim, if any.
    pub claim: Option<Claim>,
    /// The strategy the others are measured against.
    pub baseline: Option<String>,
    /// Every setting of every strategy and workload, as run.
    pub parameters: Parameters,
    /// One row per strategy × workload.
    pub rows: Vec<Row>,
    /// The paper's claimed figures beside the measured ones, per workload.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<ClaimCheck>,
    /// Every run.
    pub runs: Vec<Run>,
}

// ---------------------------------------------------------------------------------------------
// The matrix

/// One column of a comparison: a workload on a guest and a link (every setting of a run but
/// the strategy and the seed).
#[derive(Clone, Debug)]
pub struct Case {
    /// Name in tables: the workload's, plus the link's when a comparison sweeps several.
    pub name: String,
    /// The run's scenario; each run sets its seed and engine.
    pub scenario: Scenario,
    /// For a trace: the checked file and what its replay plays.
    pub trace: Option<TraceSummary>,
}

/// What the command line changes in a preset.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// Workloads instead of the preset's (empty: the preset's).
    pub workloads: Vec<WorkloadModel>,
    /// Guest memory instead of the preset's. A trace runs on its recorded guest; this must then
    /// equal it, unless `pad_memory`.
    pub memory: Option<u64>,
    /// Let `memory` exceed a trace's guest (the extra pages are never written).
    pub pad_memory: bool,
    /// Link bandwidths, each workload running on each (empty: the preset's link).
    pub bandwidths: Vec<ByteRate>,
    /// Verify the destination's memory (`None`: the preset's setting, which is on).
    pub verify: Option<bool>,
    /// A page codec for every strategy (`None`: the preset's). Refused for a preset whose
    /// strategies choose codecs themselves.
    pub codec: Option<CodecModel>,
}

/// Everything a comparison runs: strategies × cases × seeds, in that order (the run list
/// that [`Shard`]s split).
#[derive(Clone, Debug)]
pub struct Matrix {
    /// Preset name.
    pub preset: String,
    /// What it compares.
    pub description: String,
    /// The paper's claim, if any.
    pub claim: Option<Claim>,
    /// The strategy the others are measured against.
    pub baseline: Option<String>,
    /// The strategies.
    pub strategies: Vec<Strategy>,
    /// The cases.
    pub cases: Vec<Case>,
    /// The seeds.
    pub seeds: Vec<u64>,
}

/// A link rate for names: `1Gbit`, `100Mbit`, `500MB/s`.
pub fn link_name(rate: ByteRate) -> String {
    if rate.is_unlimited() {
        return "unlimited".into();
    }
    let bits = rate.0 as u128 * 8;
    if bits.is_multiple_of(1_000_000_000) {
        format!("{}Gbit", bits / 1_000_000_000)
    } else if bits.is_multiple_of(1_000_000) {
        format!("{}Mbit", bits / 1_000_000)
    } else {
        format!("{}MB/s", rate.0 as f64 / 1e6)
    }
}

impl Matrix {
    /// The preset as it stands.
    pub fn of(preset: &Preset) -> Result<Matrix, String> {
        Matrix::new(preset, &Overrides::default())
    }

    /// The preset changed by `overrides`. Reads and checks every trace (so a damaged file or a
    /// window past its end fails before any run); fails if two cases share a name.
    pub fn new(preset: &Preset, overrides: &Overrides) -> Result<Matrix, String> {
        let workloads = if overrides.workloads.is_empty() {
            &preset.workloads
        } else {
            &overrides.workloads
        };
        let links: Vec<LinkModel> = if overrides.bandwidths.is_empty() {
            vec![preset.base.link]
        } else {
            overrides
                .bandwidths
                .iter()
                .map(|&bandwidth| LinkModel {
                    bandwidth,
                    ..preset.base.link
                })
                .collect()
        };
        let mut cases: Vec<Case> = Vec::new();
        for workload in workloads {
            let trace = TraceSummary::of(workload)?;
            let (memory, page_size) = fit_guest(
                workload,
                trace.as_ref(),
                overrides.memory,
                (preset.base.memory, preset.base.page_size),
                overrides.pad_memory,
            )?;
            for link in &links {
                let name = if links.len() > 1 {
                    format!("{} on {}", workload.name(), link_name(link.bandwidth))
                } else {
                    workload.name()
                };
                if cases.iter().any(|c| c.name == name) {
                    return Err(format!(
                        "two workloads are both named '{name}': they differ only in what the name does not show (or a trace file name appears twice); a comparison needs distinct names"
                    ));
                }
                cases.push(Case {
                    name,
                    scenario: Scenario {
                        memory,
                        page_size,
                        workload: workload.clone(),
                        link: *link,
                        verify: overrides.verify.unwrap_or(preset.base.verify),
                        ..preset.base.clone()
                    },
                    trace: trace.clone(),
                });
            }
        }
        if preset.strategies.is_empty() || cases.is_empty() || preset.seeds.is_empty() {
            return Err("a comparison needs at least one strategy, workload and seed".into());
        }
        let mut strategies = preset.strategies.clone();
        if let Some(codec) = overrides.codec {
            if preset.strategies.iter().any(|s| !s.codec.is_none()) {
                return Err(format!(
                    "the preset {} compares codecs itself: --codec and --delta-cache apply to presets whose strategies send raw pages",
                    preset.name
                ));
            }
            if !codec.is_none() {
                for s in &mut strategies {
                    s.codec = codec;
                    s.name = format!("{}+{}", s.name, codec.codec.name());
                }
            }
        }
        let mut changed = Vec::new();
        if overrides.codec.is_some_and(|c| !c.is_none()) {
            changed.push("codec");
        }
        if !overrides.workloads.is_empty() {
            changed.push("workloads");
        }
        if overrides.memory.is_some() {
            changed.push("memory");
        }
        if !overrides.bandwidths.is_empty() {
            changed.push("link");
        }
        if overrides.verify.is_some_and(|v| v != preset.base.verify) {
            changed.push("verification");
        }
        let mut description = preset.description.to_string();
        if !changed.is_empty() {
            description.push_str(&format!(
                " [changed on the command line: {}; the setup lines say what ran]",
                changed.join(", ")
            ));
        }
        Ok(Matrix {
            preset: preset.name.into(),
            description,
            claim: preset.claim.clone(),
            baseline: preset.baseline.map(|b| match overrides.codec {
                Some(c) if !c.is_none() => format!("{b}+{}", c.codec.name()),
                _ => b.to_string(),
            }),
            strategies,
            cases,
            seeds: preset.seeds.clone(),
        })
    }

    /// Runs in the matrix.
    pub fn len(&self) -> usize {
        self.strategies.len() * self.cases.len() * self.seeds.len()
    }

    /// Whether it has no runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Run `index` of the run list: (strategy, case, seed), strategies outermost, seeds
    /// innermost.
    pub fn job(&self, index: usize) -> (&Strategy, &Case, u64) {
        let per_strategy = self.cases.len() * self.seeds.len();
        let (s, rest) = (index / per_strategy, index % per_strategy);
        let (c, k) = (rest / self.seeds.len(), rest % self.seeds.len());
        (&self.strategies[s], &self.cases[c], self.seeds[k])
    }

    /// Every setting of every strategy and case, as run.
    pub fn parameters(&self) -> Parameters {
        Parameters {
            strategies: self.strategies.iter().map(StrategyParameters::of).collect(),
            workloads: self.cases.iter().map(CaseParameters::of).collect(),
            seeds: self.seeds.clone(),
        }
    }

    /// What a shard file records about the matrix, for the merge.
    pub fn info(&self) -> MatrixInfo {
        let parameters = self.parameters();
        MatrixInfo {
            preset: self.preset.clone(),
            description: self.description.clone(),
            claim: self.claim.clone(),
            baseline: self.baseline.clone(),
            strategies: self.strategies.iter().map(|s| s.name.clone()).collect(),
            workloads: self.cases.iter().map(|c| c.name.clone()).collect(),
            seeds: self.seeds.clone(),
            runs: self.len(),
            fingerprint: fingerprint(self, &parameters),
            parameters,
        }
    }

    /// Warnings worth printing before the runs: trace windows that reach past the recording.
    pub fn notes(&self) -> Vec<String> {
        self.cases
            .iter()
            .filter_map(|c| {
                let trace = c.trace.as_ref()?;
                trace.window_cut_short(&c.scenario.workload).then(|| {
                    format!(
                        "{}: the recording is only {:.3} s long; the replay window ends with it",
                        c.name,
                        trace.duration.as_secs_f64()
                    )
                })
            })
            .collect()
    }
}

/// A hash of everything that decides the runs' results except the trace files' locations:
/// shards whose fingerprints differ came from different comparisons and are not merged.
fn fingerprint(m: &Matrix, parameters: &Parameters) -> String {
    let mut p = parameters.clone();
    for w in &mut p.workloads {
        if let WorkloadModel::Trace { path, .. } = &mut w.workload {
            *path = std::path::Path::new(path.as_str())
                .file_name()
                .map_or(path.clone(), |n| n.to_string_lossy().into_owned());
        }
    }
    let text = serde_json::to_string(&(
        &m.preset,
        &m.description,
        &m.claim,
        &m.baseline,
        &p,
        env!("CARGO_PKG_VERSION"),
    ))
    .expect("the parameters serialise");
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
}

/// Every setting of a comparison, as run: what `compare --list` prints and the JSON carries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Parameters {
    /// The strategies.
    pub strategies: Vec<StrategyParameters>,
    /// The workloads (cases), with their guests and links.
    pub workloads: Vec<CaseParameters>,
    /// The seeds.
    pub seeds: Vec<u64>,
}

/// A strategy's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StrategyParameters {
    /// Name in tables.
    pub name: String,
    /// Downtime target, ms.
    pub downtime_target_ms: f64,
    /// Most pre-copy rounds.
    pub max_rounds: u32,
    /// Rounds without progress before stopping (0: never).
    pub non_convergence_rounds: u32,
    /// Deadline of the rounds, ms.
    pub deadline_ms: Option<f64>,
    /// The predictor, fully spelled out (`none` for plain pre-copy).
    pub predictor: String,
    /// Dirty-log samples in round 1 to teach the predictor.
    pub learning_samples: u32,
    /// Round 1's rate limit, bytes/s (`None`: unlimited).
    pub rate_first_round: Option<u64>,
    /// Each later round's rise, bytes/s.
    pub rate_increment: u64,
    /// The highest limit, bytes/s (`None`: unlimited).
    pub rate_max: Option<u64>,
    /// Every engine setting, as the engine spells it.
    pub engine: String,
    /// The page codec (`none`: raw pages).
    #[serde(default = "codec_none")]
    pub codec: String,
    /// Bytes of the delta cache (delta and adaptive).
    #[serde(default)]
    pub delta_cache_bytes: u64,
    /// Whether the destination held a sibling VM's image (hash-first).
    #[serde(default)]
    pub sibling_image: bool,
}

fn codec_none() -> String {
    "none".into()
}

fn limit(rate: ByteRate) -> Option<u64> {
    (!rate.is_unlimited()).then_some(rate.0)
}

impl StrategyParameters {
    fn of(s: &Strategy) -> Self {
        let e = &s.engine;
        StrategyParameters {
            name: s.name.clone(),
            downtime_target_ms: e.stop.downtime_target.as_millis_f64(),
            max_rounds: e.stop.max_rounds,
            non_convergence_rounds: e.stop.non_convergence_rounds,
            deadline_ms: e.stop.deadline.map(|d| d.as_millis_f64()),
            predictor: e.predictor.to_string(),
            learning_samples: e.learning_samples,
            rate_first_round: limit(e.rate.first_round),
            rate_increment: e.rate.increment.0,
            rate_max: limit(e.rate.max),
            engine: format!("{e:?}"),
            codec: s.codec.codec.name().into(),
            delta_cache_bytes: s.codec.delta_cache_bytes,
            sibling_image: s.sibling_image,
        }
    }

    /// The settings in words.
    pub fn describe(&self) -> String {
        let rate = |r: Option<u64>| r.map_or("unlimited".to_string(), |r| link_name(ByteRate(r)));
        let mut text = format!(
            "downtime target {} ms, at most {} round{}, {}, {}, predictor {}",
            self.downtime_target_ms,
            self.max_rounds,
            if self.max_rounds == 1 { "" } else { "s" },
            match self.non_convergence_rounds {
                0 => "no non-convergence rule".to_string(),
                n => format!("stop after {n} rounds without progress"),
            },
            self.deadline_ms
                .map_or("no deadline".to_string(), |d| format!("deadline {d} ms")),
            self.predictor,
        );
        if self.predictor != "none" {
            text.push_str(&format!(" ({} learning samples)", self.learning_samples));
        }
        if self.rate_increment > 0 || self.rate_first_round != self.rate_max {
            text.push_str(&format!(
                ", rate {} in round 1 rising by {} to {}",
                rate(self.rate_first_round),
                link_name(ByteRate(self.rate_increment)),
                rate(self.rate_max)
            ));
        } else if self.rate_max.is_some() {
            text.push_str(&format!(", rate limit {}", rate(self.rate_max)));
        }
        if self.codec != "none" {
            text.push_str(&format!(", codec {}", self.codec));
            if matches!(self.codec.as_str(), "delta" | "adaptive") {
                text.push_str(&format!(
                    " (delta cache {})",
                    human_bytes(self.delta_cache_bytes)
                ));
            }
        }
        if self.sibling_image {
            text.push_str(", destination holds a sibling VM's image (hash-first)");
        }
        text
    }
}

/// A trace case's replay, as planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceParameters {
    /// Guest memory the trace was recorded from, bytes.
    pub recorded_memory_bytes: u64,
    /// Intervals in the file.
    pub intervals: u64,
    /// Recorded time.
    pub duration: Nanos,
    /// Where the replayed part starts in the recording.
    pub recorded_start: Nanos,
    /// Where it ends.
    pub recorded_end: Nanos,
    /// One pass in replay time.
    pub pass: Nanos,
    /// Whether the replay loops.
    pub looped: bool,
}

/// A case's settings: the workload, the guest, the link and the content.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaseParameters {
    /// Name in tables.
    pub name: String,
    /// The workload model and its parameters.
    pub workload: WorkloadModel,
    /// Guest memory, bytes.
    pub memory_bytes: u64,
    /// Page size, bytes.
    pub page_size: u64,
    /// Link bandwidth, bytes/s (`None`: unlimited).
    pub bandwidth: Option<u64>,
    /// One-way latency, µs.
    pub latency_us: f64,
    /// Bytes each frame costs beyond its own.
    pub per_frame_overhead: u32,
    /// Share of pages that start all-zero.
    pub zero_fraction: f64,
    /// Share of text-like pages.
    pub text_fraction: f64,
    /// Share of pages duplicating a template.
    pub duplicate_fraction: f64,
    /// Bytes a write changes.
    pub bytes_per_write: u32,
    /// Whether the destination's memory is verified (its hashing counts in resume and total
    /// time).
    pub verify: bool,
    /// How long the guest runs before migration starts, ms.
    pub warmup_ms: f64,
    /// The CPU cost model, as the simulator spells it.
    pub cpu: String,
    /// For a trace: its replay.
    pub trace: Option<TraceParameters>,
}

impl CaseParameters {
    fn of(c: &Case) -> Self {
        let s = &c.scenario;
        CaseParameters {
            name: c.name.clone(),
            workload: s.workload.clone(),
            memory_bytes: s.memory,
            page_size: s.page_size,
            bandwidth: limit(s.link.bandwidth),
            latency_us: s.link.latency.0 as f64 / 1e3,
            per_frame_overhead: s.link.per_frame_overhead,
            zero_fraction: s.content.zero_fraction,
            text_fraction: s.content.text_fraction,
            duplicate_fraction: s.content.duplicate_fraction,
            bytes_per_write: s.content.bytes_per_write,
            verify: s.verify,
            warmup_ms: s.warmup.as_millis_f64(),
            cpu: format!("{:?}", s.cpu),
            trace: c.trace.as_ref().map(|t| TraceParameters {
                recorded_memory_bytes: t.memory_bytes,
                intervals: t.intervals,
                duration: t.duration,
                recorded_start: t.plan.start,
                recorded_end: t.plan.end,
                pass: t.plan.pass,
                looped: t.plan.looped,
            }),
        }
    }

    /// The guest and link in words.
    pub fn setup(&self) -> String {
        format!(
            "{} guest ({} B pages), link {}, {} µs one way, {}% zero pages, verification {}",
            human_bytes(self.memory_bytes),
            self.page_size,
            self.bandwidth
                .map_or("unlimited".to_string(), |b| link_name(ByteRate(b))),
            self.latency_us,
            self.zero_fraction * 100.0,
            if self.verify { "on" } else { "off" }
        )
    }
}

impl Parameters {
    /// Every setting in words, one item a line (what `compare --list` prints under a preset).
    pub fn describe(&self) -> String {
        let mut out = String::from("  strategies:\n");
        for s in &self.strategies {
            out.push_str(&format!("    {:<24} {}\n", s.name, s.describe()));
        }
        out.push_str("  workloads:\n");
        let setups: Vec<String> = self.workloads.iter().map(|w| w.setup()).collect();
        let shared = setups.windows(2).all(|w| w[0] == w[1]);
        for (w, setup) in self.workloads.iter().zip(&setups) {
            out.push_str(&format!("    {:<24} {}\n", w.name, w.workload.describe()));
            if !shared {
                out.push_str(&format!("    {:<24} on a {setup}\n", ""));
            }
        }
        if let (true, Some(setup)) = (shared, setups.first()) {
            out.push_str(&format!("  each on a {setup}\n"));
        }
        out.push_str(&format!(
            "  seeds: {}\n",
            self.seeds
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        out
    }
}

/// The presets with their real parameters, for `compare --list`.
pub fn list() -> String {
    let mut out = String::new();
    for p in presets() {
        out.push_str(&format!("{:<20} {}\n", p.name, p.description));
        match Matrix::of(&p) {
            Ok(m) => out.push_str(&m.parameters().describe()),
            Err(e) => out.push_str(&format!("  (cannot be run: {e})\n")),
        }
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Running and sharding

/// Which part of the run list a process runs: shard `index` of `count` (from 1) takes the runs
/// whose position in the list, counted from 0, is `index - 1` modulo `count`. Dealing runs out
/// in turn spreads every strategy and workload (and so the slow runs) over all shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// Which shard, from 1.
    pub index: u32,
    /// How many.
    pub count: u32,
}

impl Shard {
    /// Every run.
    pub const ALL: Shard = Shard { index: 1, count: 1 };

    /// Whether run `job` of the list is in this shard.
    pub fn contains(&self, job: usize) -> bool {
        job % self.count as usize == (self.index - 1) as usize
    }
}

impl std::str::FromStr for Shard {
    type Err = String;

    /// `K/N`, with 1 ≤ K ≤ N.
    fn from_str(text: &str) -> Result<Shard, String> {
        let bad = || format!("'{text}' is not a shard: use K/N with 1 <= K <= N, as in 3/8");
        let (k, n) = text.split_once('/').ok_or_else(bad)?;
        let (index, count): (u32, u32) = (
            k.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if index == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// A run and its position in the matrix's run list (a line of a shard file).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexedRun {
    /// Position in the run list, from 0.
    pub index: usize,
    /// The run.
    pub run: Run,
}

/// Runs every strategy × workload × seed of `preset` on `threads` threads. `progress` is called
/// after each run with (done, total).
pub fn run(
    preset: &Preset,
    threads: usize,
    progress: impl Fn(usize, usize) + Sync,
) -> Result<Comparison, String> {
    let matrix = Matrix::of(preset)?;
    let runs = run_shard(&matrix, Shard::ALL, threads, progress)?;
    Ok(summarise(
        &matrix.info(),
        runs.into_iter().map(|r| r.run).collect(),
    ))
}

/// Runs the runs of `matrix` that `shard` takes, on `threads` threads, in run-list order.
/// `progress` is called after each run with (done, total in this shard).
pub fn run_shard(
    matrix: &Matrix,
    shard: Shard,
    threads: usize,
    progress: impl Fn(usize, usize) + Sync,
) -> Result<Vec<IndexedRun>, String> {
    let jobs: Vec<usize> = (0..matrix.len()).filter(|&i| shard.contains(i)).collect();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<IndexedRun, String>>>> =
        Mutex::new(vec![None; jobs.len()]);
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| loop {
                let slot = next.fetch_add(1, Ordering::Relaxed);
                let Some(&index) = jobs.get(slot) else {
                    return;
                };
                let (strategy, case, seed) = matrix.job(index);
                let scenario = Scenario {
                    seed,
                    engine: strategy.engine,
                    codec: strategy.codec,
                    sibling_image: strategy.sibling_image,
                    ..case.scenario.clone()
                };
                let result = simulate(&scenario)
                    .map(|outcome| IndexedRun {
                        index,
                        run: Run {
                            strategy: strategy.name.clone(),
                            workload: case.name.clone(),
                            seed,
                            trace: case.trace.as_ref().map(|t| {
                                t.coverage(case.scenario.warmup + outcome.report.preparation_time)
                            }),
                            outcome,
                        },
                    })
                    .map_err(|e| format!("{} on {} (seed {seed}): {e}", strategy.name, case.name));
                results.lock().unwrap()[slot] = Some(result);
                progress(done.fetch_add(1, Ordering::Relaxed) + 1, jobs.len());
            });
        }
    });
    results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.expect("every job ran"))
        .collect()
}

/// The comparison of `runs` (the whole run list, in order) of the matrix `info` describes.
pub fn summarise(info: &MatrixInfo, runs: Vec<Run>) -> Comparison {
    let mut rows = Vec::new();
    for s in &info.strategies {
        for w in &info.workloads {
            let group: Vec<&Run> = runs
                .iter()
                .filter(|r| &r.strategy == s && &r.workload == w)
                .collect();
            let metric = |f: &dyn Fn(&SimOutcome) -> f64| {
                Spread::of(group.iter().map(|r| f(&r.outcome)).collect())
            };
            rows.push(Row {
                strategy: s.clone(),
                workload: w.clone(),
                total_time_ms: metric(&|o| o.report.total_time.as_millis_f64()),
                downtime_ms: metric(&|o| o.report.downtime.as_millis_f64()),
                preparation_time_ms: metric(&|o| o.report.preparation_time.as_millis_f64()),
                resume_time_ms: metric(&|o| o.report.resume_time.as_millis_f64()),
                bytes_sent: metric(&|o| o.report.bytes_sent as f64),
                pages_resent: metric(&|o| o.report.pages_resent() as f64),
                rounds: metric(&|o| o.report.rounds.len() as f64),
                least_bytes: metric(&|o| o.bounds.least_bytes as f64),
                least_downtime_ms: metric(&|o| o.bounds.least_downtime.as_millis_f64()),
                clark: ModelRow::of(
                    &group
                        .iter()
                        .map(|r| &r.outcome.models.clark)
                        .collect::<Vec<_>>(),
                ),
                dirty_set_curve: ModelRow::of(
                    &group
                        .iter()
                        .map(|r| &r.outcome.models.dirty_set_curve)
                        .collect::<Vec<_>>(),
                ),
                paper000_total_time_ms: metric(&|o| o.models.paper000.total_time.as_millis_f64()),
                content: content_row(&group),
            });
        }
    }
    let claims = claim_checks(info, &rows, &runs);
    Comparison {
        preset: info.preset.clone(),
        description: info.description.clone(),
        claim: info.claim.clone(),
        baseline: info.baseline.clone(),
        parameters: info.parameters.clone(),
        rows,
        claims,
        runs,
    }
}

fn content_row(group: &[&Run]) -> Option<ContentRow> {
    let figures: Vec<&crate::sim::CodecFigures> = group
        .iter()
        .map(|r| r.outcome.codec.as_ref())
        .collect::<Option<_>>()?;
    let first = figures.first()?;
    let spread = |f: &dyn Fn(&crate::sim::CodecFigures) -> f64| {
        Spread::of(figures.iter().map(|c| f(c)).collect())
    };
    Some(ContentRow {
        codec: first.codec.clone(),
        saved_bytes: MECHANISMS
            .iter()
            .map(|m| (m.to_string(), spread(&|c| c.saved(m) as f64)))
            .collect(),
        saved_total: spread(&|c| c.saved_bytes as f64),
        encode_cpu_ms: spread(&|c| c.cpu.encode().as_millis_f64()),
        decode_cpu_ms: spread(&|c| c.cpu.decode.as_millis_f64()),
    })
}

fn pct_change(x: f64, base: f64) -> f64 {
    if base == 0.0 {
        0.0
    } else {
        (x - base) / base * 100.0
    }
}

/// Each claimed figure measured on each workload (medians over seeds).
fn claim_checks(info: &MatrixInfo, rows: &[Row], runs: &[Run]) -> Vec<ClaimCheck> {
    let Some(claim) = &info.claim else {
        return Vec::new();
    };
    let mut checks = Vec::new();
    for figure in &claim.figures {
        for w in &info.workloads {
            let row = |s: &str| rows.iter().find(|r| r.strategy == s && &r.workload == w);
            let measured = match figure.metric {
                ClaimMetric::TotalTime | ClaimMetric::Downtime | ClaimMetric::Bytes => {
                    let base = info.baseline.as_deref().and_then(row);
                    row(&figure.strategy).zip(base).map(|(r, b)| {
                        let pick = |r: &Row| match figure.metric {
                            ClaimMetric::TotalTime => r.total_time_ms.median,
                            ClaimMetric::Downtime => r.downtime_ms.median,
                            _ => r.bytes_sent.median,
                        };
                        pct_change(pick(r), pick(b))
                    })
                }
                ClaimMetric::KnownPages | ClaimMetric::DeduplicatedPages => {
                    let shares: Vec<f64> = runs
                        .iter()
                        .filter(|r| r.strategy == figure.strategy && &r.workload == w)
                        .map(|r| {
                            let rep = &r.outcome.report;
                            let e = &rep.encodings;
                            if figure.metric == ClaimMetric::KnownPages {
                                e.known.pages as f64 / rep.page_count.max(1) as f64 * 100.0
                            } else {
                                (e.zero.pages + e.reference.pages + e.known.pages) as f64
                                    / rep.pages_sent.max(1) as f64
                                    * 100.0
                            }
                        })
                        .collect();
                    (!shares.is_empty()).then(|| Spread::of(shares).median)
                }
            };
            checks.push(ClaimCheck {
                figure: figure.clone(),
                workload: w.clone(),
                measured_pct: measured,
            });
        }
    }
    checks
}

// ---------------------------------------------------------------------------------------------
// Shard files

/// What a shard file records about its matrix: enough to summarise the merged runs exactly as
/// an unsharded comparison would.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MatrixInfo {
    /// Preset name.
    pub preset: String,
    /// What it compares.
    pub description: String,
    /// The paper's claim.
    pub claim: Option<Claim>,
    /// The baseline strategy.
    pub baseline: Option<String>,
    /// Strategy names, in order.
    pub strategies: Vec<String>,
    /// Workload (case) names, in order.
    pub workloads: Vec<String>,
    /// The seeds.
    pub seeds: Vec<u64>,
    /// Runs in the whole matrix.
    pub runs: usize,
    /// A hash of every setting (trace files by name, not path): shards merge only with shards
    /// of the same fingerprint.
    pub fingerprint: String,
    /// Every setting.
    pub parameters: Parameters,
}

/// The format name in a shard file's first line.
pub const RUNS_FORMAT: &str = "memferry-compare-runs";
/// Its version.
pub const RUNS_FORMAT_VERSION: u32 = 2;

/// A shard file's first line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardHeader {
    /// [`RUNS_FORMAT`].
    pub format: String,
    /// [`RUNS_FORMAT_VERSION`].
    pub version: u32,
    /// The memferry that ran it.
    pub memferry_version: String,
    /// Which shard.
    pub shard: Shard,
    /// Runs in this shard.
    pub shard_runs: usize,
    /// The matrix.
    pub matrix: MatrixInfo,
}

#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum LineOut<'a> {
    Header(&'a ShardHeader),
    Run(&'a IndexedRun),
    End { runs: usize },
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum LineIn {
    Header(Box<ShardHeader>),
    Run(Box<IndexedRun>),
    End { runs: usize },
}

/// Writes `runs` (shard `shard` of `matrix`) as JSON lines: a header line with the matrix, one
/// line per run, and an end line with the count (a file cut short has none and is refused by
/// the merge).
pub fn write_runs(
    mut out: impl Write,
    matrix: &MatrixInfo,
    shard: Shard,
    runs: &[IndexedRun],
) -> std::io::Result<()> {
    let header = ShardHeader {
        format: RUNS_FORMAT.into(),
        version: RUNS_FORMAT_VERSION,
        memferry_version: env!("CARGO_PKG_VERSION").into(),
        shard,
        shard_runs: runs.len(),
        matrix: matrix.clone(),
    };
    let line = |out: &mut dyn Write, l: &LineOut| -> std::io::Result<()> {
        serde_json::to_writer(&mut *out, l)?;
        out.write_all(b"\n")
    };
    line(&mut out, &LineOut::Header(&header))?;
    for r in runs {
        line(&mut out, &LineOut::Run(r))?;
    }
    line(&mut out, &LineOut::End { runs: runs.len() })?;
    out.flush()
}

/// One shard file, read and checked.
#[derive(Clone, Debug)]
pub struct ShardFile {
    /// Its header.
    pub header: ShardHeader,
    /// Its runs.
    pub runs: Vec<IndexedRun>,
}

/// Reads a file [`write_runs`] wrote; `name` names it in errors.
pub fn read_runs(input: impl BufRead, name: &str) -> Result<ShardFile, String> {
    let mut header: Option<ShardHeader> = None;
    let mut runs = Vec::new();
    let mut ended = None;
    for (n, line) in input.lines().enumerate() {
        let line = line.map_err(|e| format!("{name}: {e}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = |what: String| format!("{name}, line {}: {what}", n + 1);
        if ended.is_some() {
            return Err(at("text after the end line".into()));
        }
        let parsed: LineIn = serde_json::from_str(&line).map_err(|e| {
            at(if header.is_none() {
                format!("not a memferry compare runs file ({e})")
            } else {
                e.to_string()
            })
        })?;
        match (parsed, &header) {
            (LineIn::Header(h), None) => {
                if h.format != RUNS_FORMAT || h.version != RUNS_FORMAT_VERSION {
                    return Err(at(format!(
                        "format {} version {}; this memferry reads {RUNS_FORMAT} version {RUNS_FORMAT_VERSION}",
                        h.format, h.version
                    )));
                }
                header = Some(*h);
            }
            (_, None) => return Err(at("not a memferry compare runs file (no header)".into())),
            (LineIn::Header(_), Some(_)) => return Err(at("a second header".into())),
            (LineIn::Run(r), Some(h)) => {
                if r.index >= h.matrix.runs || !h.shard.contains(r.index) {
                    return Err(at(format!(
                        "run {} does not belong to shard {} of a {}-run comparison",
                        r.index, h.shard, h.matrix.runs
                    )));
                }
                runs.push(*r);
            }
            (LineIn::End { runs: count }, Some(_)) => ended = Some(count),
        }
    }
    let header =
        header.ok_or_else(|| format!("{name}: empty, not a memferry compare runs file"))?;
    match ended {
        None => Err(format!(
            "{name}: cut short (no end line after {} runs): run shard {} again",
            runs.len(),
            header.shard
        )),
        Some(count) if count != runs.len() || count != header.shard_runs => Err(format!(
            "{name}: the end line counts {count} runs, the file holds {} and its header announced {}",
            runs.len(),
            header.shard_runs
        )),
        Some(_) => Ok(ShardFile { header, runs }),
    }
}

/// Merges shard files into the comparison an unsharded run would have printed. Every shard
/// of one comparison (same fingerprint, same shard count) must be there exactly once.
pub fn merge(files: Vec<(String, ShardFile)>) -> Result<Comparison, String> {
    let Some((first_name, first)) = files.first() else {
        return Err("nothing to merge: give the shard files".into());
    };
    let (info, count) = (&first.header.matrix, first.header.shard.count);
    let mut seen: Vec<Option<&str>> = vec![None; count as usize];
    for (name, file) in &files {
        let h = &file.header;
        let same = h.matrix.fingerprint == info.fingerprint
            && h.matrix.runs == info.runs
            && h.matrix.strategies == info.strategies
            && h.matrix.workloads == info.workloads
            && h.matrix.seeds == info.seeds;
        if !same {
            return Err(format!(
                "{name} comes from another comparison than {first_name} (fingerprint {} vs {}): different presets, workloads, seeds, settings or memferry versions",
                h.matrix.fingerprint, info.fingerprint
            ));
        }
        if h.shard.count != count {
            return Err(format!(
                "{name} is shard {} but {first_name} is shard {}: merge shards of one split",
                h.shard, first.header.shard
            ));
        }
        let slot = &mut seen[(h.shard.index - 1) as usize];
        if let Some(other) = slot {
            return Err(format!(
                "shard {} is given twice: {other} and {name}",
                h.shard
            ));
        }
        *slot = Some(name);
    }
    let missing: Vec<String> = seen
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_none())
        .map(|(i, _)| format!("{}/{count}", i + 1))
        .collect();
    if !missing.is_empty() {
        return Err(format!("missing shards: {}", missing.join(", ")));
    }
    let info = info.clone();
    let mut runs: Vec<Option<Run>> = vec![None; info.runs];
    for (name, file) in files {
        for r in file.runs {
            let slot = &mut runs[r.index];
            if slot.is_some() {
                return Err(format!("{name}: run {} appears twice", r.index));
            }
            *slot = Some(r.run);
        }
    }
    let runs: Vec<Run> = runs
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.ok_or_else(|| format!("run {i} is in no shard file")))
        .collect::<Result<_, _>>()?;
    Ok(summarise(&info, runs))
}

/// Reads and merges the shard files at `paths`.
pub fn merge_files(paths: &[impl AsRef<Path>]) -> Result<Comparison, String> {
    let mut files = Vec::new();
    for path in paths {
        let path = path.as_ref();
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| format!("cannot open {name}: {e}"))?;
        files.push((
            name.clone(),
            read_runs(std::io::BufReader::new(file), &name)?,
        ));
    }
    merge(files)
}

// ---------------------------------------------------------------------------------------------
// Printing

fn spread_text(s: &Spread, scale: f64, digits: usize) -> String {
    if s.min == s.max {
        format!("{:.*}", digits, s.median / scale)
    } else {
        format!(
            "{:.*} ({:.*}–{:.*})",
            digits,
            s.median / scale,
            digits,
            s.min / scale,
            digits,
            s.max / scale
        )
    }
}

/// A signed percentage over seeds: `+3.1 (-0.2–+5.0)`.
fn pct_text(s: &Spread) -> String {
    if s.min == s.max {
        format!("{:+.1}", s.median)
    } else {
        format!("{:+.1} ({:+.1}–{:+.1})", s.median, s.min, s.max)
    }
}

fn optional_text(s: Option<&Spread>, text: impl Fn(&Spread) -> String) -> String {
    s.map_or("-".into(), text)
}

/// The setup lines of the table: the guests and links (one line when every workload shares
/// them), verification, the seeds.
fn setup_text(c: &Comparison) -> String {
    let p = &c.parameters;
    let mut out = String::new();
    let setups: Vec<String> = p.workloads.iter().map(|w| w.setup()).collect();
    if setups.windows(2).all(|w| w[0] == w[1]) {
        if let Some(s) = setups.first() {
            out.push_str(&format!("setup: {s}\n"));
        }
    } else {
        out.push_str("setup:\n");
        for (w, s) in p.workloads.iter().zip(&setups) {
            out.push_str(&format!("  {}: {s}\n", w.name));
        }
    }
    out.push_str(&format!(
        "seeds: {}\n",
        p.seeds
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    out
}

/// What the trace workloads replayed: whether any run looped, or ran past the replay's end.
fn trace_notes(c: &Comparison) -> String {
    let mut out = String::new();
    for w in c.parameters.workloads.iter().filter(|w| w.trace.is_some()) {
        let runs: Vec<&TraceCoverage> = c
            .runs
            .iter()
            .filter(|r| r.workload == w.name)
            .filter_map(|r| r.trace.as_ref())
            .collect();
        if runs.is_empty() {
            continue;
        }
        let looped = runs.iter().filter(|t| t.looped_over()).count();
        let idle = runs
            .iter()
            .filter(|t| t.idle_after_end > Nanos::ZERO)
            .count();
        let most = runs.iter().map(|t| t.passes).fold(0.0, f64::max);
        let t = runs[0];
        let mut line = format!(
            "{}: replays recorded {:.3}-{:.3} s ({:.3} s a pass){}",
            w.name,
            t.recorded_start.as_secs_f64(),
            t.recorded_end.as_secs_f64(),
            t.pass.as_secs_f64(),
            if t.looped { ", looping" } else { ", once" }
        );
        if looped > 0 {
            line.push_str(&format!(
                "; LOOPED in {looped} of {} runs (up to {most:.2} passes)",
                runs.len()
            ));
        }
        if idle > 0 {
            line.push_str(&format!(
                "; ended before the pause in {idle} of {} runs (the guest then idle)",
                runs.len()
            ));
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The summary as a text table: medians, with the range over seeds in brackets.
pub fn table(c: &Comparison) -> String {
    let headers = [
        "strategy",
        "workload",
        "total ms",
        "downtime ms",
        "prep ms",
        "resume ms",
        "MB sent",
        "re-sent pages",
        "rounds",
        "least MB",
        "least downtime ms",
        "Clark total ms",
        "err %",
        "Clark downtime ms",
        "err %",
        "curve total ms",
        "err %",
        "curve downtime ms",
        "err %",
        "paper000 Tmig ms",
    ];
    let mut rows: Vec<Vec<String>> = vec![headers.iter().map(|h| h.to_string()).collect()];
    for r in &c.rows {
        rows.push(vec![
            r.strategy.clone(),
            r.workload.clone(),
            spread_text(&r.total_time_ms, 1.0, 1),
            spread_text(&r.downtime_ms, 1.0, 1),
            spread_text(&r.preparation_time_ms, 1.0, 1),
            spread_text(&r.resume_time_ms, 1.0, 1),
            spread_text(&r.bytes_sent, 1e6, 1),
            spread_text(&r.pages_resent, 1.0, 0),
            spread_text(&r.rounds, 1.0, 0),
            spread_text(&r.least_bytes, 1e6, 1),
            spread_text(&r.least_downtime_ms, 1.0, 1),
        ]);
        let row = rows.last_mut().expect("just pushed");
        for m in [&r.clark, &r.dirty_set_curve] {
            row.extend([
                spread_text(&m.total_time_ms, 1.0, 1),
                optional_text(m.total_time_error_pct.as_ref(), pct_text),
                optional_text(m.downtime_ms.as_ref(), |s| spread_text(s, 1.0, 1)),
                optional_text(m.downtime_error_pct.as_ref(), pct_text),
            ]);
        }
        row.push(spread_text(&r.paper000_total_time_ms, 1.0, 1));
    }
    let mut out = format!("{}: {}\n", c.preset, c.description);
    if let Some(claim) = &c.claim {
        out.push_str(&format!("claim: {}\n", claim.text));
    }
    out.push_str(&setup_text(c));
    out.push('\n');
    push_table(&mut out, &rows);
    if let Some(baseline) = c.baseline.as_deref() {
        out.push_str(&format!(
            "\nchange against {baseline} (median over seeds):\n"
        ));
        for r in c.rows.iter().filter(|r| r.strategy != baseline) {
            if let Some(b) = c
                .rows
                .iter()
                .find(|b| b.strategy == baseline && b.workload == r.workload)
            {
                let pct = |x: f64, base: f64| {
                    if base == 0.0 {
                        0.0
                    } else {
                        (x - base) / base * 100.0
                    }
                };
                out.push_str(&format!(
                    "  {:<26} {:<18} total time {:+6.2}%   bytes {:+6.2}%   downtime {:+6.2}%\n",
                    r.strategy,
                    r.workload,
                    pct(r.total_time_ms.median, b.total_time_ms.median),
                    pct(r.bytes_sent.median, b.bytes_sent.median),
                    pct(r.downtime_ms.median, b.downtime_ms.median),
                ));
            }
        }
        out.push('\n');
    }
    out.push_str(&content_table(c));
    if !c.claims.is_empty() {
        out.push_str("\nclaimed beside measured (median over seeds):\n");
        for k in &c.claims {
            let f = &k.figure;
            let against = match (f.metric.is_change(), c.baseline.as_deref()) {
                (true, Some(b)) => format!(" against {b}"),
                _ => String::new(),
            };
            out.push_str(&format!(
                "  {:<10} {:<21} {:<18} claimed {:<11} measured {} ({}{})\n",
                f.paper,
                f.metric.name(),
                k.workload,
                f.claimed,
                k.measured_pct
                    .map_or("-".to_string(), |m| if f.metric.is_change() {
                        format!("{m:+.1}%")
                    } else {
                        format!("{m:.1}%")
                    }),
                f.strategy,
                against
            ));
        }
        out.push('\n');
    }
    let notes = trace_notes(c);
    if !notes.is_empty() {
        out.push_str(&notes);
    }
    out.push_str("(median over seeds, range in brackets; least = lower bounds for any strategy; Clark and paper000 = analytic models fed this run's measured round-1 dirty rate; curve = the dirty-set model fed the workload's own dirty pages (Akoush et al.); err = a model's signed error against the simulated run; the models predict plain pre-copy, and with verification on their totals include hashing memory once; with verification on, total and resume time include the source hashing its memory after the destination starts)\n");
    out
}

/// The content block of the table: per row with a codec or a sibling image, the payload bytes
/// each mechanism saved and the codec's CPU time (empty when no run has any).
fn content_table(c: &Comparison) -> String {
    if c.rows.iter().all(|r| r.content.is_none()) {
        return String::new();
    }
    let mut headers = vec!["strategy".to_string(), "workload".into(), "codec".into()];
    headers.extend(MECHANISMS.iter().map(|m| format!("{m} MB saved")));
    headers.extend([
        "total MB saved".into(),
        "encode cpu ms".into(),
        "decode cpu ms".into(),
    ]);
    let mut rows = vec![headers];
    for r in &c.rows {
        let Some(k) = &r.content else { continue };
        let mut row = vec![r.strategy.clone(), r.workload.clone(), k.codec.clone()];
        row.extend(k.saved_bytes.iter().map(|(_, s)| spread_text(s, 1e6, 1)));
        row.extend([
            spread_text(&k.saved_total, 1e6, 1),
            spread_text(&k.encode_cpu_ms, 1.0, 1),
            spread_text(&k.decode_cpu_ms, 1.0, 1),
        ]);
        rows.push(row);
    }
    let mut out = String::from(
        "\ncontent (payload bytes saved against raw pages per mechanism; CPU time of the codec, modelled):\n",
    );
    push_table(&mut out, &rows);
    out
}

/// Appends `rows` (the first one the header) as columns padded to their widest cell, two
/// spaces apart, with a rule of dashes under the header.
fn push_table(out: &mut String, rows: &[Vec<String>]) {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for (n, r) in rows.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if n == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            out.push_str(&rule.join("  "));
            out.push('\n');
        }
    }
}

/// A CSV field: quoted when it holds a comma, a quote or a line break.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// A model's total time, its error, its downtime and its error, as CSV fields each followed by
/// a comma (empty where the model predicts nothing).
fn model_csv(p: &ModelPrediction) -> String {
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.3}"));
    format!(
        "{:.3},{},{},{},",
        p.total_time.as_millis_f64(),
        opt(p.total_time_error_pct),
        opt(p.downtime.map(|d| d.as_millis_f64())),
        opt(p.downtime_error_pct)
    )
}

/// Every run as CSV, one line per strategy × workload × seed.
pub fn csv(c: &Comparison) -> String {
    let mut out = String::from("preset,strategy,workload,seed,total_time_ms,downtime_ms,preparation_time_ms,resume_time_ms,bytes_sent,pages_sent,pages_resent,rounds,stop_reason,least_bytes,least_downtime_ms,writes,clark_total_time_ms,clark_total_error_pct,clark_downtime_ms,clark_downtime_error_pct,curve_total_time_ms,curve_total_error_pct,curve_downtime_ms,curve_downtime_error_pct,paper000_total_time_ms,codec,saved_zero,saved_lz4,saved_zstd,saved_delta,saved_reference,saved_known,saved_bytes,encode_cpu_ms,decode_cpu_ms\n");
    for r in &c.runs {
        let (rep, m) = (&r.outcome.report, &r.outcome.models);
        out.push_str(&format!(
            "{},{},{},{},{:.3},{:.3},{:.3},{:.3},{},{},{},{},{},{},{:.3},{},{}{:.3},{}\n",
            csv_field(&c.preset),
            csv_field(&r.strategy),
            csv_field(&r.workload),
            r.seed,
            rep.total_time.as_millis_f64(),
            rep.downtime.as_millis_f64(),
            rep.preparation_time.as_millis_f64(),
            rep.resume_time.as_millis_f64(),
            rep.bytes_sent,
            rep.pages_sent,
            rep.pages_resent(),
            rep.rounds.len(),
            rep.stop_reason.map_or("", |s| s.as_str()),
            r.outcome.bounds.least_bytes,
            r.outcome.bounds.least_downtime.as_millis_f64(),
            r.outcome.writes,
            [&m.clark, &m.dirty_set_curve]
                .iter()
                .map(|p| model_csv(p))
                .collect::<String>(),
            m.paper000.total_time.as_millis_f64(),
            content_csv(r.outcome.codec.as_ref()),
        ));
    }
    out
}

/// A run's codec columns (the codec, bytes saved per mechanism and in all, CPU ms), empty
/// fields without a codec.
fn content_csv(figures: Option<&crate::sim::CodecFigures>) -> String {
    let Some(f) = figures else {
        return "none".to_string() + &",".repeat(MECHANISMS.len() + 3);
    };
    let mut fields = vec![f.codec.clone()];
    fields.extend(MECHANISMS.iter().map(|m| f.saved(m).to_string()));
    fields.extend([
        f.saved_bytes.to_string(),
        format!("{:.3}", f.cpu.encode().as_millis_f64()),
        format!("{:.3}", f.cpu.decode.as_millis_f64()),
    ]);
    fields.join(",")
}
