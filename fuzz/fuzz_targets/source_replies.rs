//! Fuzzes the source side of a migration, [`Source`], with whatever a hostile or broken
//! destination could send back, at every stage.
//!
//! A real [`Destination`] answers the source until a step the input picks (awaiting the accept,
//! mid-round, with the switchover half handed out, awaiting Ready, hashing, awaiting the
//! verdict); there the fuzzed replies are injected, after, before or instead of the real ones
//! (and, in "replace" mode, the real destination is not heard from again). The source then runs
//! on for a while and finally meets a peer timeout. Output room per `poll_transmit` call is
//! picked by the input, so the commit point can fall mid-frame.
//!
//! The source must never panic, and its guest must be where the v2 promise says:
//! - before the commit point ([`Source::is_committed`]) a failure resumes the guest: a failed,
//!   uncommitted source never leaves it paused;
//! - after the commit point the guest stays paused: the source never calls `resume` again
//!   (checked inside the host), a failure reports `source_paused: true`, and `Done` leaves it
//!   paused;
//! - [`Source::status`], [`Source::is_paused`] and the host agree; a failed source keeps its
//!   first error on every later call.
//!
//! Input: byte 0 configures (bit 0 fix the checksums of raw replies, bit 1 replace the real
//! destination from the injection on, bit 2 verification off, bit 3 two channels, bit 4 scripted
//! replies instead of raw bytes, bit 5 inject before the real replies, bits 6-7 max rounds
//! 1..=4); byte 1 the step to inject at; byte 2 the output room; byte 3 the device state size;
//! the rest is the replies (raw, or a script of frames).

#![no_main]

use libfuzzer_sys::fuzz_target;
use memferry::digest::memory_digest;
use memferry::error::MigrationError;
use memferry::prelude::*;
use memferry::wire::{self, AbortCode, ChannelRole, Frame, Verdict, PROTOCOL_VERSION};
use memferry_fuzz::{fix_checksums, layout, Input, PAGE};

const PAGES_EACH: u64 = 4;
const PAGES: u64 = 2 * PAGES_EACH;
const MAX_STEPS: usize = 300;
const ROOMS: [usize; 8] = [1 << 20, 64 << 10, 8300, 4200, 1000, 100, 17, 3];

/// The source guest: memory in a `Vec`; records whether it is paused, and panics if it is
/// resumed after the commit point.
struct Guest {
    mem: Vec<u8>,
    paused: bool,
    committed: bool,
    resumed_after_commit: bool,
    /// The source reported `Done` at some point.
    done: bool,
    /// The source was seen failed before the commit point.
    failed_uncommitted: bool,
    state_len: usize,
}

