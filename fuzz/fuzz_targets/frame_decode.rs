//! Fuzzes the frame decoder, [`Frame::parse`] / [`Frame::parse_with`], with arbitrary bytes read
//! as a stream.
//!
//! The first input byte picks the mode; the rest is the stream. Bit 0: [`fix_checksums`] first
//! gives every checked frame the stream lays out a valid checksum, so that the per-kind body
//! checks behind the checksum are fuzzed as well. Bit 1: decode under
//! [`ChecksumPolicy::Optional`] (checksums negotiated off) instead of `Required`.
//!
//! Frames are consumed one after another until the stream ends, is incomplete, or is malformed
//! (a stream reader stops there too). For every frame that parses, the target checks that:
//! - the length it reports is the one in the header and lies within the input;
//! - under `Required`, the frame carried a checksum;
//! - its variable parts are walkable: `Pages` entries (each payload inside the frame, the walk
//!   ends after at most `count` entries or one error), the hello's region table (its length,
//!   page count, and building a [`MemoryLayout`] from it as a destination would), the u64/u128
//!   lists of `PageRequest`, `Need`, `Have` and `ReceivedSet`;
//! - the frame re-emits ([`Frame::emit_with`], checked as it was) to bytes that parse back to an
//!   equal frame, and those bytes are the input bytes exactly, except where the encoding is
//!   canonicalised: an `Abort` with an unknown code or a message longer than
//!   [`MAX_ABORT_MESSAGE`], a known frame marked ignorable (re-emitted without the mark), and an
//!   ignored frame of an unknown kind (which emits nothing).
//!
//! Every error must be `Display`-able and an `Incomplete` must ask for more than was given.

#![no_main]

use libfuzzer_sys::fuzz_target;
use memferry::page::{MemoryLayout, PageSize};
use memferry::wire::{
    peek_frame_len, ChecksumPolicy, Frame, WireError, FLAG_IGNORABLE, FLAG_UNCHECKED, HEADER_LEN,
    MAX_ABORT_MESSAGE, MAX_FRAME_LEN, PAGE_ENTRY_LEN, TRAILER_LEN,
};
use memferry_fuzz::{fix_checksums, frame_checksum};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let policy = if mode & 2 == 0 {
        ChecksumPolicy::Required
    } else {
        ChecksumPolicy::Optional
    };
    if mode & 1 == 0 {
        decode_stream(stream, 0, policy);
    } else {
        let mut fixed = stream.to_vec();
        let valid = fix_checksums(&mut fixed);
        decode_stream(&fixed, valid, policy);
    }
});

/// Decodes frames from `stream` until it ends or fails; the first `valid` bytes are frames with
/// correct checksums (or none).
fn decode_stream(stream: &[u8], valid: usize, policy: ChecksumPolicy) {
    let mut rest = stream;
    while !rest.is_empty() {
        match Frame::parse_with(rest, policy) {
            Ok((frame, len)) => {
                assert!(
                    (HEADER_LEN..=MAX_FRAME_LEN).contains(&len) && len <= rest.len(),
                    "parse reported a {len}-byte frame in {} bytes of input",
                    rest.len()
                );
                assert_eq!(
                    peek_frame_len(rest),
                    Ok(Some(len)),
                    "header and parse disagree"
                );
                let checked = rest[5] & FLAG_UNCHECKED == 0;
                if checked {
                    let sum = frame_checksum(&rest[..len - TRAILER_LEN]);
                    assert_eq!(
                        rest[len - TRAILER_LEN..len],
                        sum.to_le_bytes(),
                        "a checked frame parsed with a wrong checksum"
                    );
                }
                // Known finding (see the fuzz report): an unknown kind marked ignorable is
                // skipped before the checksum policy is applied, so an unchecked `Ignored`
                // frame parses under `Required`. Every other frame must carry a checksum there.
                if policy == ChecksumPolicy::Required && !matches!(frame, Frame::Ignored { .. }) {
                    assert!(checked, "an unchecked {frame:?} parsed under Required");
                }
                walk(&frame, &rest[..len]);
                check_round_trip(&frame, &rest[..len], checked, policy);
                rest = &rest[len..];
            }
            Err(WireError::Incomplete { needed }) => {
                assert!(
                    needed > rest.len(),
                    "Incomplete asks for {needed} bytes but {} were given",
                    rest.len()
                );
                break;
            }
            Err(error) => {
                let at = stream.len() - rest.len();
                assert!(
                    at >= valid || !matches!(error, WireError::BadChecksum { .. }),
                    "fix_checksums no longer computes the wire checksum"
                );
                assert!(!error.to_string().is_empty());
                break;
            }
        }
    }
}

