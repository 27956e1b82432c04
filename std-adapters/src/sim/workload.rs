//! Workload models for the simulator: who writes which page when, in virtual time.
//!
//! Every model is deterministic for a given seed. Rates are writes per second of virtual time;
//! a write dirties one page (the content model decides how many bytes it changes).
//!
//! Models: [`WorkloadModel::Idle`], uniform random writes, hot/cold (a hot fraction of memory
//! takes a share of writes), Zipf-skewed (page rank r is written with probability ∝ 1/r^s),
//! sequential sweep (a scan or a garbage collector rewriting a region in order, looping),
//! phase changes (a hot/cold workload whose hot set moves every period), and recorded traces
//! (a window of the recording, at its speed or scaled, once or looping).
//!
//! [`WorkloadModel::parse`] reads the command line's spelling (`hotcold:rate=1e6,hot_share=0.95`,
//! `trace:app.mft`); [`fit_guest`] decides the guest a workload runs on (a trace brings its
//! own); [`TraceSummary`] checks a trace once and says what a run of it replayed.

use memferry::page::Geometry;
use memferry::time::Nanos;
use rand_core::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::{Deserialize, Serialize};

use crate::trace::{AtEnd, ReplayOptions, ReplayPlan, Speed, TraceHeader, TraceReplay};
use crate::workload::below;

/// A workload model and its parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "snake_case")]
pub enum WorkloadModel {
    /// No writes at all.
    Idle,
    /// Every page equally likely.
    Uniform {
        /// Writes per second.
        rate: f64,
    },
    /// A share of writes goes to the first `hot_fraction` of memory.
    HotCold {
        /// Writes per second.
        rate: f64,
        /// Fraction of memory that is hot.
        hot_fraction: f64,
        /// Share of writes to the hot set.
        hot_share: f64,
    },
    /// Page of rank r (page r-1) written with probability ∝ 1/r^exponent.
    Zipf {
        /// Writes per second.
        rate: f64,
        /// Skew (1.0 is classic Zipf).
        exponent: f64,
    },
    /// Rewrites `length_fraction` of memory from `start_fraction` in page order, looping.
    Sweep {
        /// Pages per second.
        rate: f64,
        /// Where the region starts, as a fraction of memory.
        start_fraction: f64,
        /// How long it is, as a fraction of memory.
        length_fraction: f64,
    },
    /// A recorded trace (`memferry record`), replayed: each interval's dirty pages are written
    /// spread evenly across the interval. Replay time 0 is `start` in the recording.
    Trace {
        /// The trace file.
        path: String,
        /// Play the window again at its end (otherwise the guest goes idle).
        looped: bool,
        /// Where replay starts in the recording (recorded time).
        #[serde(default)]
        start: Nanos,
        /// How much of the recording to replay from `start` (recorded time; `None`: to its end).
        #[serde(default)]
        length: Option<Nanos>,
        /// Replay speed: 2 plays the recording in half its time (twice the dirty rate).
        #[serde(default = "recorded_speed")]
        speed: f64,
    },
    /// Hot/cold, with the hot set moving to the next slice of memory every `period`.
    Phases {
        /// Writes per second.
        rate: f64,
        /// Fraction of memory that is hot.
        hot_fraction: f64,
        /// Share of writes to the hot set.
        hot_share: f64,
        /// How long each phase lasts.
        period: Nanos,
    },
}

fn recorded_speed() -> f64 {
    1.0
}

/// A duration for names and messages: `250ms`, `10s`, `1.5s`.
pub fn short_duration(t: Nanos) -> String {
    let ns = t.0;
    if ns == 0 {
        "0s".into()
    } else if ns.is_multiple_of(1_000_000_000) {
        format!("{}s", ns / 1_000_000_000)
    } else if ns >= 1_000_000_000 {
        format!("{}s", ns as f64 / 1e9)
    } else if ns.is_multiple_of(1_000_000) {
        format!("{}ms", ns / 1_000_000)
    } else if ns >= 1_000_000 {
        format!("{}ms", ns as f64 / 1e6)
    } else if ns.is_multiple_of(1_000) {
        format!("{}us", ns / 1_000)
    } else {
        format!("{ns}ns")
    }
}

