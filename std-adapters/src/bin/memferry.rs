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
use memferry_std::compare;
use memferry_std::demo::{self, GuestOptions, JobError, TransportKind};
use memferry_std::output::{self, ReportJson, WorkloadJson};
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
        guest: GuestArgs,
        #[command(flatten)]
        migration: MigrationArgs,
        /// How the two sides connect.
        #[arg(long, value_enum, default_value_t = TransportKind::Tcp)]
        transport: TransportKind,
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
        /// runs, its own 60 s peer timeout applies.
        #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
        idle_timeout: std::time::Duration,
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
        /// How long to record (e.g. 10s).
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        duration: std::time::Duration,
        /// What was recorded (default: the guest and workload settings).
        #[arg(long)]
        description: Option<String>,
    },
    /// Simulate one migration in virtual time and print its report.
    Simulate {
        /// Guest memory size.
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        memory: u64,
        /// Workload model: idle, uniform, hotcold, zipf, sweep, phases, or trace:FILE (a
        /// recording from `memferry record`, replayed in a loop).
        #[arg(long, default_value = "hotcold")]
        workload: String,
        /// Writes (pages for sweep) per virtual second.
        #[arg(long, default_value_t = 200_000.0)]
        rate: f64,
        /// Link bandwidth.
        #[arg(long, default_value = "10Gbit", value_parser = parse_rate)]
        bandwidth: ByteRate,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Skip the digest check (saves 8 bytes per page on the destination: use it for huge guests).
        #[arg(long)]
        no_verify: bool,
        /// Share of pages that start all-zero (a big guest rarely touches all its memory).
        #[arg(long, default_value_t = 0.2)]
        zero_fraction: f64,
        /// Fraction of memory that is hot (hotcold and phases workloads).
        #[arg(long, default_value_t = 0.05)]
        hot_fraction: f64,
        /// Writable-working-set predictor (see `demo --help`).
        #[arg(long, default_value = "none", value_parser = parse_predictor)]
        predictor: PredictorKind,
        /// Downtime target in ms.
        #[arg(long, default_value_t = 300)]
        downtime_ms: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
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
    /// medians and spread, or CSV / JSON, and SVG plots.
    Compare {
        /// Which comparison (see --list).
        #[arg(long, default_value = "default")]
        preset: String,
        /// List the presets and exit.
        #[arg(long)]
        list: bool,
        /// Seeds per cell (default: the preset's).
        #[arg(long)]
        seeds: Option<u64>,
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
    },
    /// Migrate an in-process guest, workload running, to a `memferry listen` at ADDR.
    Send {
        /// Address of the listener.
        addr: String,
        #[command(flatten)]
        guest: GuestArgs,
        #[command(flatten)]
        migration: MigrationArgs,
    },
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

#[derive(Args)]
struct MigrationArgs {
    /// TCP connections to shard pages across (QEMU's multifd, Cloud Hypervisor's
    /// connections): 1 to 16. The listener accepts whatever the source announces.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    channels: u16,
    /// Writable-working-set predictor that holds hot pages back to stop-and-copy:
    /// none, wsclock, lru, splay or history, optionally with parameters
    /// (e.g. `lru:syncs=3,cap=100000`, `history:m=2,n=4`).
    #[arg(long, default_value = "none", value_parser = parse_predictor)]
    predictor: PredictorKind,
    /// Dirty-log samples taken in round 1 to teach the predictor (the pre-processing phase).
    #[arg(long, default_value_t = 4)]
    learning_samples: u32,
    /// Link bandwidth (e.g. 1Gbit, 500MB/s); unlimited by default.
    #[arg(long, default_value = "unlimited", value_parser = parse_rate)]
    bandwidth: ByteRate,
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
    /// Overall deadline for the pre-copy rounds, in ms.
    #[arg(long)]
    deadline_ms: Option<u64>,
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

impl MigrationArgs {
    fn config(&self) -> PreCopyConfig {
        let rate = match (self.min_bandwidth, self.bandwidth_step) {
            (None, None) => RatePlan::fixed(self.bandwidth),
            (min, step) => RatePlan::adaptive(
                min.unwrap_or(self.bandwidth).min(self.bandwidth),
                step.unwrap_or(ByteRate(0)),
                self.bandwidth,
            ),
        };
        PreCopyConfig {
            rate,
            stop: StopRules {
                downtime_target: Nanos::from_millis(self.downtime_ms),
                max_rounds: self.max_rounds.max(1),
                non_convergence_rounds: self.non_convergence_rounds,
                deadline: self.deadline_ms.map(Nanos::from_millis),
                ..StopRules::default()
            },
            predictor: self.predictor,
            learning_samples: self.learning_samples,
            verify: self.verify != VerifyWhen::Off,
            verify_before_start: self.verify == VerifyWhen::BeforeStart,
            ..PreCopyConfig::default()
        }
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

fn run_compare(
    preset: &str,
    list: bool,
    seeds: Option<u64>,
    csv: bool,
    json: bool,
    plots: Option<std::path::PathBuf>,
    threads: Option<usize>,
) -> ExitCode {
    let all = compare::presets();
    if list {
        for p in &all {
            println!("{:<20} {}", p.name, p.description);
        }
        return ExitCode::SUCCESS;
    }
    let names: Vec<&str> = all.iter().map(|p| p.name).collect();
    let Some(mut chosen) = all.iter().find(|p| p.name == preset).cloned() else {
        return fail(format!(
            "no preset '{preset}'; try one of: {}",
            names.join(", ")
        ));
    };
    if let Some(n) = seeds {
        chosen.seeds = (1..=n.max(1)).collect();
    }
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let started = std::time::Instant::now();
    let result = compare::run(&chosen, threads, |done, total| {
        eprint!("\rsimulating: {done}/{total} runs");
        if done == total {
            eprintln!();
        }
    });
    let comparison = match result {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    eprintln!(
        "{} runs in {:.1} s of wall time",
        comparison.runs.len(),
        started.elapsed().as_secs_f64()
    );
    if csv {
        print!("{}", compare::csv(&comparison));
    } else if json {
        println!(
            "{}",
            serde_json::to_string(&comparison).expect("the comparison serialises")
        );
    } else {
        print!("{}", compare::table(&comparison));
    }
    if let Some(dir) = plots {
        match memferry_std::plots::write_all(&comparison, &dir) {
            Ok(files) => files
                .iter()
                .for_each(|f| eprintln!("wrote {}", f.display())),
            Err(e) => return fail(format!("cannot write plots to {}: {e}", dir.display())),
        }
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo {
            guest,
            migration,
            transport,
        } => {
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
            match demo::run_demo_channels(
                &options,
                guest.seed,
                migration.config(),
                migration.bandwidth,
                transport,
                migration.channels,
                progress,
            ) {
                Ok(outcome) => {
                    let workload = outcome.source.workload().map(|w| WorkloadJson {
                        config: options.workload.unwrap_or_default(),
                        writes: w.writes(),
                    });
                    print_report(&outcome.report, workload, migration.json);
                    exit_for(&outcome.report)
                }
                Err(e) => fail(e),
            }
        }
        Command::Simulate {
            memory,
            workload,
            rate,
            bandwidth,
            seed,
            no_verify,
            zero_fraction,
            hot_fraction,
            predictor,
            downtime_ms,
            json,
        } => {
            let model = match memferry_std::sim::WorkloadModel::named(&workload, rate) {
                Some(m) => m,
                None => {
                    return fail(format!(
                    "no workload '{workload}'; try idle, uniform, hotcold, zipf, sweep or phases"
                ))
                }
            };
            let model = match model {
                memferry_std::sim::WorkloadModel::HotCold {
                    rate, hot_share, ..
                } => memferry_std::sim::WorkloadModel::HotCold {
                    rate,
                    hot_fraction,
                    hot_share,
                },
                memferry_std::sim::WorkloadModel::Phases {
                    rate,
                    hot_share,
                    period,
                    ..
                } => memferry_std::sim::WorkloadModel::Phases {
                    rate,
                    hot_fraction,
                    hot_share,
                    period,
                },
                other => other,
            };
            if !(0.0..=1.0).contains(&zero_fraction) || !(0.0..=1.0).contains(&hot_fraction) {
                return fail("--zero-fraction and --hot-fraction must be between 0 and 1");
            }
            let content = memferry_std::sim::ContentModel {
                zero_fraction,
                text_fraction: (1.0 - zero_fraction) * 0.4,
                ..Default::default()
            };
            let scenario = memferry_std::sim::Scenario {
                memory,
                content,
                workload: model,
                seed,
                verify: !no_verify,
                engine: PreCopyConfig {
                    predictor,
                    stop: StopRules {
                        downtime_target: Nanos::from_millis(downtime_ms),
                        ..StopRules::default()
                    },
                    ..PreCopyConfig::default()
                },
                link: memferry_std::sim::LinkModel {
                    bandwidth,
                    ..Default::default()
                },
                ..Default::default()
            };
            let started = std::time::Instant::now();
            let page_size = scenario.page_size;
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
                    print_report(&outcome.report, None, json);
                    if !json {
                        println!(
                            "lower bounds: {} on the wire, {:.1} ms downtime",
                            output::human_bytes(outcome.bounds.least_bytes),
                            outcome.bounds.least_downtime.as_millis_f64()
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
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
        Command::Record {
            output,
            guest,
            interval,
            duration,
            description,
        } => {
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
        Command::Compare {
            preset,
            list,
            seeds,
            csv,
            json,
            plots,
            threads,
        } => run_compare(&preset, list, seeds, csv, json, plots, threads),
        Command::Listen {
            addr,
            max_memory,
            idle_timeout,
            json,
        } => {
            let listener = match TcpListener::bind(&addr) {
                Ok(l) => l,
                Err(e) => return fail(format!("cannot listen on {addr}: {e}")),
            };
            eprintln!(
                "memferry: listening on {}",
                listener.local_addr().map(|a| a.to_string()).unwrap_or(addr)
            );
            let options = demo::ListenOptions {
                max_memory,
                idle_timeout,
            };
            let received = demo::serve_listener(&listener, &options, |peer| {
                eprintln!("memferry: receiving from {peer}")
            });
            match received {
                Ok(host) => {
                    let g = host.region().geometry();
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"verified": host.verdict == Some(memferry::wire::Verdict::Match), "memory_bytes": g.memory_bytes(), "page_size": g.page_size().bytes(), "device_state_bytes": host.device_state().map_or(0, |s| s.len())})
                        );
                    } else {
                        println!(
                            "received {} and the device state; digest {}",
                            output::human_bytes(g.memory_bytes()),
                            match host.verdict {
                                Some(memferry::wire::Verdict::Match) => "verified",
                                Some(_) => "not checked",
                                None => "not sent by the source",
                            }
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Send {
            addr,
            guest,
            migration,
        } => {
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
            let result = demo::migrate_channels(
                &mut host,
                migration.config(),
                ends,
                migration.bandwidth,
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
