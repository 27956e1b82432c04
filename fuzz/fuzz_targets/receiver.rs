//! Fuzzes the destination state machine, [`Destination`], for a guest of two regions of 8 pages
//! of 4 KiB with a hole between them (16 dense pages), over 1 to 3 channels.
//!
//! The guest is a `Vec<u8>` behind [`PageWrite`] and [`DestinationGuest`] that asserts what the
//! destination promises its host: every write is a whole page inside the guest, no page is
//! written once the guest runs, the device state respects the configured limit and is restored
//! before the start, the guest starts once and only after every page arrived, and the digest the
//! destination keeps is that of the memory written. Bytes reach the destination channel by
//! channel, in chunks the input picks, through per-channel buffers that keep the unconsumed tail
//! as a real driver does. The destination must never panic, must account every consumed byte,
//! must keep failing with the same error once failed (on every channel, and through
//! `handle_timeout`), and its replies must be well-formed frames in protocol order, with an
//! abort last exactly when it failed.
//!
//! Input: byte 0 configures the run, byte 1 the source being played, the rest is the stream or
//! the script.
//! - byte 0 bits 0-1, the mode: `0` the rest is raw segments (`channel`, `len` u16, bytes),
//!   from the first byte on; `1` a valid hello and joins for this guest first, then raw segments
//!   each with the checksums of the frames it lays out fixed ([`fix_checksums`]); `2` and `3` a
//!   valid hello and joins, then the rest read as a script for a multi-channel source
//!   ([`Script`]) whose frames are emitted with valid checksums, so that the fuzzer reaches
//!   rounds, late pages of other channels, switchover and completion.
//! - byte 0 bit 2: verification off; bit 3: a 100-byte device-state limit; bit 4: the
//!   destination refuses checksums; bit 5: the source does not offer them; bit 6: a host that
//!   fails to write the last page; bit 7: end with a peer timeout.
//! - byte 1 bits 0-1: channels announced, 1 + n % 3; bits 2-5: chunk size for the final flush,
//!   `1 << n` bytes; bits 6-7: the session id.

#![no_main]

use libfuzzer_sys::fuzz_target;
use memferry::digest::memory_digest;
use memferry::error::MigrationError;
use memferry::prelude::*;
use memferry::wire::{
    self, AbortCode, ChannelRole, ChecksumPolicy, Encoding, Frame, FrameKind, Hello, PagesWriter,
    Verdict, FEATURE_CHANNELS, FEATURE_CHECKSUM, FLAG_IGNORABLE, PROTOCOL_VERSION,
};
use memferry_fuzz::{fix_checksums, frame_checksum, layout, regions, Input, PAGE};

const PAGES_EACH: u64 = 8;
const PAGES: u64 = 2 * PAGES_EACH;
const SMALL_STATE_LIMIT: usize = 100;
/// Channel ids the input may name: the announced ones and at least one more.
const CHANNEL_IDS: usize = 4;

const VERIFY_OFF: u8 = 0x04;
const SMALL_STATE: u8 = 0x08;
const DEST_NO_CHECKSUM: u8 = 0x10;
const SOURCE_NO_CHECKSUM: u8 = 0x20;
const FAILING_HOST: u8 = 0x40;
const TIMEOUT_AT_END: u8 = 0x80;

/// The destination guest: memory in a `Vec`, and a record of what the destination did with it.
struct Guest {
    memory: Vec<u8>,
    written: [bool; PAGES as usize],
    state: Option<Vec<u8>>,
    state_limit: usize,
    started: bool,
    fail_last_page: bool,
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
        assert!(
            state.len() <= self.state_limit,
            "a device state of {} bytes, over the limit of {}",
            state.len(),
            self.state_limit
        );
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
        Ok(())
    }
}

/// The destination, its guest, and the driver's buffers.
struct Run {
    dest: Destination,
    guest: Guest,
    /// Per channel id: bytes delivered but not yet consumed.
    pending: Vec<Vec<u8>>,
    replies: Vec<u8>,
    consumed: u64,
    failure: Option<MigrationError>,
    micros: u64,
}

