//! Live-migrating a KVM guest between two VMs with memferry: what a hypervisor adds to its VMM.
//!
//! The VMM parts (a VM on kvm-ioctls, memory on vm-memory with two memslots and a hole, a vCPU
//! thread) are the ones `memferry_std::kvm` ships; a VMM would use its own. The integration is
//! the rest: the adapters over them, the engine, and a transport (an in-process loopback here;
//! `memferry_std::transport::tcp` between hosts).
//!
//! Run: `cargo run --release -p memferry-std --example kvm_migrate` (needs /dev/kvm).

use std::error::Error;
use std::time::Duration;

use memferry::receive::{Destination, DestinationConfig};
use memferry::session::{SessionConfig, Source};
use memferry::strategy::{PreCopy, PreCopyConfig};
use memferry_std::drive::{self, Clock, FrameBuffer};
use memferry_std::kvm::dirty::DirtyLogMode;
use memferry_std::kvm::guest::{self, GuestConfig};
use memferry_std::kvm::memory::KvmMemory;
use memferry_std::kvm::vcpu::VcpuThread;
use memferry_std::kvm::vm::{kvm_usable, Vm};
use memferry_std::kvm::{state, KvmDestination, KvmSource, VcpuSet};
use memferry_std::transport::loopback;

/// The VMM's side: a VM with `regions`, and its one vCPU (registers set when `boot`).
fn make_vm(
    regions: &[(u64, u64)],
    boot: Option<&GuestConfig>,
) -> Result<(Vm, VcpuSet), Box<dyn Error>> {
    let vm = Vm::new(regions, None, boot.is_some())?;
    let vcpu = vm.create_vcpu(0)?;
    if let Some(config) = boot {
        vm.load(&guest::image(config, vcpu.get_tsc_khz()?)?)?;
        let mut sregs = vcpu.get_sregs()?;
        guest::long_mode_sregs(&mut sregs);
        vcpu.set_sregs(&sregs)?;
        vcpu.set_regs(&guest::initial_regs())?;
    }
    let msrs = state::supported_msrs(vm.kvm())?;
    Ok((
        vm,
        VcpuSet::new(vec![VcpuThread::new(vcpu, guest::DONE_MMIO)], msrs),
    ))
}

fn main() -> Result<(), Box<dyn Error>> {
    if let Err(why) = kvm_usable() {
        println!("skipped: {why}");
        return Ok(());
    }
    let config = GuestConfig {
        memory: 64 << 20,
        iterations: 20_000_000,
        ..GuestConfig::default()
    };
    let regions = config.regions()?;

    // Source: the running guest.
    let (src_vm, mut vcpus) = make_vm(&regions, Some(&config))?;
    vcpus.start()?;
    std::thread::sleep(Duration::from_millis(100));
    // 1. Memory as pages: region i of the vm-memory object is memslot i.
    let memory = KvmMemory::new(src_vm.memory().clone(), src_vm.slots())?;
    // 2. The source host: dirty log (manual protect; logging starts now), vCPUs, state.
    let mut source = KvmSource::new(src_vm.fd().clone(), memory, vcpus, DirtyLogMode::MANUAL)?;

    // Destination: an empty VM of the same layout, its vCPU waiting for the state.
    let (near, (far_r, far_w)) = loopback::pair();
    let layout = source.layout().clone();
    let dst_regions: Vec<(u64, u64)> = layout
        .regions()
        .iter()
        .map(|r| (r.guest_base, r.pages * 4096))
        .collect();
    let destination = std::thread::spawn(move || -> Result<u64, String> {
        let (dst_vm, vcpus) = make_vm(&dst_regions, None).map_err(|e| e.to_string())?;
        let memory =
            KvmMemory::new(dst_vm.memory().clone(), dst_vm.slots()).map_err(|e| e.to_string())?;
        let mut host = KvmDestination::new(dst_vm.fd().clone(), memory, vcpus);
        let mut reader = far_r;
        let mut buffer = FrameBuffer::new();
        let hello = drive::read_hello(&mut reader, &mut buffer).map_err(|e| e.to_string())?;
        let mut engine = Destination::new(hello.layout, DestinationConfig::default());
        drive::run_destination(
            &mut engine,
            &mut host,
            vec![(reader, buffer, far_w)],
            &Clock::new(),
        )
        .map_err(|e| e.to_string())?;
        // The guest runs here now; let it finish and read its result.
        host.vcpus().threads()[0].wait_end(Duration::from_secs(120));
        dst_vm.read_u64(guest::ctrl::HASH).ok_or("no hash".into())
    });

    // 3. The engine, over the transport.
    let session = SessionConfig {
        channels: 1,
        ..SessionConfig::default()
    };
    let mut engine = Source::new(layout, session, PreCopy::new(PreCopyConfig::default()));
    let result = drive::run_source(&mut engine, &mut source, vec![near], &Clock::new(), |r| {
        println!("round {}: {} pages", r.round, r.pages)
    });
    // 4. Whatever happened, stop dirty logging.
    source.finish()?;
    result?;
    let report = engine.report();
    let hash = destination.join().map_err(|_| "destination panicked")??;
    println!(
        "migrated {} MiB: downtime {:.1} ms (vCPU pause {:?}), verified {:?}; final hash {hash:#x} (reference {:#x})",
        config.memory >> 20,
        report.downtime.0 as f64 / 1e6,
        source.pause_times().iter().sum::<Duration>(),
        report.verified,
        guest::expected_hash(&config)?
    );
    Ok(())
}
