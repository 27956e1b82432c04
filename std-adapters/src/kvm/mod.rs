//! KVM adapters: a VM built on rust-vmm crates (kvm-ioctls, vm-memory) as memferry's source and
//! destination hosts, and a generated guest that dirties memory, to migrate a running KVM
//! guest live.
//!
//! What a VMM links (feature `kvm`, Linux):
//! - [`memory::KvmMemory`]: any `GuestMemoryMmap<AtomicBitmap>` as pages, region by region
//!   (memslot = region id), holes free; [`memory::PageSink`]: the destination's writes, zero
//!   pages skipped for memory never written.
//! - [`dirty::DirtyTracker`]: the KVM dirty log in one of three [`dirty::DirtyLogMode`]s, ORed
//!   with vm-memory's bitmap, its cost per sync measured; logging starts when it is built and
//!   stops in `stop()` or on drop.
//! - [`vcpu::VcpuThread`]: a vCPU on its thread with a measured pause (signal +
//!   `immediate_exit`; blocking, or asked for and polled), resume and state access; [`VcpuSet`]
//!   pauses, saves and restores several.
//! - [`state`]: a vCPU's registers, special registers, XSAVE/FPU, XCRs and MSRs as bytes.
//! - [`KvmSource`] and [`KvmDestination`]: the host traits over those parts.
//!
//! What tests and the CLI use besides: [`vm::Vm`] (a VM with memslots) and [`guest`] (the
//! image and its reference hash); [`SourceMachine`] / [`DestinationMachine`] put them together.
//!
//! # Lifecycle hooks
//! The core's host traits have these, and [`KvmSource`] implements them so:
//! - Dirty logging: [`DirtyLog::start_logging`] / [`DirtyLog::stop_logging`]. KVM logging starts
//!   when the source is built ([`DirtyTracker::start`]), before the engine's first sync, so
//!   `start_logging` keeps the default (nothing to do); `stop_logging`, which the engine calls
//!   when the migration ends (done, failed or cancelled), stops it. [`KvmSource::finish`] (after
//!   every migration, failed or not: it also lifts a throttle) and dropping the source stop it
//!   too, should the engine not have run to its end.
//! - The pause: [`SourceGuest::request_pause`] / [`SourceGuest::poll_pause`]. `request_pause`
//!   signals every vCPU thread out of `KVM_RUN` ([`VcpuSet::request_pause`]) and returns
//!   `Pending` at once (or `Parked` if all were parked already); the engine sends nothing and
//!   polls `poll_pause`, which looks without waiting whether every thread has parked
//!   ([`VcpuSet::parked_since`]), signals laggards again every [`PAUSE_REKICK`], and says
//!   `Parked` once all have. The pause time ([`SourceGuest::last_pause_time`],
//!   [`KvmSource::pause_times`]) is from the request to the last vCPU's park, measured on the
//!   host. [`SourceGuest::resume`] cancels a pause still pending (after the engine's pause
//!   timeout). The synchronous [`SourceGuest::pause`] (signal, then wait for every vCPU)
//!   stays for callers outside the engine.

pub mod dirty;
pub mod guest;
pub mod memory;
pub mod multiboot;
pub mod run;
pub mod state;
pub mod vcpu;
pub mod vm;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use memferry::bitmap::DirtyBitmap;
use memferry::error::HostError;
use memferry::memory::{
    DestinationGuest, DirtyLog, PageRead, PageWrite, PauseProgress, SourceGuest,
};
use memferry::page::{MemoryLayout, PageIndex, Region};
use memferry::time::Nanos;

use dirty::{DirtyLogMode, DirtySample, DirtyTracker};
use guest::{GuestConfig, GuestStatus};
use memory::{KvmMemory, PageSink};
use vcpu::{VcpuEnd, VcpuThread};
use vm::Vm;

/// A KVM adapter failure: what failed, and the OS error behind it.
#[derive(Debug, Clone)]
pub struct KvmError {
    message: String,
    errno: Option<i32>,
}

impl KvmError {
    /// An error with `message`.
    pub fn new(message: impl Into<String>) -> Self {
        KvmError {
            message: message.into(),
            errno: None,
        }
    }

