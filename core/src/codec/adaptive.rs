//! Adaptive choice of encoding per page (after Jin et al., paper 004: −27.1% downtime, −68.8%
//! data), and the rule that weighs CPU against the link.
//!
//! Why: no one encoding wins everywhere. XBZRLE beats LZ4 on 93–100% of changed pages of most
//! programs, but a JVM's young collection rewrites pages and XBZRLE wins on only 17–49% there;
//! random data does not compress at all and compressing it only burns CPU; and an encoder slower
//! than the link slows the migration down however much it saves.
//!
//! # Classes
//! [`classify`] looks at a page cheaply (a sample, no allocation) and says what it is:
//! - [`PageClass::Zero`]: all zero (header only);
//! - [`PageClass::RecentlySent`]: the delta cache holds a version from an earlier round;
//! - [`PageClass::FewWords`]: a sample of its 64-bit words holds at most
//!   [`FEW_WORDS`] distinct values (fills, sparse tables): compresses extremely well;
//! - [`PageClass::LowEntropy`]: the bytes of a sample have a collision entropy below
//!   [`LOW_ENTROPY_BITS`] bits (text, small integers, pointers): worth LZ4;
//! - [`PageClass::HighEntropy`]: the rest (compressed or encrypted data): sent raw.
//!
//! # Choice ([`Adaptive`])
//! 1. dedup: content sent before goes as a reference (24 bytes);
//! 2. a recently sent page tries XBZRLE (compressed again with LZ4 when that shrinks it,
//!    [`Encoding::XBZRLE_LZ4`]: structured changes such as a counter per record shrink by a
//!    quarter to a half); a delta of at most a quarter page is taken as is, a longer one is
//!    compared with LZ4 on the page when the page is compressible;
//! 3. few distinct words or low entropy: LZ4; high entropy: raw.
//!
//! Each step runs only if [`encoder_pays`] allows that encoder under the measured [`Rates`].
//! Step 3 classifies a page only while LZ4 is on (otherwise the page goes raw whatever its class).
//!
//! # Dedup is judged on what it finds
//! Hashing every page pays only if enough pages are duplicates: on a shared CPU, if
//! `H·threads·d > L` for the hash rate `H` and the share `d` of pages sent as references. `d` is
//! measured as the migration runs: while full dedup is off, a content-defined sample of one page
//! in 16 ([`super::dedup::in_sample`]) is still hashed and looked up (a hit still goes as a
//! reference). The share is measured on that sample in both modes (a sampled page's twin was
//! sampled too, so it is in the index even if it was sent while dedup was off), and every
//! [`DEDUP_WINDOW`] sampled lookups the rule is applied again to the share found.
//!
//! # CPU against the link
//! With the encoder on `threads` threads turning page bytes at `E` bytes/s into `r` times as many
//! (r < 1), and a link of `L` bytes/s, pages flow at `min(E·threads, L / r)` instead of `L`: the
//! encoder helps iff `E·threads > L` ([`encoder_pays`]; [`effective_rate`] gives the figure). The
//! caller measures `E` and `L`; these functions only compare them.
//!
//! That holds when the link works on its own (a NIC). When it runs on the CPUs that encode
//! (loopback TCP, source and destination on one host: [`Rates::shared_cpu`]), each page
//! costs its encoding time and then its (smaller) transfer on the same CPUs: a page byte takes
//! `1/(E·threads) + r/L` instead of `1/L`, and the encoder helps iff `E·threads·(1 − r) > L`
//! ([`encoder_pays_on_shared_cpu`]): a compressor that saves 10% must be ten times faster than
//! the link. Measured on a 1 GiB guest over loopback (link 1.49 GB/s, LZ4 1.77 GB/s): LZ4 on
//! cost 18% of the total time.

use alloc::vec;
use alloc::vec::Vec;

use super::dedup::{in_sample, DedupEncoder, SAMPLE_SHIFT};
use super::lz4::{DeltaLz4Encoder, Lz4Compressor};
use super::xbzrle::DeltaEncoder;
use super::zero::is_zero_page;
use super::PageEncoder;
use crate::wire::Encoding;