/// A duration as the workload specs write it: a number and `ns`, `us`, `ms`, `s` or `min`.
pub fn parse_short_duration(text: &str) -> Result<Nanos, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(|| format!("'{text}' is not a duration: give a unit, as in 500ms or 2s"))?;
    let (number, unit) = t.split_at(split);
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a duration; try 500ms or 2s"))?;
    let scale = match unit {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "min" => 60e9,
        _ => {
            return Err(format!(
                "'{text}': unknown unit '{unit}'; use ns, us, ms, s or min"
            ))
        }
    };
    if !(n.is_finite() && n >= 0.0) {
        return Err(format!(
            "'{text}' is not a duration; it must not be negative"
        ));
    }
    Ok(Nanos((n * scale).round() as u64))
}

impl WorkloadModel {
    /// A short name for tables: the model, its shape, and its rate. A trace is named by its
    /// file name, then the window, speed and looping when they are not the defaults
    /// (`trace:app.mft[5s+10s x2 loop]`).
    pub fn name(&self) -> String {
        let rate = |r: f64| {
            if r >= 1000.0 {
                format!("{}k", r / 1000.0)
            } else {
                format!("{r}")
            }
        };
        match self {
            WorkloadModel::Idle => "idle".into(),
            WorkloadModel::Trace {
                path,
                looped,
                start,
                length,
                speed,
            } => {
                let mut name = format!(
                    "trace:{}",
                    std::path::Path::new(path)
                        .file_name()
                        .map_or(path.as_str(), |n| n.to_str().unwrap_or(path))
                );
                let mut extras = Vec::new();
                if *start != Nanos::ZERO || length.is_some() {
                    extras.push(format!(
                        "{}+{}",
                        short_duration(*start),
                        length.map_or("end".to_string(), short_duration)
                    ));
                }
                if *speed != 1.0 {
                    extras.push(format!("x{speed}"));
                }
                if *looped {
                    extras.push("loop".into());
                }
                if !extras.is_empty() {
                    name.push_str(&format!("[{}]", extras.join(" ")));
                }
                name
            }
            WorkloadModel::Uniform { rate: r } => format!("uniform@{}", rate(*r)),
            WorkloadModel::HotCold {
                rate: r,
                hot_fraction,
                ..
            } => format!("hotcold-{}%@{}", hot_fraction * 100.0, rate(*r)),
            WorkloadModel::Zipf { rate: r, exponent } => format!("zipf-{exponent}@{}", rate(*r)),
            WorkloadModel::Sweep {
                rate: r,
                length_fraction,
                ..
            } => format!("sweep-{}%@{}", length_fraction * 100.0, rate(*r)),
            WorkloadModel::Phases {
                rate: r,
                hot_fraction,
                ..
            } => format!("phases-{}%@{}", hot_fraction * 100.0, rate(*r)),
        }
    }