    /// `what` failed with `e` (from kvm-ioctls).
    pub fn sys(what: impl Into<String>, e: kvm_ioctls::Error) -> Self {
        KvmError {
            message: format!("{}: {e}", what.into()),
            errno: Some(e.errno()),
        }
    }

    /// The OS error number, if one caused it.
    pub fn errno(&self) -> Option<i32> {
        self.errno
    }
}

impl fmt::Display for KvmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for KvmError {}

impl From<KvmError> for HostError {
    fn from(e: KvmError) -> Self {
        let errno = e.errno;
        let h = HostError::new(e.message);
        match errno {
            Some(n) => h.with_errno(n),
            None => h,
        }
    }
}

/// A VM's vCPUs as one: pause all, resume all, save and restore all (the device state is
/// `count: u32`, then per vCPU `len: u32` and its [`state`] bytes).
pub struct VcpuSet {
    threads: Vec<VcpuThread>,
    msrs: Vec<u32>,
}

impl VcpuSet {
    /// `threads` (vCPU 0 first); `msrs` to save ([`state::supported_msrs`]).
    pub fn new(threads: Vec<VcpuThread>, msrs: Vec<u32>) -> Self {
        VcpuSet { threads, msrs }
    }

    /// The vCPU threads.
    pub fn threads(&self) -> &[VcpuThread] {
        &self.threads
    }

    /// Starts every vCPU.
    pub fn start(&mut self) -> Result<(), KvmError> {
        self.threads.iter_mut().try_for_each(VcpuThread::start)
    }

    /// Pauses every vCPU; returns how long until all were parked.
    pub fn pause(&self) -> Result<Duration, KvmError> {
        let t0 = Instant::now();
        for t in &self.threads {
            t.pause()?;
        }
        Ok(t0.elapsed())
    }

    /// Asks every vCPU to stop without waiting ([`VcpuThread::request_pause`]: all are
    /// signalled, and park in parallel); true if all are stopped already.
    pub fn request_pause(&self) -> bool {
        // Every vCPU is asked (no short cut at the first that runs).
        let mut all = true;
        for t in &self.threads {
            all &= t.request_pause();
        }
        all
    }

    /// Whether every vCPU has parked (or is not running), without waiting
    /// ([`VcpuThread::parked_at`]): `Some(when the last one parked)`, no earlier than `asked`.
    pub fn parked_since(&self, asked: Instant) -> Option<Instant> {
        self.threads
            .iter()
            .try_fold(asked, |latest, t| t.parked_at().map(|at| latest.max(at)))
    }

    /// Signals again every vCPU asked to pause that has not parked ([`VcpuThread::kick`]).
    pub fn kick(&self) {
        self.threads.iter().for_each(VcpuThread::kick);
    }

    /// Throttles every vCPU to sleep `percent` of each period ([`VcpuThread::set_throttle`]);
    /// 0 lifts the throttle.
    pub fn set_throttle(&mut self, percent: u8) -> Result<(), KvmError> {
        self.threads
            .iter_mut()
            .try_for_each(|t| t.set_throttle(percent))
    }

    /// Resumes every vCPU.
    pub fn resume(&self) -> Result<(), KvmError> {
        self.threads.iter().try_for_each(VcpuThread::resume)
    }

    /// The state of every (paused) vCPU.
    pub fn save(&self) -> Result<Vec<u8>, KvmError> {
        let mut out = (self.threads.len() as u32).to_le_bytes().to_vec();
        for t in &self.threads {
            let s = t.with_fd(|fd| state::save(fd, &self.msrs))??;
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(&s);
        }
        Ok(out)
    }

