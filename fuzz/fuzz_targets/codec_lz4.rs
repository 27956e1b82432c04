//! Fuzzes the LZ4 page decoders with arbitrary payloads: [`decompress_page`] ([`Lz4Decoder`],
//! `Encoding::LZ4`) and [`decode_delta_lz4`] ([`DeltaLz4Decoder`], LZ4 on an XBZRLE delta).
//!
//! The first input byte picks the mode (bit 0: LZ4 page or LZ4 delta) and the page size (bits
//! 1-2: 4, 8, 16 or 64 KiB); the rest is the payload. The target checks that decoding never
//! panics nor allocates beyond a page, that a page payload is accepted only if it decompresses to
//! exactly one page (and then compresses and decompresses back to the same page), that a refused
//! delta leaves the page as it was, and that every error prints.

#![no_main]

use libfuzzer_sys::fuzz_target;
use memferry::codec::lz4::{
    decode_delta_lz4, decompress_page, DeltaLz4Decoder, Lz4Decoder, Lz4Encoder,
};
use memferry::codec::{PageDecoder, PageEncoder};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, payload)) = data.split_first() else {
        return;
    };
    let page_size = [4096usize, 8192, 16384, 65536][(mode as usize >> 1) & 3];
    if mode & 1 == 0 {
        let mut page = vec![0xa5u8; page_size];
        let result = decompress_page(payload, &mut page);
        let mut wrapped = vec![0xa5u8; page_size];
        let via_trait = Lz4Decoder.decode(0, payload, &mut wrapped);
        assert_eq!(result.map_err(|e| e.as_str()), via_trait);
        match result {
            Ok(()) => {
                assert_eq!(page, wrapped);
                let mut out = vec![0u8; page_size];
                if let Some((_, n)) = Lz4Encoder::default().encode(0, &page, &mut out) {
                    assert!(n < page_size);
                    let mut back = vec![0u8; page_size];
                    decompress_page(&out[..n], &mut back).expect("our own block decodes");
                    assert_eq!(back, page, "compress/decompress changed the page");
                }
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    } else {
        let old: Vec<u8> = (0..page_size).map(|i| (i / 7) as u8).collect();
        let mut page = old.clone();
        let result = decode_delta_lz4(payload, &mut page, &mut Vec::new());
        let mut wrapped = old.clone();
        let via_trait = DeltaLz4Decoder::default().decode(0, payload, &mut wrapped);
        assert_eq!(result.map_err(|e| e.as_str()), via_trait);
        assert_eq!(page, wrapped);
        if let Err(e) = result {
            assert_eq!(page, old, "a refused payload changed the page");
            assert!(!e.to_string().is_empty());
        }
    }
});
