//! Choosing the page codec of a migration (`--codec none|lz4|zstd|delta|adaptive`), the zstd
//! codec (std only: libzstd), and the calibration that tells the adaptive codec which encoders
//! keep up with the link.
//!
//! The core's codecs ([`memferry::codec`]) are LZ4, XBZRLE delta (with delta + LZ4), dedup
//! references and the adaptive choice among them; a destination decodes them all once
//! `FEATURE_CONTENT` is agreed. zstd is added here with its own encoding number
//! ([`ZSTD`]); a destination decodes it when built with [`destination_decoders`].
//!
//! Every codec runs on every channel's writer thread, one encoder per channel. Stateful codecs
//! (delta, adaptive) keep a picture of what the destination holds, so a page's delta must follow
//! the copy it builds on over the same connection: over several channels the session deals each
//! page always to the same channel (`SessionConfig::channel_affinity`, which the driver turns
//! on when its encoders keep state), and each channel's encoder gets its share of the delta
//! cache and dedup index ([`CodecOptions::per_channel`]).

use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use memferry::codec::adaptive::{Adaptive, Rates};
use memferry::codec::dedup::{ContentHasher, DedupEncoder, DedupIndex};
use memferry::codec::lz4::{Lz4Compressor, Lz4Encoder};
use memferry::codec::xbzrle::{DeltaEncoder, XbzrleCache};
use memferry::codec::{PageDecoder, PageEncoder};
use memferry::wire::Encoding;

/// The wire number of a zstd page (a zstd frame that decompresses to exactly one page).
/// Numbers from 16 up are for encodings defined outside the core.
pub const ZSTD: Encoding = Encoding(16);

/// Which codec a migration uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum CodecChoice {
    /// Pages go raw (zero pages as headers only). The default.
    #[default]
    None,
    /// LZ4 per page.
    Lz4,
    /// zstd per page (level [`CodecOptions::zstd_level`]).
    Zstd,
    /// XBZRLE deltas against the version sent in an earlier round (QEMU's format), LZ4 on the
    /// delta when that is shorter.
    Delta,
    /// Per page: a reference to content sent before, a delta, LZ4 or raw, by the page's class
    /// and by which encoders keep up with the link (Jin et al.).
    Adaptive,
}

impl CodecChoice {
    /// Every choice, in the order the CLI lists them.
    pub const ALL: [CodecChoice; 5] = [
        CodecChoice::None,
        CodecChoice::Lz4,
        CodecChoice::Zstd,
        CodecChoice::Delta,
        CodecChoice::Adaptive,
    ];

    /// The CLI's name.
    pub fn name(self) -> &'static str {
        match self {
            CodecChoice::None => "none",
            CodecChoice::Lz4 => "lz4",
            CodecChoice::Zstd => "zstd",
            CodecChoice::Delta => "delta",
            CodecChoice::Adaptive => "adaptive",
        }
    }

    /// Whether the codec keeps state about what the destination holds (over several channels,
    /// pages then keep to one channel each).
    pub fn stateful(self) -> bool {
        matches!(self, CodecChoice::Delta | CodecChoice::Adaptive)
    }

    /// A clear error if the codec cannot run over `channels` connections: every codec runs on
    /// 1 to 255 (stateful ones with each page kept to one channel).
    pub fn check_channels(self, channels: u16) -> Result<(), String> {
        if channels == 0 {
            return Err(format!(
                "--codec {} needs at least one channel",
                self.name()
            ));
        }
        Ok(())
    }
}

impl fmt::Display for CodecChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CodecChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        CodecChoice::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| format!("unknown codec '{s}': use none, lz4, zstd, delta or adaptive"))
    }
}

/// Settings of the codecs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodecOptions {
    /// The codec.
    pub choice: CodecChoice,
    /// Bytes of earlier page versions the source keeps for deltas. Default 64 MiB (QEMU's
    /// default XBZRLE cache).
    pub delta_cache_bytes: usize,
    /// zstd's level (1 fastest … 19). Default 1.
    pub zstd_level: i32,
    /// Content entries the dedup index keeps (adaptive). Default 1 Mi (about 40 MiB).
    pub dedup_entries: usize,
}

impl Default for CodecOptions {
    fn default() -> Self {
        CodecOptions {
            choice: CodecChoice::None,
            delta_cache_bytes: 64 << 20,
            zstd_level: 1,
            dedup_entries: 1 << 20,
        }
    }
}

