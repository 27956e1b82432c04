//! Byte-stream transports for the driver, each split into a reading and a writing half so the
//! source can read the destination's replies while it writes pages.
//!
//! Implementations:
//! - [`loopback`]: an in-process pair of streams (buffers handed over through channels, no
//!   syscalls), for tests and the single-process demo.
//! - [`tcp`]: `std::net` TCP with Nagle off, split with `try_clone`.
//! - [`RateLimited`]: a token-bucket writer that models a slower link on either of them.
//! - [`FaultInjector`]: a writer that corrupts one byte at a chosen stream offset, to test that
//!   a damaged frame aborts the migration cleanly.

use std::any::Any;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use memferry::time::ByteRate;

/// A reading half that can be moved to another thread.
pub type BoxRead = Box<dyn Read + Send>;
/// A writing half that can be moved to another thread. Any `Write + Send + 'static` type is
/// one; the driver looks through it for a TCP socket it can ask about acknowledgements
/// ([`UnackedProbe`]).
pub trait WriteHalf: Write + Send + Any {}

impl<T: Write + Send + Any> WriteHalf for T {}

/// A writing half that can be moved to another thread.
pub type BoxWrite = Box<dyn WriteHalf>;

/// Asks the kernel how many bytes written to a TCP connection the peer has not acknowledged
/// (`TIOCOUTQ`, Linux's `SIOCOUTQ`): a byte in a socket buffer is not a byte sent, so the
/// driver reports only acknowledged bytes as delivered.
pub struct UnackedProbe(TcpStream);

impl UnackedProbe {
    /// A probe for `writer` if it is a TCP stream, directly or inside this module's
    /// [`RateLimited`] or [`FaultInjector`]; `None` for other transports.
    pub fn for_writer(writer: &dyn WriteHalf) -> Option<Self> {
        let any: &dyn Any = writer;
        if let Some(stream) = any.downcast_ref::<TcpStream>() {
            return stream.try_clone().ok().map(UnackedProbe);
        }
        if let Some(limited) = any.downcast_ref::<RateLimited<BoxWrite>>() {
            return Self::for_writer(&*limited.inner);
        }
        if let Some(faulty) = any.downcast_ref::<FaultInjector<BoxWrite>>() {
            return Self::for_writer(&*faulty.inner);
        }
        None
    }

    /// Bytes written and not yet acknowledged, or `None` if the kernel does not say.
    pub fn unacked(&self) -> Option<u64> {
        unacked_bytes(&self.0)
    }
}

#[cfg(target_os = "linux")]
fn unacked_bytes(stream: &TcpStream) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ on a socket writes one c_int through the pointer, which is valid and
    // lives across the call; the fd is open for as long as `stream` is borrowed.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    (rc == 0 && queued >= 0).then_some(queued as u64)
}

#[cfg(not(target_os = "linux"))]
fn unacked_bytes(_stream: &TcpStream) -> Option<u64> {
    None
}

/// In-process streams.
pub mod loopback {
    use super::*;
    use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

    /// The writing half of a loopback stream.
    pub struct LoopbackWriter {
        tx: SyncSender<Vec<u8>>,
    }

    /// The reading half of a loopback stream.
    pub struct LoopbackReader {
        rx: Receiver<Vec<u8>>,
        current: Vec<u8>,
        at: usize,
    }

    /// One direction: what is written to the writer is read from the reader. At most `depth`
    /// writes are in flight, so a fast writer waits for the reader as on a socket.
    pub fn stream(depth: usize) -> (LoopbackWriter, LoopbackReader) {
        let (tx, rx) = sync_channel(depth);
        (
            LoopbackWriter { tx },
            LoopbackReader {
                rx,
                current: Vec::new(),
                at: 0,
            },
        )
    }