    /// Installs a state [`VcpuSet::save`] produced (vCPUs not running). Checks the count and
    /// every length first.
    pub fn restore(&self, bytes: &[u8]) -> Result<(), KvmError> {
        let bad = |why: &str| KvmError::new(format!("bad vCPU device state: {why}"));
        let (count, mut rest) = bytes
            .split_first_chunk::<4>()
            .ok_or_else(|| bad("no vCPU count"))?;
        let count = u32::from_le_bytes(*count) as usize;
        if count != self.threads.len() {
            return Err(bad(&format!(
                "it holds {count} vCPUs, this VM has {}",
                self.threads.len()
            )));
        }
        let mut parts = Vec::new();
        for _ in 0..count {
            let (len, tail) = rest
                .split_first_chunk::<4>()
                .ok_or_else(|| bad("cut short"))?;
            let len = u32::from_le_bytes(*len) as usize;
            if tail.len() < len {
                return Err(bad("cut short"));
            }
            let (part, tail) = tail.split_at(len);
            parts.push(part);
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        for (t, part) in self.threads.iter().zip(parts) {
            t.with_fd(|fd| state::restore(fd, part))??;
        }
        Ok(())
    }
}

/// The source host: guest memory, its dirty log and its vCPUs.
pub struct KvmSource {
    memory: KvmMemory,
    dirty: DirtyTracker,
    vcpus: VcpuSet,
    pause_times: Vec<Duration>,
    /// A pause asked for whose vCPUs have not all parked: when it was asked, when they were
    /// last signalled.
    pending_pause: Option<(Instant, Instant)>,
    /// Dirty-log samples already reported to the engine (`take_cost`).
    costed: usize,
    paused_at: Option<Instant>,
    paused: bool,
    /// How many times the engine resumed the guest after pausing it.
    pub resumes: u32,
    /// Every throttle the engine asked for, in order (0: lifted).
    pub throttles: Vec<u8>,
    _vm: Arc<VmFd>,
}

impl KvmSource {
    /// A source over `memory` (whose memslots belong to `vm`) and `vcpus` (running or not),
    /// logging dirty pages in `mode` from now on. Ring mode needs the VM created with the ring
    /// and the vCPUs' file descriptors, which `vcpus` lends while the tracker maps them.
    pub fn new(
        vm: Arc<VmFd>,
        memory: KvmMemory,
        vcpus: VcpuSet,
        mode: DirtyLogMode,
    ) -> Result<Self, KvmError> {
        // The ring maps each vCPU's file descriptor (running or not).
        let fds: Vec<_> = vcpus.threads().iter().map(VcpuThread::raw_fd).collect();
        let dirty = DirtyTracker::start(vm.clone(), &memory, mode, &fds)?;
        if let Some(hook) = dirty.ring_full_hook() {
            for t in vcpus.threads() {
                t.set_ring_full_hook(hook.clone());
            }
        }
        let memory = memory.with_read_hook(dirty.read_hook());
        Ok(KvmSource {
            memory,
            dirty,
            vcpus,
            pause_times: Vec::new(),
            pending_pause: None,
            costed: 0,
            paused_at: None,
            paused: false,
            resumes: 0,
            throttles: Vec::new(),
            _vm: vm,
        })
    }

    /// The guest memory as the engine's worker threads read it (`run_source_with_workers`).
    pub fn shared_memory(&self) -> Arc<KvmMemory> {
        Arc::new(self.memory.clone())
    }

    /// The layout.
    pub fn layout(&self) -> &MemoryLayout {
        self.memory.layout()
    }

    /// The memory.
    pub fn memory(&self) -> &KvmMemory {
        &self.memory
    }

    /// The vCPUs.
    pub fn vcpus(&self) -> &VcpuSet {
        &self.vcpus
    }

    /// The dirty log.
    pub fn dirty_log(&self) -> &DirtyTracker {
        &self.dirty
    }

    /// The cost of every dirty-log sync so far.
    pub fn dirty_samples(&self) -> &[DirtySample] {
        self.dirty.samples()
    }

    /// How long each pause took to park the vCPUs: for a pause asked with
    /// [`SourceGuest::request_pause`], from the request to the moment the last vCPU thread
    /// parked.
    pub fn pause_times(&self) -> &[Duration] {
        &self.pause_times
    }

    /// When the last pause was asked for.
    pub fn paused_at(&self) -> Option<Instant> {
        self.paused_at
    }

