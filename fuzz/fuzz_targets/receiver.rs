//! Fuzzes the destination state machine, [`Receiver`], for a guest of 16 pages of 4 KiB.
//!
//! The guest is a `Vec<u8>` behind [`PageWrite`] and [`DestinationGuest`] that asserts what the
//! receiver promises its host: every write is a whole page inside the guest, no page is written
//! once the guest runs, the state is restored before the start, the guest starts once and only
//! after every page arrived, and the digest the receiver computes is that of the memory written.
//! The stream reaches the receiver in chunks of a size picked by the input, through a buffer
//! that keeps the unconsumed tail as a real driver does. The receiver must never panic, must
//! keep failing with the same error once failed, and its replies must be well-formed frames.
//!
//! The first input byte configures the run:
//! - bits 0-3: chunk size, `1 << n` bytes;
//! - bit 4: verification off; bit 5: a 100-byte device-state limit;
//! - bits 6-7, the mode: `0` the rest is the raw stream; `1` a valid hello for this guest, then
//!   the rest with the checksums of the frames it lays out fixed ([`fix_checksums`]); `2` a
//!   valid hello, then the rest read as a script for a source ([`Script`]) whose frames are
//!   emitted with valid checksums, so that the fuzzer reaches rounds, switchover and
//!   completion; `3` as `2`, with a host that fails to write the last page.

#![no_main]

use libfuzzer_sys::fuzz_target;
use memferry::digest::memory_digest;
use memferry::prelude::*;
use memferry::wire::{AbortCode, Frame, FrameKind, Hello, PageEncoding, Verdict, PROTOCOL_VERSION};
use memferry_fuzz::fix_checksums;

const PAGES: u64 = 16;
const PAGE: usize = 4096;
const SMALL_STATE_LIMIT: usize = 100;

const CHUNK_SHIFT: u8 = 0x0f;
const VERIFY_OFF: u8 = 0x10;
const SMALL_STATE: u8 = 0x20;

/// The destination guest: memory in a `Vec`, and a record of what the receiver did with it.
struct Guest {
    memory: Vec<u8>,
    written: [bool; PAGES as usize],
    state: Option<Vec<u8>>,
    started: bool,
    digest_at_start: Option<u64>,
    fail_last_page: bool,
}

impl Guest {
    fn new(fail_last_page: bool) -> Self {
        Guest {
            memory: vec![0; PAGES as usize * PAGE],
            written: [false; PAGES as usize],
            state: None,
            started: false,
            digest_at_start: None,
            fail_last_page,
        }
    }
}

impl PageWrite for Guest {
    fn write_page(&mut self, page: PageIndex, data: &[u8]) -> Result<(), HostError> {
        assert!(page.0 < PAGES, "write to {page}, outside the guest");
        assert_eq!(
            data.len(),
            PAGE,
            "a write of {} bytes to {page}",
            data.len()
        );
        assert!(!self.started, "{page} written after the guest started");
        if self.fail_last_page && page.0 == PAGES - 1 {
            return Err(HostError::new("injected write failure"));
        }
        let at = page.0 as usize * PAGE;
        self.memory[at..at + PAGE].copy_from_slice(data);
        self.written[page.0 as usize] = true;
        Ok(())
    }
}

impl DestinationGuest for Guest {
    fn restore_state(&mut self, state: &[u8]) -> Result<(), HostError> {
        assert!(!self.started, "state restored into a running guest");
        self.state = Some(state.to_vec());
        Ok(())
    }

    fn start(&mut self) -> Result<(), HostError> {
        assert!(!self.started, "guest started twice");
        assert!(
            self.state.is_some(),
            "guest started before its state was restored"
        );
        assert!(
            self.written.iter().all(|&w| w),
            "guest started with pages missing"
        );
        self.started = true;
        self.digest_at_start = Some(memory_digest(&self.memory, PAGE));
        Ok(())
    }
}

/// The hello a source of this guest sends.
fn hello(out: &mut Vec<u8>) {
    Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        page_shift: PAGE.trailing_zeros() as u8,
        page_count: PAGES,
        features: 0,
    })
    .emit(out);
}

/// Turns a script into a stream of checksummed frames, playing a source that mostly follows the
/// protocol: it counts rounds and pages and knows the memory it sent, so its round markers,
/// switchover and digest are right unless the script asks for them to be wrong.
struct Script<'a> {
    input: &'a [u8],
    stream: Vec<u8>,
    memory: Vec<u8>,
    round: u32,
    pages_in_round: u64,
}

