//! SVG plots of a comparison (plotters): per-round dirty rate and bandwidth, bytes and downtime
//! per strategy, and CDFs of total time over seeds.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::compare::Comparison;

type PlotResult<T> = Result<T, Box<dyn std::error::Error>>;

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn file_name(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// Writes every plot of `c` into `dir` (created if needed) and returns the files written.
pub fn write_all(c: &Comparison, dir: &Path) -> PlotResult<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut files = Vec::new();
    let workloads: Vec<String> = dedup(c.rows.iter().map(|r| r.workload.clone()));
    for w in &workloads {
        files.push(bars(c, dir, w, "bytes", "MB sent (median)", |r| {
            r.bytes_sent.median / 1e6
        })?);
        files.push(bars(c, dir, w, "downtime", "downtime ms (median)", |r| {
            r.downtime_ms.median
        })?);
        files.push(rounds(c, dir, w)?);
    }
    files.push(cdf(c, dir)?);
    Ok(files)
}

fn dedup(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

fn bars(
    c: &Comparison,
    dir: &Path,
    workload: &str,
    what: &str,
    label: &str,
    value: impl Fn(&crate::compare::Row) -> f64,
) -> PlotResult<PathBuf> {
    let path = dir.join(format!(
        "{}-{}-{}.svg",
        file_name(&c.preset),
        what,
        file_name(workload)
    ));
    let rows: Vec<_> = c.rows.iter().filter(|r| r.workload == workload).collect();
    let top = rows
        .iter()
        .map(|r| value(r))
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.15;
    let root = SVGBackend::new(&path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{label}: {workload}"), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0..rows.len().max(2) - 1).into_segmented(), 0.0..top)?;
    let names: Vec<String> = rows.iter().map(|r| r.strategy.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(label)
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()?;
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), value(r)),
            ],
            COLORS[i % COLORS.len()].filled(),
        );
        bar.set_margin(0, 0, 12, 12);
        bar
    }))?;
    root.present()?;
    drop(chart);
    drop(root);
    Ok(path)
}

fn rounds(c: &Comparison, dir: &Path, workload: &str) -> PlotResult<PathBuf> {
    let path = dir.join(format!(
        "{}-rounds-{}.svg",
        file_name(&c.preset),
        file_name(workload)
    ));
    // The first seed's run of each strategy.
    let runs: Vec<_> = dedup(
        c.runs
            .iter()
            .filter(|r| r.workload == workload)
            .map(|r| r.strategy.clone()),
    )
    .into_iter()
    .filter_map(|s| {
        c.runs
            .iter()
            .find(|r| r.workload == workload && r.strategy == s)
    })
    .collect();
    let max_round = runs
        .iter()
        .map(|r| r.outcome.report.rounds.len())
        .max()
        .unwrap_or(1)
        .max(2) as u32;
    let mb = |v: u64| v as f64 / 1e6;
    let page = |r: &crate::compare::Run| r.outcome.report.page_size;
    let top = runs
        .iter()
        .flat_map(|r| {
            r.outcome.report.rounds.iter().map(move |x| {
                mb(x.bandwidth.0.min(u64::MAX / 2)).max(mb(x.dirty_rate_pages_per_sec * page(r)))
            })
        })
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1.0)
        * 1.1;
    let root = SVGBackend::new(&path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("per round: bandwidth (solid), dirty rate (dashed): {workload}"),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(1u32..max_round, 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("MB/s")
        .draw()?;
    for (i, r) in runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pushes: Vec<_> = r
            .outcome
            .report
            .rounds
            .iter()
            .filter(|x| !x.stop_and_copy)
            .collect();
        chart
            .draw_series(LineSeries::new(
                pushes.iter().map(|x| (x.round, mb(x.bandwidth.0))),
                color.stroke_width(2),
            ))?
            .label(r.strategy.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(DashedLineSeries::new(
            pushes
                .iter()
                .map(|x| (x.round, mb(x.dirty_rate_pages_per_sec * page(r)))),
            6,
            4,
            color.stroke_width(1),
        ))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    drop(chart);
    drop(root);
    Ok(path)
}

fn cdf(c: &Comparison, dir: &Path) -> PlotResult<PathBuf> {
    let path = dir.join(format!("{}-total-time-cdf.svg", file_name(&c.preset)));
    let strategies = dedup(c.runs.iter().map(|r| r.strategy.clone()));
    let top = c
        .runs
        .iter()
        .map(|r| r.outcome.report.total_time.as_millis_f64())
        .fold(0.0f64, f64::max)
        .max(1.0)
        * 1.05;
    let root = SVGBackend::new(&path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "CDF of total migration time over workloads and seeds",
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..top, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("total time, ms")
        .y_desc("fraction of runs")
        .draw()?;
    for (i, s) in strategies.iter().enumerate() {
        let mut times: Vec<f64> = c
            .runs
            .iter()
            .filter(|r| &r.strategy == s)
            .map(|r| r.outcome.report.total_time.as_millis_f64())
            .collect();
        times.sort_by(f64::total_cmp);
        let n = times.len() as f64;
        let color = COLORS[i % COLORS.len()];
        let steps: Vec<(f64, f64)> = times
            .iter()
            .enumerate()
            .flat_map(|(k, &t)| [(t, k as f64 / n), (t, (k + 1) as f64 / n)])
            .collect();
        chart
            .draw_series(LineSeries::new(steps, color.stroke_width(2)))?
            .label(s.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    drop(chart);
    drop(root);
    Ok(path)
}
