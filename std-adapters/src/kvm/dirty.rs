//! KVM dirty logs as memferry's [`DirtyLog`], chosen by [`DirtyLogMode`]:
//!
//! - [`DirtyLogMode::Bitmap`]: `KVM_GET_DIRTY_LOG` per memslot, which returns the bitmap and
//!   write-protects the whole slot again at once.
//! - [`DirtyLogMode::ManualProtect`]: `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with
//!   `KVM_DIRTY_LOG_INITIALLY_SET` (enabling the log protects nothing). `KVM_GET_DIRTY_LOG`
//!   only reads the bitmap; each chunk of pages is re-armed with `KVM_CLEAR_DIRTY_LOG` just
//!   before its first page is read (a [`ReadHook`]), so a page the guest writes between the
//!   sync and its send costs no extra fault, and pages not sent are not re-protected. While the
//!   guest is paused nothing is re-armed (nothing could dirty it): no clearing in the downtime.
//! - [`DirtyLogMode::Ring`]: the per-vCPU dirty ring (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`); a sync
//!   harvests every ring and resets them (`KVM_RESET_DIRTY_RINGS`); a vCPU whose ring fills
//!   harvests it itself ([`DirtyTracker::ring_full_hook`]).
//!
//! Every sync also ORs in and clears vm-memory's own bitmap of the region, so pages the VMM
//! writes (device emulation, an image it loads) are sent too.
//!
//! Logging starts when the tracker is built (the memslots get `KVM_MEM_LOG_DIRTY_PAGES`) and
//! stops in [`DirtyTracker::stop`] or on drop. The time spent syncing, clearing and harvesting
//! is kept per sync ([`DirtySample`]): dirty tracking cost is a metric.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_DIRTY_LOG_PAGE_OFFSET, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;
use memferry::bitmap::DirtyBitmap;
use memferry::error::HostError;
use memferry::memory::DirtyLog;
use memferry::page::Region;
use vm_memory::GuestMemoryBackend;

use super::memory::{HostRegion, KvmMemory, ReadHook};
use super::vcpu::RingFullHook;
use super::vm::Memory;
use super::KvmError;

/// `KVM_CLEAR_DIRTY_LOG`: `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = 0xc018_aec0;
/// `KVM_GET_DIRTY_LOG`: `_IOW(KVMIO, 0x42, struct kvm_dirty_log)`.
const KVM_GET_DIRTY_LOG: libc::c_ulong = 0x4010_ae42;
/// `KVM_RESET_DIRTY_RINGS`: `_IO(KVMIO, 0xc7)`.
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xaec7;
const DIRTY_GFN_DIRTY: u32 = 1;
const DIRTY_GFN_RESET: u32 = 2;

/// Which KVM dirty log a source uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyLogMode {
    /// `KVM_GET_DIRTY_LOG`: fetch and re-protect whole memslots at each sync.
    Bitmap,
    /// Manual protect: fetch at each sync, re-arm `chunk_pages` pages (a multiple of 64) at a
    /// time just before they are read.
    ManualProtect {
        /// Pages re-armed by one `KVM_CLEAR_DIRTY_LOG`.
        chunk_pages: u32,
    },
    /// The dirty ring of `entries` entries per vCPU (a power of two); the VM must be created
    /// with it ([`super::vm::Vm::new`]).
    Ring {
        /// Entries per vCPU.
        entries: u32,
    },
}

impl DirtyLogMode {
    /// Manual protect re-arming 2 MiB at a time.
    pub const MANUAL: DirtyLogMode = DirtyLogMode::ManualProtect { chunk_pages: 512 };
    /// A dirty ring of 65536 entries per vCPU (1 MiB).
    pub const RING: DirtyLogMode = DirtyLogMode::Ring { entries: 65536 };