    /// Every parameter in words, for `compare --list` and the tables' setup lines.
    pub fn describe(&self) -> String {
        let pct = |f: f64| format!("{}%", f * 100.0);
        match self {
            WorkloadModel::Idle => "idle: no writes".into(),
            WorkloadModel::Uniform { rate } => {
                format!("uniform: {rate} writes/s, every page equally likely")
            }
            WorkloadModel::HotCold {
                rate,
                hot_fraction,
                hot_share,
            } => format!(
                "hot/cold: {rate} writes/s, {} of them to the first {} of memory",
                pct(*hot_share),
                pct(*hot_fraction)
            ),
            WorkloadModel::Zipf { rate, exponent } => {
                format!(
                    "zipf: {rate} writes/s, page rank r written with probability ∝ 1/r^{exponent}"
                )
            }
            WorkloadModel::Sweep {
                rate,
                start_fraction,
                length_fraction,
            } => format!(
                "sweep: {rate} pages/s rewriting {} of memory in order from {}, looping",
                pct(*length_fraction),
                pct(*start_fraction)
            ),
            WorkloadModel::Phases {
                rate,
                hot_fraction,
                hot_share,
                period,
            } => format!(
                "phases: {rate} writes/s, {} of them to a hot {} of memory that moves every {}",
                pct(*hot_share),
                pct(*hot_fraction),
                short_duration(*period)
            ),
            WorkloadModel::Trace {
                path,
                looped,
                start,
                length,
                speed,
            } => format!(
                "trace {path}: recorded time {} to {}, at {speed}x speed, {}",
                short_duration(*start),
                length.map_or("its end".to_string(), |l| short_duration(*start + l)),
                if *looped {
                    "looping"
                } else {
                    "once (then the guest is idle)"
                }
            ),
        }
    }

    /// The model called `name` at `rate`, with this project's default parameters: hot/cold and
    /// phases put 90% of writes on 5% of memory (phases move every 500 ms), Zipf has exponent
    /// 1, a sweep rewrites a quarter of memory; `trace:FILE` replays the whole recording once
    /// at its speed.
    pub fn named(name: &str, rate: f64) -> Option<WorkloadModel> {
        if let Some(path) = name.strip_prefix("trace:") {
            return Some(WorkloadModel::trace(path));
        }
        Some(match name {
            "idle" => WorkloadModel::Idle,
            "uniform" => WorkloadModel::Uniform { rate },
            "hotcold" => WorkloadModel::HotCold {
                rate,
                hot_fraction: 0.05,
                hot_share: 0.9,
            },
            "zipf" => WorkloadModel::Zipf {
                rate,
                exponent: 1.0,
            },
            "sweep" => WorkloadModel::Sweep {
                rate,
                start_fraction: 0.25,
                length_fraction: 0.25,
            },
            "phases" => WorkloadModel::Phases {
                rate,
                hot_fraction: 0.05,
                hot_share: 0.9,
                period: Nanos::from_millis(500),
            },
            _ => return None,
        })
    }

    /// The whole recording in `path`, once, at its recorded speed.
    pub fn trace(path: impl Into<String>) -> WorkloadModel {
        WorkloadModel::Trace {
            path: path.into(),
            looped: false,
            start: Nanos::ZERO,
            length: None,
            speed: 1.0,
        }
    }

