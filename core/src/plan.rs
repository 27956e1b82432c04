//! Deciding which pages go is the engine's; reading and encoding them can be anyone's, on any
//! thread. A [`PagePlan`] is one buffer's worth of pages the engine chose for one channel
//! ([`crate::session::Source::poll_plan`]); [`PagePlan::encode`] is a pure function of the
//! pages it reads and its encoder's state, so a driver runs one per channel on N threads.
//!
//! Reading a page later than the engine chose it is safe: the dirty log has recorded every
//! write since the sync that put the page in the round, so newer content is sent again if it
//! changes again, and generations on the destination keep a later round's copy over an earlier
//! one whichever thread read first. The final round reads a paused guest.

use alloc::vec::Vec;

use crate::codec::{self, PageEncoder};
use crate::error::HostError;
use crate::page::PageIndex;
use crate::session::ChannelId;
use crate::wire::{self, Encoding, PagesWriter};

/// Reads guest pages from any thread: guest memory a hypervisor maps shared. Copy with atomic or
/// volatile loads while the guest runs (see [`crate::memory::PageRead`]).
pub trait SharedPageRead: Sync {
    /// Copies page `page` into `buf` (one page long).
    fn read_page_shared(&self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError>;

    /// Whether the host knows, without reading, that `page` is all zeroes. Default: no.
    fn is_known_zero_shared(&self, page: PageIndex) -> bool {
        let _ = page;
        false
    }
}

/// One buffer's worth of pages the engine chose for one channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PagePlan {
    pub(crate) channel: ChannelId,
    pub(crate) generation: u32,
    pub(crate) checksum: bool,
    pub(crate) page_size: usize,
    pub(crate) pages: Vec<u64>,
    pub(crate) planned_bytes: usize,
    /// Pages go raw (or zero) whatever encoder the driver offers: after a post-copy
    /// switchover the destination's guest runs and may have changed what a delta or a
    /// reference would build on.
    pub(crate) raw_only: bool,
    /// Hash-first (round 1): content the destination holds, sent as its hash.
    pub(crate) known: Option<alloc::sync::Arc<crate::hashfirst::KnownContent>>,
}

/// What encoding a plan produced, for the engine's report ([`crate::session::Source::on_encoded`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanOutcome {
    /// The plan's channel.
    pub channel: ChannelId,
    /// The round it belongs to.
    pub generation: u32,
    /// The bytes the engine counted for it (every page raw).
    pub planned_bytes: usize,
    /// The bytes it took.
    pub bytes: usize,
    /// Pages sent as zero pages.
    pub zero_pages: u64,
    /// Pages and payload bytes per encoding.
    pub encodings: crate::report::EncodingUse,
}

/// How many raw pages of `page_size` fit in `room` bytes of `Pages` frames, and the bytes they
/// take. Frames are filled as [`PagePlan::encode`] fills them, each as full as it may be.
pub(crate) fn pages_that_fit(room: usize, page_size: usize, checksum: bool) -> (u64, usize) {
    let fixed =
        wire::HEADER_LEN + wire::PAGES_HEADER_LEN + if checksum { wire::TRAILER_LEN } else { 0 };
    let entry = wire::PAGE_ENTRY_LEN + page_size;
    let per_frame = ((wire::MAX_BODY_LEN - wire::PAGES_HEADER_LEN) / entry).max(1);
    let (mut pages, mut used, mut left) = (0u64, 0usize, room);
    while left >= fixed + entry {
        let k = ((left - fixed) / entry).min(per_frame);
        pages += k as u64;
        used += fixed + k * entry;
        left -= fixed + k * entry;
    }
    (pages, used)
}

/// The room `pages` raw pages need in full frames (the inverse of [`pages_that_fit`]).
pub(crate) fn room_for(pages: u64, page_size: usize, checksum: bool) -> usize {
    let fixed =
        wire::HEADER_LEN + wire::PAGES_HEADER_LEN + if checksum { wire::TRAILER_LEN } else { 0 };
    let entry = wire::PAGE_ENTRY_LEN + page_size;
    let per_frame = ((wire::MAX_BODY_LEN - wire::PAGES_HEADER_LEN) / entry).max(1) as u64;
    let frames = pages.div_ceil(per_frame) as usize;
    frames * fixed + pages as usize * entry
}

impl PagePlan {
    /// The channel whose connection the encoded bytes go to.
    pub fn channel(&self) -> ChannelId {
        self.channel
    }

    /// The dense page indices, in the order they are encoded.
    pub fn pages(&self) -> &[u64] {
        &self.pages
    }

    /// The buffer length the plan needs (every page raw).
    pub fn planned_bytes(&self) -> usize {
        self.planned_bytes
    }