    /// Whether a pause asked with [`SourceGuest::request_pause`] is still waiting for vCPUs to
    /// park.
    pub fn pause_pending(&self) -> bool {
        self.pending_pause.is_some()
    }

    /// Whether the guest is paused (every vCPU parked).
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Ends the migration's hold on the guest: stops dirty logging. Call it after every
    /// migration, failed or not (dropping the source does it too).
    pub fn finish(&mut self) -> Result<(), KvmError> {
        let lifted = self.vcpus.set_throttle(0);
        self.dirty.stop()?;
        lifted
    }

    /// Stops dirty logging (the same as [`KvmSource::finish`]).
    pub fn stop_dirty_logging(&mut self) -> Result<(), KvmError> {
        self.dirty.stop()
    }
}

impl PageRead for KvmSource {
    fn read_page(&mut self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError> {
        self.memory.read(page, buf)
    }
}

impl DirtyLog for KvmSource {
    fn sync_region(
        &mut self,
        region: &Region,
        first_page: u64,
        into: &mut DirtyBitmap,
    ) -> Result<(), HostError> {
        self.dirty.sync_region(region, first_page, into)
    }

    /// The engine ends the migration (done, failed or cancelled): logging stops.
    fn stop_logging(&mut self) {
        // An error here leaves logging on; `finish` (or dropping the source) tries again.
        let _ = self.dirty.stop();
    }

    /// The syncs since the last call: their time in the round's report.
    fn take_cost(&mut self) -> Option<memferry::memory::DirtyCost> {
        let samples = self.dirty.samples();
        let new = &samples[self.costed.min(samples.len())..];
        self.costed = samples.len();
        let nanos = |d: Duration| Nanos(d.as_nanos().min(u64::MAX as u128) as u64);
        Some(memferry::memory::DirtyCost {
            sync: nanos(new.iter().map(|s| s.sync).sum()),
            clear: nanos(new.iter().map(|s| s.clear).sum()),
        })
    }
}

/// How often a pending pause ([`SourceGuest::request_pause`]) signals vCPUs that have not
/// parked again (as the synchronous pause does while it waits).
pub const PAUSE_REKICK: Duration = Duration::from_millis(5);

impl KvmSource {
    /// The vCPUs parked `took` after the pause was asked for.
    fn parked(&mut self, took: Duration) {
        self.pause_times.push(took);
        self.paused = true;
        self.dirty.set_guest_paused(true);
    }
}

impl SourceGuest for KvmSource {
    fn last_pause_time(&self) -> Option<Nanos> {
        self.pause_times
            .last()
            .map(|d| Nanos(d.as_nanos().min(u64::MAX as u128) as u64))
    }

    fn pause(&mut self) -> Result<(), HostError> {
        self.paused_at = Some(Instant::now());
        self.pending_pause = None;
        let took = self.vcpus.pause()?;
        self.parked(took);
        Ok(())
    }

    /// Signals every vCPU thread out of `KVM_RUN` and returns at once: `Pending` unless all
    /// were parked already. The migration engine polls [`SourceGuest::poll_pause`].
    fn request_pause(&mut self) -> Result<PauseProgress, HostError> {
        let asked = Instant::now();
        self.paused_at = Some(asked);
        if self.vcpus.request_pause() {
            self.pending_pause = None;
            self.parked(asked.elapsed());
            return Ok(PauseProgress::Parked);
        }
        self.pending_pause = Some((asked, asked));
        Ok(PauseProgress::Pending)
    }

    /// Whether every vCPU has parked since [`SourceGuest::request_pause`] (without waiting);
    /// the pause time recorded is from the request to the last vCPU's park. vCPUs not parked
    /// are signalled again every [`PAUSE_REKICK`].
    fn poll_pause(&mut self) -> Result<PauseProgress, HostError> {
        let Some((asked, kicked)) = self.pending_pause else {
            return if self.paused {
                Ok(PauseProgress::Parked)
            } else {
                Err(HostError::new(
                    "poll_pause without a pause request: the guest is not pausing",
                ))
            };
        };
        if let Some(last) = self.vcpus.parked_since(asked) {
            self.pending_pause = None;
            self.parked(last - asked);
            return Ok(PauseProgress::Parked);
        }
        let now = Instant::now();
        if now - kicked >= PAUSE_REKICK {
            self.vcpus.kick();
            self.pending_pause = Some((asked, now));
        }
        Ok(PauseProgress::Pending)
    }