/// What a page looks like to [`classify`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageClass {
    /// All zero bytes.
    Zero,
    /// A version from an earlier round is cached for a delta.
    RecentlySent,
    /// Few distinct words in a sample.
    FewWords,
    /// Compressible bytes.
    LowEntropy,
    /// Incompressible bytes.
    HighEntropy,
}

/// A sample with at most this many distinct 64-bit words is [`PageClass::FewWords`].
pub const FEW_WORDS: usize = 4;
/// Words sampled for [`PageClass::FewWords`].
pub const WORD_SAMPLE: usize = 32;
/// A sample whose bytes' collision entropy is below this many bits per byte is
/// [`PageClass::LowEntropy`] (random bytes measure close to 8; English text about 4–5; LZ4
/// gains little above 6).
pub const LOW_ENTROPY_BITS: u32 = 6;
/// Bytes sampled for the entropy estimate (16 runs of 32 bytes spread over the page).
pub const BYTE_SAMPLE: usize = 512;
/// Lookups of sampled pages between two judgments of whether hashing every page pays (about
/// 4096 pages at one in 16).
pub const DEDUP_WINDOW: u32 = 256;

/// Classifies `page`; `recently_sent` says whether the delta cache holds an earlier version.
pub fn classify(page: &[u8], recently_sent: bool) -> PageClass {
    if is_zero_page(page) {
        return PageClass::Zero;
    }
    if recently_sent {
        return PageClass::RecentlySent;
    }
    classify_content(page)
}

/// The content classes only: [`PageClass::FewWords`], [`PageClass::LowEntropy`] or
/// [`PageClass::HighEntropy`].
pub fn classify_content(page: &[u8]) -> PageClass {
    if few_words(page) {
        return PageClass::FewWords;
    }
    if low_entropy(page) {
        PageClass::LowEntropy
    } else {
        PageClass::HighEntropy
    }
}

fn few_words(page: &[u8]) -> bool {
    let words = page.len() / 8;
    if words == 0 {
        return true;
    }
    let step = (words / WORD_SAMPLE).max(1);
    let mut seen = [0u64; FEW_WORDS];
    let mut distinct = 0;
    for w in page.chunks_exact(8).step_by(step).take(WORD_SAMPLE) {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        let v = u64::from_ne_bytes(a);
        if !seen[..distinct].contains(&v) {
            if distinct == FEW_WORDS {
                return false;
            }
            seen[distinct] = v;
            distinct += 1;
        }
    }
    true
}

fn low_entropy(page: &[u8]) -> bool {
    const RUN: usize = 32;
    let runs = BYTE_SAMPLE / RUN;
    let mut counts = [0u32; 256];
    let mut n = 0u64;
    let step = (page.len() / runs).max(RUN);
    for chunk in page.chunks(step).take(runs) {
        for &b in &chunk[..chunk.len().min(RUN)] {
            counts[b as usize] += 1;
            n += 1;
        }
    }
    // Collision entropy H2 = -log2(sum p^2) < bits  <=>  sum c^2 * 2^bits > n^2.
    let sum_sq: u64 = counts.iter().map(|&c| c as u64 * c as u64).sum();
    (sum_sq << LOW_ENTROPY_BITS) > n * n
}

/// Whether an encoder turning `encoder_rate` bytes of page per second per thread, on `threads`
/// threads, keeps up with a link of `link_rate` bytes per second (if not, compressing slows the
/// migration: send raw). A rate of 0 means unmeasured and counts as keeping up.
pub fn encoder_pays(encoder_rate: u64, threads: u32, link_rate: u64) -> bool {
    if encoder_rate == 0 || link_rate == 0 {
        return true;
    }
    encoder_rate.saturating_mul(threads.max(1) as u64) >= link_rate
}

/// [`encoder_pays`] for a link whose transfers run on the CPUs that encode
/// ([`Rates::shared_cpu`]): whether encoding at `encoder_rate` bytes per second per thread on
/// `threads` threads, to `ratio_permille`/1000 of the input, takes less time than the bytes it
/// saves on a link of `link_rate`. A rate or ratio of 0 means unmeasured: the plain rule
/// ([`encoder_pays`]) decides.
pub fn encoder_pays_on_shared_cpu(
    encoder_rate: u64,
    threads: u32,
    ratio_permille: u32,
    link_rate: u64,
) -> bool {
    if encoder_rate == 0 || link_rate == 0 || ratio_permille == 0 {
        return encoder_pays(encoder_rate, threads, link_rate);
    }
    let saved = 1000u128.saturating_sub(ratio_permille as u128);
    encoder_rate as u128 * threads.max(1) as u128 * saved > link_rate as u128 * 1000
}

