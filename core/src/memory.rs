//! The traits a host supplies: small enough to implement in an afternoon (vm-memory's style).
//!
//! Source side: [`PageRead`] (copy a page out), [`DirtyLog`] (fetch-and-clear the pages written
//! since the last sync, region by region) and [`SourceGuest`] (pause, resume, and the CPU/device
//! state as opaque bytes). Destination side: [`PageWrite`] and [`DestinationGuest`].
//! [`SourceHost`] is all three source traits as one object-safe trait, for strategies.
//!
//! Pages are named by their dense index ([`crate::page::MemoryLayout`]): region after region,
//! holes skipped. A host with several regions maps it back with `MemoryLayout::locate`.
//!
//! Implementations live in the std adapters (an mmap region with a workload, vm-memory, KVM) and
//! in tests (a `Vec<u8>`).

use alloc::vec::Vec;

use crate::bitmap::DirtyBitmap;
use crate::error::HostError;
use crate::page::{MemoryLayout, PageIndex, Region};

/// Reads guest pages on the source.
pub trait PageRead {
    /// Copies page `page` into `buf`, whose length is the page size. The engine only asks for
    /// pages inside the layout it was given.
    ///
    /// While the guest runs, its vCPUs write the same bytes concurrently: copy with volatile or
    /// atomic loads (as `memferry-std`'s `GuestMemory` does), never with a plain
    /// `copy_nonoverlapping` from memory another thread writes, which is undefined behaviour
    /// in Rust. A torn page is harmless: the dirty log sends it again.
    fn read_page(&mut self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError>;

    /// Whether the host knows, without reading it, that page `page` is all zeroes (memory the
    /// guest never touched, a balloon's free pages). The engine then sends a zero page without
    /// reading or scanning it. The default knows nothing.
    fn is_known_zero(&mut self, page: PageIndex) -> bool {
        let _ = page;
        false
    }
}

/// Writes guest pages on the destination.
pub trait PageWrite {
    /// Writes `data` (one whole, already decoded and checked page) to page `page`. The receiver
    /// has already checked that `page` lies inside the guest.
    fn write_page(&mut self, page: PageIndex, data: &[u8]) -> Result<(), HostError>;

    /// Makes page `page` all zeroes. `zeroes` is one page of zero bytes, kept by the caller so
    /// no page allocates. The default writes it through [`PageWrite::write_page`]; a host whose
    /// fresh memory is zero may do less.
    fn write_zero_page(&mut self, page: PageIndex, zeroes: &[u8]) -> Result<(), HostError> {
        self.write_page(page, zeroes)
    }
}

/// The guest's dirty log on the source.
pub trait DirtyLog {
    /// ORs into `into` every page of `region` written since the previous sync of that region,
    /// and clears the region's log (KVM's `KVM_GET_DIRTY_LOG` for one memslot, or vm-memory's
    /// per-region bitmap). Bit `first_page + i` of `into` is page `i` of the region
    /// (`DirtyBitmap::or_words_at(first_page, words)` puts a KVM bitmap there, at any offset).
    /// The first call after migration starts may report everything; that is harmless.
    fn sync_region(
        &mut self,
        region: &Region,
        first_page: u64,
        into: &mut DirtyBitmap,
    ) -> Result<(), HostError>;

    /// The migration starts (after the handshake, before round 1): turn dirty logging on
    /// (KVM: `KVM_MEM_LOG_DIRTY_PAGES` on every memslot). Default: a log that always runs.
    fn start_logging(&mut self, layout: &MemoryLayout) -> Result<(), HostError> {
        let _ = layout;
        Ok(())
    }

    /// The migration is over, whatever the outcome (done, failed, cancelled): turn dirty
    /// logging off, so a guest that runs on here does not pay for it. Called once. Default:
    /// nothing.
    fn stop_logging(&mut self) {}

    /// What dirty tracking cost since the last call (time syncing and clearing the log), for
    /// the round's report: dirty tracking is a metric, not a hidden stall. Default: unknown.
    fn take_cost(&mut self) -> Option<DirtyCost> {
        None
    }
}

/// Time a host spent on dirty tracking ([`DirtyLog::take_cost`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirtyCost {
    /// Fetching the log (`KVM_GET_DIRTY_LOG`, harvesting a ring).
    pub sync: crate::time::Nanos,
    /// Re-arming it (`KVM_CLEAR_DIRTY_LOG`, ring resets, write-protecting again).
    pub clear: crate::time::Nanos,
}

