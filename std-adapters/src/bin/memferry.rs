//! `memferry`: migrate a guest's memory and report how it went.
//!
//! - `memferry demo`: a source and a destination thread in this process, over TCP on 127.0.0.1.
//! - `memferry listen ADDR` / `memferry send ADDR`: the two sides as two processes.

use std::net::TcpListener;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use memferry::page::PageSize;
use memferry::report::MigrationReport;
use memferry::schedule::{RatePlan, StopRules};
use memferry::strategy::PreCopyConfig;
use memferry::time::{ByteRate, Nanos};
use memferry::track::PredictorKind;
use memferry_std::compare::{self, Shard};
use memferry_std::demo::{self, GuestOptions, JobError, TransportKind};
use memferry_std::output::{self, ReportJson, WorkloadJson};
use memferry_std::sim::WorkloadModel;
use memferry_std::transport::tcp;
use memferry_std::units::{parse_rate, parse_size};
use memferry_std::workload::WorkloadConfig;

#[derive(Parser)]
#[command(
    name = "memferry",
    version,
    about = "Live migration of a VM's memory: pre-copy over TCP with a report, a virtual-time simulator, and comparisons of the algorithms"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Migrate an in-process guest, workload running, from a source thread to a destination
    /// thread over TCP on 127.0.0.1, and print the report. Exits non-zero unless verified.
    Demo {
        #[command(flatten)]
        guest_args: GuestArgs,
        #[command(flatten)]
        migration: MigrationArgs,
        /// How the two sides connect.
        #[arg(long, value_enum, default_value_t = TransportKind::Tcp)]
        transport: TransportKind,
        /// Which guest: a KVM guest when /dev/kvm is usable (auto, the default), always a KVM
        /// guest (kvm), or the in-process workload (process).
        #[arg(long, value_enum, default_value_t = GuestKind::Auto)]
        guest: GuestKind,
        #[command(flatten)]
        kvm: KvmArgs,
        /// Content the destination already holds: an image file (`memferry save`; a VM
        /// returning to a host that kept its image) or a shared page store directory. The
        /// source then sends pages found there as 16-byte hashes (hash-first). An image is
        /// offered with the keep rules `save --keep` recorded (paper 003), and the report says
        /// what they kept and dropped. In-process guest only.
        #[arg(long, value_name = "PATH")]
        content: Option<std::path::PathBuf>,
    },
    /// Wait for one migration on ADDR (e.g. 127.0.0.1:7070) and receive it. The source is not
    /// authenticated: what it may make this process do is bounded by --max-memory and
    /// --idle-timeout.
    Listen {
        /// Address to listen on.
        addr: String,
        /// Refuse guests larger than this (and guests larger than the memory this host has
        /// available). Checked against the source's hello before any memory is mapped.
        #[arg(long, default_value = "4GiB", value_parser = parse_size)]
        max_memory: u64,
        /// Give up on a connection whose opening frame (the hello, or a further connection's
        /// join) has not arrived in full this long after it connected, or on a source that does
        /// not open the further connections it announced within this long. Once the migration
        /// runs, its own 60 s peer timeout applies. With --kvm: a source that does not connect
        /// within this long, or sends nothing on a connection for this long, ends the listener
        /// with an error.
        #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
        idle_timeout: std::time::Duration,
        /// Print a JSON summary instead of text.
        #[arg(long)]
        json: bool,
        /// Receive a KVM guest (`send --kvm`): create a VM with the source's memory layout and
        /// run the guest once it has arrived, until it finishes.
        #[arg(long)]
        kvm: bool,
        /// Content this host already holds, announced to the source, which sends pages found
        /// there as 16-byte hashes; this side copies them from it (hash-first). A directory is
        /// a shared page store (both hosts reach it, `memferry store add`); a file is an image
        /// (`memferry save`: a VM returning to the host that kept its image), offered with the
        /// keep rules `save --keep` recorded (paper 003), and the summary says what they kept
        /// and dropped (`reuse`).
        #[arg(long, value_name = "PATH")]
        content: Option<std::path::PathBuf>,
    },
    /// Save the in-process guest to an image file (a fixed offset per page, sparse), live: a
    /// full save while the workload runs, then --incremental saves of the pages it dirtied,
    /// then a last one with the guest paused. Prints the saved memory's digest.
    Save {
        /// The image file (replaced by the first, full save; a crash leaves the previous one).
        #[arg(short, long)]
        output: std::path::PathBuf,
        #[command(flatten)]
        guest: GuestArgs,
        /// Incremental saves while the guest runs, one per --interval.
        #[arg(long, default_value_t = 1)]
        incremental: u32,
        /// Time between saves.
        #[arg(long, default_value = "200ms", value_parser = parse_positive_duration)]
        interval: std::time::Duration,
        /// Which pages are worth keeping for the VM's return (paper 003), recorded in a keep
        /// map beside the image (IMAGE.keep) that `demo --content IMAGE` applies: `rules`
        /// drops the pages dirtied in both of the last two intervals before the pause (likely
        /// to be updated soon) and, on return, pages rewritten in the image since; `hot` and
        /// `updated` apply one rule each; `all` keeps every page. The image itself always
        /// holds every page.
        #[arg(long, default_value = "rules", value_parser = parse_keep_rules)]
        keep: memferry_std::image::KeepRules,
        /// Print a JSON summary instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Restore an image file into fresh guest memory and print its digest (equal to the one
    /// `save` printed).
    Restore {
        /// The image file.
        image: std::path::PathBuf,
        /// Print a JSON summary instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Record the in-process workload's dirty pages into a trace file, for replay in the
    /// simulator (`memferry simulate --workload trace:FILE`).
    Record {
        /// The trace file to write.
        #[arg(short, long)]
        output: std::path::PathBuf,
        #[command(flatten)]
        guest: GuestArgs,
        /// Sampling interval (e.g. 100ms).
        #[arg(long, default_value = "100ms", value_parser = parse_duration)]
        interval: std::time::Duration,
        /// How long to record (e.g. 10s). Default: 10 s for the built-in workload; until the
        /// program exits for a program.
        #[arg(long, value_parser = parse_duration)]
        duration: Option<std::time::Duration>,
        /// What was recorded (default: the guest and workload settings, or the command line).
        #[arg(long)]
        description: Option<String>,
        /// The recorder library to preload into the program (default: found next to this
        /// executable; see docs/recording.md).
        #[arg(long)]
        library: Option<std::path::PathBuf>,
        /// A program to record instead of the built-in workload (after `--`, e.g.
        /// `memferry record -o xz.mft -- xz -9 big.tar`): its own writes, from the kernel
        /// (userfaultfd write-protect and PAGEMAP_SCAN, Linux 6.7 or later). The guest flags do
        /// not apply then.
        #[arg(last = true)]
        command: Vec<std::ffi::OsString>,
        /// Record a running KVM guest's dirty log (the generated guest of the guest options, or
        /// --kernel) instead of the in-process workload, with any --dirty-log.
        #[arg(long, conflicts_with = "command")]
        kvm: bool,
        #[command(flatten)]
        kvm_args: KvmArgs,
    },
    /// Simulate one migration in virtual time and print its report, the lower bounds and the
    /// analytic models' figures.
    Simulate(SimulateArgs),
    /// Simulate a small datacenter run by paper 000's placement policy: loads over time, the
    /// migrations it triggers (each simulated by the engine), time over threshold, bytes moved.
    Cluster {
        /// Clusters.
        #[arg(long, default_value_t = 2)]
        clusters: u32,
        /// Hosts per cluster.
        #[arg(long, default_value_t = 4)]
        hosts: u32,
        /// VMs in all.
        #[arg(long, default_value_t = 24)]
        vms: u32,
        /// Memory of each VM.
        #[arg(long, default_value = "256MiB", value_parser = parse_size)]
        vm_memory: u64,
        /// Virtual seconds to run.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// Load threshold (paper 000's Load metric).
        #[arg(long, default_value_t = 5.0)]
        threshold: f64,
        /// Seconds a host must stay above the threshold.
        #[arg(long, default_value_t = 30)]
        over_for: u64,
        /// Which VM moves: cpu, time or memory.
        #[arg(long, default_value = "cpu")]
        select: String,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compare strategies × workloads × seeds in the virtual-time simulator: a table of
    /// medians and spread, or CSV / JSON, and SVG plots. Runs split into shards that run
    /// anywhere (--shard K/N --output FILE) and merge into the same table (--merge FILES).
    Compare(CompareArgs),
    /// Migrate an in-process guest, workload running, to a `memferry listen` at ADDR.
    /// Write the generated KVM guest (the one `send --kvm` and `demo` run) as a multiboot ELF
    /// kernel: a 32-bit entry that enters long mode and drops to CPL3 to run the same workload,
    /// for `send --kvm --kernel FILE`, `demo --kernel FILE` or QEMU's `-kernel FILE` (`-m` of
    /// the same --memory, at most 2 GiB for QEMU's layout). Its memory layout and its writes
    /// are fixed in the image.
    GuestImage {
        /// The ELF file to write.
        #[arg(short, long)]
        output: std::path::PathBuf,
        #[command(flatten)]
        guest: GuestArgs,
        /// Writes the guest does before it ends (0: until stopped).
        #[arg(long, default_value_t = 0)]
        iterations: u64,
        /// Share of the guest's writes that sweep memory page after page.
        #[arg(long, default_value_t = 0.0)]
        sweep_share: f64,
        /// The TSC frequency that paces a guest with a --write-rate, in kHz (default: this
        /// host's, read from /dev/kvm).
        #[arg(long)]
        tsc_khz: Option<u32>,
    },
    Send {
        /// Address of the listener.
        addr: String,
        #[command(flatten)]
        guest: GuestArgs,
        #[command(flatten)]
        migration: MigrationArgs,
        /// Run a KVM guest (a generated long-mode guest dirtying memory at --write-rate, 0 for
        /// as fast as its vCPU runs) and migrate it live; `listen --kvm` receives it.
        #[arg(long)]
        kvm: bool,
        #[command(flatten)]
        kvm_args: KvmArgs,
    },
}

/// Which guest `demo` migrates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum GuestKind {
    /// A KVM guest when /dev/kvm is usable, else the in-process workload.
    Auto,
    /// A KVM guest.
    Kvm,
    /// The in-process workload.
    Process,
}

/// The KVM guest's own settings (`demo` with a KVM guest, `send --kvm`).
#[derive(Args)]
struct KvmArgs {
    /// The KVM dirty log: `bitmap` (KVM_GET_DIRTY_LOG), `manual[:CHUNK_PAGES]` (manual
    /// protect, chunks re-armed just before they are sent) or `ring[:ENTRIES]` (the dirty ring).
    #[arg(long, default_value = "manual")]
    dirty_log: String,
    /// Writes the KVM guest does before it ends (0: until stopped). With a count, the
    /// destination runs it to its end and checks its final hash against the reference.
    #[arg(long, default_value_t = 0)]
    iterations: u64,
    /// Share of the KVM guest's writes that sweep memory page after page.
    #[arg(long, default_value_t = 0.0)]
    sweep_share: f64,
    /// Boot this multiboot (v1) kernel instead of starting the generated guest in long mode
    /// (as QEMU's `-kernel`), in a VM of --memory. `memferry guest-image` writes the generated
    /// guest as one: give it the same guest options for the final-hash check.
    #[arg(long, value_name = "FILE")]
    kernel: Option<std::path::PathBuf>,
}

#[cfg(target_os = "linux")]
impl KvmArgs {
    /// The bytes of --kernel, if given.
    fn kernel_image(&self) -> Result<Option<Vec<u8>>, String> {
        self.kernel
            .as_ref()
            .map(|p| {
                std::fs::read(p).map_err(|e| format!("cannot read the kernel {}: {e}", p.display()))
            })
            .transpose()
    }

    fn config(
        &self,
        guest: &GuestArgs,
    ) -> Result<
        (
            memferry_std::kvm::guest::GuestConfig,
            memferry_std::kvm::dirty::DirtyLogMode,
        ),
        String,
    > {
        let mode = memferry_std::kvm::dirty::DirtyLogMode::parse(&self.dirty_log)?;
        let config = memferry_std::kvm::guest::GuestConfig {
            memory: guest.memory,
            low_memory: None,
            seed: guest.seed,
            iterations: self.iterations,
            hot_fraction: guest.hot_fraction,
            hot_share: guest.hot_share,
            sweep_share: self.sweep_share,
            writes_per_sec: guest.write_rate,
        };
        if guest.page_size != 4096 {
            return Err("a KVM guest has 4 KiB pages (--page-size 4KiB)".into());
        }
        config.validate()?;
        Ok((config, mode))
    }
}

/// Prints a KVM migration's report: the engine's, with the guest, the vCPU pause and the dirty
/// log's cost per sync.
#[cfg(target_os = "linux")]
fn print_kvm_report(
    report: &MigrationReport,
    mode: memferry_std::kvm::dirty::DirtyLogMode,
    pause: std::time::Duration,
    pause_to_running: Option<std::time::Duration>,
    syncs: &[memferry_std::kvm::dirty::DirtySample],
    final_hash: Option<(u64, u64)>,
    json: bool,
) {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    if json {
        let mut view = serde_json::to_value(ReportJson::<WorkloadJson>::new(report, None))
            .expect("the report serialises");
        if let Some(o) = view.as_object_mut() {
            o.insert("guest".into(), "kvm".into());
            o.insert(
                "kvm".into(),
                serde_json::json!({
                    "dirty_log": mode.name(),
                    "vcpu_pause_ms": ms(pause),
                    "pause_to_destination_running_ms": pause_to_running.map(ms),
                    "dirty_syncs": syncs.iter().map(|s| serde_json::json!({
                        "pages": s.pages, "sync_ms": ms(s.sync), "clear_ms": ms(s.clear), "clears": s.clears,
                    })).collect::<Vec<_>>(),
                    "final_hash_matches": final_hash.map(|(got, want)| got == want),
                }),
            );
        }
        println!("{view}");
    } else {
        print!("{}", output::table(report));
        println!("guest                    kvm ({} dirty log)", mode.name());
        println!(
            "vCPU pause               {:.2} ms (inside the downtime)",
            ms(pause)
        );
        if let Some(d) = pause_to_running {
            println!("pause to dest. running   {:.1} ms", ms(d));
        }
        let total_sync: f64 = syncs.iter().map(|s| ms(s.sync)).sum();
        let total_clear: f64 = syncs.iter().map(|s| ms(s.clear)).sum();
        println!(
            "dirty-log cost           {} syncs: {:.2} ms syncing, {:.2} ms clearing/harvesting",
            syncs.len(),
            total_sync,
            total_clear
        );
        for (i, s) in syncs.iter().enumerate() {
            println!(
                "  sync {:>3}: {:>8} pages, sync {:.3} ms, clear {:.3} ms ({} calls)",
                i + 1,
                s.pages,
                ms(s.sync),
                ms(s.clear),
                s.clears
            );
        }
        if let Some((got, want)) = final_hash {
            println!(
                "final hash               {got:#018x} on the destination, {} the unmigrated reference",
                if got == want { "equal to" } else { "DIFFERENT from" }
            );
        }
    }
}

/// `memferry simulate`.
#[derive(Args)]
struct SimulateArgs {
    /// Guest memory size [default: 1GiB, or for a trace the guest it was recorded from].
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// Allow --memory larger than a trace's guest (the extra pages are never written);
    /// without it a --memory other than the trace's is an error.
    #[arg(long)]
    pad_memory: bool,
    /// Workload: idle, uniform, hotcold, zipf, sweep or phases, optionally with parameters
    /// (`hotcold:rate=1e6,hot_fraction=0.05,hot_share=0.95`; see `compare --help`), or
    /// trace:FILE (a recording, replayed once from its start at its speed: see the
    /// --trace-* options).
    #[arg(long, default_value = "hotcold")]
    workload: String,
    /// Writes (pages for sweep) per virtual second [default: 200000]. Refused for idle
    /// and for a trace (its writes are recorded; scale them with --trace-speed).
    #[arg(long)]
    rate: Option<f64>,
    /// Link bandwidth.
    #[arg(long, default_value = "10Gbit", value_parser = parse_rate)]
    bandwidth: ByteRate,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Skip the digest check (saves 8 bytes per page on the destination: use it for huge
    /// guests). With it on (the default, as in `compare`), resume and total time include
    /// the source hashing its memory after the destination starts.
    #[arg(long)]
    no_verify: bool,
    /// Share of pages that start all-zero (a big guest rarely touches all its memory).
    #[arg(long, default_value_t = 0.2)]
    zero_fraction: f64,
    /// Fraction of memory that is hot [default: 0.05]; hotcold and phases only.
    #[arg(long)]
    hot_fraction: Option<f64>,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    trace: TraceArgs,
    /// Print the report as JSON (with the bounds and the models).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    codec: SimCodecArgs,
    /// What the pages hold: default, compressible, incompressible, rewrites (a write
    /// rewrites its page) or app-image (96% of pages shared with the application's other
    /// VMs). --zero-fraction rescales the default mix only.
    #[arg(long, default_value = "default")]
    content: String,
    /// The destination holds the image of another VM of the same application (use with
    /// --content app-image) and announces it hash-first.
    #[arg(long)]
    sibling_image: bool,
}

/// The page codec in the simulator (`simulate`, `compare`).
#[derive(Args)]
struct SimCodecArgs {
    /// Page codec, the real encoders run on the simulated pages (their CPU time charged at
    /// fixed rates): none, lz4, zstd, delta (XBZRLE against the copy sent in an earlier
    /// round, LZ4 on the delta when shorter) or adaptive (per page a dedup reference, a
    /// delta, LZ4 or raw, only encoders that keep up with the link).
    #[arg(long)]
    codec: Option<String>,
    /// Bytes of earlier page versions the source keeps for deltas [default: 64MiB].
    #[arg(long, value_parser = parse_size)]
    delta_cache: Option<u64>,
}

impl SimCodecArgs {
    /// The codec model, `None` when neither option was given.
    fn model(&self) -> Result<Option<memferry_std::sim::CodecModel>, String> {
        if self.codec.is_none() && self.delta_cache.is_none() {
            return Ok(None);
        }
        let codec = memferry_std::sim::SimCodec::parse(self.codec.as_deref().unwrap_or("none"))?;
        let mut model = memferry_std::sim::CodecModel::with(codec);
        if let Some(bytes) = self.delta_cache {
            if !matches!(
                codec,
                memferry_std::sim::SimCodec::Delta | memferry_std::sim::SimCodec::Adaptive
            ) {
                return Err("--delta-cache applies to --codec delta and adaptive".into());
            }
            model.delta_cache_bytes = bytes;
        }
        Ok(Some(model))
    }
}

/// `memferry compare`.
#[derive(Args)]
struct CompareArgs {
    /// Which comparison (see --list): its strategies, and its workloads unless --workload.
    #[arg(long, default_value = "default")]
    preset: String,
    /// List the presets with their real parameters and exit.
    #[arg(long)]
    list: bool,
    /// Seeds per cell (default: the preset's).
    #[arg(long)]
    seeds: Option<u64>,
    /// A workload to run instead of the preset's (repeat for several): trace:FILE, or a
    /// built-in model with optional parameters, NAME[:key=value,...] with NAME one of
    /// idle, uniform, hotcold, zipf, sweep, phases and keys rate (default 200000),
    /// hot_fraction, hot_share, period, exponent, start_fraction, length_fraction; e.g.
    /// `hotcold:rate=1e6,hot_share=0.95`.
    #[arg(long = "workload", value_name = "WORKLOAD")]
    workloads: Vec<String>,
    /// Guest memory for the built-in workloads (default: the preset's). Traces run on the
    /// guest they were recorded from; a --memory that differs is an error unless
    /// --pad-memory.
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// Allow --memory larger than a trace's guest (the extra pages are never written).
    #[arg(long)]
    pad_memory: bool,
    /// Link bandwidth instead of the preset's; repeat to run every workload on each link
    /// (the workload column then names the link: `hotcold-5%@200k on 1Gbit`).
    #[arg(long = "bandwidth", value_name = "RATE", value_parser = parse_rate)]
    bandwidths: Vec<ByteRate>,
    /// Skip the digest check. With it on (the default, as in `simulate`), resume and total
    /// time include the source hashing its memory after the destination starts.
    #[arg(long)]
    no_verify: bool,
    #[command(flatten)]
    trace: TraceArgs,
    /// Run only shard K of N (1 <= K <= N) of the run list (run i goes to shard
    /// i mod N + 1) and write its runs as JSON lines to --output (default: stdout), for
    /// `memferry compare --merge`.
    #[arg(long, value_name = "K/N", conflicts_with_all = ["csv", "json", "plots", "list"])]
    shard: Option<Shard>,
    /// Write the runs (JSON lines, one shard's or all) to this file.
    #[arg(short, long, value_name = "FILE")]
    output: Option<std::path::PathBuf>,
    /// Merge the runs files of every shard of one comparison and print its table (or
    /// --csv, --json, --plots) exactly as an unsharded run would.
    #[arg(long, value_name = "FILE", num_args = 1.., conflicts_with_all = ["list", "seeds", "workloads", "memory", "pad_memory", "bandwidths", "no_verify", "shard", "output", "preset", "codec", "delta_cache"])]
    merge: Vec<std::path::PathBuf>,
    /// Every run as CSV instead of the table.
    #[arg(long, conflicts_with = "json")]
    csv: bool,
    /// The whole comparison as JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Write SVG plots into this directory.
    #[arg(long)]
    plots: Option<std::path::PathBuf>,
    /// Worker threads (default: the machine's cores).
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    codec: SimCodecArgs,
}

#[derive(Args)]
struct GuestArgs {
    /// Guest memory size (e.g. 256MiB, 1GiB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    memory: u64,
    /// Page size: a power of two from 4KiB to 2MiB.
    #[arg(long, default_value = "4KiB", value_parser = parse_size)]
    page_size: u64,
    /// Seed of the guest's contents and of the workload's writes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Workload writes per second (0: an idle guest).
    #[arg(long, default_value_t = WorkloadConfig::default().writes_per_sec)]
    write_rate: u64,
    /// Fraction of memory that is hot.
    #[arg(long, default_value_t = WorkloadConfig::default().hot_fraction)]
    hot_fraction: f64,
    /// Share of writes that land in the hot set.
    #[arg(long, default_value_t = WorkloadConfig::default().hot_share)]
    hot_share: f64,
    /// Share of pages that start all-zero.
    #[arg(long, default_value_t = 0.1)]
    zero_fraction: f64,
}

/// When a migration's digests are compared (`--verify`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum VerifyWhen {
    /// After the destination started the guest (the default).
    AfterStart,
    /// Before it starts, inside the downtime.
    BeforeStart,
    /// Not at all.
    Off,
}

/// The stop rules, the predictor and the adaptive rate plan: `demo`, `send` and `simulate`
/// share them.
#[derive(Args)]
struct EngineArgs {
    /// Writable-working-set predictor that holds hot pages back to stop-and-copy:
    /// none, wsclock, lru, splay or history, optionally with parameters
    /// (e.g. `lru:syncs=3,cap=100000`, `history:m=2,n=4`).
    #[arg(long, default_value = "none", value_parser = parse_predictor)]
    predictor: PredictorKind,
    /// Dirty-log samples taken in round 1 to teach the predictor (the pre-processing phase).
    #[arg(long, default_value_t = 4)]
    learning_samples: u32,
    /// First-round limit of Clark's adaptive rate plan (default: the link bandwidth).
    #[arg(long, value_parser = parse_rate)]
    min_bandwidth: Option<ByteRate>,
    /// Per-round increment of the adaptive rate plan.
    #[arg(long, value_parser = parse_rate)]
    bandwidth_step: Option<ByteRate>,
    /// Downtime target in ms: pre-copy stops once the estimate is at or below it.
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Most pre-copy rounds before stop-and-copy.
    #[arg(long, default_value_t = StopRules::default().max_rounds)]
    max_rounds: u32,
    /// Stop after this many rounds without progress (0: never).
    #[arg(long, default_value_t = StopRules::default().non_convergence_rounds)]
    non_convergence_rounds: u32,
    /// Decide early that the guest outpaces the link: after this many rounds dirtying memory at
    /// 90% of the bandwidth or more without the dirty set shrinking (0: never).
    #[arg(long, default_value_t = StopRules::default().outpaced_rounds)]
    outpaced_rounds: u32,
    /// When a non-convergence rule fires on a round whose stop-and-copy set is more than 10%
    /// above the smallest seen, go on for up to this many rounds to stop near that low (0: stop
    /// at once).
    #[arg(long, default_value_t = StopRules::default().settle_rounds)]
    settle_rounds: u32,
    /// When the guest outpaces the link, throttle it (20%, then 10% more each time) and go on,
    /// instead of stopping the rounds (QEMU's auto-converge; the simulator models the slowed
    /// guest, a KVM guest's vCPUs sleep that share of every 10 ms, the in-process workload
    /// cannot be throttled and stops). Short for
    /// `--when-outpaced throttle`.
    #[arg(long, conflicts_with = "when_outpaced")]
    throttle: bool,
    /// What to do when the guest outpaces the link: stop the rounds and copy what is left
    /// (stop), throttle the guest and go on (throttle), or hand over to post-copy: the guest
    /// runs at the destination at once and the pages still to send follow, those it asks for
    /// first (post-copy; `demo` and `send` only).
    #[arg(long, value_enum, default_value_t = WhenOutpaced::Stop)]
    when_outpaced: WhenOutpaced,
    /// The largest downtime accepted, in ms: a migration that would pause longer is cancelled
    /// instead and the guest runs on at the source (default: no limit).
    #[arg(long)]
    max_downtime_ms: Option<u64>,
    /// Overall deadline for the pre-copy rounds, in ms.
    #[arg(long)]
    deadline_ms: Option<u64>,
}

/// What pre-copy does when the guest outpaces the link (`--when-outpaced`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum WhenOutpaced {
    /// Stop the rounds and copy what is left with the guest paused.
    Stop,
    /// Throttle the guest (QEMU's auto-converge) and go on.
    Throttle,
    /// Hand over to post-copy (hybrid).
    PostCopy,
}

