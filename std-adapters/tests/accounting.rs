//! What a migration reports about its content pipeline, in real runs (issue 17): the source's
//! encoder CPU time, the destination's pages per encoding and decoder CPU time, and stateful
//! codecs on several channels. One test binary for the three (each binary links the whole
//! crate: fewer links keep CI short).

#![cfg(feature = "cli")]

#[path = "accounting/codec_channels.rs"]
mod codec_channels;
#[path = "accounting/encode_cpu.rs"]
mod encode_cpu;
#[path = "accounting/receive.rs"]
mod receive;
