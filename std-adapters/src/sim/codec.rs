//! The page codecs in the simulator: the real encoders of the core (LZ4, XBZRLE delta with LZ4
//! on the delta, dedup references, the adaptive choice) and zstd, run on the simulated pages,
//! with their CPU time charged by a fixed cost model so a run stays deterministic.
//!
//! The encoders are the ones `demo` and `send` use (`--codec`), fed the content model's bytes
//! ([`super::content`]); the destination decodes with the core's decoders onto the pages it holds
//! ([`super::SimDestination`] keeps them when a codec needs them read back). What a codec saves
//! is therefore what it really saves on those bytes; only its CPU time is modelled.
//!
//! # CPU cost ([`CodecRates`])
//! Fixed figures, per thread, not measured on the machine that runs the simulation (a run must
//! print the same numbers everywhere): LZ4 compression 0.75 GB/s and decompression 3 GB/s,
//! XBZRLE encoding and decoding 5 GB/s, xxh3 content hashing 19 GB/s (this project's criterion
//! benches, `cargo bench -p memferry-benches --bench codec`, and the targets), zstd
//! level 1 compression 0.35 GB/s and decompression 1 GB/s (round figures for libzstd on 4 KiB
//! pages). Each page costs what its encoder really attempted:
//! - `lz4`, `zstd`: every non-zero page is compressed;
//! - `delta`: a page with an earlier version in the cache is XBZRLE-encoded (and its delta
//!   compressed with LZ4 when that was tried); a page without one is copied into the cache;
//! - `adaptive`: every page is hashed for dedup; a page with a cached version is delta-encoded;
//!   a page classified compressible is compressed with LZ4 (the adaptive codec's own counters
//!   say which steps ran).
//!
//! The destination's decoding is charged the same way (LZ4 or zstd decompression, XBZRLE
//! decoding, hashing a referenced page to check it).

use std::sync::{Arc, Mutex};

use memferry::codec::adaptive::{Adaptive, Rates};
use memferry::codec::dedup::{DedupEncoder, DedupIndex};
use memferry::codec::lz4::{DeltaLz4Encoder, Lz4Encoder};
use memferry::codec::xbzrle::{DeltaEncoder, XbzrleCache};
use memferry::codec::{PageDecoder, PageEncoder};
use memferry::time::{ByteRate, Nanos};
use memferry::wire::Encoding;
use serde::{Deserialize, Serialize};

/// Which codec a simulated migration uses (the CLI's `--codec`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SimCodec {
    /// Raw pages (zero pages as headers). The default.
    #[default]
    None,
    /// LZ4 per page.
    Lz4,
    /// zstd per page (needs the `zstd` feature).
    Zstd,
    /// XBZRLE deltas against the version sent in an earlier round, LZ4 on the delta.
    Delta,
    /// Dedup references, deltas, LZ4 or raw, page by page.
    Adaptive,
}

impl SimCodec {
    /// Every codec, in the CLI's order.
    pub const ALL: [SimCodec; 5] = [
        SimCodec::None,
        SimCodec::Lz4,
        SimCodec::Zstd,
        SimCodec::Delta,
        SimCodec::Adaptive,
    ];

    /// The CLI's name.
    pub fn name(self) -> &'static str {
        match self {
            SimCodec::None => "none",
            SimCodec::Lz4 => "lz4",
            SimCodec::Zstd => "zstd",
            SimCodec::Delta => "delta",
            SimCodec::Adaptive => "adaptive",
        }
    }

    /// Parses a CLI name.
    pub fn parse(name: &str) -> Result<SimCodec, String> {
        SimCodec::ALL
            .into_iter()
            .find(|c| c.name() == name)
            .ok_or_else(|| {
                format!("unknown codec '{name}': use none, lz4, zstd, delta or adaptive")
            })
    }

    /// Whether the destination must read its pages back to decode (deltas, references).
    pub fn needs_read_back(self) -> bool {
        matches!(self, SimCodec::Delta | SimCodec::Adaptive)
    }
}