    /// A workload as the command line spells it: `trace:FILE`, or a built-in model's name
    /// (idle, uniform, hotcold, zipf, sweep, phases) with optional parameters after a colon,
    /// `hotcold:rate=1e6,hot_fraction=0.05,hot_share=0.95`. Parameters: `rate` (all but idle;
    /// default `default_rate`), `hot_fraction` and `hot_share` (hotcold, phases), `period`
    /// (phases, a duration such as 500ms), `exponent` (zipf), `start_fraction` and
    /// `length_fraction` (sweep). An unknown parameter, or one the model does not take, is an
    /// error.
    pub fn parse(spec: &str, default_rate: f64) -> Result<WorkloadModel, String> {
        if let Some(path) = spec.strip_prefix("trace:") {
            if path.is_empty() {
                return Err("trace: needs a file, as in trace:app.mft".into());
            }
            return Ok(WorkloadModel::trace(path));
        }
        let (name, params) = match spec.split_once(':') {
            Some((name, params)) => (name, params),
            None => (spec, ""),
        };
        let mut model = WorkloadModel::named(name, default_rate).ok_or_else(|| {
            format!(
                "no workload '{name}'; try idle, uniform, hotcold, zipf, sweep, phases or trace:FILE"
            )
        })?;
        for param in params.split(',').filter(|p| !p.trim().is_empty()) {
            let (key, value) = param
                .split_once('=')
                .ok_or_else(|| format!("'{param}' in '{spec}' is not key=value"))?;
            let (key, value) = (key.trim(), value.trim());
            let number = || -> Result<f64, String> {
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| format!("{key}={value} in '{spec}' is not a number"))
            };
            let fraction = || -> Result<f64, String> {
                let v = number()?;
                if (0.0..=1.0).contains(&v) {
                    Ok(v)
                } else {
                    Err(format!("{key}={value} in '{spec}' must be between 0 and 1"))
                }
            };
            let slot: Option<&mut f64> = match (&mut model, key) {
                (
                    WorkloadModel::Uniform { rate }
                    | WorkloadModel::HotCold { rate, .. }
                    | WorkloadModel::Zipf { rate, .. }
                    | WorkloadModel::Sweep { rate, .. }
                    | WorkloadModel::Phases { rate, .. },
                    "rate",
                ) => {
                    let v = number()?;
                    if v < 0.0 {
                        return Err(format!("rate={value} in '{spec}' must not be negative"));
                    }
                    *rate = v;
                    None
                }
                (
                    WorkloadModel::HotCold { hot_fraction, .. }
                    | WorkloadModel::Phases { hot_fraction, .. },
                    "hot_fraction",
                ) => Some(hot_fraction),
                (
                    WorkloadModel::HotCold { hot_share, .. }
                    | WorkloadModel::Phases { hot_share, .. },
                    "hot_share",
                ) => Some(hot_share),
                (WorkloadModel::Sweep { start_fraction, .. }, "start_fraction") => {
                    Some(start_fraction)
                }
                (
                    WorkloadModel::Sweep {
                        length_fraction, ..
                    },
                    "length_fraction",
                ) => Some(length_fraction),
                (WorkloadModel::Zipf { exponent, .. }, "exponent") => {
                    let v = number()?;
                    if v <= 0.0 {
                        return Err(format!("exponent={value} in '{spec}' must be positive"));
                    }
                    *exponent = v;
                    None
                }
                (WorkloadModel::Phases { period, .. }, "period") => {
                    let p = parse_short_duration(value)?;
                    if p == Nanos::ZERO {
                        return Err(format!("period={value} in '{spec}' must be positive"));
                    }
                    *period = p;
                    None
                }
                _ => {
                    return Err(format!(
                        "workload {name} has no parameter '{key}' (in '{spec}')"
                    ))
                }
            };
            if let Some(slot) = slot {
                *slot = fraction()?;
            }
        }
        Ok(model)
    }

    /// Writes per second (0 for idle and for a trace, whose rate is in its file).
    pub fn rate(&self) -> f64 {
        match *self {
            WorkloadModel::Idle | WorkloadModel::Trace { .. } => 0.0,
            WorkloadModel::Uniform { rate }
            | WorkloadModel::HotCold { rate, .. }
            | WorkloadModel::Zipf { rate, .. }
            | WorkloadModel::Sweep { rate, .. }
            | WorkloadModel::Phases { rate, .. } => rate,
        }
    }

    /// Whether the model writes at a rate of its own (every model but idle and traces).
    pub fn has_rate(&self) -> bool {
        !matches!(self, WorkloadModel::Idle | WorkloadModel::Trace { .. })
    }

    /// The trace file, for a trace.
    pub fn trace_path(&self) -> Option<&str> {
        match self {
            WorkloadModel::Trace { path, .. } => Some(path),
            _ => None,
        }
    }

    /// How a trace model replays its file (`None` for the other models, or for a speed that
    /// is not a positive number).
    pub fn replay_options(&self) -> Option<ReplayOptions> {
        match self {
            WorkloadModel::Trace {
                looped,
                start,
                length,
                speed,
                ..
            } => Some(ReplayOptions {
                at_end: if *looped { AtEnd::Loop } else { AtEnd::Stop },
                start: *start,
                length: *length,
                speed: Speed::new(*speed)?,
            }),
            _ => None,
        }
    }
}

