//! A destination listening for strangers (`memferry listen`, through
//! [`demo::serve_listener`]) against hostile or broken peers: a hello naming more memory than
//! the listener allows, a wrong version, a guest of no pages, a peer that sends nothing or half
//! a frame or trickles it, a source that never opens the connections it announced, and abort
//! messages meant to paint the terminal.
//!
//! Checked: every refusal comes before any guest memory is mapped, quickly, with an abort frame
//! the peer can read; every wait for a peer's opening ends within the idle timeout; words from
//! a peer reach the error text with their control characters escaped; and a real migration
//! through the same listener still works once its handshake is over, however long it then
//! pauses.
//!
//! The `memferry` binary belongs to another package (cargo gives its path only to that
//! package's tests), so these tests drive the library function `listen` is a thin wrapper of:
//! `listen` prints the error's `Display` and exits 1 on any `Err`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use memferry::page::{PageSize, Region};
use memferry::strategy::PreCopyConfig;
use memferry::time::ByteRate;
use memferry::wire::{self, AbortCode, ChannelRole, Frame, Hello};
use memferry_std::demo::{self, GuestOptions, JobError, ListenOptions};
use memferry_std::memory::DestinationHost;
use memferry_std::transport::{loopback, tcp, BoxRead, BoxWrite};

const IDLE: Duration = Duration::from_millis(300);

fn options(max_memory: u64) -> ListenOptions {
    ListenOptions {
        max_memory,
        idle_timeout: IDLE,
        ..ListenOptions::default()
    }
}

/// A hello for one region of `pages` 4 KiB pages.
fn hello(version: u16, pages: u64, channels: u16, session_id: u64) -> Vec<u8> {
    let mut table = Vec::new();
    let regions = wire::region_table(
        &[Region {
            id: 0,
            guest_base: 0,
            pages,
        }],
        &mut table,
    );
    let mut out = Vec::new();
    Frame::Hello(Hello {
        version,
        page_shift: 12,
        channels,
        session_id,
        features: wire::FEATURE_CHECKSUM
            | if channels > 1 {
                wire::FEATURE_CHANNELS
            } else {
                0
            },
        regions,
    })
    .emit(&mut out);
    out
}

fn join(channel: u16, session_id: u64) -> Vec<u8> {
    let mut out = Vec::new();
    Frame::Join {
        channel,
        session_id,
        role: ChannelRole::Bulk,
    }
    .emit(&mut out);
    out
}

/// A listener on 127.0.0.1 serving one migration in a thread.
struct Listening {
    addr: SocketAddr,
    outcome: mpsc::Receiver<Result<DestinationHost, JobError>>,
}

impl Listening {
    fn start(options: ListenOptions) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, outcome) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(demo::serve_listener(&listener, &options, |_| {}));
        });
        Listening { addr, outcome }
    }

    fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(self.addr).unwrap();
        // A listener that never answers fails the test instead of hanging it.
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        stream
    }

    /// The listener's result, which must come within `within`.
    fn outcome(&self, within: Duration) -> Result<DestinationHost, JobError> {
        self.outcome
            .recv_timeout(within)
            .unwrap_or_else(|_| panic!("the listener still holds on after {within:?}"))
    }

    /// The listener's error (it must fail within `within`): what `memferry listen` prints.
    fn error(&self, within: Duration) -> String {
        match self.outcome(within) {
            Ok(_) => panic!("the listener accepted a hostile peer"),
            Err(e) => e.to_string(),
        }
    }
}

/// Reads what the listener sends until it closes: it must be one abort frame.
fn read_abort(stream: &mut TcpStream) -> (AbortCode, String) {
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .expect("the listener closes the connection after its abort");
    let (frame, len) = Frame::parse(&reply)
        .unwrap_or_else(|e| panic!("expected an abort frame, got {} bytes: {e}", reply.len()));
    assert_eq!(len, reply.len(), "nothing after the abort");
    let Frame::Abort { code, message } = frame else {
        panic!("expected an abort, got {frame:?}");
    };
    (code, String::from_utf8_lossy(message).into_owned())
}