    /// `bitmap`, `manual[:CHUNK_PAGES]` or `ring[:ENTRIES]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, arg) = match text.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (text, None),
        };
        let number = |a: &str| {
            a.parse::<u32>()
                .map_err(|_| format!("'{a}' is not a count in the dirty-log mode '{text}'"))
        };
        match (name, arg) {
            ("bitmap", None) => Ok(DirtyLogMode::Bitmap),
            ("manual", None) => Ok(Self::MANUAL),
            ("manual", Some(a)) => {
                let chunk_pages = number(a)?;
                if chunk_pages == 0 || !chunk_pages.is_multiple_of(64) {
                    return Err(format!(
                        "manual:{chunk_pages}: the chunk must be a positive multiple of 64 pages"
                    ));
                }
                Ok(DirtyLogMode::ManualProtect { chunk_pages })
            }
            ("ring", None) => Ok(Self::RING),
            ("ring", Some(a)) => {
                let entries = number(a)?;
                if !entries.is_power_of_two() || entries < 64 {
                    return Err(format!(
                        "ring:{entries}: the ring's entries must be a power of two, at least 64"
                    ));
                }
                Ok(DirtyLogMode::Ring { entries })
            }
            _ => Err(format!(
                "'{text}' is not a dirty-log mode: bitmap, manual[:CHUNK_PAGES] or ring[:ENTRIES]"
            )),
        }
    }

    /// Its name: `bitmap`, `manual` or `ring`.
    pub fn name(&self) -> &'static str {
        match self {
            DirtyLogMode::Bitmap => "bitmap",
            DirtyLogMode::ManualProtect { .. } => "manual",
            DirtyLogMode::Ring { .. } => "ring",
        }
    }

    /// The ring's entries, for [`super::vm::Vm::new`].
    pub fn ring_entries(&self) -> Option<u32> {
        match self {
            DirtyLogMode::Ring { entries } => Some(*entries),
            _ => None,
        }
    }
}

/// Enables the dirty ring of `entries` entries per vCPU on `vm` (before any vCPU exists).
pub fn enable_dirty_ring(vm: &VmFd, entries: u32) -> Result<(), KvmError> {
    let bytes = u64::from(entries) * 16;
    let max = vm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL.into());
    if max <= 0 {
        return Err(KvmError::new(
            "this KVM has no dirty ring with acquire/release ordering (KVM_CAP_DIRTY_LOG_RING_ACQ_REL)",
        ));
    }
    if !entries.is_power_of_two() || bytes > max as u64 {
        return Err(KvmError::new(format!(
            "a dirty ring of {entries} entries is not a power of two or exceeds this KVM's {} entries",
            max / 16
        )));
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
        args: [bytes, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(|e| KvmError::sys("enabling the dirty ring failed", e))
}

/// The cost of one sync of every region.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DirtySample {
    /// Time in `sync_region` calls (fetching the KVM log and vm-memory's bitmap; for the ring,
    /// harvesting and resetting).
    pub sync: Duration,
    /// Since the previous sample: time re-arming chunks (manual protect) or harvesting full
    /// rings on vCPU exits (ring).
    pub clear: Duration,
    /// How many `KVM_CLEAR_DIRTY_LOG` calls (or ring-full harvests) that was.
    pub clears: u64,
    /// Pages reported dirty by this sync.
    pub pages: u64,
}

/// Bit-set helpers on u64 words.
fn set_bit(words: &mut [u64], i: u64) {
    if let Some(w) = words.get_mut((i / 64) as usize) {
        *w |= 1 << (i % 64);
    }
}

/// Chunk states for manual protect.
const CLEAN: u8 = 0;
const PENDING: u8 = 1;
const CLEARING: u8 = 2;

struct ManualRegion {
    slot: u32,
    pages: u64,
    /// Pages reported dirty and not yet re-armed.
    pending: Vec<AtomicU64>,
    /// Per chunk: CLEAN, PENDING or CLEARING.
    chunks: Vec<AtomicU8>,
}

/// Manual protect's shared state: the pages to re-arm, read by every page reader.
struct ManualClear {
    vm: Arc<VmFd>,
    chunk_pages: u64,
    regions: Vec<ManualRegion>,
    paused: std::sync::atomic::AtomicBool,
    clear_ns: AtomicU64,
    clears: AtomicU64,
}

#[repr(C)]
struct ClearDirtyLog {
    slot: u32,
    num_pages: u32,
    first_page: u64,
    bitmap: *mut u64,
}

