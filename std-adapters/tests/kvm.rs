//! A real KVM guest, migrated live (run whenever /dev/kvm can be used; each test prints why it
//! is skipped otherwise).

use std::net::TcpListener;
use std::time::Duration;

use memferry::report::MigrationReport;
use memferry::schedule::StopRules;
use memferry::strategy::PreCopyConfig;
use memferry::time::Nanos;
use memferry::track::PredictorKind;
use memferry_std::kvm::dirty::{DirtyLogMode, DirtySample};
use memferry_std::kvm::guest::{self, GuestConfig};
use memferry_std::kvm::multiboot;
use memferry_std::kvm::vm::kvm_usable;
use memferry_std::kvm::{run, run_unmigrated, run_unmigrated_kernel, KvmSource, SourceMachine};
use memferry_std::transport::{tcp, BoxRead, BoxWrite};

fn kvm_or_skip(test: &str) -> bool {
    match kvm_usable() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

#[test]
fn the_guest_runs_at_cpl3_and_its_hash_is_the_reference_hash() {
    if !kvm_or_skip("the_guest_runs_at_cpl3_and_its_hash_is_the_reference_hash") {
        return;
    }
    let config = GuestConfig {
        memory: 64 << 20,
        iterations: 2_000_000,
        sweep_share: 0.05,
        ..GuestConfig::default()
    };
    let run = run_unmigrated(&config, Duration::from_secs(60)).unwrap();
    eprintln!(
        "guest: {} writes in {:?}: {:.1} M writes/s",
        run.writes,
        run.elapsed,
        run.write_rate() / 1e6
    );
    assert_eq!(run.writes, config.iterations);
    assert_eq!(run.hash, guest::expected_hash(&config).unwrap());
}

#[test]
fn the_multiboot_guest_image_boots_and_migrates_with_the_reference_hash() {
    if !kvm_or_skip("the_multiboot_guest_image_boots_and_migrates_with_the_reference_hash") {
        return;
    }
    // Unmigrated: booted from the ELF (32-bit entry, the prologue enters long mode and CPL3),
    // the same hash as the guest the VMM starts in long mode itself.
    let small = GuestConfig {
        memory: 16 << 20,
        iterations: 300_000,
        sweep_share: 0.05,
        ..GuestConfig::default()
    };
    let elf = multiboot::guest_elf(&small, 1_000_000).unwrap();
    let run = run_unmigrated_kernel(&elf, &small, Duration::from_secs(120)).unwrap();
    assert_eq!(run.writes, small.iterations);
    assert_eq!(run.hash, guest::expected_hash(&small).unwrap());
    assert_eq!(
        run.hash,
        run_unmigrated(&small, Duration::from_secs(120))
            .unwrap()
            .hash
    );
    // Migrated live.
    let config = GuestConfig {
        memory: 64 << 20,
        seed: 50,
        iterations: 30_000_000,
        sweep_share: 0.02,
        writes_per_sec: 0,
        ..GuestConfig::default()
    };
    let elf = multiboot::guest_elf(&config, 1_000_000).unwrap();
    let m = migrate_live_from(
        Some(&elf),
        config,
        DirtyLogMode::MANUAL,
        precopy(PredictorKind::None),
        1,
        1 << 18,
    );
    check(&m, "multiboot");
    assert_eq!(m.report.page_count, (64 << 20) / 4096);
}

#[test]
fn the_same_config_gives_the_same_hash_and_another_seed_another() {
    if !kvm_or_skip("the_same_config_gives_the_same_hash_and_another_seed_another") {
        return;
    }
    let config = GuestConfig {
        memory: 16 << 20,
        iterations: 300_000,
        sweep_share: 0.05,
        ..GuestConfig::default()
    };
    let a = run_unmigrated(&config, Duration::from_secs(60)).unwrap();
    let b = run_unmigrated(&config, Duration::from_secs(60)).unwrap();
    let c = run_unmigrated(&GuestConfig { seed: 2, ..config }, Duration::from_secs(60)).unwrap();
    assert_eq!(a.hash, b.hash);
    assert_ne!(a.hash, c.hash);
    assert_eq!(
        c.hash,
        guest::expected_hash(&GuestConfig { seed: 2, ..config }).unwrap()
    );
}

/// What a live migration of the generated guest showed.
struct Migrated {
    report: MigrationReport,
    final_hash: u64,
    expected_hash: u64,
    source_digest_at_pause: u128,
    destination_digest_at_start: Option<u128>,
    progress_at_pause: u64,
    logging_after: bool,
    pause: Duration,
    samples: Vec<DirtySample>,
}

fn precopy(predictor: PredictorKind) -> PreCopyConfig {
    PreCopyConfig {
        stop: StopRules {
            downtime_target: Nanos::from_millis(30),
            max_rounds: 12,
            ..StopRules::default()
        },
        predictor,
        ..PreCopyConfig::default()
    }
}

/// Starts the guest of `config`, lets it do `warmup_writes` writes, migrates it over `channels` TCP
/// connections on 127.0.0.1 to a destination VM in this process, and lets it finish there.
fn migrate_live(
    config: GuestConfig,
    mode: DirtyLogMode,
    engine: PreCopyConfig,
    channels: u16,
    warmup_writes: u64,
) -> Migrated {
    migrate_live_from(None, config, mode, engine, channels, warmup_writes)
}

/// [`migrate_live`], the guest booted from the multiboot `kernel` when given.
fn migrate_live_from(
    kernel: Option<&[u8]>,
    config: GuestConfig,
    mode: DirtyLogMode,
    engine: PreCopyConfig,
    channels: u16,
    warmup_writes: u64,
) -> Migrated {
    let expected_hash = guest::expected_hash(&config).unwrap();
    let (machine, mut vcpus) = match kernel {
        Some(image) => SourceMachine::boot_kernel(image, &config, mode).unwrap(),
        None => SourceMachine::create(&config, mode).unwrap(),
    };
    vcpus.start().unwrap();
    // Migrate a guest that is well under way (on a loaded machine its first writes may take a
    // while: first touches cost a fault each under shadow paging).
    let t0 = std::time::Instant::now();
    while machine.status().unwrap().progress < warmup_writes {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the guest made no progress"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let progress_before = machine.status().unwrap().progress;
    let mut source = KvmSource::new(
        machine.vm.fd().clone(),
        machine.memory().unwrap(),
        vcpus,
        mode,
    )
    .unwrap();
    assert!(source.dirty_log().is_logging());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let destination = std::thread::spawn(move || {
        let (r, w, _) = tcp::accept(&listener).unwrap();
        let received = receive_with_digest(r, w, &listener);
        run::wait_finished(received.host.vcpus(), Duration::from_secs(300)).unwrap();
        let status = received.machine.status().unwrap();
        assert!(status.finished);
        (
            status.hash,
            received.host.digest_at_start(),
            received.verdict,
        )
    });
    let ends = (0..channels).map(|_| tcp::connect(addr).unwrap()).collect();
    let report = run::migrate_source(&mut source, engine, ends, |_| {}).unwrap();
    let (final_hash, destination_digest_at_start, _verdict) = destination.join().unwrap();
    let at_pause = machine.status().unwrap();
    assert!(
        !at_pause.finished,
        "the guest finished before the migration paused it: give it more iterations"
    );
    Migrated {
        report,
        final_hash,
        expected_hash,
        source_digest_at_pause: source.memory().digest().unwrap(),
        destination_digest_at_start,
        progress_at_pause: at_pause.progress - progress_before,
        logging_after: source.dirty_log().is_logging(),
        pause: source.pause_times().iter().sum(),
        samples: source.dirty_samples().to_vec(),
    }
}

/// `run::receive` with the destination's memory digest taken when it starts.
fn receive_with_digest(r: BoxRead, w: BoxWrite, listener: &TcpListener) -> run::Received {
    run::receive_with(
        r,
        w,
        u64::MAX,
        || tcp::accept(listener).map(|(r, w, _)| (r, w)),
        |host| host.take_digest_at_start(),
    )
    .unwrap()
}

fn check(m: &Migrated, what: &str) {
    let r = &m.report;
    eprintln!(
        "{what}: {} rounds, total {:.1} ms, downtime {:.1} ms (vCPU pause {:.2} ms), {} pages, {:.1} MiB sent, stop {:?}; progress at pause {}; dirty syncs: {}",
        r.rounds.len(),
        r.total_time.0 as f64 / 1e6,
        r.downtime.0 as f64 / 1e6,
        m.pause.as_secs_f64() * 1e3,
        r.pages_sent,
        r.bytes_sent as f64 / (1 << 20) as f64,
        r.stop_reason,
        m.progress_at_pause,
        m.samples
            .iter()
            .map(|s| format!(
                "{}p sync {:.2}ms clear {:.2}ms/{}",
                s.pages,
                s.sync.as_secs_f64() * 1e3,
                s.clear.as_secs_f64() * 1e3,
                s.clears
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert_eq!(r.verified, Some(true), "{what}: digests");
    assert_eq!(
        m.destination_digest_at_start,
        Some(m.source_digest_at_pause),
        "{what}: the destination's memory at start is the source's at pause"
    );
    assert_eq!(
        m.final_hash, m.expected_hash,
        "{what}: the migrated guest's final hash"
    );
    assert!(
        !m.logging_after,
        "{what}: dirty logging is off after the migration"
    );
    assert!(
        m.progress_at_pause > 0,
        "{what}: the guest ran during the migration"
    );
    assert!(!m.samples.is_empty());
}

fn busy_guest(seed: u64) -> GuestConfig {
    GuestConfig {
        memory: 128 << 20,
        seed,
        iterations: 40_000_000,
        hot_fraction: 0.05,
        hot_share: 0.9,
        sweep_share: 0.02,
        writes_per_sec: 0,
        ..GuestConfig::default()
    }
}

#[test]
fn a_live_guest_migrates_with_each_dirty_log() {
    if !kvm_or_skip("a_live_guest_migrates_with_each_dirty_log") {
        return;
    }
    for (i, mode) in [
        DirtyLogMode::Bitmap,
        DirtyLogMode::MANUAL,
        DirtyLogMode::RING,
    ]
    .into_iter()
    .enumerate()
    {
        let m = migrate_live(
            busy_guest(10 + i as u64),
            mode,
            precopy(PredictorKind::None),
            1,
            1 << 18,
        );
        check(&m, mode.name());
    }
}

#[test]
fn a_live_guest_migrates_with_predictors_and_channels() {
    if !kvm_or_skip("a_live_guest_migrates_with_predictors_and_channels") {
        return;
    }
    for (i, (predictor, channels)) in [("wsclock", 1), ("none", 2), ("lru", 2)]
        .into_iter()
        .enumerate()
    {
        let kind = PredictorKind::parse(predictor).unwrap();
        let m = migrate_live(
            busy_guest(20 + i as u64),
            DirtyLogMode::MANUAL,
            precopy(kind),
            channels,
            1 << 18,
        );
        check(&m, &format!("predictor {predictor}, {channels} channels"));
        assert_eq!(m.report.channels, channels);
    }
}

#[test]
fn a_guest_dirtying_heavily_migrates() {
    if !kvm_or_skip("a_guest_dirtying_heavily_migrates") {
        return;
    }
    // Most writes go anywhere in memory: the dirty set never shrinks much, the rounds stop
    // by rule, and the stop-and-copy carries a large set.
    let config = GuestConfig {
        memory: 128 << 20,
        seed: 30,
        iterations: 30_000_000,
        hot_fraction: 0.1,
        hot_share: 0.3,
        sweep_share: 0.2,
        writes_per_sec: 0,
        ..GuestConfig::default()
    };
    let m = migrate_live(
        config,
        DirtyLogMode::Bitmap,
        precopy(PredictorKind::None),
        2,
        1 << 18,
    );
    check(&m, "heavy");
    assert!(
        m.report.pages_sent > m.report.page_count,
        "pages were sent again"
    );
}

#[test]
fn a_failed_migration_stops_dirty_logging_and_the_source_guest_runs_on() {
    if !kvm_or_skip("a_failed_migration_stops_dirty_logging_and_the_source_guest_runs_on") {
        return;
    }
    let config = GuestConfig {
        memory: 32 << 20,
        seed: 40,
        iterations: 6_000_000,
        ..GuestConfig::default()
    };
    for mode in [
        DirtyLogMode::Bitmap,
        DirtyLogMode::MANUAL,
        DirtyLogMode::RING,
    ] {
        let (machine, mut vcpus) = SourceMachine::create(&config, mode).unwrap();
        vcpus.start().unwrap();
        let mut source = KvmSource::new(
            machine.vm.fd().clone(),
            machine.memory().unwrap(),
            vcpus,
            mode,
        )
        .unwrap();
        // A destination that reads the hello and a little more, then hangs up.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let dies = std::thread::spawn(move || {
            let (mut r, _w, _) = tcp::accept(&listener).unwrap();
            let mut buf = vec![0u8; 1 << 16];
            let _ = std::io::Read::read(&mut r, &mut buf);
        });
        let ends = vec![tcp::connect(addr).unwrap()];
        let failed = run::migrate_source(&mut source, precopy(PredictorKind::None), ends, |_| {});
        dies.join().unwrap();
        assert!(failed.is_err(), "{}: the migration failed", mode.name());
        assert!(
            !source.dirty_log().is_logging(),
            "{}: dirty logging is off after the failure",
            mode.name()
        );
        assert!(
            !source.is_paused(),
            "{}: the source guest runs",
            mode.name()
        );
        // The guest finishes where it is, with the hash of a run that never migrated.
        run::wait_finished(source.vcpus(), Duration::from_secs(120)).unwrap();
        assert_eq!(
            machine.status().unwrap().hash,
            guest::expected_hash(&config).unwrap(),
            "{}",
            mode.name()
        );
        eprintln!(
            "{}: failed as expected: {}",
            mode.name(),
            failed.err().unwrap()
        );
    }
}

#[cfg(feature = "cli")]
#[test]
fn listen_kvm_and_send_kvm_migrate_a_guest_between_two_processes() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    if !kvm_or_skip("listen_kvm_and_send_kvm_migrate_a_guest_between_two_processes") {
        return;
    }
    let bin = env!("CARGO_BIN_EXE_memferry");
    let mut listener = Command::new(bin)
        .args(["listen", "127.0.0.1:0", "--kvm", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(listener.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let args = [
        "--memory",
        "64MiB",
        "--seed",
        "5",
        "--iterations",
        "30000000",
        "--write-rate",
        "0",
    ];
    let sent = Command::new(bin)
        .args([
            "send", &addr, "--kvm", "--json", "--quiet", "--codec", "lz4",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&sent.stdout).unwrap();
    assert_eq!(report["guest"], "kvm");
    assert_eq!(report["verified"], true);
    let out = listener.wait_with_output().unwrap();
    assert!(out.status.success());
    let received: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(received["finished"], true);
    // What the listener counted per encoding is what the source sent, and it timed its LZ4
    // decoder.
    let slots = [
        "raw",
        "zero",
        "lz4",
        "delta",
        "delta_lz4",
        "reference",
        "known",
        "other",
    ];
    let count = |v: &serde_json::Value, slot: &str| v["encodings"][slot]["pages"].as_u64().unwrap();
    for slot in slots {
        assert_eq!(count(&received, slot), count(&report, slot), "{slot}");
    }
    let total: u64 = slots.iter().map(|s| count(&received, s)).sum();
    assert_eq!(received["pages_received"].as_u64(), Some(total));
    assert_eq!(report["pages_sent"].as_u64(), Some(total));
    assert!(
        count(&received, "lz4") > 0,
        "no LZ4 page: {}",
        received["encodings"]
    );
    assert!(received["decode"]["lz4"]["cpu_nanos"].as_u64().unwrap() > 0);
    let config = GuestConfig {
        memory: 64 << 20,
        seed: 5,
        iterations: 30_000_000,
        writes_per_sec: 0,
        ..GuestConfig::default()
    };
    assert_eq!(
        received["final_hash"],
        format!("{:#018x}", guest::expected_hash(&config).unwrap())
    );
    // demo names its guest.
    let demo = Command::new(bin)
        .args(["demo", "--memory", "32MiB", "--json", "--quiet"])
        .output()
        .unwrap();
    assert!(demo.status.success());
    let v: serde_json::Value = serde_json::from_slice(&demo.stdout).unwrap();
    assert_eq!(v["guest"], "kvm");
}

#[cfg(feature = "cli")]
#[test]
fn guest_image_writes_a_kernel_that_demo_boots_and_migrates() {
    use std::process::Command;
    if !kvm_or_skip("guest_image_writes_a_kernel_that_demo_boots_and_migrates") {
        return;
    }
    let bin = env!("CARGO_BIN_EXE_memferry");
    let dir = std::env::temp_dir().join(format!("memferry-guest-image-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let elf = dir.join("guest.elf");
    let guest = [
        "--memory",
        "32MiB",
        "--seed",
        "9",
        "--iterations",
        "20000000",
        "--write-rate",
        "0",
    ];
    let made = Command::new(bin)
        .args(["guest-image", "-o"])
        .arg(&elf)
        .args(guest)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let image = std::fs::read(&elf).unwrap();
    assert_eq!(&image[..4], b"\x7fELF");
    let demo = Command::new(bin)
        .args(["demo", "--guest", "kvm", "--json", "--quiet", "--kernel"])
        .arg(&elf)
        .args(guest)
        .output()
        .unwrap();
    assert!(
        demo.status.success(),
        "{}",
        String::from_utf8_lossy(&demo.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&demo.stdout).unwrap();
    assert_eq!(v["guest"], "kvm");
    assert_eq!(v["verified"], true);
    assert_eq!(v["kvm"]["final_hash_matches"], true, "{v}");
    // A file that is no kernel is refused with the reason.
    let bad = Command::new(bin)
        .args(["demo", "--guest", "kvm", "--quiet", "--kernel"])
        .arg(bin)
        .args(guest)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("multiboot"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(feature = "research")]
#[test]
fn record_kvm_writes_a_trace_of_the_guests_dirty_log_that_the_simulator_replays() {
    use memferry_std::trace::{record_kvm_guest, RecordOptions, TraceReader};
    if !kvm_or_skip("record_kvm_writes_a_trace_of_the_guests_dirty_log_that_the_simulator_replays")
    {
        return;
    }
    let config = GuestConfig {
        memory: 32 << 20,
        seed: 60,
        iterations: 0,
        hot_fraction: 0.05,
        hot_share: 0.9,
        writes_per_sec: 200_000,
        ..GuestConfig::default()
    };
    // The hot set: the first 5% of the data window, which starts at 2 MiB.
    let data_pages = config.data_pages().unwrap();
    let hot = (data_pages as f64 * config.hot_fraction).round() as u64;
    let hot_pages = 512..512 + hot;
    let dir = std::env::temp_dir().join(format!("memferry-record-kvm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for mode in [
        DirtyLogMode::Bitmap,
        DirtyLogMode::MANUAL,
        DirtyLogMode::RING,
    ] {
        let path = dir.join(format!("{}.mft", mode.name()));
        let options = RecordOptions::new(Duration::from_millis(100), Duration::from_millis(1000));
        let file = std::fs::File::create(&path).unwrap();
        let summary = record_kvm_guest(&config, mode, None, &options, file, |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(summary.trace.intervals, 10, "{}", mode.name());
        assert_eq!(summary.guest_pages, 8192);
        assert!(summary.guest_writes.unwrap() > 0);
        let mut reader = TraceReader::open(std::fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(reader.header().geometry.page_count(), 8192);
        assert_eq!(reader.header().interval, Nanos::from_millis(100));
        let mut dirty = reader.new_bitmap();
        let mut counts = Vec::new();
        while reader.next_interval(&mut dirty).unwrap() {
            let hot_dirty = hot_pages.clone().filter(|&p| dirty.get(p)).count() as u64;
            counts.push((dirty.count_ones(), hot_dirty));
            dirty.clear();
        }
        eprintln!(
            "record --kvm ({}): (dirty pages, hot pages dirty of {hot}) per interval: {counts:?}",
            mode.name()
        );
        assert_eq!(counts.len(), 10);
        // 180,000 hot writes a second over {hot} pages: nearly all are dirty in each interval
        // once the guest runs at its pace; and an interval is far from all of memory (a log
        // that never re-arms would report every page).
        for &(all, hot_dirty) in &counts[2..] {
            assert!(hot_dirty * 10 >= hot * 9, "{}: {counts:?}", mode.name());
            assert!(all < 8192 / 2, "{}: {counts:?}", mode.name());
        }
        #[cfg(feature = "cli")]
        {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_memferry"))
                .args(["simulate", "--json", "--workload"])
                .arg(format!("trace:{}", path.display()))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["verified"], true);
            assert_eq!(v["memory_bytes"], 32 << 20);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A 16 MiB guest running its workload past its first touches of memory (slow under shadow
/// paging), as a source with the classic dirty log: for the pause and throttle tests.
fn running_source(seed: u64) -> (SourceMachine, KvmSource) {
    let config = GuestConfig {
        memory: 16 << 20,
        seed,
        iterations: 0,
        writes_per_sec: 0,
        ..GuestConfig::default()
    };
    let (machine, mut vcpus) = SourceMachine::create(&config, DirtyLogMode::Bitmap).unwrap();
    vcpus.start().unwrap();
    let t0 = std::time::Instant::now();
    while machine.status().unwrap().progress < 1 << 20 && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let source = KvmSource::new(
        machine.vm.fd().clone(),
        machine.memory().unwrap(),
        vcpus,
        DirtyLogMode::Bitmap,
    )
    .unwrap();
    (machine, source)
}

#[test]
fn a_throttled_guest_writes_less_and_runs_on_when_the_throttle_lifts() {
    use memferry::memory::SourceGuest;
    if !kvm_or_skip("a_throttled_guest_writes_less_and_runs_on_when_the_throttle_lifts") {
        return;
    }
    let (machine, mut source) = running_source(70);
    let progress = || machine.status().unwrap().progress;
    // Writes per second over a window (guest progress, not wall speed).
    let rate = |window: Duration| {
        let (p0, t0) = (progress(), std::time::Instant::now());
        std::thread::sleep(window);
        (progress() - p0) as f64 / t0.elapsed().as_secs_f64()
    };
    let window = Duration::from_millis(600);
    let free = rate(window);
    source.throttle(80).unwrap();
    assert_eq!(source.vcpus().threads()[0].throttle(), 80);
    let throttled = rate(window);
    let slept = source.vcpus().threads()[0].throttled();
    source.throttle(0).unwrap();
    assert_eq!(source.vcpus().threads()[0].throttle(), 0);
    let lifted = rate(window);
    eprintln!(
        "throttle: {:.1} M writes/s free, {:.1} M writes/s at 80% (slept {slept:?}), {:.1} M writes/s lifted",
        free / 1e6,
        throttled / 1e6,
        lifted / 1e6
    );
    // 80% taken away leaves a fifth; a generous margin for a loaded machine.
    assert!(throttled < free * 0.6, "{throttled} vs {free}");
    assert!(slept >= window / 4, "slept {slept:?}");
    assert!(lifted > throttled, "{lifted} vs {throttled}");
    assert_eq!(source.throttles, vec![80, 0]);
    // A pause still works while throttled, and the migration's end lifts the throttle.
    source.throttle(50).unwrap();
    source.pause().unwrap();
    source.resume().unwrap();
    source.finish().unwrap();
    assert_eq!(source.vcpus().threads()[0].throttle(), 0);
    assert!(source.vcpus().threads()[0].end().is_none());
}

#[test]
fn a_kvm_destination_refuses_a_guest_larger_than_the_hosts_available_memory() {
    // A bare hello for a 1 TiB guest (within the limit given) from a source nobody checked:
    // refused before any VM or memory is made.
    let (ours, theirs) = memferry_std::transport::loopback::pair();
    let (mut w, _r) = (ours.1, ours.0);
    let mut table = Vec::new();
    let regions = memferry::wire::region_table(
        &[memferry::page::Region {
            id: 0,
            guest_base: 0,
            pages: 1 << 28,
        }],
        &mut table,
    );
    let mut hello = Vec::new();
    memferry::wire::Frame::Hello(memferry::wire::Hello {
        version: memferry::wire::PROTOCOL_VERSION,
        page_shift: 12,
        channels: 1,
        session_id: 7,
        features: 0,
        regions,
    })
    .emit(&mut hello);
    std::io::Write::write_all(&mut w, &hello).unwrap();
    let refused = run::receive(theirs.0, theirs.1, u64::MAX, || {
        Err(std::io::Error::other("no more connections"))
    });
    let e = refused.err().expect("a 1 TiB guest is refused").to_string();
    assert!(e.contains("available"), "{e}");
}

#[cfg(feature = "cli")]
#[test]
fn listen_kvm_gives_up_on_a_source_that_never_connects_or_goes_silent() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let bin = env!("CARGO_BIN_EXE_memferry");
    let t0 = std::time::Instant::now();
    let out = Command::new(bin)
        .args(["listen", "127.0.0.1:0", "--kvm", "--idle-timeout", "500ms"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no source connected"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(30));
    // A source that connects and sends nothing.
    let mut listener = Command::new(bin)
        .args(["listen", "127.0.0.1:0", "--kvm", "--idle-timeout", "500ms"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(listener.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    let _silent = std::net::TcpStream::connect(&addr).unwrap();
    let status = listener.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert!(!status.success());
    assert!(rest.contains("went silent"), "{rest}");
}

#[test]
fn the_example_migrates_its_guest() {
    if !kvm_or_skip("the_example_migrates_its_guest") {
        return;
    }
    // cargo test builds the examples next to the test binaries' directory.
    let exe = std::env::current_exe().unwrap();
    let example = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("examples").join("kvm_migrate"))
        .unwrap();
    if !example.exists() {
        // `cargo test --test kvm` builds no examples: build it (as `cargo test` would).
        let cargo = std::env::var("CARGO").expect("run under cargo, or build the example first");
        let built = std::process::Command::new(cargo)
            .args([
                "build",
                "-p",
                "memferry-std",
                "--no-default-features",
                "--features",
                "kvm",
                "--example",
                "kvm_migrate",
            ])
            .status()
            .unwrap();
        assert!(built.success(), "building the example failed");
    }
    let out = std::process::Command::new(&example).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.contains("verified Some(true)"), "{stdout}");
    let hashes: Vec<&str> = last
        .split(|c: char| !c.is_ascii_hexdigit() && c != 'x')
        .filter(|w| w.starts_with("0x"))
        .collect();
    assert_eq!(hashes.len(), 2, "{last}");
    assert_eq!(
        hashes[0], hashes[1],
        "the final hash is the reference: {last}"
    );
}

#[test]
fn an_asked_for_pause_parks_the_vcpus_asynchronously_and_resume_cancels_it() {
    use memferry::memory::{PauseProgress, SourceGuest};
    use std::time::Instant;
    if !kvm_or_skip("an_asked_for_pause_parks_the_vcpus_asynchronously_and_resume_cancels_it") {
        return;
    }
    let (machine, mut source) = running_source(80);
    let progress = || machine.status().unwrap().progress;
    let runs_on = |what: &str| {
        let p0 = progress();
        let t0 = Instant::now();
        while progress() == p0 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "the guest does not run {what}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    runs_on("before the pause");
    // Polled until parked, within a bound; the vCPUs are signalled, not waited for.
    let asked = Instant::now();
    let first = source.request_pause().unwrap();
    let returned = asked.elapsed();
    assert!(matches!(
        first,
        PauseProgress::Pending | PauseProgress::Parked
    ));
    let mut polls = 0u32;
    let mut progress_now = first;
    while progress_now == PauseProgress::Pending {
        assert!(source.pause_pending());
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "the vCPUs did not park"
        );
        std::thread::sleep(Duration::from_micros(50));
        progress_now = source.poll_pause().unwrap();
        polls += 1;
    }
    let seen = asked.elapsed();
    assert!(source.is_paused() && !source.pause_pending());
    assert!(source.vcpus().threads()[0].is_paused());
    let took = *source.pause_times().last().unwrap();
    assert!(
        took <= seen,
        "{took:?} measured, parked seen after {seen:?}"
    );
    assert_eq!(
        source.last_pause_time(),
        Some(Nanos(took.as_nanos() as u64))
    );
    // Parked: memory does not change (the guest writes all the time when it runs).
    let before = source.memory().digest().unwrap();
    let p0 = progress();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(source.memory().digest().unwrap(), before);
    assert_eq!(progress(), p0);
    // Polling a completed pause says parked; the state can be read.
    assert_eq!(source.poll_pause().unwrap(), PauseProgress::Parked);
    assert!(!source.save_state().unwrap().is_empty());
    source.resume().unwrap();
    runs_on("after the resume");
    assert_ne!(source.memory().digest().unwrap(), before);
    // A pending pause cancelled by resume: the guest runs on, again and again.
    let mut pending = 0;
    for _ in 0..50 {
        if source.request_pause().unwrap() == PauseProgress::Pending {
            pending += 1;
        }
        source.resume().unwrap();
        assert!(!source.pause_pending() && !source.is_paused());
    }
    runs_on("after pending pauses were cancelled");
    assert!(
        pending > 0,
        "no request was pending: the vCPU parked in request_pause"
    );
    std::thread::sleep(Duration::from_millis(20));
    assert!(!source.vcpus().threads()[0].is_paused());
    runs_on("a while after the cancels");
    // Several asked-for pauses, then the synchronous one still works.
    let mut times = Vec::new();
    for _ in 0..10 {
        let asked = Instant::now();
        let mut p = source.request_pause().unwrap();
        while p == PauseProgress::Pending {
            assert!(asked.elapsed() < Duration::from_secs(2));
            std::thread::sleep(Duration::from_micros(50));
            p = source.poll_pause().unwrap();
        }
        times.push(*source.pause_times().last().unwrap());
        let p0 = progress();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(progress(), p0);
        source.resume().unwrap();
        runs_on("after an asked-for pause");
    }
    source.pause().unwrap();
    let sync = *source.pause_times().last().unwrap();
    let p0 = progress();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(progress(), p0);
    source.resume().unwrap();
    runs_on("after the synchronous pause");
    times.sort();
    eprintln!(
        "async pause: request returned in {returned:?} ({first:?}), parked after {took:?} \
         (seen after {seen:?}, {polls} polls); 10 more: min {:?}, median {:?}, max {:?}; \
         {pending}/50 cancelled while pending; synchronous pause {sync:?}",
        times[0], times[5], times[9]
    );
    source.finish().unwrap();
    assert!(source.vcpus().threads()[0].end().is_none());
    // 1 + 50 cancelled + 10 + the synchronous one.
    assert_eq!(source.resumes, 62);
}
