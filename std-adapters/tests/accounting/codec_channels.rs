//! Stateful codecs over several connections (issue 17, item 9: with N channels, encoding runs
//! on N threads): `--codec delta` and `--codec adaptive` with `--channels 3` run one encoder
//! per channel's writer thread, each page kept to one channel (channel affinity), and the
//! destination's memory equals the source's at switchover (the digests match).

fn demo_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec![
        "demo", "--guest", "process", "--memory", "64MiB", "--json", "--quiet",
    ];
    all.extend_from_slice(args);
    serde_json::from_str(&super::run_ok(&all)).unwrap()
}

fn pages(v: &serde_json::Value, slot: &str) -> u64 {
    v["encodings"][slot]["pages"].as_u64().unwrap_or(0)
}

/// Several rounds on a slow link, so pages go again and deltas have a base: every channel count
/// and stateful codec migrates exactly, and deltas (or references) really went out.
#[test]
fn stateful_codecs_run_on_several_channels_and_stay_exact() {
    for codec in ["delta", "adaptive"] {
        for channels in ["1", "3"] {
            let v = demo_json(&[
                "--codec",
                codec,
                "--channels",
                channels,
                "--bandwidth",
                "400Mbit",
                "--downtime-ms",
                "20",
            ]);
            let what = format!("--codec {codec} --channels {channels}");
            assert_eq!(v["verified"], true, "{what}");
            assert_eq!(v["channels"].as_u64(), channels.parse().ok(), "{what}");
            let rounds = v["per_round"].as_array().map_or(0, Vec::len);
            assert!(rounds >= 3, "{what}: {rounds} rounds");
            let content = pages(&v, "delta") + pages(&v, "delta_lz4") + pages(&v, "reference");
            assert!(
                content > 0,
                "{what}: no delta or reference: {}",
                v["encodings"]
            );
        }
    }
}
