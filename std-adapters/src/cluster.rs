//! `memferry cluster`: a small datacenter over virtual time, run by paper 000's placement
//! policy ([`crate::policy`]), each migration it triggers simulated by the real engine
//! ([`crate::sim`]).
//!
//! Hosts sit in clusters; VMs on them have a CPU demand that changes every `phase` (a seeded
//! random level), a memory size and a dirty rate. Every `tick` each host's load
//! (1/((1−θcpu)(1−θmem)(1−θdisk)(1−θnet))) is fed to the policy; a host above the threshold for
//! the policy's duration sheds one VM to the least-loaded host of its own cluster. The VM moves
//! once its simulated migration completes; migrations load both hosts' network meanwhile.

use memferry::time::{ByteRate, Nanos};
use rand_core::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::Serialize;

use crate::policy::{
    ClusterId, HostId, HostInfo, HostLoad, MigrationEstimator, Policy, PolicyConfig, VmId, VmInfo,
    VmSelection,
};
use crate::sim::{simulate, LinkModel, Scenario, WorkloadModel};
use crate::workload::below;

/// The datacenter and the policy's settings.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterConfig {
    /// Clusters.
    pub clusters: u32,
    /// Hosts in each cluster.
    pub hosts_per_cluster: u32,
    /// VMs in all, spread round-robin over hosts at start.
    pub vms: u32,
    /// Memory of each host.
    pub host_memory: u64,
    /// Memory of each VM (the simulator migrates this much).
    pub vm_memory: u64,
    /// How long the datacenter runs.
    pub duration: Nanos,
    /// How often loads are sampled.
    pub tick: Nanos,
    /// How often a VM's CPU demand changes.
    pub phase: Nanos,
    /// Load threshold.
    pub threshold: f64,
    /// How long a host must stay above it (paper 000's T).
    pub over_for: Nanos,
    /// Which VM leaves a busy host.
    #[serde(skip)]
    pub selection: VmSelection,
    /// Migration link bandwidth.
    pub bandwidth: ByteRate,
    /// Seed.
    pub seed: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            clusters: 2,
            hosts_per_cluster: 4,
            vms: 24,
            host_memory: 64 << 30,
            vm_memory: 256 << 20,
            duration: Nanos::from_secs(600),
            tick: Nanos::from_secs(5),
            phase: Nanos::from_secs(60),
            threshold: 5.0,
            over_for: Nanos::from_secs(30),
            selection: VmSelection::HighestCpu,
            bandwidth: ByteRate::from_bits_per_sec(10_000_000_000),
            seed: 1,
        }
    }
}

/// One migration the policy triggered.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterMigration {
    /// When the policy decided, seconds.
    pub at_s: f64,
    /// The VM.
    pub vm: u32,
    /// From host.
    pub from: u32,
    /// To host.
    pub to: u32,
    /// The VM's CPU share when chosen.
    pub cpu_use: f64,
    /// Simulated total migration time, ms.
    pub total_time_ms: f64,
    /// Simulated downtime, ms.
    pub downtime_ms: f64,
    /// Bytes on the wire.
    pub bytes: u64,
}

/// What happened.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterReport {
    /// The settings.
    pub config: ClusterConfig,
    /// Every migration, in order.
    pub migrations: Vec<ClusterMigration>,
    /// Host-seconds spent above the threshold.
    pub seconds_over_threshold: f64,
    /// Host-seconds above the threshold had no VM moved (the same run with the policy off).
    pub seconds_over_threshold_without_policy: f64,
    /// Bytes all migrations put on the wire.
    pub bytes_moved: u64,
    /// Sum of downtimes, ms.
    pub total_downtime_ms: f64,
}

struct Vm {
    host: u32,
    level: f64,
    dirty_rate: f64,
    /// Until when it is migrating (and to where).
    moving: Option<(Nanos, u32)>,
}

