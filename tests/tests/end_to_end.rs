//! End-to-end migrations with real parts: guest memory in an mmap, a workload thread writing
//! into it throughout, and the in-process loopback and TCP on 127.0.0.1 as transports.
//!
//! Checked: the destination equals the source at the moment of pause, byte for byte and by
//! digest; the report's counts add up; a corrupted frame aborts the migration with a clear
//! error while the source guest keeps running and loses nothing.

use std::time::Duration;

use memferry::digest::memory_digest;
use memferry::error::MigrationError;
use memferry::page::PageSize;
use memferry::report::MigrationReport;
use memferry::schedule::StopRules;
use memferry::strategy::PreCopyConfig;
use memferry::time::{ByteRate, Nanos};
use memferry::wire::{page_frame_len, FRAME_OVERHEAD, PAGES_HEADER_LEN, PAGE_ENTRY_LEN};
use memferry_std::demo::{self, GuestOptions, JobError, TransportKind};
use memferry_std::drive::DriveError;
use memferry_std::transport::{loopback, FaultInjector};
use memferry_std::workload::WorkloadConfig;

fn busy_guest(memory: u64, seed: u64) -> GuestOptions {
    GuestOptions {
        memory,
        page_size: PageSize::DEFAULT,
        zero_fraction: 0.2,
        workload: Some(WorkloadConfig {
            writes_per_sec: 400_000,
            hot_fraction: 0.05,
            hot_share: 0.9,
            seed,
        }),
    }
}

fn assert_counts_add_up(report: &MigrationReport) {
    let pages: u64 = report.rounds.iter().map(|r| r.pages).sum();
    let zero: u64 = report.rounds.iter().map(|r| r.zero_pages).sum();
    let page_bytes: u64 = report.rounds.iter().map(|r| r.bytes).sum();
    assert_eq!(report.pages_sent, pages);
    assert_eq!(report.zero_pages_sent, zero);
    assert_eq!(report.bytes_sent, page_bytes + report.control_bytes);
    // Each page entry costs its header plus the payload unless zero; pages travel in batch
    // frames, each with its header, batch header and checksum (wire v2).
    let raw = report.pages_sent - report.zero_pages_sent;
    let entries = raw * (PAGE_ENTRY_LEN as u64 + report.page_size)
        + report.zero_pages_sent * PAGE_ENTRY_LEN as u64;
    assert!(page_bytes >= entries);
    let per_frame = (FRAME_OVERHEAD + PAGES_HEADER_LEN) as u64;
    assert_eq!((page_bytes - entries) % per_frame, 0);
    let frames = (page_bytes - entries) / per_frame;
    assert!(
        frames >= 1 && frames <= pages,
        "{frames} frames for {pages} pages"
    );
    assert!(report.control_bytes >= 5 * FRAME_OVERHEAD as u64);
    assert_eq!(
        report.rounds[0].pages, report.page_count,
        "round 1 sends every page"
    );
    let last = report.rounds.last().unwrap();
    assert!(last.stop_and_copy);
    assert!(report.rounds[..report.rounds.len() - 1]
        .iter()
        .all(|r| !r.stop_and_copy));
    assert_eq!(
        report.preparation_time + report.downtime + report.resume_time,
        report.total_time
    );
    assert!(report.stop_reason.is_some());
}

fn migrate_and_compare(
    transport: TransportKind,
    link: ByteRate,
    config: PreCopyConfig,
    seed: u64,
) -> MigrationReport {
    migrate_and_compare_over(transport, link, config, seed, 1)
}

fn migrate_and_compare_over(
    transport: TransportKind,
    link: ByteRate,
    config: PreCopyConfig,
    seed: u64,
    channels: u16,
) -> MigrationReport {
    let guest = busy_guest(48 << 20, seed);
    let mut rounds_seen = 0;
    let outcome = demo::run_demo_channels(&guest, seed, config, link, transport, channels, |_| {
        rounds_seen += 1
    })
    .expect("migration succeeds");
    assert_eq!(outcome.report.channels, channels);
    let report = &outcome.report;
    assert_eq!(report.verified, Some(true));
    assert_eq!(rounds_seen, report.rounds.len());
    assert_counts_add_up(report);

    // The source stays paused after a successful migration: its memory is the image at pause.
    let source = outcome.source.region().snapshot();
    let destination = outcome.destination.region().snapshot();
    let writes = outcome.source.workload().unwrap().writes();
    assert!(writes > 0, "the workload wrote while migrating");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        outcome.source.workload().unwrap().writes(),
        writes,
        "the source guest stays paused"
    );
    assert!(
        source == destination,
        "destination memory differs from the source at pause"
    );
    let digest = memory_digest(source, 4096);
    assert_eq!(report.source_digest, Some(digest));
    assert_eq!(
        report.destination_digest,
        Some(memory_digest(destination, 4096))
    );
    assert_eq!(
        outcome.destination.device_state(),
        Some(outcome.source.device_state())
    );
    assert!(outcome.destination.started());
    outcome.report
}

