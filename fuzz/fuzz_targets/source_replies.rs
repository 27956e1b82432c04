//! Fuzzes the source side of a migration with whatever a hostile or broken destination could
//! send back: `PreCopySource::receive` at every protocol stage (awaiting the accept, mid-round,
//! awaiting Ready, awaiting the verdict) must never panic, and after any failure the source
//! guest must be running, not paused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memferry::prelude::*;
use memferry_fuzz::fix_checksums;

/// A small guest whose memory is a Vec; it records whether it is paused.
struct Guest {
    mem: Vec<u8>,
    paused: bool,
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
    fn sync(&mut self, into: &mut DirtyBitmap) -> Result<(), HostError> {
        // Page 1 is always being written: rounds keep having work.
        into.set(1);
        Ok(())
    }
}

impl SourceGuest for Guest {
    fn pause(&mut self) -> Result<(), HostError> {
        self.paused = true;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), HostError> {
        self.paused = false;
        Ok(())
    }
    fn save_state(&mut self) -> Result<Vec<u8>, HostError> {
        Ok(b"state".to_vec())
    }
}

const PAGES: u64 = 8;

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let mut input = rest.to_vec();
    if control & 1 == 1 {
        fix_checksums(&mut input);
    }
    // How many polls to run first decides the stage the replies arrive in.
    let polls = (control >> 1) as usize % 24;
    let geometry = Geometry::new(PageSize::DEFAULT, PAGES).unwrap();
    let mut guest = Guest {
        mem: vec![7; (PAGES * 4096) as usize],
        paused: false,
    };
    let config = PreCopyConfig {
        batch_bytes: 4096 * 3,
        stop: StopRules {
            max_rounds: 2,
            ..StopRules::default()
        },
        ..PreCopyConfig::default()
    };
    let mut source = PreCopySource::new(geometry, config);
    let mut out = Vec::new();
    let mut now = Nanos::ZERO;
    // A well-behaved destination first: accept, and Ready after switchover, when the stage
    // calls for them, so the fuzzed bytes land in every state.
    for i in 0..polls {
        now += Nanos::from_micros(100);
        match source.poll(now, &mut guest, &mut out) {
            Ok(Poll::WaitForPeer) if i == 0 => {
                let mut accept = Vec::new();
                memferry::wire::Frame::Accept {
                    version: memferry::wire::PROTOCOL_VERSION,
                    features: 0,
                }
                .emit(&mut accept);
                let _ = source.receive(now, &accept, &mut guest, &mut out);
            }
            Ok(Poll::Done) | Err(_) => break,
            _ => {}
        }
        out.clear();
    }
    // Feed the fuzzed bytes in a few chunks, keeping partial frames for the next, polling in
    // between.
    let mut pending = Vec::new();
    for chunk in input.chunks(7.max(input.len() / 3 + 1)) {
        pending.extend_from_slice(chunk);
        match source.receive(now, &pending, &mut guest, &mut out) {
            Ok(used) => {
                assert!(used <= pending.len());
                pending.drain(..used);
            }
            Err(_) => {
                assert!(
                    !guest.paused,
                    "a failed migration leaves the source guest running"
                );
                assert!(!source.is_paused());
                return;
            }
        }
        now += Nanos::from_micros(100);
        if source.poll(now, &mut guest, &mut out).is_err() {
            assert!(
                !guest.paused,
                "a failed migration leaves the source guest running"
            );
        }
        out.clear();
    }
});
