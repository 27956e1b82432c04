//! Booting a multiboot (version 1) kernel, as QEMU's `-kernel` does, and the project's generated
//! guest ([`super::guest`]) as a multiboot ELF, so that one guest image runs under QEMU and under
//! memferry.
//!
//! # Loading ([`load`])
//! The multiboot header is looked for in the image's first 8192 bytes, 4-byte aligned: magic
//! `0x1BADB002`, flags, and a checksum that makes the three add up to 0. Flag bits 0–15 are
//! requirements: bit 0 (page-aligned modules: there are none), bit 1 (memory information: always
//! given) and bit 2 (a video mode: a preference, and this VMM has no display) are met; any other
//! is refused. When bit 16 is set, the header's address fields say where the image goes (the
//! "a.out kludge"); otherwise the image must be an ELF (32-bit, or a simple 64-bit one) whose
//! `PT_LOAD` segments go at their physical addresses, their tail past the file size zero (fresh
//! guest memory is zero already). The entry point is the ELF's (translated to a physical
//! address when it lies in a segment's virtual range) or the header's `entry_addr`.
//!
//! Every length and address is checked before use: a bad image (no header, a bad checksum, an
//! ELF cut short, a segment outside guest memory, an entry point outside what was loaded) is
//! refused with a [`MultibootError`] that says which, never a panic.
//!
//! # The machine state at entry ([`protected_mode_sregs`], [`entry_regs`])
//! As the specification says: 32-bit protected mode, paging off, flat 4 GiB code and data
//! segments, interrupts off, `EAX = 0x2BADB002`, `EBX` = the guest-physical address of the
//! multiboot information ([`boot_info`]: memory sizes, a memory map and the loader's name), `EIP`
//! = the entry point.
//!
//! # The generated guest as a multiboot ELF ([`guest_elf`])
//! One `PT_LOAD` segment holds what [`super::guest::image`] writes (page tables, GDT, TSS, the
//! control block, the workload's code) plus a short 32-bit prologue ([`PROLOGUE`], the entry
//! point): it loads the GDT, enables PAE, long mode and paging, jumps to 64-bit code, loads the
//! task register and `iretq`s to the workload at CPL3 with the registers
//! [`super::guest::initial_regs`] gives. The prologue runs at CPL0 (emulated slowly on
//! `kvm_pvm`, but it is 30 instructions); the workload then runs exactly as when the VMM sets
//! long mode itself, with the same final hash. The image is built for one memory size and the
//! layout [`kernel_config`] gives it (everything below 3 GiB in one region, the rest at 4 GiB:
//! under QEMU, `-m` of the same size up to 2 GiB gives the same layout); boot it with that size.

use super::guest::{self, GuestConfig, RegionRange};

/// The multiboot header's magic.
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// What `EAX` holds when a multiboot loader enters the kernel.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The header must lie within this many bytes of the image's start.
pub const HEADER_SEARCH: usize = 8192;
/// Header flag: the address fields are valid (the a.out kludge).
pub const FLAG_ADDRESSES: u32 = 1 << 16;
/// Header flag bits 0–15 this loader meets: aligned modules (none), memory information, a video
/// mode (a preference only).
const FLAGS_MET: u32 = 0b111;
/// Most memory a kernel's layout keeps below the 4 GiB hole ([`kernel_config`]).
pub const KERNEL_LOW_MEMORY: u64 = 3 << 30;

/// Guest-physical address of the generated guest's 32-bit prologue ([`PROLOGUE`]).
pub const PROLOGUE_ADDR: u64 = 0xB000;