#[repr(C)]
struct GetDirtyLog {
    slot: u32,
    padding: u32,
    bitmap: *mut u64,
}

fn vm_ioctl<T>(vm: &VmFd, request: libc::c_ulong, arg: &mut T) -> Result<i32, i32> {
    use std::os::fd::AsRawFd;
    // SAFETY: `arg` is the struct `request` names, alive for the call; the buffers it points
    // to are sized by the caller for the slot.
    let ret = unsafe { libc::ioctl(vm.as_raw_fd(), request as _, arg as *mut T) };
    if ret < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(ret)
    }
}

fn errno_text(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

impl ManualClear {
    fn clear_chunk(&self, r: &ManualRegion, chunk: usize) -> Result<(), HostError> {
        let t0 = Instant::now();
        let first = chunk as u64 * self.chunk_pages;
        let count = self.chunk_pages.min(r.pages - first);
        let words = (first / 64) as usize..(first + count).div_ceil(64) as usize;
        let mut bits: Vec<u64> = r.pending[words]
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect();
        if bits.iter().all(|&w| w == 0) {
            return Ok(());
        }
        let mut arg = ClearDirtyLog {
            slot: r.slot,
            num_pages: count as u32,
            first_page: first,
            bitmap: bits.as_mut_ptr(),
        };
        vm_ioctl(&self.vm, KVM_CLEAR_DIRTY_LOG, &mut arg).map_err(|errno| {
            HostError::new(format!(
                "KVM_CLEAR_DIRTY_LOG of slot {} pages {first}..{} failed: {}",
                r.slot,
                first + count,
                errno_text(errno)
            ))
            .with_errno(errno)
        })?;
        self.clear_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.clears.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Marks `words` (the region's new dirty bits) to be re-armed before they are read.
    fn add_pending(&self, region: usize, words: &[u64]) {
        let r = &self.regions[region];
        for (i, &w) in words.iter().enumerate() {
            if w == 0 {
                continue;
            }
            if let Some(p) = r.pending.get(i) {
                p.fetch_or(w, Ordering::AcqRel);
            }
            let chunk = (i as u64 * 64 / self.chunk_pages) as usize;
            let Some(state) = r.chunks.get(chunk) else {
                continue;
            };
            loop {
                match state.compare_exchange(CLEAN, PENDING, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) | Err(PENDING) => break,
                    Err(_) => std::thread::yield_now(),
                }
            }
        }
    }
}

impl ReadHook for ManualClear {
    fn before_read(&self, region: usize, page: u64) -> Result<(), HostError> {
        if self.paused.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(r) = self.regions.get(region) else {
            return Ok(());
        };
        let chunk = (page / self.chunk_pages) as usize;
        let Some(state) = r.chunks.get(chunk) else {
            return Ok(());
        };
        loop {
            match state.load(Ordering::Acquire) {
                CLEAN => return Ok(()),
                PENDING => {
                    if state
                        .compare_exchange(PENDING, CLEARING, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        let result = self.clear_chunk(r, chunk);
                        state.store(
                            if result.is_ok() { CLEAN } else { PENDING },
                            Ordering::Release,
                        );
                        return result;
                    }
                }
                _ => std::thread::yield_now(),
            }
        }
    }
}

/// One vCPU's dirty ring, mapped from its file descriptor.
struct Ring {
    entries: *mut u8,
    count: u32,
    next: u32,
}

// SAFETY: the mapping is shared memory accessed only under the RingSet's mutex (and by KVM).
unsafe impl Send for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: mapped in `Ring::map` with this length, unmapped once.
        unsafe { libc::munmap(self.entries.cast(), self.count as usize * 16) };
    }
}

impl Ring {
    fn map(vcpu: RawFd, count: u32) -> Result<Ring, KvmError> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as i64;
        // SAFETY: maps the vCPU's ring, which KVM sized `count` entries of 16 bytes.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                count as usize * 16,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu,
                KVM_DIRTY_LOG_PAGE_OFFSET as i64 * page,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(KvmError::new(format!(
                "cannot map the vCPU's dirty ring: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Ring {
            entries: p.cast(),
            count,
            next: 0,
        })
    }
}

