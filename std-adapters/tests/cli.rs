//! The `memferry` command as a user runs it: the JSON contract of `demo --json`, the two-process
//! `listen` / `send` pair over TCP, and clear errors on bad options.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn memferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_memferry"))
}

/// Starts `memferry listen 127.0.0.1:0 ARGS` and returns it with the address it bound, which it
/// prints on stderr.
fn listen(args: &[&str]) -> (std::process::Child, String) {
    let mut listener = memferry()
        .args(["listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(listener.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{line}");
    // Keep reading its stderr, so the listener never writes into a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    (listener, addr)
}

#[test]
fn demo_json_has_the_contract_fields() {
    let out = memferry()
        .args([
            "demo", "--memory", "32MiB", "--seed", "3", "--json", "--quiet",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one JSON object on one line");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["verified"], true);
    for field in [
        "total_time_ms",
        "downtime_ms",
        "preparation_time_ms",
        "resume_time_ms",
    ] {
        assert!(v[field].as_f64().unwrap() >= 0.0, "{field}");
    }
    let total = v["total_time_ms"].as_f64().unwrap();
    let parts = v["preparation_time_ms"].as_f64().unwrap()
        + v["downtime_ms"].as_f64().unwrap()
        + v["resume_time_ms"].as_f64().unwrap();
    assert!((total - parts).abs() < 0.01, "{total} vs {parts}");
    let pages = v["pages_sent"].as_u64().unwrap();
    assert!(
        pages >= 8192,
        "every one of 8192 pages at least once: {pages}"
    );
    assert!(v["bytes_sent"].as_u64().unwrap() > 0);
    let rounds = v["rounds"].as_u64().unwrap();
    assert!(rounds >= 2);
    assert_eq!(v["per_round"].as_array().unwrap().len() as u64, rounds);
    let reason = v["stop_reason"].as_str().unwrap();
    assert!(
        [
            "downtime_target",
            "max_rounds",
            "not_converging",
            "deadline"
        ]
        .contains(&reason),
        "{reason}"
    );
}

#[test]
fn demo_prints_progress_and_a_table() {
    let out = memferry()
        .args(["demo", "--memory", "16MiB", "--transport", "loopback"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("round  1:"),
        "progress per round on stderr: {stderr}"
    );
    assert!(stderr.contains("stop-and-copy"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("verified                 yes"), "{stdout}");
    assert!(stdout.contains("downtime"), "{stdout}");
}

#[test]
fn listen_and_send_migrate_between_two_processes() {
    let (listener, addr) = listen(&["--json"]);

    let sent = memferry()
        .args(["send", &addr, "--memory", "24MiB", "--json", "--quiet"])
        .output()
        .unwrap();
    assert!(
        sent.status.success(),
        "send: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&sent.stdout).unwrap();
    assert_eq!(report["verified"], true);
    assert_eq!(report["memory_bytes"], 24 << 20);

    let received = listener.wait_with_output().unwrap();
    assert!(received.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&received.stdout).unwrap();
    assert_eq!(summary["verified"], true);
    assert_eq!(summary["memory_bytes"], 24 << 20);
}

#[test]
fn send_to_a_listener_with_too_little_room_fails_clearly() {
    let (mut listener, addr) = listen(&["--max-memory", "8MiB"]);
    let sent = memferry()
        .args(["send", &addr, "--memory", "16MiB", "--quiet"])
        .output()
        .unwrap();
    assert!(!sent.status.success());
    let why = String::from_utf8_lossy(&sent.stderr);
    assert!(
        why.contains("limit"),
        "the source is told the listener's reason: {why}"
    );
    assert!(why.contains("keeps running"), "{why}");
    assert!(!listener.wait().unwrap().success());
}

#[test]
fn a_guest_larger_than_the_host_is_refused_before_reservation() {
    // 1 TiB is within the default --max-memory but beyond this machine's available memory:
    // the listener must refuse rather than fault a terabyte in.
    let (mut listener, addr) = listen(&[]);
    // A bare hello for a 1 TiB guest, as a hostile or mistaken source would send.
    let mut hello = Vec::new();
    let mut table = Vec::new();
    let regions = memferry::wire::region_table(
        &[memferry::page::Region {
            id: 0,
            guest_base: 0,
            pages: 1 << 28,
        }],
        &mut table,
    );
    memferry::wire::Frame::Hello(memferry::wire::Hello {
        version: memferry::wire::PROTOCOL_VERSION,
        page_shift: 12,
        channels: 1,
        session_id: 7,
        features: 0,
        regions,
    })
    .emit(&mut hello);
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    std::io::Write::write_all(&mut stream, &hello).unwrap();
    let mut reply = Vec::new();
    std::io::Read::read_to_end(&mut stream, &mut reply).unwrap();
    let (frame, _) = memferry::wire::Frame::parse(&reply).unwrap();
    let memferry::wire::Frame::Abort { message, .. } = frame else {
        panic!("expected an abort, got {frame:?}")
    };
    assert!(
        String::from_utf8_lossy(message).contains("available"),
        "{}",
        String::from_utf8_lossy(message)
    );
    assert!(!listener.wait().unwrap().success());
}

#[test]
fn bad_options_get_clear_errors() {
    for (args, expect) in [
        (vec!["demo", "--memory", "lots"], "not a size"),
        (vec!["demo", "--bandwidth", "fast"], "not a rate"),
        (vec!["demo", "--page-size", "3000"], "power of two"),
        (vec!["demo", "--hot-fraction", "2"], "between 0 and 1"),
        (
            vec!["send", "127.0.0.1:1", "--memory", "4MiB"],
            "cannot connect",
        ),
    ] {
        let out = memferry().args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

// ---------------------------------------------------------------------------------------------
// simulate and compare

/// Runs `memferry ARGS` and returns (stdout, stderr), asserting it succeeded.
fn run_ok(args: &[&str]) -> (String, String) {
    let out = memferry().args(args).output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{args:?}: {stderr}");
    (stdout, stderr)
}

/// Runs `memferry ARGS`, asserts it failed without panicking, and returns its stderr.
fn run_err(args: &[&str]) -> String {
    let out = memferry().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    stderr
}

/// A trace of a 4 MiB guest (1024 pages): `intervals` intervals of 20 ms, each dirtying 64
/// pages. Returns its path.
fn cli_trace(name: &str, intervals: u64) -> std::path::PathBuf {
    use memferry::page::{Geometry, PageSize};
    use memferry::time::Nanos;
    use memferry_std::trace::{TraceHeader, TraceWriter};
    let path = std::env::temp_dir().join(format!("memferry-cli-{name}-{}.mft", std::process::id()));
    let geometry = Geometry::new(PageSize::DEFAULT, 1024).unwrap();
    let mut writer = TraceWriter::new(
        std::fs::File::create(&path).unwrap(),
        &TraceHeader::new(geometry, Nanos::from_millis(20)),
    )
    .unwrap();
    for i in 0..intervals {
        let pages: Vec<u64> = (0..64)
            .map(|p| (p * 7 + i * 64) % 1024)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        writer.write_interval_pages(&pages).unwrap();
    }
    writer.finish().unwrap();
    path
}

#[test]
fn simulate_json_has_the_contract_fields_bounds_and_models() {
    let (stdout, _) = run_ok(&[
        "simulate",
        "--memory",
        "8MiB",
        "--workload",
        "uniform",
        "--rate",
        "20000",
        "--bandwidth",
        "1Gbit",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for field in [
        "verified",
        "total_time_ms",
        "downtime_ms",
        "preparation_time_ms",
        "resume_time_ms",
        "bytes_sent",
        "pages_sent",
        "rounds",
        "stop_reason",
        "per_round",
    ] {
        assert!(!v[field].is_null(), "{field} in {v}");
    }
    assert_eq!(v["memory_bytes"], 8 << 20);
    assert!(v["bounds"]["least_bytes"].as_u64().unwrap() > 0);
    assert!(v["bounds"]["least_downtime_ms"].as_f64().unwrap() > 0.0);
    assert!(v["bounds"]["least_downtime_ms"].as_f64() <= v["downtime_ms"].as_f64());
    assert!(v["models"]["clark"]["total_time_ms"].as_f64().unwrap() > 0.0);
    assert!(v["models"]["clark"]["downtime_ms"].is_f64());
    assert!(v["models"]["paper000"]["total_time_ms"].as_f64().unwrap() > 0.0);
    assert!(
        v["models"]["dirty_set_curve"]["total_time_ms"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(v["bounds"]["oracle_downtime_ms"].is_f64());
    assert_eq!(v["workload"]["model"], "uniform");
    assert_eq!(v["workload"]["rate"], 20000.0);
    assert!(v["workload"]["writes"].as_u64().unwrap() > 0);
    assert_eq!(v["link"]["bandwidth_mb_s"], 125.0);
    // The text output prints them too.
    let (text, _) = run_ok(&["simulate", "--memory", "8MiB", "--workload", "idle"]);
    assert!(text.contains("lower bounds:"), "{text}");
    assert!(text.contains("Clark total"), "{text}");
    assert!(text.contains("dirty-set curve"), "{text}");
}

#[test]
fn simulate_takes_the_stop_rules_predictor_and_rate_plan_of_demo() {
    let json = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "simulate",
            "--memory",
            "8MiB",
            "--workload",
            "hotcold",
            "--rate",
            "400000",
            "--bandwidth",
            "1Gbit",
            "--json",
        ];
        args.extend_from_slice(extra);
        serde_json::from_str(&run_ok(&args).0).unwrap()
    };
    let v = json(&["--max-rounds", "1", "--downtime-ms", "1"]);
    assert_eq!(v["stop_reason"], "max_rounds");
    assert_eq!(v["rounds"], 2);
    let v = json(&[
        "--deadline-ms",
        "1",
        "--downtime-ms",
        "1",
        "--max-rounds",
        "20",
    ]);
    assert_eq!(v["stop_reason"], "deadline", "{}", v["stop_reason"]);
    let v = json(&[
        "--min-bandwidth",
        "10MB/s",
        "--bandwidth-step",
        "5MB/s",
        "--downtime-ms",
        "1",
        "--max-rounds",
        "3",
        "--non-convergence-rounds",
        "0",
    ]);
    let limits: Vec<f64> = v["per_round"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rate_limit_mb_s"].as_f64().unwrap())
        .collect();
    // Round 1 at the floor; later rounds rise (by at least the step over the dirty rate).
    assert_eq!(limits[0], 10.0, "{limits:?}");
    assert!(limits[1] >= 15.0, "{limits:?}");
    let v = json(&[
        "--predictor",
        "wsclock",
        "--learning-samples",
        "2",
        "--downtime-ms",
        "5",
    ]);
    let held: u64 = v["per_round"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["held_back"].as_u64().unwrap())
        .sum();
    assert!(held > 0, "the predictor held pages back: {v}");
}

#[test]
fn simulate_and_compare_count_verification_the_same_way() {
    // The same guest, workload, link, strategy and seed through both commands: the same
    // totals, with verification (the default of both) and without (--no-verify on both).
    for no_verify in [false, true] {
        let mut sim = vec![
            "simulate",
            "--memory",
            "8MiB",
            "--workload",
            "uniform",
            "--rate",
            "30000",
            "--bandwidth",
            "1Gbit",
            "--seed",
            "1",
            "--json",
        ];
        let mut cmp = vec![
            "compare",
            "--workload",
            "uniform:rate=30000",
            "--memory",
            "8MiB",
            "--seeds",
            "1",
            "--json",
        ];
        if no_verify {
            sim.push("--no-verify");
            cmp.push("--no-verify");
        }
        let s: serde_json::Value = serde_json::from_str(&run_ok(&sim).0).unwrap();
        let c: serde_json::Value = serde_json::from_str(&run_ok(&cmp).0).unwrap();
        let run = c["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["strategy"] == "pre-copy")
            .unwrap();
        let c_total = run["outcome"]["report"]["total_time"].as_u64().unwrap() as f64 / 1e6;
        let c_resume = run["outcome"]["report"]["resume_time"].as_u64().unwrap() as f64 / 1e6;
        let s_total = s["total_time_ms"].as_f64().unwrap();
        assert!(
            (s_total - c_total).abs() < 0.002,
            "no_verify {no_verify}: simulate {s_total} ms, compare {c_total} ms"
        );
        assert!((s["resume_time_ms"].as_f64().unwrap() - c_resume).abs() < 0.002);
        assert_eq!(s["verified"], !no_verify);
        assert_eq!(c["parameters"]["workloads"][0]["verify"], !no_verify);
        if no_verify {
            assert!(c_resume < 1.0, "resume {c_resume} ms without verification");
        } else {
            assert!(
                c_resume > 0.2,
                "verification takes time: resume {c_resume} ms"
            );
        }
    }
}

#[test]
fn simulate_replays_a_trace_on_its_guest_and_says_when_it_loops() {
    let path = cli_trace("simulate", 5);
    let trace = format!("trace:{}", path.display());
    let base = [
        "simulate",
        "--workload",
        trace.as_str(),
        "--bandwidth",
        "100Mbit",
    ];
    let json = |extra: &[&str]| -> serde_json::Value {
        let args: Vec<&str> = base
            .iter()
            .copied()
            .chain(extra.iter().copied())
            .chain(["--json"])
            .collect();
        serde_json::from_str(&run_ok(&args).0).unwrap()
    };
    // The guest is the trace's (4 MiB), not the 1 GiB default; played once, not looped.
    let v = json(&[]);
    assert_eq!(v["memory_bytes"], 4 << 20);
    assert_eq!(v["workload"]["trace"]["looped"], false);
    assert_eq!(v["workload"]["trace"]["passes"], 1.0);
    assert_eq!(v["workload"]["writes"], 5 * 64);
    // Looping (and saying so), from 20 ms, 40 ms long, at twice the speed.
    let v = json(&[
        "--trace-loop",
        "--trace-start",
        "20ms",
        "--trace-length",
        "40ms",
        "--trace-speed",
        "2",
    ]);
    let t = &v["workload"]["trace"];
    assert_eq!(t["looped"], true, "{t}");
    assert_eq!(t["recorded_start_ms"], 20.0);
    assert_eq!(t["recorded_end_ms"], 60.0);
    assert_eq!(t["pass_ms"], 20.0);
    assert!(t["passes"].as_f64().unwrap() > 1.0);
    assert_eq!(v["workload"]["speed"], 2.0);
    let args: Vec<&str> = base.iter().copied().chain(["--trace-loop"]).collect();
    let (text, _) = run_ok(&args);
    assert!(text.contains("LOOPED"), "{text}");
    // Padding is asked for, never silent.
    let v = json(&["--memory", "8MiB", "--pad-memory"]);
    assert_eq!(v["memory_bytes"], 8 << 20);
    for (extra, expect) in [
        (vec!["--memory", "8MiB"], "--pad-memory"),
        (vec!["--memory", "2MiB"], "smaller"),
        (vec!["--rate", "1000"], "does not apply to a trace"),
        (vec!["--hot-fraction", "0.1"], "does not apply to a trace"),
        (vec!["--trace-start", "1s"], "past the end"),
        (vec!["--trace-speed", "0"], "positive number"),
        (vec!["--trace-length", "0s"], "positive duration"),
    ] {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let stderr = run_err(&args);
        assert!(stderr.contains(expect), "{extra:?}: {stderr}");
    }
    // Trace options and rates where they mean nothing are refused too.
    let stderr = run_err(&["simulate", "--workload", "uniform", "--trace-loop"]);
    assert!(stderr.contains("applies to a trace"), "{stderr}");
    let stderr = run_err(&["simulate", "--workload", "idle", "--rate", "5"]);
    assert!(stderr.contains("--rate does not apply"), "{stderr}");
    let stderr = run_err(&["simulate", "--workload", "uniform", "--hot-fraction", "0.2"]);
    assert!(stderr.contains("hotcold and phases"), "{stderr}");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn compare_runs_traces_and_built_in_workloads_and_lists_real_parameters() {
    let path = cli_trace("compare", 4);
    let trace = format!("trace:{}", path.display());
    let (table, stderr) = run_ok(&[
        "compare",
        "--preset",
        "max-rounds",
        "--workload",
        &trace,
        "--workload",
        "hotcold:rate=50000,hot_share=0.95",
        "--seeds",
        "1",
        "--memory",
        "4MiB",
    ]);
    assert!(table.contains("trace:"), "{table}");
    assert!(table.contains("hotcold-5%@50k"), "{table}");
    assert!(table.contains("setup: 4.00 MiB guest"), "{table}");
    assert!(
        table.contains("changed on the command line: workloads, memory"),
        "{table}"
    );
    assert!(stderr.contains("runs in"), "{stderr}");
    // The trace's guest decides: another --memory needs --pad-memory.
    let stderr = run_err(&["compare", "--workload", &trace, "--memory", "8MiB"]);
    assert!(stderr.contains("--pad-memory"), "{stderr}");
    let stderr = run_err(&["compare", "--workload", "uniform", "--trace-loop"]);
    assert!(stderr.contains("applies to trace workloads"), "{stderr}");
    let stderr = run_err(&[
        "compare",
        "--workload",
        "uniform:rate=1",
        "--workload",
        "uniform:rate=1",
    ]);
    assert!(stderr.contains("both named"), "{stderr}");
    // --list prints what each preset really runs, not only its description.
    let (list, _) = run_ok(&["compare", "--list"]);
    assert!(list.contains("wsclock-vs-precopy"), "{list}");
    assert!(list.contains("uniform: 50000 writes/s"), "{list}");
    assert!(list.contains("downtime target 50 ms"), "{list}");
    assert!(list.contains("1.00 GiB guest"), "{list}");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn sharded_and_merged_compare_print_what_an_unsharded_one_prints() {
    let dir = std::env::temp_dir().join(format!("memferry-cli-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = cli_trace("shards", 4);
    let trace = format!("trace:{}", path.display());
    let matrix = [
        "compare",
        "--preset",
        "max-rounds",
        "--workload",
        trace.as_str(),
        "--workload",
        "uniform:rate=20000",
        "--bandwidth",
        "1Gbit",
        "--bandwidth",
        "500Mbit",
        "--seeds",
        "2",
        "--memory",
        "4MiB",
        "--threads",
        "2",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        matrix.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    fn args(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let table = run_ok(&args(&with(&[]))).0;
    let csv = run_ok(&args(&with(&["--csv"]))).0;
    let mut files = Vec::new();
    for k in 1..=3 {
        let file = dir.join(format!("shard-{k}.jsonl"));
        let shard = format!("{k}/3");
        let (stdout, _) = run_ok(&args(&with(&[
            "--shard",
            &shard,
            "--output",
            file.to_str().unwrap(),
        ])));
        assert!(stdout.is_empty(), "a shard prints no table: {stdout}");
        files.push(file.to_str().unwrap().to_string());
    }
    // Shard 2 to stdout works too.
    let (stdout, _) = run_ok(&args(&with(&["--shard", "2/3"])));
    assert_eq!(stdout, std::fs::read_to_string(&files[1]).unwrap());
    let merge = |extra: &[&str]| {
        let mut a: Vec<&str> = vec!["compare"];
        a.extend(extra);
        a.push("--merge");
        a.extend(files.iter().rev().map(String::as_str));
        run_ok(&a).0
    };
    assert_eq!(merge(&[]), table, "the merged table is the unsharded one");
    assert_eq!(
        merge(&["--csv"]),
        csv,
        "the merged CSV is the unsharded one"
    );
    assert_eq!(csv.lines().count(), 1 + 5 * 4 * 2);
    // A missing shard is named.
    let stderr = run_err(&["compare", "--merge", &files[0], &files[2]]);
    assert!(stderr.contains("missing shards: 2/3"), "{stderr}");
    // Shards print no table, so they refuse the table's options.
    let stderr = run_err(&args(&with(&["--shard", "1/3", "--csv"])));
    assert!(stderr.contains("cannot be used with"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_file(&path).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The content pipeline, hash-first, images, hybrid and the kernel dirty log, as a user runs them.

fn demo_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec![
        "demo", "--guest", "process", "--memory", "48MiB", "--json", "--quiet",
    ];
    if !args.contains(&"--bandwidth") {
        all.extend_from_slice(&["--bandwidth", "400Mbit"]);
    }
    all.extend_from_slice(args);
    let (stdout, _) = run_ok(&all);
    serde_json::from_str(stdout.trim()).unwrap()
}

/// Every codec migrates the running guest exactly; the report says what each encoding carried
/// and the encodings used are the codec's.
#[test]
fn every_codec_migrates_exactly_and_reports_its_encodings() {
    let base = demo_json(&["--codec", "none"]);
    assert_eq!(base["verified"], true);
    let raw_bytes = base["bytes_sent"].as_u64().unwrap();
    for (codec, encoding) in [
        ("lz4", "lz4"),
        ("zstd", "other"),
        ("delta", "delta"),
        ("adaptive", "reference"),
    ] {
        let v = demo_json(&["--codec", codec]);
        assert_eq!(v["verified"], true, "{codec}");
        assert_eq!(v["codec"], codec);
        let used = v["encodings"][encoding]["pages"].as_u64().unwrap();
        assert!(used > 0, "{codec}: no {encoding} pages: {}", v["encodings"]);
        assert!(v["bytes_saved"].as_u64().unwrap() > 0, "{codec}");
        eprintln!(
            "{codec}: {} bytes on the wire ({} without a codec), {used} {encoding} pages",
            v["bytes_sent"], raw_bytes
        );
    }
    // Stateful codecs run on several channels too (tests/accounting/codec_channels.rs).
    let err = run_err(&["demo", "--codec", "brotli"]);
    assert!(err.contains("unknown codec"), "{err}");
}

/// save → restore gives back the saved memory (same digest), and a guest returning to a host
/// that kept its image sends what did not change as hashes.
#[test]
fn save_restore_and_a_returning_guest() {
    let dir = std::env::temp_dir().join(format!("memferry-cli-image-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("guest.img");
    let image = image.to_str().unwrap();
    let (out, _) = run_ok(&[
        "save",
        "-o",
        image,
        "--memory",
        "48MiB",
        "--incremental",
        "2",
        "--interval",
        "50ms",
        "--json",
    ]);
    let saved: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(saved["saves"].as_array().unwrap().len(), 4, "{saved}");
    let (out, _) = run_ok(&["restore", image, "--json"]);
    let restored: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(restored["digest"], saved["digest"]);
    assert_eq!(restored["generation"], 4);
    let back = demo_json(&["--content", image]);
    assert_eq!(back["verified"], true);
    let known = back["encodings"]["known"]["pages"].as_u64().unwrap();
    assert!(known > 1000, "only {known} pages sent as hashes");
    assert!(back["known_pages_announced"].as_u64().unwrap() >= known);
    let err = run_err(&["restore", dir.join("missing.img").to_str().unwrap()]);
    assert!(err.contains("cannot open"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A guest that writes faster than the link is handed over to post-copy (hybrid): a pause of
/// a device state's length, the stale pages named and sent after the switchover.
#[test]
fn an_outpacing_guest_is_handed_over_to_post_copy() {
    let v = demo_json(&[
        "--bandwidth",
        "100Mbit",
        "--write-rate",
        "2000000",
        "--hot-fraction",
        "0.5",
        "--hot-share",
        "1",
        "--downtime-ms",
        "5",
        "--when-outpaced",
        "post-copy",
    ]);
    assert_eq!(v["verified"], true);
    assert_eq!(v["stop_reason"], "not_converging");
    assert!(v["stop_detail"].as_str().unwrap().contains("post-copy"));
    assert!(v["discarded_pages"].as_u64().unwrap() > 0);
    assert!(
        v["downtime_ms"].as_f64().unwrap() < 50.0,
        "{}",
        v["downtime_ms"]
    );
    let err = run_err(&["simulate", "--when-outpaced", "post-copy"]);
    assert!(err.contains("does not model"), "{err}");
}

/// The kernel's dirty log instead of the workload's marks: exact, and the report says so and
/// carries its cost.
#[test]
fn the_kernel_dirty_log_runs_the_demo() {
    if let Err(why) = memferry_recorder::sys::probe() {
        eprintln!("SKIPPED the_kernel_dirty_log_runs_the_demo: {why}");
        return;
    }
    let v = demo_json(&["--kernel-dirty-log", "--downtime-ms", "20"]);
    assert_eq!(v["verified"], true);
    assert_eq!(v["dirty_log"], "kernel");
    let cost: f64 = v["per_round"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["dirty_sync_ms"].as_f64().unwrap())
        .sum();
    assert!(cost > 0.0);
}

// ---------------------------------------------------------------------------------------------
// Codecs in the simulator: `simulate --codec`, the paper presets of `compare`.

/// `simulate --codec` runs the real encoders on the simulated pages: every codec verifies,
/// sends pages in its own encodings, saves bytes against raw pages and reports CPU time; no
/// codec reports none of it.
#[test]
fn simulate_with_each_codec_verifies_and_uses_its_encodings() {
    let base = [
        "simulate",
        "--memory",
        "64MiB",
        "--bandwidth",
        "1Gbit",
        "--rate",
        "30000",
        "--downtime-ms",
        "50",
        "--json",
    ];
    let run = |extra: &[&str]| -> serde_json::Value {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        serde_json::from_str(&run_ok(&args).0).unwrap()
    };
    let raw = run(&[]);
    assert!(raw.get("codec").is_none(), "no codec, no codec figures");
    assert_eq!(raw["encodings"]["lz4"]["pages"].as_u64(), Some(0));
    let raw_bytes = raw["bytes_sent"].as_u64().unwrap();
    for (codec, slots) in [
        ("lz4", &["lz4"][..]),
        ("zstd", &["other"][..]),
        ("delta", &["delta", "delta_lz4"][..]),
        ("adaptive", &["reference"][..]),
    ] {
        let v = run(&["--codec", codec]);
        assert_eq!(v["verified"], true, "{codec}");
        let used: u64 = slots
            .iter()
            .map(|s| v["encodings"][s]["pages"].as_u64().unwrap())
            .sum();
        assert!(used > 0, "{codec}: none of {slots:?}: {}", v["encodings"]);
        let c = &v["codec"];
        assert_eq!(c["codec"], codec);
        assert!(
            c["encode_cpu_ms"]["total"].as_f64().unwrap() > 0.0,
            "{codec}: {c}"
        );
        let mechanism = if codec == "adaptive" {
            "reference"
        } else if codec == "zstd" {
            "zstd"
        } else {
            codec
        };
        let saved = c["mechanisms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mechanism"] == mechanism)
            .map(|m| m["saved_bytes"].as_u64().unwrap());
        assert!(saved.is_some_and(|s| s > 0), "{codec}: {c}");
        assert!(
            v["bytes_sent"].as_u64().unwrap() < raw_bytes,
            "{codec} sends less than raw pages"
        );
    }
    // A bad codec and a delta cache without a delta are refused.
    assert!(run_err(&["simulate", "--codec", "brotli"]).contains("unknown codec"));
    assert!(
        run_err(&["simulate", "--codec", "lz4", "--delta-cache", "1MiB"]).contains("--delta-cache")
    );
}

/// A paper preset prints each claimed figure beside a measured one; `--codec` is refused on
/// a preset that compares codecs itself.
#[test]
fn a_paper_preset_prints_the_claim_beside_the_measured_figure() {
    let (table, _) = run_ok(&[
        "compare",
        "--preset",
        "paper001-delta",
        "--memory",
        "64MiB",
        "--seeds",
        "1",
        "--workload",
        "uniform:rate=30000",
        "--threads",
        "2",
    ]);
    assert!(table.contains("claim: paper 001"), "{table}");
    let lines: Vec<&str> = table
        .lines()
        .filter(|l| l.contains("claimed -34%"))
        .collect();
    assert_eq!(lines.len(), 1, "{table}");
    let measured = lines[0].split("measured ").nth(1).unwrap();
    let figure: f64 = measured.split('%').next().unwrap().parse().unwrap();
    assert!(figure < 0.0, "delta sends less on uniform writes: {figure}");
    assert!(table.contains("delta MB saved"), "{table}");
    let stderr = run_err(&["compare", "--preset", "paper004-adaptive", "--codec", "lz4"]);
    assert!(stderr.contains("compares codecs itself"), "{stderr}");
}

/// A sharded comparison with a codec merges to the table and CSV an unsharded one prints.
#[test]
fn sharded_compare_with_a_codec_merges_to_the_same_table() {
    let dir =
        std::env::temp_dir().join(format!("memferry-cli-codec-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let matrix = [
        "compare",
        "--preset",
        "max-rounds",
        "--codec",
        "adaptive",
        "--delta-cache",
        "1MiB",
        "--workload",
        "uniform:rate=20000",
        "--seeds",
        "2",
        "--memory",
        "4MiB",
        "--threads",
        "2",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        matrix.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    fn args(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let table = run_ok(&args(&with(&[]))).0;
    assert!(table.contains("+adaptive"), "{table}");
    assert!(table.contains("reference MB saved"), "{table}");
    let csv = run_ok(&args(&with(&["--csv"]))).0;
    assert!(
        csv.lines().skip(1).all(|l| l.contains(",adaptive,")),
        "{csv}"
    );
    let mut files = Vec::new();
    for k in 1..=2 {
        let file = dir.join(format!("shard-{k}.jsonl"));
        let shard = format!("{k}/2");
        run_ok(&args(&with(&[
            "--shard",
            &shard,
            "--output",
            file.to_str().unwrap(),
        ])));
        files.push(file.to_str().unwrap().to_string());
    }
    let merge = |extra: &[&str]| {
        let mut a: Vec<&str> = vec!["compare"];
        a.extend(extra);
        a.push("--merge");
        a.extend(files.iter().map(String::as_str));
        run_ok(&a).0
    };
    assert_eq!(merge(&[]), table, "the merged table is the unsharded one");
    assert_eq!(
        merge(&["--csv"]),
        csv,
        "the merged CSV is the unsharded one"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
