//! The program `tests/record_program.rs` records: it writes known pages at known times and
//! says which, so the test can check that the trace holds exactly those writes.
//!
//! Usage: `memferry-record-fixture REPORT INTERVAL_MS`. Phase *k* runs at
//! `start + (2k + 1/2) × INTERVAL` (mid-interval, with a whole interval between phases); each
//! phase is a burst of writes (and reads) to pages of three anonymous mappings, `A` (64
//! pages, mapped at the start), `B` (16 pages, mapped in phase 4, unmapped and mapped again
//! at the same address in phase 7) and `C` (8 pages, mapped in phase 5). For every phase the
//! report has one line: `phase K BEGIN_NS END_NS written ADDR… discarded ADDR…`, the
//! CLOCK_MONOTONIC instants just before the first and just after the last access of the
//! burst, the page addresses written (in hexadecimal; pages only read are not listed) and
//! the pages discarded with `MADV_DONTNEED` and not written again. The last line is
//! `mappings A B C` (their addresses).

use std::io::Write;
use std::time::Duration;

const PAGE: usize = 4096;

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn map(pages: usize, at: Option<usize>) -> usize {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | at.map_or(0, |_| libc::MAP_FIXED);
    // SAFETY: an anonymous private mapping (at a fixed address only where this program
    // unmapped its own mapping just before).
    let addr = unsafe {
        libc::mmap(
            at.map_or(std::ptr::null_mut(), |a| a as *mut libc::c_void),
            pages * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED, "mmap failed");
    addr as usize
}

struct Phase {
    begin: u64,
    end: u64,
    written: Vec<usize>,
    discarded: Vec<usize>,
}

/// One burst: `writes` pages get a byte each (some twice), `reads` pages are read.
fn burst(writes: &[usize], reads: &[usize]) -> Phase {
    let begin = now_ns();
    let mut sum = 0u8;
    for &page in writes {
        // SAFETY: a page of one of this program's mappings.
        unsafe { std::ptr::write_volatile((page + 8) as *mut u8, 1) };
    }
    for &page in reads {
        // SAFETY: as above.
        sum = sum.wrapping_add(unsafe { std::ptr::read_volatile((page + 16) as *const u8) });
    }
    let end = now_ns();
    std::hint::black_box(sum);
    let mut written = writes.to_vec();
    written.sort_unstable();
    written.dedup();
    Phase {
        begin,
        end,
        written,
        discarded: Vec::new(),
    }
}

fn pages(base: usize, indices: impl IntoIterator<Item = usize>) -> Vec<usize> {
    indices.into_iter().map(|i| base + i * PAGE).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let report = &args[1];
    let interval_ns: u64 = args[2].parse::<u64>().expect("INTERVAL_MS") * 1_000_000;
    let start = now_ns();
    let wait_for = |phase: u64| {
        let at = start + (2 * phase) * interval_ns + interval_ns / 2;
        let now = now_ns();
        if at > now {
            std::thread::sleep(Duration::from_nanos(at - now));
        }
    };

    let a = map(64, None);
    let mut b = 0;
    let mut c = 0;
    let mut phases = Vec::new();
    for k in 0..10u64 {
        wait_for(k);
        let phase = match k {
            // First touch of every page of A (never populated before).
            0 => burst(&pages(a, 0..64), &[]),
            1 => burst(&pages(a, (0..64).step_by(2)), &[]),
            // Reads of written pages do not count.
            2 => burst(&pages(a, 0..8), &pages(a, 40..48)),
            3 => burst(&[], &pages(a, 0..64)),
            // A new mapping, written before the recorder has seen it.
            4 => {
                b = map(16, None);
                burst(
                    &pages(b, 0..4)
                        .into_iter()
                        .chain(pages(a, [63]))
                        .collect::<Vec<_>>(),
                    &[],
                )
            }
            // Another new mapping, only read (the zero page): no write.
            5 => {
                c = map(8, None);
                burst(&pages(b, 4..16), &pages(c, 0..8))
            }
            // Copy-on-write from the zero page; a page written twice counts once.
            6 => burst(
                &pages(c, [0, 7])
                    .into_iter()
                    .chain(pages(a, [1, 1, 2]))
                    .collect::<Vec<_>>(),
                &[],
            ),
            // B replaced by a new mapping at the same address.
            7 => {
                // SAFETY: unmapping this program's own mapping B.
                assert_eq!(
                    unsafe { libc::munmap(b as *mut libc::c_void, 16 * PAGE) },
                    0
                );
                b = map(16, Some(b));
                burst(&pages(b, [2, 3]), &[])
            }
            8 => burst(&pages(a, (0..64).step_by(3)), &pages(b, 0..16)),
            // Pages discarded (MADV_DONTNEED), one of them written again.
            _ => {
                let begin = now_ns();
                // SAFETY: discarding pages of this program's own mapping A.
                let rc = unsafe {
                    libc::madvise(
                        (a + 10 * PAGE) as *mut libc::c_void,
                        10 * PAGE,
                        libc::MADV_DONTNEED,
                    )
                };
                assert_eq!(rc, 0);
                let mut phase = burst(&pages(a, [10]), &[]);
                phase.begin = begin;
                phase.discarded = pages(a, 11..20);
                phase
            }
        };
        phases.push(phase);
    }

    let mut out = std::fs::File::create(report).expect("create the report");
    for (k, phase) in phases.iter().enumerate() {
        write!(out, "phase {k} {} {} written", phase.begin, phase.end).unwrap();
        for page in &phase.written {
            write!(out, " {page:x}").unwrap();
        }
        write!(out, " discarded").unwrap();
        for page in &phase.discarded {
            write!(out, " {page:x}").unwrap();
        }
        writeln!(out).unwrap();
    }
    writeln!(out, "mappings {a:x} {b:x} {c:x}").unwrap();
}