/// A trace checked from end to end ([`crate::trace::inspect`]): what it holds, and what a
/// model's replay of it plays.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TraceSummary {
    /// The file.
    pub path: String,
    /// Its header.
    #[serde(skip)]
    pub header: TraceHeader,
    /// Guest memory it was recorded from, bytes.
    pub memory_bytes: u64,
    /// Its page size, bytes.
    pub page_size: u64,
    /// Intervals in the file.
    pub intervals: u64,
    /// Recorded time, the intervals' lengths summed.
    pub duration: Nanos,
    /// Dirty pages over all intervals.
    pub dirty_pages: u64,
    /// What the replay plays.
    #[serde(skip)]
    pub plan: ReplayPlan,
}

impl TraceSummary {
    /// Reads and checks the trace of `model` (every checksum) and its replay settings: a
    /// start at or past the trace's end, a zero length or a speed that is not positive is an
    /// error. `Ok(None)` for models other than traces.
    pub fn of(model: &WorkloadModel) -> Result<Option<TraceSummary>, String> {
        let WorkloadModel::Trace {
            path,
            start,
            length,
            speed,
            ..
        } = model
        else {
            return Ok(None);
        };
        let options = model.replay_options().ok_or_else(|| {
            format!("trace {path}: the speed must be a positive number, not {speed}")
        })?;
        if *length == Some(Nanos::ZERO) {
            return Err(format!(
                "trace {path}: the replayed length must be positive"
            ));
        }
        let file =
            std::fs::File::open(path).map_err(|e| format!("cannot open trace {path}: {e}"))?;
        let info = crate::trace::inspect(std::io::BufReader::new(file))
            .map_err(|e| format!("trace {path}: {e}"))?;
        if *start >= info.duration {
            return Err(format!(
                "trace {path}: the replay starts at {:.3} s of recorded time, at or past the end of the recording ({:.3} s long)",
                start.as_secs_f64(),
                info.duration.as_secs_f64()
            ));
        }
        let geometry = info.header.geometry;
        Ok(Some(TraceSummary {
            path: path.clone(),
            memory_bytes: geometry.memory_bytes(),
            page_size: geometry.page_size().bytes() as u64,
            intervals: info.intervals,
            duration: info.duration,
            dirty_pages: info.dirty_pages,
            plan: options.plan(info.duration),
            header: info.header,
        }))
    }

    /// Whether the window asked for runs past the recording's end.
    pub fn window_cut_short(&self, model: &WorkloadModel) -> bool {
        match model {
            WorkloadModel::Trace {
                start,
                length: Some(length),
                ..
            } => Nanos(start.0.saturating_add(length.0)) > self.duration,
            _ => false,
        }
    }

    /// What a guest that ran `replayed` (replay time: the warm-up and the pre-copy rounds, until
    /// the pause) played of this trace.
    pub fn coverage(&self, replayed: Nanos) -> TraceCoverage {
        TraceCoverage {
            recorded_start: self.plan.start,
            recorded_end: self.plan.end,
            pass: self.plan.pass,
            looped: self.plan.looped,
            replayed,
            passes: self.plan.passes(replayed),
            idle_after_end: self.plan.idle_after_end(replayed),
        }
    }
}

/// What one run replayed of a trace.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceCoverage {
    /// Where the replayed part starts in the recording.
    pub recorded_start: Nanos,
    /// Where it ends in the recording.
    pub recorded_end: Nanos,
    /// How long one pass lasts in replay time.
    pub pass: Nanos,
    /// Whether the replay loops.
    pub looped: bool,
    /// How long the guest ran (replay time).
    pub replayed: Nanos,
    /// Passes played (fractional; above 1 only when looping).
    pub passes: f64,
    /// Time the guest was idle because a replay that does not loop had ended.
    pub idle_after_end: Nanos,
}

impl TraceCoverage {
    /// Whether the replay started the window again.
    pub fn looped_over(&self) -> bool {
        self.looped && self.passes > 1.0
    }