/// This process's resident memory.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

#[test]
fn a_guest_larger_than_max_memory_is_refused_quickly_before_any_memory_is_mapped() {
    // The default limit: a stranger's 16 GiB hello is refused, whatever this host has free.
    let defaults = ListenOptions::default();
    assert_eq!(defaults.max_memory, 4 << 30);
    let listening = Listening::start(defaults);
    let before = rss();
    let mut stream = listening.connect();
    let asked = Instant::now();
    stream.write_all(&hello(2, 4 << 20, 1, 7)).unwrap();
    let (code, message) = read_abort(&mut stream);
    let took = asked.elapsed();
    assert_eq!(code, AbortCode::Incompatible, "{message}");
    assert!(
        message.contains("16.00 GiB") && message.contains("limit of 4.00 GiB (--max-memory)"),
        "{message}"
    );
    assert!(took < Duration::from_secs(1), "refused after {took:?}");
    let error = listening.error(Duration::from_secs(1));
    assert!(error.contains("--max-memory"), "{error}");
    let grew = rss().saturating_sub(before);
    assert!(grew < 64 << 20, "the listener took {grew} bytes");

    // An operator's smaller limit.
    let listening = Listening::start(options(8 << 20));
    let mut stream = listening.connect();
    stream.write_all(&hello(2, 4096, 1, 7)).unwrap();
    let (_, message) = read_abort(&mut stream);
    assert!(
        message.contains("16.00 MiB") && message.contains("limit of 8.00 MiB"),
        "{message}"
    );
    listening.error(Duration::from_secs(1));
}

