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