#[derive(Args)]
struct MigrationArgs {
    /// TCP connections to shard pages across (QEMU's multifd, Cloud Hypervisor's
    /// connections): 1 to 16. The listener accepts whatever the source announces.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    channels: u16,
    #[command(flatten)]
    engine: EngineArgs,
    /// Link bandwidth (e.g. 1Gbit, 500MB/s); unlimited by default.
    #[arg(long, default_value = "unlimited", value_parser = parse_rate)]
    bandwidth: ByteRate,
    /// When to check the destination's memory digest against the source's: after-start (the
    /// guest runs at once; a mismatch leaves the source paused for you to decide), before-start
    /// (hashed inside the downtime; the destination starts only on a match, else the source
    /// resumes), or off.
    #[arg(long, value_enum, default_value_t = VerifyWhen::AfterStart)]
    verify: VerifyWhen,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// No per-round progress on stderr.
    #[arg(long)]
    quiet: bool,
    /// Page codec: none, lz4, zstd, delta (XBZRLE against the copy sent in an earlier round,
    /// LZ4 on the delta when shorter) or adaptive (per page: a reference to content sent
    /// before, a delta, LZ4 or raw, and only encoders that pay for themselves). Every codec
    /// runs one encoder per channel; with delta and adaptive each page keeps to one channel,
    /// and the delta cache and dedup index are split among the channels.
    #[arg(long, default_value = "none")]
    codec: memferry_std::codec::CodecChoice,
    /// Bytes of earlier page versions the source keeps for deltas.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    delta_cache: u64,
    /// zstd's compression level (1 fastest … 19).
    #[arg(long, default_value_t = 1)]
    zstd_level: i32,
    /// In-process guest: take dirty pages from the kernel (userfaultfd asynchronous
    /// write-protect + PAGEMAP_SCAN, Linux 6.7+) instead of the workload's own marks.
    #[arg(long)]
    kernel_dirty_log: bool,
}

