//! Page geometry: the page index type, the page size (a runtime power of two from 4 KiB to
//! 2 MiB), the [`Geometry`] of a guest's memory (page size × page count) and its
//! [`MemoryLayout`]: a table of regions (KVM memslots, say) with holes between them, mapped to
//! one dense page index.
//!
//! Inside the engine every page has a dense index `0..page_count`: region after region, in the
//! table's order. Holes cost nothing (no bits, no hashes, no frames). Hosts translate a dense
//! index back with [`MemoryLayout::locate`].

use alloc::vec::Vec;

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

/// Why a page size, geometry or layout was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GeometryError {
    /// The page size is not a power of two between 4 KiB and 2 MiB.
    BadPageSize(u64),
    /// The guest has no pages.
    NoPages,
    /// page count × page size does not fit in 64 bits.
    TooLarge,
    /// A region has no pages.
    EmptyRegion(u32),
    /// Two regions share an id.
    DuplicateRegionId(u32),
    /// A region's guest-physical base is not a multiple of the page size.
    MisalignedRegion(u32),
    /// Two regions overlap in guest-physical memory.
    OverlappingRegions(u32, u32),
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
            GeometryError::EmptyRegion(id) => write!(f, "region {id} has no pages"),
            GeometryError::DuplicateRegionId(id) => write!(f, "two regions have id {id}"),
            GeometryError::MisalignedRegion(id) => write!(
                f,
                "region {id} starts at a guest address that is not a multiple of the page size"
            ),
            GeometryError::OverlappingRegions(a, b) => {
                write!(f, "regions {a} and {b} overlap in guest-physical memory")
            }
        }
    }
}

impl core::error::Error for GeometryError {}

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

/// One region of guest memory: a KVM memslot, a vm-memory `GuestRegionMmap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    /// The host's name for it (a slot number); unique in a layout.
    pub id: u32,
    /// Guest-physical address of its first byte (a multiple of the page size).
    pub guest_base: u64,
    /// Pages in it.
    pub pages: u64,
}

/// A guest's memory as regions with one dense page index.
///
/// ```
/// use memferry::page::{MemoryLayout, PageIndex, PageSize, Region};
/// let layout = MemoryLayout::new(PageSize::DEFAULT, vec![
///     Region { id: 0, guest_base: 0, pages: 768 },                 // 3 MiB below the hole
///     Region { id: 1, guest_base: 4 << 30, pages: 256 },           // 1 MiB above 4 GiB
/// ]).unwrap();
/// assert_eq!(layout.page_count(), 1024);                            // the hole costs nothing
/// assert_eq!(layout.locate(PageIndex(768)), Some((1, 0)));          // region 1, its page 0
/// assert_eq!(layout.guest_address(PageIndex(769)), Some((4 << 30) + 4096));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    page_size: PageSize,
    regions: Vec<Region>,
    /// Dense index of each region's first page; one more entry holding the total.
    starts: Vec<u64>,
}

impl MemoryLayout {
    /// A layout of `regions` (in this order) with pages of `page_size`.
    pub fn new(page_size: PageSize, regions: Vec<Region>) -> Result<Self, GeometryError> {
        if regions.is_empty() {
            return Err(GeometryError::NoPages);
        }
        let mut starts = Vec::with_capacity(regions.len() + 1);
        let mut total = 0u64;
        for (i, r) in regions.iter().enumerate() {
            if r.pages == 0 {
                return Err(GeometryError::EmptyRegion(r.id));
            }
            if r.guest_base % page_size.bytes() as u64 != 0 {
                return Err(GeometryError::MisalignedRegion(r.id));
            }
            let bytes = r
                .pages
                .checked_mul(page_size.bytes() as u64)
                .ok_or(GeometryError::TooLarge)?;
            let end = r
                .guest_base
                .checked_add(bytes)
                .ok_or(GeometryError::TooLarge)?;
            for other in &regions[..i] {
                if other.id == r.id {
                    return Err(GeometryError::DuplicateRegionId(r.id));
                }
                let other_end = other.guest_base + other.pages * page_size.bytes() as u64;
                if r.guest_base < other_end && other.guest_base < end {
                    return Err(GeometryError::OverlappingRegions(other.id, r.id));
                }
            }
            starts.push(total);
            total = total.checked_add(r.pages).ok_or(GeometryError::TooLarge)?;
        }
        Geometry::new(page_size, total)?;
        starts.push(total);
        Ok(MemoryLayout {
            page_size,
            regions,
            starts,
        })
    }