#[test]
fn loopback_migration_with_a_running_workload_is_byte_exact() {
    migrate_and_compare(
        TransportKind::Loopback,
        ByteRate::UNLIMITED,
        PreCopyConfig::default(),
        7,
    );
}

#[test]
fn tcp_migration_with_a_running_workload_is_byte_exact() {
    migrate_and_compare(
        TransportKind::Tcp,
        ByteRate::UNLIMITED,
        PreCopyConfig::default(),
        8,
    );
}

#[test]
fn several_connections_over_tcp_and_loopback_are_byte_exact() {
    // Pages sharded across 3 connections arrive out of order between them; generations decide.
    for (transport, seed) in [(TransportKind::Tcp, 21), (TransportKind::Loopback, 22)] {
        let report = migrate_and_compare_over(
            transport,
            ByteRate::UNLIMITED,
            PreCopyConfig::default(),
            seed,
            3,
        );
        assert!(report.rounds.len() >= 2);
    }
}

#[test]
fn rate_limited_link_needs_several_rounds_and_stays_exact() {
    // 48 MiB over a 200 MB/s link: round 1 takes ~250 ms, long enough for the workload to
    // dirty ~35 MB again, which a 20 ms downtime target does not allow: pre-copy iterates.
    let config = PreCopyConfig {
        stop: StopRules {
            downtime_target: Nanos::from_millis(20),
            max_rounds: 4,
            ..StopRules::default()
        },
        ..PreCopyConfig::default()
    };
    let report = migrate_and_compare(TransportKind::Tcp, ByteRate(200_000_000), config, 9);
    assert!(
        report.rounds.len() >= 3,
        "expected at least two pre-copy rounds: {:?}",
        report.rounds
    );
    // The link limit holds: no round big enough to outlast the token bucket's 2 MB burst
    // measured far above 200 MB/s.
    let big_rounds = report.rounds.iter().filter(|r| r.bytes >= 10 << 20);
    assert!(big_rounds.clone().count() >= 2);
    assert!(
        big_rounds.clone().all(|r| r.bandwidth.0 < 260_000_000),
        "{:?}",
        report.rounds
    );
}

#[test]
fn verification_before_start_runs_inside_the_downtime_over_tcp() {
    // A busy guest over TCP, digests compared before the destination starts: byte-exact, and
    // the hashing counted in the downtime, none after the start.
    let config = PreCopyConfig {
        verify_before_start: true,
        stop: StopRules {
            downtime_target: Nanos::from_millis(20),
            max_rounds: 4,
            ..StopRules::default()
        },
        ..PreCopyConfig::default()
    };
    let report = migrate_and_compare(TransportKind::Tcp, ByteRate(300_000_000), config, 12);
    assert_eq!(report.verified, Some(true));
    assert!(report.verification_time > Nanos::ZERO);
    assert!(
        report.verification_time <= report.downtime,
        "verification {} outside the downtime {}",
        report.verification_time,
        report.downtime
    );
    assert_eq!(report.resume_time, Nanos::ZERO);
}

#[test]
fn predictors_hold_back_hot_pages_and_stay_byte_exact() {
    // A hot 5% taking 95% of a fast workload's writes, over a link slow enough for several
    // rounds: the predictor holds pages back, and the destination is still exact.
    for predictor in ["wsclock", "lru", "splay", "history"] {
        let config = PreCopyConfig {
            predictor: memferry::track::PredictorKind::parse(predictor).unwrap(),
            stop: StopRules {
                downtime_target: Nanos::from_millis(20),
                max_rounds: 4,
                ..StopRules::default()
            },
            ..PreCopyConfig::default()
        };
        let report =
            migrate_and_compare(TransportKind::Loopback, ByteRate(300_000_000), config, 11);
        assert_eq!(report.strategy, format!("pre-copy+{predictor}"));
        let held: u64 = report.rounds.iter().map(|r| r.held_back).sum();
        assert!(
            held > 0,
            "{predictor} held nothing back: {:?}",
            report.rounds
        );
    }
}