    impl Write for LoopbackWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if buf.is_empty() {
                return Ok(0);
            }
            self.tx.send(buf.to_vec()).map_err(|_| {
                io::Error::new(io::ErrorKind::BrokenPipe, "loopback reader is gone")
            })?;
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Read for LoopbackReader {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.at == self.current.len() {
                match self.rx.recv() {
                    Ok(next) => {
                        self.current = next;
                        self.at = 0;
                    }
                    // The writer is gone: end of stream.
                    Err(_) => return Ok(0),
                }
            }
            let n = buf.len().min(self.current.len() - self.at);
            buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    /// Two connected endpoints, each a (reader, writer) pair: what A writes, B reads.
    pub fn pair() -> ((BoxRead, BoxWrite), (BoxRead, BoxWrite)) {
        let (a_tx, b_rx) = stream(8);
        let (b_tx, a_rx) = stream(8);
        (
            (Box::new(a_rx), Box::new(a_tx)),
            (Box::new(b_rx), Box::new(b_tx)),
        )
    }
}

/// How fast a connection carries data one way in 1 MiB writes (the size the driver writes):
/// `bytes` written into `ends.0`'s writer and read in full from `ends.1`'s reader, timed from
/// the first write to the last byte read. What an unlimited link (loopback TCP, the in-process
/// loopback) really carries, for the adaptive codec to weigh its encoders against: a
/// compressor slower than the link slows the migration however much it saves.
#[allow(clippy::type_complexity)]
pub fn probe_rate(
    ends: ((BoxRead, BoxWrite), (BoxRead, BoxWrite)),
    bytes: u64,
) -> io::Result<ByteRate> {
    const CHUNK: usize = 1 << 20;
    let ((_near_reader, mut writer), (mut reader, _far_writer)) = ends;
    let started = Instant::now();
    let reading = std::thread::spawn(move || -> io::Result<Instant> {
        let mut buf = vec![0u8; CHUNK];
        let mut left = bytes;
        while left > 0 {
            let want = left.min(CHUNK as u64) as usize;
            match reader.read(&mut buf[..want])? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => left -= n as u64,
            }
        }
        Ok(Instant::now())
    });
    let chunk = vec![0x5au8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        writer.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    writer.flush()?;
    let done = reading
        .join()
        .map_err(|_| io::Error::other("the probe's reader panicked"))??;
    Ok(ByteRate::measured(
        bytes,
        memferry::time::Nanos(
            done.duration_since(started)
                .as_nanos()
                .min(u64::MAX as u128) as u64,
        ),
    ))
}

/// TCP streams.
pub mod tcp {
    use super::*;
    use std::net::{TcpListener, ToSocketAddrs};

    /// Splits a connected stream into halves (Nagle off: frames are already batched).
    pub fn split(stream: TcpStream) -> io::Result<(BoxRead, BoxWrite)> {
        stream.set_nodelay(true)?;
        let reader = stream.try_clone()?;
        Ok((Box::new(reader), Box::new(stream)))
    }

    /// Two connected endpoints over TCP on 127.0.0.1, each a (reader, writer) pair.
    #[allow(clippy::type_complexity)]
    pub fn pair() -> io::Result<((BoxRead, BoxWrite), (BoxRead, BoxWrite))> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let near = connect(listener.local_addr()?)?;
        let (r, w, _) = accept(&listener)?;
        Ok((near, (r, w)))
    }

    /// Connects to `addr`.
    pub fn connect(addr: impl ToSocketAddrs) -> io::Result<(BoxRead, BoxWrite)> {
        split(TcpStream::connect(addr)?)
    }

    /// Accepts one connection on `listener`.
    pub fn accept(listener: &TcpListener) -> io::Result<(BoxRead, BoxWrite, std::net::SocketAddr)> {
        let (stream, peer) = listener.accept()?;
        let (r, w) = split(stream)?;
        Ok((r, w, peer))
    }
}

/// A writer limited to `rate` bytes per second by a token bucket (burst: 10 ms of traffic, at
/// least 64 KiB), to model a slower link on loopback.
pub struct RateLimited<W> {
    inner: W,
    rate: ByteRate,
    burst: u64,
    tokens: f64,
    last: Instant,
}

