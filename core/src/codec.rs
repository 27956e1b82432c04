//! A place for codecs: how a page's bytes become a payload and back.
//!
//! [`PageEncoder`] and [`PageDecoder`] are the seams the content pipeline (LZ4, XBZRLE delta,
//! dedup references) plugs into. Two rules keep them safe:
//! - an encoder works on a **private copy** of the page (a codec that read live guest memory
//!   twice could disagree with itself: compress one version, checksum another);
//! - a decoder writes into a **scratch page** that the receiver then checks and writes to guest
//!   memory; untrusted input never lands in guest memory straight from the wire.
//!
//! Built in: [`Raw`] (the page as is) and zero detection ([`crate::wire::is_zero`]), which every
//! encode tries first. [`encode_page`] is the whole encoding step as a pure function of the
//! page copy and the codec's state, so N worker threads with N encoders can run it in parallel
//! while the engine alone decides which pages go.

use crate::wire::{Encoding, PagesWriter};

/// Turns a page into a payload.
pub trait PageEncoder: Send {
    /// A short name for reports.
    fn name(&self) -> &'static str;
    /// Encodes `page` (a private copy; its length is the page size) of dense index `index`
    /// into `out` (at least as long as the page). Returns the encoding used and the payload
    /// length, or `None` to send the page raw (the encoding would not save anything).
    fn encode(&mut self, index: u64, page: &[u8], out: &mut [u8]) -> Option<(Encoding, usize)>;
}

/// Turns a payload back into a page.
pub trait PageDecoder: Send {
    /// The encoding this decoder reads.
    fn encoding(&self) -> Encoding;
    /// Decodes `payload` for page `index` into `scratch` (one page). Must not panic on any
    /// input; returns a reason on a payload that does not decode to exactly one page.
    fn decode(
        &mut self,
        index: u64,
        payload: &[u8],
        scratch: &mut [u8],
    ) -> Result<(), &'static str>;
}

/// The identity encoder: every page goes raw (after the zero check).
#[derive(Clone, Copy, Debug, Default)]
pub struct Raw;

impl PageEncoder for Raw {
    fn name(&self) -> &'static str {
        "raw"
    }
    fn encode(&mut self, _index: u64, _page: &[u8], _out: &mut [u8]) -> Option<(Encoding, usize)> {
        None
    }
}

/// What [`encode_page`] did with a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// The encoding chosen.
    pub encoding: Encoding,
    /// Bytes the entry takes in the frame (entry header and payload).
    pub wire_bytes: usize,
}

/// Encodes one page into the open `Pages` frame `writer`: zero pages as a header only, then
/// `encoder`'s choice, else raw. `page` is the private copy (`None` when the host knows the page
/// is zero). Returns `None` if the entry does not fit (nothing is written then).
pub fn encode_page(
    writer: &mut PagesWriter<'_>,
    index: u64,
    page: Option<&[u8]>,
    page_size: usize,
    encoder: &mut dyn PageEncoder,
) -> Option<Encoded> {
    let slot = writer.begin_page(index, page_size)?;
    let (encoding, len) = match page {
        None => (Encoding::ZERO, 0),
        Some(p) if crate::wire::is_zero(p) => (Encoding::ZERO, 0),
        Some(p) => match encoder.encode(index, p, slot) {
            Some((e, n)) if n < page_size && e != Encoding::RAW && e != Encoding::ZERO => (e, n),
            _ => {
                slot.copy_from_slice(p);
                (Encoding::RAW, page_size)
            }
        },
    };
    let wire_bytes = writer.commit_page(encoding, len);
    Some(Encoded {
        encoding,
        wire_bytes,
    })
}

/// The raw path in one copy: `fill` copies the page from guest memory straight into its slot in
/// the frame (the slot is the private copy), then the zero check runs on it. Returns `Ok(None)`
/// if the entry does not fit, or `fill`'s error (the entry is dropped).
pub fn encode_page_raw<E>(
    writer: &mut PagesWriter<'_>,
    index: u64,
    page_size: usize,
    fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
) -> Result<Option<Encoded>, E> {
    let Some(slot) = writer.begin_page(index, page_size) else {
        return Ok(None);
    };
    fill(slot)?;
    let encoding = if crate::wire::is_zero(slot) {
        Encoding::ZERO
    } else {
        Encoding::RAW
    };
    let len = if encoding == Encoding::RAW {
        page_size
    } else {
        0
    };
    let wire_bytes = writer.commit_page(encoding, len);
    Ok(Some(Encoded {
        encoding,
        wire_bytes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Frame;

    /// A toy run-length encoder for one repeated byte, to exercise the seam.
    struct Fill;
    impl PageEncoder for Fill {
        fn name(&self) -> &'static str {
            "fill"
        }
        fn encode(&mut self, _: u64, page: &[u8], out: &mut [u8]) -> Option<(Encoding, usize)> {
            page.iter().all(|&b| b == page[0]).then(|| {
                out[0] = page[0];
                (Encoding(9), 1)
            })
        }
    }

    #[test]
    fn zero_custom_and_raw_choices() {
        let mut buf = vec![0u8; 4 * 4096];
        let mut w = PagesWriter::new(&mut buf, 1, true).unwrap();
        let zero = [0u8; 4096];
        let same = [7u8; 4096];
        let mut mixed = [7u8; 4096];
        mixed[5] = 1;
        let e = encode_page(&mut w, 0, Some(&zero), 4096, &mut Fill).unwrap();
        assert_eq!(e.encoding, Encoding::ZERO);
        let e = encode_page(&mut w, 1, Some(&same), 4096, &mut Fill).unwrap();
        assert_eq!((e.encoding, e.wire_bytes), (Encoding(9), 17));
        let e = encode_page(&mut w, 2, Some(&mixed), 4096, &mut Fill).unwrap();
        assert_eq!(e.encoding, Encoding::RAW);
        let e = encode_page_raw::<()>(&mut w, 3, 4096, |s| {
            s.fill(0);
            Ok(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(e.encoding, Encoding::ZERO);
        let len = w.finish();
        let (Frame::Pages { entries, .. }, _) = Frame::parse(&buf[..len]).unwrap() else {
            panic!()
        };
        let got: Vec<_> = entries.iter().map(|e| e.unwrap()).collect();
        assert_eq!(got.len(), 4);
        assert_eq!(got[2].payload, &mixed[..]);
    }
}
