//! # memferry: the memory transfer of live VM migration, as a library
//!
//! This crate is the deterministic core. It has no clock, no I/O and no threads: time enters as
//! an argument ([`time::Nanos`]), bytes enter and leave as slices, and guest memory is reached
//! through the small traits of [`memory`]. The same engine therefore runs in a virtual-time
//! simulator, over TCP with a real clock (crate `memferry-std`), and inside a hypervisor.
//!
//! Modules:
//! - [`page`], [`time`]: page geometry and index; nanoseconds and byte rates.
//! - [`bitmap`]: dirty bitmaps in KVM's layout, plain and atomic.
//! - [`memory`]: the traits a host supplies (read/write a page, sync the dirty log, pause).
//! - [`wire`]: the frame format, with checked zero-copy decoding.
//! - [`schedule`]: Clark's round bandwidth rule, dirty rate and the stop rules.
//! - [`migrate`]: the source-side strategies (pre-copy today).
//! - [`receive`]: the destination state machine.
//! - [`track`]: writable-working-set predictors (WSClock, LRU, splay tree, history).
//! - [`report`]: the metrics every migration reports.
//! - [`digest`]: the whole-memory digest both sides agree on.
//! - [`model`]: analytic time models (Clark's geometric series, paper 000's Tmig), lower bounds.
//! - [`policy`]: paper 000's host-load metric, overload detection and VM placement.
//!
//! ## Driving the core from a hypervisor
//! ```
//! use memferry::prelude::*;
//!
//! // A toy guest: 16 pages of 4 KiB in a Vec, nothing dirtied while migrating.
//! struct Guest { mem: Vec<u8>, dirty: DirtyBitmap }
//! impl PageRead for Guest {
//!     fn read_page(&mut self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError> {
//!         let at = page.0 as usize * buf.len();
//!         buf.copy_from_slice(&self.mem[at..at + buf.len()]);
//!         Ok(())
//!     }
//! }
//! impl DirtyLog for Guest {
//!     fn sync(&mut self, into: &mut DirtyBitmap) -> Result<(), HostError> {
//!         into.union_with(&self.dirty);
//!         self.dirty.clear();
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
//! let geometry = Geometry::new(PageSize::DEFAULT, 16).unwrap();
//! let mut guest = Guest { mem: (0..16 * 4096).map(|i| i as u8).collect(), dirty: DirtyBitmap::new(16) };
//! let mut target = Target { mem: vec![0; 16 * 4096], state: Vec::new() };
//! let mut source = PreCopySource::new(geometry, PreCopyConfig::default());
//! let mut dest = Receiver::new(geometry, ReceiverConfig::default());
//!
//! // The "transport": two byte vectors. A real driver writes `to_dest` to a socket.
//! let (mut to_dest, mut to_source) = (Vec::new(), Vec::new());
//! let mut now = Nanos::ZERO;
//! loop {
//!     match source.poll(now, &mut guest, &mut to_dest).unwrap() {
//!         Poll::Done => break,
//!         _ => {}
//!     }
//!     let used = dest.receive(now, &to_dest, &mut target, &mut to_source).unwrap();
//!     to_dest.drain(..used);
//!     let used = source.receive(now, &to_source, &mut guest, &mut to_dest).unwrap();
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
pub mod digest;
pub mod error;
pub mod memory;
pub mod migrate;
pub mod model;
pub mod page;
pub mod policy;
pub mod receive;
pub mod report;
pub mod schedule;
pub mod time;
pub mod track;
pub mod wire;

/// The names most users need, in one import.
pub mod prelude {
    pub use crate::bitmap::{AtomicDirtyBitmap, DirtyBitmap};
    pub use crate::error::{HostError, MigrationError};
    pub use crate::memory::{DestinationGuest, DirtyLog, PageRead, PageWrite, SourceGuest};
    pub use crate::migrate::{Poll, PreCopyConfig, PreCopySource};
    pub use crate::page::{Geometry, PageIndex, PageSize};
    pub use crate::receive::{Receiver, ReceiverConfig, ReceiverStatus};
    pub use crate::report::{MigrationReport, RoundReport, StopReason};
    pub use crate::schedule::{RatePlan, StopRules};
    pub use crate::time::{ByteRate, Nanos};
    pub use crate::track::{Predictor, PredictorKind};
    pub use alloc::vec::Vec;
}