    /// Resumes a paused guest, or cancels a pause still pending (vCPUs not parked yet run on,
    /// parked ones are woken).
    fn resume(&mut self) -> Result<(), HostError> {
        self.pending_pause = None;
        self.dirty.set_guest_paused(false);
        self.vcpus.resume()?;
        self.paused = false;
        self.resumes += 1;
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<u8>, HostError> {
        Ok(self.vcpus.save()?)
    }

    /// Auto-converge: every vCPU sleeps `percent` of each 10 ms outside `KVM_RUN`.
    fn throttle(&mut self, percent: u8) -> Result<(), HostError> {
        self.throttles.push(percent);
        Ok(self.vcpus.set_throttle(percent)?)
    }
}

/// The destination host: fresh memory, the vCPUs (not running until `start`).
pub struct KvmDestination {
    sink: PageSink,
    digest_at_start: Option<Option<u128>>,
    vcpus: VcpuSet,
    started_at: Option<Instant>,
    restored: bool,
    _vm: Arc<VmFd>,
}

impl KvmDestination {
    /// A destination writing into `memory` (fresh, of `vm`) and running `vcpus` when started.
    pub fn new(vm: Arc<VmFd>, memory: KvmMemory, vcpus: VcpuSet) -> Self {
        KvmDestination {
            sink: PageSink::new(memory),
            digest_at_start: None,
            vcpus,
            started_at: None,
            restored: false,
            _vm: vm,
        }
    }

    /// The memory.
    pub fn memory(&self) -> &KvmMemory {
        self.sink.memory()
    }

    /// Zero pages not written because the memory was fresh.
    pub fn zero_pages_skipped(&self) -> u64 {
        self.sink.zero_pages_skipped
    }

    /// The vCPUs.
    pub fn vcpus(&self) -> &VcpuSet {
        &self.vcpus
    }

    /// Has `start` take the digest of the memory before the vCPUs run (a full read, in the
    /// downtime: for tests that compare it with the source's paused memory).
    pub fn take_digest_at_start(&mut self) {
        self.digest_at_start = Some(None);
    }

    /// The digest taken at start, if asked for.
    pub fn digest_at_start(&self) -> Option<u128> {
        self.digest_at_start.flatten()
    }

    /// When `start` was called.
    pub fn started_at(&self) -> Option<Instant> {
        self.started_at
    }
}

impl PageWrite for KvmDestination {
    fn write_page(&mut self, page: PageIndex, data: &[u8]) -> Result<(), HostError> {
        self.sink.write_page(page, data)
    }

    fn write_zero_page(&mut self, page: PageIndex, zeroes: &[u8]) -> Result<(), HostError> {
        self.sink.write_zero_page(page, zeroes)
    }
}

impl DestinationGuest for KvmDestination {
    fn restore_state(&mut self, state: &[u8]) -> Result<(), HostError> {
        self.vcpus.restore(state)?;
        self.restored = true;
        Ok(())
    }

    fn start(&mut self) -> Result<(), HostError> {
        if !self.restored {
            return Err(HostError::new(
                "the destination cannot start a guest whose vCPU state never arrived",
            ));
        }
        if let Some(slot) = &mut self.digest_at_start {
            *slot = Some(self.sink.memory().digest()?);
        }
        self.started_at = Some(Instant::now());
        Ok(self.vcpus.start()?)
    }

