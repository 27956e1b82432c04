//! The recording exactness test: a program that writes known pages at known times
//! (`src/bin/fixture.rs`) is recorded by `memferry_std::record_program::record_program` with
//! the preloaded library, and every interval of the trace must hold exactly the fixture's
//! pages written in that interval: none missing (first touches, writes to mappings created
//! since the last sample, to a mapping replaced at the same address, to a zero page, to a
//! discarded page), none extra (reads, pages only read). Discarded pages (`MADV_DONTNEED`)
//! may be reported in the interval of the discard, all of them or none, depending on the
//! kernel.
//!
//! Which interval a burst of writes belongs to follows from the agent's scan times (CLOCK
//! MONOTONIC, as the fixture's): the first interval whose closing scan started after the
//! burst ended, provided the previous scan ended before the burst began. A burst that
//! overlaps a scan cannot be placed; the fixture places bursts mid-interval so that this is
//! rare, and the test records again (at most three times) when it happens.
//!
//! On a kernel without `PAGEMAP_SCAN` or asynchronous userfaultfd write-protect (before Linux
//! 6.7), the test prints why and passes without checking anything.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs::File;
use std::path::PathBuf;
use std::time::Duration;

use memferry_std::record_program::{
    kernel_support, record_program, ProgramRecordError, ProgramRecordOptions,
};
use memferry_std::trace::TraceReader;

const PAGE: u64 = 4096;
const INTERVAL_MS: u64 = 50;

struct Phase {
    begin: u64,
    end: u64,
    written: BTreeSet<u64>,
    discarded: BTreeSet<u64>,
}

struct Report {
    phases: Vec<Phase>,
    /// Base address and pages of A, B and C.
    mappings: [(u64, u64); 3],
}

fn parse_report(text: &str) -> Report {
    let mut phases = Vec::new();
    let mut mappings = [(0, 64), (0, 16), (0, 8)];
    for line in text.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        match words[0] {
            "phase" => {
                assert_eq!(words[4], "written");
                let split = words.iter().position(|&w| w == "discarded").unwrap();
                let hex = |ws: &[&str]| -> BTreeSet<u64> {
                    ws.iter()
                        .map(|w| u64::from_str_radix(w, 16).unwrap())
                        .collect()
                };
                phases.push(Phase {
                    begin: words[2].parse().unwrap(),
                    end: words[3].parse().unwrap(),
                    written: hex(&words[5..split]),
                    discarded: hex(&words[split + 1..]),
                })
            }
            "mappings" => {
                for (i, w) in words[1..4].iter().enumerate() {
                    mappings[i].0 = u64::from_str_radix(w, 16).unwrap();
                }
            }
            _ => panic!("unexpected report line {line:?}"),
        }
    }
    Report { phases, mappings }
}

/// `A[3]`-style names for the fixture's pages.
fn label(mappings: &[(u64, u64); 3], address: u64) -> String {
    for (name, &(base, pages)) in ["A", "B", "C"].iter().zip(mappings) {
        if address >= base && address < base + pages * PAGE {
            return format!("{name}[{}]", (address - base) / PAGE);
        }
    }
    format!("{address:#x}")
}

fn labels(mappings: &[(u64, u64); 3], set: &BTreeSet<u64>) -> Vec<String> {
    set.iter().map(|&a| label(mappings, a)).collect()
}

enum Outcome {
    Checked,
    Ambiguous(String),
}