impl MigrationArgs {
    fn source_options(&self) -> demo::SourceOptions {
        demo::SourceOptions {
            codec: memferry_std::codec::CodecOptions {
                choice: self.codec,
                delta_cache_bytes: self.delta_cache.min(usize::MAX as u64) as usize,
                zstd_level: self.zstd_level,
                ..memferry_std::codec::CodecOptions::default()
            },
            kernel_dirty_log: self.kernel_dirty_log,
            link_estimate: None,
        }
    }
}

/// How a trace workload is replayed (`simulate` and `compare`; refused for other workloads).
#[derive(Args)]
struct TraceArgs {
    /// Start replay this far into the recording (recorded time, e.g. 5s) [default: 0s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    trace_start: Option<std::time::Duration>,
    /// Replay this much of the recording from --trace-start (recorded time, e.g. 10s)
    /// [default: to its end].
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    trace_length: Option<std::time::Duration>,
    /// Play the replayed part again when it ends (otherwise the guest goes idle); the output
    /// says whether, and how many times, it looped.
    #[arg(long)]
    trace_loop: bool,
    /// Replay speed: 2 plays the recording in half its time (the same writes, twice the dirty
    /// rate) [default: 1].
    #[arg(long, value_name = "X", value_parser = parse_speed)]
    trace_speed: Option<f64>,
}

