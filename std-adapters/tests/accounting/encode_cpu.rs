//! CPU time per content mechanism in real runs (issue 17, item 11): the std driver measures
//! the encoders it runs (`memferry_std::drive::EncodeTimes`) and the report carries it per
//! encoding (`encodings.*.cpu_nanos`), non-zero exactly for the encodings the encoders
//! produced, in the JSON and in the human output.

use memferry::strategy::PreCopyConfig;
use memferry::time::ByteRate;
use memferry_std::codec::{CodecChoice, CodecOptions};
use memferry_std::demo::{self, GuestOptions, SourceOptions, TransportKind};

use super::run_ok as memferry;

/// Encodings the source's encoder produces (zero pages and known content are the engine's).
const ENCODER_SLOTS: [&str; 6] = ["raw", "lz4", "delta", "delta_lz4", "reference", "other"];

/// `memferry demo --codec adaptive`: every encoding the adaptive encoder produced has CPU
/// time, every other has none, and the human output lists it.
#[test]
fn adaptive_demo_reports_cpu_time_for_the_encodings_it_used() {
    let common = [
        "demo",
        "--guest",
        "process",
        "--memory",
        "32MiB",
        "--codec",
        "adaptive",
        "--bandwidth",
        "400Mbit",
        "--quiet",
    ];
    let mut args = common.to_vec();
    args.push("--json");
    let v: serde_json::Value = serde_json::from_str(memferry(&args).trim()).unwrap();
    assert_eq!(v["verified"], true);
    let e = &v["encodings"];
    let mut used = Vec::new();
    for slot in ENCODER_SLOTS {
        let pages = e[slot]["pages"].as_u64().unwrap();
        let cpu = e[slot]["cpu_nanos"].as_u64().unwrap();
        assert_eq!(
            pages > 0,
            cpu > 0,
            "{slot}: {pages} pages, {cpu} ns of CPU: {e}"
        );
        if pages > 0 {
            used.push(slot);
        }
    }
    assert!(used.len() >= 2, "adaptive used only {used:?}: {e}");
    // The engine's own mechanisms are not the encoder's: no CPU time is claimed for them.
    assert_eq!(e["zero"]["cpu_nanos"], 0);
    assert_eq!(e["known"]["cpu_nanos"], 0);
    let text = memferry(&common);
    let line = text
        .lines()
        .find(|l| l.starts_with("encoder CPU time"))
        .unwrap_or_else(|| panic!("no CPU line in:\n{text}"));
    assert!(line.contains(" ms: "), "{line}");
}

/// With several channels each writer thread encodes with its own encoder; their times are
/// merged. With no codec nothing is encoded and no time is claimed.
#[test]
fn writer_threads_times_are_merged_and_no_codec_claims_none() {
    let guest = GuestOptions {
        memory: 16 << 20,
        workload: None,
        ..GuestOptions::default()
    };
    let run = |choice: CodecChoice, channels: u16| {
        let options = SourceOptions {
            codec: CodecOptions {
                choice,
                ..CodecOptions::default()
            },
            ..SourceOptions::default()
        };
        demo::run_demo_with(
            &guest,
            3,
            PreCopyConfig::default(),
            ByteRate::UNLIMITED,
            TransportKind::Loopback,
            channels,
            &options,
            None,
            |_| {},
        )
        .unwrap()
        .report
    };
    let lz4 = run(CodecChoice::Lz4, 2);
    assert_eq!(lz4.verified, Some(true));
    assert_eq!(lz4.channels, 2);
    // The guest's random pages do not compress: LZ4 tried them all and sent them raw.
    let tried = lz4.encodings.raw.pages + lz4.encodings.lz4.pages;
    assert!(tried > 0);
    assert!(lz4.encodings.raw.cpu_nanos + lz4.encodings.lz4.cpu_nanos > 0);
    for (name, slot) in lz4.encodings.slots() {
        assert_eq!(
            slot.pages > 0 && name != "zero",
            slot.cpu_nanos > 0,
            "{name}"
        );
    }
    let none = run(CodecChoice::None, 1);
    assert_eq!(none.verified, Some(true));
    assert_eq!(none.encodings.cpu_nanos(), 0);
}
