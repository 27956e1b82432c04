//! What the agent inside the traced program tells the recorder, and how the recorder tells
//! the agent where to talk.
//!
//! ## Environment (set by the recorder for the program it spawns)
//!
//! | variable | value |
//! | --- | --- |
//! | [`ENV_FD`] | the number of the agent's end of a Unix stream socket pair, inherited across `exec` |
//! | [`ENV_PARENT`] | the recorder's pid: the agent runs only in a process whose parent it is (the spawned program, through its `exec`s; never its children) |
//! | [`ENV_LIB`] | the path of the library as given in `LD_PRELOAD`: the agent runs only from that copy (not from the rlib linked into a `memferry` binary that happens to be traced) |
//! | [`ENV_INTERVAL`] | the sampling interval in nanoseconds |
//! | [`ENV_INODE`] | the socket's inode: a child that inherited the socket closes it (so only the traced process holds it) |
//!
//! ## Frames (agent to recorder, native-endian: both ends are the same machine)
//!
//! Each frame is a 32-byte header, `kind u32 | aux u32 | a u64 | b u64 | count u64`, then
//! `count` pairs `start u64, end u64` of virtual addresses (page-aligned, `end` exclusive) for
//! [`BASE`] and [`DIRTY`], or `count` bytes of UTF-8 for [`WARN`] and [`FAIL`].
//!
//! A process sends [`HELLO`], then [`BASE`] frames for the pages resident when it started
//! tracking, then [`STARTED`]; then, every interval, [`DIRTY`] frames and one [`TICK`]; at a
//! normal exit a last [`DIRTY`]/[`TICK`] pair and [`END`]. A program that `exec`s starts again
//! with a new [`HELLO`] (same pid).

/// Environment variable: the agent's socket descriptor.
pub const ENV_FD: &str = "MEMFERRY_RECORD_FD";
/// Environment variable: the recorder's pid.
pub const ENV_PARENT: &str = "MEMFERRY_RECORD_PARENT";
/// Environment variable: the library's path, as in `LD_PRELOAD`.
pub const ENV_LIB: &str = "MEMFERRY_RECORD_LIB";
/// Environment variable: the sampling interval, in nanoseconds.
pub const ENV_INTERVAL: &str = "MEMFERRY_RECORD_INTERVAL_NS";
/// Environment variable: the inode of the agent's socket.
pub const ENV_INODE: &str = "MEMFERRY_RECORD_INODE";

/// The protocol version, in [`HELLO`]'s `aux`.
pub const VERSION: u32 = 1;
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 32;
/// The most ranges a frame carries (the agent sends at most this many; the recorder refuses
/// more).
pub const MAX_RANGES: u64 = 1 << 16;
/// The longest text a frame carries.
pub const MAX_TEXT: u64 = 1 << 12;

/// `aux` = [`VERSION`], `a` = pid, `b` = page size.
pub const HELLO: u32 = 1;
/// Pages that were resident (and not the zero page) when tracking started in this process:
/// part of the program's memory, not written in any interval.
pub const BASE: u32 = 2;
/// `a` = CLOCK_MONOTONIC nanoseconds when tracking started (every [`BASE`] page sent).
pub const STARTED: u32 = 3;
/// Pages written in the current interval (several frames may make up one interval; pages may
/// repeat across them).
pub const DIRTY: u32 = 4;
/// The current interval ends: `a` = CLOCK_MONOTONIC nanoseconds when the scan that closed it
/// started, `b` = when it ended. Writes made before `a` are in this interval or an earlier
/// one; writes made after `b` are in a later one.
pub const TICK: u32 = 5;
/// Something could not be tracked (text): the recording goes on without it.
pub const WARN: u32 = 6;
/// Tracking failed in this process (text, `a` = errno): the program runs on, untraced.
pub const FAIL: u32 = 7;
/// The program is exiting normally; the last [`TICK`] was its final interval.
pub const END: u32 = 8;

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// One of the kinds above.
    pub kind: u32,
    /// Kind-specific.
    pub aux: u32,
    /// Kind-specific.
    pub a: u64,
    /// Kind-specific.
    pub b: u64,
    /// Ranges or text bytes that follow.
    pub count: u64,
}

impl Header {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&self.kind.to_ne_bytes());
        out[4..8].copy_from_slice(&self.aux.to_ne_bytes());
        out[8..16].copy_from_slice(&self.a.to_ne_bytes());
        out[16..24].copy_from_slice(&self.b.to_ne_bytes());
        out[24..32].copy_from_slice(&self.count.to_ne_bytes());
        out
    }

    /// Decodes a header from its bytes.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Header {
        let u32_at = |i: usize| u32::from_ne_bytes(bytes[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_ne_bytes(bytes[i..i + 8].try_into().unwrap());
        Header {
            kind: u32_at(0),
            aux: u32_at(4),
            a: u64_at(8),
            b: u64_at(16),
            count: u64_at(24),
        }
    }

    /// Bytes of the payload that follows, or `None` if the kind is unknown or the count is
    /// larger than the protocol allows.
    pub fn payload_len(&self) -> Option<usize> {
        match self.kind {
            BASE | DIRTY if self.count <= MAX_RANGES => Some(self.count as usize * 16),
            WARN | FAIL if self.count <= MAX_TEXT => Some(self.count as usize),
            HELLO | STARTED | TICK | END if self.count == 0 => Some(0),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let h = Header {
            kind: TICK,
            aux: 7,
            a: 1 << 40,
            b: 3,
            count: 0,
        };
        assert_eq!(Header::decode(&h.encode()), h);
        assert_eq!(h.payload_len(), Some(0));
        let bad = Header {
            count: MAX_RANGES + 1,
            kind: DIRTY,
            ..h
        };
        assert_eq!(bad.payload_len(), None);
    }
}