impl Run {
    fn now(&mut self) -> Nanos {
        self.micros += 1;
        Nanos::from_micros(self.micros)
    }

    /// Delivers `bytes` on channel `ch`, as a driver does when they arrive.
    fn deliver(&mut self, ch: usize, bytes: &[u8]) {
        if self.failure.is_some() || bytes.is_empty() {
            return;
        }
        let now = self.now();
        let buf = &mut self.pending[ch];
        buf.extend_from_slice(bytes);
        match self.dest.handle_input(now, ch as u16, buf, &mut self.guest) {
            Ok(used) => {
                assert!(used <= buf.len(), "consumed {used} of {} bytes", buf.len());
                buf.drain(..used);
                self.consumed += used as u64;
                assert_ne!(self.dest.status(), DestinationStatus::Failed);
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                assert_eq!(self.dest.status(), DestinationStatus::Failed);
                assert_eq!(self.dest.failure(), Some(&e));
                self.failure = Some(e);
            }
        }
        self.dest.drain_replies(&mut self.replies);
    }

    /// Delivers `bytes` on `ch` in chunks of `chunk` bytes.
    fn deliver_chunked(&mut self, ch: usize, bytes: &[u8], chunk: usize) {
        for piece in bytes.chunks(chunk.max(1)) {
            self.deliver(ch, piece);
        }
    }
}

/// The hello of a source of this guest, with `channels` connections.
fn hello(out: &mut Vec<u8>, channels: u16, session_id: u64, features: u64) {
    let mut table = Vec::new();
    Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        page_shift: PAGE.trailing_zeros() as u8,
        channels,
        session_id,
        features,
        regions: wire::region_table(&regions(PAGES_EACH), &mut table),
    })
    .emit(out);
}

/// A `Pages` frame of `generation` with the entries `(index, encoding, payload)`.
fn pages_frame(out: &mut Vec<u8>, generation: u32, checksum: bool, entries: &[(u64, u8, &[u8])]) {
    let room = entries
        .iter()
        .map(|e| wire::PAGE_ENTRY_LEN + e.2.len())
        .sum::<usize>()
        + wire::FRAME_OVERHEAD
        + wire::PAGES_HEADER_LEN;
    let mut buf = vec![0u8; room];
    let mut w = PagesWriter::new(&mut buf, generation, checksum).expect("room for a frame");
    for &(index, encoding, payload) in entries {
        let slot = w
            .begin_page(index, payload.len())
            .expect("room for the entry");
        slot.copy_from_slice(payload);
        w.commit_page(Encoding(encoding), payload.len());
    }
    let len = w.finish();
    out.extend_from_slice(&buf[..len]);
}

/// Plays a source that mostly follows the protocol over several channels: it counts each
/// channel's rounds and page entries, so its page generations, round markers and switchover are
/// right unless the script asks for them to be wrong, and it knows the digest of what the
/// destination wrote. Frames queue per channel and reach the destination when the script
/// delivers them (whole or in part, channel by channel), so channels interleave as the input
/// says.
struct Script<'a> {
    input: Input<'a>,
    run: Run,
    channels: usize,
    checksum: bool,
    session_id: u64,
    /// Per channel id: frames emitted, not yet delivered.
    transport: Vec<Vec<u8>>,
    round: Vec<u32>,
    pages_in_round: Vec<u64>,
    /// Device state bytes emitted on channel 0 so far (what an honest switchover announces).
    state_bytes: u64,
}

