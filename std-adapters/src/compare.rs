//! `memferry compare`: strategies × workloads × seeds in the simulator, summarised as a table
//! (medians and spread over seeds), CSV, JSON and SVG plots.
//!
//! Each paper's comparison is a named [`Preset`]; a preset may carry the paper's claimed figure,
//! printed beside the measured one. Every number comes from the deterministic simulator, so a
//! preset prints the same table on every run and every machine; only the wall-clock line on
//! stderr varies.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use memferry::schedule::{RatePlan, StopRules};
use memferry::strategy::PreCopyConfig;
use memferry::time::{ByteRate, Nanos};
use memferry::track::PredictorKind;
use serde::Serialize;

use crate::sim::{simulate, LinkModel, Scenario, SimOutcome, WorkloadModel};

/// One strategy: a name and the engine settings that make it.
#[derive(Clone, Debug)]
pub struct Strategy {
    /// Name in tables.
    pub name: String,
    /// Engine settings.
    pub engine: PreCopyConfig,
}

/// A figure a paper claims, to print beside the measurement.
#[derive(Clone, Debug, Serialize)]
pub struct Claim {
    /// Which paper and what it claims, in words.
    pub text: String,
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
        })
        .collect()
}

fn standard_workloads(rate: f64) -> Vec<WorkloadModel> {
    vec![
        WorkloadModel::Idle,
        WorkloadModel::Uniform { rate },
        WorkloadModel::HotCold {
            rate,
            hot_fraction: 0.05,
            hot_share: 0.9,
        },
        WorkloadModel::Zipf {
            rate,
            exponent: 1.0,
        },
        WorkloadModel::Sweep {
            rate,
            start_fraction: 0.25,
            length_fraction: 0.25,
        },
        WorkloadModel::Phases {
            rate,
            hot_fraction: 0.05,
            hot_share: 0.9,
            period: Nanos::from_millis(500),
        },
    ]
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
            claim: Some(Claim { text: "paper 002 (Clark): round i lasts M·D^i/B^(i+1); the model's columns are printed beside the simulation".into() }),
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
            base,
            claim: Some(Claim { text: "paper 004: more rounds trade total time and bytes for downtime".into() }),
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
            base: Scenario { memory: 1 << 30, verify: false, ..Scenario::default() },
            claim: Some(Claim {
                text: "paper 001: holding frequently updated pages to the last round sends 34% less data in 32.5% less time; paper 003: hot pages recognised from the history of dirty pages are sent at the end".into(),
            }),
            baseline: Some("pre-copy"),
        },
        Preset {
            name: "wsclock-vs-precopy",
            description: "writable-working-set predictors against plain pre-copy at the same downtime target (1 GiB guest, 10 Gbit/s link, 1M writes/s)",
            strategies: with_predictors(&["none", "wsclock", "lru", "splay", "history"], predictor_stop),
            workloads: vec![
                WorkloadModel::HotCold { rate: 1_000_000.0, hot_fraction: 0.05, hot_share: 0.95 },
                WorkloadModel::HotCold { rate: 1_000_000.0, hot_fraction: 0.10, hot_share: 0.95 },
                WorkloadModel::Uniform { rate: 50_000.0 },
            ],
            seeds: vec![1, 2, 3],
            base: Scenario { memory: 1 << 30, verify: false, ..Scenario::default() },
            claim: Some(Claim {
                text: "paper 004 (Zaw and Thein, LRU/splay): -11.45% total migration time, -23.67% data; paper 002: WSClock improves on it. Predictors must not hurt on uniform writes (within 2%).".into(),
            }),
            baseline: Some("pre-copy"),
        },
    ]
}

/// One run of the matrix.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    /// Strategy name.
    pub strategy: String,
    /// Workload name.
    pub workload: String,
    /// Seed.
    pub seed: u64,
    /// The outcome.
    pub outcome: SimOutcome,
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
    /// The oracle's downtime, ms.
    pub least_downtime_ms: Spread,
    /// Clark's geometric series: total time, ms.
    pub model_total_time_ms: Spread,
    /// Clark's geometric series: downtime, ms.
    pub model_downtime_ms: Spread,
    /// Paper 000's Tmig, ms.
    pub paper000_total_time_ms: Spread,
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
    /// One row per strategy × workload.
    pub rows: Vec<Row>,
    /// Every run.
    pub runs: Vec<Run>,
}