    fn read_back(&mut self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError> {
        self.sink.memory().read(page, buf)
    }
}

/// The source side of a test or demo: a VM running the generated guest.
pub struct SourceMachine {
    /// The VM (memory, memslots).
    pub vm: Vm,
    /// The guest's configuration.
    pub config: GuestConfig,
}

impl SourceMachine {
    /// Creates a VM for `config` (with the dirty ring when `mode` asks for it), loads the guest
    /// image and creates its vCPU, ready to run.
    pub fn create(config: &GuestConfig, mode: DirtyLogMode) -> Result<(Self, VcpuSet), KvmError> {
        config.validate().map_err(KvmError::new)?;
        let regions = config.regions().map_err(KvmError::new)?;
        let vm = Vm::new(&regions, mode.ring_entries(), true)?;
        let vcpu = vm.create_vcpu(0)?;
        let tsc_khz = vcpu.get_tsc_khz().unwrap_or(1_000_000);
        vm.load(&guest::image(config, tsc_khz).map_err(KvmError::new)?)?;
        let mut sregs = vcpu
            .get_sregs()
            .map_err(|e| KvmError::sys("KVM_GET_SREGS failed", e))?;
        guest::long_mode_sregs(&mut sregs);
        vcpu.set_sregs(&sregs)
            .map_err(|e| KvmError::sys("KVM_SET_SREGS failed", e))?;
        vcpu.set_regs(&guest::initial_regs())
            .map_err(|e| KvmError::sys("KVM_SET_REGS failed", e))?;
        let msrs = state::supported_msrs(vm.kvm())?;
        let thread = VcpuThread::new(vcpu, guest::DONE_MMIO);
        thread.set_finished_check(finished_check(vm.memory()));
        let set = VcpuSet::new(vec![thread], msrs);
        Ok((
            SourceMachine {
                vm,
                config: *config,
            },
            set,
        ))
    }

    /// Creates a VM of `config.memory` bytes in the layout of [`multiboot::kernel_config`]
    /// (with the dirty ring when `mode` asks for it), loads the multiboot kernel `image` as
    /// QEMU's `-kernel` does and creates its vCPU at the kernel's entry, in 32-bit protected
    /// mode, ready to run. The guest's other settings in `config` are not used (the kernel has
    /// its own); [`SourceMachine::status`] means something when the kernel is the generated
    /// guest ([`multiboot::guest_elf`]).
    pub fn boot_kernel(
        image: &[u8],
        config: &GuestConfig,
        mode: DirtyLogMode,
    ) -> Result<(Self, VcpuSet), KvmError> {
        let config = multiboot::kernel_config(config);
        let regions = config.regions().map_err(KvmError::new)?;
        let boot =
            multiboot::boot_image(image, &regions).map_err(|e| KvmError::new(e.to_string()))?;
        let vm = Vm::new(&regions, mode.ring_entries(), true)?;
        let vcpu = vm.create_vcpu(0)?;
        vm.load(&boot.pieces)?;
        let mut sregs = vcpu
            .get_sregs()
            .map_err(|e| KvmError::sys("KVM_GET_SREGS failed", e))?;
        multiboot::protected_mode_sregs(&mut sregs);
        vcpu.set_sregs(&sregs)
            .map_err(|e| KvmError::sys("KVM_SET_SREGS failed", e))?;
        vcpu.set_regs(&multiboot::entry_regs(&boot))
            .map_err(|e| KvmError::sys("KVM_SET_REGS failed", e))?;
        let msrs = state::supported_msrs(vm.kvm())?;
        let thread = VcpuThread::new(vcpu, guest::DONE_MMIO);
        thread.set_finished_check(finished_check(vm.memory()));
        let set = VcpuSet::new(vec![thread], msrs);
        Ok((SourceMachine { vm, config }, set))
    }

    /// The memory as pages.
    pub fn memory(&self) -> Result<KvmMemory, KvmError> {
        KvmMemory::new(self.vm.memory().clone(), self.vm.slots())
    }