    /// One sentence on what was replayed: the window, and whether it looped (and how many
    /// times) or ended early.
    pub fn sentence(&self) -> String {
        let window = format!(
            "recorded {:.3} s to {:.3} s",
            self.recorded_start.as_secs_f64(),
            self.recorded_end.as_secs_f64()
        );
        if self.looped_over() {
            format!(
                "LOOPED: the guest ran {:.3} s and replayed {window} {:.2} times ({:.3} s a pass)",
                self.replayed.as_secs_f64(),
                self.passes,
                self.pass.as_secs_f64()
            )
        } else if self.idle_after_end > Nanos::ZERO {
            format!(
                "replayed {window} once ({:.3} s), then the guest was idle for {:.3} s (no --trace-loop)",
                self.pass.as_secs_f64(),
                self.idle_after_end.as_secs_f64()
            )
        } else {
            format!(
                "replayed {:.0}% of {window} in {:.3} s; no looping",
                self.passes * 100.0,
                self.replayed.as_secs_f64()
            )
        }
    }
}

/// The guest (memory in bytes, page size) `workload` runs on. A built-in model runs on
/// `requested` memory, or `base` when none was asked for, with `base`'s page size. A trace runs
/// on the guest it was recorded from (its page size, its memory); asking for other memory is
/// an error unless `pad`, which allows a larger guest whose extra pages the trace never
/// writes.
pub fn fit_guest(
    workload: &WorkloadModel,
    trace: Option<&TraceSummary>,
    requested: Option<u64>,
    base: (u64, u64),
    pad: bool,
) -> Result<(u64, u64), String> {
    let Some(trace) = trace else {
        if workload.trace_path().is_some() {
            return Err("a trace workload needs its trace summary".into());
        }
        return Ok((requested.unwrap_or(base.0), base.1));
    };
    let recorded = trace.memory_bytes;
    match requested {
        None => Ok((recorded, trace.page_size)),
        Some(m) if m == recorded => Ok((m, trace.page_size)),
        Some(m) if m < recorded => Err(format!(
            "trace {} was recorded from a {} guest ({} pages of {} B); --memory {} is smaller",
            trace.path,
            crate::output::human_bytes(recorded),
            trace.header.geometry.page_count(),
            trace.page_size,
            crate::output::human_bytes(m),
        )),
        Some(m) if pad => {
            Geometry::for_memory(trace.header.geometry.page_size(), m)
                .map_err(|e| format!("--memory {m}: {e}"))?;
            if m % trace.page_size != 0 {
                return Err(format!(
                    "--memory {m} is not a whole number of the trace's {}-byte pages",
                    trace.page_size
                ));
            }
            Ok((m, trace.page_size))
        }
        Some(m) => Err(format!(
            "trace {} was recorded from a {} guest, not {}: leave out --memory to simulate the recorded guest, or add --pad-memory to simulate a larger one whose extra pages the trace never writes",
            trace.path,
            crate::output::human_bytes(recorded),
            crate::output::human_bytes(m),
        )),
    }
}

/// The simulator's content model with `zero_fraction` of pages starting all-zero: the other
/// classes shrink in proportion, so the default 0.2 gives exactly
/// [`crate::sim::ContentModel::default`] (what `simulate` and `compare` both use).
pub fn content_with_zero_fraction(zero_fraction: f64) -> crate::sim::ContentModel {
    let d = crate::sim::ContentModel::default();
    let rest = (1.0 - zero_fraction) / (1.0 - d.zero_fraction);
    crate::sim::ContentModel {
        zero_fraction,
        text_fraction: d.text_fraction * rest,
        duplicate_fraction: d.duplicate_fraction * rest,
        ..d
    }
}

