//! Errors: [`HostError`] (what a host's memory or guest control reports, with its kind, errno
//! and source kept) and [`MigrationError`] (why a migration stopped), each with a message a
//! person can act on. Both implement `core::error::Error`.

use alloc::string::String;
use alloc::sync::Arc;
use core::fmt;

use crate::time::Nanos;
use crate::wire::{AbortCode, FrameKind, WireError};

/// What part of the host failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HostErrorKind {
    /// Reading or writing guest memory.
    Memory,
    /// Syncing or clearing the dirty log.
    DirtyLog,
    /// Pausing, resuming or starting the guest.
    GuestControl,
    /// Saving or restoring CPU and device state.
    DeviceState,
    /// Anything else.
    Other,
}

/// A failure reported by the host: a page that cannot be read or written, a dirty log that
/// cannot be synced, a guest that cannot be paused. Keeps the OS error number and the
/// underlying error, so the cause survives the trip through the engine.
#[derive(Clone)]
pub struct HostError {
    /// What part of the host failed.
    pub kind: HostErrorKind,
    /// What went wrong, for a person.
    pub message: String,
    /// The OS error number, when there is one (`io::Error::raw_os_error`).
    pub errno: Option<i32>,
    source: Option<Arc<dyn core::error::Error + Send + Sync>>,
}

impl HostError {
    /// A host error of kind [`HostErrorKind::Other`] with `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Self::of(HostErrorKind::Other, message)
    }

    /// A host error of `kind` with `message`.
    pub fn of(kind: HostErrorKind, message: impl Into<String>) -> Self {
        HostError {
            kind,
            message: message.into(),
            errno: None,
            source: None,
        }
    }

    /// The same error with its OS error number.
    pub fn with_errno(mut self, errno: i32) -> Self {
        self.errno = Some(errno);
        self
    }

    /// The same error caused by `source`.
    pub fn with_source(mut self, source: impl core::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }
}

impl fmt::Debug for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostError")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("errno", &self.errno)
            .field(
                "source",
                &self.source.as_ref().map(|s| alloc::format!("{s}")),
            )
            .finish()
    }
}

impl PartialEq for HostError {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.message == other.message && self.errno == other.errno
    }
}

impl Eq for HostError {}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(e) = self.errno {
            write!(f, " (os error {e})")?;
        }
        Ok(())
    }
}

impl core::error::Error for HostError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn core::error::Error + 'static))
    }
}