/// The generated guest's 32-bit multiboot entry, loaded at [`PROLOGUE_ADDR`] (GNU `as`, Intel
/// syntax; the gaps up to 0x40 and 0x80 are zero padding).
#[rustfmt::skip]
pub const PROLOGUE: &[u8] = &[
    0xfa,                                     // 00: cli
    0x0f, 0x01, 0x15, 0x80, 0xb0, 0x00, 0x00, // 01: lgdt [0xb080]
    0x0f, 0x20, 0xe0,                         // 08: mov eax, cr4
    0x0d, 0x20, 0x06, 0x00, 0x00,             // 0b: or eax, 0x620 (PAE, OSFXSR, OSXMMEXCPT)
    0x0f, 0x22, 0xe0,                         // 10: mov cr4, eax
    0xb8, 0x00, 0x10, 0x00, 0x00,             // 13: mov eax, 0x1000 (the PML4)
    0x0f, 0x22, 0xd8,                         // 18: mov cr3, eax
    0xb9, 0x80, 0x00, 0x00, 0xc0,             // 1b: mov ecx, 0xc0000080 (EFER)
    0x0f, 0x32,                               // 20: rdmsr
    0x0d, 0x00, 0x01, 0x00, 0x00,             // 22: or eax, 0x100 (LME)
    0x0f, 0x30,                               // 27: wrmsr
    0xb8, 0x33, 0x00, 0x01, 0x80,             // 29: mov eax, 0x80010033 (PE MP ET NE WP PG)
    0x0f, 0x22, 0xc0,                         // 2e: mov cr0, eax
    0xea, 0x40, 0xb0, 0x00, 0x00, 0x08, 0x00, // 31: ljmp 0x08:0xb040
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 38: padding
    0x66, 0xb8, 0x10, 0x00,                   // 40: mov ax, 0x10 (64-bit code from here)
    0x8e, 0xd8,                               // 44: mov ds, eax
    0x8e, 0xc0,                               // 46: mov es, eax
    0x8e, 0xd0,                               // 48: mov ss, eax
    0x66, 0xb8, 0x28, 0x00,                   // 4a: mov ax, 0x28
    0x0f, 0x00, 0xd8,                         // 4e: ltr ax
    0xbc, 0x00, 0xf0, 0x00, 0x00,             // 51: mov esp, 0xf000 (the kernel stack)
    0x6a, 0x1b,                               // 56: push 0x1b (SS: user data)
    0x68, 0x00, 0x00, 0x01, 0x00,             // 58: push 0x10000 (RSP: guest::STACK_TOP)
    0x6a, 0x02,                               // 5d: push 0x2 (RFLAGS)
    0x6a, 0x23,                               // 5f: push 0x23 (CS: user code)
    0x68, 0x00, 0x80, 0x00, 0x00,             // 61: push 0x8000 (RIP: guest::CODE_ADDR)
    0x48, 0xcf,                               // 66: iretq
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 68: padding
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 70
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 78
    0x37, 0x00, 0x00, 0x40, 0x00, 0x00,       // 80: the GDT pointer: limit 55, base 0x4000
];

/// Why a multiboot image was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MultibootError(String);

impl MultibootError {
    fn new(message: impl Into<String>) -> Self {
        MultibootError(message.into())
    }
}

impl std::fmt::Display for MultibootError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not a bootable multiboot kernel: {}", self.0)
    }
}

impl std::error::Error for MultibootError {}

/// The header's address fields (flag bit 16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressFields {
    /// Where the header itself is loaded.
    pub header_addr: u32,
    /// Where the image's text starts (at or below `header_addr`).
    pub load_addr: u32,
    /// Where the loaded part ends; 0: at the end of the file.
    pub load_end_addr: u32,
    /// Where the zeroed bss ends; 0: no bss.
    pub bss_end_addr: u32,
    /// The entry point.
    pub entry_addr: u32,
}

/// A multiboot header found in an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Its offset in the image.
    pub offset: usize,
    /// Its flags.
    pub flags: u32,
    /// Its address fields, when flag bit 16 says they are valid.
    pub addresses: Option<AddressFields>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Finds the multiboot header in the first [`HEADER_SEARCH`] bytes of `image`.
