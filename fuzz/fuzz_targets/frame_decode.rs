//! Fuzzes the frame decoder, [`Frame::parse`], with arbitrary bytes read as a stream.
//!
//! The first input byte picks the mode; the rest is the stream. With an even first byte the
//! stream is decoded as it is. With an odd one, [`fix_checksums`] first gives every frame the
//! stream lays out a valid checksum, so that the per-kind body checks behind the checksum are
//! fuzzed as well.
//!
//! Frames are consumed one after another until the stream ends, is incomplete, or is malformed
//! (a stream reader stops there too). For every frame that parses, the target checks that:
//! - the length it reports is the one in the header and lies within the input;
//! - the frame re-emits ([`Frame::emit`]) and the re-emitted bytes parse back to an equal frame;
//! - the re-emitted bytes are the input bytes exactly, except for an `Abort` whose unknown code
//!   canonicalises to `Unspecified` or whose message is cut to [`MAX_ABORT_MESSAGE`].
//!
//! Every error must be `Display`-able and an `Incomplete` must ask for more than was given.

#![no_main]

use libfuzzer_sys::fuzz_target;
use memferry::wire::{
    peek_frame_len, Frame, WireError, FRAME_OVERHEAD, HEADER_LEN, MAX_ABORT_MESSAGE, MAX_FRAME_LEN,
};
use memferry_fuzz::fix_checksums;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        decode_stream(stream, 0);
    } else {
        let mut fixed = stream.to_vec();
        let valid = fix_checksums(&mut fixed);
        decode_stream(&fixed, valid);
    }
});

/// Decodes frames from `stream` until it ends or fails; the first `valid` bytes are frames with
/// correct checksums.
fn decode_stream(stream: &[u8], valid: usize) {
    let mut rest = stream;
    while !rest.is_empty() {
        match Frame::parse(rest) {
            Ok((frame, len)) => {
                assert!(
                    (FRAME_OVERHEAD..=MAX_FRAME_LEN).contains(&len) && len <= rest.len(),
                    "parse reported a {len}-byte frame in {} bytes of input",
                    rest.len()
                );
                assert_eq!(
                    peek_frame_len(rest),
                    Ok(Some(len)),
                    "header and parse disagree"
                );
                check_round_trip(&frame, &rest[..len]);
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

/// Re-emits `frame`, which was parsed from `original`, and checks the encoding round-trips.
fn check_round_trip(frame: &Frame<'_>, original: &[u8]) {
    let mut again = Vec::new();
    let len = frame.emit(&mut again);
    assert_eq!(
        len,
        again.len(),
        "emit returned a length other than it wrote"
    );
    let (reparsed, used) = match Frame::parse(&again) {
        Ok(parsed) => parsed,
        Err(e) => panic!("re-emitted {frame:?} does not parse: {e}"),
    };
    assert_eq!(
        used,
        again.len(),
        "the re-emitted frame parses to a different length"
    );

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
        if wire_code == code as u16 && message.len() <= MAX_ABORT_MESSAGE {
            assert_eq!(
                again, original,
                "a canonical abort re-encodes byte for byte"
            );
        }
    } else {
        assert_eq!(reparsed, *frame, "the re-emitted frame parses differently");
        assert_eq!(again, original, "the frame re-encodes to different bytes");
    }
}
