//! # memferry-std: the std side of memferry
//!
//! The core crate `memferry` is deterministic and does no I/O; this crate plugs it into the
//! real world:
//! - [`memory`]: guest memory in an anonymous mmap, shared with a running workload, with an
//!   atomic dirty bitmap; the source and destination hosts built on it.
//! - [`workload`]: a thread that really writes into guest memory while migration runs.
//! - [`transport`]: in-process loopback and TCP byte streams, and a token-bucket rate limiter
//!   that models a slower link.
//! - [`drive`]: runs a core source or destination over a transport with a real clock.
//! - [`units`]: parsing of sizes (`256MiB`) and rates (`1Gbit`).
//!
//! Those adapters are all a hypervisor gets with `default-features = false`. Cargo features add
//! the rest (the default, `cli`, turns everything on):
//! - `research`: the research harness, in virtual time: [`sim`] (the simulator), [`trace`]
//!   (recorded dirty-page traces), [`compare`] (strategies × workloads × seeds), [`cluster`]
//!   (a datacenter run by paper 000's policy), [`plots`] (SVG), [`model`] (analytic time models:
//!   Clark's geometric series, paper 000's Tmig, lower bounds), [`policy`] (paper 000's host-load
//!   metric, overload detection and VM placement) and [`output`] (the report as a table and as
//!   the JSON object scripts rely on). Implies `serde`.
//! - `cli`: the `memferry` binary and [`demo`] (the `memferry demo` / `send` / `listen` jobs, as
//!   functions tests can call). Implies `research`.
//! - `serde`: `serde::Serialize` on [`workload::WorkloadConfig`] and on the core's report types.

// The list above links the feature-gated modules, which a build without them does not have.
#![cfg_attr(not(feature = "cli"), allow(rustdoc::broken_intra_doc_links))]

// The adapters: always built.
#[cfg(feature = "zstd")]
pub mod codec;
pub mod drive;
pub mod image;
#[cfg(all(feature = "kvm", target_os = "linux"))]
pub mod kvm;
pub mod memory;
pub mod transport;
pub mod units;
pub mod workload;

// The research harness.
#[cfg(feature = "research")]
pub mod cluster;
#[cfg(feature = "research")]
pub mod compare;
#[cfg(all(feature = "research", target_os = "linux"))]
pub mod kernel_dirty;
#[cfg(feature = "research")]
pub mod model;
#[cfg(feature = "research")]
pub mod output;
#[cfg(feature = "research")]
pub mod plots;
#[cfg(feature = "research")]
pub mod policy;
#[cfg(all(feature = "research", target_os = "linux"))]
pub mod record_program;
#[cfg(feature = "research")]
pub mod sim;
#[cfg(feature = "research")]
pub mod store;
#[cfg(feature = "research")]
pub mod trace;

// The CLI's jobs.
#[cfg(feature = "cli")]
pub mod demo;
