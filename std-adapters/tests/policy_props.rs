//! Property tests of paper 000's placement policy ([`memferry_std::policy`]): for random clusters of
//! hosts and VMs, every decision moves a VM that runs on an overloaded source to another host of
//! the same cluster that had room for it and stays at or below the threshold; no VM moves twice
//! and no host sends two VMs in one call; destination choice picks the least-loaded qualifying
//! host; and the same inputs give the same decisions.

use std::collections::{BTreeMap, BTreeSet};

use memferry::time::{ByteRate, Nanos};
use memferry_std::policy::{
    choose_destination, rank_vms, ClusterId, HostId, HostInfo, HostLoad, MigrationEstimator,
    Policy, PolicyConfig, VmId, VmInfo, VmSelection,
};
use proptest::prelude::*;

const GIB: u64 = 1 << 30;

fn ratio() -> impl Strategy<Value = f64> {
    prop_oneof![
        8 => 0.0f64..1.0,
        1 => Just(1.0),
        1 => Just(0.0),
    ]
}

fn hosts() -> impl Strategy<Value = Vec<HostInfo>> {
    prop::collection::vec(
        (
            0u32..3,
            ratio(),
            ratio(),
            ratio(),
            ratio(),
            0u64..64,
            1u64..128,
        ),
        1..12,
    )
    .prop_map(|rows| {
        rows.into_iter()
            .enumerate()
            .map(
                |(i, (cluster, cpu, mem, disk, net, free, capacity))| HostInfo {
                    id: HostId(i as u32),
                    cluster: ClusterId(cluster),
                    load: HostLoad::new(cpu, mem, disk, net),
                    free_memory: free * GIB,
                    memory_capacity: capacity * GIB,
                },
            )
            .collect()
    })
}

fn vms(host_count: usize) -> impl Strategy<Value = Vec<VmInfo>> {
    prop::collection::vec(
        (
            0..host_count as u32,
            0.0f64..1.0,
            0u64..32,
            0u64..2_000_000_000,
        ),
        0..30,
    )
    .prop_map(|rows| {
        rows.into_iter()
            .enumerate()
            .map(|(i, (host, cpu_use, gib, dirty))| VmInfo {
                id: VmId(i as u32),
                host: HostId(host),
                cpu_use,
                memory_bytes: gib * GIB,
                dirty_rate: ByteRate(dirty),
            })
            .collect()
    })
}

fn world() -> impl Strategy<Value = (Vec<HostInfo>, Vec<VmInfo>)> {
    hosts().prop_flat_map(|h| {
        let n = h.len();
        (Just(h), vms(n))
    })
}

fn selection() -> impl Strategy<Value = VmSelection> {
    prop_oneof![
        Just(VmSelection::HighestCpu),
        Just(VmSelection::LeastMigrationTime),
        Just(VmSelection::LargestMemory),
    ]
}

prop_compose! {
    fn config()(
        threshold in prop_oneof![1.0f64..40.0, Just(f64::INFINITY)],
        duration_s in 0u64..3,
        selection in selection(),
        bandwidth in 1u64..10_000_000_000,
    ) -> PolicyConfig {
        PolicyConfig {
            threshold,
            duration: Nanos::from_secs(duration_s),
            selection,
            estimator: MigrationEstimator::new(ByteRate(bandwidth)),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn decisions_stay_in_the_cluster_and_fit((hosts, vms) in world(), config in config()) {
        let by_id: BTreeMap<HostId, HostInfo> = hosts.iter().map(|h| (h.id, *h)).collect();
        let mut policy = Policy::new(config);
        let mut twin = Policy::new(config);
        for tick in 0..4u64 {
            let now = Nanos::from_secs(tick);
            let decisions = policy.decide(now, &hosts, &vms);
            prop_assert_eq!(&decisions, &twin.decide(now, &hosts, &vms), "deterministic");
            let mut moved = BTreeSet::new();
            let mut sources = BTreeSet::new();
            let mut used: BTreeMap<HostId, u64> = BTreeMap::new();
            for d in &decisions {
                prop_assert_ne!(d.from, d.to);
                let from = by_id[&d.from];
                let to = by_id[&d.to];
                prop_assert_eq!(from.cluster, to.cluster);
                let vm = vms.iter().find(|v| v.id == d.vm).unwrap();
                prop_assert_eq!(vm.host, d.from);
                prop_assert!(from.load.load() > config.threshold);
                prop_assert!(to.load_with(vm).load() <= config.threshold);
                prop_assert!(moved.insert(d.vm), "a VM moved twice");
                prop_assert!(sources.insert(d.from), "a host sent two VMs");
                let taken = used.entry(d.to).or_insert(0);
                *taken += vm.memory_bytes;
                prop_assert!(*taken <= to.free_memory, "destination overfilled");
            }
            // Nothing fires before the duration has passed.
            if now < config.duration {
                prop_assert!(decisions.is_empty());
            }
        }
    }

    #[test]
    fn destination_is_the_least_loaded_qualifying_host(
        (hosts, vms) in world(),
        source_index in any::<prop::sample::Index>(),
    ) {
        let source = hosts[source_index.index(hosts.len())];
        for vm in &vms {
            let qualifies = |h: &HostInfo| {
                h.cluster == source.cluster && h.id != source.id && h.free_memory >= vm.memory_bytes
            };
            match choose_destination(vm, &source, &hosts) {
                None => prop_assert!(!hosts.iter().any(qualifies)),
                Some(id) => {
                    let chosen = hosts.iter().find(|h| h.id == id).unwrap();
                    prop_assert!(qualifies(chosen));
                    let load = chosen.load_with(vm).load();
                    for other in hosts.iter().filter(|h| qualifies(h)) {
                        let other_load = other.load_with(vm).load();
                        prop_assert!(load < other_load || (load == other_load && id <= other.id));
                    }
                }
            }
        }
    }

    #[test]
    fn ranking_is_a_permutation_in_order(
        (_hosts, vms) in world(),
        selection in selection(),
    ) {
        let estimator = MigrationEstimator::new(ByteRate(1_250_000_000));
        let ranked = rank_vms(selection, &vms, &estimator);
        let mut sorted = ranked.clone();
        sorted.sort();
        let mut ids: Vec<VmId> = vms.iter().map(|v| v.id).collect();
        ids.sort();
        prop_assert_eq!(sorted, ids);
        let get = |id: VmId| vms.iter().find(|v| v.id == id).unwrap();
        for pair in ranked.windows(2) {
            let (a, b) = (get(pair[0]), get(pair[1]));
            let in_order = match selection {
                VmSelection::HighestCpu => a.cpu_use > b.cpu_use || (a.cpu_use == b.cpu_use && a.id < b.id),
                VmSelection::LargestMemory => {
                    a.memory_bytes > b.memory_bytes || (a.memory_bytes == b.memory_bytes && a.id < b.id)
                }
                VmSelection::LeastMigrationTime => {
                    let (ta, tb) = (estimator.migration_time(a), estimator.migration_time(b));
                    ta < tb || (ta == tb && a.id < b.id)
                }
            };
            prop_assert!(in_order);
        }
    }
}