/// Syncs every region of `layout` into `into`.
pub fn sync_all<D: DirtyLog + ?Sized>(
    layout: &MemoryLayout,
    log: &mut D,
    into: &mut DirtyBitmap,
) -> Result<(), HostError> {
    for (i, region) in layout.regions().iter().enumerate() {
        log.sync_region(region, layout.first_page(i), into)?;
    }
    Ok(())
}

/// Where a pause the engine asked for stands ([`SourceGuest::request_pause`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseProgress {
    /// The vCPUs are parked: no page changes from now on.
    Parked,
    /// The vCPUs have been asked to stop and have not all confirmed yet.
    Pending,
}

/// How often the engine asks whether a pending pause completed ([`SourceGuest::poll_pause`]):
/// `poll_timeout` returns this much after the last call while a pause is pending.
pub const PAUSE_POLL_INTERVAL: crate::time::Nanos = crate::time::Nanos(50_000);

/// Control of the guest on the source.
pub trait SourceGuest {
    /// Stops the guest's vCPUs (and anything else that writes its memory). After it returns,
    /// no page changes until [`SourceGuest::resume`].
    fn pause(&mut self) -> Result<(), HostError>;
    /// Lets a paused guest run again (after a failed migration, before the switchover: the
    /// source loses nothing). Also called for a pause still under way
    /// ([`SourceGuest::request_pause`] returned [`PauseProgress::Pending`]): cancel it.
    fn resume(&mut self) -> Result<(), HostError>;
    /// Asks the guest to pause, for a host whose vCPUs park asynchronously (a VMM signals its
    /// vCPU threads and learns later that they left `KVM_RUN`): return
    /// [`PauseProgress::Pending`] and the engine sends nothing more, polls
    /// [`SourceGuest::poll_pause`] (every [`PAUSE_POLL_INTERVAL`] of its clock, through
    /// `poll_timeout`) and goes on with stop-and-copy once it reports
    /// [`PauseProgress::Parked`], failing the migration (and resuming the guest) if that takes
    /// longer than the session's `pause_timeout`. The downtime counts from the request.
    /// Default: the synchronous [`SourceGuest::pause`], parked on return.
    fn request_pause(&mut self) -> Result<PauseProgress, HostError> {
        self.pause().map(|()| PauseProgress::Parked)
    }
    /// Whether a pause [`SourceGuest::request_pause`] left pending has completed: after
    /// `Parked`, no page changes until [`SourceGuest::resume`]. Default: parked.
    fn poll_pause(&mut self) -> Result<PauseProgress, HostError> {
        Ok(PauseProgress::Parked)
    }
    /// How long the last [`SourceGuest::pause`] took to park the guest (signalling vCPUs out of
    /// `KVM_RUN` and waiting for them), measured by the host: it is part of the downtime and
    /// the report shows it. Default: unknown.
    fn last_pause_time(&self) -> Option<crate::time::Nanos> {
        None
    }
    /// The paused guest's CPU and device state, as opaque bytes for the destination.
    fn save_state(&mut self) -> Result<Vec<u8>, HostError>;
    /// The size the device state will have, if the host knows it before pausing: a state the
    /// destination cannot take is then refused before the guest pauses, not in the downtime.
    fn device_state_size_hint(&mut self) -> Option<u64> {
        None
    }

    /// Slows the guest's vCPUs to `percent` of their time taken away (QEMU's auto-converge):
    /// the migration asks when the guest dirties memory faster than the link carries it and
    /// its policy says throttle. 0 lifts the throttle (the migration ends: done or failed).
    /// Default: not supported (the migration then stops the rounds instead).
    fn throttle(&mut self, percent: u8) -> Result<(), HostError> {
        let _ = percent;
        Err(HostError::new("this host cannot throttle its guest"))
    }
}

/// Control of the guest on the destination.
pub trait DestinationGuest {
    /// Installs the CPU and device state that the source saved.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), HostError>;
    /// Starts the guest: memory and state are all in place.
    fn start(&mut self) -> Result<(), HostError>;

    /// Copies page `page` back out of guest memory into `buf` (one page), for a verification
    /// that reads what the host really wrote ([`crate::receive::DestinationConfig::read_back`]):
    /// a page written at a wrong offset shows. Default: not supported.
    fn read_back(&mut self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError> {
        let _ = (page, buf);
        Err(HostError::new(
            "this destination host cannot read pages back (DestinationGuest::read_back)",
        ))
    }
}

/// Everything a source host offers, as one object-safe trait (strategies take `&mut dyn
/// SourceHost`). Implemented for every type with the three source traits.
pub trait SourceHost: PageRead + DirtyLog + SourceGuest {}

impl<T: PageRead + DirtyLog + SourceGuest + ?Sized> SourceHost for T {}
