//! Errors: [`HostError`] (what a host's memory or guest control reports) and
//! [`MigrationError`] (why a migration stopped), each with a message a person can act on.

use alloc::string::String;
use core::fmt;

use crate::wire::{AbortCode, FrameKind, WireError};

/// A failure reported by the host: a page that cannot be read or written, a dirty log that
/// cannot be synced, a guest that cannot be paused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostError {
    /// What went wrong, for a person.
    pub message: String,
}

impl HostError {
    /// A host error with `message`.
    pub fn new(message: impl Into<String>) -> Self {
        HostError {
            message: message.into(),
        }
    }
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Why a migration stopped before completing. The source keeps running after any of these
/// (the engine resumes a paused guest before returning the error).
#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// A page frame whose payload does not fit its encoding.
    BadPagePayload {
        /// The page named by the frame.
        page: u64,
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
    /// The two sides cannot migrate this guest (protocol version, page size, page count,
    /// features).
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
        source: u64,
        /// The destination's digest.
        destination: u64,
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
            | MigrationError::RoundMismatch { .. } => AbortCode::ProtocolViolation,
            MigrationError::Incompatible(_) => AbortCode::Incompatible,
            MigrationError::PeerAborted { code, .. } => *code,
            MigrationError::DigestMismatch { .. } => AbortCode::DigestMismatch,
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
                "memory digest mismatch: source {source:#018x}, destination {destination:#018x}"
            ),
            MigrationError::Cancelled(why) => write!(f, "migration cancelled: {why}"),
        }
    }
}