/// Runs every strategy × workload × seed of `preset` on `threads` threads. `progress` is called
/// after each run with (done, total).
pub fn run(
    preset: &Preset,
    threads: usize,
    progress: impl Fn(usize, usize) + Sync,
) -> Result<Comparison, String> {
    let mut jobs = Vec::new();
    for s in &preset.strategies {
        for w in &preset.workloads {
            for &seed in &preset.seeds {
                jobs.push((s.clone(), w.clone(), seed));
            }
        }
    }
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<Run, String>>>> = Mutex::new(vec![None; jobs.len()]);
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((strategy, workload, seed)) = jobs.get(i) else {
                    return;
                };
                let scenario = Scenario {
                    workload: workload.clone(),
                    seed: *seed,
                    engine: strategy.engine,
                    ..preset.base.clone()
                };
                let result = simulate(&scenario)
                    .map(|outcome| Run {
                        strategy: strategy.name.clone(),
                        workload: workload.name(),
                        seed: *seed,
                        outcome,
                    })
                    .map_err(|e| {
                        format!(
                            "{} on {} (seed {seed}): {e}",
                            strategy.name,
                            workload.name()
                        )
                    });
                results.lock().unwrap()[i] = Some(result);
                progress(done.fetch_add(1, Ordering::Relaxed) + 1, jobs.len());
            });
        }
    });
    let runs: Vec<Run> = results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.expect("every job ran"))
        .collect::<Result<_, _>>()?;
    let mut rows = Vec::new();
    for s in &preset.strategies {
        for w in &preset.workloads {
            let group: Vec<&Run> = runs
                .iter()
                .filter(|r| r.strategy == s.name && r.workload == w.name())
                .collect();
            let metric = |f: &dyn Fn(&SimOutcome) -> f64| {
                Spread::of(group.iter().map(|r| f(&r.outcome)).collect())
            };
            rows.push(Row {
                strategy: s.name.clone(),
                workload: w.name(),
                total_time_ms: metric(&|o| o.report.total_time.as_millis_f64()),
                downtime_ms: metric(&|o| o.report.downtime.as_millis_f64()),
                preparation_time_ms: metric(&|o| o.report.preparation_time.as_millis_f64()),
                resume_time_ms: metric(&|o| o.report.resume_time.as_millis_f64()),
                bytes_sent: metric(&|o| o.report.bytes_sent as f64),
                pages_resent: metric(&|o| o.report.pages_resent() as f64),
                rounds: metric(&|o| o.report.rounds.len() as f64),
                least_bytes: metric(&|o| o.bounds.least_bytes as f64),
                least_downtime_ms: metric(&|o| o.bounds.least_downtime.as_millis_f64()),
                model_total_time_ms: metric(&|o| o.models.precopy_total_time.as_millis_f64()),
                model_downtime_ms: metric(&|o| o.models.precopy_downtime.as_millis_f64()),
                paper000_total_time_ms: metric(&|o| o.models.paper000_total_time.as_millis_f64()),
            });
        }
    }
    Ok(Comparison {
        preset: preset.name.into(),
        description: preset.description.into(),
        claim: preset.claim.clone(),
        baseline: preset.baseline.map(String::from),
        rows,
        runs,
    })
}

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
        "Clark downtime ms",
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
            spread_text(&r.model_total_time_ms, 1.0, 1),
            spread_text(&r.model_downtime_ms, 1.0, 1),
            spread_text(&r.paper000_total_time_ms, 1.0, 1),
        ]);
    }
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = format!("{}: {}\n", c.preset, c.description);
    if let Some(claim) = &c.claim {
        out.push_str(&format!("claim: {}\n", claim.text));
    }
    out.push('\n');
    for (n, r) in rows.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if n == 0 {
            out.push_str(
                &widths
                    .iter()
                    .map(|w| "-".repeat(*w))
                    .collect::<Vec<_>>()
                    .join("  "),
            );
            out.push('\n');
        }
    }
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
    out.push_str("(median over seeds, range in brackets; least = lower bounds for any strategy; Clark and paper000 = analytic models fed this run's measured round-1 dirty rate)\n");
    out
}

/// Every run as CSV, one line per strategy × workload × seed.
pub fn csv(c: &Comparison) -> String {
    let mut out = String::from("preset,strategy,workload,seed,total_time_ms,downtime_ms,preparation_time_ms,resume_time_ms,bytes_sent,pages_sent,pages_resent,rounds,stop_reason,least_bytes,least_downtime_ms,writes,model_total_time_ms,model_downtime_ms,paper000_total_time_ms\n");
    for r in &c.runs {
        let rep = &r.outcome.report;
        out.push_str(&format!(
            "{},{},{},{},{:.3},{:.3},{:.3},{:.3},{},{},{},{},{},{},{:.3},{},{:.3},{:.3},{:.3}\n",
            c.preset,
            r.strategy,
            r.workload,
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
            r.outcome.models.precopy_total_time.as_millis_f64(),
            r.outcome.models.precopy_downtime.as_millis_f64(),
            r.outcome.models.paper000_total_time.as_millis_f64(),
        ));
    }
    out
}
