//! Tests of the page codecs ([`memferry::codec`]).
//!
//! - Zero check: equals a byte-by-byte check on pages with one stray bit anywhere.
//! - XBZRLE: the encoder's bytes equal a byte-at-a-time transcription of QEMU's
//!   `xbzrle_encode_buffer` on random, sparse, alternating and edge changes (so the format is
//!   QEMU's, byte for byte); every encoding decodes back; the output limit and runs above 0x3fff
//!   give `None`; the decoder rejects each kind of malformed payload with its own error and
//!   leaves the page untouched.
//! - LZ4: round trips on random, realistic and adversarial pages; a block that decompresses to
//!   less or more than a page is refused.
//! - Dedup: a forced hash collision is caught by the decoder and not written; a page sent again
//!   with new content is no longer referenced; the index stays bounded.
//! - Whole migrations of a small guest over several rounds (pages rewritten a little, rewritten
//!   fully, zeroed, duplicated, unchanged), encoded into `Pages` frames with [`encode_page`] by
//!   each encoder and applied by a model destination with the decoders: the destination equals
//!   the source after every round.
//! - Every decoder, on arbitrary bytes, returns an error or a page, never panics.
//! - The adaptive classifier and the CPU-against-link rule.

use memferry::codec::adaptive::{
    classify, effective_rate, encoder_pays, encoder_pays_on_shared_cpu, Adaptive, Enabled,
    PageClass, Rates,
};
use memferry::codec::dedup::{
    content_hash, resolve, write_reference, ContentHasher, DedupEncoder, DedupIndex,
    ReferenceDecoder, ReferenceError, REFERENCE_LEN,
};
use memferry::codec::lz4::{
    decode_delta_lz4, decompress_page, DeltaLz4Decoder, DeltaLz4Encoder, Lz4Decoder, Lz4Encoder,
    Lz4Error,
};
use memferry::codec::xbzrle::{self, DeltaDecoder, DeltaEncoder, DeltaError, XbzrleCache};
use memferry::codec::{encode_page, is_zero_page, PageDecoder, PageEncoder, Raw};
use memferry::wire::{Encoding, Frame, PagesWriter};
use proptest::prelude::*;

const PAGE: usize = 4096;

/// A reproducible byte stream (SplitMix64).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}

fn random_page(seed: u64, len: usize) -> Vec<u8> {
    let mut p = vec![0; len];
    Rng(seed).fill(&mut p);
    p
}

/// A page like a heap: small integers, pointers into one region, a little text, zeros.
fn realistic_page(seed: u64) -> Vec<u8> {
    let mut r = Rng(seed);
    let mut p = Vec::with_capacity(PAGE);
    while p.len() < PAGE {
        match r.below(4) {
            0 => p.extend_from_slice(&(r.below(1000) as u64).to_le_bytes()),
            1 => p.extend_from_slice(
                &(0x7f3a_1200_0000u64 + (r.below(1 << 16) as u64 * 16)).to_le_bytes(),
            ),
            2 => p.extend_from_slice(b"name=val"),
            _ => p.extend_from_slice(&[0; 8]),
        }
    }
    p.truncate(PAGE);
    p
}

/// QEMU's `xbzrle_encode_buffer`, transcribed byte at a time: the reference for the format.
fn qemu_encode(old: &[u8], new: &[u8], dlen: usize) -> Option<Vec<u8>> {
    let slen = new.len();
    let mut dst = Vec::new();
    let mut i = 0;
    while i < slen {
        if dst.len() + 2 > dlen {
            return None;
        }
        let mut zrun = 0;
        while i < slen && old[i] == new[i] {
            zrun += 1;
            i += 1;
        }
        if zrun == slen {
            return Some(Vec::new());
        }
        if i == slen {
            return Some(dst);
        }
        uleb(&mut dst, zrun)?;
        let start = i;
        if dst.len() + 2 > dlen {
            return None;
        }
        while i < slen && old[i] != new[i] {
            i += 1;
        }
        let nzrun = i - start;
        uleb(&mut dst, nzrun)?;
        if dst.len() + nzrun > dlen {
            return None;
        }
        dst.extend_from_slice(&new[start..i]);
    }
    Some(dst)
}

fn uleb(out: &mut Vec<u8>, n: usize) -> Option<()> {
    if n > 0x3fff {
        return None; // QEMU asserts; memferry sends the page raw
    }
    if n < 0x80 {
        out.push(n as u8);
    } else {
        out.push((n as u8 & 0x7f) | 0x80);
        out.push((n >> 7) as u8);
    }
    Some(())
}

