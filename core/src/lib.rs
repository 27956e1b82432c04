//! # memferry: the memory transfer of live VM migration, as a library
//!
//! This crate is the deterministic core. It has no clock, no I/O and no threads: time enters as
//! an argument ([`time::Nanos`]), bytes enter and leave as slices, and guest memory is reached
//! through the small traits of [`memory`]. The same engine therefore runs in a virtual-time
//! simulator, over TCP with a real clock (crate `memferry-std`), and inside a hypervisor.
//!
//! Modules:
//! - [`page`], [`time`]: page geometry, the region table ([`page::MemoryLayout`]) and its
//!   dense page index; nanoseconds and byte rates.
//! - [`bitmap`]: dirty bitmaps in KVM's layout, plain and atomic.
//! - [`memory`]: the traits a host supplies (read/write a page, sync the dirty log per region,
//!   pause).
//! - [`wire`]: the frame format (version 2), with checked zero-copy decoding.
//! - [`codec`]: the page encoder/decoder seam (raw and zero built in).
//! - [`plan`]: pages the engine chose, read and encoded by the caller on any thread.
//! - [`schedule`]: Clark's round bandwidth rule, dirty rate, the stop rules, and the link's
//!   delivery-rate estimate.
//! - [`session`]: the source side of a migration: handshake, channels, pacing, timers, the
//!   commit point, the report; output bounded by the caller.
//! - [`strategy`]: what decides which pages go: pre-copy today, behind a trait.
//! - [`receive`]: the destination state machine, with a per-strategy page policy.
//! - [`drive`]: the one reference driver loop, over any [`drive::Link`] (the simulator's, real
//!   connections', the tests').
//! - [`track`]: writable-working-set predictors (WSClock, LRU, splay tree, history).
//! - [`report`]: the metrics every migration reports.
//! - [`digest`]: the order-independent whole-memory digest both sides agree on.
//!
//! ## Driving the core from a hypervisor
//! ```
//! use memferry::prelude::*;
//!
//! // A toy guest: two regions with a hole between them (like two KVM memslots), nothing
//! // dirtied while migrating. Pages are named by their dense index: region 0's 8 pages, then
//! // region 1's 8.
//! struct Guest { mem: Vec<u8>, dirty: DirtyBitmap }
//! impl PageRead for Guest {
//!     fn read_page(&mut self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError> {
//!         let at = page.0 as usize * buf.len();
//!         buf.copy_from_slice(&self.mem[at..at + buf.len()]);
//!         Ok(())
//!     }
//! }
//! impl DirtyLog for Guest {
//!     fn sync_region(&mut self, region: &Region, first_page: u64, into: &mut DirtyBitmap)
//!         -> Result<(), HostError> {
//!         for page in first_page..first_page + region.pages {
//!             if self.dirty.get(page) { into.set(page); self.dirty.unset(page); }
//!         }
//!         Ok(())
//!     }
//! }
//! impl SourceGuest for Guest {
//!     fn pause(&mut self) -> Result<(), HostError> { Ok(()) }
//!     fn resume(&mut self) -> Result<(), HostError> { Ok(()) }
//!     fn save_state(&mut self) -> Result<Vec<u8>, HostError> { Ok(b"vcpu".to_vec()) }
//! }
//! struct Target { mem: Vec<u8>, state: Vec<u8> }
//! impl PageWrite for Target {
//!     fn write_page(&mut self, page: PageIndex, data: &[u8]) -> Result<(), HostError> {
//!         let at = page.0 as usize * data.len();
//!         self.mem[at..at + data.len()].copy_from_slice(data);
//!         Ok(())
//!     }
//! }
//! impl DestinationGuest for Target {
//!     fn restore_state(&mut self, state: &[u8]) -> Result<(), HostError> {
//!         self.state = state.to_vec();
//!         Ok(())
//!     }
//!     fn start(&mut self) -> Result<(), HostError> { Ok(()) }
//! }
//!
//! let layout = MemoryLayout::new(PageSize::DEFAULT, vec![
//!     Region { id: 0, guest_base: 0, pages: 8 },
//!     Region { id: 1, guest_base: 1 << 32, pages: 8 },
//! ]).unwrap();
//! let mut guest = Guest { mem: (0..16 * 4096).map(|i| i as u8).collect(), dirty: DirtyBitmap::new(16) };
//! let mut target = Target { mem: vec![0; 16 * 4096], state: Vec::new() };
//! let mut source = Source::pre_copy(layout.clone(), PreCopyConfig::default());
//! let mut dest = Destination::new(layout, DestinationConfig::default());
//!
//! // The "transport": two byte vectors, and room for 64 KiB per call. A real driver writes
//! // what poll_transmit produced to a socket, and reports deliveries with on_delivered.
//! let (mut to_dest, mut to_source) = (Vec::new(), Vec::new());
//! let mut buf = vec![0u8; 64 << 10];
//! let mut now = Nanos::ZERO;
//! while !source.is_finished() {
//!     let n = source.poll_transmit(now, 0, &mut buf, &mut guest).unwrap();
//!     to_dest.extend_from_slice(&buf[..n]);
//!     let used = dest.handle_input(now, 0, &to_dest, &mut target).unwrap();
//!     to_dest.drain(..used);
//!     let n = dest.poll_transmit(&mut buf);
//!     to_source.extend_from_slice(&buf[..n]);
//!     let used = source.handle_input(now, 0, &to_source, &mut guest).unwrap();
//!     to_source.drain(..used);
//!     now = now + Nanos::from_micros(10);
//! }
//! let report = source.report();
//! assert_eq!(report.verified, Some(true));
//! assert_eq!(target.mem, guest.mem);
//! assert_eq!(target.state, b"vcpu");
//! ```
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

pub mod bitmap;
pub mod codec;
pub mod digest;
pub mod drive;
pub mod error;
pub mod hashfirst;
pub mod memory;
pub mod page;
pub mod plan;
pub mod receive;
pub mod report;
pub mod schedule;
pub mod session;
pub mod strategy;
pub mod time;
pub mod track;
pub mod wire;

/// The names most users need, in one import.
pub mod prelude {
    pub use crate::bitmap::{AtomicDirtyBitmap, DirtyBitmap};
    pub use crate::error::{HostError, HostErrorKind, MigrationError};
    pub use crate::memory::{
        DestinationGuest, DirtyLog, PageRead, PageWrite, PauseProgress, SourceGuest, SourceHost,
    };
    pub use crate::page::{Geometry, MemoryLayout, PageIndex, PageSize, Region};
    pub use crate::receive::{Destination, DestinationConfig, DestinationStatus};
    pub use crate::report::{MigrationReport, RoundReport, StopReason};
    pub use crate::schedule::{RatePlan, StopRules};
    pub use crate::session::{Next, SessionConfig, Source, SourceStatus};
    pub use crate::strategy::{PreCopy, PreCopyConfig, Strategy};
    pub use crate::time::{ByteRate, Nanos};
    pub use crate::track::{Predictor, PredictorKind};
}