/// After a failed migration the source guest keeps running: it is not paused, and its
/// workload goes on writing.
fn assert_source_runs(source: &memferry_std::memory::SourceHost) {
    assert!(
        !source.is_paused(),
        "the source guest is paused after a failure"
    );
    let w = source.workload().unwrap();
    let after = w.writes();
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        w.writes() > after,
        "the source workload runs after the failure"
    );
}

/// Corrupts one byte of the stream at `offset` and checks the aftermath.
fn corrupted_stream_aborts_cleanly(offset: u64) -> MigrationError {
    let guest = busy_guest(16 << 20, 3);
    let mut source = demo::prepare_source(&guest, 3).unwrap();
    let before_writes = source.workload().unwrap().writes();
    let ((src_r, src_w), (dst_r, dst_w)) = loopback::pair();
    let destination = std::thread::spawn(move || demo::serve(dst_r, dst_w, u64::MAX));
    let writer = Box::new(FaultInjector::new(src_w, offset, 0x40));
    let result = demo::migrate(
        &mut source,
        PreCopyConfig::default(),
        src_r,
        writer,
        ByteRate::UNLIMITED,
        |_| {},
    );
    let dest_result = destination.join().unwrap();

    let Err(JobError::Drive(DriveError::Migration {
        error: source_error,
        ..
    })) = result
    else {
        panic!(
            "the source should fail with a migration error, got {:?}",
            result.map(|r| r.verified)
        );
    };
    let Err(JobError::Drive(DriveError::Migration {
        error: dest_error, ..
    })) = dest_result
    else {
        panic!("the destination should refuse the stream");
    };
    assert!(
        matches!(dest_error, MigrationError::Frame(_)),
        "destination: {dest_error}"
    );
    assert!(
        dest_error.to_string().contains("checksum"),
        "a person is told why: {dest_error}"
    );
    assert!(
        matches!(source_error, MigrationError::PeerAborted { .. }),
        "source: {source_error}"
    );
    assert!(
        source_error.to_string().contains("checksum"),
        "the source learns the destination's reason: {source_error}"
    );

    assert!(source.workload().unwrap().writes() > before_writes);
    assert_source_runs(&source);
    source_error
}

#[test]
fn corrupted_frame_in_round_one_aborts_and_the_source_keeps_running() {
    corrupted_stream_aborts_cleanly(1_000_000);
}

#[test]
fn corrupted_frame_at_the_start_aborts_and_the_source_keeps_running() {
    // Inside the hello frame: the destination cannot even size the guest.
    let guest = busy_guest(4 << 20, 4);
    let mut source = demo::prepare_source(&guest, 4).unwrap();
    let ((src_r, src_w), (dst_r, dst_w)) = loopback::pair();
    let destination = std::thread::spawn(move || demo::serve(dst_r, dst_w, u64::MAX));
    let writer = Box::new(FaultInjector::new(src_w, 12, 0x01));
    let result = demo::migrate(
        &mut source,
        PreCopyConfig::default(),
        src_r,
        writer,
        ByteRate::UNLIMITED,
        |_| {},
    );
    assert!(destination.join().unwrap().is_err());
    assert!(result.is_err());
    assert_source_runs(&source);
}

