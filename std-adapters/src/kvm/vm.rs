//! Creating a VM: `/dev/kvm`, guest memory as a vm-memory `GuestMemoryMmap<AtomicBitmap>` (one
//! region per memslot, anonymous and lazily faulted in), the memslots, and vCPUs with the host's
//! supported CPUID (KVM checks EFER.LME against the guest's CPUID, so long mode needs it).
//!
//! A VMM that has its own VM needs none of this: the adapters take any `VmFd` and
//! `GuestMemoryMmap<AtomicBitmap>` ([`super::memory::KvmMemory::new`]).

use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use super::dirty;
use super::guest::RegionRange;
use super::KvmError;

/// Guest memory as the adapters take it.
pub type Memory = GuestMemoryMmap<AtomicBitmap>;

/// Whether this process can use KVM: `Ok` or why not (for tests that skip, and for the demo's
/// choice of guest).
pub fn kvm_usable() -> Result<(), String> {
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| format!("/dev/kvm opens but KVM_CREATE_VM fails: {e}"))?;
    vm.create_vcpu(0)
        .map_err(|e| format!("/dev/kvm opens but KVM_CREATE_VCPU fails: {e}"))?;
    Ok(())
}

/// The TSC frequency of a vCPU on this host, in kHz (what paces a guest with a write rate).
pub fn host_tsc_khz() -> Result<u32, String> {
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| format!("KVM_CREATE_VM failed: {e}"))?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU failed: {e}"))?;
    vcpu.get_tsc_khz()
        .map_err(|e| format!("KVM_GET_TSC_KHZ failed: {e}"))
}

/// A VM with its memory and memslots (slot `i` is region `i`).
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    memory: Arc<Memory>,
    slots: Vec<u32>,
    ring_entries: Option<u32>,
}

impl Vm {
    /// Creates a VM with memory `regions` (guest-physical base, bytes), each one memslot
    /// numbered from 0. `dirty_ring_entries` enables KVM's dirty ring of that many entries per
    /// vCPU (a power of two), which must happen before any vCPU exists; the dirty log of
    /// [`dirty::DirtyLogMode::Ring`] then works, the bitmap modes do not.
    /// `huge_pages` advises transparent huge pages for the memory (a source whose guest
    /// touches all its memory; a destination's memory is better taken page by page as pages
    /// arrive, all-zero pages never).
    pub fn new(
        regions: &[RegionRange],
        dirty_ring_entries: Option<u32>,
        huge_pages: bool,
    ) -> Result<Vm, KvmError> {
        let kvm = Kvm::new().map_err(|e| KvmError::sys("cannot open /dev/kvm", e))?;
        let fd = kvm
            .create_vm()
            .map_err(|e| KvmError::sys("KVM_CREATE_VM failed", e))?;
        if let Some(entries) = dirty_ring_entries {
            dirty::enable_dirty_ring(&fd, entries)?;
        }
        // Best effort: only VMX needs it, and only for real mode.
        let _ = fd.set_tss_address(0xfffb_d000);
        let ranges: Vec<(GuestAddress, usize)> = regions
            .iter()
            .map(|&(base, len)| {
                usize::try_from(len)
                    .map(|len| (GuestAddress(base), len))
                    .map_err(|_| KvmError::new("a memory region is larger than the address space"))
            })
            .collect::<Result<_, _>>()?;
        let memory = Memory::from_ranges(&ranges)
            .map_err(|e| KvmError::new(format!("cannot map guest memory: {e}")))?;
        let slots: Vec<u32> = (0..regions.len() as u32).collect();
        for (slot, region) in slots.iter().zip(memory.iter()) {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| {
                    KvmError::new(format!("guest memory region has no host address: {e}"))
                })?;
            if huge_pages {
                // Advice only: transparent huge pages cut first-touch faults (each costs tens
                // of microseconds under shadow paging) 512-fold.
                // SAFETY: the range is this region's mapping.
                unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
            }
            let mapping = kvm_userspace_memory_region {
                slot: *slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the mapping belongs to `memory`, which this VM keeps alive (in an Arc)
            // at least as long as the VM file descriptor.
            unsafe { fd.set_user_memory_region(mapping) }.map_err(|e| {
                KvmError::sys(
                    format!("KVM_SET_USER_MEMORY_REGION of slot {slot} failed"),
                    e,
                )
            })?;
        }
        Ok(Vm {
            kvm,
            fd: Arc::new(fd),
            memory: Arc::new(memory),
            slots,
            ring_entries: dirty_ring_entries,
        })
    }

    /// Creates vCPU `id` with the host's supported CPUID.
    pub fn create_vcpu(&self, id: u64) -> Result<VcpuFd, KvmError> {
        let vcpu = self
            .fd
            .create_vcpu(id)
            .map_err(|e| KvmError::sys("KVM_CREATE_VCPU failed", e))?;
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| KvmError::sys("KVM_GET_SUPPORTED_CPUID failed", e))?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| KvmError::sys("KVM_SET_CPUID2 failed", e))?;
        Ok(vcpu)
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<Memory> {
        &self.memory
    }

    /// The memslot of each region, in region order.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    /// The dirty ring's entries per vCPU, if it was enabled.
    pub fn ring_entries(&self) -> Option<u32> {
        self.ring_entries
    }

    /// Writes `pieces` (guest-physical address, bytes) into guest memory, as a VMM loading an
    /// image does (through vm-memory, so its dirty bitmap sees the writes).
    pub fn load(&self, pieces: &[(u64, Vec<u8>)]) -> Result<(), KvmError> {
        for (at, bytes) in pieces {
            self.memory
                .write_slice(bytes, GuestAddress(*at))
                .map_err(|e| KvmError::new(format!("cannot write the image at {at:#x}: {e}")))?;
        }
        Ok(())
    }

    /// Reads the u64 at guest-physical `at`, if it is in memory.
    pub fn read_u64(&self, at: u64) -> Option<u64> {
        self.memory.read_obj::<u64>(GuestAddress(at)).ok()
    }
}