impl<W: Write> RateLimited<W> {
    /// Wraps `inner`. An unlimited rate passes writes straight through.
    pub fn new(inner: W, rate: ByteRate) -> Self {
        let burst = if rate.is_unlimited() {
            u64::MAX
        } else {
            (rate.0 / 100).max(64 << 10)
        };
        RateLimited {
            inner,
            rate,
            burst,
            tokens: burst as f64,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let gained = now.duration_since(self.last).as_secs_f64() * self.rate.0 as f64;
        self.tokens = (self.tokens + gained).min(self.burst as f64);
        self.last = now;
    }
}

impl<W: Write> Write for RateLimited<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.rate.is_unlimited() {
            return self.inner.write(buf);
        }
        let chunk = buf.len().min(self.burst as usize);
        self.refill();
        if self.tokens < chunk as f64 {
            let wait = (chunk as f64 - self.tokens) / self.rate.0 as f64;
            std::thread::sleep(Duration::from_secs_f64(wait));
            self.refill();
        }
        let n = self.inner.write(&buf[..chunk])?;
        self.tokens -= n as f64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A writer that flips the bits of `mask` in the byte at stream offset `at`, once.
pub struct FaultInjector<W> {
    inner: W,
    at: u64,
    mask: u8,
    written: u64,
}

impl<W: Write> FaultInjector<W> {
    /// Wraps `inner`, corrupting the byte at offset `at` (counted from the first byte written).
    pub fn new(inner: W, at: u64, mask: u8) -> Self {
        FaultInjector {
            inner,
            at,
            mask: mask.max(1),
            written: 0,
        }
    }
}

impl<W: Write> Write for FaultInjector<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let start = self.written;
        let end = start + buf.len() as u64;
        let n = if (start..end).contains(&self.at) {
            let mut copy = buf.to_vec();
            copy[(self.at - start) as usize] ^= self.mask;
            self.inner.write(&copy)?
        } else {
            self.inner.write(buf)?
        };
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_carries_bytes_in_order_and_ends() {
        let ((mut a_r, mut a_w), (mut b_r, b_w)) = loopback::pair();
        a_w.write_all(b"hello ").unwrap();
        a_w.write_all(b"world").unwrap();
        drop(a_w);
        let mut got = String::new();
        b_r.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello world");
        drop(b_w);
        let mut rest = Vec::new();
        a_r.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn fault_injector_flips_exactly_one_byte() {
        let mut w = FaultInjector::new(Vec::new(), 5, 0xff);
        w.write_all(b"abc").unwrap();
        w.write_all(b"defgh").unwrap();
        assert_eq!(w.inner, b"abcde\x99gh");
    }

    #[test]
    fn rate_limiter_slows_writes() {
        let mut w = RateLimited::new(io::sink(), ByteRate(10 << 20));
        let started = Instant::now();
        let data = vec![0u8; 1 << 20];
        for _ in 0..3 {
            w.write_all(&data).unwrap();
        }
        // 3 MiB at 10 MiB/s, less the initial burst: at least ~0.25 s.
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
    }

    /// The probe carries every byte over both kinds of connection and reports a rate; a rate
    /// limiter in the way shows in it (so the figure is the link's, not a constant).
    #[test]
    fn probe_measures_what_a_connection_carries() {
        let tcp = probe_rate(tcp::pair().unwrap(), 8 << 20).unwrap();
        let memory = probe_rate(loopback::pair(), 8 << 20).unwrap();
        assert!(tcp.0 > 0 && memory.0 > 0, "{tcp:?} {memory:?}");
        let ((near_r, near_w), far) = loopback::pair();
        let limited: BoxWrite = Box::new(RateLimited::new(near_w, ByteRate(20 << 20)));
        let slow = probe_rate(((near_r, limited), far), 8 << 20).unwrap();
        assert!(slow.0 < 40 << 20, "a 20 MiB/s link probed at {slow:?}");
    }
}