/// Generates a model's writes, interval by interval.
pub struct WriteGenerator {
    model: WorkloadModel,
    pages: u64,
    rng: Xoshiro256PlusPlus,
    zipf: Option<Zipf<f64>>,
    /// Writes owed but not yet made (the fractional part of rate × time).
    carry: f64,
    sweep_next: u64,
    writes: u64,
    replay: Option<TraceReplay<std::fs::File>>,
    /// A trace that failed mid-replay: the writes stop and the simulation reports it.
    error: Option<String>,
}

impl WriteGenerator {
    /// A generator for a guest of `pages` pages; fails only for a trace that cannot be opened,
    /// was recorded from a larger guest, or has replay settings that mean nothing (a speed
    /// that is not a positive number).
    pub fn try_new(model: WorkloadModel, pages: u64, seed: u64) -> Result<Self, String> {
        let replay = match &model {
            WorkloadModel::Trace { path, speed, .. } => {
                let options = model.replay_options().ok_or_else(|| {
                    format!("trace {path}: the speed must be a positive number, not {speed}")
                })?;
                let file = std::fs::File::open(path)
                    .map_err(|e| format!("cannot open trace {path}: {e}"))?;
                let replay = TraceReplay::open_with_options(file, options, Default::default())
                    .map_err(|e| format!("trace {path}: {e}"))?;
                let traced = replay.header().geometry.page_count();
                if traced > pages {
                    return Err(format!("trace {path} covers {traced} pages, more than the simulated guest's {pages}"));
                }
                Some(replay)
            }
            _ => None,
        };
        let mut generator = Self::new(model, pages, seed);
        generator.replay = replay;
        Ok(generator)
    }

    /// Why a trace replay stopped early, if it did.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// A generator for a guest of `pages` pages (a trace model replays nothing: use
    /// [`WriteGenerator::try_new`]).
    pub fn new(model: WorkloadModel, pages: u64, seed: u64) -> Self {
        let zipf = match model {
            WorkloadModel::Zipf { exponent, .. } => Zipf::new(pages as f64, exponent.max(0.0)).ok(),
            _ => None,
        };
        WriteGenerator {
            model,
            pages,
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
            zipf,
            carry: 0.0,
            sweep_next: 0,
            writes: 0,
            replay: None,
            error: None,
        }
    }

    /// Writes made so far.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Calls `write(page)` for every write in the virtual interval `[from, to)`.
    pub fn advance(&mut self, from: Nanos, to: Nanos, mut write: impl FnMut(u64)) {
        if let Some(replay) = &mut self.replay {
            let mut count = 0;
            if let Err(e) = replay.advance(from, to, |page| {
                count += 1;
                write(page)
            }) {
                self.error.get_or_insert_with(|| e.to_string());
                self.replay = None;
            }
            self.writes += count;
            return;
        }
        let span = (to - from).as_secs_f64();
        let owed = self.model.rate() * span + self.carry;
        let count = owed.floor();
        self.carry = owed - count;
        let count = count as u64;
        let pages = self.pages;
        let fraction_pages = |f: f64| ((pages as f64 * f.clamp(0.0, 1.0)) as u64).clamp(1, pages);
        for i in 0..count {
            let page = match self.model {
                WorkloadModel::Idle | WorkloadModel::Trace { .. } => return,
                WorkloadModel::Uniform { .. } => below(self.rng.next_u64(), pages),
                WorkloadModel::HotCold {
                    hot_fraction,
                    hot_share,
                    ..
                } => hot_cold(
                    &mut self.rng,
                    pages,
                    fraction_pages(hot_fraction),
                    hot_share,
                    0,
                ),
                WorkloadModel::Phases {
                    hot_fraction,
                    hot_share,
                    period,
                    rate,
                } => {
                    // The time of this write decides its phase.
                    let t = from.0 as f64 + (i as f64 / rate.max(f64::MIN_POSITIVE)) * 1e9;
                    let phase = (t / period.0.max(1) as f64) as u64;
                    let hot = fraction_pages(hot_fraction);
                    hot_cold(
                        &mut self.rng,
                        pages,
                        hot,
                        hot_share,
                        phase.wrapping_mul(hot) % pages,
                    )
                }
                WorkloadModel::Zipf { .. } => match &self.zipf {
                    Some(z) => (z.sample(&mut self.rng) as u64).clamp(1, pages) - 1,
                    None => below(self.rng.next_u64(), pages),
                },
                WorkloadModel::Sweep {
                    start_fraction,
                    length_fraction,
                    ..
                } => {
                    let start = (pages as f64 * start_fraction.clamp(0.0, 1.0)) as u64 % pages;
                    let len = fraction_pages(length_fraction);
                    let page = (start + self.sweep_next % len) % pages;
                    self.sweep_next += 1;
                    page
                }
            };
            write(page);
        }
        self.writes += count;
    }
}