impl TraceArgs {
    fn given(&self) -> Option<&'static str> {
        if self.trace_start.is_some() {
            Some("--trace-start")
        } else if self.trace_length.is_some() {
            Some("--trace-length")
        } else if self.trace_loop {
            Some("--trace-loop")
        } else if self.trace_speed.is_some() {
            Some("--trace-speed")
        } else {
            None
        }
    }

    /// Sets a trace model's replay; a model that is not a trace is left alone.
    fn apply(&self, model: &mut WorkloadModel) {
        if let WorkloadModel::Trace {
            looped,
            start,
            length,
            speed,
            ..
        } = model
        {
            *looped = self.trace_loop;
            *start = self.trace_start.map_or(Nanos::ZERO, nanos);
            *length = self.trace_length.map(nanos);
            *speed = self.trace_speed.unwrap_or(1.0);
        }
    }
}

fn nanos(d: std::time::Duration) -> Nanos {
    Nanos(d.as_nanos().min(u64::MAX as u128) as u64)
}

impl GuestArgs {
    fn options(&self) -> Result<GuestOptions, String> {
        let page_size = PageSize::new(self.page_size).map_err(|e| e.to_string())?;
        for (name, v) in [
            ("--hot-fraction", self.hot_fraction),
            ("--hot-share", self.hot_share),
            ("--zero-fraction", self.zero_fraction),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} must be between 0 and 1, not {v}"));
            }
        }
        if self.memory < self.page_size {
            return Err(format!("--memory {} is smaller than one page", self.memory));
        }
        Ok(GuestOptions {
            memory: self.memory,
            page_size,
            zero_fraction: self.zero_fraction,
            workload: Some(WorkloadConfig {
                writes_per_sec: self.write_rate,
                hot_fraction: self.hot_fraction,
                hot_share: self.hot_share,
                seed: self.seed,
            }),
        })
    }
}

impl EngineArgs {
    /// The engine's settings: rounds paced to `unpaced` (unlimited in the simulator, whose
    /// link model sets the pace) unless the adaptive plan is asked for, which rises to `max`.
    fn config(&self, max: ByteRate, unpaced: ByteRate) -> PreCopyConfig {
        let rate = match (self.min_bandwidth, self.bandwidth_step) {
            (None, None) => RatePlan::fixed(unpaced),
            (min, step) => RatePlan::adaptive(
                min.unwrap_or(max).min(max),
                step.unwrap_or(ByteRate(0)),
                max,
            ),
        };
        PreCopyConfig {
            rate,
            stop: StopRules {
                downtime_target: Nanos::from_millis(self.downtime_ms),
                max_rounds: self.max_rounds.max(1),
                non_convergence_rounds: self.non_convergence_rounds,
                deadline: self.deadline_ms.map(Nanos::from_millis),
                outpaced_rounds: self.outpaced_rounds,
                settle_rounds: self.settle_rounds,
                max_downtime: self.max_downtime_ms.map(Nanos::from_millis),
                ..StopRules::default()
            },
            predictor: self.predictor,
            learning_samples: self.learning_samples,
            throttle_when_outpaced: self.throttle || self.when_outpaced == WhenOutpaced::Throttle,
            post_copy_when_outpaced: self.when_outpaced == WhenOutpaced::PostCopy,
            ..PreCopyConfig::default()
        }
    }
}

impl MigrationArgs {
    fn config(&self) -> PreCopyConfig {
        PreCopyConfig {
            verify: self.verify != VerifyWhen::Off,
            verify_before_start: self.verify == VerifyWhen::BeforeStart,
            ..self.engine.config(self.bandwidth, self.bandwidth)
        }
    }
}

/// `--keep`: paper 003's keep rules by name.
fn parse_keep_rules(s: &str) -> Result<memferry_std::image::KeepRules, String> {
    memferry_std::image::KeepRules::parse(s)
        .ok_or_else(|| format!("unknown keep rules {s:?}: use rules, hot, updated or all"))
}

/// The JSON view of what an image's keep rules kept and dropped.
fn keep_json(k: &memferry_std::image::KeepStats) -> serde_json::Value {
    serde_json::json!({"rules": k.rules.name(), "pages": k.pages, "kept": k.kept, "zero": k.zero,
        "dropped_hot": k.dropped_hot, "dropped_updated": k.dropped_updated})
}

/// The destination's figures in `--json` (`demo`'s `destination`, `listen`'s summary).
fn destination_json(r: &demo::ReceiveStats) -> output::DestinationJson {
    output::DestinationJson::new(r)
}

/// Adds what a listener received to its JSON summary `view`: `encodings`, `known_pages` and
/// the destination fields (`pages_received`, `decode_cpu_nanos`, `decode`, …).
fn add_received_json(view: &mut serde_json::Value, stats: &demo::ReceiveStats) {
    let Some(o) = view.as_object_mut() else {
        return;
    };
    o.insert("encodings".into(), serde_json::json!(stats.encodings));
    o.insert(
        "known_pages".into(),
        serde_json::json!(stats.encodings.known.pages),
    );
    if let Ok(serde_json::Value::Object(more)) = serde_json::to_value(destination_json(stats)) {
        o.extend(more);
    }
}

/// `memferry listen`'s summary of what it received: the guest, pages and bytes per encoding,
/// decoding CPU time, time from the hello to the end, and what a kept image offered.
fn print_received(received: &demo::Received, json: bool) {
    let host = &received.host;
    let stats = &received.stats;
    let g = host.region().geometry();
    if json {
        let mut view = serde_json::json!({
            "verified": host.verdict == Some(memferry::wire::Verdict::Match),
            "memory_bytes": g.memory_bytes(),
            "page_size": g.page_size().bytes(),
            "device_state_bytes": host.device_state().map_or(0, |s| s.len()),
        });
        add_received_json(&mut view, stats);
        if let (Some(o), Some(reuse)) = (view.as_object_mut(), &received.reuse) {
            o.insert("reuse".into(), keep_json(reuse));
        }
        println!("{view}");
        return;
    }
    println!(
        "received {} and the device state; digest {}",
        output::human_bytes(g.memory_bytes()),
        match host.verdict {
            Some(memferry::wire::Verdict::Match) => "verified",
            Some(_) => "not checked",
            None => "not sent by the source",
        }
    );
    print!("{}", output::received_lines(stats));
    if let Some(reuse) = &received.reuse {
        println!("reuse (kept image)       {}", reuse.describe());
    }
}

/// `memferry save`: a live save of the in-process guest, then incremental ones, and the keep
/// map of what is worth keeping for the VM's return.
fn save_guest(
    path: &std::path::Path,
    guest: &GuestArgs,
    incremental: u32,
    interval: std::time::Duration,
    keep: memferry_std::image::KeepRules,
    json: bool,
) -> ExitCode {
    use memferry::memory::{sync_all, SourceGuest};
    use memferry_std::image::Image;
    let options = match guest.options() {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let mut host = match demo::prepare_source(&options, guest.seed) {
        Ok(h) => h,
        Err(e) => return fail(e),
    };
    let layout = memferry::page::MemoryLayout::single(host.region().geometry());
    let mut image = match Image::create(path, &layout) {
        Ok(i) => i,
        Err(e) => return fail(format!("cannot create {}: {e}", path.display())),
    };
    let mut dirty = memferry::bitmap::DirtyBitmap::new(layout.page_count());
    // Writes from here on are in the next save.
    if let Err(e) = sync_all(&layout, &mut host, &mut dirty) {
        return fail(e);
    }
    dirty.clear();
    let mut saves = Vec::new();
    let mut previous = None;
    match image.save_full(&mut host) {
        Ok(stats) => saves.push(("full", stats)),
        Err(e) => return fail(format!("saving {}: {e}", path.display())),
    }
    for n in 0..=incremental {
        let last = n == incremental;
        if last {
            // The final save sees a paused guest: the image is one moment of its memory.
            if let Err(e) = host.pause() {
                return fail(e);
            }
        } else {
            std::thread::sleep(interval);
        }
        if let Err(e) = sync_all(&layout, &mut host, &mut dirty) {
            return fail(e);
        }
        match image.save_incremental(&dirty, &mut host) {
            Ok(stats) => saves.push(("incremental", stats)),
            Err(e) => return fail(format!("saving {}: {e}", path.display())),
        }
        if !last {
            // The history of dirty pages: the previous interval's, for the hot set below.
            previous = Some(dirty.clone());
            dirty.clear();
        }
    }
    // The writable working set at departure, likely to be updated soon: the pages dirtied in
    // the last interval before the pause and in the one before it (the last one alone after a
    // single interval). A page written once by chance is not hot; one written in both is.
    if let Some(previous) = &previous {
        dirty.intersect_with(previous);
    }
    let kept = match image.keep_for_reuse(&dirty, keep) {
        Ok(k) => k,
        Err(e) => return fail(format!("writing the keep map of {}: {e}", path.display())),
    };
    let digest =
        memferry::digest::memory_digest(host.region().snapshot(), options.page_size.bytes());
    if json {
        let list: Vec<serde_json::Value> = saves
            .iter()
            .map(|(kind, s)| {
                serde_json::json!({"kind": kind, "generation": s.generation, "pages": s.pages,
                    "data_pages": s.data_pages, "zero_pages": s.zero_pages, "image_bytes": s.image_bytes,
                    "journal_bytes": s.journal_bytes, "elapsed_ms": s.elapsed.as_secs_f64() * 1e3})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"image": path.display().to_string(), "digest": format!("{digest:032x}"), "saves": list,
                "keep": keep_json(&kept)})
        );
    } else {
        for (kind, s) in &saves {
            println!(
                "{kind:<11} save, generation {}: {} pages ({} with data, {} zero), {} to the image, {} to the journal, in {:.1} ms",
                s.generation,
                s.pages,
                s.data_pages,
                s.zero_pages,
                output::human_bytes(s.image_bytes),
                output::human_bytes(s.journal_bytes),
                s.elapsed.as_secs_f64() * 1e3
            );
        }
        println!("kept for reuse: {}", kept.describe());
        println!("saved {} (digest {digest:032x})", path.display());
    }
    ExitCode::SUCCESS
}

