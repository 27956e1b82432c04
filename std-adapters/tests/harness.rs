//! The research harness, as a researcher relies on it: the simulator is deterministic, the
//! lower bounds hold for every strategy on random workloads, Clark's analytic model agrees with
//! the simulator where its assumptions hold, and `memferry compare` prints the same numbers on
//! every run.

use memferry::schedule::{RatePlan, StopRules};
use memferry::strategy::PreCopyConfig;
use memferry::time::{ByteRate, Nanos};
use memferry_std::compare;
use memferry_std::sim::{simulate, ContentModel, LinkModel, Scenario, WorkloadModel};
use proptest::prelude::*;

fn workload() -> impl Strategy<Value = WorkloadModel> {
    let rate = 0.0f64..200_000.0;
    prop_oneof![
        Just(WorkloadModel::Idle),
        rate.clone()
            .prop_map(|rate| WorkloadModel::Uniform { rate }),
        (rate.clone(), 0.001f64..0.5, 0.0f64..1.0).prop_map(|(rate, hot_fraction, hot_share)| {
            WorkloadModel::HotCold {
                rate,
                hot_fraction,
                hot_share,
            }
        }),
        (rate.clone(), 0.5f64..2.0)
            .prop_map(|(rate, exponent)| WorkloadModel::Zipf { rate, exponent }),
        (rate.clone(), 0.0f64..1.0, 0.001f64..1.0).prop_map(
            |(rate, start_fraction, length_fraction)| WorkloadModel::Sweep {
                rate,
                start_fraction,
                length_fraction
            }
        ),
        (rate, 0.01f64..0.3, 1u64..2000).prop_map(|(rate, hot_fraction, ms)| {
            WorkloadModel::Phases {
                rate,
                hot_fraction,
                hot_share: 0.9,
                period: Nanos::from_millis(ms),
            }
        }),
    ]
}