/// Page bytes per second that flow with an encoder of `encoder_rate` (per thread, `threads`
/// threads) whose output is `ratio_permille`/1000 of its input, over a link of `link_rate`:
/// `min(encoder_rate · threads, link_rate / ratio)`.
pub fn effective_rate(encoder_rate: u64, threads: u32, ratio_permille: u32, link_rate: u64) -> u64 {
    let cpu = encoder_rate.saturating_mul(threads.max(1) as u64);
    let wire = if ratio_permille == 0 {
        u64::MAX
    } else {
        (link_rate as u128 * 1000 / ratio_permille as u128).min(u64::MAX as u128) as u64
    };
    cpu.min(wire)
}

/// Measured figures for [`Adaptive`], in bytes of page per second per thread (0: unmeasured).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rates {
    /// The link's delivery rate (0: unknown; every encoder is then allowed).
    pub link: u64,
    /// Encoding threads (channels).
    pub threads: u32,
    /// LZ4 compression.
    pub lz4: u64,
    /// XBZRLE encoding.
    pub delta: u64,
    /// Content hashing (dedup).
    pub hash: u64,
    /// The link's transfers run on the CPUs that encode (loopback, both ends on one host):
    /// an encoder must save more time than it takes ([`encoder_pays_on_shared_cpu`]).
    pub shared_cpu: bool,
    /// LZ4's output per 1000 bytes of page on this guest's pages (0: unmeasured).
    pub lz4_ratio_permille: u32,
    /// XBZRLE's output per 1000 bytes of a page sent again (0: unmeasured).
    pub delta_ratio_permille: u32,
    /// Pages per 1000 whose content was sent before (dedup hits; 0: unmeasured or none).
    /// [`Adaptive`] measures it as it runs.
    pub duplicate_permille: u32,
}

/// Which of its encoders [`Adaptive`] uses now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enabled {
    /// References to content sent before.
    pub dedup: bool,
    /// XBZRLE deltas.
    pub delta: bool,
    /// LZ4.
    pub lz4: bool,
}

impl Enabled {
    /// The encoders that keep up with the link under `rates`.
    pub fn from_rates(rates: &Rates) -> Self {
        let pays = |rate, ratio| {
            if rates.shared_cpu {
                encoder_pays_on_shared_cpu(rate, rates.threads, ratio, rates.link)
            } else {
                encoder_pays(rate, rates.threads, rates.link)
            }
        };
        Enabled {
            dedup: dedup_pays(rates),
            delta: pays(rates.delta, rates.delta_ratio_permille),
            lz4: pays(rates.lz4, rates.lz4_ratio_permille),
        }
    }
}

/// Whether hashing every page for dedup pays under `rates`. On a link of its own, when the hash
/// keeps up with the link (its cost is CPU only). On a shared CPU, when the bytes references
/// save take longer to send than hashing every page takes (`H·threads·d > L`): with no duplicate
/// measured yet ([`Rates::duplicate_permille`] 0), it does not.
pub fn dedup_pays(rates: &Rates) -> bool {
    if !rates.shared_cpu {
        return encoder_pays(rates.hash, rates.threads, rates.link);
    }
    if rates.duplicate_permille == 0 {
        return rates.hash == 0 || rates.link == 0;
    }
    // A reference is 24 bytes instead of a page: it saves nearly the whole page.
    let ratio = 1000u32
        .saturating_sub(rates.duplicate_permille.min(1000))
        .max(1);
    encoder_pays_on_shared_cpu(rates.hash, rates.threads, ratio, rates.link)
}