impl Script<'_> {
    /// A channel: mostly an announced one, sometimes one that was not.
    fn channel(&mut self) -> usize {
        let b = self.input.byte();
        if b & 0xf0 == 0xf0 {
            usize::from(b) % CHANNEL_IDS
        } else {
            usize::from(b) % self.channels
        }
    }

    fn index(&mut self) -> u64 {
        u64::from(self.input.byte()) % (PAGES + 2)
    }

    /// The generation for pages on `ch`: its open round, or sometimes another.
    fn generation(&mut self, ch: usize) -> u32 {
        let b = self.input.byte();
        let round = self.round[ch];
        match b >> 5 {
            0 => round.wrapping_sub(1),
            1 => round.wrapping_add(1),
            2 => u32::from(b),
            _ => round,
        }
    }

    fn emit(&mut self, ch: usize, frame: Frame<'_>) {
        frame.emit_with(&mut self.transport[ch], self.checksum);
    }

    fn pages(&mut self, ch: usize, generation: u32, entries: &[(u64, u8, &[u8])]) {
        pages_frame(&mut self.transport[ch], generation, self.checksum, entries);
        self.pages_in_round[ch] += entries.len() as u64;
    }

    fn deliver(&mut self, ch: usize, amount: usize) {
        let n = amount.min(self.transport[ch].len());
        let bytes: Vec<u8> = self.transport[ch].drain(..n).collect();
        self.run.deliver(ch, &bytes);
    }

    fn flush(&mut self, chunk: usize) {
        for ch in 0..CHANNEL_IDS {
            let bytes = std::mem::take(&mut self.transport[ch]);
            self.run.deliver_chunked(ch, &bytes, chunk);
        }
    }

    fn run(&mut self, chunk: usize) {
        while !self.input.is_empty() && self.run.failure.is_none() {
            match self.input.byte() % 12 {
                0 => {
                    let ch = self.channel();
                    let generation = self.generation(ch);
                    let index = self.index();
                    let fill = [self.input.byte(); PAGE];
                    self.pages(ch, generation, &[(index, 0, &fill)]);
                }
                1 => {
                    let ch = self.channel();
                    let generation = self.generation(ch);
                    let index = self.index();
                    self.pages(ch, generation, &[(index, 1, &[])]);
                }
                2 => {
                    // A payload that does not fit its encoding (or an unknown encoding).
                    let ch = self.channel();
                    let generation = self.generation(ch);
                    let index = self.index();
                    let encoding = self.input.byte() % 4;
                    let len = usize::from(self.input.byte());
                    let payload = self.input.bytes(len);
                    self.pages(ch, generation, &[(index, encoding, payload)]);
                }
                3 => {
                    // A whole round: every page, spread over the channels, then the markers.
                    let fill = self.input.byte();
                    let spread = self.input.byte();
                    let data: Vec<[u8; PAGE]> =
                        (0..PAGES).map(|p| [fill ^ p as u8; PAGE]).collect();
                    for ch in 0..self.channels {
                        let entries: Vec<(u64, u8, &[u8])> = (0..PAGES)
                            .filter(|&p| (p as usize + usize::from(spread)) % self.channels == ch)
                            .map(|p| {
                                if data[p as usize][0] == 0 {
                                    (p, 1, &[][..])
                                } else {
                                    (p, 0, &data[p as usize][..])
                                }
                            })
                            .collect();
                        if !entries.is_empty() {
                            let generation = self.round[ch];
                            self.pages(ch, generation, &entries);
                        }
                    }
                    for ch in 0..self.channels {
                        self.round_end(ch, 0);
                    }
                }
                4 => {
                    let ch = self.channel();
                    let twist = self.input.byte();
                    self.round_end(ch, twist);
                }
                5 => {
                    let b = self.input.byte();
                    let ch = if b & 0x80 == 0 { 0 } else { self.channel() };
                    let len = usize::from(self.input.byte()) * usize::from(b & 3);
                    let state = self.input.bytes(len);
                    if ch == 0 {
                        self.state_bytes += state.len() as u64;
                    }
                    self.emit(ch, Frame::DeviceState(state));
                }
                6 => {
                    let twist = self.input.byte();
                    let rounds = match twist >> 6 {
                        0 => self.input.u64() as u32,
                        1 => self.round[0],
                        _ => self.round[0].wrapping_sub(1),
                    };
                    let ch = if twist & 0x20 != 0 { self.channel() } else { 0 };
                    self.emit(
                        ch,
                        Frame::Switchover {
                            rounds,
                            digest_follows: twist & 1 == 0,
                            pages_follow: twist & 0x40 != 0,
                            // Mostly honest; sometimes off by one (a lost chunk).
                            device_state_len: self.state_bytes + u64::from(twist & 0x10 != 0),
                            check_before_start: twist & 0x08 != 0,
                        },
                    );
                }
                7 => {
                    // Everything sent so far arrives first, so the digest is the written one.
                    self.flush(chunk);
                    let digest = if self.input.byte() & 0x80 == 0 {
                        memory_digest(&self.run.guest.memory, PAGE)
                    } else {
                        self.input.u128()
                    };
                    self.emit(0, Frame::Complete { digest });
                }
                8 => {
                    let ch = self.channel();
                    self.stray_frame(ch);
                }
                9 => {
                    // Bytes as they are: garbage, or a frame cut short.
                    let ch = self.channel();
                    let len = usize::from(self.input.byte());
                    let raw = self.input.bytes(len);
                    self.transport[ch].extend_from_slice(raw);
                }
                _ => {
                    let ch = self.channel();
                    let b = self.input.byte();
                    let amount = if b == 0xff { usize::MAX } else { 1 << (b % 16) };
                    self.deliver(ch, amount);
                }
            }
        }
        self.flush(chunk);
    }

    /// The round marker of channel `ch`; a non-zero `twist` may make it wrong.
    fn round_end(&mut self, ch: usize, twist: u8) {
        let mut round = self.round[ch];
        let mut channel = ch as u16;
        let mut pages = self.pages_in_round[ch];
        match twist & 0x83 {
            0x80 => round = round.wrapping_add(1),
            0x81 => channel = channel.wrapping_add(1),
            0x82 => pages += 1,
            0x83 => pages = pages.wrapping_sub(1),
            _ => {}
        }
        self.emit(
            ch,
            Frame::RoundEnd {
                round,
                channel,
                pages,
            },
        );
        self.round[ch] = self.round[ch].wrapping_add(1);
        self.pages_in_round[ch] = 0;
    }

    /// A well-formed frame that a source does not send at this point, or at all.
    fn stray_frame(&mut self, ch: usize) {
        let mut list = Vec::new();
        let mut table = Vec::new();
        let kind = self.input.byte();
        let frame = match kind % 12 {
            0 => {
                let mut r = regions(PAGES_EACH);
                let tweak = self.input.byte();
                r[usize::from(tweak & 1)].pages += u64::from(tweak >> 4);
                Frame::Hello(Hello {
                    version: PROTOCOL_VERSION,
                    page_shift: 12 + self.input.byte() % 10,
                    channels: u16::from(self.input.byte()),
                    session_id: self.session_id,
                    features: u64::from(self.input.byte()),
                    regions: wire::region_table(&r, &mut table),
                })
            }
            1 => Frame::Accept {
                version: PROTOCOL_VERSION,
                features: 0,
                max_device_state: 0,
            },
            2 => {
                let b = self.input.byte();
                Frame::Join {
                    channel: if b & 1 == 0 {
                        ch as u16
                    } else {
                        u16::from(b >> 1)
                    },
                    session_id: if b & 0x80 == 0 {
                        self.session_id
                    } else {
                        self.input.u64()
                    },
                    role: if b & 0x40 == 0 {
                        ChannelRole::Bulk
                    } else {
                        ChannelRole::Urgent
                    },
                }
            }
            3 => Frame::Ready,
            4 => Frame::Verified {
                verdict: match self.input.byte() % 3 {
                    0 => Verdict::Mismatch,
                    1 => Verdict::Match,
                    _ => Verdict::NotChecked,
                },
                digest: self.input.u128(),
            },
            5 => {
                let code = match self.input.byte() % 8 {
                    0 => AbortCode::Unspecified,
                    1 => AbortCode::BadFrame,
                    2 => AbortCode::Incompatible,
                    3 => AbortCode::HostFailure,
                    4 => AbortCode::DigestMismatch,
                    5 => AbortCode::Cancelled,
                    6 => AbortCode::Timeout,
                    _ => AbortCode::ProtocolViolation,
                };
                let len = usize::from(self.input.byte());
                Frame::Abort {
                    code,
                    message: self.input.bytes(len),
                }
            }
            6 => {
                let n = usize::from(self.input.byte() % 4);
                let values: Vec<u64> = (0..n).map(|_| self.input.u64() % 20).collect();
                Frame::PageRequest(wire::u64_list(&values, &mut list))
            }
            7 => {
                let values = [self.input.u64() % 20];
                Frame::Need(wire::u64_list(&values, &mut list))
            }
            8 => {
                let values = [self.input.u128()];
                Frame::Have(wire::u128_list(&values, &mut list))
            }
            9 => Frame::ReceivedSet {
                first_page: 0,
                bits: 16,
                words: wire::u64_list(&[self.input.u64()], &mut list),
            },
            10 => {
                // A frame of a later version, marked ignorable.
                let at = self.transport[ch].len();
                let out = &mut self.transport[ch];
                out.extend_from_slice(&[0, 0, 0, 0, 100 + kind % 100, FLAG_IGNORABLE, 0, 0, 1, 2]);
                let len = (out.len() - at + wire::TRAILER_LEN) as u32;
                out[at..at + 4].copy_from_slice(&len.to_le_bytes());
                let sum = frame_checksum(&out[at..]);
                out.extend_from_slice(&sum.to_le_bytes());
                return;
            }
            _ => {
                // A round marker without a checksum, whatever was negotiated.
                let (round, pages) = (self.round[ch], self.pages_in_round[ch]);
                Frame::RoundEnd {
                    round,
                    channel: ch as u16,
                    pages,
                }
                .emit_with(&mut self.transport[ch], false);
                self.round[ch] = self.round[ch].wrapping_add(1);
                self.pages_in_round[ch] = 0;
                return;
            }
        };
        self.emit(ch, frame);
    }
}

