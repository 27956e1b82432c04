//! Workload models for the simulator: who writes which page when, in virtual time.
//!
//! Every model is deterministic for a given seed. Rates are writes per second of virtual time;
//! a write dirties one page (the content model decides how many bytes it changes).
//!
//! Models: [`WorkloadModel::Idle`], uniform random writes, hot/cold (a hot fraction of memory
//! takes a share of writes), Zipf-skewed (page rank r is written with probability ∝ 1/r^s),
//! sequential sweep (a scan or a garbage collector rewriting a region in order, looping), and
//! phase changes (a hot/cold workload whose hot set moves every period).

use memferry::time::Nanos;
use rand_core::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::Serialize;

use crate::trace::{AtEnd, TraceReplay};
use crate::workload::below;

/// A workload model and its parameters.
#[derive(Clone, Debug, PartialEq, Serialize)]
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
    /// spread evenly across the interval.
    Trace {
        /// The trace file.
        path: String,
        /// Start again at the end (otherwise the guest goes idle).
        looped: bool,
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

impl WorkloadModel {
    /// A short name for tables: the model, its shape, and its rate.
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
            WorkloadModel::Trace { path, .. } => format!(
                "trace:{}",
                std::path::Path::new(path)
                    .file_name()
                    .map_or(path.as_str(), |n| n.to_str().unwrap_or(path))
            ),
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

    /// The model called `name` at `rate`, with this project's default parameters: hot/cold and
    /// phases put 90% of writes on 5% of memory (phases move every 500 ms), Zipf has exponent
    /// 1, a sweep rewrites a quarter of memory.
    pub fn named(name: &str, rate: f64) -> Option<WorkloadModel> {
        if let Some(path) = name.strip_prefix("trace:") {
            return Some(WorkloadModel::Trace {
                path: path.to_string(),
                looped: true,
            });
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

    /// Writes per second.
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
    /// A generator for a guest of `pages` pages; fails only for a trace that cannot be opened
    /// or was recorded from a larger guest.
    pub fn try_new(model: WorkloadModel, pages: u64, seed: u64) -> Result<Self, String> {
        let replay = match &model {
            WorkloadModel::Trace { path, looped } => {
                let file = std::fs::File::open(path)
                    .map_err(|e| format!("cannot open trace {path}: {e}"))?;
                let at_end = if *looped { AtEnd::Loop } else { AtEnd::Stop };
                let replay =
                    TraceReplay::open(file, at_end).map_err(|e| format!("trace {path}: {e}"))?;
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