fn hot_cold(
    rng: &mut Xoshiro256PlusPlus,
    pages: u64,
    hot: u64,
    hot_share: f64,
    offset: u64,
) -> u64 {
    let threshold = (hot_share.clamp(0.0, 1.0) * u64::MAX as f64) as u64;
    if rng.next_u64() < threshold {
        (offset + below(rng.next_u64(), hot)) % pages
    } else {
        below(rng.next_u64(), pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(model: WorkloadModel, pages: u64, secs: u64) -> Vec<u64> {
        let mut c = vec![0u64; pages as usize];
        let mut g = WriteGenerator::new(model, pages, 42);
        for s in 0..secs {
            g.advance(Nanos::from_secs(s), Nanos::from_secs(s + 1), |p| {
                c[p as usize] += 1
            });
        }
        c
    }

    #[test]
    fn rates_and_determinism() {
        let m = WorkloadModel::Uniform { rate: 1000.5 };
        let c = counts(m.clone(), 100, 10);
        assert_eq!(c.iter().sum::<u64>(), 10_005);
        assert_eq!(c, counts(m, 100, 10));
        assert_eq!(counts(WorkloadModel::Idle, 10, 5).iter().sum::<u64>(), 0);
    }

    #[test]
    fn hot_cold_concentrates_writes() {
        let c = counts(
            WorkloadModel::HotCold {
                rate: 100_000.0,
                hot_fraction: 0.1,
                hot_share: 0.9,
            },
            1000,
            1,
        );
        let hot: u64 = c[..100].iter().sum();
        assert!((90_500..=91_500).contains(&hot), "{hot}"); // 90% + 10% of the 10% uniform share, ±5σ
    }

    #[test]
    fn zipf_is_skewed_and_sweep_is_sequential() {
        let c = counts(
            WorkloadModel::Zipf {
                rate: 50_000.0,
                exponent: 1.0,
            },
            1000,
            1,
        );
        assert!(c[0] > c[9] && c[9] > c[500], "{} {} {}", c[0], c[9], c[500]);
        let mut seen = Vec::new();
        let mut g = WriteGenerator::new(
            WorkloadModel::Sweep {
                rate: 10.0,
                start_fraction: 0.5,
                length_fraction: 0.04,
            },
            100,
            1,
        );
        g.advance(Nanos::ZERO, Nanos::from_secs(1), |p| seen.push(p));
        assert_eq!(seen, vec![50, 51, 52, 53, 50, 51, 52, 53, 50, 51]);
    }

    #[test]
    fn phases_move_the_hot_set() {
        let model = WorkloadModel::Phases {
            rate: 10_000.0,
            hot_fraction: 0.1,
            hot_share: 1.0,
            period: Nanos::from_secs(1),
        };
        let mut g = WriteGenerator::new(model, 1000, 3);
        let (mut first, mut second) = (Vec::new(), Vec::new());
        g.advance(Nanos::ZERO, Nanos::from_secs(1), |p| first.push(p));
        g.advance(Nanos::from_secs(1), Nanos::from_secs(2), |p| second.push(p));
        assert!(first.iter().all(|&p| p < 100));
        assert!(second.iter().all(|&p| (100..200).contains(&p)));
    }
}