/// Ways a page changes between two sends.
#[derive(Clone, Debug)]
enum Change {
    /// `n` random bytes changed at random offsets.
    Sparse(usize),
    /// Every other byte changed (the most runs).
    Alternate,
    /// The first and the last byte.
    Ends,
    /// A run of `len` bytes at `at`.
    Run(usize, usize),
    /// The whole page rewritten.
    Rewrite,
    /// Nothing.
    None,
}

fn change_strategy() -> impl Strategy<Value = Change> {
    prop_oneof![
        (1usize..200).prop_map(Change::Sparse),
        Just(Change::Alternate),
        Just(Change::Ends),
        (0usize..PAGE, 1usize..PAGE).prop_map(|(a, l)| Change::Run(a, l)),
        Just(Change::Rewrite),
        Just(Change::None),
    ]
}

fn apply_change(page: &mut [u8], change: &Change, r: &mut Rng) {
    let n = page.len();
    // XOR with a non-zero byte: the byte really changes.
    let flip = |p: &mut [u8], i: usize, r: &mut Rng| p[i] ^= (r.below(255) + 1) as u8;
    match *change {
        Change::Sparse(k) => (0..k).for_each(|_| {
            let i = r.below(n);
            flip(page, i, r)
        }),
        Change::Alternate => (0..n).step_by(2).for_each(|i| flip(page, i, r)),
        Change::Ends => {
            flip(page, 0, r);
            flip(page, n - 1, r);
        }
        Change::Run(at, len) => {
            let at = at % n;
            (at..(at + len).min(n)).for_each(|i| flip(page, i, r))
        }
        Change::Rewrite => r.fill(page),
        Change::None => {}
    }
}