/// Checks that the destination's replies are whole frames of the kinds a destination sends, in
/// protocol order (Accept first, Ready once, Verified after Ready), with an abort last exactly
/// when it failed (unless the source aborted first: an abort is not answered). Returns whether
/// it sent Ready.
fn check_replies(replies: &[u8], failure: Option<&MigrationError>) -> bool {
    let mut at = 0;
    let (mut accepted, mut ready, mut verified, mut aborted) = (false, false, false, false);
    while at < replies.len() {
        let (frame, len) = match Frame::parse_with(&replies[at..], ChecksumPolicy::Optional) {
            Ok(parsed) => parsed,
            Err(e) => panic!("the destination sent an undecodable reply at byte {at}: {e}"),
        };
        assert!(!aborted, "the destination replied after its abort");
        match frame.kind() {
            Some(FrameKind::Accept) => {
                assert!(!accepted, "two accepts");
                accepted = true;
            }
            Some(FrameKind::Ready) => {
                assert!(accepted && !ready, "Ready without an accept, or twice");
                ready = true;
            }
            Some(FrameKind::Verified) => {
                assert!(ready && !verified, "Verified before Ready, or twice");
                verified = true;
            }
            Some(FrameKind::Abort) => aborted = true,
            kind => panic!("the destination sent a {kind:?} frame"),
        }
        at += len;
    }
    let answered = failure.is_some_and(|e| !matches!(e, MigrationError::PeerAborted { .. }));
    assert_eq!(
        aborted, answered,
        "an abort reply iff the destination failed"
    );
    ready
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let control = input.byte();
    let setup = input.byte();
    let mode = control & 3;
    let channels = 1 + usize::from(setup & 3) % 3;
    let chunk = 1usize << ((setup >> 2) & 0x0f);
    let session_id = u64::from(setup >> 6).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let config = DestinationConfig {
        verify: control & VERIFY_OFF == 0,
        max_device_state: if control & SMALL_STATE != 0 {
            SMALL_STATE_LIMIT
        } else {
            DestinationConfig::default().max_device_state
        },
        checksum: control & DEST_NO_CHECKSUM == 0,
        ..DestinationConfig::default()
    };
    let mut features = FEATURE_CHANNELS;
    if control & SOURCE_NO_CHECKSUM == 0 {
        features |= FEATURE_CHECKSUM;
    }
    let checksum = config.checksum && features & FEATURE_CHECKSUM != 0;

    let mut run = Run {
        dest: Destination::new(layout(PAGES_EACH), config),
        guest: Guest {
            memory: vec![0; PAGES as usize * PAGE],
            written: [false; PAGES as usize],
            state: None,
            state_limit: config.max_device_state,
            started: false,
            fail_last_page: control & FAILING_HOST != 0,
        },
        pending: vec![Vec::new(); CHANNEL_IDS],
        replies: Vec::new(),
        consumed: 0,
        failure: None,
        micros: 0,
    };

    if mode != 0 {
        // The valid prefix: hello on channel 0, then each extra channel's join.
        let mut prefix = Vec::new();
        hello(&mut prefix, channels as u16, session_id, features);
        run.deliver(0, &prefix);
        for ch in 1..channels {
            let mut join = Vec::new();
            Frame::Join {
                channel: ch as u16,
                session_id,
                role: ChannelRole::Bulk,
            }
            .emit(&mut join);
            run.deliver(ch, &join);
        }
        assert!(run.failure.is_none(), "the valid prefix failed");
        assert_eq!(run.dest.status(), DestinationStatus::Receiving);
        assert_eq!(usize::from(run.dest.channels()), channels);
    }

    match mode {
        0 | 1 => {
            // Raw segments: channel, length, bytes.
            while !input.is_empty() && run.failure.is_none() {
                let ch = usize::from(input.byte()) % CHANNEL_IDS;
                let len = usize::from(u16::from_le_bytes([input.byte(), input.byte()]));
                let mut segment = input.bytes(len).to_vec();
                if mode == 1 {
                    fix_checksums(&mut segment);
                }
                run.deliver_chunked(ch, &segment, chunk);
            }
        }
        _ => {
            let mut script = Script {
                input,
                run,
                channels,
                checksum,
                session_id,
                transport: vec![Vec::new(); CHANNEL_IDS],
                round: vec![1; CHANNEL_IDS],
                pages_in_round: vec![0; CHANNEL_IDS],
                state_bytes: 0,
            };
            script.run(chunk);
            run = script.run;
        }
    }

    if control & TIMEOUT_AT_END != 0 && run.failure.is_none() {
        let before = run.dest.status();
        let later = Nanos::from_micros(run.micros) + Nanos::from_secs(61);
        match run.dest.handle_timeout(later) {
            Ok(()) => assert_eq!(run.dest.status(), before),
            Err(e) => {
                assert!(matches!(e, MigrationError::Timeout { .. }), "{e}");
                assert_eq!(run.dest.status(), DestinationStatus::Failed);
                run.failure = Some(e);
            }
        }
        run.dest.drain_replies(&mut run.replies);
    }

    let ready = check_replies(&run.replies, run.failure.as_ref());
    if let Some(first) = run.failure.clone() {
        // Failed for good: the same error on every channel and through the timer, no replies.
        let sent = run.replies.len();
        for ch in 0..CHANNEL_IDS {
            let now = run.now();
            let again = run
                .dest
                .handle_input(now, ch as u16, &run.pending[ch], &mut run.guest);
            assert_eq!(
                again,
                Err(first.clone()),
                "a failed destination changed its error"
            );
        }
        assert_eq!(run.dest.handle_timeout(Nanos::from_secs(1 << 30)), Ok(()));
        assert_eq!(run.dest.poll_timeout(), None);
        assert_eq!(run.dest.status(), DestinationStatus::Failed);
        run.dest.drain_replies(&mut run.replies);
        assert_eq!(
            run.replies.len(),
            sent,
            "a failed destination replied again"
        );
    } else {
        assert_ne!(run.dest.status(), DestinationStatus::Failed);
        assert_eq!(run.dest.bytes_received(), run.consumed);
    }

    let started = matches!(
        run.dest.status(),
        DestinationStatus::Running | DestinationStatus::Complete
    );
    if started {
        assert!(
            run.guest.started,
            "the destination runs a guest it never started"
        );
    }
    assert_eq!(run.guest.started, run.dest.started_at().is_some());
    assert_eq!(run.guest.started, ready, "Ready sent iff the guest started");
    if run.guest.started && config.verify {
        assert_eq!(
            run.dest.digest(),
            Some(memory_digest(&run.guest.memory, PAGE)),
            "the destination's digest is not that of the memory it wrote"
        );
    }
});