/// Throughputs of the codecs, per thread (see the module docs for where they come from).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct CodecRates {
    /// LZ4 compression.
    pub lz4_compress: ByteRate,
    /// LZ4 decompression.
    pub lz4_decompress: ByteRate,
    /// zstd compression (level 1).
    pub zstd_compress: ByteRate,
    /// zstd decompression.
    pub zstd_decompress: ByteRate,
    /// XBZRLE encoding (comparing a page with its cached version).
    pub delta_encode: ByteRate,
    /// XBZRLE decoding.
    pub delta_decode: ByteRate,
    /// xxh3-128 content hashing (dedup).
    pub hash: ByteRate,
    /// Copying a page into the delta cache.
    pub copy: ByteRate,
}

impl Default for CodecRates {
    fn default() -> Self {
        CodecRates {
            lz4_compress: ByteRate(750_000_000),
            lz4_decompress: ByteRate(3_000_000_000),
            zstd_compress: ByteRate(350_000_000),
            zstd_decompress: ByteRate(1_000_000_000),
            delta_encode: ByteRate(5_000_000_000),
            delta_decode: ByteRate(5_000_000_000),
            hash: ByteRate(19_000_000_000),
            copy: ByteRate(10_000_000_000),
        }
    }
}

/// The codec of a simulated migration and its settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct CodecModel {
    /// The codec.
    pub codec: SimCodec,
    /// Bytes of earlier page versions the source keeps for deltas (`--delta-cache`).
    pub delta_cache_bytes: u64,
    /// zstd's level.
    pub zstd_level: i32,
    /// Content entries the dedup index keeps (adaptive).
    pub dedup_entries: usize,
    /// CPU cost of each codec.
    pub rates: CodecRates,
}

impl Default for CodecModel {
    /// No codec; a 64 MiB delta cache (QEMU's default), zstd level 1, 1 Mi dedup entries (the
    /// CLI's defaults).
    fn default() -> Self {
        CodecModel {
            codec: SimCodec::None,
            delta_cache_bytes: 64 << 20,
            zstd_level: 1,
            dedup_entries: 1 << 20,
            rates: CodecRates::default(),
        }
    }
}

impl CodecModel {
    /// This model with `codec`.
    pub fn with(codec: SimCodec) -> Self {
        CodecModel {
            codec,
            ..CodecModel::default()
        }
    }

    /// Whether no codec runs.
    pub fn is_none(&self) -> bool {
        self.codec == SimCodec::None
    }

    /// The rates the adaptive codec weighs against a link of `link` (one encoding thread).
    pub fn adaptive_rates(&self, link: ByteRate) -> Rates {
        Rates {
            link: if link.is_unlimited() { 0 } else { link.0 },
            threads: 1,
            lz4: self.rates.lz4_compress.0,
            delta: self.rates.delta_encode.0,
            hash: self.rates.hash.0,
            ..Rates::default()
        }
    }
}

/// CPU time spent per codec mechanism, source and destination together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodecCpu {
    /// LZ4 compression (pages and deltas) on the source.
    pub lz4: Nanos,
    /// zstd compression on the source.
    pub zstd: Nanos,
    /// XBZRLE encoding and delta-cache updates on the source.
    pub delta: Nanos,
    /// Content hashing for dedup on the source.
    pub hash: Nanos,
    /// Everything the destination spent decoding.
    pub decode: Nanos,
}

impl CodecCpu {
    /// The source's encoding time.
    pub fn encode(&self) -> Nanos {
        self.lz4 + self.zstd + self.delta + self.hash
    }
}

/// What one mechanism sent and saved.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MechanismUse {
    /// `zero`, `lz4`, `zstd`, `delta` (XBZRLE, with or without LZ4), `reference` (dedup) or
    /// `known` (hash-first).
    pub mechanism: String,
    /// Pages sent this way.
    pub pages: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Payload bytes saved against sending them raw.
    pub saved_bytes: u64,
}

/// A simulated run's content figures: what each mechanism saved, and the CPU it cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodecFigures {
    /// The codec's name.
    pub codec: String,
    /// Per mechanism (only those that sent pages).
    pub mechanisms: Vec<MechanismUse>,
    /// Payload bytes saved in all, against sending every page raw.
    pub saved_bytes: u64,
    /// CPU time per mechanism.
    pub cpu: CodecCpu,
}

