//! Content model for the simulator: what the bytes of each page are, so compression and dedup
//! studies see realistic data, without storing the guest's memory.
//!
//! A page's class (zero, text-like, random, or a duplicate of one of a few template pages) is a
//! hash of the seed and the page index. Its contents at version `v` (after `v` writes) are the
//! class's base contents with the last write to each of `page_size / bytes_per_write` slots
//! applied; write `j` changes slot `(j - 1) mod slots` (slots visited in a scattered order), so
//! consecutive versions differ in exactly `bytes_per_write` bytes and any version is built in
//! at most one page's worth of work.
//!
//! What each codec finds in these pages (none of the figures is tuned to a paper's result):
//! - a write changes `bytes_per_write` bytes of a page (64 by default: the issue measured a
//!   median changed page differing in 4–67 bytes after 1 s): XBZRLE deltas win on pages sent
//!   again;
//! - text pages (a slice of a small-vocabulary corpus) compress: LZ4 wins on them, nothing on
//!   random pages;
//! - duplicate pages copy one of `templates` pages: dedup references win;
//! - with `shared_fraction`, that share of pages holds the application's image, identical in
//!   every VM of the application (another seed) until written: hash-first against a sibling
//!   VM's image wins (paper 000).
//!
//! [`ContentModel::named`] gives a few documented mixes (`--content` in the CLI).

use serde::Serialize;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// How a guest's pages are filled and changed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ContentModel {
    /// Share of pages that start all-zero.
    pub zero_fraction: f64,
    /// Share of pages holding text-like (compressible) bytes.
    pub text_fraction: f64,
    /// Share of pages that duplicate one of `templates` pages.
    pub duplicate_fraction: f64,
    /// Distinct template pages the duplicates copy.
    pub templates: u32,
    /// Bytes one write changes (a power of two, at most the page size).
    pub bytes_per_write: u32,
    /// Share of pages holding the application's image: the same bytes in every VM of the
    /// application (whatever its seed) until written. 0 by default.
    #[serde(skip_serializing_if = "is_zero")]
    pub shared_fraction: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// The seed of the application image that shared pages hold.
const IMAGE_SEED: u64 = 0x1a6e_5eed_0000_0001;

impl Default for ContentModel {
    fn default() -> Self {
        ContentModel {
            zero_fraction: 0.2,
            text_fraction: 0.3,
            duplicate_fraction: 0.05,
            templates: 16,
            bytes_per_write: 64,
            shared_fraction: 0.0,
        }
    }
}

/// What a page holds before any write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageClass {
    /// All zeroes.
    Zero,
    /// Words from a small vocabulary: compresses well.
    Text,
    /// Incompressible bytes.
    Random,
    /// A copy of template page `n`.
    Duplicate(u32),
}

const WORDS: [&[u8]; 16] = [
    b"the ",
    b"memory ",
    b"page ",
    b"of ",
    b"a ",
    b"virtual ",
    b"machine ",
    b"moves ",
    b"while ",
    b"it ",
    b"runs ",
    b"and ",
    b"dirty ",
    b"bits ",
    b"are ",
    b"logged\n",
];

fn unit(hash: u64) -> f64 {
    (hash >> 11) as f64 / (1u64 << 53) as f64
}

impl ContentModel {
    /// The named content mixes (`--content`), with what each is for.
    pub const NAMES: [(&'static str, &'static str); 5] = [
        ("default", "20% zero, 30% text, 5% duplicates of 16 pages, the rest random; writes change 64 B"),
        ("compressible", "10% zero, 80% text, 5% duplicates, 5% random; writes change 64 B"),
        ("incompressible", "no zero, text or duplicate pages: random bytes only; writes change 64 B"),
        ("rewrites", "the default mix, but a write rewrites the whole page (a young collection): deltas lose"),
        ("app-image", "the default mix, 96% of pages shared with every VM of the application (paper 000's figure)"),
    ];

    /// A named mix ([`ContentModel::NAMES`]).
    pub fn named(name: &str) -> Result<ContentModel, String> {
        let d = ContentModel::default();
        Ok(match name {
            "default" => d,
            "compressible" => ContentModel {
                zero_fraction: 0.1,
                text_fraction: 0.8,
                duplicate_fraction: 0.05,
                ..d
            },
            "incompressible" => ContentModel {
                zero_fraction: 0.0,
                text_fraction: 0.0,
                duplicate_fraction: 0.0,
                ..d
            },
            "rewrites" => ContentModel {
                bytes_per_write: 1 << 30,
                ..d
            },
            "app-image" => ContentModel {
                shared_fraction: 0.96,
                ..d
            },
            other => {
                return Err(format!(
                    "unknown content '{other}': use {}",
                    Self::NAMES.map(|(n, _)| n).join(", ")
                ))
            }
        })
    }

    /// The seed `page`'s initial contents come from: the application image's for a shared
    /// page, the VM's own otherwise.
    fn base_seed(&self, seed: u64, page: u64) -> u64 {
        if self.shared_fraction > 0.0
            && unit(xxh3_64_with_seed(&page.to_le_bytes(), IMAGE_SEED)) < self.shared_fraction
        {
            IMAGE_SEED
        } else {
            seed
        }
    }