impl CodecOptions {
    /// The options for each of `channels` encoders: a stateful codec's delta cache and dedup
    /// index are split among them (each channel's encoder holds only its own pages), so the
    /// memory they take is what the options say whatever the channel count.
    pub fn per_channel(&self, channels: u16) -> CodecOptions {
        let n = channels.max(1) as usize;
        CodecOptions {
            delta_cache_bytes: self.delta_cache_bytes / n,
            dedup_entries: self.dedup_entries.div_ceil(n),
            ..*self
        }
    }

    /// The encoder for one channel of a migration with session id `session_id` (the dedup
    /// hash's seed: the destination checks references with it), or `None` for raw pages.
    /// `rates`: measured encoder and link figures for the adaptive codec ([`calibrate`]).
    pub fn encoder(
        &self,
        session_id: u64,
        page_size: usize,
        rates: Option<&Rates>,
    ) -> Result<Option<Box<dyn PageEncoder>>, String> {
        let delta = || DeltaEncoder::new(XbzrleCache::new(self.delta_cache_bytes, page_size));
        Ok(match self.choice {
            CodecChoice::None => None,
            CodecChoice::Lz4 => Some(Box::new(Lz4Encoder::default())),
            CodecChoice::Zstd => Some(Box::new(ZstdEncoder::new(self.zstd_level)?)),
            CodecChoice::Delta => Some(Box::new(memferry::codec::lz4::DeltaLz4Encoder::new(
                delta(),
            ))),
            CodecChoice::Adaptive => {
                let dedup = DedupEncoder::new(DedupIndex::new(session_id, self.dedup_entries));
                let mut adaptive = Adaptive::new(Some(dedup), Some(delta()), true);
                if let Some(rates) = rates {
                    adaptive.set_rates(rates);
                }
                Some(Box::new(adaptive))
            }
        })
    }
}

/// The decoders a destination adds to the core's (which it registers itself once the source
/// offers content codecs): zstd.
pub fn destination_decoders() -> Vec<Box<dyn PageDecoder>> {
    vec![Box::new(ZstdDecoder::default())]
}

/// zstd per page: one frame per page, compressed by a context kept across pages.
pub struct ZstdEncoder {
    compressor: zstd::bulk::Compressor<'static>,
}

impl ZstdEncoder {
    /// An encoder at `level`.
    pub fn new(level: i32) -> Result<Self, String> {
        let range = zstd::compression_level_range();
        if !range.contains(&level) {
            return Err(format!(
                "zstd level {level} is outside {}..={}",
                range.start(),
                range.end()
            ));
        }
        let compressor = zstd::bulk::Compressor::new(level)
            .map_err(|e| format!("cannot set up zstd at level {level}: {e}"))?;
        Ok(ZstdEncoder { compressor })
    }
}

impl PageEncoder for ZstdEncoder {
    fn name(&self) -> &'static str {
        "zstd"
    }

    fn encode(&mut self, _index: u64, page: &[u8], out: &mut [u8]) -> Option<(Encoding, usize)> {
        // A frame that would not fit the page's slot is no gain: the page goes raw.
        let room = out.len().min(page.len().saturating_sub(1));
        let n = self
            .compressor
            .compress_to_buffer(page, &mut out[..room])
            .ok()?;
        Some((ZSTD, n))
    }
}

/// Decodes [`ZSTD`] pages into the page buffer only: the frame must decompress to exactly one
/// page (its declared size is not trusted; decompression stops at the buffer's end).
#[derive(Default)]
pub struct ZstdDecoder {
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

impl PageDecoder for ZstdDecoder {
    fn encoding(&self) -> Encoding {
        ZSTD
    }

    fn decode(
        &mut self,
        _index: u64,
        payload: &[u8],
        scratch: &mut [u8],
    ) -> Result<(), &'static str> {
        if self.decompressor.is_none() {
            self.decompressor = Some(
                zstd::bulk::Decompressor::new().map_err(|_| "cannot set up a zstd decompressor")?,
            );
        }
        let decompressor = self.decompressor.as_mut().expect("set up above");
        match decompressor.decompress_to_buffer(payload, scratch) {
            Ok(n) if n == scratch.len() => Ok(()),
            Ok(_) => Err("zstd payload does not decompress to exactly one page"),
            Err(_) => Err("malformed zstd payload (or longer than one page)"),
        }
    }
}

