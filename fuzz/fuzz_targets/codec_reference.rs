//! Fuzzes dedup references: the decoder [`resolve`] ([`ReferenceDecoder`]) on arbitrary
//! payloads against a small destination memory, and the encoder-to-decoder path with
//! [`DedupEncoder`] on fuzzed page contents.
//!
//! Input: byte 0 picks the mode. Mode 0: the rest is a reference payload, resolved against a
//! destination of 8 pages (4 KiB) whose contents the next bytes choose; the target checks that an
//! accepted reference names a page that exists and whose bytes hash to the reference, and that
//! the scratch page then holds exactly those bytes. Mode 1: the rest is a sequence of page
//! writes `(page, pattern)` over a 16-page guest; each write is encoded with a [`DedupEncoder`]
//! (tiny index, so entries are evicted), sent, and applied by a model destination that resolves
//! references from its own memory; after every write the destination must equal the source
//! (a stale reference would be caught by the hash check and fail here).

#![no_main]

use libfuzzer_sys::fuzz_target;
use memferry::codec::dedup::{
    parse_reference, resolve, ContentHasher, DedupEncoder, DedupIndex, ReferenceDecoder,
};
use memferry::codec::{PageDecoder, PageEncoder};
use memferry::wire::Encoding;

const PAGE: usize = 4096;

fn pattern(seed: u8) -> Vec<u8> {
    // Few distinct patterns, so that duplicates are common.
    (0..PAGE)
        .map(|i| (i as u8).wrapping_mul(seed | 1).wrapping_add(seed >> 4))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let seed = 0x5eed;
    let hasher = ContentHasher::new(seed);
    if mode & 1 == 0 {
        let (patterns, payload) = rest.split_at(rest.len().min(8));
        let mem: Vec<Vec<u8>> = (0..8)
            .map(|i| pattern(patterns.get(i).copied().unwrap_or(0)))
            .collect();
        let mut read = |i: u64, buf: &mut [u8]| {
            mem.get(i as usize)
                .map(|p| buf.copy_from_slice(p))
                .ok_or("no such page")
        };
        let mut scratch = vec![0u8; PAGE];
        let result = resolve(payload, &hasher, &mut read, &mut scratch);
        let mut dec = ReferenceDecoder::new(seed, |i: u64, buf: &mut [u8]| {
            mem.get(i as usize)
                .map(|p| buf.copy_from_slice(p))
                .ok_or("no such page")
        });
        let mut wrapped = vec![0u8; PAGE];
        assert_eq!(
            result.map_err(|e| e.as_str()),
            dec.decode(0, payload, &mut wrapped)
        );
        match result {
            Ok(()) => {
                let (source, hash) = parse_reference(payload).expect("accepted, so well formed");
                let page = &mem[source as usize];
                assert_eq!(&scratch, page);
                assert_eq!(hasher.hash(page), hash);
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    } else {
        let mut src = vec![vec![0u8; PAGE]; 16];
        let mut dst = vec![vec![0xeeu8; PAGE]; 16];
        let mut enc = DedupEncoder::new(DedupIndex::new(seed, 3));
        let mut out = vec![0u8; PAGE];
        let mut scratch = vec![0u8; PAGE];
        for w in rest.chunks_exact(2) {
            let p = (w[0] % 16) as usize;
            src[p] = pattern(w[1] % 8);
            match enc.encode(p as u64, &src[p], &mut out) {
                Some((Encoding::REFERENCE, n)) => {
                    let mut read = |i: u64, buf: &mut [u8]| {
                        dst.get(i as usize)
                            .map(|q| buf.copy_from_slice(q))
                            .ok_or("no such page")
                    };
                    resolve(&out[..n], &hasher, &mut read, &mut scratch)
                        .expect("a reference from the encoder resolves");
                    dst[p].copy_from_slice(&scratch);
                }
                Some((e, _)) => panic!("dedup encoder produced {e:?}"),
                None => dst[p].copy_from_slice(&src[p]),
            }
            assert_eq!(dst[p], src[p]);
        }
    }
});