    /// Reads the plan's pages from `memory` and encodes them into `buf` as `Pages` frames:
    /// zero pages as headers only, then `encoder`'s choice, else raw. `buf` must hold at least
    /// [`PagePlan::planned_bytes`]; the bytes written never exceed it.
    pub fn encode<M: SharedPageRead + ?Sized>(
        &self,
        memory: &M,
        mut encoder: Option<&mut dyn PageEncoder>,
        scratch: &mut Vec<u8>,
        buf: &mut [u8],
    ) -> Result<PlanOutcome, HostError> {
        let room = buf.len().min(self.planned_bytes);
        let buf = &mut buf[..room];
        if self.raw_only {
            encoder = None;
        }
        if let Some(encoder) = encoder.as_deref_mut() {
            // Each encoder learns the round it encodes for (the same round again is a no-op).
            encoder.begin_generation(self.generation);
        }
        scratch.resize(self.page_size, 0);
        let mut written = 0;
        let mut zero_pages = 0;
        let mut encodings = crate::report::EncodingUse::default();
        let mut next = 0;
        while next < self.pages.len() {
            let Some(mut writer) =
                PagesWriter::new(&mut buf[written..], self.generation, self.checksum)
            else {
                break;
            };
            while let Some(&page) = self.pages.get(next) {
                let index = PageIndex(page);
                let known = self.known.as_deref();
                let encoded = if let Some(known) =
                    known.filter(|_| !memory.is_known_zero_shared(index))
                {
                    // Hash-first: content the destination holds goes as its hash.
                    if !writer.fits(self.page_size) {
                        None
                    } else {
                        memory.read_page_shared(index, scratch)?;
                        match crate::hashfirst::encode_known(&mut writer, page, scratch, known) {
                            Some(e) => Some(e),
                            None => match encoder.as_deref_mut() {
                                Some(encoder) => codec::encode_page(
                                    &mut writer,
                                    page,
                                    Some(scratch),
                                    self.page_size,
                                    encoder,
                                ),
                                None => codec::encode_page(
                                    &mut writer,
                                    page,
                                    Some(scratch),
                                    self.page_size,
                                    &mut codec::Raw,
                                ),
                            },
                        }
                    }
                } else if memory.is_known_zero_shared(index) {
                    // A stateful encoder hears of the zero page too.
                    match encoder.as_deref_mut() {
                        Some(encoder) => {
                            codec::encode_page(&mut writer, page, None, self.page_size, encoder)
                        }
                        None => codec::encode_page(
                            &mut writer,
                            page,
                            None,
                            self.page_size,
                            &mut codec::Raw,
                        ),
                    }
                } else if let Some(encoder) = encoder.as_deref_mut() {
                    if !writer.fits(self.page_size) {
                        None
                    } else {
                        memory.read_page_shared(index, scratch)?;
                        codec::encode_page(
                            &mut writer,
                            page,
                            Some(scratch),
                            self.page_size,
                            encoder,
                        )
                    }
                } else {
                    codec::encode_page_raw(&mut writer, page, self.page_size, |slot| {
                        memory.read_page_shared(index, slot)
                    })?
                };
                let Some(encoded) = encoded else { break };
                if encoded.encoding == Encoding::ZERO {
                    zero_pages += 1;
                }
                encodings.add(
                    encoded.encoding,
                    (encoded.wire_bytes - crate::wire::PAGE_ENTRY_LEN) as u64,
                );
                next += 1;
            }
            let len = writer.finish();
            if len == 0 {
                break;
            }
            written += len;
        }
        debug_assert_eq!(
            next,
            self.pages.len(),
            "a plan's pages always fit its bytes"
        );
        Ok(PlanOutcome {
            channel: self.channel,
            generation: self.generation,
            planned_bytes: self.planned_bytes,
            bytes: written,
            zero_pages,
            encodings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_that_fit_matches_the_writer() {
        for room in [0, 100, 4096, 4200, 1 << 20, (4 << 20) + 77, 9 << 20] {
            for checksum in [false, true] {
                let (pages, used) = pages_that_fit(room, 4096, checksum);
                assert!(used <= room);
                // The writer packs exactly as many raw pages into `room`.
                let mut buf = alloc::vec![0u8; room];
                let mut written = 0;
                let mut packed = 0u64;
                while packed < pages {
                    let mut w = PagesWriter::new(&mut buf[written..], 1, checksum).unwrap();
                    while packed < pages && w.begin_page(packed, 4096).is_some() {
                        w.commit_page(Encoding::RAW, 4096);
                        packed += 1;
                    }
                    written += w.finish();
                }
                assert_eq!(written, used, "room {room}");
            }
        }
    }
}