pub fn find_header(image: &[u8]) -> Result<Header, MultibootError> {
    let window = &image[..image.len().min(HEADER_SEARCH)];
    let mut bad_checksum = None;
    for offset in (0..window.len().saturating_sub(11)).step_by(4) {
        if u32_at(window, offset) != Some(HEADER_MAGIC) {
            continue;
        }
        let (Some(flags), Some(checksum)) =
            (u32_at(window, offset + 4), u32_at(window, offset + 8))
        else {
            continue;
        };
        if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) != 0 {
            bad_checksum.get_or_insert(offset);
            continue;
        }
        let unmet = flags & 0xffff & !FLAGS_MET;
        if unmet != 0 {
            return Err(MultibootError::new(format!(
                "its header (at byte {offset}) requires features this loader does not have (flag bits {unmet:#06x})"
            )));
        }
        let addresses = if flags & FLAG_ADDRESSES != 0 {
            let field = |i: usize| u32_at(image, offset + 12 + 4 * i);
            match (field(0), field(1), field(2), field(3), field(4)) {
                (Some(h), Some(l), Some(le), Some(b), Some(e)) => Some(AddressFields {
                    header_addr: h,
                    load_addr: l,
                    load_end_addr: le,
                    bss_end_addr: b,
                    entry_addr: e,
                }),
                _ => {
                    return Err(MultibootError::new(format!(
                        "its header (at byte {offset}) says it has address fields, but the file ends first"
                    )))
                }
            }
        } else {
            None
        };
        return Ok(Header {
            offset,
            flags,
            addresses,
        });
    }
    Err(MultibootError::new(match bad_checksum {
        Some(at) => format!(
            "the multiboot header at byte {at} has a bad checksum (magic + flags + checksum must be 0)"
        ),
        None => format!(
            "no multiboot header (magic {HEADER_MAGIC:#010x}) in its first {HEADER_SEARCH} bytes"
        ),
    }))
}

/// One piece of a loaded kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: u64,
    /// Bytes from the file.
    pub data: Vec<u8>,
    /// Bytes in memory (at least `data.len()`; the rest is zero).
    pub mem_size: u64,
}

impl Segment {
    fn end(&self) -> u64 {
        self.addr + self.mem_size
    }
}

/// A kernel ready to be written into guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// Its header.
    pub header: Header,
    /// What goes where.
    pub segments: Vec<Segment>,
    /// The guest-physical entry point.
    pub entry: u32,
}

fn inside(regions: &[RegionRange], addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    regions
        .iter()
        .any(|&(base, bytes)| addr >= base && end <= base + bytes)
}