/// `memferry restore IMAGE`: the image into fresh memory, and its digest.
fn restore_image(path: &std::path::Path, json: bool) -> ExitCode {
    use memferry_std::image::{Image, Limits};
    let image = match Image::open_read_only(path, Limits::default()) {
        Ok(i) => i,
        Err(e) => return fail(format!("cannot open {}: {e}", path.display())),
    };
    let layout = image.layout().clone();
    if layout.regions().len() != 1 {
        return fail(format!(
            "{} has {} memory regions; restore maps one",
            path.display(),
            layout.regions().len()
        ));
    }
    let mut host = match memferry_std::memory::DestinationHost::new_lazy(layout.geometry()) {
        Ok(h) => h,
        Err(e) => return fail(format!("cannot map the guest: {e}")),
    };
    let began = std::time::Instant::now();
    let stats = match image.restore_into(&mut host) {
        Ok(s) => s,
        Err(e) => return fail(format!("restoring {}: {e}", path.display())),
    };
    let elapsed = began.elapsed();
    let digest =
        memferry::digest::memory_digest(host.region().snapshot(), layout.page_size().bytes());
    if json {
        println!(
            "{}",
            serde_json::json!({"image": path.display().to_string(), "generation": image.generation(),
                "memory_bytes": layout.geometry().memory_bytes(), "data_pages": stats.data_pages,
                "digest": format!("{digest:032x}"), "elapsed_ms": elapsed.as_secs_f64() * 1e3})
        );
    } else {
        println!(
            "restored {} (generation {}): {} of memory, {} pages with data, in {:.1} ms; digest {digest:032x}",
            path.display(),
            image.generation(),
            output::human_bytes(layout.geometry().memory_bytes()),
            stats.data_pages,
            elapsed.as_secs_f64() * 1e3
        );
    }
    ExitCode::SUCCESS
}

/// `memferry record --kvm -o F`: records a running KVM guest's dirty log into a trace.
#[cfg(target_os = "linux")]
fn record_kvm(
    output: std::path::PathBuf,
    guest: &GuestArgs,
    kvm: &KvmArgs,
    interval: std::time::Duration,
    duration: std::time::Duration,
    description: Option<String>,
) -> ExitCode {
    if interval.is_zero() || duration < interval {
        return fail("--interval must be positive and no longer than --duration");
    }
    let (config, mode) = match kvm.config(guest) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let kernel = match kvm.kernel_image() {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    let description = description.unwrap_or_else(|| match &kvm.kernel {
        Some(k) => format!(
            "memferry record --kvm: the multiboot kernel {} in a {} VM, {} dirty log",
            k.display(),
            output::human_bytes(config.memory),
            mode.name()
        ),
        None => format!(
            "memferry record --kvm: {} KVM guest, {} writes/s, {}% of writes to {}% of memory, {}% sweeping, seed {}, {} dirty log",
            output::human_bytes(config.memory),
            config.writes_per_sec,
            config.hot_share * 100.0,
            config.hot_fraction * 100.0,
            config.sweep_share * 100.0,
            config.seed,
            mode.name()
        ),
    });
    let file = match std::fs::File::create(&output) {
        Ok(f) => std::io::BufWriter::new(f),
        Err(e) => return fail(format!("cannot create {}: {e}", output.display())),
    };
    eprintln!(
        "recording a KVM guest ({} dirty log): {} intervals of {:?} into {}",
        mode.name(),
        duration.as_nanos() / interval.as_nanos(),
        interval,
        output.display()
    );
    let options = memferry_std::trace::RecordOptions {
        interval,
        duration,
        description,
    };
    match memferry_std::trace::record_kvm_guest(
        &config,
        mode,
        kernel.as_deref(),
        &options,
        file,
        |_| std::ops::ControlFlow::Continue(()),
    ) {
        Ok(s) => {
            println!(
                "wrote {}: {} intervals, {} dirty pages (at most {} in one interval), a guest of {} pages, {} bytes; the guest did {} writes",
                output.display(),
                s.trace.intervals,
                s.trace.dirty_pages,
                s.trace.max_dirty_pages,
                s.guest_pages,
                s.trace.file_bytes,
                s.guest_writes.map_or("an unknown number of".into(), |w| w.to_string())
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("recording failed: {e}")),
    }
}

#[cfg(not(target_os = "linux"))]
fn record_kvm(
    _: std::path::PathBuf,
    _: &GuestArgs,
    _: &KvmArgs,
    _: std::time::Duration,
    _: std::time::Duration,
    _: Option<String>,
) -> ExitCode {
    fail("a KVM guest needs Linux")
}

/// `memferry record -o F -- CMD ARGS…`: records a program's writes into a trace.
#[cfg(target_os = "linux")]
fn record_a_program(
    output: std::path::PathBuf,
    interval: std::time::Duration,
    duration: Option<std::time::Duration>,
    description: Option<String>,
    library: Option<std::path::PathBuf>,
    command: Vec<std::ffi::OsString>,
) -> ExitCode {
    use memferry_std::record_program::{record_program, ProgramRecordOptions};
    if interval.is_zero() || duration.is_some_and(|d| d < interval) {
        return fail("--interval must be positive and no longer than --duration");
    }
    let options = ProgramRecordOptions {
        interval,
        library,
        duration,
        description,
    };
    let file = match std::fs::File::create(&output) {
        Ok(f) => f,
        Err(e) => return fail(format!("cannot create {}: {e}", output.display())),
    };
    eprintln!(
        "recording {:?} every {:?} into {}",
        command,
        interval,
        output.display()
    );
    match record_program(&command, &options, file) {
        Ok(summary) => {
            for warning in &summary.warnings {
                eprintln!("memferry: warning: {warning}");
            }
            if !summary.complete {
                eprintln!(
                    "memferry: the program did not exit normally: its last interval is missing"
                );
            }
            println!(
                "wrote {}: {} intervals, {} dirty pages (at most {} in one interval), a guest of {} pages, {} bytes; the program {}",
                output.display(),
                summary.intervals,
                summary.dirty_pages,
                summary.max_dirty_pages,
                summary.guest_pages,
                summary.file_bytes,
                summary.status
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("recording failed: {e}")),
    }
}

#[cfg(not(target_os = "linux"))]
fn record_a_program(
    _output: std::path::PathBuf,
    _interval: std::time::Duration,
    _duration: Option<std::time::Duration>,
    _description: Option<String>,
    _library: Option<std::path::PathBuf>,
    _command: Vec<std::ffi::OsString>,
) -> ExitCode {
    fail("recording a program needs Linux (userfaultfd and PAGEMAP_SCAN)")
}

fn parse_speed(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!(
            "'{text}' is not a speed: give a positive number (2 plays twice as fast)"
        )),
    }
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("'{text}' is not a duration ({e}); try 100ms or 10s"))
}

fn parse_positive_duration(text: &str) -> Result<std::time::Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err(format!("'{text}' is not a positive duration; try 10s")),
        d => Ok(d),
    }
}

fn parse_predictor(text: &str) -> Result<PredictorKind, String> {
    PredictorKind::parse(text).map_err(|e| e.to_string())
}

fn print_report(report: &MigrationReport, workload: Option<WorkloadJson>, json: bool) {
    if json {
        let view = ReportJson::new(report, workload);
        println!(
            "{}",
            serde_json::to_string(&view).expect("the report serialises")
        );
    } else {
        print!("{}", output::table(report));
    }
}

fn exit_for(report: &MigrationReport) -> ExitCode {
    if report.verified == Some(true) {
        ExitCode::SUCCESS
    } else {
        eprintln!("memferry: the destination's memory was not verified");
        ExitCode::from(2)
    }
}

/// Prints `e` (its control characters escaped: an error may quote a peer) and fails.
fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("memferry: {}", demo::printable(&e.to_string()));
    ExitCode::FAILURE
}

/// The built-in workloads' rate when none is given (`simulate --rate`, `rate=` in a spec).
const DEFAULT_RATE: f64 = 200_000.0;

/// Prints a comparison as asked: the table, CSV or JSON on stdout, plots into a directory.
fn print_comparison(
    comparison: &compare::Comparison,
    csv: bool,
    json: bool,
    plots: Option<&std::path::Path>,
) -> ExitCode {
    if csv {
        print!("{}", compare::csv(comparison));
    } else if json {
        println!(
            "{}",
            serde_json::to_string(comparison).expect("the comparison serialises")
        );
    } else {
        print!("{}", compare::table(comparison));
    }
    if let Some(dir) = plots {
        match memferry_std::plots::write_all(comparison, dir) {
            Ok(files) => files
                .iter()
                .for_each(|f| eprintln!("wrote {}", f.display())),
            Err(e) => return fail(format!("cannot write plots to {}: {e}", dir.display())),
        }
    }
    ExitCode::SUCCESS
}

/// The workloads `compare --workload` names, with the trace options applied to the traces.
fn compare_workloads(specs: &[String], trace: &TraceArgs) -> Result<Vec<WorkloadModel>, String> {
    let mut models = Vec::new();
    for spec in specs {
        let mut model = WorkloadModel::parse(spec, DEFAULT_RATE)?;
        trace.apply(&mut model);
        models.push(model);
    }
    if let Some(flag) = trace.given() {
        if !models.iter().any(|m| m.trace_path().is_some()) {
            return Err(format!(
                "{flag} applies to trace workloads, and none is given (--workload trace:FILE)"
            ));
        }
    }
    Ok(models)
}