struct RingState {
    rings: Vec<Ring>,
    /// Dirty pages harvested, per region (layout order).
    pending: Vec<Vec<u64>>,
    /// Memslot → region position.
    slot_to_region: Vec<(u32, usize)>,
}

struct RingSet {
    vm: Arc<VmFd>,
    state: Mutex<RingState>,
    harvest_ns: AtomicU64,
    harvests: AtomicU64,
}

impl RingSet {
    /// Moves every dirty entry of every ring into `pending` and resets the rings.
    fn harvest(&self, st: &mut RingState) -> Result<(), HostError> {
        let mut any = false;
        let RingState {
            rings,
            pending,
            slot_to_region,
        } = st;
        for ring in rings.iter_mut() {
            loop {
                let at = (ring.next % ring.count) as usize * 16;
                // SAFETY: inside the mapping; the flags word is 4-aligned and KVM writes it
                // with release ordering (ACQ_REL ring), read here with acquire.
                let flags = unsafe { &*ring.entries.add(at).cast::<AtomicU32>() };
                if flags.load(Ordering::Acquire) & DIRTY_GFN_DIRTY == 0 {
                    break;
                }
                // SAFETY: the entry's slot (u32 at 4) and offset (u64 at 8), published by the
                // flags' release store.
                let (slot, offset) = unsafe {
                    (
                        ring.entries.add(at + 4).cast::<u32>().read_volatile(),
                        ring.entries.add(at + 8).cast::<u64>().read_volatile(),
                    )
                };
                // The low 16 bits name the slot (the high ones its address space).
                let slot = slot & 0xffff;
                if let Some(&(_, region)) = slot_to_region.iter().find(|(s, _)| *s == slot) {
                    set_bit(&mut pending[region], offset);
                }
                flags.store(DIRTY_GFN_RESET, Ordering::Release);
                ring.next = ring.next.wrapping_add(1);
                any = true;
            }
        }
        if any {
            let mut unit = 0u8;
            vm_ioctl(&self.vm, KVM_RESET_DIRTY_RINGS, &mut unit).map_err(|errno| {
                HostError::new(format!(
                    "KVM_RESET_DIRTY_RINGS failed: {}",
                    errno_text(errno)
                ))
                .with_errno(errno)
            })?;
        }
        Ok(())
    }
}

/// A VM's dirty log over the regions of a [`KvmMemory`].
pub struct DirtyTracker {
    vm: Arc<VmFd>,
    memory: Arc<Memory>,
    regions: Vec<HostRegion>,
    mode: DirtyLogMode,
    logging: bool,
    manual: Option<Arc<ManualClear>>,
    ring: Option<Arc<RingSet>>,
    samples: Vec<DirtySample>,
    current: DirtySample,
    synced_regions: usize,
    scratch: Vec<u64>,
}