impl PageRead for Guest {
    fn read_page(&mut self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError> {
        let at = page.0 as usize * buf.len();
        let src = self
            .mem
            .get(at..at + buf.len())
            .expect("the engine reads only inside the guest");
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl DirtyLog for Guest {
    fn sync_region(
        &mut self,
        region: &Region,
        first_page: u64,
        into: &mut DirtyBitmap,
    ) -> Result<(), HostError> {
        assert!(
            first_page + region.pages <= PAGES,
            "a region outside the layout"
        );
        assert_eq!(region.pages, PAGES_EACH);
        // The second page of each region is always being written: rounds keep having work.
        into.set(first_page + 1);
        Ok(())
    }
}

impl SourceGuest for Guest {
    fn pause(&mut self) -> Result<(), HostError> {
        assert!(!self.paused, "paused twice");
        self.paused = true;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), HostError> {
        assert!(self.paused, "resumed a running guest");
        // Checked in `check`: after the commit point only a destination's abort before its
        // Ready (it never starts) may resume the guest.
        self.resumed_after_commit |= self.committed;
        self.paused = false;
        Ok(())
    }
    fn save_state(&mut self) -> Result<Vec<u8>, HostError> {
        assert!(self.paused, "state saved from a running guest");
        Ok(vec![0x5a; self.state_len])
    }
}

/// The destination guest.
struct Target {
    mem: Vec<u8>,
}

impl PageWrite for Target {
    fn write_page(&mut self, page: PageIndex, data: &[u8]) -> Result<(), HostError> {
        let at = page.0 as usize * data.len();
        self.mem[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }
}

impl DestinationGuest for Target {
    fn restore_state(&mut self, _state: &[u8]) -> Result<(), HostError> {
        Ok(())
    }
    fn start(&mut self) -> Result<(), HostError> {
        Ok(())
    }
}

/// Whether to check every promise (always, unless MEMFERRY_FUZZ_LENIENT=1 for bisecting).
fn strict() -> bool {
    // Engine bugs A-C are fixed: check the full promise unless asked not to.
    !std::env::var_os("MEMFERRY_FUZZ_LENIENT").is_some_and(|v| v == "1")
}

/// Checks the source against the promises after a call that returned `result`.
fn check<T>(source: &Source, guest: &mut Guest, result: &Result<T, MigrationError>) {
    if let Err(e) = result {
        assert!(!e.to_string().is_empty());
        assert_eq!(
            source.failure(),
            Some(e),
            "the error returned is not the first"
        );
    }
    // A committed source resumes only when the destination aborted before its Ready.
    let refused = matches!(source.failure(), Some(MigrationError::PeerAborted { .. }))
        && !source.destination_started();
    if guest.resumed_after_commit {
        assert!(refused, "the source resumed its guest after the commit point");
    }
    if guest.committed {
        assert!(source.is_committed(), "the commit point was taken back");
        assert!(
            guest.paused || refused || (guest.failed_uncommitted && !strict()),
            "the guest runs after the commit point"
        );
    }
    let committed = source.is_committed();
    match source.status() {
        SourceStatus::Failed {
            source_paused: false,
        } if guest.paused && !strict() => {
            // Known engine bugs A and B (see the fuzz report): a stray frame after `Done` (even
            // in the same `handle_input` call as the Ready or verdict that finished it) turns
            // the finished migration into `Failed { source_paused: false }` although the guest
            // is still paused. `fail` resumes before the commit point and never clears `paused`
            // after it, so only `finish` (Done) leads here. Set MEMFERRY_FUZZ_STRICT=1 to
            // check the full promise once fixed.
            assert!(guest.paused, "a finished migration's source guest runs");
        }
        SourceStatus::Failed { source_paused } => {
            assert_eq!(source_paused, guest.paused, "status and host disagree");
            assert_eq!(source.is_paused(), guest.paused);
            if !committed {
                guest.failed_uncommitted = true;
            }
            if committed && !refused && !(guest.failed_uncommitted && !strict()) {
                // Known engine bug C (see the fuzz report) is exempt unless strict: a failure
                // before the commit point resumes the guest but leaves the queued switchover
                // on channel 0, so draining the abort hands it out and commits afterwards.
                assert!(
                    guest.paused,
                    "a failure after the commit point resumed the guest"
                );
            } else {
                assert!(
                    !guest.paused,
                    "a failure before the commit point left the guest paused"
                );
            }
        }
        SourceStatus::Done => {
            assert!(guest.paused, "a finished migration's source guest runs");
            // Known engine bug B: a Ready accepted before the switchover was handed out.
            assert!(
                committed || !strict(),
                "done without handing out the switchover"
            );
            guest.done = true;
        }
        _ => {
            assert!(source.failure().is_none());
            assert_eq!(
                source.is_paused(),
                guest.paused,
                "is_paused and host disagree"
            );
        }
    }
    guest.committed = committed;
}

/// Scripted replies: frames a destination could send, right or wrong for the stage.
fn script(input: &mut Input<'_>, source_digest: u128, out: &mut Vec<u8>) {
    while !input.is_empty() {
        let mut list = Vec::new();
        let op = input.byte();
        let checksum = op & 0x80 == 0;
        let frame = match op % 14 {
            0 => Frame::Accept {
                version: if op & 0x40 == 0 {
                    PROTOCOL_VERSION
                } else {
                    u16::from(input.byte())
                },
                features: u64::from(input.byte() & 7),
                max_device_state: match input.byte() % 3 {
                    0 => u64::MAX,
                    1 => u64::from(input.byte()),
                    _ => input.u64(),
                },
            },
            1 | 2 => Frame::Ready,
            3 | 4 => {
                let b = input.byte();
                Frame::Verified {
                    verdict: match b % 3 {
                        0 => Verdict::Mismatch,
                        1 => Verdict::Match,
                        _ => Verdict::NotChecked,
                    },
                    digest: if b & 0x80 == 0 {
                        source_digest
                    } else {
                        input.u128()
                    },
                }
            }
            5 => {
                let len = usize::from(input.byte());
                Frame::Abort {
                    code: AbortCode::Cancelled,
                    message: input.bytes(len),
                }
            }
            6 => {
                let values: Vec<u64> = (0..input.byte() % 4).map(|_| input.u64() % 12).collect();
                Frame::PageRequest(wire::u64_list(&values, &mut list))
            }
            7 => Frame::Need(wire::u64_list(&[input.u64()], &mut list)),
            8 => Frame::Have(wire::u128_list(&[input.u128()], &mut list)),
            9 => Frame::ReceivedSet {
                first_page: input.u64() % 16,
                bits: 8,
                words: wire::u64_list(&[input.u64()], &mut list),
            },
            10 => Frame::Join {
                channel: 1,
                session_id: 0,
                role: ChannelRole::Urgent,
            },
            11 => Frame::RoundEnd {
                round: 1,
                channel: 0,
                pages: 0,
            },
            12 => Frame::DeviceState(input.bytes(3)),
            _ => {
                let len = usize::from(input.byte() % 32);
                out.extend_from_slice(input.bytes(len));
                continue;
            }
        };
        frame.emit_with(out, checksum);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let control = input.byte();
    let inject_at = usize::from(input.byte() % 64);
    let room = ROOMS[usize::from(input.byte() % 8)];
    let state_len = usize::from(input.byte()) * 3;
    let replace = control & 2 != 0;
    let verify = control & 4 == 0;
    let channels: u16 = if control & 8 != 0 { 2 } else { 1 };
    let max_rounds = 1 + u32::from(control >> 6);

    let mut guest = Guest {
        mem: (0..PAGES as usize * PAGE)
            .map(|i| (i / PAGE) as u8 ^ (i as u8))
            .collect(),
        paused: false,
        committed: false,
        resumed_after_commit: false,
        done: false,
        failed_uncommitted: false,
        state_len,
    };
    let source_digest = memory_digest(&guest.mem, PAGE);
    let mut replies = Vec::new();
    if control & 16 != 0 {
        script(&mut input, source_digest, &mut replies);
    } else {
        replies = input.rest().to_vec();
        if control & 1 != 0 {
            fix_checksums(&mut replies);
        }
    }

    let strategy = PreCopy::new(PreCopyConfig {
        stop: StopRules {
            max_rounds,
            ..StopRules::default()
        },
        verify,
        ..PreCopyConfig::default()
    });
    let session = SessionConfig {
        channels,
        verify,
        session_id: 0x5eed,
        hash_batch_bytes: 2 * PAGE,
        ..SessionConfig::default()
    };
    let mut source = Source::new(layout(PAGES_EACH), session, strategy);
    let mut dest = Destination::new(layout(PAGES_EACH), DestinationConfig::default());
    let mut target = Target {
        mem: vec![0; PAGES as usize * PAGE],
    };

    let mut buf = vec![0u8; room];
    let mut to_dest = vec![Vec::new(); usize::from(channels)];
    let mut to_source = Vec::new();
    let mut dest_alive = true;
    let mut now = Nanos::ZERO;
    let mut first_error: Option<MigrationError> = None;
    let mut quiet = 0;
    for step in 0..MAX_STEPS {
        now += Nanos::from_micros(100);
        for ch in 0..channels {
            for _ in 0..4 {
                let result = source.poll_transmit(now, ch, &mut buf, &mut guest);
                check(&source, &mut guest, &result);
                let n = *result.as_ref().unwrap_or(&0);
                assert!(n <= buf.len());
                to_dest[usize::from(ch)].extend_from_slice(&buf[..n]);
                if n == 0 {
                    break;
                }
            }
        }
        if dest_alive {
            for ch in 0..channels {
                let pending = &mut to_dest[usize::from(ch)];
                match dest.handle_input(now, ch, pending, &mut target) {
                    Ok(used) => {
                        pending.drain(..used);
                    }
                    Err(_) => dest_alive = false,
                }
            }
        }
        let mut answer = Vec::new();
        dest.drain_replies(&mut answer);
        let injected = step >= inject_at;
        if step == inject_at {
            if control & 32 != 0 {
                to_source.extend_from_slice(&replies);
            }
            if !replace {
                to_source.extend_from_slice(&answer);
            }
            if control & 32 == 0 {
                to_source.extend_from_slice(&replies);
            }
        } else if !(replace && injected) {
            to_source.extend_from_slice(&answer);
        }
        let result = source.handle_input(now, 0, &to_source, &mut guest);
        check(&source, &mut guest, &result);
        match &result {
            Ok(used) => {
                assert!(*used <= to_source.len());
                to_source.drain(..*used);
            }
            Err(e) => {
                if let Some(first) = &first_error {
                    assert_eq!(e, first, "a failed source changed its error");
                }
                first_error = Some(e.clone());
            }
        }
        if source.is_finished() && injected {
            quiet += 1;
            if quiet > 3 {
                break;
            }
        }
    }
    // A destination that falls silent: the peer timeout.
    let later = now + Nanos::from_secs(61);
    let result = source.handle_timeout(later, &mut guest);
    check(&source, &mut guest, &result);
    let result = source.poll_transmit(later, 0, &mut buf, &mut guest);
    check(&source, &mut guest, &result);
    if let Some(first) = first_error {
        assert_eq!(source.failure(), Some(&first));
    }
});
