//! The destination side of a migration: a sans-IO state machine that applies frames through
//! [`PageWrite`] and [`DestinationGuest`], and answers the source.
//!
//! It rejects, with a typed error and an abort frame for the source: undecodable frames and bad
//! checksums, pages outside the guest, payloads that do not match their encoding, round markers
//! out of order or with the wrong page count, frames out of protocol order, a switchover before
//! every page has arrived, and a memory digest that differs from the source's. It never writes
//! outside the guest and never allocates from a length it has not checked.

use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use crate::bitmap::DirtyBitmap;
use crate::digest::{page_hash, DigestBuilder};
use crate::error::MigrationError;
use crate::memory::{DestinationGuest, PageWrite};
use crate::page::{Geometry, PageIndex};
use crate::time::Nanos;
use crate::wire::{Frame, FrameKind, PageEncoding, Verdict, WireError, PROTOCOL_VERSION};

/// Settings of the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiverConfig {
    /// Keep a hash of every page as it is written (8 bytes per page) so the digest the source
    /// sends can be checked. Default on.
    pub verify: bool,
    /// The most CPU/device state accepted, in bytes. Default 64 MiB.
    pub max_device_state: usize,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            verify: true,
            max_device_state: 64 << 20,
        }
    }
}

/// Where the destination stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReceiverStatus {
    /// Waiting for the source's hello.
    AwaitingHello,
    /// Receiving memory.
    Receiving,
    /// The guest has been started; waiting for the source's digest.
    Running,
    /// Finished: the digest matched (or verification is off).
    Complete,
    /// Failed; see the error returned.
    Failed,
}

/// Iterative pre-copy (and stop-and-copy), destination side.
pub struct Receiver {
    geometry: Geometry,
    config: ReceiverConfig,
    status: ReceiverStatus,
    failure: Option<MigrationError>,
    /// The round whose pages are arriving, from 1.
    round: u32,
    pages_in_round: u64,
    received: DirtyBitmap,
    page_hashes: Vec<u64>,
    zero_hash: u64,
    /// One page of zeroes, for hosts to copy from.
    zero_page: Vec<u8>,
    device_state: Vec<u8>,
    device_state_seen: bool,
    digest: Option<u64>,
    verdict: Option<Verdict>,
    pages_received: u64,
    bytes_received: u64,
    started_at: Option<Nanos>,
}

impl Receiver {
    /// A destination for a guest of `geometry` (its memory already exists on this side).
    pub fn new(geometry: Geometry, config: ReceiverConfig) -> Self {
        let pages = geometry.page_count();
        Receiver {
            geometry,
            config,
            status: ReceiverStatus::AwaitingHello,
            failure: None,
            round: 1,
            pages_in_round: 0,
            received: DirtyBitmap::new(pages),
            page_hashes: if config.verify {
                vec![0; pages as usize]
            } else {
                Vec::new()
            },
            zero_hash: page_hash(&vec![0u8; geometry.page_size().bytes()]),
            zero_page: vec![0u8; geometry.page_size().bytes()],
            device_state: Vec::new(),
            device_state_seen: false,
            digest: None,
            verdict: None,
            pages_received: 0,
            bytes_received: 0,
            started_at: None,
        }
    }

    /// Where the migration stands.
    pub fn status(&self) -> ReceiverStatus {
        self.status
    }

    /// Page frames applied so far (re-sends included).
    pub fn pages_received(&self) -> u64 {
        self.pages_received
    }