fn record_and_check(attempt: u32) -> Outcome {
    let dir = std::env::temp_dir();
    let stem = format!("memferry-record-test-{}-{attempt}", std::process::id());
    let report_path: PathBuf = dir.join(format!("{stem}.txt"));
    let trace_path: PathBuf = dir.join(format!("{stem}.mft"));
    let command: Vec<OsString> = vec![
        env!("CARGO_BIN_EXE_memferry-record-fixture").into(),
        report_path.clone().into(),
        INTERVAL_MS.to_string().into(),
    ];
    let options = ProgramRecordOptions {
        interval: Duration::from_millis(INTERVAL_MS),
        ..ProgramRecordOptions::default()
    };
    let summary = record_program(&command, &options, File::create(&trace_path).unwrap())
        .unwrap_or_else(|e| panic!("recording the fixture failed: {e}"));
    let report = parse_report(&std::fs::read_to_string(&report_path).unwrap());
    let trace = TraceReader::open(File::open(&trace_path).unwrap());
    let _ = std::fs::remove_file(&report_path);
    let _ = std::fs::remove_file(&trace_path);
    let mut trace = trace.expect("the trace reads back");

    assert!(
        summary.status.success(),
        "the fixture failed: {}",
        summary.status
    );
    assert!(summary.complete, "the fixture's last interval is missing");
    assert!(
        summary.warnings.is_empty(),
        "the agent could not track everything: {:?}",
        summary.warnings
    );
    assert_eq!(report.phases.len(), 10);
    assert_eq!(summary.execs, 0);
    assert_eq!(trace.header().geometry.page_size().bytes() as u64, PAGE);
    assert_eq!(trace.header().geometry.page_count(), summary.guest_pages);
    assert_eq!(summary.intervals as usize, summary.timings.len());
    // Ten phases two intervals apart, and the exit (fewer if the machine delayed scans so much
    // that the agent skipped sampling times).
    assert!(
        summary.intervals >= 10,
        "only {} intervals of {INTERVAL_MS} ms",
        summary.intervals
    );

    // The fixture's pages and their trace indices.
    let mut index_of = BTreeMap::new();
    for &(base, pages) in &report.mappings {
        for i in 0..pages {
            let address = base + i * PAGE;
            if let Some(index) = summary.page_of_address(address) {
                index_of.insert(index, address);
            }
        }
    }

    // What each interval must hold.
    let timings = &summary.timings;
    let mut expected = vec![BTreeSet::new(); timings.len()];
    let mut discarded = vec![BTreeSet::new(); timings.len()];
    for (k, phase) in report.phases.iter().enumerate() {
        for &address in &phase.written {
            assert!(
                summary.page_of_address(address).is_some(),
                "phase {k} wrote {} but the page is not in the trace's guest",
                label(&report.mappings, address)
            );
        }
        let Some(i) = timings.iter().position(|t| t.scan_started_ns > phase.end) else {
            panic!("phase {k} ended after the last interval closed");
        };
        if i > 0 && timings[i - 1].scan_ended_ns >= phase.begin {
            return Outcome::Ambiguous(format!(
                "phase {k}'s writes ({}..{} ns) overlap the scan that closed interval {} \
                 ({}..{} ns)",
                phase.begin,
                phase.end,
                i - 1,
                timings[i - 1].scan_started_ns,
                timings[i - 1].scan_ended_ns
            ));
        }
        expected[i].extend(phase.written.iter().copied());
        discarded[i].extend(phase.discarded.iter().copied());
    }

    // What each interval holds.
    let mut dirty = trace.new_bitmap();
    let mut interval = 0;
    let mut nonempty = 0;
    let expected_nonempty = expected.iter().filter(|set| !set.is_empty()).count();
    let mut discards_reported = false;
    while trace
        .next_interval(&mut dirty)
        .expect("the trace reads back")
    {
        assert!(
            interval < expected.len(),
            "the trace has more intervals than the summary"
        );
        let got: BTreeSet<u64> = index_of
            .iter()
            .filter(|&(&index, _)| dirty.get(index))
            .map(|(_, &address)| address)
            .collect();
        let want = &expected[interval];
        // Pages discarded in the interval: Linux reports them as written (their contents
        // changed, to zeros) since the 2026 pte_none fix to PAGEMAP_SCAN, not before. All of
        // them or none.
        let maybe = &discarded[interval];
        let seen: BTreeSet<u64> = got.intersection(maybe).copied().collect();
        if !seen.is_empty() {
            discards_reported = true;
        }
        let got_written: BTreeSet<u64> = got.difference(maybe).copied().collect();
        if got_written != *want || (!seen.is_empty() && seen != *maybe) {
            panic!(
                "interval {interval}: expected {:?} (and either all or none of the discarded \
                 {:?}), recorded {:?} (missing {:?}, extra {:?})",
                labels(&report.mappings, want),
                labels(&report.mappings, maybe),
                labels(&report.mappings, &got),
                labels(&report.mappings, &want.difference(&got).copied().collect()),
                labels(
                    &report.mappings,
                    &got_written.difference(want).copied().collect()
                ),
            );
        }
        assert_eq!(
            dirty.count_ones(),
            timings[interval].dirty_pages,
            "interval {interval}'s page count"
        );
        nonempty += usize::from(!want.is_empty());
        interval += 1;
    }
    assert_eq!(
        interval,
        expected.len(),
        "the trace has fewer intervals than the summary"
    );
    // Nine phases write (phase 3 only reads), normally into nine intervals.
    assert_eq!(nonempty, expected_nonempty);
    assert!(
        nonempty >= 5,
        "the fixture's nine writing phases fell into only {nonempty} intervals"
    );
    eprintln!(
        "checked {} intervals of {INTERVAL_MS} ms; this kernel {} discarded pages as written",
        summary.intervals,
        if discards_reported {
            "reports"
        } else {
            "does not report"
        }
    );
    Outcome::Checked
}

#[test]
fn a_recording_holds_exactly_the_pages_written_in_each_interval() {
    match kernel_support() {
        Ok(()) => {}
        Err(ProgramRecordError::Unsupported(why)) => {
            eprintln!(
                "SKIPPED: the recording exactness test needs PAGEMAP_SCAN and asynchronous \
                 userfaultfd write-protect (Linux 6.7+), which this system lacks: {why}"
            );
            return;
        }
        Err(e) => panic!("{e}"),
    }
    for attempt in 1..=3 {
        match record_and_check(attempt) {
            Outcome::Checked => return,
            Outcome::Ambiguous(why) => eprintln!("recording {attempt} cannot be checked: {why}"),
        }
    }
    panic!("three recordings in a row had writes overlapping a scan; the machine is too busy");
}
