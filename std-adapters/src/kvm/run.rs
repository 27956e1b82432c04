//! Migrating a KVM guest over connections: the source side ([`migrate_source`]) and the
//! destination side ([`receive`]), on the std driver ([`crate::drive`]). Tests, the CLI
//! (`memferry send/listen --kvm`, `memferry demo`) and the example use them.

use std::io::Read;
use std::time::{Duration, Instant};

use memferry::codec::PageEncoder;
use memferry::error::MigrationError;
use memferry::page::MemoryLayout;
use memferry::receive::{Destination, DestinationConfig};
use memferry::report::{MigrationReport, RoundReport};
use memferry::session::{SessionConfig, Source};
use memferry::strategy::{PreCopy, PreCopyConfig};
use memferry::wire::Verdict;

use super::{DestinationMachine, KvmDestination, KvmError, KvmSource};
use crate::drive::{self, Clock, DriveError, FrameBuffer};
use crate::transport::{BoxRead, BoxWrite};

/// Why a KVM migration failed.
#[derive(Debug)]
pub enum KvmRunError {
    /// Setting up the VM or its parts failed.
    Kvm(KvmError),
    /// The migration failed.
    Drive(DriveError),
    /// The page codec could not be set up.
    Codec(String),
}

impl std::fmt::Display for KvmRunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvmRunError::Kvm(e) => write!(f, "{e}"),
            KvmRunError::Drive(e) => write!(f, "{e}"),
            KvmRunError::Codec(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for KvmRunError {}

impl From<KvmError> for KvmRunError {
    fn from(e: KvmError) -> Self {
        KvmRunError::Kvm(e)
    }
}

impl From<DriveError> for KvmRunError {
    fn from(e: DriveError) -> Self {
        KvmRunError::Drive(e)
    }
}

/// A random id for a migration.
fn session_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Migrates `source` with pre-copy over `channels` (channel 0 first). Whatever happens, dirty
/// logging is off when this returns ([`KvmSource::finish`]); a failure before the switchover
/// leaves the guest running (the engine resumed it).
pub fn migrate_source(
    source: &mut KvmSource,
    config: PreCopyConfig,
    channels: Vec<(BoxRead, BoxWrite)>,
    on_round: impl FnMut(&RoundReport),
) -> Result<MigrationReport, KvmRunError> {
    migrate_source_with(source, config, channels, &|_| Ok(None), on_round)
}

/// Makes the page encoder of one channel for a migration with the given session id (which
/// seeds the dedup hash), or `None` for raw pages.
pub type EncoderFor<'a> = dyn Fn(u64) -> Result<Option<Box<dyn PageEncoder>>, String> + 'a;

/// [`migrate_source`] with a page codec: `encoder_for` makes each channel's encoder (with
/// stateful ones, each page keeps to one channel: the driver turns on channel affinity).
pub fn migrate_source_with(
    source: &mut KvmSource,
    config: PreCopyConfig,
    channels: Vec<(BoxRead, BoxWrite)>,
    encoder_for: &EncoderFor<'_>,
    on_round: impl FnMut(&RoundReport),
) -> Result<MigrationReport, KvmRunError> {
    let session = SessionConfig {
        channels: channels.len() as u16,
        verify: config.verify,
        verify_before_start: config.verify_before_start,
        session_id: session_id(),
        ..SessionConfig::default()
    };
    let encoders = drive::encoders_for(channels.len(), || {
        encoder_for(session.session_id).map_err(KvmRunError::Codec)
    })?;
    let mut engine = Source::new(source.layout().clone(), session, PreCopy::new(config));
    let clock = Clock::new();
    let memory: drive::SharedMemory = source.shared_memory();
    let result = drive::run_source_encoding(
        &mut engine,
        source,
        memory,
        channels,
        encoders,
        &clock,
        on_round,
    );
    let stopped = source.finish();
    // The encoders' CPU time, measured here (the core has no clock), beside its counts.
    let cpu = result?;
    stopped?;
    let mut report = engine.report().clone();
    report.encodings.merge_cpu(&cpu);
    Ok(report)
}

/// What a destination received.
pub struct Received {
    /// The VM (its guest is running).
    pub machine: DestinationMachine,
    /// The host the engine wrote into.
    pub host: KvmDestination,
    /// The receiver's verdict on the digests.
    pub verdict: Option<Verdict>,
    /// When the hello arrived.
    pub hello_at: Instant,
    /// Pages and bytes per encoding, decoding CPU time, and the time from the hello to the
    /// guest running here.
    pub stats: drive::ReceiveStats,
}

/// Receives one migration: reads the hello from (`reader`, `writer`), refuses a guest larger
/// than `max_memory`, accepts the further connections the hello announces (`accept_more`),
/// creates a VM with the source's layout, and runs the receiver until the guest runs here.
pub fn receive(
    reader: BoxRead,
    writer: BoxWrite,
    max_memory: u64,
    accept_more: impl FnMut() -> std::io::Result<(BoxRead, BoxWrite)>,
) -> Result<Received, KvmRunError> {
    receive_with(reader, writer, max_memory, accept_more, |_| {})
}

/// [`receive`], with `prepare` called on the destination host before the receiver runs.
pub fn receive_with(
    mut reader: BoxRead,
    writer: BoxWrite,
    max_memory: u64,
    mut accept_more: impl FnMut() -> std::io::Result<(BoxRead, BoxWrite)>,
    prepare: impl FnOnce(&mut KvmDestination),
) -> Result<Received, KvmRunError> {
    let mut buffer = FrameBuffer::new();
    let hello = drive::read_hello(&mut reader, &mut buffer)?;
    let hello_at = Instant::now();
    let layout: MemoryLayout = hello.layout.clone();
    let bytes = layout.geometry().memory_bytes();
    check_guest_memory(bytes, max_memory, host_available_memory())
        .map_err(|why| DriveError::from(MigrationError::Incompatible(why)))?;
    let mut channels = vec![(reader, buffer, writer)];
    let mut extra: Vec<Option<(BoxRead, FrameBuffer, BoxWrite)>> =
        (1..hello.channels).map(|_| None).collect();
    for _ in 1..hello.channels {
        let (mut r, w) = accept_more().map_err(DriveError::Transport)?;
        let mut b = FrameBuffer::new();
        let (channel, session) = drive::read_join(&mut r as &mut dyn Read, &mut b)?;
        let slot = (channel as usize)
            .checked_sub(1)
            .and_then(|i| extra.get_mut(i))
            .filter(|s| s.is_none() && session == hello.session_id)
            .ok_or_else(|| {
                DriveError::from(MigrationError::Incompatible(format!(
                    "a connection joined as channel {channel} of session {session:#x}, which this migration does not expect"
                )))
            })?;
        *slot = Some((r, b, w));
    }
    channels.extend(extra.into_iter().flatten());
    let (machine, vcpus) = DestinationMachine::create(&layout)?;
    let mut host = KvmDestination::new(machine.vm.fd().clone(), machine.memory()?, vcpus);
    prepare(&mut host);
    let mut destination = Destination::new(layout, DestinationConfig::default());
    // Every decoder timed (the core has no clock): registered before the hello, they stand in
    // for the engine's own.
    let times = drive::DecodeTimes::new();
    for decoder in drive::timed_destination_decoders(&times) {
        destination = destination.with_decoder(decoder);
    }
    let clock = Clock::new();
    drive::run_destination(&mut destination, &mut host, channels, &clock)?;
    let verdict = destination.verdict();
    Ok(Received {
        machine,
        verdict,
        host,
        hello_at,
        stats: drive::ReceiveStats::collect(destination, &times, hello_at),
    })
}

/// Memory the kernel says it can give without swapping (`MemAvailable` of `/proc/meminfo`), if
/// it says.
pub fn host_available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Whether a destination takes a guest of `bytes`: at most `max_memory`, and at most the
/// memory the host has `available` (when known). The error says which limit it exceeds.
pub fn check_guest_memory(
    bytes: u64,
    max_memory: u64,
    available: Option<u64>,
) -> Result<(), String> {
    if bytes > max_memory {
        return Err(format!(
            "the source offers a guest of {bytes} bytes, more than this destination's limit of {max_memory}"
        ));
    }
    match available {
        Some(free) if bytes > free => Err(format!(
            "the source offers a guest of {bytes} bytes, more than the {free} bytes of memory this host has available (MemAvailable)"
        )),
        _ => Ok(()),
    }
}

/// Waits up to `timeout` for the guest of `vcpus`'s first vCPU to end; `Ok` if it finished.
pub fn wait_finished(host: &super::VcpuSet, timeout: Duration) -> Result<(), KvmError> {
    let first = host
        .threads()
        .first()
        .ok_or_else(|| KvmError::new("no vCPU"))?;
    match first.wait_end(timeout) {
        Some(super::vcpu::VcpuEnd::Done) => Ok(()),
        Some(other) => Err(KvmError::new(format!(
            "the guest did not finish: {other:?}"
        ))),
        None => Err(KvmError::new(format!(
            "the guest did not finish within {timeout:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_must_fit_the_limit_and_the_available_memory() {
        assert!(check_guest_memory(1 << 30, 4 << 30, Some(8 << 30)).is_ok());
        assert!(check_guest_memory(1 << 30, 4 << 30, None).is_ok());
        let e = check_guest_memory(8 << 30, 4 << 30, Some(64 << 30)).unwrap_err();
        assert!(e.contains("limit"), "{e}");
        let e = check_guest_memory(8 << 30, u64::MAX, Some(2 << 30)).unwrap_err();
        assert!(e.contains("available"), "{e}");
        assert!(host_available_memory().is_some_and(|m| m > 0));
    }
}