/// Parses `image` and checks that it fits guest memory of `regions` (guest-physical base,
/// bytes).
pub fn load(image: &[u8], regions: &[RegionRange]) -> Result<Kernel, MultibootError> {
    let header = find_header(image)?;
    let (segments, entry) = match header.addresses {
        Some(a) => load_aout(image, &header, &a)?,
        None => load_elf(image)?,
    };
    if segments.is_empty() {
        return Err(MultibootError::new("it has nothing to load"));
    }
    for s in &segments {
        if !inside(regions, s.addr, s.mem_size) {
            return Err(MultibootError::new(format!(
                "a segment at {:#x}..{:#x} lies outside guest memory ({})",
                s.addr,
                s.addr.saturating_add(s.mem_size),
                regions
                    .iter()
                    .map(|(b, l)| format!("{b:#x}..{:#x}", b + l))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let mut sorted: Vec<&Segment> = segments.iter().collect();
    sorted.sort_by_key(|s| s.addr);
    if let Some(w) = sorted.windows(2).find(|w| w[0].end() > w[1].addr) {
        return Err(MultibootError::new(format!(
            "its segments at {:#x} and {:#x} overlap",
            w[0].addr, w[1].addr
        )));
    }
    if !segments
        .iter()
        .any(|s| u64::from(entry) >= s.addr && u64::from(entry) < s.end())
    {
        return Err(MultibootError::new(format!(
            "its entry point {entry:#x} lies outside what it loads"
        )));
    }
    Ok(Kernel {
        header,
        segments,
        entry,
    })
}

fn load_aout(
    image: &[u8],
    header: &Header,
    a: &AddressFields,
) -> Result<(Vec<Segment>, u32), MultibootError> {
    let bad = |why: String| Err(MultibootError::new(why));
    if a.load_addr > a.header_addr {
        return bad(format!(
            "its load address {:#x} is above its header address {:#x}",
            a.load_addr, a.header_addr
        ));
    }
    let before = (a.header_addr - a.load_addr) as usize;
    let Some(start) = header.offset.checked_sub(before) else {
        return bad(format!(
            "its header address {:#x} puts the load address {:#x} before the start of the file",
            a.header_addr, a.load_addr
        ));
    };
    let size = if a.load_end_addr == 0 {
        (image.len() - start) as u64
    } else if a.load_end_addr < a.load_addr {
        return bad(format!(
            "its load end address {:#x} is below its load address {:#x}",
            a.load_end_addr, a.load_addr
        ));
    } else {
        u64::from(a.load_end_addr - a.load_addr)
    };
    let Some(data) = image.get(start..start.saturating_add(size as usize)) else {
        return bad(format!(
            "the file is cut short: it holds {} bytes from offset {start}, its header asks for {size}",
            image.len().saturating_sub(start)
        ));
    };
    let end = u64::from(a.load_addr) + size;
    let mem_end = match a.bss_end_addr {
        0 => end,
        b if u64::from(b) < end => {
            return bad(format!(
                "its bss end address {b:#x} is below the end of what it loads ({end:#x})"
            ))
        }
        b => u64::from(b),
    };
    Ok((
        vec![Segment {
            addr: u64::from(a.load_addr),
            data: data.to_vec(),
            mem_size: mem_end - u64::from(a.load_addr),
        }],
        a.entry_addr,
    ))
}

fn load_elf(image: &[u8]) -> Result<(Vec<Segment>, u32), MultibootError> {
    let bad = |why: &str| Err(MultibootError::new(why.to_string()));
    let short = || MultibootError::new("the ELF file is cut short");
    if image.get(..4) != Some(b"\x7fELF".as_slice()) {
        return bad("it is not an ELF file and its header has no address fields (flag bit 16)");
    }
    let class = *image.get(4).ok_or_else(short)?;
    if image.get(5) != Some(&1) {
        return bad("the ELF file is not little-endian");
    }
    let wide = match class {
        1 => false,
        2 => true,
        _ => return bad("the ELF file is neither 32- nor 64-bit"),
    };
    let machine = u16_at(image, 18).ok_or_else(short)?;
    if machine != 3 && machine != 62 {
        return Err(MultibootError::new(format!(
            "the ELF file is for machine {machine}, not x86"
        )));
    }
    let (entry, phoff, phentsize, phnum) = if wide {
        (
            u64_at(image, 24).ok_or_else(short)?,
            u64_at(image, 32).ok_or_else(short)?,
            u16_at(image, 54).ok_or_else(short)?,
            u16_at(image, 56).ok_or_else(short)?,
        )
    } else {
        (
            u64::from(u32_at(image, 24).ok_or_else(short)?),
            u64::from(u32_at(image, 28).ok_or_else(short)?),
            u16_at(image, 42).ok_or_else(short)?,
            u16_at(image, 44).ok_or_else(short)?,
        )
    };
    let min_entsize = if wide { 56 } else { 32 };
    if phnum > 0 && usize::from(phentsize) < min_entsize {
        return Err(MultibootError::new(format!(
            "its program headers are {phentsize} bytes, fewer than an ELF program header's {min_entsize}"
        )));
    }
    let table_end = phoff
        .checked_add(u64::from(phentsize) * u64::from(phnum))
        .filter(|&e| e <= image.len() as u64)
        .ok_or_else(|| MultibootError::new("the ELF file is cut short in its program headers"))?;
    let _ = table_end;
    let mut segments = Vec::new();
    // (virtual start, virtual end, physical start) of each segment, to translate the entry.
    let mut ranges = Vec::new();
    for i in 0..usize::from(phnum) {
        let at = phoff as usize + i * usize::from(phentsize);
        let field32 = |o: usize| u32_at(image, at + o).map(u64::from);
        let (ptype, offset, vaddr, paddr, filesz, memsz) = if wide {
            (
                u32_at(image, at),
                u64_at(image, at + 8),
                u64_at(image, at + 16),
                u64_at(image, at + 24),
                u64_at(image, at + 32),
                u64_at(image, at + 40),
            )
        } else {
            (
                u32_at(image, at),
                field32(4),
                field32(8),
                field32(12),
                field32(16),
                field32(20),
            )
        };
        let (Some(ptype), Some(offset), Some(vaddr), Some(paddr), Some(filesz), Some(memsz)) =
            (ptype, offset, vaddr, paddr, filesz, memsz)
        else {
            return Err(short());
        };
        if ptype != 1 || memsz == 0 {
            continue;
        }
        if filesz > memsz {
            return Err(MultibootError::new(format!(
                "segment {i} holds more bytes in the file ({filesz}) than in memory ({memsz})"
            )));
        }
        let data = offset
            .checked_add(filesz)
            .and_then(|end| image.get(offset as usize..usize::try_from(end).ok()?))
            .ok_or_else(|| {
                MultibootError::new(format!(
                    "the ELF file is cut short: segment {i} needs bytes {offset}..{} of a {}-byte file",
                    offset.saturating_add(filesz),
                    image.len()
                ))
            })?;
        segments.push(Segment {
            addr: paddr,
            data: data.to_vec(),
            mem_size: memsz,
        });
        ranges.push((vaddr, vaddr.saturating_add(memsz), paddr));
    }
    let physical = ranges
        .iter()
        .find(|&&(v, e, _)| entry >= v && entry < e)
        .map_or(entry, |&(v, _, p)| entry - v + p);
    let entry = u32::try_from(physical).map_err(|_| {
        MultibootError::new(format!(
            "its entry point {physical:#x} is above 4 GiB, out of reach of 32-bit code"
        ))
    })?;
    Ok((segments, entry))
}

/// The multiboot information for a guest with memory `regions`, placed at the first free page
/// at or above 4 KiB that none of `kernel`'s segments uses: (its address, its bytes).
pub fn boot_info(
    kernel: &Kernel,
    regions: &[RegionRange],
) -> Result<(u64, Vec<u8>), MultibootError> {
    const INFO: usize = 0x80;
    const PAGE: u64 = 4096;
    let name = b"memferry\0";
    let mut candidates: Vec<u64> = vec![PAGE];
    candidates.extend(
        kernel
            .segments
            .iter()
            .map(|s| s.end().div_ceil(PAGE) * PAGE),
    );
    candidates.sort_unstable();
    let at = candidates
        .into_iter()
        .find(|&c| {
            c < 1 << 32
                && inside(regions, c, PAGE)
                && kernel
                    .segments
                    .iter()
                    .all(|s| c + PAGE <= s.addr || c >= s.end())
        })
        .ok_or_else(|| {
            MultibootError::new("guest memory has no free page for the boot information")
        })?;
    // The memory map: conventional memory, the legacy hole, the rest.
    let mut map: Vec<(u64, u64, u32)> = Vec::new();
    for &(base, len) in regions {
        let end = base + len;
        if base < 0xA_0000 {
            map.push((base, end.min(0xA_0000) - base, 1));
            if end > 0xA_0000 {
                map.push((0xA_0000, end.min(0x10_0000) - 0xA_0000, 2));
            }
            if end > 0x10_0000 {
                map.push((0x10_0000, end - 0x10_0000, 1));
            }
        } else {
            map.push((base, len, 1));
        }
    }
    let low = regions.iter().find(|r| r.0 == 0).map_or(0, |r| r.1);
    let mem_lower = (low.min(0xA_0000) / 1024) as u32;
    let mem_upper = (low
        .saturating_sub(0x10_0000)
        .min(u64::from(u32::MAX) * 1024)
        / 1024) as u32;
    let mut info = vec![0u8; INFO];
    let mut put = |o: usize, v: u32| info[o..o + 4].copy_from_slice(&v.to_le_bytes());
    let mmap_at = at + INFO as u64;
    let mmap_len = (map.len() * 24) as u32;
    let name_at = mmap_at + u64::from(mmap_len);
    // Flags: mem_lower/mem_upper (0), the memory map (6), the loader's name (9).
    put(0, 1 | 1 << 6 | 1 << 9);
    put(4, mem_lower);
    put(8, mem_upper);
    put(44, mmap_len);
    put(48, mmap_at as u32);
    put(64, name_at as u32);
    for (base, len, kind) in map {
        info.extend_from_slice(&20u32.to_le_bytes());
        info.extend_from_slice(&base.to_le_bytes());
        info.extend_from_slice(&len.to_le_bytes());
        info.extend_from_slice(&kind.to_le_bytes());
    }
    info.extend_from_slice(name);
    Ok((at, info))
}

/// What a VMM writes into fresh guest memory to boot a kernel, and where it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootImage {
    /// (guest-physical address, bytes): the segments and the boot information.
    pub pieces: Vec<(u64, Vec<u8>)>,
    /// The entry point (`EIP`).
    pub entry: u32,
    /// The boot information's address (`EBX`).
    pub info: u32,
}

/// Loads `image` for a guest with memory `regions`: the pieces to write and the entry state.
pub fn boot_image(image: &[u8], regions: &[RegionRange]) -> Result<BootImage, MultibootError> {
    let kernel = load(image, regions)?;
    let (info_at, info) = boot_info(&kernel, regions)?;
    let mut pieces: Vec<(u64, Vec<u8>)> = kernel
        .segments
        .into_iter()
        .map(|s| (s.addr, s.data))
        .filter(|(_, d)| !d.is_empty())
        .collect();
    pieces.push((info_at, info));
    Ok(BootImage {
        pieces,
        entry: kernel.entry,
        info: info_at as u32,
    })
}

/// A kernel's memory layout for `memory` bytes (as [`GuestConfig::regions`] makes them): up to
/// [`KERNEL_LOW_MEMORY`] in region 0 at 0, the rest in region 1 at 4 GiB. `config` with that
/// layout.
pub fn kernel_config(config: &GuestConfig) -> GuestConfig {
    GuestConfig {
        low_memory: Some(config.memory.min(KERNEL_LOW_MEMORY)),
        ..*config
    }
}

/// Special registers at a multiboot entry: protected mode, paging off, flat 4 GiB segments
/// (code `0x08`, data `0x10`), no long mode.
pub fn protected_mode_sregs(sregs: &mut kvm_bindings::kvm_sregs) {
    use kvm_bindings::kvm_segment;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        selector: 0,
        limit: 0xffff,
        type_: 0xb,
        s: 0,
        db: 0,
        g: 0,
        ..code
    };
    sregs.ldt = kvm_segment {
        type_: 0x2,
        unusable: 1,
        ..sregs.tr
    };
    sregs.gdt.base = 0;
    sregs.gdt.limit = 0;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    // PE and ET; paging off.
    sregs.cr0 = 0x11;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
}

/// General registers at a multiboot entry.
pub fn entry_regs(boot: &BootImage) -> kvm_bindings::kvm_regs {
    kvm_bindings::kvm_regs {
        rax: u64::from(BOOTLOADER_MAGIC),
        rbx: u64::from(boot.info),
        rip: u64::from(boot.entry),
        rflags: 0x2,
        ..Default::default()
    }
}

/// A 32-bit x86 ELF executable with a multiboot header (flags `mb_flags`, no address fields)
/// right after its program headers, and one `PT_LOAD` per segment (physical = virtual address,
/// file bytes, memory bytes), entering at `entry`.
pub fn elf32(entry: u32, mb_flags: u32, segments: &[(u32, &[u8], u32)]) -> Vec<u8> {
    let phnum = segments.len();
    let header_at = 52 + 32 * phnum;
    let mut data_at = header_at + 12;
    let mut out = Vec::new();
    out.extend_from_slice(b"\x7fELF\x01\x01\x01");
    out.resize(16, 0);
    out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out.extend_from_slice(&3u16.to_le_bytes()); // EM_386
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&entry.to_le_bytes());
    out.extend_from_slice(&52u32.to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [52u16, 32, phnum as u16, 40, 0, 0] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for &(addr, bytes, mem) in segments {
        data_at = data_at.next_multiple_of(16);
        for v in [
            1,
            data_at as u32,
            addr,
            addr,
            bytes.len() as u32,
            mem.max(bytes.len() as u32),
            7,
            16,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        data_at += bytes.len();
    }
    out.extend_from_slice(&HEADER_MAGIC.to_le_bytes());
    out.extend_from_slice(&mb_flags.to_le_bytes());
    out.extend_from_slice(&(0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(mb_flags)).to_le_bytes());
    for &(_, bytes, _) in segments {
        out.resize(out.len().next_multiple_of(16), 0);
        out.extend_from_slice(bytes);
    }
    out
}

/// The generated guest of `config` as a multiboot ELF (see the module's documentation). Its
/// layout is [`kernel_config`]`(config)`'s; `tsc_khz` paces a guest with a write rate.
pub fn guest_elf(config: &GuestConfig, tsc_khz: u32) -> Result<Vec<u8>, String> {
    let config = kernel_config(config);
    let mut pieces = guest::image(&config, tsc_khz)?;
    pieces.push((PROLOGUE_ADDR, PROLOGUE.to_vec()));
    let start = pieces.iter().map(|p| p.0).min().unwrap_or(0);
    let end = pieces
        .iter()
        .map(|(at, b)| at + b.len() as u64)
        .max()
        .unwrap_or(0);
    if end > 1 << 32 {
        return Err("the guest image does not fit below 4 GiB".into());
    }
    let mut blob = vec![0u8; (end - start) as usize];
    for (at, bytes) in &pieces {
        let o = (at - start) as usize;
        blob[o..o + bytes.len()].copy_from_slice(bytes);
    }
    // The VMM sets TR itself and marks the TSS busy (type 0xb); the prologue's `ltr` needs it
    // available (type 0x9).
    let tss_type = (guest::GDT_ADDR + 5 * 8 + 5 - start) as usize;
    blob[tss_type] = 0x89;
    Ok(elf32(
        PROLOGUE_ADDR as u32,
        1 << 1,
        &[(start as u32, &blob, blob.len() as u32)],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: &[RegionRange] = &[(0, 16 << 20)];

    fn refused(image: &[u8]) -> String {
        load(image, MEM).unwrap_err().to_string()
    }

    #[test]
    fn a_small_elf_loads_with_its_entry_and_boot_information() {
        let code = [0xf4u8; 64];
        let data = [1u8, 2, 3];
        let image = elf32(
            0x10_0000,
            2,
            &[(0x10_0000, &code, 64), (0x20_0000, &data, 0x2000)],
        );
        let k = load(&image, MEM).unwrap();
        assert_eq!(k.entry, 0x10_0000);
        assert_eq!(k.segments.len(), 2);
        assert_eq!(k.segments[1].mem_size, 0x2000);
        assert_eq!(k.segments[1].data, data);
        let boot = boot_image(&image, MEM).unwrap();
        assert_eq!(boot.info, 0x1000);
        let (_, info) = boot.pieces.last().unwrap();
        let word = |o: usize| u32::from_le_bytes(info[o..o + 4].try_into().unwrap());
        assert_eq!(word(0), 1 | 1 << 6 | 1 << 9);
        assert_eq!(word(4), 640);
        assert_eq!(word(8), 15 * 1024);
        assert_eq!(word(44), 3 * 24);
        assert_eq!(word(48), 0x1080);
        let regs = entry_regs(&boot);
        assert_eq!(regs.rax, 0x2BAD_B002);
        assert_eq!(regs.rbx, 0x1000);
    }

    #[test]
    fn the_boot_information_avoids_the_kernel() {
        let code = [0x90u8; 16];
        let image = elf32(0x1000, 0, &[(0x1000, &code, 0x3000)]);
        let boot = boot_image(&image, MEM).unwrap();
        assert_eq!(boot.info, 0x4000);
    }

    #[test]
    fn the_aout_kludge_is_honoured() {
        // header at offset 16, loaded at 0x100010: the file loads from 0x100000.
        let mut image = vec![0u8; 16];
        let flags = FLAG_ADDRESSES;
        for v in [
            HEADER_MAGIC,
            flags,
            0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags),
            0x10_0010,
            0x10_0000,
            0,
            0x10_2000,
            0x10_0040,
        ] {
            image.extend_from_slice(&v.to_le_bytes());
        }
        image.resize(0x80, 0x90);
        let k = load(&image, MEM).unwrap();
        assert_eq!(k.entry, 0x10_0040);
        assert_eq!(k.segments[0].addr, 0x10_0000);
        assert_eq!(k.segments[0].data.len(), 0x80);
        assert_eq!(k.segments[0].mem_size, 0x2000);
        // A header address that puts the start before the file.
        let mut bad = image.clone();
        bad[28..32].copy_from_slice(&0x10_0100u32.to_le_bytes());
        assert!(refused(&bad).contains("before the start of the file"));
        // A load end past the file's end.
        let mut bad = image.clone();
        bad[36..40].copy_from_slice(&0x10_1000u32.to_le_bytes());
        assert!(refused(&bad).contains("cut short"));
    }

    #[test]
    fn an_image_without_a_header_is_refused() {
        assert!(refused(&[0u8; 9000]).contains("no multiboot header"));
        assert!(refused(&[]).contains("no multiboot header"));
        // A header past the first 8192 bytes does not count.
        let elf = elf32(0x10_0000, 0, &[(0x10_0000, &[0x90; 4], 4)]);
        let mut late = vec![0u8; 8192];
        late.extend_from_slice(&elf);
        assert!(refused(&late).contains("no multiboot header"));
    }

    #[test]
    fn a_bad_checksum_is_refused() {
        let mut image = elf32(0x10_0000, 0, &[(0x10_0000, &[0x90; 4], 4)]);
        let at = 52 + 32 + 8;
        image[at] ^= 1;
        assert!(refused(&image).contains("bad checksum"));
    }

    #[test]
    fn unmet_required_flags_are_refused() {
        let image = elf32(0x10_0000, 1 << 5, &[(0x10_0000, &[0x90; 4], 4)]);
        assert!(refused(&image).contains("requires features"));
    }

    #[test]
    fn a_segment_outside_guest_memory_is_refused() {
        let image = elf32(0x10_0000, 0, &[(0xff_f000, &[0x90; 4], 0x2000)]);
        assert!(refused(&image).contains("outside guest memory"));
        let image = elf32(0x10_0000, 0, &[(0xffff_f000, &[0x90; 4], 0x2000)]);
        assert!(refused(&image).contains("outside guest memory"));
    }

    #[test]
    fn a_truncated_elf_is_refused() {
        let image = elf32(0x10_0000, 0, &[(0x10_0000, &[0x90; 256], 256)]);
        let cut = &image[..image.len() - 10];
        assert!(refused(cut).contains("cut short"), "{}", refused(cut));
        // Cut inside the program headers (the multiboot header moved before them).
        let mut head = image[..60].to_vec();
        let flags = 0u32;
        head[16..20].copy_from_slice(&[2, 0, 3, 0]);
        head.extend_from_slice(&HEADER_MAGIC.to_le_bytes());
        head.extend_from_slice(&flags.to_le_bytes());
        head.extend_from_slice(&0u32.wrapping_sub(HEADER_MAGIC).to_le_bytes());
        assert!(refused(&head).contains("cut short"), "{}", refused(&head));
    }

    #[test]
    fn other_bad_elves_are_refused() {
        let good = elf32(0x10_0000, 0, &[(0x10_0000, &[0x90; 16], 16)]);
        let mut not_elf = good.clone();
        not_elf[0] = 0;
        assert!(refused(&not_elf).contains("not an ELF"));
        let mut arm = good.clone();
        arm[18] = 40;
        assert!(refused(&arm).contains("not x86"));
        let mut big = good.clone();
        big[5] = 2;
        assert!(refused(&big).contains("little-endian"));
        let outside = elf32(0x30_0000, 0, &[(0x10_0000, &[0x90; 16], 16)]);
        assert!(refused(&outside).contains("entry point"));
        let overlap = elf32(
            0x10_0000,
            0,
            &[(0x10_0000, &[0x90; 16], 0x1000), (0x10_0800, &[1; 4], 4)],
        );
        assert!(refused(&overlap).contains("overlap"));
        // memsz smaller than filesz.
        let mut shrunk = good.clone();
        shrunk[52 + 20..52 + 24].copy_from_slice(&4u32.to_le_bytes());
        assert!(refused(&shrunk).contains("more bytes in the file"));
    }

    #[test]
    fn the_guest_image_is_a_multiboot_elf_with_the_prologue_as_entry() {
        let config = GuestConfig {
            memory: 64 << 20,
            iterations: 1000,
            ..GuestConfig::default()
        };
        let elf = guest_elf(&config, 1_000_000).unwrap();
        let regions = kernel_config(&config).regions().unwrap();
        assert_eq!(regions, vec![(0, 64 << 20)]);
        let k = load(&elf, &regions).unwrap();
        assert_eq!(u64::from(k.entry), PROLOGUE_ADDR);
        assert_eq!(k.header.flags, 2);
        let boot = boot_image(&elf, &regions).unwrap();
        assert!(u64::from(boot.info) >= k.segments[0].end());
        assert_eq!(PROLOGUE.len(), 0x86);
    }
}