    /// Bytes of frames consumed so far.
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received
    }

    /// The destination's memory digest, captured when the guest started.
    pub fn digest(&self) -> Option<u64> {
        self.digest
    }

    /// The verdict on the source's digest: `None` until a digest arrived (or if the source
    /// sends none), `NotChecked` when this side keeps no page hashes.
    pub fn verdict(&self) -> Option<Verdict> {
        self.verdict
    }

    /// When the guest was started (the `now` passed with the switchover frame).
    pub fn started_at(&self) -> Option<Nanos> {
        self.started_at
    }

    /// Takes bytes from the source, applies every whole frame in them, and appends replies to
    /// `out`. Returns the bytes consumed: keep the rest and pass it again with more.
    /// On error an abort frame is in `out` and every later call returns the same error.
    pub fn receive<H>(
        &mut self,
        now: Nanos,
        input: &[u8],
        host: &mut H,
        out: &mut Vec<u8>,
    ) -> Result<usize, MigrationError>
    where
        H: PageWrite + DestinationGuest,
    {
        if let Some(e) = &self.failure {
            return Err(e.clone());
        }
        let mut used = 0;
        while used < input.len() {
            let (frame, len) = match Frame::parse(&input[used..]) {
                Ok(parsed) => parsed,
                Err(WireError::Incomplete { .. }) => break,
                Err(e) => return self.fail(e.into(), out),
            };
            used += len;
            self.bytes_received += len as u64;
            if let Err(e) = self.on_frame(now, frame, host, out) {
                return self.fail(e, out);
            }
        }
        Ok(used)
    }

    /// Gives up (the transport closed, or an operator asked): appends an abort frame.
    pub fn cancel(&mut self, why: &str, out: &mut Vec<u8>) -> MigrationError {
        match self.fail::<()>(MigrationError::Cancelled(why.to_string()), out) {
            Err(e) => e,
            Ok(()) => unreachable!("fail always returns an error"),
        }
    }

    fn fail<T>(&mut self, error: MigrationError, out: &mut Vec<u8>) -> Result<T, MigrationError> {
        if let Some(first) = &self.failure {
            return Err(first.clone());
        }
        error.emit_abort(out);
        self.status = ReceiverStatus::Failed;
        self.failure = Some(error.clone());
        Err(error)
    }

    fn unexpected(&self, got: FrameKind) -> MigrationError {
        MigrationError::UnexpectedFrame {
            expected: match self.status {
                ReceiverStatus::AwaitingHello => "Hello",
                ReceiverStatus::Receiving => "Page, RoundEnd, DeviceState or Switchover",
                ReceiverStatus::Running => "Complete",
                _ => "nothing more",
            },
            got,
        }
    }

    fn on_frame<H>(
        &mut self,
        now: Nanos,
        frame: Frame<'_>,
        host: &mut H,
        out: &mut Vec<u8>,
    ) -> Result<(), MigrationError>
    where
        H: PageWrite + DestinationGuest,
    {
        if let Frame::Abort { code, message } = frame {
            return Err(MigrationError::PeerAborted {
                code,
                message: String::from_utf8_lossy(message).into_owned(),
            });
        }
        match (self.status, frame) {
            (ReceiverStatus::AwaitingHello, Frame::Hello(hello)) => {
                let ours = self.geometry;
                let mut problems = Vec::new();
                if hello.version != PROTOCOL_VERSION {
                    problems.push(alloc::format!(
                        "protocol version {} (this side speaks {PROTOCOL_VERSION})",
                        hello.version
                    ));
                }
                if hello.page_shift as u32 != ours.page_size().shift() {
                    problems.push(alloc::format!(
                        "page size {} (this side has {})",
                        1u64 << hello.page_shift,
                        ours.page_size().bytes()
                    ));
                }
                if hello.page_count != ours.page_count() {
                    problems.push(alloc::format!(
                        "{} pages (this side has {})",
                        hello.page_count,
                        ours.page_count()
                    ));
                }
                if hello.features != 0 {
                    problems.push(alloc::format!(
                        "features {:#x} (this side supports none)",
                        hello.features
                    ));
                }
                if !problems.is_empty() {
                    return Err(MigrationError::Incompatible(alloc::format!(
                        "source offers {}",
                        problems.join(", ")
                    )));
                }
                Frame::Accept {
                    version: PROTOCOL_VERSION,
                    features: 0,
                }
                .emit(out);
                self.status = ReceiverStatus::Receiving;
                Ok(())
            }
            (
                ReceiverStatus::Receiving,
                Frame::Page {
                    index,
                    encoding,
                    payload,
                },
            ) => self.apply_page(index, encoding, payload, host),
            (ReceiverStatus::Receiving, Frame::RoundEnd { round, pages }) => {
                if round != self.round {
                    return Err(MigrationError::RoundMismatch {
                        round,
                        reason: "round markers must count up from 1",
                    });
                }
                if pages != self.pages_in_round {
                    return Err(MigrationError::RoundMismatch {
                        round,
                        reason: "page count differs from the pages received",
                    });
                }
                self.round = self.round.saturating_add(1);
                self.pages_in_round = 0;
                Ok(())
            }
            (ReceiverStatus::Receiving, Frame::DeviceState(bytes)) => {
                if self.pages_in_round != 0 {
                    return Err(MigrationError::RoundMismatch {
                        round: self.round,
                        reason: "device state inside an open round",
                    });
                }
                if self.device_state.len() + bytes.len() > self.config.max_device_state {
                    return Err(MigrationError::Incompatible(alloc::format!(
                        "device state exceeds this side's limit of {} bytes",
                        self.config.max_device_state
                    )));
                }
                self.device_state.extend_from_slice(bytes);
                self.device_state_seen = true;
                Ok(())
            }
            (
                ReceiverStatus::Receiving,
                Frame::Switchover {
                    rounds,
                    digest_follows,
                },
            ) => {
                if !self.device_state_seen {
                    return Err(self.unexpected(FrameKind::Switchover));
                }
                if rounds.checked_add(1) != Some(self.round) {
                    return Err(MigrationError::RoundMismatch {
                        round: rounds,
                        reason: "switchover names a different round count",
                    });
                }
                let missing = self.geometry.page_count() - self.received.count_ones();
                if missing != 0 {
                    return Err(MigrationError::BadPagePayload {
                        page: self.received_gap(),
                        reason: if missing == 1 {
                            "never received before switchover"
                        } else {
                            "and others never received before switchover"
                        },
                    });
                }
                host.restore_state(&self.device_state)?;
                if self.config.verify {
                    let mut builder = DigestBuilder::new();
                    for &h in &self.page_hashes {
                        builder.push_page_hash(h);
                    }
                    self.digest = Some(builder.finish());
                }
                host.start()?;
                self.started_at = Some(now);
                Frame::Ready.emit(out);
                // Without a digest to come, the migration is over once the guest runs.
                self.status = if digest_follows {
                    ReceiverStatus::Running
                } else {
                    ReceiverStatus::Complete
                };
                Ok(())
            }
            (ReceiverStatus::Running, Frame::Complete { digest }) => {
                let ours = self.digest;
                let verdict = match ours {
                    None => Verdict::NotChecked,
                    Some(d) if d == digest => Verdict::Match,
                    Some(_) => Verdict::Mismatch,
                };
                Frame::Verified {
                    verdict,
                    digest: ours.unwrap_or(0),
                }
                .emit(out);
                self.verdict = Some(verdict);
                if verdict == Verdict::Mismatch {
                    return Err(MigrationError::DigestMismatch {
                        source: digest,
                        destination: ours.unwrap_or_default(),
                    });
                }
                self.status = ReceiverStatus::Complete;
                Ok(())
            }
            (_, frame) => Err(self.unexpected(frame.kind())),
        }
    }

    /// The first page never received (for the error message).
    fn received_gap(&self) -> u64 {
        (0..self.geometry.page_count())
            .find(|&p| !self.received.get(p))
            .unwrap_or(0)
    }

    fn apply_page<H: PageWrite>(
        &mut self,
        index: u64,
        encoding: PageEncoding,
        payload: &[u8],
        host: &mut H,
    ) -> Result<(), MigrationError> {
        if !self.geometry.contains(PageIndex(index)) {
            return Err(MigrationError::PageOutOfRange {
                page: index,
                page_count: self.geometry.page_count(),
            });
        }
        let page_size = self.geometry.page_size().bytes();
        let hash = match encoding {
            PageEncoding::Raw => {
                if payload.len() != page_size {
                    return Err(MigrationError::BadPagePayload {
                        page: index,
                        reason: "raw payload is not one page long",
                    });
                }
                host.write_page(PageIndex(index), payload)?;
                if self.config.verify {
                    page_hash(payload)
                } else {
                    0
                }
            }
            PageEncoding::Zero => {
                if !payload.is_empty() {
                    return Err(MigrationError::BadPagePayload {
                        page: index,
                        reason: "zero page with a payload",
                    });
                }
                host.write_zero_page(PageIndex(index), &self.zero_page)?;
                self.zero_hash
            }
        };
        if self.config.verify {
            self.page_hashes[index as usize] = hash;
        }
        self.received.set(index);
        self.pages_in_round += 1;
        self.pages_received += 1;
        Ok(())
    }
}