impl DirtyTracker {
    /// Starts dirty logging of every region of `memory` in `mode`. The ring needs the VM
    /// created with it and the file descriptor of every vCPU (`vcpus`) to map its ring; the
    /// other modes ignore `vcpus`.
    pub fn start(
        vm: Arc<VmFd>,
        memory: &KvmMemory,
        mode: DirtyLogMode,
        vcpus: &[RawFd],
    ) -> Result<Self, KvmError> {
        let regions = memory.regions().to_vec();
        let mut manual = None;
        let mut ring = None;
        match mode {
            DirtyLogMode::Bitmap => {}
            DirtyLogMode::ManualProtect { chunk_pages } => {
                if chunk_pages == 0 || !chunk_pages.is_multiple_of(64) {
                    return Err(KvmError::new(
                        "the manual-protect chunk must be a positive multiple of 64 pages",
                    ));
                }
                let cap = kvm_enable_cap {
                    cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    args: [
                        u64::from(
                            KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET,
                        ),
                        0,
                        0,
                        0,
                    ],
                    ..Default::default()
                };
                vm.enable_cap(&cap).map_err(|e| {
                    KvmError::sys("enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 failed", e)
                })?;
                let chunk = u64::from(chunk_pages);
                manual = Some(Arc::new(ManualClear {
                    vm: vm.clone(),
                    chunk_pages: chunk,
                    regions: regions
                        .iter()
                        .map(|r| {
                            let pages = r.bytes / 4096;
                            ManualRegion {
                                slot: r.slot,
                                pages,
                                pending: (0..pages.div_ceil(64))
                                    .map(|_| AtomicU64::new(0))
                                    .collect(),
                                chunks: (0..pages.div_ceil(chunk))
                                    .map(|_| AtomicU8::new(CLEAN))
                                    .collect(),
                            }
                        })
                        .collect(),
                    paused: Default::default(),
                    clear_ns: AtomicU64::new(0),
                    clears: AtomicU64::new(0),
                }));
            }
            DirtyLogMode::Ring { entries } => {
                if vcpus.is_empty() {
                    return Err(KvmError::new("the dirty ring needs the VM's vCPUs"));
                }
                let rings = vcpus
                    .iter()
                    .map(|&v| Ring::map(v, entries))
                    .collect::<Result<Vec<_>, _>>()?;
                ring = Some(Arc::new(RingSet {
                    vm: vm.clone(),
                    state: Mutex::new(RingState {
                        rings,
                        pending: regions
                            .iter()
                            .map(|r| vec![0; (r.bytes / 4096).div_ceil(64) as usize])
                            .collect(),
                        slot_to_region: regions
                            .iter()
                            .enumerate()
                            .map(|(i, r)| (r.slot, i))
                            .collect(),
                    }),
                    harvest_ns: AtomicU64::new(0),
                    harvests: AtomicU64::new(0),
                }));
            }
        }
        let mut tracker = DirtyTracker {
            vm,
            memory: memory.memory().clone(),
            regions,
            mode,
            logging: false,
            manual,
            ring,
            samples: Vec::new(),
            current: DirtySample::default(),
            synced_regions: 0,
            scratch: Vec::new(),
        };
        tracker.set_logging(true)?;
        Ok(tracker)
    }

    fn set_logging(&mut self, on: bool) -> Result<(), KvmError> {
        for r in &self.regions {
            let mapping = kvm_userspace_memory_region {
                slot: r.slot,
                flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: r.guest_base,
                memory_size: r.bytes,
                userspace_addr: r.host_addr as u64,
            };
            // SAFETY: the same mapping the memslot has (only its flags change); `memory` keeps
            // it alive.
            unsafe { self.vm.set_user_memory_region(mapping) }.map_err(|e| {
                KvmError::sys(
                    format!(
                        "{} dirty logging on slot {} failed",
                        if on { "starting" } else { "stopping" },
                        r.slot
                    ),
                    e,
                )
            })?;
        }
        self.logging = on;
        Ok(())
    }

    /// Stops dirty logging (after a migration, failed or done). Idempotent.
    pub fn stop(&mut self) -> Result<(), KvmError> {
        if self.logging {
            self.set_logging(false)?;
        }
        Ok(())
    }

    /// Whether logging is on.
    pub fn is_logging(&self) -> bool {
        self.logging
    }

    /// The mode.
    pub fn mode(&self) -> DirtyLogMode {
        self.mode
    }

    /// What page readers must run before each read (manual protect re-arms chunks there).
    pub fn read_hook(&self) -> Option<Arc<dyn ReadHook>> {
        self.manual.clone().map(|m| m as Arc<dyn ReadHook>)
    }

    /// What a vCPU thread calls when its dirty ring is full (ring mode).
    pub fn ring_full_hook(&self) -> Option<RingFullHook> {
        let ring = self.ring.clone()?;
        Some(Arc::new(move || {
            let t0 = Instant::now();
            let mut st = ring.state.lock().unwrap_or_else(|p| p.into_inner());
            // A failure shows at the next sync, which reports it.
            let _ = ring.harvest(&mut st);
            ring.harvest_ns
                .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            ring.harvests.fetch_add(1, Ordering::Relaxed);
        }))
    }

    /// Tells the tracker whether the guest is paused: a paused guest's pages are not re-armed.
    pub fn set_guest_paused(&self, paused: bool) {
        if let Some(m) = &self.manual {
            m.paused.store(paused, Ordering::Release);
        }
    }