#[test]
fn zero_check_finds_any_bit() {
    for len in [4096usize, 4097, 65536] {
        let mut p = vec![0u8; len];
        assert!(is_zero_page(&p));
        for i in (0..len).step_by(61).chain([len - 1]) {
            for bit in [0x01u8, 0x80] {
                p[i] = bit;
                assert!(!is_zero_page(&p), "len {len} byte {i} bit {bit:#x}");
                p[i] = 0;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The encoder writes QEMU's bytes exactly, and they decode back.
    #[test]
    fn xbzrle_is_qemus_format(seed: u64, change in change_strategy(), limit in 0usize..PAGE) {
        let mut r = Rng(seed);
        let old = if seed % 3 == 0 { realistic_page(seed) } else { random_page(seed, PAGE) };
        let mut new = old.clone();
        apply_change(&mut new, &change, &mut r);
        let mut out = vec![0u8; limit];
        let got = xbzrle::encode(&old, &new, &mut out);
        // The format is QEMU's output without a limit; memferry gives exactly those bytes when
        // they fit the limit, else None (QEMU gives up a little earlier: it wants room for two
        // more bytes before each run, even a final unchanged one).
        let want = qemu_encode(&old, &new, usize::MAX);
        match (got, &want) {
            (Some(n), Some(w)) => prop_assert_eq!(&out[..n], &w[..]),
            (None, Some(w)) => prop_assert!(w.len() > limit, "refused a payload that fits"),
            (Some(n), None) => prop_assert!(false, "encoded {} bytes with a run above 0x3fff", n),
            (None, None) => {}
        }
        if let Some(q) = qemu_encode(&old, &new, limit) {
            prop_assert_eq!(got.map(|n| &out[..n]), Some(&q[..]), "QEMU fits, memferry must");
        }
        // With a page-sized limit every payload decodes back.
        let mut big = vec![0u8; PAGE];
        if let Some(n) = xbzrle::encode(&old, &new, &mut big) {
            let mut page = old.clone();
            xbzrle::decode(&big[..n], &mut page).unwrap();
            prop_assert_eq!(page, new);
        }
    }

    /// Any payload the decoder accepts for a page, it also accepts again; on a refusal the page
    /// is untouched; it never panics.
    #[test]
    fn xbzrle_decoder_total(payload in proptest::collection::vec(any::<u8>(), 0..600), len in 1usize..3000) {
        let before = random_page(len as u64, len);
        let mut page = before.clone();
        match xbzrle::decode(&payload, &mut page) {
            Ok(()) => {}
            Err(e) => {
                prop_assert_eq!(&page, &before, "a refused payload changed the page");
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }

    /// LZ4 round trips on random, realistic and adversarial pages.
    #[test]
    fn lz4_round_trips(seed: u64, kind in 0u8..5) {
        let page: Vec<u8> = match kind {
            0 => random_page(seed, PAGE),
            1 => realistic_page(seed),
            2 => vec![seed as u8 | 1; PAGE],
            3 => (0..PAGE).map(|i| (i % (1 + seed as usize % 7)) as u8).collect(),
            _ => { let mut p = vec![0; PAGE]; p[seed as usize % PAGE] = 1; p }
        };
        let mut out = vec![0u8; PAGE];
        match Lz4Encoder::default().encode(0, &page, &mut out) {
            Some((e, n)) => {
                prop_assert_eq!(e, Encoding::LZ4);
                prop_assert!(n < PAGE);
                let mut back = vec![0u8; PAGE];
                decompress_page(&out[..n], &mut back).unwrap();
                prop_assert_eq!(back, page);
            }
            None => prop_assert_eq!(kind, 0, "only random pages are incompressible"),
        }
    }

    /// Every decoder, on arbitrary bytes: an error or one page, no panic.
    #[test]
    fn decoders_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..5000)) {
        let mut scratch = vec![0xa5u8; PAGE];
        let _ = Lz4Decoder.decode(1, &payload, &mut scratch);
        let _ = DeltaDecoder.decode(1, &payload, &mut scratch);
        let _ = DeltaLz4Decoder::default().decode(1, &payload, &mut scratch);
        let mem = realistic_page(3);
        let mut refs = ReferenceDecoder::new(7, |i: u64, buf: &mut [u8]| {
            if i == 0 { buf.copy_from_slice(&mem); Ok(()) } else { Err("no such page") }
        });
        let _ = refs.decode(1, &payload, &mut scratch);
    }

    /// Multi-round migrations with every encoder: the destination equals the source after
    /// every round.
    #[test]
    fn migrations_converge(seed: u64, rounds in 2usize..6, encoder in 0usize..8) {
        migrate(seed, rounds, encoder)?;
        // (counts checked in migrations_use_each_encoding)
    }
}

#[test]
fn xbzrle_runs_above_0x3fff_go_raw() {
    let big = 65536;
    let old = vec![0u8; big];
    let mut new = old.clone();
    new[20000] = 1; // an unchanged run of 20000 bytes before it
    let mut out = vec![0u8; big];
    assert_eq!(xbzrle::encode(&old, &new, &mut out), None);
    new[20000] = 0;
    new[100] = 1; // the trailing run is left out, whatever its length
    assert_eq!(xbzrle::encode(&old, &new, &mut out), Some(3));
}

#[test]
fn xbzrle_malformed_payloads() {
    let len = 100;
    let cases: &[(&[u8], DeltaError)] = &[
        (&[0], DeltaError::Truncated { at: 1 }),
        (&[5, 2, 9], DeltaError::Truncated { at: 3 }),
        (&[0x85], DeltaError::Truncated { at: 1 }),
        (&[0x85, 0x80, 1], DeltaError::BadLength { at: 0 }),
        (&[1, 1, 9, 0, 1, 9], DeltaError::EmptyUnchangedRun { at: 3 }),
        (&[1, 0], DeltaError::EmptyChangedRun { at: 1 }),
        (
            &[101, 1, 9],
            DeltaError::PastPage {
                at: 0,
                end: 101,
                page: 100,
            },
        ),
        (
            &[0x80 | 90, 0, 20],
            DeltaError::PastPage {
                at: 2,
                end: 110,
                page: 100,
            },
        ),
        (&[99, 1, 9, 1], DeltaError::TrailingBytes { at: 3 }),
    ];
    for (payload, want) in cases {
        let before: Vec<u8> = (0..len as u8).collect();
        let mut page = before.clone();
        let got = xbzrle::decode(payload, &mut page);
        assert_eq!(got, Err(*want), "payload {payload:?}");
        assert_eq!(page, before, "payload {payload:?} changed the page");
        let text = want.to_string();
        assert!(text.starts_with("xbzrle "), "{text}");
    }
    // The first unchanged run may be empty; the last may be left out; 0x80 0x00 is 0 in two
    // bytes (QEMU accepts it, so does memferry).
    let mut page = vec![0u8; len];
    xbzrle::decode(&[0, 2, 7, 8, 0x80, 0, 1, 1], &mut page).unwrap_err();
    xbzrle::decode(&[0, 2, 7, 8, 3, 1, 1], &mut page).unwrap();
    assert_eq!(&page[..6], &[7, 8, 0, 0, 0, 1]);
    xbzrle::decode(&[], &mut page).unwrap();
    assert_eq!(&page[..6], &[7, 8, 0, 0, 0, 1]);
}

/// One LZ4 block of `input` (lz4_flex, as the encoder makes them).
fn compress_block(input: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(input.len())];
    let n = lz4_flex::block::compress_into(input, &mut out).unwrap();
    out.truncate(n);
    out
}

#[test]
fn lz4_refuses_wrong_sizes() {
    let page = realistic_page(1);
    let mut c = vec![0u8; PAGE];
    let (_, n) = Lz4Encoder::default().encode(0, &page, &mut c).unwrap();
    let mut back = vec![0u8; PAGE];
    // A block of half a page is short for this page size...
    let half = compress_block(&page[..PAGE / 2]);
    assert_eq!(
        decompress_page(&half, &mut back),
        Err(Lz4Error::Short {
            got: PAGE / 2,
            page: PAGE
        })
    );
    // ...a block of two pages is too long, a cut block malformed.
    let double = compress_block(&[page.clone(), page.clone()].concat());
    assert_eq!(
        decompress_page(&double, &mut back),
        Err(Lz4Error::Malformed)
    );
    assert!(decompress_page(&c[..n - 3], &mut back).is_err());
    // A size-prefixed block (lz4_flex's other format) is not one.
    let prefixed = [&(PAGE as u32).to_le_bytes()[..], &compress_block(&page)].concat();
    assert!(decompress_page(&prefixed, &mut back).is_err());
    decompress_page(&c[..n], &mut back).unwrap();
    assert_eq!(back, page);
}

#[test]
fn delta_lz4_helps_on_repetitive_changes() {
    // A table of records whose counters all move: a long delta that repeats itself.
    let old: Vec<u8> = (0..PAGE)
        .map(|i| if i % 16 < 8 { 0 } else { (i / 16) as u8 })
        .collect();
    let mut new = old.clone();
    for i in (0..PAGE).step_by(16) {
        new[i] = 1;
        new[i + 1] = 2;
    }
    let mut enc = DeltaLz4Encoder::new(DeltaEncoder::new(XbzrleCache::new(1 << 20, PAGE)));
    let mut out = vec![0u8; PAGE];
    enc.begin_generation(2);
    assert_eq!(enc.encode(9, &old, &mut out), None, "cached, sent raw");
    enc.begin_generation(3);
    let (e, n) = enc.encode(9, &new, &mut out).unwrap();
    assert_eq!(e, Encoding::XBZRLE_LZ4);
    let mut plain = vec![0u8; PAGE];
    let plain_n = xbzrle::encode(&old, &new, &mut plain).unwrap();
    assert!(n * 4 < plain_n, "lz4 on the delta: {n} vs {plain_n}");
    let mut page = old.clone();
    decode_delta_lz4(&out[..n], &mut page, &mut Vec::new()).unwrap();
    assert_eq!(page, new);
}

#[test]
fn delta_encoder_rules() {
    let mut enc = DeltaEncoder::new(XbzrleCache::new(4 * PAGE, PAGE));
    let a = realistic_page(1);
    let mut b = a.clone();
    b[10] ^= 1;
    let mut out = vec![0u8; PAGE];
    // Round 1: not cached (QEMU's rule).
    assert_eq!(enc.encode(1, &a, &mut out), None);
    assert!(enc.cache().is_empty());
    enc.begin_generation(2);
    assert_eq!(enc.encode(1, &a, &mut out), None);
    // The same round again: cached in this generation, no delta yet.
    assert_eq!(enc.encode(1, &b, &mut out), None);
    enc.begin_generation(3);
    let (e, n) = enc.encode(1, &a, &mut out).unwrap();
    assert_eq!((e, n), (Encoding::XBZRLE, 3), "b -> a is one byte");
    // A zero send zeroes the cached copy: the next delta is against zeros.
    enc.sent_zero(1);
    enc.begin_generation(4);
    let (_, n) = enc.encode(1, &a, &mut out).unwrap_or((Encoding::RAW, PAGE));
    let mut page = vec![0u8; PAGE];
    if n < PAGE {
        xbzrle::decode(&out[..n], &mut page).unwrap();
        assert_eq!(page, a);
    }
    // Unchanged since the last send: an empty delta.
    enc.begin_generation(5);
    assert_eq!(enc.encode(1, &a, &mut out), Some((Encoding::XBZRLE, 0)));
}

/// A forced collision: the source's hash says two different pages are equal; the destination
/// recomputes the hash of what it would copy, catches the mismatch and copies nothing.
#[test]
fn forced_hash_collision_is_caught() {
    fn colliding(_: u64, _: &[u8]) -> u128 {
        42
    }
    let seed = 0x5eed;
    let a = realistic_page(1);
    let b = realistic_page(2);
    let mut enc = DedupEncoder::with_hasher(DedupIndex::new(seed, 100), colliding);
    let mut out = vec![0u8; PAGE];
    assert_eq!(enc.encode(0, &a, &mut out), None);
    let (e, n) = enc
        .encode(1, &b, &mut out)
        .expect("the collision makes a reference");
    assert_eq!((e, n), (Encoding::REFERENCE, REFERENCE_LEN));

    // The destination holds `a` in page 0 and is about to place page 1; like the receiver, it
    // writes the scratch page to memory only if the decoder accepts it.
    let mut dest = vec![a.clone(), realistic_page(3)];
    let mut scratch = vec![0u8; PAGE];
    let snapshot = dest.clone();
    let got = ReferenceDecoder::new(seed, |i: u64, buf: &mut [u8]| {
        snapshot
            .get(i as usize)
            .map(|p| buf.copy_from_slice(p))
            .ok_or("no such page")
    })
    .decode(1, &out[..n], &mut scratch);
    assert_eq!(
        got,
        Err(ReferenceError::HashMismatch { source: 0 }.as_str())
    );
    if got.is_ok() {
        dest[1].copy_from_slice(&scratch);
    }
    assert_eq!(dest[1], realistic_page(3), "nothing was written");

    // The same through the pure function, with the error's details.
    let mut mem = [a.clone()];
    let mut read = |i: u64, buf: &mut [u8]| {
        mem.get_mut(i as usize)
            .map(|p| buf.copy_from_slice(p))
            .ok_or("no such page")
    };
    let hasher = ContentHasher::new(seed);
    assert_eq!(
        resolve(&out[..n], &hasher, &mut read, &mut scratch),
        Err(ReferenceError::HashMismatch { source: 0 })
    );
    // An honest reference to `a` resolves; a wrong seed does not; bad lengths and missing
    // pages are refused.
    let mut good = [0u8; REFERENCE_LEN];
    write_reference(&mut good, 0, content_hash(seed, &a)).unwrap();
    resolve(&good, &hasher, &mut read, &mut scratch).unwrap();
    assert_eq!(scratch, a);
    assert!(resolve(
        &good,
        &ContentHasher::new(seed + 1),
        &mut read,
        &mut scratch
    )
    .is_err());
    assert_eq!(
        resolve(&good[..23], &hasher, &mut read, &mut scratch),
        Err(ReferenceError::BadLength { len: 23 })
    );
    write_reference(&mut good, 7, content_hash(seed, &a)).unwrap();
    assert!(matches!(
        resolve(&good, &hasher, &mut read, &mut scratch),
        Err(ReferenceError::Unreadable { source: 7, .. })
    ));
}

#[test]
fn dedup_index_follows_rewrites_and_stays_bounded() {
    let seed = 1;
    let mut enc = DedupEncoder::new(DedupIndex::new(seed, 8));
    let mut out = vec![0u8; PAGE];
    let a = realistic_page(1);
    assert_eq!(enc.encode(0, &a, &mut out), None);
    assert_eq!(
        enc.encode(1, &a, &mut out).map(|(e, _)| e),
        Some(Encoding::REFERENCE)
    );
    // Page 0 is rewritten: `a` is no longer there, page 2 must not point at it.
    assert_eq!(enc.encode(0, &realistic_page(9), &mut out), None);
    assert_eq!(enc.encode(2, &a, &mut out), None);
    // Page 0 sent as zero: its content is forgotten too.
    enc.sent_zero(0);
    assert_eq!(enc.encode(3, &realistic_page(9), &mut out), None);
    for i in 0..100 {
        enc.encode(10 + i, &realistic_page(100 + i), &mut out);
    }
    assert!(enc.index().len() <= 8);
    assert!(enc.index().stats().evicted > 0);
}

#[test]
fn classes_and_rates() {
    assert_eq!(classify(&[0u8; PAGE], true), PageClass::Zero);
    assert_eq!(classify(&realistic_page(1), true), PageClass::RecentlySent);
    assert_eq!(classify(&[7u8; PAGE], false), PageClass::FewWords);
    assert_eq!(classify(&realistic_page(1), false), PageClass::LowEntropy);
    let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog; "
        .iter()
        .cycle()
        .take(PAGE)
        .copied()
        .collect();
    assert_eq!(classify(&text, false), PageClass::LowEntropy);
    assert_eq!(
        classify(&random_page(1, PAGE), false),
        PageClass::HighEntropy
    );

    let gb = 1_000_000_000;
    assert!(encoder_pays(2 * gb, 1, gb));
    assert!(!encoder_pays(gb / 2, 1, gb), "slower than the link");
    assert!(encoder_pays(gb / 2, 4, gb), "four threads keep up");
    assert!(encoder_pays(gb / 2, 1, 0), "unknown link");
    assert_eq!(effective_rate(gb / 2, 1, 500, gb), gb / 2);
    assert_eq!(effective_rate(4 * gb, 1, 500, gb), 2 * gb);
    // On CPUs the link shares, an encoder must save more time than it takes: LZ4 at 1.77 GB/s
    // saving 10% against a 1.49 GB/s loopback does not; saving 90% it does.
    assert!(!encoder_pays_on_shared_cpu(
        1_770_000_000,
        1,
        900,
        1_490_000_000
    ));
    assert!(encoder_pays_on_shared_cpu(
        1_770_000_000,
        1,
        100,
        1_490_000_000
    ));
    assert!(
        !encoder_pays_on_shared_cpu(10 * gb, 4, 1000, gb),
        "saves nothing"
    );
    assert!(
        encoder_pays_on_shared_cpu(gb, 1, 0, gb),
        "unmeasured ratio: plain rule"
    );
    let shared = Rates {
        link: 1_490_000_000,
        threads: 1,
        lz4: 1_770_000_000,
        delta: 1_080_000_000,
        hash: 6_900_000_000,
        shared_cpu: true,
        lz4_ratio_permille: 950,
        delta_ratio_permille: 40,
        duplicate_permille: 0,
    };
    assert_eq!(
        Enabled::from_rates(&shared),
        Enabled {
            dedup: false,
            delta: false,
            lz4: false
        },
        "no duplicate measured yet: hashing every page does not pay on a shared CPU"
    );
    // Hashing at 6.9 GB/s pays for a 1.49 GB/s link once more than 21.6% of pages are
    // duplicates.
    for (permille, pays) in [(50, false), (200, false), (230, true), (900, true)] {
        assert_eq!(
            Enabled::from_rates(&Rates {
                duplicate_permille: permille,
                ..shared
            })
            .dedup,
            pays,
            "{permille} per 1000 duplicates"
        );
    }
    assert!(
        Enabled::from_rates(&Rates {
            shared_cpu: false,
            ..shared
        })
        .lz4,
        "a link that works on its own: LZ4 keeps up"
    );
    let on = Enabled::from_rates(&Rates {
        link: 1_250_000_000,
        threads: 1,
        lz4: 400_000_000,
        delta: 8 * gb,
        hash: 20 * gb,
        ..Rates::default()
    });
    assert_eq!(
        on,
        Enabled {
            dedup: true,
            delta: true,
            lz4: false
        }
    );
}

/// A model destination: applies the entries of a `Pages` frame to `mem`.
fn apply_frame(mem: &mut [Vec<u8>], frame: &[u8], seed: u64, seen: &mut [u64; 6]) {
    let (Frame::Pages { entries, .. }, _) = Frame::parse(frame).unwrap() else {
        panic!("not a pages frame")
    };
    let mut scratch = vec![0u8; PAGE];
    let mut tmp = Vec::new();
    for e in entries.iter() {
        let e = e.unwrap();
        let i = e.index as usize;
        seen[e.encoding.0 as usize] += 1;
        match e.encoding {
            Encoding::RAW => scratch.copy_from_slice(e.payload),
            Encoding::ZERO => scratch.fill(0),
            Encoding::LZ4 => decompress_page(e.payload, &mut scratch).unwrap(),
            Encoding::XBZRLE => {
                scratch.copy_from_slice(&mem[i]);
                xbzrle::decode(e.payload, &mut scratch).unwrap();
            }
            Encoding::XBZRLE_LZ4 => {
                scratch.copy_from_slice(&mem[i]);
                decode_delta_lz4(e.payload, &mut scratch, &mut tmp).unwrap();
            }
            Encoding::REFERENCE => {
                let mut read = |j: u64, buf: &mut [u8]| {
                    mem.get(j as usize)
                        .map(|p| buf.copy_from_slice(p))
                        .ok_or("no such page")
                };
                resolve(
                    e.payload,
                    &ContentHasher::new(seed),
                    &mut read,
                    &mut scratch,
                )
                .unwrap();
            }
            other => panic!("unknown encoding {other:?}"),
        }
        mem[i].copy_from_slice(&scratch);
    }
}

fn make_encoder(which: usize, seed: u64) -> Box<dyn PageEncoder> {
    let cache = || XbzrleCache::new(8 * PAGE, PAGE).with_lifetime(1);
    match which {
        0 => Box::new(Raw),
        1 => Box::new(Lz4Encoder::default()),
        2 => Box::new(DeltaEncoder::new(cache())),
        3 => Box::new(DeltaLz4Encoder::new(
            DeltaEncoder::new(cache()).cache_first_round(true),
        )),
        4 => Box::new(DedupEncoder::new(DedupIndex::new(seed, 6))),
        5 => Box::new(Adaptive::new(
            Some(DedupEncoder::new(DedupIndex::new(seed, 6))),
            Some(DeltaEncoder::new(cache()).cache_first_round(true)),
            true,
        )),
        7 => {
            // A shared CPU where hashing every page pays only above a third of duplicates,
            // judged every 4 lookups: dedup goes from sampling to full and back mid-migration.
            let mut a = Adaptive::new(
                Some(DedupEncoder::new(DedupIndex::new(seed, 6))),
                Some(DeltaEncoder::new(cache())),
                true,
            )
            .judge_dedup_every(4);
            a.set_rates(&Rates {
                link: 1000,
                threads: 1,
                lz4: 1_000_000,
                delta: 1_000_000,
                hash: 3000,
                shared_cpu: true,
                lz4_ratio_permille: 500,
                delta_ratio_permille: 50,
                duplicate_permille: 0,
            });
            Box::new(a)
        }
        _ => {
            let mut a = Adaptive::new(
                Some(DedupEncoder::new(DedupIndex::new(seed, 6))),
                Some(DeltaEncoder::new(cache())),
                true,
            );
            a.set_rates(&Rates {
                link: 1000,
                threads: 1,
                lz4: 10,
                delta: 0,
                hash: 0,
                ..Rates::default()
            });
            Box::new(a)
        }
    }
}

fn migrate(seed: u64, rounds: usize, which: usize) -> Result<[u64; 6], TestCaseError> {
    const PAGES: usize = 24;
    let mut r = Rng(seed);
    let mut src: Vec<Vec<u8>> = (0..PAGES)
        .map(|i| match r.below(5) {
            0 => vec![0; PAGE],
            1 => random_page(r.next(), PAGE),
            _ => realistic_page(seed ^ i as u64),
        })
        .collect();
    let mut dst: Vec<Vec<u8>> = vec![vec![0xee; PAGE]; PAGES];
    let hash_seed = r.next();
    let mut encoder = make_encoder(which, hash_seed);
    let mut dirty: Vec<usize> = (0..PAGES).collect();
    let mut buf = vec![0u8; 64 * 1024];
    let mut seen = [0u64; 6];
    for round in 1..=rounds as u32 {
        encoder.begin_generation(round);
        let mut pending = dirty.clone();
        while !pending.is_empty() {
            let mut w = PagesWriter::new(&mut buf, round, true).unwrap();
            let mut sent = 0;
            for &p in &pending {
                // Pages the host knows are zero go without a copy, as the session sends them.
                let copy = (!is_zero_page(&src[p]) || r.below(2) == 0).then_some(&src[p][..]);
                if encode_page(&mut w, p as u64, copy, PAGE, encoder.as_mut()).is_none() {
                    break;
                }
                sent += 1;
            }
            let len = w.finish();
            apply_frame(&mut dst, &buf[..len], hash_seed, &mut seen);
            pending.drain(..sent);
        }
        for p in 0..PAGES {
            prop_assert!(dst[p] == src[p], "round {} page {} differs", round, p);
        }
        // The guest runs: some pages change.
        dirty.clear();
        for p in 0..PAGES {
            let change = match r.below(8) {
                0 => Some(Change::Sparse(1 + r.below(40))),
                1 => Some(Change::Rewrite),
                2 => Some(Change::None),
                3 => {
                    src[p].fill(0);
                    Some(Change::None)
                }
                4 => {
                    let from = r.below(PAGES);
                    src[p] = src[from].clone();
                    Some(Change::None)
                }
                5 => Some(Change::Run(r.below(PAGE), r.below(300) + 1)),
                _ => None,
            };
            if let Some(c) = change {
                apply_change(&mut src[p], &c, &mut r);
                dirty.push(p);
            }
        }
    }
    Ok(seen)
}

/// The migrations above really exercise each encoding (counts over a few seeds).
#[test]
fn migrations_use_each_encoding() {
    let total = |which| {
        (0..20u64).fold([0u64; 6], |mut acc, seed| {
            let seen = migrate(seed, 5, which).unwrap();
            acc.iter_mut().zip(seen).for_each(|(a, s)| *a += s);
            acc
        })
    };
    let [_, zero, lz4, delta, delta_lz4, reference] = total(5);
    assert!(
        zero > 0 && lz4 > 0 && delta > 0 && reference > 0,
        "adaptive: {zero} {lz4} {delta} {reference}"
    );
    assert!(total(2)[3] > 0, "delta encoder: no deltas");
    let d = total(3);
    assert!(d[3] + d[4] > 0, "delta+lz4 encoder: no deltas");
    assert!(total(4)[5] > 0, "dedup encoder: no references");
    assert!(total(1)[2] > 0, "lz4 encoder: no lz4");
    assert!(total(7)[5] > 0, "adaptive judging dedup: no references");
    let _ = delta_lz4;
}

/// Pages whose content is never repeated, `n` of them from `seed`.
fn distinct_pages(seed: u64, n: usize) -> Vec<Vec<u8>> {
    (0..n as u64)
        .map(|i| random_page(seed.wrapping_mul(1_000_003) ^ i, PAGE))
        .collect()
}

/// On a shared CPU the adaptive codec hashes one page in 16 until it has measured enough
/// duplicates for hashing every page to pay, and goes back to sampling when they stop.
#[test]
fn adaptive_dedup_hashes_every_page_only_while_duplicates_pay_for_it() {
    let mut a = Adaptive::new(
        Some(DedupEncoder::new(DedupIndex::new(9, 1 << 16))),
        None,
        false,
    )
    .judge_dedup_every(64);
    a.set_rates(&Rates {
        link: 1_000_000_000,
        threads: 1,
        hash: 10_000_000_000,
        shared_cpu: true,
        ..Rates::default()
    });
    assert!(!a.enabled().dedup, "no duplicate measured: sampling");
    let mut out = vec![0u8; PAGE];
    // 4096 distinct pages: about 15 in 16 are not hashed, none is a reference.
    let distinct = distinct_pages(1, 4096);
    for (i, p) in distinct.iter().enumerate() {
        assert_eq!(a.encode(i as u64, p, &mut out), None);
    }
    let s = a.stats();
    assert!(
        (3600..4000).contains(&s.unhashed),
        "{} of 4096 pages not hashed",
        s.unhashed
    );
    assert!(!a.enabled().dedup);
    // The guest copies those pages elsewhere: the sampled ones are found (their originals were
    // hashed), the share measured on the sample (100%) makes full hashing pay.
    let mut references = 0;
    for (i, p) in distinct.iter().enumerate() {
        let got = a.encode(10_000 + i as u64, p, &mut out);
        references += matches!(got, Some((Encoding::REFERENCE, _))) as usize;
    }
    assert!(a.enabled().dedup, "duplicates measured, dedup still off");
    assert_eq!(a.rates().duplicate_permille, 1000);
    assert_eq!(a.stats().dedup_switches, 1);
    assert_eq!(
        references,
        4096 - s.unhashed as usize,
        "each sampled copy is a reference"
    );
    // Copied again: every page hashed since the switch (after about 64 · 16 pages) is found,
    // with the sampled ones before it.
    let mut again = 0;
    for (i, p) in distinct.iter().enumerate() {
        let got = a.encode(30_000 + i as u64, p, &mut out);
        again += matches!(got, Some((Encoding::REFERENCE, _))) as usize;
    }
    assert!(again > 4096 - 1300, "{again} references of 4096 copies");
    // New content again: back to sampling within a window.
    for (i, p) in distinct_pages(2, 2048).iter().enumerate() {
        assert_eq!(a.encode(20_000 + i as u64, p, &mut out), None);
    }
    assert!(
        !a.enabled().dedup,
        "no duplicates any more, dedup still hashing every page"
    );
    assert_eq!(a.stats().dedup_switches, 2);
}

#[test]
fn adaptive_picks_by_class() {
    let mut a = Adaptive::new(
        Some(DedupEncoder::new(DedupIndex::new(0, 100))),
        Some(DeltaEncoder::new(XbzrleCache::new(64 * PAGE, PAGE))),
        true,
    );
    let mut out = vec![0u8; PAGE];
    let heap = realistic_page(5);
    a.begin_generation(2);
    assert_eq!(
        a.encode(0, &heap, &mut out).map(|(e, _)| e),
        Some(Encoding::LZ4)
    );
    assert_eq!(a.encode(1, &random_page(1, PAGE), &mut out), None);
    assert_eq!(
        a.encode(2, &heap, &mut out).map(|(e, _)| e),
        Some(Encoding::REFERENCE)
    );
    a.begin_generation(3);
    let mut changed = heap.clone();
    changed[100] ^= 0xff;
    assert_eq!(
        a.encode(0, &changed, &mut out).map(|(e, _)| e),
        Some(Encoding::XBZRLE)
    );
    // A rewritten, compressible page: the delta is long, LZ4 wins.
    a.begin_generation(4);
    let other = realistic_page(77);
    assert_eq!(
        a.encode(0, &other, &mut out).map(|(e, _)| e),
        Some(Encoding::LZ4)
    );
    let s = a.stats();
    assert_eq!((s.reference, s.delta, s.lz4, s.raw), (1, 1, 2, 1));
}