impl<'a> Script<'a> {
    fn byte(&mut self) -> u8 {
        let (&first, rest) = self.input.split_first().unwrap_or((&0, &[]));
        self.input = rest;
        first
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.input.split_at(n.min(self.input.len()));
        self.input = rest;
        taken
    }

    fn u64(&mut self) -> u64 {
        let mut le = [0u8; 8];
        let taken = self.bytes(8);
        le[..taken.len()].copy_from_slice(taken);
        u64::from_le_bytes(le)
    }

    /// A page index, sometimes just outside the guest.
    fn index(&mut self) -> u64 {
        u64::from(self.byte()) % (PAGES + 4)
    }

    fn page(&mut self, index: u64, encoding: PageEncoding, payload: &[u8]) {
        Frame::Page {
            index,
            encoding,
            payload,
        }
        .emit(&mut self.stream);
        let whole = match encoding {
            PageEncoding::Raw => payload.len() == PAGE,
            PageEncoding::Zero => payload.is_empty(),
        };
        if index < PAGES && whole {
            let at = index as usize * PAGE;
            let page = &mut self.memory[at..at + PAGE];
            match encoding {
                PageEncoding::Raw => page.copy_from_slice(payload),
                PageEncoding::Zero => page.fill(0),
            }
            self.pages_in_round += 1;
        }
    }

    fn run(mut self) -> Vec<u8> {
        while !self.input.is_empty() {
            match self.byte() % 10 {
                0 => {
                    let index = self.index();
                    let fill = self.byte();
                    self.page(index, PageEncoding::Raw, &[fill; PAGE]);
                }
                1 => {
                    let index = self.index();
                    self.page(index, PageEncoding::Zero, &[]);
                }
                2 => {
                    // A payload that does not fit its encoding (unless it is an empty zero page).
                    let index = self.index();
                    let encoding = if self.byte() & 1 == 0 {
                        PageEncoding::Raw
                    } else {
                        PageEncoding::Zero
                    };
                    let len = usize::from(self.byte());
                    let payload = self.bytes(len);
                    self.page(index, encoding, payload);
                }
                3 => {
                    let fill = self.byte();
                    for index in 0..PAGES {
                        self.page(index, PageEncoding::Raw, &[fill ^ index as u8; PAGE]);
                    }
                }
                4 => {
                    let twist = self.byte();
                    let (round, pages) = if twist & 0x80 == 0 {
                        (self.round, self.pages_in_round)
                    } else {
                        (
                            self.round.wrapping_add(u32::from(twist & 3)),
                            self.pages_in_round + u64::from(twist >> 2 & 3),
                        )
                    };
                    Frame::RoundEnd { round, pages }.emit(&mut self.stream);
                    self.round = self.round.wrapping_add(1);
                    self.pages_in_round = 0;
                }
                5 => {
                    let len = usize::from(self.byte());
                    let state = self.bytes(len);
                    Frame::DeviceState(state).emit(&mut self.stream);
                }
                6 => {
                    let twist = self.byte();
                    let rounds = if twist & 0x80 == 0 {
                        self.round.wrapping_sub(1)
                    } else {
                        self.u64() as u32
                    };
                    Frame::Switchover {
                        rounds,
                        digest_follows: twist & 1 == 0,
                    }
                    .emit(&mut self.stream);
                }
                7 => {
                    let digest = if self.byte() & 0x80 == 0 {
                        memory_digest(&self.memory, PAGE)
                    } else {
                        self.u64()
                    };
                    Frame::Complete { digest }.emit(&mut self.stream);
                }
                8 => self.stray_frame(),
                _ => {
                    // Bytes as they are: garbage, or a frame cut short.
                    let len = usize::from(self.byte());
                    let raw = self.bytes(len);
                    self.stream.extend_from_slice(raw);
                }
            }
        }
        self.stream
    }

