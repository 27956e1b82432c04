//! Fuzzes the XBZRLE delta decoder, [`xbzrle::decode`] (what [`DeltaDecoder`] runs on a
//! destination's current copy of a page), with arbitrary payloads.
//!
//! The first two input bytes pick the page length (1 to 8192 bytes, so runs near and past the
//! 0x3fff limit and pages shorter than a run are reachable), the next byte seeds the old copy; the
//! rest is the payload. The target checks that:
//! - a refused payload leaves the page exactly as it was and has a non-empty message;
//! - re-encoding an accepted payload's old → new with [`xbzrle::encode`] gives a payload that
//!   decodes to the same page, and the encoder gives up only on runs over 0x3fff bytes;
//! - the [`PageDecoder`] wrapper agrees with the function.

#![no_main]

use libfuzzer_sys::fuzz_target;
use memferry::codec::xbzrle::{self, DeltaDecoder};
use memferry::codec::PageDecoder;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let len = 1 + (u16::from_le_bytes([data[0], data[1]]) as usize % 8192);
    let fill = data[2];
    let payload = &data[3..];
    let old: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ fill)
        .collect();

    let mut page = old.clone();
    let result = xbzrle::decode(payload, &mut page);
    let mut wrapped = old.clone();
    let via_trait = DeltaDecoder.decode(0, payload, &mut wrapped);
    assert_eq!(
        result.map_err(|e| e.as_str()),
        via_trait,
        "trait and function disagree"
    );
    assert_eq!(page, wrapped);
    match result {
        Err(e) => {
            assert_eq!(page, old, "a refused payload changed the page");
            assert!(!e.to_string().is_empty());
        }
        Ok(()) => {
            // Room for the worst case (every other byte changed: 3 bytes per 2).
            let mut out = vec![0u8; 2 * len + 16];
            if let Some(n) = xbzrle::encode(&old, &page, &mut out) {
                let mut again = old.clone();
                xbzrle::decode(&out[..n], &mut again).expect("the encoder's payload decodes");
                assert_eq!(again, page, "re-encoded delta decodes to another page");
            } else {
                assert!(
                    len > 0x3fff,
                    "only pages over 0x3fff bytes can have runs that long"
                );
            }
        }
    }
});
