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
//! - [`demo`]: the `memferry demo` / `send` / `listen` jobs, as functions tests can call.
//! - [`units`]: parsing of sizes (`256MiB`) and rates (`1Gbit`).
//! - [`output`]: the report as a table and as the JSON object scripts rely on.

pub mod cluster;
pub mod compare;
pub mod demo;
pub mod drive;
pub mod memory;
pub mod output;
pub mod plots;
pub mod sim;
pub mod trace;
pub mod transport;
pub mod units;
pub mod workload;