    /// What the guest reports.
    pub fn status(&self) -> Option<GuestStatus> {
        GuestStatus::read(|at| self.vm.read_u64(at))
    }
}

/// Reads the generated guest's "finished" flag.
fn finished_check(memory: &Arc<vm::Memory>) -> vcpu::FinishedCheck {
    let memory = memory.clone();
    Arc::new(move || {
        use vm_memory::{Bytes, GuestAddress};
        memory
            .read_obj::<u64>(GuestAddress(guest::ctrl::STATUS))
            .is_ok_and(|s| s == 1)
    })
}

/// The destination side: a VM with the source's layout, its vCPU waiting for its state.
pub struct DestinationMachine {
    /// The VM.
    pub vm: Vm,
}

impl DestinationMachine {
    /// A VM whose memory has `layout` (region ids 0, 1, … in address order, as a
    /// [`SourceMachine`] makes them), with one vCPU.
    pub fn create(layout: &MemoryLayout) -> Result<(Self, VcpuSet), KvmError> {
        let page = layout.page_size().bytes() as u64;
        if page != 4096 {
            return Err(KvmError::new("a KVM destination takes 4 KiB pages only"));
        }
        let mut regions = Vec::new();
        for (i, r) in layout.regions().iter().enumerate() {
            if r.id != i as u32 || regions.last().is_some_and(|&(b, _)| b >= r.guest_base) {
                return Err(KvmError::new(
                    "a KVM destination takes regions numbered 0, 1, … in address order",
                ));
            }
            regions.push((r.guest_base, r.pages * page));
        }
        let vm = Vm::new(&regions, None, false)?;
        let vcpu = vm.create_vcpu(0)?;
        let msrs = state::supported_msrs(vm.kvm())?;
        let thread = VcpuThread::new(vcpu, guest::DONE_MMIO);
        thread.set_finished_check(finished_check(vm.memory()));
        let set = VcpuSet::new(vec![thread], msrs);
        Ok((DestinationMachine { vm }, set))
    }

    /// The memory as pages.
    pub fn memory(&self) -> Result<KvmMemory, KvmError> {
        KvmMemory::new(self.vm.memory().clone(), self.vm.slots())
    }

    /// What the guest reports.
    pub fn status(&self) -> Option<GuestStatus> {
        GuestStatus::read(|at| self.vm.read_u64(at))
    }
}

/// What an unmigrated run measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GuestRun {
    /// The guest's final hash.
    pub hash: u64,
    /// Writes done.
    pub writes: u64,
    /// From the vCPU's start to its end.
    pub elapsed: Duration,
}

impl GuestRun {
    /// Writes per second.
    pub fn write_rate(&self) -> f64 {
        self.writes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs the guest of `config` (finite: `iterations > 0`) to its end without migrating it.
pub fn run_unmigrated(config: &GuestConfig, timeout: Duration) -> Result<GuestRun, KvmError> {
    if config.iterations == 0 {
        return Err(KvmError::new("a guest that runs forever never ends"));
    }
    let (machine, vcpus) = SourceMachine::create(config, DirtyLogMode::Bitmap)?;
    run_to_end(machine, vcpus, timeout)
}

/// Boots the multiboot kernel `image` in a VM of `config.memory` bytes
/// ([`SourceMachine::boot_kernel`]) and runs it to its end without migrating it; the writes and
/// hash are read from the generated guest's control block ([`multiboot::guest_elf`]).
pub fn run_unmigrated_kernel(
    image: &[u8],
    config: &GuestConfig,
    timeout: Duration,
) -> Result<GuestRun, KvmError> {
    let (machine, vcpus) = SourceMachine::boot_kernel(image, config, DirtyLogMode::Bitmap)?;
    run_to_end(machine, vcpus, timeout)
}

fn run_to_end(
    machine: SourceMachine,
    mut vcpus: VcpuSet,
    timeout: Duration,
) -> Result<GuestRun, KvmError> {
    let t0 = Instant::now();
    vcpus.start()?;
    let end = vcpus.threads()[0].wait_end(timeout);
    let elapsed = t0.elapsed();
    match end {
        Some(VcpuEnd::Done) => {}
        Some(other) => {
            return Err(KvmError::new(format!(
                "the guest did not finish: {other:?}"
            )));
        }
        None => {
            return Err(KvmError::new(format!(
                "the guest did not finish within {timeout:?} ({:?} writes done)",
                machine.status().map(|s| s.progress)
            )));
        }
    }
    let status = machine
        .status()
        .ok_or_else(|| KvmError::new("cannot read the guest's control block"))?;
    Ok(GuestRun {
        hash: status.hash,
        writes: status.progress,
        elapsed,
    })
}
