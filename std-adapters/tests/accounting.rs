//! What a migration reports about its content pipeline, in real runs (issue 17): the source's
//! encoder CPU time, the destination's pages per encoding and decoder CPU time, and stateful
//! codecs on several channels. One test binary for the three (each binary links the whole
//! crate: fewer links keep CI short).

#![cfg(feature = "cli")]

/// `memferry` (the binary under test).
fn memferry() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_memferry"))
}

/// Runs `memferry ARGS`, which must succeed; its stdout.
fn run_ok(args: &[&str]) -> String {
    let out = memferry().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[path = "accounting/codec_channels.rs"]
mod codec_channels;
#[path = "accounting/encode_cpu.rs"]
mod encode_cpu;
#[path = "accounting/receive.rs"]
mod receive;
