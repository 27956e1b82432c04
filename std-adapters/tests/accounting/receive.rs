//! The destination's side of issue 17's accounting, as a user runs it: `memferry listen`
//! reports what it received per encoding (their sum is what the source says it sent) and the
//! CPU time its decoders spent; `listen --content IMAGE` offers a kept image (a VM returning to
//! the host that kept it) and says what its keep rules kept; the demo's JSON carries the
//! destination's decoding time.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

const SLOTS: [&str; 8] = [
    "raw",
    "zero",
    "lz4",
    "delta",
    "delta_lz4",
    "reference",
    "known",
    "other",
];

use super::{memferry, run_ok};

/// Starts `memferry listen 127.0.0.1:0 ARGS` and returns it with the address it bound.
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
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    (listener, addr)
}

/// `send ARGS` to a `listen LISTEN_ARGS --json`: (the source's report, the listener's summary).
fn migrate(listen_args: &[&str], send_args: &[&str]) -> (serde_json::Value, serde_json::Value) {
    let mut args = listen_args.to_vec();
    args.push("--json");
    let (listener, addr) = listen(&args);
    let mut send = vec!["send", addr.as_str(), "--json", "--quiet"];
    send.extend_from_slice(send_args);
    let sent = memferry().args(&send).output().unwrap();
    let received = listener.wait_with_output().unwrap();
    assert!(
        sent.status.success(),
        "send: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert!(
        received.status.success(),
        "listen: {}",
        String::from_utf8_lossy(&received.stderr)
    );
    (
        serde_json::from_slice(&sent.stdout).unwrap(),
        serde_json::from_slice(&received.stdout).unwrap(),
    )
}

fn pages(v: &serde_json::Value, slot: &str) -> u64 {
    v[slot]["pages"]
        .as_u64()
        .unwrap_or_else(|| panic!("no {slot}: {v}"))
}