/// Walks the variable parts of `frame` (parsed from `original`) and checks their bounds.
fn walk(frame: &Frame<'_>, original: &[u8]) {
    let within = |part: &[u8]| {
        let (start, end) = (
            original.as_ptr() as usize,
            original.as_ptr() as usize + original.len(),
        );
        let p = part.as_ptr() as usize;
        assert!(
            part.is_empty() || (p >= start && p + part.len() <= end),
            "a view points outside its frame"
        );
    };
    match *frame {
        Frame::Hello(hello) => {
            assert!(!hello.regions.is_empty());
            assert_eq!(hello.regions.iter().count(), hello.regions.len());
            let pages = hello
                .regions
                .iter()
                .fold(0u64, |n, r| n.saturating_add(r.pages));
            assert_eq!(hello.page_count(), pages);
            // What a destination (or a tool) does with a hello's table: must not panic.
            if let Ok(size) = PageSize::new(1u64 << hello.page_shift) {
                if let Ok(layout) = MemoryLayout::new(size, hello.regions.iter().collect()) {
                    assert_eq!(layout.page_count(), pages);
                    assert_eq!(layout.regions().len(), hello.regions.len());
                }
            } else {
                panic!("a hello with page shift {} parsed", hello.page_shift);
            }
        }
        Frame::Pages { entries, .. } => {
            let mut ok = 0u32;
            let mut errors = 0u32;
            let mut payload_bytes = 0usize;
            for entry in entries.iter() {
                assert_eq!(errors, 0, "the entry walk went on after an error");
                match entry {
                    Ok(e) => {
                        within(e.payload);
                        payload_bytes += PAGE_ENTRY_LEN + e.payload.len();
                        ok += 1;
                    }
                    Err(e) => {
                        assert!(!e.to_string().is_empty());
                        errors += 1;
                    }
                }
            }
            assert!(ok + errors <= entries.count(), "more entries than counted");
            assert!(ok <= entries.count());
            if errors == 0 {
                assert_eq!(
                    ok,
                    entries.count(),
                    "the walk stopped early without an error"
                );
            }
            assert!(payload_bytes <= original.len());
        }
        Frame::PageRequest(list) | Frame::Need(list) => {
            assert_eq!(list.iter().count(), list.len());
        }
        Frame::Have(list) => {
            assert_eq!(list.iter().count(), list.len());
        }
        Frame::ReceivedSet { bits, words, .. } => {
            assert_eq!(words.iter().count(), words.len());
            assert_eq!(bits.div_ceil(64), words.len() as u64);
        }
        Frame::DeviceState(bytes) => within(bytes),
        Frame::Abort { message, .. } => within(message),
        _ => {}
    }
}

/// Re-emits `frame`, which was parsed from `original`, and checks the encoding round-trips.
fn check_round_trip(frame: &Frame<'_>, original: &[u8], checked: bool, policy: ChecksumPolicy) {
    let mut again = Vec::new();
    let len = frame.emit_with(&mut again, checked);
    assert_eq!(
        len,
        again.len(),
        "emit returned a length other than it wrote"
    );
    if let Frame::Ignored { kind } = *frame {
        assert_eq!(len, 0, "an ignored frame of kind {kind} re-emitted");
        assert!(original[5] & FLAG_IGNORABLE != 0);
        return;
    }
    let (reparsed, used) = match Frame::parse_with(&again, policy) {
        Ok(parsed) => parsed,
        Err(e) => panic!("re-emitted {frame:?} does not parse: {e}"),
    };
    assert_eq!(
        used,
        again.len(),
        "the re-emitted frame parses to a different length"
    );
    let ignorable = original[5] & FLAG_IGNORABLE != 0;

    if let Frame::Abort { code, message } = *frame {
        // The code was already canonicalised by the first parse; the message may be cut.
        let kept = &message[..message.len().min(MAX_ABORT_MESSAGE)];
        assert_eq!(
            reparsed,
            Frame::Abort {
                code,
                message: kept
            }
        );
        let wire_code = u16::from_le_bytes([original[HEADER_LEN], original[HEADER_LEN + 1]]);
        if wire_code == code as u16 && message.len() <= MAX_ABORT_MESSAGE && !ignorable {
            assert_eq!(
                again, original,
                "a canonical abort re-encodes byte for byte"
            );
        }
    } else {
        assert_eq!(reparsed, *frame, "the re-emitted frame parses differently");
        if ignorable {
            // Re-emitted without the mark: the same bytes but for the flag and the checksum.
            assert_eq!(again.len(), original.len());
            let end = original.len() - if checked { TRAILER_LEN } else { 0 };
            assert_eq!(again[..5], original[..5]);
            assert_eq!(again[6..end], original[6..end]);
        } else {
            assert_eq!(again, original, "the frame re-encodes to different bytes");
        }
    }
}