/// Up to `count` non-zero pages of guest memory of `pages` pages of `page_size` bytes, read
/// through `memory` at `4 · count` places spread evenly over it: the sample [`calibrate`]
/// measures. Zero pages are left out (they go as headers and never reach an encoder; a mostly
/// idle guest would otherwise make LZ4 look 100 times better than it is on the pages it gets),
/// and so are pages that cannot be read.
pub fn sample_memory(
    memory: &dyn memferry::plan::SharedPageRead,
    pages: u64,
    page_size: usize,
    count: u64,
) -> Vec<Vec<u8>> {
    let step = (pages / count.saturating_mul(4).max(1)).max(1);
    let mut buf = vec![0u8; page_size];
    (0..pages)
        .step_by(step as usize)
        .filter_map(|page| {
            memory
                .read_page_shared(memferry::page::PageIndex(page), &mut buf)
                .ok()
                .filter(|()| !memferry::codec::is_zero_page(&buf))
                .map(|()| buf.clone())
        })
        .take(count as usize)
        .collect()
}

/// The rates the adaptive codec weighs, measured on `sample` ([`calibrate`]) for `threads`
/// encoding threads, against `link`; an unlimited link is this host's own transport, whose
/// rate `probed` gives ([`crate::transport::probe_rate`]) and whose transfers take the CPUs the
/// encoders need ([`Rates::shared_cpu`]). Unlimited and not probed: the link is unknown and
/// every encoder is allowed.
pub fn adaptive_rates(
    sample: &[Vec<u8>],
    link: memferry::time::ByteRate,
    probed: Option<memferry::time::ByteRate>,
    threads: u32,
) -> Rates {
    let rate = if link.is_unlimited() {
        probed.map_or(0, |r| r.0)
    } else {
        link.0
    };
    let mut rates = calibrate(sample, rate, threads);
    rates.shared_cpu = link.is_unlimited() && probed.is_some();
    rates
}