    /// One region, id 0, at guest address 0, covering `geometry`.
    pub fn single(geometry: Geometry) -> Self {
        MemoryLayout {
            page_size: geometry.page_size(),
            regions: alloc::vec![Region {
                id: 0,
                guest_base: 0,
                pages: geometry.page_count(),
            }],
            starts: alloc::vec![0, geometry.page_count()],
        }
    }

    /// The dense geometry: page size and the pages of all regions.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            page_size: self.page_size,
            page_count: self.page_count(),
        }
    }

    /// The page size.
    pub fn page_size(&self) -> PageSize {
        self.page_size
    }

    /// Pages in all regions.
    pub fn page_count(&self) -> u64 {
        *self.starts.last().unwrap_or(&0)
    }

    /// The regions, in table order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The dense index of the first page of the region at position `i` of the table.
    pub fn first_page(&self, i: usize) -> u64 {
        self.starts[i]
    }

    /// The region (its position in the table) holding dense page `page`, and the page's
    /// index inside that region; `None` past the end.
    pub fn locate(&self, page: PageIndex) -> Option<(usize, u64)> {
        if page.0 >= self.page_count() {
            return None;
        }
        // The last start not above `page` (starts[0] is 0, so there is one).
        let i = self.starts.partition_point(|&s| s <= page.0) - 1;
        Some((i, page.0 - self.starts[i]))
    }

    /// The guest-physical address of dense page `page`.
    pub fn guest_address(&self, page: PageIndex) -> Option<u64> {
        let (i, within) = self.locate(page)?;
        Some(self.regions[i].guest_base + (within << self.page_size.shift()))
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

    #[test]
    fn layouts() {
        let r = |id, base, pages| Region {
            id,
            guest_base: base,
            pages,
        };
        let ps = PageSize::DEFAULT;
        let l = MemoryLayout::new(ps, alloc::vec![r(3, 1 << 20, 10), r(1, 0, 5)]).unwrap();
        assert_eq!(l.page_count(), 15);
        assert_eq!(l.locate(PageIndex(0)), Some((0, 0)));
        assert_eq!(l.locate(PageIndex(9)), Some((0, 9)));
        assert_eq!(l.locate(PageIndex(10)), Some((1, 0)));
        assert_eq!(l.locate(PageIndex(15)), None);
        assert_eq!(l.guest_address(PageIndex(11)), Some(4096));
        assert_eq!(
            MemoryLayout::new(ps, alloc::vec![r(1, 0, 5), r(1, 1 << 20, 5)]),
            Err(GeometryError::DuplicateRegionId(1))
        );
        assert_eq!(
            MemoryLayout::new(ps, alloc::vec![r(1, 0, 5), r(2, 4096, 5)]),
            Err(GeometryError::OverlappingRegions(1, 2))
        );
        assert_eq!(
            MemoryLayout::new(ps, alloc::vec![r(1, 100, 5)]),
            Err(GeometryError::MisalignedRegion(1))
        );
        assert_eq!(
            MemoryLayout::new(ps, alloc::vec![r(1, 0, 0)]),
            Err(GeometryError::EmptyRegion(1))
        );
        let single = MemoryLayout::single(Geometry::new(ps, 7).unwrap());
        assert_eq!(single.geometry().page_count(), 7);
    }
}
