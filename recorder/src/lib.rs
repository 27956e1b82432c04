//! # memferry-recorder: the dirty pages of any Linux program, from the kernel
//!
//! `memferry record -o app.mft -- CMD ARGS…` runs `CMD` with this crate's shared library,
//! `libmemferry_recorder.so`, in `LD_PRELOAD`. Inside the program, the agent (`src/agent.rs`) tracks
//! writes with userfaultfd's asynchronous write-protect mode and collects them every interval
//! with the `PAGEMAP_SCAN` ioctl (Linux 6.7 or later); it streams each interval's written pages
//! to the recorder (`memferry_std::record_program`), which writes a trace that
//! `memferry simulate --workload trace:app.mft` replays. The program is not changed and not
//! rebuilt; it must be dynamically linked (`LD_PRELOAD` does nothing to a static binary).
//!
//! - [`sys`]: the kernel interface (raw ioctls) and [`sys::probe`], which checks that this
//!   kernel can record;
//! - [`protocol`]: the environment and the frames between the agent and the recorder;
//! - `agent` (private): the code that runs inside the program.
//!
//! The crate builds as a `cdylib` (the library to preload) and as an `rlib` (for the protocol
//! and the probe). The agent's constructor is in both, but it does nothing unless the
//! recorder's environment is set, the process is the recorder's child, and the running copy
//! is the one `LD_PRELOAD` loaded.

#[cfg(target_os = "linux")]
mod agent;
pub mod protocol;
#[cfg(target_os = "linux")]
pub mod sys;