/// Measures, on `pages` (a sample of the guest's memory, each one page), how fast this machine
/// compresses with LZ4, encodes XBZRLE deltas and hashes content, per thread: the figures the
/// adaptive codec weighs against the link (`link`, bytes per second; 0 when unknown) over
/// `threads` encoding threads, and what LZ4 and XBZRLE make of those pages (output per 1000
/// bytes). The link is taken to work on its own ([`Rates::shared_cpu`] false): a caller whose
/// link runs on the same CPUs (loopback) says so.
pub fn calibrate(pages: &[Vec<u8>], link: u64, threads: u32) -> Rates {
    let Some(page_size) = pages.first().map(Vec::len) else {
        return Rates {
            link,
            threads,
            ..Rates::default()
        };
    };
    let bytes = (pages.len() * page_size) as u64;
    let rate = |elapsed: std::time::Duration| {
        (bytes as f64 / elapsed.as_secs_f64().max(1e-9)).min(u64::MAX as f64) as u64
    };
    let mut out = vec![0u8; page_size];

    // Output per 1000 bytes of input (a page that does not shrink goes raw: its size).
    let ratio = |out_bytes: u64| ((out_bytes * 1000).div_ceil(bytes.max(1))).max(1) as u32;
    let mut lz4 = Lz4Compressor::default();
    let mut lz4_out = 0u64;
    let began = Instant::now();
    for page in pages {
        lz4_out += std::hint::black_box(lz4.compress(page, &mut out)).unwrap_or(page_size) as u64;
    }
    let lz4_rate = rate(began.elapsed());

    // Deltas of pages with a few bytes changed, against their earlier version.
    let mut delta = DeltaEncoder::new(XbzrleCache::new(pages.len() * page_size * 2, page_size));
    delta.begin_generation(1);
    for (i, page) in pages.iter().enumerate() {
        delta.record(i as u64, page);
    }
    delta.begin_generation(2);
    let mut changed = pages.to_vec();
    for (i, page) in changed.iter_mut().enumerate() {
        let at = (i * 97) % page_size;
        page[at] ^= 0x5a;
    }
    let mut delta_out = 0u64;
    let began = Instant::now();
    for (i, page) in changed.iter().enumerate() {
        let encoded = std::hint::black_box(delta.encode(i as u64, page, &mut out));
        delta_out += encoded.map_or(page_size, |(_, n)| n) as u64;
    }
    let delta_rate = rate(began.elapsed());

    let hasher = ContentHasher::new(1);
    let began = Instant::now();
    for page in pages {
        std::hint::black_box(hasher.hash(page));
    }
    let hash_rate = rate(began.elapsed());

    Rates {
        link,
        threads,
        lz4: lz4_rate,
        delta: delta_rate,
        hash: hash_rate,
        shared_cpu: false,
        lz4_ratio_permille: ratio(lz4_out),
        delta_ratio_permille: ratio(delta_out),
        // Duplicates are too rare in a sample of a few hundred pages to count: the adaptive
        // codec measures them as it runs.
        duplicate_permille: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_page(seed: u64) -> Vec<u8> {
        let words = ["memferry ", "page ", "delta ", "zstd ", "lz4 ", "guest "];
        let mut page = Vec::with_capacity(4096);
        let mut x = seed;
        while page.len() < 4096 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            page.extend_from_slice(words[(x >> 60) as usize % words.len()].as_bytes());
        }
        page.truncate(4096);
        page
    }

    #[test]
    fn zstd_round_trips_and_refuses_what_is_not_one_page() {
        let mut enc = ZstdEncoder::new(1).unwrap();
        let mut dec = ZstdDecoder::default();
        let page = text_page(3);
        let mut out = vec![0u8; 4096];
        let (e, n) = enc.encode(0, &page, &mut out).expect("text compresses");
        assert_eq!(e, ZSTD);
        assert!(n < 2048, "{n} bytes");
        let mut back = vec![0u8; 4096];
        dec.decode(0, &out[..n], &mut back).unwrap();
        assert_eq!(back, page);
        // Half a page, compressed: decodes, but not to one page.
        let half = zstd::bulk::compress(&page[..2048], 1).unwrap();
        assert!(dec.decode(0, &half, &mut back).is_err());
        // Two pages' worth: stops at the buffer, an error, no allocation.
        let double = zstd::bulk::compress(&[page.clone(), page.clone()].concat(), 1).unwrap();
        assert!(dec.decode(0, &double, &mut back).is_err());
        // Garbage and truncation.
        assert!(dec.decode(0, &out[..n / 2], &mut back).is_err());
        assert!(dec
            .decode(0, b"\x28\xb5\x2f\xfd\xff\xff\xff\xff", &mut back)
            .is_err());
        // Random bytes do not compress: the page goes raw.
        let mut x = 7u64;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(enc.encode(0, &random, &mut out).is_none());
    }

    #[test]
    fn choices_parse_and_run_on_any_channel_count() {
        for c in CodecChoice::ALL {
            assert_eq!(c.name().parse::<CodecChoice>().unwrap(), c);
        }
        assert!("brotli"
            .parse::<CodecChoice>()
            .unwrap_err()
            .contains("none, lz4"));
        for c in CodecChoice::ALL {
            assert!(c.check_channels(1).is_ok() && c.check_channels(4).is_ok());
            assert!(c.check_channels(0).is_err());
        }
        let split = CodecOptions::default().per_channel(4);
        assert_eq!(split.delta_cache_bytes, (64 << 20) / 4);
        assert_eq!(split.dedup_entries, (1 << 20) / 4);
        assert_eq!(
            CodecOptions::default().per_channel(0),
            CodecOptions::default()
        );
        let opts = CodecOptions {
            choice: CodecChoice::Zstd,
            zstd_level: 99,
            ..CodecOptions::default()
        };
        let Err(e) = opts.encoder(1, 4096, None) else {
            panic!("level 99 accepted")
        };
        assert!(e.contains("outside"), "{e}");
    }

    /// Guest memory where one page in `every` holds text, the rest zero.
    struct Sparse {
        every: u64,
    }

    impl memferry::plan::SharedPageRead for Sparse {
        fn read_page_shared(
            &self,
            page: memferry::page::PageIndex,
            buf: &mut [u8],
        ) -> Result<(), memferry::error::HostError> {
            if page.0.is_multiple_of(self.every) {
                buf.copy_from_slice(&text_page(page.0));
            } else {
                buf.fill(0);
            }
            Ok(())
        }
    }

    #[test]
    fn the_calibration_sample_leaves_zero_pages_out() {
        // 1 page in 40 holds text: 4 * 64 places sampled over 65,536 pages find some.
        let sample = sample_memory(&Sparse { every: 40 }, 1 << 16, 4096, 64);
        assert!(!sample.is_empty(), "no page found");
        assert!(sample.iter().all(|p| !memferry::codec::is_zero_page(p)));
        assert!(sample.len() <= 64);
        // All zero: an empty sample, and calibrating it measures nothing.
        let none = sample_memory(&Sparse { every: u64::MAX }, 1 << 10, 4096, 64);
        assert_eq!(none.len(), 1, "page 0 is the only text page");
        let rates = calibrate(&[], 1_000_000, 1);
        assert_eq!((rates.lz4, rates.lz4_ratio_permille), (0, 0));
    }

    #[test]
    fn calibration_measures_every_encoder() {
        let pages: Vec<Vec<u8>> = (0..64).map(text_page).collect();
        let rates = calibrate(&pages, 1_000_000_000, 2);
        assert!(
            rates.lz4 > 0 && rates.delta > 0 && rates.hash > 0,
            "{rates:?}"
        );
        assert_eq!((rates.link, rates.threads), (1_000_000_000, 2));
    }
}
