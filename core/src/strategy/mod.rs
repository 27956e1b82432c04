//! Strategies: what decides which pages a migration sends, and when it stops.
//!
//! The session ([`crate::session`]) owns everything around the pages: handshake, channels,
//! control frames, timers, pacing, encoding, device state, the switchover and the report. A
//! [`Strategy`] only decides: which pages each round sends (it fills a bitmap the session
//! walks), what happens at the end of a round (another round, or pause and stop-and-copy), and
//! which pages the final, paused round must still send. Demand-driven strategies (post-copy)
//! also get the destination's page requests through [`Strategy::on_page_request`] and
//! hand the session urgent pages through [`Strategy::next_urgent_page`].
//!
//! Implementations: [`precopy::PreCopy`] (iterative pre-copy with an optional writable-working-
//! set predictor, yours or one of [`crate::track`]'s) and [`postcopy::PostCopy`] (the guest
//! moves at once; its pages follow, those it asks for first).

pub mod postcopy;
pub mod precopy;

use alloc::string::String;

use crate::bitmap::DirtyBitmap;
use crate::error::MigrationError;
use crate::memory::SourceHost;
use crate::page::MemoryLayout;
use crate::report::{RoundReport, StopReason};
use crate::time::{ByteRate, Nanos};
use crate::wire::{FrameKind, U64List};

pub use postcopy::PostCopy;
pub use precopy::{PreCopy, PreCopyConfig};

/// What a strategy sees and fills when it decides.
pub struct StrategyContext<'a> {
    /// The guest's layout (dense page indices).
    pub layout: &'a MemoryLayout,
    /// The pages the next round sends: the strategy fills it (it is empty when handed over).
    pub send: &'a mut DirtyBitmap,
    /// The round that just ended (at `end_round`; its pages, bytes, start and duration are
    /// filled in) or is running (at `during_round`). The strategy fills the dirty-set figures.
    pub round: &'a mut RoundReport,
    /// The link's delivery rate, if the transport reports deliveries.
    pub link_rate: Option<ByteRate>,
    /// Bytes handed to the transport but not yet delivered (socket buffers, in flight). The
    /// session lets them drain before it pauses the guest, which writes meanwhile: a downtime
    /// estimate counts what it writes in that time. 0 when the transport reports no
    /// deliveries.
    pub backlog_bytes: u64,
    /// Time since the migration started.
    pub elapsed: Nanos,
    /// What one raw page costs on the wire, framing included.
    pub page_wire_bytes: u64,
}

impl<'a> StrategyContext<'a> {
    /// A context with no link measurements (no rate, no backlog yet).
    pub fn new(
        layout: &'a MemoryLayout,
        send: &'a mut DirtyBitmap,
        round: &'a mut RoundReport,
        elapsed: Nanos,
    ) -> Self {
        StrategyContext {
            page_wire_bytes: crate::wire::page_frame_len(layout.page_size().bytes()) as u64,
            layout,
            send,
            round,
            link_rate: None,
            backlog_bytes: 0,
            elapsed,
        }
    }
}

/// What a strategy decides at the end of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Another round, sending the pages now in `send`.
    NextRound,
    /// Pause the guest; the session then calls [`Strategy::final_round`].
    StopAndCopy(StopReason),
}

/// Decides which pages a migration sends, round by round.
pub trait Strategy: Send {
    /// A name for reports (`"pre-copy"`, `"pre-copy+wsclock"`).
    fn name(&self) -> String;

    /// The migration starts (dirty logging has just been reset): fill `cx.send` with round 1.
    fn start(&mut self, now: Nanos, cx: &mut StrategyContext<'_>) -> Result<(), MigrationError>;

    /// The bandwidth limit of the round in progress.
    fn rate_limit(&self) -> ByteRate;

    /// The bandwidth limit of the paused, final round.
    fn final_rate_limit(&self) -> ByteRate;

    /// Called before each batch of a round with the pages the round has sent so far: a chance to
    /// sample the dirty log (pre-copy's learning phase). Default: nothing.
    fn during_round(
        &mut self,
        now: Nanos,
        cx: &mut StrategyContext<'_>,
        host: &mut dyn SourceHost,
    ) -> Result<(), MigrationError> {
        let _ = (now, cx, host);
        Ok(())
    }

    /// Every page of the round is handed to the transport: sync the dirty log, fill the round's
    /// figures, fill `cx.send` with the next round's pages and decide.
    fn end_round(
        &mut self,
        now: Nanos,
        cx: &mut StrategyContext<'_>,
        host: &mut dyn SourceHost,
    ) -> Result<Decision, MigrationError>;

    /// The guest is paused: add to `cx.send` every page the destination still lacks (what the
    /// last `end_round` put there plus what was written since its sync).
    fn final_round(
        &mut self,
        now: Nanos,
        cx: &mut StrategyContext<'_>,
        host: &mut dyn SourceHost,
    ) -> Result<(), MigrationError>;

    /// Pages held back from the round that just began (for its report). Default 0.
    fn held_back(&self) -> u64 {
        0
    }

    /// The destination asks for pages (post-copy). Default: a protocol violation.
    fn on_page_request(&mut self, now: Nanos, pages: U64List<'_>) -> Result<(), MigrationError> {
        let _ = (now, pages);
        Err(MigrationError::UnexpectedFrame {
            expected: "no page requests (this strategy pushes every page before switchover)",
            got: FrameKind::PageRequest,
        })
    }

    /// A page the destination is waiting for, to send before any bulk page. Default none.
    fn next_urgent_page(&mut self) -> Option<u64> {
        None
    }

    /// Post-copy: the destination starts at the pause, and the final round's pages follow
    /// the switchover (urgent pages first). Default: no, every page goes before it.
    fn pages_after_switchover(&self) -> bool {
        false
    }

    /// Why the rounds stopped, with the figures that decided it (for the report).
    fn explain_stop(&self) -> String {
        String::new()
    }

    /// The caller asks for the switchover at the end of the current round
    /// ([`crate::session::Source::switchover_now`]). Default: nothing (a strategy that switches
    /// over at once anyway).
    fn switchover_now(&mut self) {}

    /// How much the strategy throttled the guest (percent of its time taken away; 0: none).
    /// The session lifts the throttle when the migration fails.
    fn throttle_percent(&self) -> u8 {
        0
    }
}