    /// Manual protect: re-arms every page the syncs reported (as reading every page would),
    /// so the next sync reports only pages written since; a recorder, which reads no pages,
    /// calls it after each sync. The other modes re-arm in the sync itself: nothing to do.
    pub fn rearm_all(&self) -> Result<(), HostError> {
        let Some(m) = &self.manual else {
            return Ok(());
        };
        for (i, r) in m.regions.iter().enumerate() {
            for chunk in 0..r.chunks.len() as u64 {
                m.before_read(i, chunk * m.chunk_pages)?;
            }
        }
        Ok(())
    }

    /// One sample per sync of every region, oldest first.
    pub fn samples(&self) -> &[DirtySample] {
        &self.samples
    }

    /// ORs the dirty pages of region `index` (layout position) into `into` from bit
    /// `first_page`, and clears them from the log.
    pub fn sync_index(
        &mut self,
        index: usize,
        first_page: u64,
        into: &mut DirtyBitmap,
    ) -> Result<(), HostError> {
        let t0 = Instant::now();
        let r = *self
            .regions
            .get(index)
            .ok_or_else(|| HostError::new(format!("no region at position {index}")))?;
        if !self.logging {
            return Err(HostError::new(
                "dirty logging is off: the migration cannot know which pages changed",
            ));
        }
        let pages = r.bytes / 4096;
        let words = pages.div_ceil(64) as usize;
        let before = into.count_ones();
        match self.mode {
            DirtyLogMode::Bitmap | DirtyLogMode::ManualProtect { .. } => {
                self.scratch.clear();
                self.scratch.resize(words, 0);
                let mut arg = GetDirtyLog {
                    slot: r.slot,
                    padding: 0,
                    bitmap: self.scratch.as_mut_ptr(),
                };
                vm_ioctl(&self.vm, KVM_GET_DIRTY_LOG, &mut arg).map_err(|errno| {
                    HostError::new(format!(
                        "KVM_GET_DIRTY_LOG of slot {} failed: {}",
                        r.slot,
                        errno_text(errno)
                    ))
                    .with_errno(errno)
                })?;
                into.or_words_at(first_page, &self.scratch);
                if let Some(m) = &self.manual {
                    m.add_pending(index, &self.scratch);
                }
            }
            DirtyLogMode::Ring { .. } => {
                let ring = self
                    .ring
                    .as_ref()
                    .ok_or_else(|| HostError::new("no rings"))?;
                let mut st = ring.state.lock().unwrap_or_else(|p| p.into_inner());
                ring.harvest(&mut st)?;
                let pending = std::mem::replace(&mut st.pending[index], vec![0; words]);
                into.or_words_at(first_page, &pending);
            }
        }
        // Pages the VMM wrote through vm-memory.
        if let Some(region) = self.memory.iter().nth(index) {
            let vmm = region.bitmap().get_and_reset();
            into.or_words_at(first_page, &vmm);
        }
        self.current.sync += t0.elapsed();
        self.current.pages += into.count_ones() - before;
        self.synced_regions += 1;
        if self.synced_regions == self.regions.len() {
            self.synced_regions = 0;
            let (ns, n) = match (&self.manual, &self.ring) {
                (Some(m), _) => (
                    m.clear_ns.swap(0, Ordering::Relaxed),
                    m.clears.swap(0, Ordering::Relaxed),
                ),
                (_, Some(r)) => (
                    r.harvest_ns.swap(0, Ordering::Relaxed),
                    r.harvests.swap(0, Ordering::Relaxed),
                ),
                _ => (0, 0),
            };
            self.current.clear = Duration::from_nanos(ns);
            self.current.clears = n;
            self.samples.push(std::mem::take(&mut self.current));
        }
        Ok(())
    }
}

impl DirtyLog for DirtyTracker {
    fn sync_region(
        &mut self,
        region: &Region,
        first_page: u64,
        into: &mut DirtyBitmap,
    ) -> Result<(), HostError> {
        let index = self
            .regions
            .iter()
            .position(|r| r.slot == region.id)
            .ok_or_else(|| HostError::new(format!("no memslot {} in this VM", region.id)))?;
        self.sync_index(index, first_page, into)
    }
}

impl Drop for DirtyTracker {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