/// Pages [`Adaptive`] sent per choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdaptiveStats {
    /// As references.
    pub reference: u64,
    /// As XBZRLE deltas.
    pub delta: u64,
    /// With LZ4.
    pub lz4: u64,
    /// Raw (high entropy, or nothing shorter).
    pub raw: u64,
    /// Pages classified few-words, low-entropy, high-entropy (for reports).
    pub few_words: u64,
    /// See `few_words`.
    pub low_entropy: u64,
    /// See `few_words`.
    pub high_entropy: u64,
    /// Pages not hashed for dedup (outside the sample while full dedup was off).
    pub unhashed: u64,
    /// Times the dedup judgment changed (full hashing on or off).
    pub dedup_switches: u64,
}

/// An encoder that picks, page by page, among dedup, XBZRLE and LZ4 (any may be left out), by
/// [`classify`] and the CPU-against-link rule. Keeps the delta cache and the dedup index equal to
/// what the destination holds whatever it picks; the same ordering rules as for its parts apply
/// (each page through the same encoder, in order, on one channel).
pub struct Adaptive {
    dedup: Option<DedupEncoder>,
    delta: Option<DeltaEncoder>,
    lz4: Option<Lz4Compressor>,
    enabled: Enabled,
    rates: Rates,
    /// Dedup lookups and hits since the last judgment.
    window_lookups: u32,
    window_hits: u32,
    dedup_window: u32,
    scratch: Vec<u8>,
    stats: AdaptiveStats,
}

impl Adaptive {
    /// An adaptive encoder over the given parts; all enabled until [`Adaptive::set_rates`].
    pub fn new(dedup: Option<DedupEncoder>, delta: Option<DeltaEncoder>, lz4: bool) -> Self {
        Adaptive {
            dedup,
            delta,
            lz4: lz4.then(Lz4Compressor::default),
            enabled: Enabled {
                dedup: true,
                delta: true,
                lz4: true,
            },
            rates: Rates::default(),
            window_lookups: 0,
            window_hits: 0,
            dedup_window: DEDUP_WINDOW,
            scratch: Vec::new(),
            stats: AdaptiveStats::default(),
        }
    }

    /// Applies measured rates: encoders slower than the link are not used.
    pub fn set_rates(&mut self, rates: &Rates) {
        self.rates = *rates;
        self.enabled = Enabled::from_rates(rates);
    }

    /// Judges dedup every `lookups` sampled lookups instead of [`DEDUP_WINDOW`] (at least 1).
    pub fn judge_dedup_every(mut self, lookups: u32) -> Self {
        self.dedup_window = lookups.max(1);
        self
    }

    /// The rates in use, with the duplicate share measured so far.
    pub fn rates(&self) -> Rates {
        self.rates
    }

    /// Counts one lookup of a sampled page; at the end of a window, judges dedup again on the share of hits.
    fn count_lookup(&mut self, hit: bool) {
        self.window_lookups += 1;
        self.window_hits += hit as u32;
        if self.window_lookups < self.dedup_window {
            return;
        }
        let share = (self.window_hits as u64 * 1000 / self.window_lookups as u64) as u32;
        // A window without a hit still counts as measured: 1 per 1000 at most.
        self.rates.duplicate_permille = share.max(1);
        self.window_lookups = 0;
        self.window_hits = 0;
        let on = dedup_pays(&self.rates);
        if on != self.enabled.dedup {
            self.stats.dedup_switches += 1;
            self.enabled.dedup = on;
        }
    }

    /// The encoders in use.
    pub fn enabled(&self) -> Enabled {
        self.enabled
    }

    /// The counters.
    pub fn stats(&self) -> AdaptiveStats {
        self.stats
    }

    /// The delta encoder, if any.
    pub fn delta(&self) -> Option<&DeltaEncoder> {
        self.delta.as_ref()
    }

    /// The dedup encoder, if any.
    pub fn dedup(&self) -> Option<&DedupEncoder> {
        self.dedup.as_ref()
    }

    /// The delta cache follows a page sent another way: it is recorded while deltas are on,
    /// forgotten (no copy) while they are off.
    fn follow_delta(&mut self, index: u64, page: &[u8]) {
        if let Some(delta) = self.delta.as_mut() {
            if self.enabled.delta {
                delta.record(index, page);
            } else {
                delta.forget(index);
            }
        }
    }