/// The listener counts every page the source sent, per encoding, as the source does; its LZ4
/// decoder's time is measured; the old fields are still there.
#[test]
fn listen_reports_pages_per_encoding_and_decoding_time() {
    let (sent, got) = migrate(
        &[],
        &[
            "--memory",
            "32MiB",
            "--codec",
            "lz4",
            "--zero-fraction",
            "0.5",
        ],
    );
    assert_eq!(sent["verified"], true);
    // The contract fields scripts rely on.
    assert_eq!(got["verified"], true);
    assert_eq!(got["memory_bytes"], 32 << 20);
    assert_eq!(got["page_size"], 4096);
    assert!(got["device_state_bytes"].as_u64().is_some(), "{got}");

    let sent_pages = sent["pages_sent"].as_u64().unwrap();
    let by_slot: u64 = SLOTS.iter().map(|s| pages(&got["encodings"], s)).sum();
    assert_eq!(by_slot, sent_pages, "{}", got["encodings"]);
    assert_eq!(got["pages_received"], sent_pages);
    for slot in SLOTS {
        // The same split on both sides, and the same payload bytes.
        assert_eq!(
            got["encodings"][slot]["pages"], sent["encodings"][slot]["pages"],
            "{slot}"
        );
        assert_eq!(
            got["encodings"][slot]["bytes"], sent["encodings"][slot]["bytes"],
            "{slot}"
        );
        assert_eq!(pages(&got["decode"], slot), pages(&got["encodings"], slot));
    }
    let lz4 = pages(&got["encodings"], "lz4");
    assert!(
        lz4 > 0,
        "the source sent no LZ4 page: {}",
        sent["encodings"]
    );
    let lz4_cpu = got["decode"]["lz4"]["cpu_nanos"].as_u64().unwrap();
    assert!(lz4_cpu > 0, "{}", got["decode"]);
    // No decoder runs for raw and zero pages: no time claimed.
    assert_eq!(got["decode"]["raw"]["cpu_nanos"], 0);
    assert_eq!(got["decode"]["zero"]["cpu_nanos"], 0);
    let total = got["decode_cpu_nanos"].as_u64().unwrap();
    let sum: u64 = SLOTS
        .iter()
        .map(|s| got["decode"][*s]["cpu_nanos"].as_u64().unwrap())
        .sum();
    assert_eq!(total, sum);
    // Frames carry at least every payload byte.
    let payload: u64 = SLOTS
        .iter()
        .map(|s| got["encodings"][*s]["bytes"].as_u64().unwrap())
        .sum();
    assert!(got["bytes_received"].as_u64().unwrap() > payload);
    assert!(got["elapsed_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(got["known_pages"], 0);
    assert!(got.get("reuse").is_none(), "no image offered: {got}");
}

/// A directory of its own under the system's temp directory, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "memferry-receive-accounting-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The VM returns to the host that kept its image: the listener offers the image with its keep
/// rules, reports what they kept, and the source sends what the listener holds as hashes.
#[test]
fn listen_offers_a_kept_image_and_reports_its_reuse() {
    let dir = TempDir::new("image");
    let image = dir.0.join("guest.img");
    let image = image.to_str().unwrap();
    let saved: serde_json::Value = serde_json::from_str(
        run_ok(&[
            "save",
            "-o",
            image,
            "--memory",
            "32MiB",
            "--incremental",
            "2",
            "--interval",
            "50ms",
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    let (sent, got) = migrate(
        &["--content", image],
        &["--memory", "32MiB", "--bandwidth", "1Gbit"],
    );
    assert_eq!(sent["verified"], true);
    assert_eq!(got["verified"], true);
    // What the keep rules kept, as `save` recorded them and as the demo reports it.
    let reuse = &got["reuse"];
    let kept = reuse["kept"].as_u64().unwrap();
    assert!(kept > 0, "{reuse}");
    assert_eq!(reuse["rules"], saved["keep"]["rules"]);
    assert_eq!(reuse["pages"], 8192);
    let parts: u64 = ["kept", "zero", "dropped_hot", "dropped_updated"]
        .iter()
        .map(|k| reuse[*k].as_u64().unwrap())
        .sum();
    assert_eq!(parts, 8192, "{reuse}");
    // The source sent pages as hashes of the held content, and the listener took them from
    // the image.
    let known = pages(&sent["encodings"], "known");
    assert!(known > 1000, "only {known} pages sent as hashes");
    assert!(known <= kept, "{known} known pages, {kept} kept");
    assert_eq!(got["known_pages"], known);
    assert_eq!(pages(&got["encodings"], "known"), known);
    assert!(got["decode"]["known"]["cpu_nanos"].as_u64().unwrap() > 0);
    assert!(got["content_index_ms"].as_f64().unwrap() > 0.0, "{got}");
}

/// The text output says the same, and a bad `--content` is refused before anyone connects.
#[test]
fn listen_text_output_and_bad_content() {
    let (listener, addr) = listen(&[]);
    run_ok(&[
        "send",
        &addr,
        "--memory",
        "16MiB",
        "--codec",
        "lz4",
        "--zero-fraction",
        "0.5",
        "--quiet",
    ]);
    let out = listener.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("received 16.00 MiB and the device state; digest verified"),
        "{text}"
    );
    for line in ["pages received", "encodings", "decoder CPU time", "elapsed"] {
        assert!(
            text.lines().any(|l| l.starts_with(line)),
            "no {line} in:\n{text}"
        );
    }
    let cpu = text
        .lines()
        .find(|l| l.starts_with("decoder CPU time"))
        .unwrap();
    assert!(cpu.contains(" ms: lz4 "), "{cpu}");

    let dir = TempDir::new("bad");
    let missing = dir.0.join("missing.img");
    let out = memferry()
        .args(["listen", "127.0.0.1:0", "--content"])
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--content") && err.contains("missing.img"),
        "{err}"
    );
    let garbage = dir.0.join("garbage.img");
    std::fs::write(&garbage, b"not an image").unwrap();
    let out = memferry()
        .args(["listen", "127.0.0.1:0", "--content"])
        .arg(&garbage)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("neither a page-store directory nor an image"),
        "{err}"
    );
}

/// The demo's JSON carries the destination's decoding time, and its text prints it after the
/// encoders'.
#[test]
fn demo_reports_the_destinations_decoding_time() {
    let args = [
        "demo",
        "--guest",
        "process",
        "--memory",
        "32MiB",
        "--codec",
        "lz4",
        "--zero-fraction",
        "0.5",
        "--quiet",
    ];
    let mut json = args.to_vec();
    json.push("--json");
    let v: serde_json::Value = serde_json::from_str(run_ok(&json).trim()).unwrap();
    assert_eq!(v["verified"], true);
    let d = &v["destination"];
    assert!(d["decode_cpu_nanos"].as_u64().unwrap() > 0, "{d}");
    assert!(d["decode"]["lz4"]["cpu_nanos"].as_u64().unwrap() > 0, "{d}");
    for slot in SLOTS {
        assert_eq!(
            pages(&d["decode"], slot),
            pages(&v["encodings"], slot),
            "{slot}"
        );
    }
    assert_eq!(d["pages_received"], v["pages_sent"]);
    let text = run_ok(&args);
    let lines: Vec<&str> = text.lines().collect();
    let enc = lines
        .iter()
        .position(|l| l.starts_with("encoder CPU time"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        lines[enc + 1].starts_with("decoder CPU time") && lines[enc + 1].contains("lz4"),
        "{text}"
    );
}