/// Runs the datacenter. `policy_on: false` runs the same demand with no migrations, the
/// baseline for time over threshold.
fn run_once(config: &ClusterConfig, policy_on: bool) -> Result<ClusterReport, String> {
    let hosts = config.clusters * config.hosts_per_cluster;
    if hosts < 2 || config.vms == 0 {
        return Err("a cluster needs at least two hosts and one VM".into());
    }
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(config.seed);
    let mut vms: Vec<Vm> = (0..config.vms)
        .map(|i| Vm {
            host: i % hosts,
            level: 0.0,
            dirty_rate: 5_000.0 + below(rng.next_u64(), 45_000) as f64,
            moving: None,
        })
        .collect();
    let mut policy = Policy::new(PolicyConfig {
        threshold: config.threshold,
        duration: config.over_for,
        selection: config.selection,
        estimator: MigrationEstimator::new(config.bandwidth),
    });
    let mut report = ClusterReport {
        config: config.clone(),
        migrations: Vec::new(),
        seconds_over_threshold: 0.0,
        seconds_over_threshold_without_policy: 0.0,
        bytes_moved: 0,
        total_downtime_ms: 0.0,
    };
    let mut now = Nanos::ZERO;
    let mut next_phase = Nanos::ZERO;
    while now < config.duration {
        if now >= next_phase {
            // New CPU demand for every VM: mostly light, sometimes heavy.
            for vm in &mut vms {
                let r = below(rng.next_u64(), 1000) as f64 / 1000.0;
                vm.level = if r < 0.3 { 0.3 + r } else { 0.02 + r * 0.1 };
            }
            next_phase += config.phase;
        }
        // Migrations that finished move their VM.
        for vm in &mut vms {
            if let Some((done, to)) = vm.moving {
                if done <= now {
                    vm.host = to;
                    vm.moving = None;
                }
            }
        }
        let host_infos: Vec<HostInfo> = (0..hosts)
            .map(|h| {
                let on: Vec<&Vm> = vms.iter().filter(|v| v.host == h).collect();
                let cpu: f64 = on.iter().map(|v| v.level).sum();
                let mem = on.len() as u64 * config.vm_memory;
                let migrating = vms.iter().any(|v| {
                    v.moving.is_some_and(|(_, to)| to == h) || (v.moving.is_some() && v.host == h)
                });
                HostInfo {
                    id: HostId(h),
                    cluster: ClusterId(h / config.hosts_per_cluster),
                    load: HostLoad::new(
                        cpu.min(0.99),
                        mem as f64 / config.host_memory as f64,
                        0.1,
                        if migrating { 0.4 } else { 0.1 },
                    ),
                    free_memory: config.host_memory.saturating_sub(mem),
                    memory_capacity: config.host_memory,
                }
            })
            .collect();
        let tick_s = config.tick.as_secs_f64();
        report.seconds_over_threshold += host_infos
            .iter()
            .filter(|h| h.load.load() > config.threshold)
            .count() as f64
            * tick_s;
        if policy_on {
            let vm_infos: Vec<VmInfo> = vms
                .iter()
                .enumerate()
                .filter(|(_, v)| v.moving.is_none())
                .map(|(i, v)| VmInfo {
                    id: VmId(i as u32),
                    host: HostId(v.host),
                    cpu_use: v.level,
                    memory_bytes: config.vm_memory,
                    dirty_rate: ByteRate((v.dirty_rate * 4096.0) as u64),
                })
                .collect();
            for d in policy.decide(now, &host_infos, &vm_infos) {
                let vm = &mut vms[d.vm.0 as usize];
                let scenario = Scenario {
                    memory: config.vm_memory,
                    workload: WorkloadModel::HotCold {
                        rate: vm.dirty_rate,
                        hot_fraction: 0.05,
                        hot_share: 0.9,
                    },
                    link: LinkModel {
                        bandwidth: config.bandwidth,
                        ..LinkModel::default()
                    },
                    seed: config.seed ^ ((d.vm.0 as u64) << 32) ^ now.0,
                    ..Scenario::default()
                };
                let outcome = simulate(&scenario)?;
                let r = &outcome.report;
                vm.moving = Some((now + r.total_time, d.to.0));
                report.bytes_moved += r.bytes_sent;
                report.total_downtime_ms += r.downtime.as_millis_f64();
                report.migrations.push(ClusterMigration {
                    at_s: now.as_secs_f64(),
                    vm: d.vm.0,
                    from: d.from.0,
                    to: d.to.0,
                    cpu_use: vm.level,
                    total_time_ms: r.total_time.as_millis_f64(),
                    downtime_ms: r.downtime.as_millis_f64(),
                    bytes: r.bytes_sent,
                });
            }
        }
        now += config.tick;
    }
    Ok(report)
}

/// Runs the datacenter with the policy, and again without it for the baseline.
pub fn run(config: &ClusterConfig) -> Result<ClusterReport, String> {
    let mut report = run_once(config, true)?;
    report.seconds_over_threshold_without_policy = run_once(config, false)?.seconds_over_threshold;
    Ok(report)
}

/// The report as text.
pub fn table(r: &ClusterReport) -> String {
    let c = &r.config;
    let mut s = format!(
        "{} clusters × {} hosts, {} VMs of {} MiB, {} s in ticks of {} s; threshold {} for {} s\n\n",
        c.clusters,
        c.hosts_per_cluster,
        c.vms,
        c.vm_memory >> 20,
        c.duration.as_secs_f64(),
        c.tick.as_secs_f64(),
        c.threshold,
        c.over_for.as_secs_f64()
    );
    s.push_str("  at s   vm  from → to  cpu    total ms  downtime ms  MB sent\n");
    for m in &r.migrations {
        s.push_str(&format!(
            "{:>6.0}  {:>3}  {:>4} → {:<3} {:>4.2}  {:>9.1}  {:>11.1}  {:>7.1}\n",
            m.at_s,
            m.vm,
            m.from,
            m.to,
            m.cpu_use,
            m.total_time_ms,
            m.downtime_ms,
            m.bytes as f64 / 1e6
        ));
    }
    s.push_str(&format!(
        "\nmigrations triggered: {}\nhost-seconds over threshold: {:.0} (without the policy: {:.0})\nbytes moved: {:.1} MB, downtime in all: {:.1} ms\n",
        r.migrations.len(),
        r.seconds_over_threshold,
        r.seconds_over_threshold_without_policy,
        r.bytes_moved as f64 / 1e6,
        r.total_downtime_ms
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_moves_vms_within_clusters_and_cuts_overload() {
        let config = ClusterConfig {
            vm_memory: 32 << 20,
            ..ClusterConfig::default()
        };
        let r = run(&config).unwrap();
        assert!(
            !r.migrations.is_empty(),
            "a busy datacenter triggers migrations"
        );
        for m in &r.migrations {
            assert_ne!(m.from, m.to);
            assert_eq!(
                m.from / config.hosts_per_cluster,
                m.to / config.hosts_per_cluster,
                "same cluster"
            );
        }
        assert!(
            r.seconds_over_threshold < r.seconds_over_threshold_without_policy,
            "the policy cuts the time hosts spend overloaded"
        );
        assert_eq!(
            r.bytes_moved,
            r.migrations.iter().map(|m| m.bytes).sum::<u64>()
        );
        let again = run(&config).unwrap();
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            serde_json::to_string(&again).unwrap(),
            "deterministic"
        );
    }
}
