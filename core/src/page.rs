//! Page geometry: the page index type, the page size (a runtime power of two from 4 KiB to
//! 2 MiB) and the [`Geometry`] of a guest's memory (page size × page count).

use core::fmt;

/// The index of a guest page: guest-physical address divided by the page size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PageIndex(pub u64);

impl fmt::Display for PageIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "page {}", self.0)
    }
}

/// A page size: a power of two from [`PageSize::MIN`] (4 KiB) to [`PageSize::MAX`] (2 MiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageSize(u32);

/// Why a page size or geometry was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeometryError {
    /// The page size is not a power of two between 4 KiB and 2 MiB.
    BadPageSize(u64),
    /// The guest has no pages.
    NoPages,
    /// page count × page size does not fit in 64 bits.
    TooLarge,
}

impl fmt::Display for GeometryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GeometryError::BadPageSize(s) => write!(
                f,
                "page size {s} is not a power of two between 4096 and 2097152 bytes"
            ),
            GeometryError::NoPages => write!(f, "the guest must have at least one page"),
            GeometryError::TooLarge => write!(f, "page count x page size overflows 64 bits"),
        }
    }
}

impl PageSize {
    /// 4 KiB, the smallest and default page size.
    pub const MIN: PageSize = PageSize(4096);
    /// 2 MiB, the largest page size (an x86 huge page).
    pub const MAX: PageSize = PageSize(2 * 1024 * 1024);
    /// The default: 4 KiB.
    pub const DEFAULT: PageSize = PageSize::MIN;

    /// A page size of `bytes`, which must be a power of two in `4096..=2097152`.
    pub fn new(bytes: u64) -> Result<Self, GeometryError> {
        if bytes.is_power_of_two() && bytes >= Self::MIN.0 as u64 && bytes <= Self::MAX.0 as u64 {
            Ok(PageSize(bytes as u32))
        } else {
            Err(GeometryError::BadPageSize(bytes))
        }
    }

    /// The size in bytes.
    pub const fn bytes(self) -> usize {
        self.0 as usize
    }

    /// log2 of the size.
    pub const fn shift(self) -> u32 {
        self.0.trailing_zeros()
    }
}

impl Default for PageSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The shape of a guest's memory: its page size and how many pages it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    page_size: PageSize,
    page_count: u64,
}

impl Geometry {
    /// A geometry of `page_count` pages of `page_size`.
    pub fn new(page_size: PageSize, page_count: u64) -> Result<Self, GeometryError> {
        if page_count == 0 {
            return Err(GeometryError::NoPages);
        }
        page_count
            .checked_mul(page_size.bytes() as u64)
            .ok_or(GeometryError::TooLarge)?;
        Ok(Geometry {
            page_size,
            page_count,
        })
    }

    /// The geometry covering `memory_bytes` (rounded up to whole pages).
    pub fn for_memory(page_size: PageSize, memory_bytes: u64) -> Result<Self, GeometryError> {
        let pages = memory_bytes.div_ceil(page_size.bytes() as u64);
        Self::new(page_size, pages)
    }

    /// The page size.
    pub const fn page_size(&self) -> PageSize {
        self.page_size
    }

    /// The number of pages.
    pub const fn page_count(&self) -> u64 {
        self.page_count
    }

    /// Total memory in bytes.
    pub const fn memory_bytes(&self) -> u64 {
        self.page_count * self.page_size.0 as u64
    }

    /// Whether `page` lies inside this guest.
    pub const fn contains(&self, page: PageIndex) -> bool {
        page.0 < self.page_count
    }

    /// The byte offset of `page` from the start of guest memory.
    pub const fn offset_of(&self, page: PageIndex) -> u64 {
        page.0 << self.page_size.shift()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes() {
        assert!(PageSize::new(4096).is_ok());
        assert!(PageSize::new(2 << 20).is_ok());
        assert_eq!(PageSize::new(65536).unwrap().shift(), 16);
        for bad in [0, 1, 2048, 4095, 12288, 4 << 20] {
            assert_eq!(PageSize::new(bad), Err(GeometryError::BadPageSize(bad)));
        }
    }

    #[test]
    fn geometry() {
        let g = Geometry::for_memory(PageSize::DEFAULT, 1 << 30).unwrap();
        assert_eq!(g.page_count(), 262_144);
        assert_eq!(g.memory_bytes(), 1 << 30);
        assert_eq!(g.offset_of(PageIndex(3)), 3 * 4096);
        assert!(g.contains(PageIndex(262_143)));
        assert!(!g.contains(PageIndex(262_144)));
        assert_eq!(
            Geometry::new(PageSize::MAX, u64::MAX),
            Err(GeometryError::TooLarge)
        );
        assert_eq!(Geometry::new(PageSize::MIN, 0), Err(GeometryError::NoPages));
    }
}