    /// The class of `page`.
    pub fn class(&self, seed: u64, page: u64) -> PageClass {
        let seed = self.base_seed(seed, page);
        let u = unit(xxh3_64_with_seed(&page.to_le_bytes(), seed));
        if u < self.zero_fraction {
            PageClass::Zero
        } else if u < self.zero_fraction + self.text_fraction {
            PageClass::Text
        } else if u < self.zero_fraction + self.text_fraction + self.duplicate_fraction {
            PageClass::Duplicate((page % self.templates.max(1) as u64) as u32)
        } else {
            PageClass::Random
        }
    }

    /// Whether `page` at `version` is all zeroes.
    pub fn is_zero(&self, seed: u64, page: u64, version: u32) -> bool {
        version == 0 && self.class(seed, page) == PageClass::Zero
    }

    /// Fills `buf` (one page) with `page`'s contents after `version` writes.
    pub fn fill(&self, seed: u64, page: u64, version: u32, buf: &mut [u8]) {
        let base = self.base_seed(seed, page);
        match self.class(seed, page) {
            PageClass::Zero => buf.fill(0),
            PageClass::Text => fill_text(buf, base ^ page.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            PageClass::Random => fill_random(buf, base ^ page.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)),
            PageClass::Duplicate(t) => fill_random(buf, base ^ 0xd0d0 ^ t as u64),
        }
        if version == 0 {
            return;
        }
        let k = (self.bytes_per_write as usize)
            .clamp(1, buf.len())
            .next_power_of_two()
            .min(buf.len());
        let slots = (buf.len() / k) as u64;
        let v = version as u64;
        for s in 0..v.min(slots) {
            // The last write that landed in slot s.
            let j = s + 1 + (v - (s + 1)) / slots * slots;
            let position = (s.wrapping_mul(2_654_435_761) % slots) as usize * k;
            let mut x = xxh3_64_with_seed(&j.to_le_bytes(), seed ^ page);
            let slot = &mut buf[position..position + k];
            let mut words = slot.chunks_exact_mut(8);
            for chunk in &mut words {
                chunk.copy_from_slice(&x.to_le_bytes());
                x = x.rotate_left(17).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            }
            let tail = words.into_remainder();
            let n = tail.len();
            tail.copy_from_slice(&x.to_le_bytes()[..n]);
        }
    }
}

fn fill_random(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    // Page sizes are multiples of 8, so fixed-size chunks (no per-chunk memcpy call).
    for chunk in buf.chunks_exact_mut(8) {
        // xorshift64*: fast, and the content only needs to look random to a compressor.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        chunk.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
}

/// One MiB of text-like bytes, built once: a text page is a slice of it at a page-specific
/// offset, stamped with the page's seed so no two pages are identical by accident. (Building
/// each page word by word cost more than everything else the simulator does.)
fn text_corpus() -> &'static [u8] {
    static CORPUS: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    CORPUS.get_or_init(|| {
        let mut corpus = Vec::with_capacity(TEXT_CORPUS + 2 * 1024 * 1024);
        let mut x = 0x1234_5678_9abc_def1u64;
        while corpus.len() < TEXT_CORPUS + 2 * 1024 * 1024 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            corpus.extend_from_slice(WORDS[(x & 15) as usize]);
        }
        corpus
    })
}

const TEXT_CORPUS: usize = 1 << 20;

fn fill_text(buf: &mut [u8], seed: u64) {
    let corpus = text_corpus();
    let at = (seed % TEXT_CORPUS as u64) as usize;
    buf.copy_from_slice(&corpus[at..at + buf.len()]);
    let stamp = seed.to_le_bytes();
    let n = stamp.len().min(buf.len());
    buf[..n].copy_from_slice(&stamp[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_differ_by_one_write() {
        let m = ContentModel {
            zero_fraction: 0.0,
            text_fraction: 1.0,
            ..ContentModel::default()
        };
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        for v in [0u32, 1, 5, 63, 64, 65, 1000] {
            m.fill(1, 7, v, &mut a);
            m.fill(1, 7, v + 1, &mut b);
            let diff = a.iter().zip(&b).filter(|(x, y)| x != y).count();
            assert!(diff > 0 && diff <= 64, "v={v}: {diff} bytes differ");
            let mut again = vec![0u8; 4096];
            m.fill(1, 7, v, &mut again);
            assert_eq!(a, again, "deterministic");
        }
    }

    #[test]
    fn classes_follow_the_fractions() {
        let m = ContentModel::default();
        let n = 100_000;
        let zero = (0..n).filter(|&p| m.class(9, p) == PageClass::Zero).count();
        assert!((19_000..21_000).contains(&zero), "{zero}");
        let mut a = vec![1u8; 4096];
        let p = (0..n).find(|&p| m.class(9, p) == PageClass::Zero).unwrap();
        m.fill(9, p, 0, &mut a);
        assert!(a.iter().all(|&b| b == 0));
        assert!(m.is_zero(9, p, 0) && !m.is_zero(9, p, 1));
        let dups: Vec<u64> = (0..n)
            .filter(|&p| matches!(m.class(9, p), PageClass::Duplicate(0)))
            .take(2)
            .collect();
        let (mut x, mut y) = (vec![0u8; 4096], vec![0u8; 4096]);
        m.fill(9, dups[0], 0, &mut x);
        m.fill(9, dups[1], 0, &mut y);
        assert_eq!(x, y, "duplicates of one template are identical");
    }
}