/// Why a migration stopped before completing. Before the switchover the source keeps running
/// after any of these (the engine resumes a paused guest before returning the error).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MigrationError {
    /// The host failed (see [`HostError`]).
    Host(HostError),
    /// A frame from the peer could not be decoded.
    Frame(WireError),
    /// A well-formed frame arrived where the protocol does not allow it.
    UnexpectedFrame {
        /// What the state machine was waiting for.
        expected: &'static str,
        /// What arrived.
        got: FrameKind,
    },
    /// A page index outside the guest.
    PageOutOfRange {
        /// The page named by the frame.
        page: u64,
        /// The guest's page count.
        page_count: u64,
    },
    /// A page whose payload does not fit its encoding.
    BadPagePayload {
        /// The page named by the frame.
        page: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A hybrid's discard list that does not cover the guest's pages in order, or is missing.
    BadDiscard {
        /// The first page the frame names (or the first page not covered).
        first_page: u64,
        /// The bits the frame carries.
        bits: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A round marker that does not follow the previous one, or whose page count differs from
    /// the pages received in that round.
    RoundMismatch {
        /// The round the marker names.
        round: u32,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The two sides cannot migrate this guest (protocol version, page size, layout,
    /// features, device state size).
    Incompatible(String),
    /// The peer aborted the migration.
    PeerAborted {
        /// The peer's reason code.
        code: AbortCode,
        /// The peer's message.
        message: String,
    },
    /// The destination's memory digest differs from the source's.
    DigestMismatch {
        /// The source's digest.
        source: u128,
        /// The destination's digest.
        destination: u128,
    },
    /// The peer sent nothing for too long while this side waited for it.
    Timeout {
        /// What this side was waiting for.
        waiting_for: &'static str,
        /// How long it waited.
        after: Nanos,
    },
    /// The link delivered nothing for too long while bytes waited to go (a stalled or
    /// partitioned connection; only drivers that report deliveries detect it).
    Stalled {
        /// How long nothing was delivered.
        after: Nanos,
        /// Bytes handed to the transport and not delivered.
        undelivered: u64,
    },
    /// The caller cancelled the migration, or the transport closed before it completed.
    Cancelled(String),
}

impl From<HostError> for MigrationError {
    fn from(e: HostError) -> Self {
        MigrationError::Host(e)
    }
}

impl From<WireError> for MigrationError {
    fn from(e: WireError) -> Self {
        MigrationError::Frame(e)
    }
}

impl MigrationError {
    /// Appends the abort frame that tells the peer about this error, unless the peer is the one
    /// that aborted. Returns the bytes appended.
    pub fn emit_abort(&self, out: &mut alloc::vec::Vec<u8>) -> usize {
        if matches!(self, MigrationError::PeerAborted { .. }) {
            return 0;
        }
        let message = alloc::string::ToString::to_string(self);
        crate::wire::Frame::Abort {
            code: self.abort_code(),
            message: crate::wire::abort_message(&message),
        }
        .emit(out)
    }

    /// The abort code to send to the peer for this error.
    pub fn abort_code(&self) -> AbortCode {
        match self {
            MigrationError::Host(_) => AbortCode::HostFailure,
            MigrationError::Frame(_) => AbortCode::BadFrame,
            MigrationError::UnexpectedFrame { .. }
            | MigrationError::PageOutOfRange { .. }
            | MigrationError::BadPagePayload { .. }
            | MigrationError::BadDiscard { .. }
            | MigrationError::RoundMismatch { .. } => AbortCode::ProtocolViolation,
            MigrationError::Incompatible(_) => AbortCode::Incompatible,
            MigrationError::PeerAborted { code, .. } => *code,
            MigrationError::DigestMismatch { .. } => AbortCode::DigestMismatch,
            MigrationError::Timeout { .. } | MigrationError::Stalled { .. } => AbortCode::Timeout,
            MigrationError::Cancelled(_) => AbortCode::Cancelled,
        }
    }
}

impl fmt::Display for MigrationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationError::Host(e) => write!(f, "host failure: {e}"),
            MigrationError::Frame(e) => write!(f, "bad frame from peer: {e}"),
            MigrationError::UnexpectedFrame { expected, got } => {
                write!(
                    f,
                    "protocol violation: expected {expected}, got a {got:?} frame"
                )
            }
            MigrationError::PageOutOfRange { page, page_count } => write!(
                f,
                "protocol violation: page {page} is outside the guest's {page_count} pages"
            ),
            MigrationError::BadPagePayload { page, reason } => {
                write!(f, "protocol violation: page {page}: {reason}")
            }
            MigrationError::BadDiscard {
                first_page,
                bits,
                reason,
            } => write!(
                f,
                "protocol violation: discard list at page {first_page} ({bits} pages): {reason}"
            ),
            MigrationError::RoundMismatch { round, reason } => {
                write!(f, "protocol violation: round {round}: {reason}")
            }
            MigrationError::Incompatible(why) => write!(f, "incompatible peers: {why}"),
            MigrationError::PeerAborted { code, message } => {
                write!(f, "peer aborted the migration ({code:?}): {message}")
            }
            MigrationError::DigestMismatch {
                source,
                destination,
            } => write!(
                f,
                "memory digest mismatch: source {source:#034x}, destination {destination:#034x}"
            ),
            MigrationError::Timeout { waiting_for, after } => write!(
                f,
                "the peer sent nothing for {after} while this side waited for {waiting_for}"
            ),
            MigrationError::Stalled { after, undelivered } => write!(
                f,
                "the link delivered nothing for {after} while {undelivered} bytes waited to go"
            ),
            MigrationError::Cancelled(why) => write!(f, "migration cancelled: {why}"),
        }
    }
}

impl core::error::Error for MigrationError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            MigrationError::Host(e) => Some(e),
            MigrationError::Frame(e) => Some(e),
            _ => None,
        }
    }
}