impl CodecFigures {
    /// The figures of a run of `codec` whose report counted `encodings`.
    pub fn new(
        codec: SimCodec,
        encodings: &memferry::report::EncodingUse,
        page_size: u64,
        cpu: CodecCpu,
    ) -> Self {
        let mut mechanisms: Vec<MechanismUse> = Vec::new();
        for (name, slot) in encodings.slots() {
            let mechanism = match name {
                "raw" => continue,
                "delta" | "delta_lz4" => "delta",
                "other" => "zstd",
                n => n,
            };
            if slot.pages == 0 {
                continue;
            }
            let saved = (slot.pages * page_size).saturating_sub(slot.bytes);
            match mechanisms.iter_mut().find(|m| m.mechanism == mechanism) {
                Some(m) => {
                    m.pages += slot.pages;
                    m.bytes += slot.bytes;
                    m.saved_bytes += saved;
                }
                None => mechanisms.push(MechanismUse {
                    mechanism: mechanism.into(),
                    pages: slot.pages,
                    bytes: slot.bytes,
                    saved_bytes: saved,
                }),
            }
        }
        CodecFigures {
            codec: codec.name().into(),
            saved_bytes: encodings.saved_bytes(page_size),
            mechanisms,
            cpu,
        }
    }

    /// Bytes saved by `mechanism` (0 if it sent nothing).
    pub fn saved(&self, mechanism: &str) -> u64 {
        self.mechanisms
            .iter()
            .find(|m| m.mechanism == mechanism)
            .map_or(0, |m| m.saved_bytes)
    }
}

/// CPU the codec spent, shared between the encoder (inside the engine) and the link (which
/// charges it to virtual time).
#[derive(Debug, Default)]
pub struct CodecWork {
    /// Totals so far.
    pub total: CodecCpu,
    /// Source time not yet charged.
    pub pending_encode: Nanos,
    /// Destination time not yet charged.
    pub pending_decode: Nanos,
}

/// Shared [`CodecWork`].
pub type SharedWork = Arc<Mutex<CodecWork>>;

enum Inner {
    Lz4(Lz4Encoder),
    #[cfg(feature = "zstd")]
    Zstd(crate::codec::ZstdEncoder),
    Delta(DeltaLz4Encoder),
    Adaptive(Box<Adaptive>),
}

/// A real encoder whose CPU time is charged by [`CodecRates`].
pub struct MeteredEncoder {
    inner: Inner,
    rates: CodecRates,
    work: SharedWork,
}

impl MeteredEncoder {
    /// The encoder of `model` for a session `session_id` over a link of `link`, or `None`
    /// for raw pages.
    pub fn new(
        model: &CodecModel,
        session_id: u64,
        page_size: usize,
        link: ByteRate,
        work: SharedWork,
    ) -> Result<Option<Self>, String> {
        let delta = || {
            DeltaEncoder::new(XbzrleCache::new(
                model.delta_cache_bytes as usize,
                page_size,
            ))
        };
        let inner = match model.codec {
            SimCodec::None => return Ok(None),
            SimCodec::Lz4 => Inner::Lz4(Lz4Encoder::default()),
            #[cfg(feature = "zstd")]
            SimCodec::Zstd => Inner::Zstd(crate::codec::ZstdEncoder::new(model.zstd_level)?),
            #[cfg(not(feature = "zstd"))]
            SimCodec::Zstd => return Err("zstd needs memferry-std's zstd feature".into()),
            SimCodec::Delta => Inner::Delta(DeltaLz4Encoder::new(delta())),
            SimCodec::Adaptive => {
                let dedup = DedupEncoder::new(DedupIndex::new(session_id, model.dedup_entries));
                let mut adaptive = Adaptive::new(Some(dedup), Some(delta()), true);
                adaptive.set_rates(&model.adaptive_rates(link));
                Inner::Adaptive(Box::new(adaptive))
            }
        };
        Ok(Some(MeteredEncoder {
            inner,
            rates: model.rates,
            work,
        }))
    }
}

/// The decoders the simulated destination adds to the core's: zstd (with the feature).
pub fn destination_decoders() -> Vec<Box<dyn PageDecoder>> {
    #[cfg(feature = "zstd")]
    {
        crate::codec::destination_decoders()
    }
    #[cfg(not(feature = "zstd"))]
    {
        Vec::new()
    }
}