fn engine() -> impl Strategy<Value = PreCopyConfig> {
    (
        1u64..500,
        1u32..12,
        0u32..6,
        prop::option::of(1u64..50_000_000),
    )
        .prop_map(
            |(target_ms, max_rounds, non_convergence_rounds, first)| PreCopyConfig {
                stop: StopRules {
                    downtime_target: Nanos::from_millis(target_ms),
                    max_rounds,
                    non_convergence_rounds,
                    ..StopRules::default()
                },
                rate: match first {
                    None => RatePlan::default(),
                    Some(f) => {
                        RatePlan::adaptive(ByteRate(f), ByteRate(f / 2 + 1), ByteRate::UNLIMITED)
                    }
                },
                ..PreCopyConfig::default()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn lower_bounds_hold_for_every_strategy(
        workload in workload(),
        engine in engine(),
        pages in 64u64..2048,
        mbps in 20u64..5000,
        latency_us in 0u64..5000,
        zero in 0.0f64..0.6,
        seed in any::<u64>(),
    ) {
        let scenario = Scenario {
            memory: pages * 4096,
            workload,
            engine,
            seed,
            content: ContentModel { zero_fraction: zero, ..ContentModel::default() },
            link: LinkModel { bandwidth: ByteRate(mbps * 1_000_000), latency: Nanos::from_micros(latency_us), per_frame_overhead: 0 },
            ..Scenario::default()
        };
        let outcome = simulate(&scenario).map_err(TestCaseError::fail)?;
        let r = &outcome.report;
        prop_assert_eq!(r.verified, Some(true));
        prop_assert!(r.bytes_sent >= outcome.bounds.least_bytes, "{} bytes sent < bound {}", r.bytes_sent, outcome.bounds.least_bytes);
        prop_assert!(r.downtime >= outcome.bounds.least_downtime, "downtime {} < bound {}", r.downtime, outcome.bounds.least_downtime);
        prop_assert_eq!(r.preparation_time + r.downtime + r.resume_time, r.total_time);
    }
}

#[test]
fn same_seed_same_report_byte_for_byte() {
    let scenario = Scenario {
        memory: 32 << 20,
        workload: WorkloadModel::Phases {
            rate: 40_000.0,
            hot_fraction: 0.05,
            hot_share: 0.9,
            period: Nanos::from_millis(200),
        },
        link: LinkModel {
            bandwidth: ByteRate(200_000_000),
            ..LinkModel::default()
        },
        seed: 42,
        ..Scenario::default()
    };
    let a = serde_json::to_string(&simulate(&scenario).unwrap()).unwrap();
    let b = serde_json::to_string(&simulate(&scenario).unwrap()).unwrap();
    assert_eq!(a, b);
    let other = serde_json::to_string(
        &simulate(&Scenario {
            seed: 43,
            ..scenario
        })
        .unwrap(),
    )
    .unwrap();
    assert_ne!(a, other, "the seed matters");
}

#[test]
fn clark_model_agrees_with_the_simulator_on_uniform_writes() {
    // Clark's series assumes every write dirties a new page at a constant rate, and no
    // compression: a uniform workload on incompressible pages, rare enough that few writes
    // collide within a round. Stated tolerance: 10% on total time; downtime at most 25% above
    // the model's (a handful of pages decide it).
    for (rate, bandwidth) in [
        (1_000.0, 50_000_000u64),
        (3_000.0, 100_000_000),
        (10_000.0, 1_000_000_000),
    ] {
        let scenario = Scenario {
            memory: 64 << 20,
            workload: WorkloadModel::Uniform { rate },
            content: ContentModel {
                zero_fraction: 0.0,
                text_fraction: 0.0,
                duplicate_fraction: 0.0,
                ..ContentModel::default()
            },
            link: LinkModel {
                bandwidth: ByteRate(bandwidth),
                ..LinkModel::default()
            },
            engine: PreCopyConfig {
                stop: StopRules {
                    downtime_target: Nanos::from_millis(10),
                    ..StopRules::default()
                },
                ..PreCopyConfig::default()
            },
            verify: false,
            ..Scenario::default()
        };
        let o = simulate(&scenario).unwrap();
        let simulated = o.report.total_time.as_secs_f64();
        let modelled = o.models.precopy_total_time.as_secs_f64();
        assert!(
            (simulated - modelled).abs() / simulated < 0.10,
            "rate {rate}, {bandwidth} B/s: simulated {simulated} s, Clark {modelled} s"
        );
        // Downtime: the engine may take one round more than Clark's series (its estimate also
        // counts what the guest writes while the send buffers drain before the pause), which
        // only lowers the downtime; it must never be much above the model's.
        let sd = o.report.downtime.as_secs_f64();
        let md = o.models.precopy_downtime.as_secs_f64();
        assert!(
            sd <= md * 1.25,
            "rate {rate}: simulated downtime {sd} s, Clark {md} s"
        );
    }
}

#[test]
fn compare_prints_the_same_numbers_every_run() {
    let preset = compare::presets()
        .into_iter()
        .find(|p| p.name == "clark-model")
        .unwrap();
    let a = compare::run(&preset, 2, |_, _| {}).unwrap();
    let b = compare::run(&preset, 1, |_, _| {}).unwrap();
    assert_eq!(
        compare::table(&a),
        compare::table(&b),
        "thread count does not change results"
    );
    assert_eq!(compare::csv(&a), compare::csv(&b));
    assert_eq!(
        a.runs.len(),
        preset.strategies.len() * preset.workloads.len() * preset.seeds.len()
    );
    assert_eq!(compare::csv(&a).lines().count(), a.runs.len() + 1);
    let dir = std::env::temp_dir().join(format!("memferry-plots-{}", std::process::id()));
    let files = memferry_std::plots::write_all(&a, &dir).unwrap();
    assert!(!files.is_empty());
    for f in &files {
        let svg = std::fs::read_to_string(f).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("</svg>"),
            "{}",
            f.display()
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_recorded_trace_replays_as_a_workload() {
    use memferry::page::{Geometry, PageSize};
    use memferry_std::trace::{TraceHeader, TraceWriter};
    // Five 10 ms intervals, each dirtying pages 0..100: replayed once, that is 500 writes.
    let geometry = Geometry::new(PageSize::DEFAULT, 4096).unwrap();
    let path = std::env::temp_dir().join(format!("memferry-replay-{}.mft", std::process::id()));
    let mut writer = TraceWriter::new(
        std::fs::File::create(&path).unwrap(),
        &TraceHeader::new(geometry, Nanos::from_millis(10)),
    )
    .unwrap();
    let pages: Vec<u64> = (0..100).collect();
    for _ in 0..5 {
        writer.write_interval_pages(&pages).unwrap();
    }
    writer.finish().unwrap();
    let scenario = Scenario {
        memory: geometry.memory_bytes(),
        workload: WorkloadModel::trace(path.to_string_lossy()),
        // 16 MiB at 100 MB/s: ~170 ms, longer than the trace.
        link: LinkModel {
            bandwidth: ByteRate(100_000_000),
            ..LinkModel::default()
        },
        ..Scenario::default()
    };
    let o = simulate(&scenario).unwrap();
    assert_eq!(o.writes, 500);
    assert_eq!(o.pages_written, 100);
    assert_eq!(o.report.verified, Some(true));
    assert!(
        o.report.rounds[0].dirty_pages == 100,
        "{:?}",
        o.report.rounds[0]
    );
    // A trace of a bigger guest is refused with a clear error.
    let small = Scenario {
        memory: geometry.memory_bytes() / 2,
        ..scenario
    };
    let err = simulate(&small).unwrap_err();
    assert!(err.contains("more than the simulated guest"), "{err}");
    std::fs::remove_file(&path).unwrap();
}
