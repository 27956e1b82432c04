//! The traits a host supplies: small enough to implement in an afternoon (vm-memory's style).
//!
//! Source side: [`PageRead`] (copy a page out), [`DirtyLog`] (fetch-and-clear the pages written
//! since the last sync) and [`SourceGuest`] (pause, resume, and the CPU/device state as opaque
//! bytes). Destination side: [`PageWrite`] and [`DestinationGuest`].
//!
//! Implementations live in the std adapters (an mmap region with a workload, vm-memory, KVM) and
//! in tests (a `Vec<u8>`).

use alloc::vec::Vec;

use crate::bitmap::DirtyBitmap;
use crate::error::HostError;
use crate::page::PageIndex;

/// Reads guest pages on the source.
pub trait PageRead {
    /// Copies page `page` into `buf`, whose length is the page size. The engine only asks for
    /// pages inside the geometry it was given.
    fn read_page(&mut self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError>;

    /// Whether the host knows, without reading it, that page `page` is all zeroes (memory the
    /// guest never touched, a balloon's free pages). The engine then sends a zero-page frame
    /// without reading or scanning the page. The default knows nothing.
    fn is_known_zero(&mut self, page: PageIndex) -> bool {
        let _ = page;
        false
    }
}

/// Writes guest pages on the destination.
pub trait PageWrite {
    /// Writes `data` (one whole page) to page `page`. The receiver has already checked that
    /// `page` lies inside the guest.
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
    /// ORs into `into` every page written since the previous sync, and clears the log (KVM's
    /// `KVM_GET_DIRTY_LOG` plus clear, or vm-memory's `get_and_reset`). The first call after
    /// migration starts may report everything; that is harmless.
    fn sync(&mut self, into: &mut DirtyBitmap) -> Result<(), HostError>;
}

/// Control of the guest on the source.
pub trait SourceGuest {
    /// Stops the guest's vCPUs (and anything else that writes its memory). After it returns,
    /// no page changes until [`SourceGuest::resume`].
    fn pause(&mut self) -> Result<(), HostError>;
    /// Lets a paused guest run again (after a failed migration: the source loses nothing).
    fn resume(&mut self) -> Result<(), HostError>;
    /// The paused guest's CPU and device state, as opaque bytes for the destination.
    fn save_state(&mut self) -> Result<Vec<u8>, HostError>;
}

/// Control of the guest on the destination.
pub trait DestinationGuest {
    /// Installs the CPU and device state that the source saved.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), HostError>;
    /// Starts the guest: memory and state are all in place. If the source's digest then turns
    /// out to differ (the receiver returns `DigestMismatch`), the source guest resumes and this
    /// guest must be discarded by the caller.
    fn start(&mut self) -> Result<(), HostError>;
}