impl PageEncoder for MeteredEncoder {
    fn name(&self) -> &'static str {
        match &self.inner {
            Inner::Lz4(e) => e.name(),
            #[cfg(feature = "zstd")]
            Inner::Zstd(e) => e.name(),
            Inner::Delta(e) => e.name(),
            Inner::Adaptive(e) => e.name(),
        }
    }

    fn encode(&mut self, index: u64, page: &[u8], out: &mut [u8]) -> Option<(Encoding, usize)> {
        let r = self.rates;
        let size = page.len() as u64;
        let mut cpu = CodecCpu::default();
        let result = match &mut self.inner {
            Inner::Lz4(e) => {
                cpu.lz4 = r.lz4_compress.time_for(size);
                e.encode(index, page, out)
            }
            #[cfg(feature = "zstd")]
            Inner::Zstd(e) => {
                cpu.zstd = r.zstd_compress.time_for(size);
                e.encode(index, page, out)
            }
            Inner::Delta(e) => {
                let had_base = e.delta().has_base(index);
                let result = e.encode(index, page, out);
                if had_base {
                    cpu.delta = r.delta_encode.time_for(size);
                    if let Some((_, n)) = result {
                        if n >= DeltaLz4Encoder::MIN_DELTA {
                            cpu.lz4 = r.lz4_compress.time_for(n as u64);
                        }
                    }
                } else {
                    cpu.delta = r.copy.time_for(size);
                }
                result
            }
            Inner::Adaptive(e) => {
                let enabled = e.enabled();
                let had_base = e.delta().is_some_and(|d| d.has_base(index));
                let before = e.stats();
                let result = e.encode(index, page, out);
                let after = e.stats();
                cpu.hash = r.hash.time_for(size);
                if result.is_some_and(|(enc, _)| enc == Encoding::REFERENCE) {
                    // Found by its hash: nothing else ran.
                } else {
                    if had_base && enabled.delta {
                        cpu.delta = r.delta_encode.time_for(size);
                        if enabled.lz4 {
                            cpu.lz4 = r.lz4_compress.time_for(size / 4);
                        }
                    } else {
                        cpu.delta = r.copy.time_for(size);
                    }
                    let compressible =
                        after.few_words + after.low_entropy > before.few_words + before.low_entropy;
                    if compressible && enabled.lz4 {
                        cpu.lz4 += r.lz4_compress.time_for(size);
                    }
                }
                result
            }
        };
        let decode = match result {
            Some((Encoding::LZ4, _)) => r.lz4_decompress.time_for(size),
            Some((Encoding::XBZRLE, _)) => r.delta_decode.time_for(size),
            Some((Encoding::XBZRLE_LZ4, n)) => {
                r.delta_decode.time_for(size) + r.lz4_decompress.time_for(n as u64)
            }
            Some((Encoding::REFERENCE, _)) => r.hash.time_for(size) + r.copy.time_for(size),
            Some(_) => r.zstd_decompress.time_for(size),
            None => Nanos::ZERO,
        };
        let mut work = self.work.lock().expect("codec work lock");
        work.pending_encode += cpu.encode();
        work.pending_decode += decode;
        let t = &mut work.total;
        t.lz4 += cpu.lz4;
        t.zstd += cpu.zstd;
        t.delta += cpu.delta;
        t.hash += cpu.hash;
        t.decode += decode;
        result
    }

    fn begin_generation(&mut self, generation: u32) {
        match &mut self.inner {
            Inner::Lz4(e) => e.begin_generation(generation),
            #[cfg(feature = "zstd")]
            Inner::Zstd(e) => e.begin_generation(generation),
            Inner::Delta(e) => e.begin_generation(generation),
            Inner::Adaptive(e) => e.begin_generation(generation),
        }
    }

    fn sent_zero(&mut self, index: u64) {
        match &mut self.inner {
            Inner::Lz4(e) => e.sent_zero(index),
            #[cfg(feature = "zstd")]
            Inner::Zstd(e) => e.sent_zero(index),
            Inner::Delta(e) => e.sent_zero(index),
            Inner::Adaptive(e) => e.sent_zero(index),
        }
    }
}