#[test]
fn a_hello_within_the_limit_maps_no_memory_until_pages_arrive() {
    let listening = Listening::start(options(2 << 30));
    let before = rss();
    let mut stream = listening.connect();
    stream.write_all(&hello(2, 1 << 18, 1, 7)).unwrap(); // 1 GiB
                                                         // The listener answers Accept once it has mapped the guest and the engine runs.
    let mut reply = [0u8; 64];
    let mut got = 0;
    let accept = loop {
        let n = stream.read(&mut reply[got..]).expect("an Accept");
        assert!(n > 0, "the listener closed instead of accepting");
        got += n;
        match Frame::parse(&reply[..got]) {
            Ok((frame, _)) => break frame.kind(),
            Err(wire::WireError::Incomplete { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(accept, Some(wire::FrameKind::Accept));
    let grew = rss().saturating_sub(before);
    assert!(
        grew < 128 << 20,
        "a 1 GiB hello and nothing else made the listener take {} MiB",
        grew >> 20
    );
    drop(stream);
    let error = listening.error(Duration::from_secs(3));
    assert!(error.contains("closed"), "{error}");
}

#[test]
fn a_bad_version_is_refused_with_an_abort() {
    let listening = Listening::start(options(1 << 30));
    let mut stream = listening.connect();
    stream.write_all(&hello(1, 1 << 20, 1, 7)).unwrap();
    let (code, message) = read_abort(&mut stream);
    assert_eq!(code, AbortCode::Incompatible, "{message}");
    assert!(message.contains("version 1"), "{message}");
    let error = listening.error(Duration::from_secs(1));
    assert!(error.contains("version 1"), "{error}");
}

#[test]
fn a_bad_hello_gets_an_abort_on_any_transport() {
    // serve over the in-process loopback (the demo's destination): no timeouts, same answers.
    let ((mut src_r, mut src_w), (dst_r, dst_w)) = loopback::pair();
    let destination = std::thread::spawn(move || demo::serve(dst_r, dst_w, 1 << 30));
    let mut bad = hello(2, 16, 1, 7);
    bad[12] ^= 0xff; // the checksum no longer matches
    src_w.write_all(&bad).unwrap();
    let mut reply = Vec::new();
    src_r.read_to_end(&mut reply).unwrap();
    let (frame, _) = Frame::parse(&reply).unwrap();
    let Frame::Abort { code, message } = frame else {
        panic!("expected an abort, got {frame:?}");
    };
    assert_eq!(code, AbortCode::BadFrame);
    assert!(
        String::from_utf8_lossy(message).contains("checksum"),
        "{}",
        String::from_utf8_lossy(message)
    );
    assert!(destination.join().unwrap().is_err());
}

#[test]
fn a_hello_of_zero_pages_is_told_so() {
    let listening = Listening::start(options(1 << 30));
    let mut stream = listening.connect();
    stream.write_all(&hello(2, 0, 1, 7)).unwrap();
    let (code, message) = read_abort(&mut stream);
    assert_eq!(code, AbortCode::Incompatible);
    assert!(
        message.contains("a guest of 0 pages"),
        "the message says what is wrong: {message}"
    );
    let error = listening.error(Duration::from_secs(1));
    assert!(error.contains("0 pages"), "{error}");
}

/// Checks a connection given up on for its silence: an abort saying so, soon after `IDLE`.
fn times_out(listening: &Listening, stream: &mut TcpStream, since: Instant, expect: &str) {
    let (code, message) = read_abort(stream);
    let took = since.elapsed();
    assert_eq!(code, AbortCode::Timeout, "{message}");
    assert!(message.contains(expect), "{message}");
    assert!(
        took >= IDLE - Duration::from_millis(50) && took < IDLE + Duration::from_millis(700),
        "gave up after {took:?} for an idle timeout of {IDLE:?}"
    );
    let error = listening.error(Duration::from_secs(1));
    assert!(error.contains("within 300ms (--idle-timeout)"), "{error}");
    assert!(error.contains(expect), "{error}");
}

#[test]
fn an_idle_connection_times_out() {
    let listening = Listening::start(options(1 << 30));
    let mut stream = listening.connect();
    let since = Instant::now();
    times_out(&listening, &mut stream, since, "it sent nothing");
}

#[test]
fn a_half_sent_hello_times_out() {
    let listening = Listening::start(options(1 << 30));
    let mut stream = listening.connect();
    let since = Instant::now();
    let whole = hello(2, 1024, 1, 7);
    stream.write_all(&whole[..20]).unwrap();
    let expect = format!("it sent 20 of the {} bytes", whole.len());
    times_out(&listening, &mut stream, since, &expect);
}

#[test]
fn a_trickled_hello_times_out_too() {
    // A byte every 100 ms never leaves a read waiting 300 ms: the deadline is for the whole
    // frame.
    let listening = Listening::start(options(1 << 30));
    let mut stream = listening.connect();
    let since = Instant::now();
    let whole = hello(2, 1024, 1, 7);
    let mut writer = stream.try_clone().unwrap();
    std::thread::spawn(move || {
        for b in &whole {
            if writer.write_all(std::slice::from_ref(b)).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    times_out(&listening, &mut stream, since, "bytes of its first frame");
}

#[test]
fn a_source_that_does_not_open_the_connections_it_announced_times_out() {
    let listening = Listening::start(options(1 << 30));
    let mut stream = listening.connect();
    stream.write_all(&hello(2, 1024, 3, 7)).unwrap();
    let since = Instant::now();
    times_out(&listening, &mut stream, since, "opened only 1");
}

#[test]
fn a_half_sent_join_times_out() {
    let listening = Listening::start(options(1 << 30));
    let mut first = listening.connect();
    first.write_all(&hello(2, 1024, 2, 7)).unwrap();
    let mut second = listening.connect();
    let since = Instant::now();
    second.write_all(&join(1, 7)[..10]).unwrap();
    let (code, message) = read_abort(&mut second);
    assert_eq!(code, AbortCode::Timeout, "{message}");
    assert!(message.contains("no join"), "{message}");
    // The source, waiting on its first connection, is told too.
    let (code, _) = read_abort(&mut first);
    assert_eq!(code, AbortCode::Timeout);
    assert!(since.elapsed() < IDLE + Duration::from_millis(700));
    let error = listening.error(Duration::from_secs(1));
    assert!(error.contains("--idle-timeout"), "{error}");
}

const PAINT: &str = "\x1b[2J\nverified";

fn assert_escaped(error: &str) {
    assert!(
        !error.chars().any(char::is_control),
        "control characters reach the terminal: {error:?}"
    );
    assert!(
        error.contains(r"\u{1b}[2J\nverified"),
        "the peer's words are shown, escaped: {error}"
    );
}

#[test]
fn a_peer_abort_is_printed_with_its_control_characters_escaped() {
    // A "source" that opens with an abort.
    let listening = Listening::start(options(1 << 30));
    let mut stream = listening.connect();
    let mut abort = Vec::new();
    Frame::Abort {
        code: AbortCode::Cancelled,
        message: PAINT.as_bytes(),
    }
    .emit(&mut abort);
    stream.write_all(&abort).unwrap();
    assert_escaped(&listening.error(Duration::from_secs(1)));

    // A "destination" that answers a hello with one (what `memferry send` prints).
    let ((src_r, src_w), (mut dst_r, mut dst_w)) = loopback::pair();
    std::thread::spawn(move || {
        let mut first = [0u8; 8];
        dst_r.read_exact(&mut first).unwrap();
        let mut abort = Vec::new();
        Frame::Abort {
            code: AbortCode::Incompatible,
            message: PAINT.as_bytes(),
        }
        .emit(&mut abort);
        dst_w.write_all(&abort).unwrap();
        // Keep reading until the source hangs up, so its writes do not fail first.
        let _ = std::io::copy(&mut dst_r, &mut std::io::sink());
    });
    let mut source = demo::prepare_source(&small_guest(), 1).unwrap();
    let result = demo::migrate(
        &mut source,
        PreCopyConfig::default(),
        src_r,
        src_w,
        ByteRate::UNLIMITED,
        |_| {},
    );
    let Err(e) = result else {
        panic!("the migration succeeded against an aborting destination")
    };
    assert_escaped(&e.to_string());
}

fn small_guest() -> GuestOptions {
    GuestOptions {
        memory: 8 << 20,
        page_size: PageSize::DEFAULT,
        zero_fraction: 0.3,
        workload: None,
    }
}

/// A writer that stalls for `pause` before its second write: the source's first write is its
/// hello (or join), its second comes after the listener accepted.
struct StallAfterFirstWrite {
    inner: BoxWrite,
    writes: u32,
    pause: Duration,
}

impl Write for StallAfterFirstWrite {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writes += 1;
        if self.writes == 2 {
            std::thread::sleep(self.pause);
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[test]
fn a_migration_through_the_listener_may_pause_longer_than_the_idle_timeout_once_accepted() {
    let listening = Listening::start(options(1 << 30));
    let mut source = demo::prepare_source(&small_guest(), 5).unwrap();
    let ends: Vec<(BoxRead, BoxWrite)> = (0..2)
        .map(|_| {
            let (r, w) = tcp::connect(listening.addr).unwrap();
            let w: BoxWrite = Box::new(StallAfterFirstWrite {
                inner: w,
                writes: 0,
                pause: IDLE * 2,
            });
            (r, w)
        })
        .collect();
    let report = demo::migrate_channels(
        &mut source,
        PreCopyConfig::default(),
        ends,
        ByteRate::UNLIMITED,
        |_| {},
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.verified, Some(true));
    let destination = listening
        .outcome(Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        destination.region().snapshot(),
        source.region().snapshot(),
        "the destination holds the source's memory"
    );
}