    fn lz4_into(&mut self, page: &[u8], out: &mut [u8]) -> Option<usize> {
        if !self.enabled.lz4 {
            return None;
        }
        self.lz4.as_mut()?.compress(page, out)
    }
}

impl PageEncoder for Adaptive {
    fn name(&self) -> &'static str {
        "adaptive"
    }

    fn keeps_state(&self) -> bool {
        self.dedup.is_some() || self.delta.is_some()
    }

    fn encode(&mut self, index: u64, page: &[u8], out: &mut [u8]) -> Option<(Encoding, usize)> {
        let limit = out.len().min(page.len().saturating_sub(1));
        let out = &mut out[..limit];

        // 1. Content sent before: a reference. Otherwise the index records this page. While
        //    full dedup does not pay, only a sample of pages is hashed, to measure whether it
        //    would.
        //    The share of duplicates is measured on the sample in both modes: a sampled page's
        //    twin was sampled too, so it is always in the index.
        if let Some(dedup) = self.dedup.as_mut() {
            let sampled = in_sample(page, SAMPLE_SHIFT);
            let found = if self.enabled.dedup || sampled {
                dedup.encode_reference(index, page, out)
            } else {
                dedup.forget(index);
                self.stats.unhashed += 1;
                None
            };
            if sampled {
                self.count_lookup(found.is_some());
            }
            if let Some(n) = found {
                self.follow_delta(index, page);
                self.stats.reference += 1;
                return Some((Encoding::REFERENCE, n));
            }
        }

        // 2. Sent in an earlier round: try a delta. The cache follows the page in every case.
        let mut best: Option<(Encoding, usize)> = None;
        let delta = self
            .delta
            .as_mut()
            .filter(|d| self.enabled.delta && d.has_base(index));
        if let Some(delta) = delta {
            if let Some(n) = delta.encode_delta(index, page, out) {
                let (e, n) = match self.lz4.as_mut() {
                    Some(lz4) if self.enabled.lz4 => {
                        DeltaLz4Encoder::squeeze(lz4, &mut self.scratch, out, n)
                    }
                    _ => (Encoding::XBZRLE, n),
                };
                if n <= page.len() / 4 {
                    self.stats.delta += 1;
                    return Some((e, n));
                }
                best = Some((e, n));
            }
        } else {
            self.follow_delta(index, page);
        }

        // 3. By content, when LZ4 may run (else the page goes raw whatever its class).
        if !self.enabled.lz4 || self.lz4.is_none() {
            match best {
                Some(_) => self.stats.delta += 1,
                None => self.stats.raw += 1,
            }
            return best;
        }
        let class = classify_content(page);
        match class {
            PageClass::FewWords => self.stats.few_words += 1,
            PageClass::LowEntropy => self.stats.low_entropy += 1,
            _ => self.stats.high_entropy += 1,
        }
        if class != PageClass::HighEntropy {
            let room = best.map_or(limit, |(_, n)| n.saturating_sub(1));
            if best.is_some() {
                // The delta sits in `out`: compress into the scratch, copy if shorter.
                let mut scratch = core::mem::take(&mut self.scratch);
                if scratch.len() < page.len() {
                    scratch = vec![0; page.len()];
                }
                let got = self.lz4_into(page, &mut scratch[..room]);
                if let Some(m) = got {
                    out[..m].copy_from_slice(&scratch[..m]);
                    best = Some((Encoding::LZ4, m));
                }
                self.scratch = scratch;
            } else if let Some(m) = self.lz4_into(page, &mut out[..room]) {
                best = Some((Encoding::LZ4, m));
            }
        }
        match best {
            Some((Encoding::LZ4, _)) => self.stats.lz4 += 1,
            Some(_) => self.stats.delta += 1,
            None => self.stats.raw += 1,
        }
        best
    }

    fn begin_generation(&mut self, generation: u32) {
        if let Some(delta) = self.delta.as_mut() {
            delta.begin_generation(generation);
        }
    }

    fn sent_zero(&mut self, index: u64) {
        if let Some(delta) = self.delta.as_mut() {
            delta.sent_zero(index);
        }
        if let Some(dedup) = self.dedup.as_mut() {
            dedup.sent_zero(index);
        }
    }
}
