//! A real KVM guest, migrated live (run whenever /dev/kvm can be used; each test prints why it
//! is skipped otherwise).

use std::time::Duration;

use memferry_std::kvm::guest::{self, GuestConfig};
use memferry_std::kvm::run_unmigrated;
use memferry_std::kvm::vm::kvm_usable;

fn kvm_or_skip(test: &str) -> bool {
    match kvm_usable() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

#[test]
fn the_guest_runs_at_cpl3_and_its_hash_is_the_reference_hash() {
    if !kvm_or_skip("the_guest_runs_at_cpl3_and_its_hash_is_the_reference_hash") {
        return;
    }
    let config = GuestConfig {
        memory: 64 << 20,
        iterations: 2_000_000,
        sweep_share: 0.05,
        ..GuestConfig::default()
    };
    let run = run_unmigrated(&config, Duration::from_secs(60)).unwrap();
    eprintln!(
        "guest: {} writes in {:?}: {:.1} M writes/s",
        run.writes,
        run.elapsed,
        run.write_rate() / 1e6
    );
    assert_eq!(run.writes, config.iterations);
    assert_eq!(run.hash, guest::expected_hash(&config).unwrap());
}
