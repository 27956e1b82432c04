//! Post-copy (paper 004's taxonomy; QEMU's postcopy-ram): the guest is paused once, its device
//! state moves, and the destination runs it at once. Its pages follow: a background push walks
//! every page in order, and a page the running guest faults on is requested by the destination
//! (`PageRequest`) and sent before any pushed page. Downtime is the device state's transfer
//! alone and no page is sent twice; the price is that the guest runs slower until its working
//! set has arrived, and that from the switchover on the guest's memory is split between the
//! hosts (a failure of either loses it: the source never resumes on its own).
//!
//! The destination must place each page once ([`crate::receive::FirstCopyWins`]): a page the
//! guest already wrote there must not be overwritten when the push sends it again.
//!
//! Hybrid (pre-copy rounds, then post-copy: [`crate::strategy::PreCopyConfig::post_copy_when_outpaced`])
//! needs one thing more: the switchover tells the destination which pages it already holds
//! went stale since (`Discard` frames, QEMU's discard bitmap), and the destination starts only
//! once every channel has closed the rounds before.

use alloc::collections::VecDeque;
use alloc::string::String;

use crate::error::MigrationError;
use crate::memory::SourceHost;
use crate::report::StopReason;
use crate::strategy::{Decision, Strategy, StrategyContext};
use crate::time::{ByteRate, Nanos};
use crate::wire::U64List;

/// The destination's page requests, oldest first: what post-copy and the hybrid's post-copy
/// phase send before any pushed page.
#[derive(Debug, Default)]
pub struct PageRequests {
    urgent: VecDeque<u64>,
    /// Pages of the guest (requests beyond it are refused).
    pages: u64,
    /// Requests received (for tests and reports).
    requested: u64,
}

impl PageRequests {
    /// Requests for a guest of `pages` pages.
    pub fn new(pages: u64) -> Self {
        PageRequests {
            pages,
            ..PageRequests::default()
        }
    }

    /// Takes in one `PageRequest` frame.
    pub fn take(&mut self, pages: U64List<'_>) -> Result<(), MigrationError> {
        for page in pages.iter() {
            if page >= self.pages {
                return Err(MigrationError::PageOutOfRange {
                    page,
                    page_count: self.pages,
                });
            }
            self.requested += 1;
            // The queue holds each page at most a few times over: a page already sent is
            // skipped when popped (the session checks its send set).
            if self.urgent.len() < self.pages as usize {
                self.urgent.push_back(page);
            }
        }
        Ok(())
    }

    /// The oldest request not yet handed out.
    pub fn pop(&mut self) -> Option<u64> {
        self.urgent.pop_front()
    }

    /// Pages asked for so far.
    pub fn requested(&self) -> u64 {
        self.requested
    }
}

/// Post-copy: switch over at once, then push every page, requested pages first.
#[derive(Debug, Default)]
pub struct PostCopy {
    requests: PageRequests,
    /// The push's bandwidth limit.
    limit: ByteRate,
}

impl PostCopy {
    /// Post-copy pushing at up to `limit` (unlimited: as fast as the link takes).
    pub fn new(limit: ByteRate) -> Self {
        PostCopy {
            limit,
            ..PostCopy::default()
        }
    }

    /// Pages the destination has asked for so far.
    pub fn pages_requested(&self) -> u64 {
        self.requests.requested()
    }
}

impl Strategy for PostCopy {
    fn name(&self) -> String {
        "post-copy".into()
    }

    fn start(&mut self, _now: Nanos, cx: &mut StrategyContext<'_>) -> Result<(), MigrationError> {
        // Nothing goes before the switchover: round 1 is empty and ends at once.
        self.requests = PageRequests::new(cx.layout.page_count());
        cx.send.clear();
        Ok(())
    }

    fn rate_limit(&self) -> ByteRate {
        ByteRate::UNLIMITED
    }

    fn final_rate_limit(&self) -> ByteRate {
        if self.limit.0 == 0 {
            ByteRate::UNLIMITED
        } else {
            self.limit
        }
    }

    fn end_round(
        &mut self,
        _now: Nanos,
        _cx: &mut StrategyContext<'_>,
        _host: &mut dyn SourceHost,
    ) -> Result<Decision, MigrationError> {
        Ok(Decision::StopAndCopy(StopReason::PostCopy))
    }

    fn final_round(
        &mut self,
        _now: Nanos,
        cx: &mut StrategyContext<'_>,
        _host: &mut dyn SourceHost,
    ) -> Result<(), MigrationError> {
        // Every page, once: none was sent before.
        cx.send.fill();
        Ok(())
    }

    fn on_page_request(&mut self, _now: Nanos, pages: U64List<'_>) -> Result<(), MigrationError> {
        self.requests.take(pages)
    }

    fn next_urgent_page(&mut self) -> Option<u64> {
        self.requests.pop()
    }

    fn pages_after_switchover(&self) -> bool {
        true
    }
}