    /// A well-formed frame that a source does not send at this point, or at all.
    fn stray_frame(&mut self) {
        let frame = match self.byte() % 5 {
            0 => Frame::Hello(Hello {
                version: u16::from(self.byte()),
                page_shift: 12 + self.byte() % 10,
                page_count: self.u64() % (2 * PAGES),
                features: u64::from(self.byte() & 1),
            }),
            1 => Frame::Accept {
                version: PROTOCOL_VERSION,
                features: 0,
            },
            2 => Frame::Ready,
            3 => Frame::Verified {
                verdict: match self.byte() % 3 {
                    0 => Verdict::Mismatch,
                    1 => Verdict::Match,
                    _ => Verdict::NotChecked,
                },
                digest: self.u64(),
            },
            _ => {
                let code = match self.byte() % 7 {
                    0 => AbortCode::Unspecified,
                    1 => AbortCode::BadFrame,
                    2 => AbortCode::Incompatible,
                    3 => AbortCode::HostFailure,
                    4 => AbortCode::DigestMismatch,
                    5 => AbortCode::Cancelled,
                    _ => AbortCode::ProtocolViolation,
                };
                let len = usize::from(self.byte());
                Frame::Abort {
                    code,
                    message: self.bytes(len),
                }
            }
        };
        frame.emit(&mut self.stream);
    }
}

/// Checks that the receiver's replies are whole frames of the kinds a destination sends, with at
/// most one abort, last.
fn check_replies(replies: &[u8]) {
    let mut at = 0;
    let mut aborted = false;
    while at < replies.len() {
        let (frame, len) = match Frame::parse(&replies[at..]) {
            Ok(parsed) => parsed,
            Err(e) => panic!("the receiver sent an undecodable reply at byte {at}: {e}"),
        };
        assert!(!aborted, "the receiver replied after its abort");
        match frame.kind() {
            FrameKind::Accept | FrameKind::Ready | FrameKind::Verified => {}
            FrameKind::Abort => aborted = true,
            kind => panic!("the receiver sent a {kind:?} frame"),
        }
        at += len;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let chunk = 1usize << (control & CHUNK_SHIFT);
    let config = ReceiverConfig {
        verify: control & VERIFY_OFF == 0,
        max_device_state: if control & SMALL_STATE != 0 {
            SMALL_STATE_LIMIT
        } else {
            ReceiverConfig::default().max_device_state
        },
    };
    let mode = control >> 6;
    let stream = match mode {
        0 => rest.to_vec(),
        1 => {
            let mut stream = Vec::new();
            hello(&mut stream);
            let at = stream.len();
            stream.extend_from_slice(rest);
            fix_checksums(&mut stream[at..]);
            stream
        }
        _ => {
            let mut script = Script {
                input: rest,
                stream: Vec::new(),
                memory: vec![0; PAGES as usize * PAGE],
                round: 1,
                pages_in_round: 0,
            };
            hello(&mut script.stream);
            script.run()
        }
    };

    let geometry = Geometry::new(PageSize::DEFAULT, PAGES).expect("a valid geometry");
    let mut receiver = Receiver::new(geometry, config);
    let mut guest = Guest::new(mode == 3);
    let mut pending = Vec::new();
    let mut replies = Vec::new();
    let mut consumed = 0u64;
    let mut failure = None;
    for (step, bytes) in (0u64..).zip(stream.chunks(chunk)) {
        pending.extend_from_slice(bytes);
        match receiver.receive(Nanos::from_micros(step), &pending, &mut guest, &mut replies) {
            Ok(used) => {
                assert!(
                    used <= pending.len(),
                    "consumed {used} of {} bytes",
                    pending.len()
                );
                pending.drain(..used);
                consumed += used as u64;
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                failure = Some(e);
                break;
            }
        }
    }
    check_replies(&replies);

    if let Some(first) = failure {
        assert_eq!(receiver.status(), ReceiverStatus::Failed);
        let sent = replies.len();
        let again = receiver.receive(Nanos::from_secs(1), &pending, &mut guest, &mut replies);
        assert_eq!(again, Err(first), "a failed receiver changed its error");
        assert_eq!(replies.len(), sent, "a failed receiver replied again");
    } else {
        assert_ne!(receiver.status(), ReceiverStatus::Failed);
        assert_eq!(receiver.bytes_received(), consumed);
    }

    let started = matches!(
        receiver.status(),
        ReceiverStatus::Running | ReceiverStatus::Complete
    );
    if started {
        assert!(guest.started, "the receiver runs a guest it never started");
        assert!(receiver.started_at().is_some());
    }
    if guest.started && config.verify {
        assert_eq!(
            receiver.digest(),
            guest.digest_at_start,
            "the receiver's digest is not that of the memory it wrote"
        );
    }
});