fn run_compare(args: CompareArgs) -> ExitCode {
    if args.list {
        print!("{}", compare::list());
        return ExitCode::SUCCESS;
    }
    if !args.merge.is_empty() {
        return match compare::merge_files(&args.merge) {
            Ok(comparison) => {
                eprintln!(
                    "merged {} runs from {} files",
                    comparison.runs.len(),
                    args.merge.len()
                );
                print_comparison(&comparison, args.csv, args.json, args.plots.as_deref())
            }
            Err(e) => fail(e),
        };
    }
    let all = compare::presets();
    let names: Vec<&str> = all.iter().map(|p| p.name).collect();
    let Some(mut chosen) = all.iter().find(|p| p.name == args.preset).cloned() else {
        return fail(format!(
            "no preset '{}'; try one of: {}",
            args.preset,
            names.join(", ")
        ));
    };
    if let Some(n) = args.seeds {
        chosen.seeds = (1..=n.max(1)).collect();
    }
    let workloads = match compare_workloads(&args.workloads, &args.trace) {
        Ok(w) => w,
        Err(e) => return fail(e),
    };
    let overrides = compare::Overrides {
        workloads,
        memory: args.memory,
        pad_memory: args.pad_memory,
        bandwidths: args.bandwidths.clone(),
        verify: args.no_verify.then_some(false),
        codec: match args.codec.model() {
            Ok(c) => c,
            Err(e) => return fail(e),
        },
    };
    let matrix = match compare::Matrix::new(&chosen, &overrides) {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    for note in matrix.notes() {
        eprintln!("memferry: note: {note}");
    }
    let shard = args.shard.unwrap_or(compare::Shard::ALL);
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let started = std::time::Instant::now();
    let result = compare::run_shard(&matrix, shard, threads, |done, total| {
        eprint!("\rsimulating: {done}/{total} runs");
        if done == total {
            eprintln!();
        }
    });
    let runs = match result {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    eprintln!(
        "{} runs{} in {:.1} s of wall time",
        runs.len(),
        if args.shard.is_some() {
            format!(" (shard {shard} of a {}-run comparison)", matrix.len())
        } else {
            String::new()
        },
        started.elapsed().as_secs_f64()
    );
    let info = matrix.info();
    if args.shard.is_some() || args.output.is_some() {
        let written = match &args.output {
            Some(path) => std::fs::File::create(path)
                .and_then(|f| compare::write_runs(std::io::BufWriter::new(f), &info, shard, &runs))
                .map_err(|e| format!("cannot write {}: {e}", path.display())),
            None => compare::write_runs(std::io::stdout().lock(), &info, shard, &runs)
                .map_err(|e| format!("cannot write the runs: {e}")),
        };
        if let Err(e) = written {
            return fail(e);
        }
        if let Some(path) = &args.output {
            eprintln!("wrote {} runs to {}", runs.len(), path.display());
        }
        if args.shard.is_some() {
            eprintln!("merge every shard's file with: memferry compare --merge FILES...");
            return ExitCode::SUCCESS;
        }
    }
    let comparison = compare::summarise(&info, runs.into_iter().map(|r| r.run).collect::<Vec<_>>());
    print_comparison(&comparison, args.csv, args.json, args.plots.as_deref())
}

/// The workload `simulate` runs: the spec, with --rate, --hot-fraction and the trace options
/// applied where they mean something and refused where they do not.
fn simulate_workload(args: &SimulateArgs) -> Result<WorkloadModel, String> {
    let spec_rate = args
        .workload
        .split_once(':')
        .is_some_and(|(name, params)| name != "trace" && params.contains("rate="));
    if spec_rate && args.rate.is_some() {
        return Err("give the rate once: --rate or rate= in --workload".into());
    }
    if let Some(rate) = args.rate {
        if !(rate.is_finite() && rate >= 0.0) {
            return Err(format!(
                "--rate must be a number of writes per second, not {rate}"
            ));
        }
    }
    let mut model = WorkloadModel::parse(&args.workload, args.rate.unwrap_or(DEFAULT_RATE))?;
    if args.rate.is_some() && !model.has_rate() {
        return Err(match model {
            WorkloadModel::Trace { .. } => "--rate does not apply to a trace: its writes are the recorded ones (use --trace-speed to replay them faster or slower)".into(),
            _ => format!("--rate does not apply to the {} workload, which writes nothing", model.name()),
        });
    }
    if let Some(f) = args.hot_fraction {
        if !(0.0..=1.0).contains(&f) {
            return Err("--zero-fraction and --hot-fraction must be between 0 and 1".into());
        }
        if args.workload.contains("hot_fraction=") {
            return Err(
                "give the hot fraction once: --hot-fraction or hot_fraction= in --workload".into(),
            );
        }
        match &mut model {
            WorkloadModel::HotCold { hot_fraction, .. }
            | WorkloadModel::Phases { hot_fraction, .. } => *hot_fraction = f,
            WorkloadModel::Trace { .. } => {
                return Err(
                    "--hot-fraction does not apply to a trace: its writes are the recorded ones"
                        .into(),
                )
            }
            other => {
                return Err(format!(
                    "--hot-fraction applies to the hotcold and phases workloads, not {}",
                    other.name()
                ))
            }
        }
    }
    match (&model, args.trace.given()) {
        (WorkloadModel::Trace { .. }, _) => args.trace.apply(&mut model),
        (_, Some(flag)) => {
            return Err(format!(
                "{flag} applies to a trace workload (--workload trace:FILE), not {}",
                model.name()
            ))
        }
        _ => {}
    }
    Ok(model)
}

fn run_simulate(args: SimulateArgs) -> ExitCode {
    use memferry_std::sim::workload::{content_with_zero_fraction, fit_guest, TraceSummary};
    if !(0.0..=1.0).contains(&args.zero_fraction) {
        return fail("--zero-fraction and --hot-fraction must be between 0 and 1");
    }
    let model = match simulate_workload(&args) {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    let trace = match TraceSummary::of(&model) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let (memory, page_size) = match fit_guest(
        &model,
        trace.as_ref(),
        args.memory,
        (1 << 30, 4096),
        args.pad_memory,
    ) {
        Ok(g) => g,
        Err(e) => return fail(e),
    };
    if args.engine.when_outpaced == WhenOutpaced::PostCopy {
        return fail(
            "--when-outpaced post-copy: the simulator does not model a guest running at the destination yet (demo and send do)",
        );
    }
    if let Some(t) = &trace {
        if t.window_cut_short(&model) {
            eprintln!(
                "memferry: note: the recording is only {:.3} s long; the replay window ends with it",
                t.duration.as_secs_f64()
            );
        }
    }
    let codec = match args.codec.model() {
        Ok(c) => c.unwrap_or_default(),
        Err(e) => return fail(e),
    };
    let content = match args.content.as_str() {
        "default" => content_with_zero_fraction(args.zero_fraction),
        name => match memferry_std::sim::ContentModel::named(name) {
            Ok(c) if args.zero_fraction == 0.2 => c,
            Ok(_) => return fail("--zero-fraction rescales the default content only"),
            Err(e) => return fail(e),
        },
    };
    let scenario = memferry_std::sim::Scenario {
        memory,
        page_size,
        codec,
        sibling_image: args.sibling_image,
        content,
        workload: model,
        seed: args.seed,
        verify: !args.no_verify,
        engine: args.engine.config(args.bandwidth, ByteRate::UNLIMITED),
        link: memferry_std::sim::LinkModel {
            bandwidth: args.bandwidth,
            ..Default::default()
        },
        ..Default::default()
    };
    let json = args.json;
    let started = std::time::Instant::now();
    let progress = |r: &memferry::report::RoundReport| {
        if !json {
            eprintln!("{}", output::progress_line(r, page_size));
        }
    };
    match memferry_std::sim::simulate_with_progress(&scenario, progress) {
        Ok(outcome) => {
            eprintln!(
                "simulated in {:.2} s of wall time; {} guest writes",
                started.elapsed().as_secs_f64(),
                outcome.writes
            );
            let coverage = trace.as_ref().map(|t| {
                (
                    t,
                    t.coverage(scenario.warmup + outcome.report.preparation_time),
                )
            });
            if json {
                let view = output::SimReportJson::new(
                    &scenario,
                    &outcome,
                    coverage.map(|(t, c)| output::TraceJson::new(t, &c)),
                );
                println!(
                    "{}",
                    serde_json::to_string(&view).expect("the report serialises")
                );
            } else {
                print!("{}", output::table(&outcome.report));
                print!("{}", output::codec_lines(&outcome));
                print!("{}", output::bounds_and_models(&outcome));
                if let Some((t, c)) = coverage {
                    println!("trace {}: {}", t.path, c.sentence());
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo {
            guest_args: guest,
            migration,
            transport,
            guest: kind,
            kvm,
            content,
        } => {
            #[cfg(target_os = "linux")]
            {
                // Options no guest takes fail the same way whichever runs.
                if let Err(e) = guest.options() {
                    return fail(e);
                }
                let usable = memferry_std::kvm::vm::kvm_usable()
                    .and_then(|()| kvm.config(&guest).map(|_| ()));
                match (kind, usable) {
                    (GuestKind::Process, _) => {}
                    (GuestKind::Auto, Ok(())) if content.is_some() => {
                        if !migration.quiet {
                            eprintln!("memferry demo: --content: migrating the in-process workload (the KVM guest does not take it yet)");
                        }
                    }
                    (GuestKind::Kvm | GuestKind::Auto, Ok(())) => {
                        return kvm_demo(&guest, &kvm, &migration, transport);
                    }
                    (GuestKind::Kvm, Err(why)) => return fail(why),
                    (GuestKind::Auto, Err(why)) => {
                        if !migration.quiet {
                            eprintln!("memferry demo: no KVM guest ({why}): migrating the in-process workload");
                        }
                    }
                }
            }
            #[cfg(not(target_os = "linux"))]
            {
                let _ = &kvm;
                if kind == GuestKind::Kvm {
                    return fail("a KVM guest needs Linux");
                }
            }
            let options = match guest.options() {
                Ok(o) => o,
                Err(e) => return fail(e),
            };
            if !migration.quiet {
                eprintln!(
                    "memferry demo: {} guest, workload {} writes/s ({}% of writes to {}% of memory), link {}, over {}",
                    output::human_bytes(options.memory),
                    guest.write_rate,
                    guest.hot_share * 100.0,
                    guest.hot_fraction * 100.0,
                    migration.bandwidth,
                    match transport {
                        TransportKind::Tcp => "TCP on 127.0.0.1",
                        TransportKind::Loopback => "in-process loopback",
                    }
                );
            }
            let quiet = migration.quiet;
            let page_size = options.page_size.bytes() as u64;
            let progress = |r: &memferry::report::RoundReport| {
                if !quiet {
                    eprintln!("{}", output::progress_line(r, page_size));
                }
            };
            match demo::run_demo_with(
                &options,
                guest.seed,
                migration.config(),
                migration.bandwidth,
                transport,
                migration.channels,
                &migration.source_options(),
                content,
                progress,
            ) {
                Ok(outcome) => {
                    let workload = outcome.source.workload().map(|w| WorkloadJson {
                        config: options.workload.unwrap_or_default(),
                        writes: w.writes(),
                    });
                    if migration.json {
                        let mut view =
                            serde_json::to_value(ReportJson::new(&outcome.report, workload))
                                .expect("the report serialises");
                        if let Some(o) = view.as_object_mut() {
                            o.insert("guest".into(), "process".into());
                            o.insert("codec".into(), migration.codec.name().into());
                            o.insert(
                                "dirty_log".into(),
                                if migration.kernel_dirty_log {
                                    "kernel"
                                } else {
                                    "workload"
                                }
                                .into(),
                            );
                            if let Some(reuse) = &outcome.reuse {
                                o.insert("reuse".into(), keep_json(reuse));
                            }
                            o.insert(
                                "destination".into(),
                                serde_json::to_value(destination_json(&outcome.received))
                                    .expect("the destination's figures serialise"),
                            );
                        }
                        println!("{view}");
                    } else {
                        print!(
                            "{}",
                            output::table_with_decoding(
                                &outcome.report,
                                Some(&outcome.received.encodings)
                            )
                        );
                        if let Some(reuse) = &outcome.reuse {
                            println!("reuse (kept image)       {}", reuse.describe());
                        }
                        println!("guest                    process (in-process workload)");
                        println!(
                            "dirty log                {}",
                            if migration.kernel_dirty_log {
                                "the kernel's (userfaultfd write-protect + PAGEMAP_SCAN)"
                            } else {
                                "the workload marks its own writes"
                            }
                        );
                    }
                    exit_for(&outcome.report)
                }
                Err(e) => fail(e),
            }
        }
        Command::Simulate(args) => run_simulate(args),
        Command::Cluster {
            clusters,
            hosts,
            vms,
            vm_memory,
            seconds,
            threshold,
            over_for,
            select,
            seed,
            json,
        } => {
            use memferry_std::policy::VmSelection;
            let selection = match select.as_str() {
                "cpu" => VmSelection::HighestCpu,
                "time" => VmSelection::LeastMigrationTime,
                "memory" => VmSelection::LargestMemory,
                other => return fail(format!("--select {other}: use cpu, time or memory")),
            };
            let config = memferry_std::cluster::ClusterConfig {
                clusters,
                hosts_per_cluster: hosts,
                vms,
                vm_memory,
                duration: Nanos::from_secs(seconds),
                threshold,
                over_for: Nanos::from_secs(over_for),
                selection,
                seed,
                ..Default::default()
            };
            match memferry_std::cluster::run(&config) {
                Ok(report) if json => {
                    println!(
                        "{}",
                        serde_json::to_string(&report).expect("the report serialises")
                    );
                    ExitCode::SUCCESS
                }
                Ok(report) => {
                    print!("{}", memferry_std::cluster::table(&report));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Save {
            output,
            guest,
            incremental,
            interval,
            keep,
            json,
        } => save_guest(&output, &guest, incremental, interval, keep, json),
        Command::Restore { image, json } => restore_image(&image, json),
        Command::Record {
            output,
            guest,
            interval,
            duration,
            description,
            library,
            command,
            kvm,
            kvm_args,
        } => {
            if kvm {
                let duration = duration.unwrap_or(std::time::Duration::from_secs(10));
                return record_kvm(output, &guest, &kvm_args, interval, duration, description);
            }
            if !command.is_empty() {
                return record_a_program(output, interval, duration, description, library, command);
            }
            let duration = duration.unwrap_or(std::time::Duration::from_secs(10));
            let options = match guest.options() {
                Ok(o) => o,
                Err(e) => return fail(e),
            };
            if interval.is_zero() || duration < interval {
                return fail("--interval must be positive and no longer than --duration");
            }
            let mut host = match demo::prepare_source(&options, guest.seed) {
                Ok(h) => h,
                Err(e) => return fail(e),
            };
            let description = description.unwrap_or_else(|| {
                format!(
                    "memferry record: {} guest, {} writes/s, {}% of writes to {}% of memory, seed {}",
                    output::human_bytes(options.memory),
                    guest.write_rate,
                    guest.hot_share * 100.0,
                    guest.hot_fraction * 100.0,
                    guest.seed
                )
            });
            let file = match std::fs::File::create(&output) {
                Ok(f) => std::io::BufWriter::new(f),
                Err(e) => return fail(format!("cannot create {}: {e}", output.display())),
            };
            eprintln!(
                "recording {} intervals of {:?} into {}",
                duration.as_nanos() / interval.as_nanos(),
                interval,
                output.display()
            );
            let record_options = memferry_std::trace::RecordOptions {
                interval,
                duration,
                description,
            };
            match memferry_std::trace::record(&mut host, &record_options, file) {
                Ok(summary) => {
                    println!(
                        "wrote {}: {} intervals, {} dirty pages (at most {} in one interval), {} bytes",
                        output.display(),
                        summary.intervals,
                        summary.dirty_pages,
                        summary.max_dirty_pages,
                        summary.file_bytes
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(format!("recording failed: {e}")),
            }
        }
        Command::Compare(args) => run_compare(args),
        Command::Listen {
            addr,
            max_memory,
            idle_timeout,
            json,
            kvm,
            content,
        } => {
            if let Some(path) = &content {
                if kvm {
                    return fail("--content is not taken with --kvm (the KVM receiver offers no content yet)");
                }
                if let Err(e) = demo::check_content(path) {
                    return fail(e);
                }
            }
            let listener = match TcpListener::bind(&addr) {
                Ok(l) => l,
                Err(e) => return fail(format!("cannot listen on {addr}: {e}")),
            };
            eprintln!(
                "memferry: listening on {}",
                listener.local_addr().map(|a| a.to_string()).unwrap_or(addr)
            );
            if kvm {
                return kvm_listen(&listener, max_memory, idle_timeout, json);
            }
            let options = demo::ListenOptions {
                max_memory,
                idle_timeout,
                content,
            };
            let received = demo::receive_listener(&listener, &options, |peer| {
                eprintln!("memferry: receiving from {peer}")
            });
            match received {
                Ok(received) => {
                    print_received(&received, json);
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::GuestImage {
            output,
            guest,
            iterations,
            sweep_share,
            tsc_khz,
        } => guest_image(&output, &guest, iterations, sweep_share, tsc_khz),
        Command::Send {
            addr,
            guest,
            migration,
            kvm,
            kvm_args,
        } => {
            if kvm {
                return kvm_send(&addr, &guest, &kvm_args, &migration);
            }
            let options = match guest.options() {
                Ok(o) => o,
                Err(e) => return fail(e),
            };
            let mut host = match demo::prepare_source(&options, guest.seed) {
                Ok(h) => h,
                Err(e) => return fail(e),
            };
            let mut ends = Vec::new();
            for _ in 0..migration.channels {
                match tcp::connect(&addr) {
                    Ok(c) => ends.push(c),
                    Err(e) => return fail(format!("cannot connect to {addr}: {e}")),
                }
            }
            let quiet = migration.quiet;
            let page_size = options.page_size.bytes() as u64;
            let result = demo::migrate_with(
                &mut host,
                migration.config(),
                ends,
                migration.bandwidth,
                &migration.source_options(),
                |r| {
                    if !quiet {
                        eprintln!("{}", output::progress_line(r, page_size));
                    }
                },
            );
            match result {
                Ok(report) => {
                    let workload = host.workload().map(|w| WorkloadJson {
                        config: options.workload.unwrap_or_default(),
                        writes: w.writes(),
                    });
                    print_report(&report, workload, migration.json);
                    exit_for(&report)
                }
                Err(JobError::Drive(e)) => fail(format!(
                    "migration failed: {e}{}",
                    if host.is_paused() {
                        " (the destination may run the guest: the source stays paused)"
                    } else {
                        "; the source guest keeps running"
                    }
                )),
                Err(e) => fail(e),
            }
        }
    }
}

/// `memferry demo` with a KVM guest.
#[cfg(target_os = "linux")]
fn kvm_demo(
    guest: &GuestArgs,
    kvm: &KvmArgs,
    migration: &MigrationArgs,
    transport: TransportKind,
) -> ExitCode {
    let (config, mode) = match kvm.config(guest) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let quiet = migration.quiet;
    if !quiet {
        eprintln!(
            "memferry demo: KVM guest of {} (regions {:?}), {} ({}% of writes to {}% of memory, {}% sweeping), {} dirty log, link {}, over {}",
            output::human_bytes(config.memory),
            config.regions().unwrap_or_default(),
            match config.writes_per_sec {
                0 => "writing as fast as its vCPU runs".to_string(),
                r => format!("{r} writes/s"),
            },
            config.hot_share * 100.0,
            config.hot_fraction * 100.0,
            config.sweep_share * 100.0,
            mode.name(),
            migration.bandwidth,
            match transport {
                TransportKind::Tcp => "TCP on 127.0.0.1",
                TransportKind::Loopback => "in-process loopback",
            }
        );
    }
    let progress = |r: &memferry::report::RoundReport| {
        if !quiet {
            eprintln!("{}", output::progress_line(r, 4096));
        }
    };
    let kernel = match kvm.kernel_image() {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    match demo::kvm::run_demo(
        kernel.as_deref(),
        &config,
        mode,
        migration.config(),
        migration.bandwidth,
        migration.channels,
        transport,
        &migration.source_options().codec,
        progress,
    ) {
        Ok(o) => {
            print_kvm_report(
                &o.report,
                o.mode,
                o.vcpu_pause,
                o.pause_to_running,
                &o.dirty_syncs,
                o.final_hash,
                migration.json,
            );
            if o.final_hash.is_some_and(|(got, want)| got != want) {
                eprintln!("memferry: the migrated guest's final hash differs from the reference");
                return ExitCode::from(2);
            }
            exit_for(&o.report)
        }
        Err(e) => fail(e),
    }
}

#[cfg(not(target_os = "linux"))]
fn kvm_demo(_: &GuestArgs, _: &KvmArgs, _: &MigrationArgs, _: TransportKind) -> ExitCode {
    fail("a KVM guest needs Linux")
}

/// `memferry send ADDR --kvm`.
#[cfg(target_os = "linux")]
fn kvm_send(addr: &str, guest: &GuestArgs, kvm: &KvmArgs, migration: &MigrationArgs) -> ExitCode {
    if let Err(e) = guest.options() {
        return fail(e);
    }
    let (config, mode) = match kvm.config(guest) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let kernel = match kvm.kernel_image() {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    let mut running = match demo::kvm::start_guest_from(kernel.as_deref(), &config, mode, 1 << 16) {
        Ok(g) => g,
        Err(e) => return fail(e),
    };
    let mut ends = Vec::new();
    for _ in 0..migration.channels {
        match tcp::connect(addr) {
            Ok(c) => ends.push(c),
            Err(e) => return fail(format!("cannot connect to {addr}: {e}")),
        }
    }
    let quiet = migration.quiet;
    let result = demo::kvm::send(
        &mut running,
        migration.config(),
        ends,
        migration.bandwidth,
        &migration.source_options().codec,
        |r| {
            if !quiet {
                eprintln!("{}", output::progress_line(r, 4096));
            }
        },
    );
    match result {
        Ok(report) => {
            print_kvm_report(
                &report,
                mode,
                running.source.pause_times().iter().sum(),
                None,
                running.source.dirty_samples(),
                None,
                migration.json,
            );
            exit_for(&report)
        }
        Err(e) => fail(format!(
            "migration failed: {e}{}",
            if running.source.is_paused() {
                " (the destination may run the guest: the source stays paused)"
            } else {
                "; the source guest keeps running"
            }
        )),
    }
}

#[cfg(not(target_os = "linux"))]
fn kvm_send(_: &str, _: &GuestArgs, _: &KvmArgs, _: &MigrationArgs) -> ExitCode {
    fail("a KVM guest needs Linux")
}

/// `memferry guest-image -o FILE`: the generated KVM guest as a multiboot ELF.
#[cfg(target_os = "linux")]
fn guest_image(
    output: &std::path::Path,
    guest: &GuestArgs,
    iterations: u64,
    sweep_share: f64,
    tsc_khz: Option<u32>,
) -> ExitCode {
    use memferry_std::kvm::multiboot;
    let kvm = KvmArgs {
        dirty_log: "bitmap".into(),
        iterations,
        sweep_share,
        kernel: None,
    };
    let (config, _) = match kvm.config(guest) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let tsc_khz = match (tsc_khz, config.writes_per_sec) {
        (Some(k), _) => k,
        (None, 0) => 0,
        (None, _) => match memferry_std::kvm::vm::host_tsc_khz() {
            Ok(k) => k,
            Err(why) => {
                return fail(format!(
                    "a guest with a --write-rate needs the TSC frequency: give --tsc-khz ({why})"
                ))
            }
        },
    };
    let elf = match multiboot::guest_elf(&config, tsc_khz) {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    if let Err(e) = std::fs::write(output, &elf) {
        return fail(format!("cannot write {}: {e}", output.display()));
    }
    let layout = multiboot::kernel_config(&config);
    println!(
        "wrote {}: a multiboot ELF of {} bytes, entry {:#x}, for a guest of {} (regions {:?}); boot it with --memory {}MiB",
        output.display(),
        elf.len(),
        multiboot::PROLOGUE_ADDR,
        output::human_bytes(config.memory),
        layout.regions().unwrap_or_default(),
        config.memory >> 20
    );
    ExitCode::SUCCESS
}

#[cfg(not(target_os = "linux"))]
fn guest_image(_: &std::path::Path, _: &GuestArgs, _: u64, _: f64, _: Option<u32>) -> ExitCode {
    fail("the KVM guest image needs Linux")
}

/// `memferry listen ADDR --kvm`: receive a KVM guest and run it until it finishes.
#[cfg(target_os = "linux")]
fn kvm_listen(
    listener: &TcpListener,
    max_memory: u64,
    idle: std::time::Duration,
    json: bool,
) -> ExitCode {
    let received = demo::kvm::receive_within(listener, max_memory, idle, |peer| {
        eprintln!("memferry: receiving a KVM guest from {peer}")
    });
    let received = match received {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let verified = received.verdict == Some(memferry::wire::Verdict::Match);
    let layout = received.host.memory().layout().clone();
    eprintln!(
        "memferry: the guest runs here ({} in {} regions; digest {}); waiting for it to finish",
        output::human_bytes(layout.geometry().memory_bytes()),
        layout.regions().len(),
        if verified { "verified" } else { "not verified" }
    );
    let finished = memferry_std::kvm::run::wait_finished(
        received.host.vcpus(),
        std::time::Duration::from_secs(24 * 3600),
    );
    let status = received.machine.status();
    let stats = &received.stats;
    if json {
        let mut view = serde_json::json!({
            "verified": verified,
            "guest": "kvm",
            "memory_bytes": layout.geometry().memory_bytes(),
            "regions": layout.regions().len(),
            "zero_pages_skipped": received.host.zero_pages_skipped(),
            "finished": finished.is_ok(),
            "final_hash": status.map(|s| format!("{:#018x}", s.hash)),
            "writes": status.map(|s| s.progress),
        });
        add_received_json(&mut view, stats);
        println!("{view}");
    } else {
        print!("{}", output::received_lines(stats));
        if let (Ok(()), Some(s)) = (&finished, status) {
            println!(
                "the guest finished here after {} writes in all; final hash {:#018x}",
                s.progress, s.hash
            );
        }
    }
    match finished {
        Ok(()) if verified => ExitCode::SUCCESS,
        Ok(()) => {
            eprintln!("memferry: the destination's memory was not verified");
            ExitCode::from(2)
        }
        Err(e) => fail(e),
    }
}

#[cfg(not(target_os = "linux"))]
fn kvm_listen(_: &TcpListener, _: u64, _: std::time::Duration, _: bool) -> ExitCode {
    fail("a KVM guest needs Linux")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn listen(extra: &[&str]) -> Result<(u64, Duration), clap::Error> {
        let args = ["memferry", "listen", "127.0.0.1:0"].iter().chain(extra);
        let Command::Listen {
            max_memory,
            idle_timeout,
            ..
        } = Cli::try_parse_from(args)?.command
        else {
            panic!("not the listen command");
        };
        Ok((max_memory, idle_timeout))
    }

    #[test]
    fn simulate_has_every_stop_rule_predictor_and_rate_flag_of_demo() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let flags = |name: &str| -> Vec<String> {
            cli.find_subcommand(name)
                .unwrap()
                .get_arguments()
                .filter_map(|a| a.get_long().map(String::from))
                .collect()
        };
        let engine: Vec<String> = EngineArgs::augment_args(clap::Command::new("x"))
            .get_arguments()
            .filter_map(|a| a.get_long().map(String::from))
            .collect();
        assert_eq!(engine.len(), 13, "{engine:?}");
        for command in ["demo", "send", "simulate"] {
            let have = flags(command);
            for flag in &engine {
                assert!(have.contains(flag), "{command} lacks --{flag}");
            }
        }
        let Command::Simulate(args) = Cli::try_parse_from([
            "memferry",
            "simulate",
            "--max-rounds",
            "3",
            "--non-convergence-rounds",
            "0",
            "--deadline-ms",
            "900",
            "--downtime-ms",
            "7",
            "--predictor",
            "lru",
            "--learning-samples",
            "2",
            "--min-bandwidth",
            "10MB/s",
            "--bandwidth-step",
            "1MB/s",
        ])
        .unwrap()
        .command
        else {
            panic!("not simulate");
        };
        let config = args.engine.config(args.bandwidth, ByteRate::UNLIMITED);
        assert_eq!(config.stop.max_rounds, 3);
        assert_eq!(config.stop.non_convergence_rounds, 0);
        assert_eq!(config.stop.deadline, Some(Nanos::from_millis(900)));
        assert_eq!(config.stop.downtime_target, Nanos::from_millis(7));
        assert_eq!(config.predictor.name(), "lru");
        assert_eq!(config.learning_samples, 2);
        assert_eq!(
            config.rate,
            RatePlan::adaptive(ByteRate(10_000_000), ByteRate(1_000_000), args.bandwidth)
        );
        // Without the adaptive plan the simulator's engine is not paced: the link model is.
        let Command::Simulate(args) = Cli::try_parse_from(["memferry", "simulate"])
            .unwrap()
            .command
        else {
            panic!("not simulate");
        };
        assert_eq!(
            args.engine.config(args.bandwidth, ByteRate::UNLIMITED).rate,
            RatePlan::default()
        );
    }

    #[test]
    fn listen_defaults_are_the_modest_library_defaults() {
        let (max_memory, idle_timeout) = listen(&[]).unwrap();
        assert_eq!(max_memory, demo::DEFAULT_MAX_GUEST);
        assert_eq!(max_memory, 4 << 30);
        assert_eq!(idle_timeout, demo::DEFAULT_IDLE_TIMEOUT);
        assert_eq!(idle_timeout, Duration::from_secs(10));
    }

    #[test]
    fn listen_idle_timeout_parses_like_other_durations() {
        let (_, idle) = listen(&["--idle-timeout", "300ms"]).unwrap();
        assert_eq!(idle, Duration::from_millis(300));
        let (max, _) = listen(&["--max-memory", "64GiB"]).unwrap();
        assert_eq!(max, 64 << 30);
        for bad in ["0s", "soon"] {
            let e = listen(&["--idle-timeout", bad]).expect_err(bad);
            assert!(e.to_string().contains("duration"), "{bad}: {e}");
        }
    }
}