#[test]
fn corrupted_frame_during_stop_and_copy_resumes_the_paused_source() {
    // One pre-copy round of a 4 MiB guest (under 4.2 MB of frames even if no page were zero),
    // then stop-and-copy of the many pages a fast workload dirtied meanwhile: corrupting the
    // stream past the largest possible round 1 hits frames sent while the guest is paused.
    let mut guest = busy_guest(4 << 20, 5);
    guest.workload = Some(WorkloadConfig {
        writes_per_sec: 2_000_000,
        hot_fraction: 1.0,
        hot_share: 1.0,
        seed: 5,
    });
    let mut source = demo::prepare_source(&guest, 5).unwrap();
    let ((src_r, src_w), (dst_r, dst_w)) = loopback::pair();
    let destination = std::thread::spawn(move || demo::serve(dst_r, dst_w, u64::MAX));
    let round_one_bytes = 1024 * page_frame_len(4096) as u64 + 1024 * page_frame_len(0) as u64;
    let writer = Box::new(FaultInjector::new(src_w, round_one_bytes + 64, 0x08));
    let config = PreCopyConfig {
        stop: memferry::schedule::StopRules {
            max_rounds: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let result = demo::migrate(
        &mut source,
        config,
        src_r,
        writer,
        ByteRate::UNLIMITED,
        |_| {},
    );
    assert!(destination.join().unwrap().is_err());
    let Err(JobError::Drive(DriveError::Migration { error: e, .. })) = result else {
        panic!("expected a migration error")
    };
    assert!(matches!(e, MigrationError::PeerAborted { .. }), "{e}");
    assert_eq!(
        source.resumes, 1,
        "the paused guest was resumed exactly once"
    );
    assert!(!source.is_paused());
    assert_source_runs(&source);
}

#[test]
fn a_destination_that_vanishes_mid_migration_leaves_the_source_running() {
    use std::io::Read;
    // The destination reads about 1 MB, then its process "dies": both directions close at once,
    // with no abort frame. The source must fail cleanly and keep its guest running, over the
    // in-process loopback and over real TCP.
    for tcp in [false, true] {
        let guest = busy_guest(16 << 20, 6);
        let mut source = demo::prepare_source(&guest, 6).unwrap();
        let (src, dest) = if tcp {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let dest = std::thread::spawn(move || {
                let (r, w, _) = memferry_std::transport::tcp::accept(&listener).unwrap();
                (r, w)
            });
            (
                memferry_std::transport::tcp::connect(addr).unwrap(),
                dest.join().unwrap(),
            )
        } else {
            loopback::pair()
        };
        let (mut dst_r, mut dst_w) = dest;
        let vanishing = std::thread::spawn(move || {
            // Accept, so round 1 starts streaming.
            let mut accept = Vec::new();
            memferry::wire::Frame::Accept {
                version: memferry::wire::PROTOCOL_VERSION,
                features: 0,
                max_device_state: 1 << 20,
            }
            .emit(&mut accept);
            std::io::Write::write_all(&mut dst_w, &accept).unwrap();
            let mut buf = vec![0u8; 64 << 10];
            let mut read = 0;
            while read < 1_000_000 {
                match dst_r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => read += n,
                }
            }
            drop(dst_r);
            drop(dst_w);
        });
        let result = demo::migrate(
            &mut source,
            PreCopyConfig::default(),
            src.0,
            src.1,
            ByteRate::UNLIMITED,
            |_| {},
        );
        vanishing.join().unwrap();
        let Err(JobError::Drive(e)) = result else {
            panic!("the migration cannot succeed (tcp: {tcp})")
        };
        let text = e.to_string();
        assert!(
            text.contains("destination") || text.contains("transport"),
            "a person is told what happened: {text}"
        );
        assert_source_runs(&source);
    }
}

/// The kernel's dirty log (userfaultfd asynchronous write-protect + `PAGEMAP_SCAN`) in place of
/// the workload's own marks: the workload writes throughout a rate-limited migration and the
/// destination still equals the source at pause, so the kernel missed no write.
#[test]
fn kernel_dirty_log_migration_is_byte_exact() {
    use memferry_std::kernel_dirty::KernelDirtyLog;
    if let Err(why) = memferry_recorder::sys::probe() {
        eprintln!("SKIPPED kernel_dirty_log_migration_is_byte_exact: {why}");
        return;
    }
    let guest = busy_guest(32 << 20, 21);
    let source = demo::prepare_source(&guest, 21).unwrap();
    let memory = source.region().snapshot();
    let log = KernelDirtyLog::new(memory.as_ptr(), memory.len(), 4096).unwrap();
    let mut source = source.with_dirty_log(Box::new(log));
    assert!(source.has_dirty_log());
    let (src, dst) = loopback::pair();
    let dest = std::thread::spawn(move || demo::serve(dst.0, dst.1, u64::MAX));
    let config = PreCopyConfig {
        stop: StopRules {
            downtime_target: Nanos::from_millis(5),
            max_rounds: 6,
            ..StopRules::default()
        },
        ..PreCopyConfig::default()
    };
    // 32 MiB at 100 MB/s: round 1 alone takes a third of a second of writes.
    let report = demo::migrate(
        &mut source,
        config,
        src.0,
        src.1,
        ByteRate(100_000_000),
        |_| {},
    )
    .expect("migration succeeds");
    let destination = dest.join().unwrap().expect("destination succeeds");
    assert_eq!(report.verified, Some(true));
    assert!(report.rounds.len() >= 2, "one round only");
    let dirtied: u64 = report.rounds[..report.rounds.len() - 1]
        .iter()
        .map(|r| r.dirty_pages)
        .sum();
    assert!(dirtied > 0, "the kernel reported no write");
    // The kernel log's scans are the rounds' dirty-tracking cost.
    let scanning: u64 = report.rounds.iter().map(|r| r.dirty_sync_time.0).sum();
    assert!(scanning > 0, "no dirty-tracking cost reported");
    assert!(
        source.region().snapshot() == destination.region().snapshot(),
        "destination memory differs from the source at pause"
    );
}
