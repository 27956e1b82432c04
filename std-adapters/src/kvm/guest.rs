//! The guest memferry runs under KVM: a generated image that dirties memory in configurable
//! patterns and keeps a running hash of what it wrote, so that a migrated run's final hash can be
//! compared with a run that never migrated.
//!
//! # Why it starts at CPL3
//! On hosts whose KVM emulates supervisor code (`kvm_pvm`, no VMX/SVM: ring-0 guest code runs at
//! about a million instructions per second), only 64-bit user-mode code runs natively. So the
//! VMM sets the special registers itself ([`long_mode_sregs`]): paging on, long mode, CS and SS
//! at DPL 3 and a TSS; the guest signals its end with an MMIO write (HLT at CPL3 faults, and
//! `kvm_pvm` clears RFLAGS.IOPL, so `out` faults too). No guest instruction runs at CPL0; on
//! VMX/SVM hosts the same image runs the same way.
//!
//! # Memory map (guest-physical; the low 2 MiB are identity-mapped, user-accessible)
//! | address | what |
//! | --- | --- |
//! | `0x1000` | PML4 |
//! | `0x2000`, `0x3000` | PDPT and PD of the identity map (one 2 MiB page) |
//! | `0x4000` | GDT: null, kernel code/data, user data (`0x1b`), user code (`0x23`), TSS (`0x28`) |
//! | `0x5000` | TSS |
//! | `0x6000` | IDT (empty: any exception ends the guest with a triple fault, which the VMM reports) |
//! | `0x7000` | control block ([`ctrl`]): the configuration the VMM writes, the progress and hash the guest writes |
//! | `0x8000` | code ([`CODE`]) |
//! | `0x9000` | PD mapping [`DONE_MMIO`] (identity, no memory behind it) |
//! | `0x10000` | PDPT of the data window, then its page directories |
//! | 2 MiB to the end of region 0, then region 1 | data: mapped in order, 2 MiB pages, at [`DATA_VA`] |
//!
//! Region 1 lies above a hole ([`HIGH_BASE`], 4 GiB), as a PC's memory does above its PCI hole:
//! the guest sees one contiguous data window, the VMM two memslots.
//!
//! # What the guest does
//! Per write, an xorshift64 step gives `x`; its low 16 bits choose the pattern (below
//! `hot_threshold`: a page of the hot set; below `sweep_threshold`: the next page of a
//! sequential sweep; otherwise a page anywhere in the data); bits 19..27 choose a word in the
//! page. The guest reads the word, adds `x`, writes it back, and folds the value written into
//! its hash (`hash = (hash ^ value) * 0x9e3779b97f4a7c15`). Since each value depends on what
//! the guest read, a page lost or stale after a migration changes the final hash.
//! Every `batch` writes it publishes hash and progress in the control block and, when paced,
//! spins on RDTSC until the batch's deadline. After `iterations` writes (0: forever) it stores
//! the final hash, sets `status` to 1 and writes to [`DONE_MMIO`] in a loop.
//! [`expected_hash`] computes the same hash in Rust, without KVM.
//!
//! The code is [`CODE`], assembled once from the listing in its comments (GNU `as`, Intel
//! syntax; every field address is `ctrl::BASE` + offset).
//! The end is signalled by a 4-byte write to [`DONE_MMIO`], which is no memory: KVM exits with
//! `KVM_EXIT_MMIO` there.

use std::collections::HashMap;

/// Bytes of a small page.
pub const PAGE: u64 = 4096;
/// Bytes of a large page (the data window's mapping unit): guest memory comes in these.
pub const LARGE_PAGE: u64 = 2 << 20;
/// Guest-physical base of region 1, above the hole.
pub const HIGH_BASE: u64 = 4 << 30;
/// Guest-virtual address of the data window.
pub const DATA_VA: u64 = 0x80_0000_0000;
/// The guest-physical (and virtual) address the guest writes to when it has finished: in the
/// hole below 4 GiB, in no memslot, so the write exits to the VMM as MMIO. (`out` needs
/// IOPL 3, which `kvm_pvm` does not give user mode, and HLT at CPL3 faults.)
pub const DONE_MMIO: u64 = 0xf000_0000;
/// Guest address of the code.
pub const CODE_ADDR: u64 = 0x8000;
/// Guest address of the stack top (the code uses no stack; an exception would).
pub const STACK_TOP: u64 = 0x10000;
/// Most memory below the hole (region 0 must end below [`DONE_MMIO`]).
pub const MAX_LOW_MEMORY: u64 = 0xe000_0000;
/// Largest guest this image maps (its page directories must fit below 2 MiB).
pub const MAX_MEMORY: u64 = 256 << 30;

const PML4: u64 = 0x1000;
const PDPT_LOW: u64 = 0x2000;
const PD_LOW: u64 = 0x3000;
const GDT: u64 = 0x4000;
/// Guest address of the GDT (null, kernel code `0x08`, kernel data `0x10`, user data `0x1b`,
/// user code `0x23`, TSS `0x28`).
pub const GDT_ADDR: u64 = GDT;
const TSS: u64 = 0x5000;
const IDT: u64 = 0x6000;
const PD_DONE: u64 = 0x9000;
const PT_DONE: u64 = 0xA000;
const PDPT_DATA: u64 = 0x10000;
const PD_DATA: u64 = 0x11000;
const KERNEL_STACK_TOP: u64 = 0xF000;

/// Page-table entry bits: present, writable, user, large page.
const PTE_P_RW_US: u64 = 0x7;
const PTE_LARGE: u64 = 0x80;

/// Fields of the control block: guest-physical addresses.
pub mod ctrl {
    /// Base of the control block.
    pub const BASE: u64 = 0x7000;
    /// 0 while running, 1 once finished (guest).
    pub const STATUS: u64 = BASE;
    /// Writes to do; 0: forever (VMM).
    pub const ITERATIONS: u64 = BASE + 0x08;
    /// xorshift64 state at start, never 0 (VMM).
    pub const SEED: u64 = BASE + 0x10;
    /// Guest-virtual base of the data window (VMM).
    pub const DATA_VA: u64 = BASE + 0x18;
    /// Pages in the data window (VMM).
    pub const DATA_PAGES: u64 = BASE + 0x20;
    /// Pages in the hot set (VMM).
    pub const HOT_PAGES: u64 = BASE + 0x28;
    /// Writes whose low 16 bits are below this go to the hot set (VMM).
    pub const HOT_THRESHOLD: u64 = BASE + 0x30;
    /// ... below this (and not hot), to the sweep (VMM).
    pub const SWEEP_THRESHOLD: u64 = BASE + 0x38;
    /// Writes per batch (VMM).
    pub const BATCH: u64 = BASE + 0x40;
    /// TSC ticks per batch; 0: unpaced (VMM).
    pub const BATCH_TICKS: u64 = BASE + 0x48;
    /// Writes done, updated every batch and at the end (guest).
    pub const PROGRESS: u64 = BASE + 0x50;
    /// The running hash: its start value (VMM), updated every batch and at the end (guest).
    pub const HASH: u64 = BASE + 0x58;
    /// First page of the hot set in the data window (VMM).
    pub const HOT_BASE: u64 = BASE + 0x60;
    /// The next batch's TSC deadline (guest).
    pub const DEADLINE: u64 = BASE + 0x68;
    /// A guest more than this many ticks behind its pace stops catching up (VMM).
    pub const MAX_LAG: u64 = BASE + 0x70;
    /// The address to signal the end at (VMM).
    pub const DONE_ADDR: u64 = BASE + 0x78;
    /// Where the sweep starts, in pages (VMM).
    pub const SWEEP_START: u64 = BASE + 0x80;
}

/// The multiplier of the guest's hash.
pub const HASH_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
/// The hash's start value.
pub const HASH_START: u64 = 0xcbf2_9ce4_8422_2325;

/// The guest's code (0x18c bytes), loaded at [`CODE_ADDR`].
#[rustfmt::skip]
pub const CODE: &[u8] = &[
    // start
    0x4c, 0x8b, 0x04, 0x25, 0x10, 0x70, 0x00, 0x00, // 0000: mov r8,qword ptr 0x7010
    0x4c, 0x8b, 0x0c, 0x25, 0x08, 0x70, 0x00, 0x00, // 0008: mov r9,qword ptr 0x7008
    0x4c, 0x8b, 0x14, 0x25, 0x18, 0x70, 0x00, 0x00, // 0010: mov r10,qword ptr 0x7018
    0x4c, 0x8b, 0x1c, 0x25, 0x20, 0x70, 0x00, 0x00, // 0018: mov r11,qword ptr 0x7020
    0x4c, 0x8b, 0x24, 0x25, 0x28, 0x70, 0x00, 0x00, // 0020: mov r12,qword ptr 0x7028
    0x4c, 0x8b, 0x2c, 0x25, 0x58, 0x70, 0x00, 0x00, // 0028: mov r13,qword ptr 0x7058
    0x4c, 0x8b, 0x34, 0x25, 0x80, 0x70, 0x00, 0x00, // 0030: mov r14,qword ptr 0x7080
    0x4c, 0x8b, 0x3c, 0x25, 0x40, 0x70, 0x00, 0x00, // 0038: mov r15,qword ptr 0x7040
    0x48, 0xbf, 0x15, 0x7c, 0x4a, 0x7f, 0xb9, 0x79, 0x37, 0x9e, // 0040: movabs rdi,0x9e3779b97f4a7c15
    0x0f, 0x31, // 004a: rdtsc
    0x48, 0xc1, 0xe2, 0x20, // 004c: shl rdx,0x20
    0x48, 0x09, 0xd0, // 0050: or rax,rdx
    0x48, 0x89, 0x04, 0x25, 0x68, 0x70, 0x00, 0x00, // 0053: mov qword ptr 0x7068,rax
    // loop
    0x4c, 0x89, 0xc0, // 005b: mov rax,r8
    0x48, 0xc1, 0xe0, 0x0d, // 005e: shl rax,0xd
    0x49, 0x31, 0xc0, // 0062: xor r8,rax
    0x4c, 0x89, 0xc0, // 0065: mov rax,r8
    0x48, 0xc1, 0xe8, 0x07, // 0068: shr rax,0x7
    0x49, 0x31, 0xc0, // 006c: xor r8,rax
    0x4c, 0x89, 0xc0, // 006f: mov rax,r8
    0x48, 0xc1, 0xe0, 0x11, // 0072: shl rax,0x11
    0x49, 0x31, 0xc0, // 0076: xor r8,rax
    0x41, 0x0f, 0xb7, 0xc8, // 0079: movzx ecx,r8w
    0x4c, 0x89, 0xc0, // 007d: mov rax,r8
    0x48, 0xc1, 0xe8, 0x20, // 0080: shr rax,0x20
    0x48, 0x3b, 0x0c, 0x25, 0x30, 0x70, 0x00, 0x00, // 0084: cmp rcx,qword ptr 0x7030
    0x72, 0x13, // 008c: jb a1
    0x48, 0x3b, 0x0c, 0x25, 0x38, 0x70, 0x00, 0x00, // 008e: cmp rcx,qword ptr 0x7038
    0x72, 0x1a, // 0096: jb b2
    0x49, 0xf7, 0xe3, // 0098: mul r11
    0x48, 0xc1, 0xe8, 0x20, // 009b: shr rax,0x20
    0xeb, 0x1f, // 009f: jmp c0
    // hot
    0x49, 0xf7, 0xe4, // 00a1: mul r12
    0x48, 0xc1, 0xe8, 0x20, // 00a4: shr rax,0x20
    0x48, 0x03, 0x04, 0x25, 0x60, 0x70, 0x00, 0x00, // 00a8: add rax,qword ptr 0x7060
    0xeb, 0x0e, // 00b0: jmp c0
    // sweep
    0x4c, 0x89, 0xf0, // 00b2: mov rax,r14
    0x49, 0xff, 0xc6, // 00b5: inc r14
    0x4d, 0x39, 0xde, // 00b8: cmp r14,r11
    0x72, 0x03, // 00bb: jb c0
    0x45, 0x31, 0xf6, // 00bd: xor r14d,r14d
    // write
    0x48, 0xc1, 0xe0, 0x0c, // 00c0: shl rax,0xc
    0x4c, 0x89, 0xc2, // 00c4: mov rdx,r8
    0x48, 0xc1, 0xea, 0x10, // 00c7: shr rdx,0x10
    0x81, 0xe2, 0xf8, 0x0f, 0x00, 0x00, // 00cb: and edx,0xff8
    0x48, 0x01, 0xd0, // 00d1: add rax,rdx
    0x4c, 0x01, 0xd0, // 00d4: add rax,r10
    0x48, 0x8b, 0x10, // 00d7: mov rdx,qword ptr [rax]
    0x4c, 0x01, 0xc2, // 00da: add rdx,r8
    0x48, 0x89, 0x10, // 00dd: mov qword ptr [rax],rdx
    0x49, 0x31, 0xd5, // 00e0: xor r13,rdx
    0x4c, 0x0f, 0xaf, 0xef, // 00e3: imul r13,rdi
    0x49, 0xff, 0xcf, // 00e7: dec r15
    0x74, 0x3b, // 00ea: je 127
    // next
    0x49, 0xff, 0xc9, // 00ec: dec r9
    0x0f, 0x85, 0x66, 0xff, 0xff, 0xff, // 00ef: jne 5b
    // finish
    0x4c, 0x89, 0x2c, 0x25, 0x58, 0x70, 0x00, 0x00, // 00f5: mov qword ptr 0x7058,r13
    0x48, 0x8b, 0x04, 0x25, 0x40, 0x70, 0x00, 0x00, // 00fd: mov rax,qword ptr 0x7040
    0x4c, 0x29, 0xf8, // 0105: sub rax,r15
    0x48, 0x01, 0x04, 0x25, 0x50, 0x70, 0x00, 0x00, // 0108: add qword ptr 0x7050,rax
    0x48, 0xc7, 0x04, 0x25, 0x00, 0x70, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, // 0110: mov qword ptr 0x7000,0x1
    0x8b, 0x14, 0x25, 0x78, 0x70, 0x00, 0x00, // 011c: mov edx,dword ptr 0x7078
    // halt
    0x89, 0x02, // 0123: mov dword ptr [rdx],eax
    0xeb, 0xfc, // 0125: jmp 123
    // batch
    0x4c, 0x89, 0x2c, 0x25, 0x58, 0x70, 0x00, 0x00, // 0127: mov qword ptr 0x7058,r13
    0x4c, 0x8b, 0x3c, 0x25, 0x40, 0x70, 0x00, 0x00, // 012f: mov r15,qword ptr 0x7040
    0x4c, 0x01, 0x3c, 0x25, 0x50, 0x70, 0x00, 0x00, // 0137: add qword ptr 0x7050,r15
    0x48, 0x8b, 0x0c, 0x25, 0x48, 0x70, 0x00, 0x00, // 013f: mov rcx,qword ptr 0x7048
    0x48, 0x85, 0xc9, // 0147: test rcx,rcx
    0x74, 0xa0, // 014a: je ec
    0x48, 0x01, 0x0c, 0x25, 0x68, 0x70, 0x00, 0x00, // 014c: add qword ptr 0x7068,rcx
    // spin
    0x0f, 0x31, // 0154: rdtsc
    0x48, 0xc1, 0xe2, 0x20, // 0156: shl rdx,0x20
    0x48, 0x09, 0xd0, // 015a: or rax,rdx
    0x48, 0x8b, 0x0c, 0x25, 0x68, 0x70, 0x00, 0x00, // 015d: mov rcx,qword ptr 0x7068
    0x48, 0x29, 0xc1, // 0165: sub rcx,rax
    0x7e, 0x04, // 0168: jle 16e
    0xf3, 0x90, // 016a: pause
    0xeb, 0xe6, // 016c: jmp 154
    // late
    0x48, 0xf7, 0xd9, // 016e: neg rcx
    0x48, 0x3b, 0x0c, 0x25, 0x70, 0x70, 0x00, 0x00, // 0171: cmp rcx,qword ptr 0x7070
    0x0f, 0x86, 0x6d, 0xff, 0xff, 0xff, // 0179: jbe ec
    0x48, 0x89, 0x04, 0x25, 0x68, 0x70, 0x00, 0x00, // 017f: mov qword ptr 0x7068,rax
    0xe9, 0x60, 0xff, 0xff, 0xff, // 0187: jmp ec
];

/// What the guest does and how much memory it has.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct GuestConfig {
    /// Guest memory in bytes: a multiple of 2 MiB, at least 4 MiB.
    pub memory: u64,
    /// Bytes in region 0 (below the hole); the rest goes to region 1 at [`HIGH_BASE`]. Default
    /// (`None`): three quarters of the memory, at most 3 GiB; all of it for guests of 8 MiB or
    /// less.
    pub low_memory: Option<u64>,
    /// Seed of the writes.
    pub seed: u64,
    /// Writes to do before signalling the end; 0: run until stopped.
    pub iterations: u64,
    /// Fraction of the data pages in the hot set.
    pub hot_fraction: f64,
    /// Share of writes that go to the hot set.
    pub hot_share: f64,
    /// Share of writes that go to the next page of a sequential sweep over all data pages.
    pub sweep_share: f64,
    /// Writes per second (paced on the TSC in batches); 0: as fast as the vCPU runs.
    pub writes_per_sec: u64,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            memory: 256 << 20,
            low_memory: None,
            seed: 1,
            iterations: 10_000_000,
            hot_fraction: 0.05,
            hot_share: 0.9,
            sweep_share: 0.0,
            writes_per_sec: 0,
        }
    }
}

/// One region of guest memory: (guest-physical base, bytes).
pub type RegionRange = (u64, u64);

impl GuestConfig {
    /// Checks the configuration; the error says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        self.regions()?;
        for (name, v) in [
            ("hot fraction", self.hot_fraction),
            ("hot share", self.hot_share),
            ("sweep share", self.sweep_share),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!(
                    "the guest's {name} must be between 0 and 1, not {v}"
                ));
            }
        }
        if self.hot_share + self.sweep_share > 1.0 + 1e-9 {
            return Err(format!(
                "the guest's hot share ({}) and sweep share ({}) add up to more than 1",
                self.hot_share, self.sweep_share
            ));
        }
        Ok(())
    }

    /// The guest's memory regions: region 0 at 0, and region 1 at [`HIGH_BASE`] unless region 0
    /// holds everything.
    pub fn regions(&self) -> Result<Vec<RegionRange>, String> {
        let m = self.memory;
        if m < 2 * LARGE_PAGE || !m.is_multiple_of(LARGE_PAGE) {
            return Err(format!(
                "the KVM guest's memory must be a multiple of 2 MiB and at least 4 MiB, not {m} bytes"
            ));
        }
        if m > MAX_MEMORY {
            return Err(format!(
                "the KVM guest's memory is at most {} GiB, not {m} bytes",
                MAX_MEMORY >> 30
            ));
        }
        let low = match self.low_memory {
            Some(low) => low,
            None if m <= 8 << 20 => m,
            None => ((m / 4 * 3) / LARGE_PAGE * LARGE_PAGE).min(3 << 30),
        };
        if low < 2 * LARGE_PAGE
            || !low.is_multiple_of(LARGE_PAGE)
            || low > m
            || low > MAX_LOW_MEMORY
        {
            return Err(format!(
                "the KVM guest's region 0 must be a multiple of 2 MiB from 4 MiB to the memory size (and at most 3.5 GiB), not {low} bytes"
            ));
        }
        let mut regions = vec![(0, low)];
        if m > low {
            regions.push((HIGH_BASE, m - low));
        }
        Ok(regions)
    }

    /// Pages in the data window.
    pub fn data_pages(&self) -> Result<u64, String> {
        self.regions()?;
        Ok((self.memory - LARGE_PAGE) / PAGE)
    }

    fn hot_pages(&self, data_pages: u64) -> u64 {
        ((data_pages as f64 * self.hot_fraction).round() as u64).clamp(1, data_pages)
    }

    fn thresholds(&self) -> (u64, u64) {
        let hot = (self.hot_share * 65536.0).round() as u64;
        let sweep = (self.sweep_share * 65536.0).round() as u64;
        (hot.min(65536), (hot + sweep).min(65536))
    }

    fn start_state(&self) -> u64 {
        match self.seed ^ 0x2545_f491_4f6c_dd1d {
            0 => 0x2545_f491_4f6c_dd1d,
            s => s,
        }
    }

    fn batch(&self) -> u64 {
        if self.writes_per_sec == 0 {
            1 << 12
        } else {
            (self.writes_per_sec / 1000).clamp(1, 1 << 16)
        }
    }
}

/// Where the guest's writes go: 2 MiB chunks of guest-physical memory, in data-window order.
fn data_chunks(regions: &[RegionRange]) -> Vec<u64> {
    let mut chunks = Vec::new();
    for (i, &(base, len)) in regions.iter().enumerate() {
        let first = if i == 0 { base + LARGE_PAGE } else { base };
        let mut at = first;
        while at < base + len {
            chunks.push(at);
            at += LARGE_PAGE;
        }
    }
    chunks
}

/// The image: (guest-physical address, bytes) pieces for the VMM to write into fresh memory.
/// `tsc_khz` paces a guest with a write rate (the vCPU's TSC frequency).
pub fn image(config: &GuestConfig, tsc_khz: u32) -> Result<Vec<(u64, Vec<u8>)>, String> {
    config.validate()?;
    let regions = config.regions()?;
    let data_pages = config.data_pages()?;
    let mut pieces = Vec::new();
    let words = |ws: &[u64]| ws.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>();
    // Identity map of the low 2 MiB, and the data window.
    pieces.push((
        PML4,
        words(&[PDPT_LOW | PTE_P_RW_US, PDPT_DATA | PTE_P_RW_US]),
    ));
    let mut pdpt_low = vec![0u64; 4];
    pdpt_low[0] = PD_LOW | PTE_P_RW_US;
    pdpt_low[(DONE_MMIO >> 30) as usize] = PD_DONE | PTE_P_RW_US;
    pieces.push((PDPT_LOW, words(&pdpt_low)));
    pieces.push((PD_LOW, words(&[PTE_P_RW_US | PTE_LARGE])));
    // The done address, identity-mapped by a small page.
    let slot = ((DONE_MMIO >> 21) & 511) * 8;
    pieces.push((PD_DONE + slot, words(&[PT_DONE | PTE_P_RW_US])));
    pieces.push((PT_DONE, words(&[DONE_MMIO | PTE_P_RW_US])));
    let chunks = data_chunks(&regions);
    let directories = chunks.len().div_ceil(512) as u64;
    let pdpt: Vec<u64> = (0..directories)
        .map(|d| (PD_DATA + d * PAGE) | PTE_P_RW_US)
        .collect();
    pieces.push((PDPT_DATA, words(&pdpt)));
    let pds: Vec<u64> = chunks
        .iter()
        .map(|&c| c | PTE_P_RW_US | PTE_LARGE)
        .collect();
    pieces.push((PD_DATA, words(&pds)));
    // GDT: null, kernel code 64, kernel data, user data, user code 64, TSS (two slots).
    let tss_low = 0x67 | ((TSS & 0xff_ffff) << 16) | (0x8b << 40) | ((TSS >> 24) & 0xff) << 56;
    pieces.push((
        GDT,
        words(&[
            0,
            0x00af_9a00_0000_ffff,
            0x00cf_9200_0000_ffff,
            0x00cf_f200_0000_ffff,
            0x00af_fa00_0000_ffff,
            tss_low,
            TSS >> 32,
        ]),
    ));
    // TSS: RSP0 at 4, the I/O map base (past the limit: none) at 0x66.
    let mut tss = vec![0u8; 0x68];
    tss[4..12].copy_from_slice(&KERNEL_STACK_TOP.to_le_bytes());
    tss[0x66..0x68].copy_from_slice(&0x68u16.to_le_bytes());
    pieces.push((TSS, tss));
    // Control block.
    let (hot_threshold, sweep_threshold) = config.thresholds();
    let batch = config.batch();
    // TSC ticks per batch at the asked rate; 0 (unpaced) without one.
    let batch_ticks = (u64::from(tsc_khz) * 1000 * batch)
        .checked_div(config.writes_per_sec)
        .map_or(0, |t| t.max(1));
    let mut block = vec![0u8; 0x88];
    let mut put = |at: u64, v: u64| {
        let o = (at - ctrl::BASE) as usize;
        block[o..o + 8].copy_from_slice(&v.to_le_bytes());
    };
    put(ctrl::ITERATIONS, config.iterations);
    put(ctrl::SEED, config.start_state());
    put(ctrl::DATA_VA, DATA_VA);
    put(ctrl::DATA_PAGES, data_pages);
    put(ctrl::HOT_PAGES, config.hot_pages(data_pages));
    put(ctrl::HOT_THRESHOLD, hot_threshold);
    put(ctrl::SWEEP_THRESHOLD, sweep_threshold);
    put(ctrl::BATCH, batch);
    put(ctrl::BATCH_TICKS, batch_ticks);
    put(ctrl::HASH, HASH_START);
    put(ctrl::HOT_BASE, 0);
    put(ctrl::MAX_LAG, batch_ticks.saturating_mul(64));
    put(ctrl::DONE_ADDR, DONE_MMIO);
    put(ctrl::SWEEP_START, 0);
    pieces.push((ctrl::BASE, block));
    pieces.push((CODE_ADDR, CODE.to_vec()));
    Ok(pieces)
}

/// The final hash the guest reaches with `config` (which must be valid and finite:
/// `iterations > 0`), computed in Rust over a sparse copy of its memory.
pub fn expected_hash(config: &GuestConfig) -> Result<u64, String> {
    config.validate()?;
    if config.iterations == 0 {
        return Err("a guest that runs forever has no final hash".into());
    }
    let data_pages = config.data_pages()?;
    let hot_pages = config.hot_pages(data_pages);
    let (hot_threshold, sweep_threshold) = config.thresholds();
    let mut memory: HashMap<u64, u64> = HashMap::new();
    let mut x = config.start_state();
    let mut hash = HASH_START;
    let mut sweep = 0u64;
    for _ in 0..config.iterations {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let low = x & 0xffff;
        let high = x >> 32;
        let page = if low < hot_threshold {
            (high * hot_pages) >> 32
        } else if low < sweep_threshold {
            let p = sweep;
            sweep += 1;
            if sweep >= data_pages {
                sweep = 0;
            }
            p
        } else {
            (high * data_pages) >> 32
        };
        let at = (page << 12) + ((x >> 16) & 0xff8);
        let word = memory.entry(at).or_insert(0);
        *word = word.wrapping_add(x);
        hash = (hash ^ *word).wrapping_mul(HASH_MULTIPLIER);
    }
    Ok(hash)
}

/// The guest's special registers: 64-bit long mode, paging on, CPL3 code and data segments, a
/// TSS, the GDT and IDT of [`image`]. Fields this does not name keep the vCPU's values.
pub fn long_mode_sregs(sregs: &mut kvm_bindings::kvm_sregs) {
    use kvm_bindings::kvm_segment;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x23,
        type_: 0xb,
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x1b,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS,
        limit: 0x67,
        selector: 0x28,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.ldt = kvm_segment {
        selector: 0,
        type_: 0x2,
        present: 1,
        unusable: 1,
        ..sregs.tr
    };
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 7 * 8 - 1;
    sregs.idt.base = IDT;
    sregs.idt.limit = 0xfff;
    // PE, MP, ET, NE, WP, PG.
    sregs.cr0 = 0x8001_0033;
    sregs.cr3 = PML4;
    // PAE, OSFXSR, OSXMMEXCPT.
    sregs.cr4 = 0x620;
    // LME, LMA.
    sregs.efer = 0x500;
}

/// The guest's first registers: RIP at the code, RSP at the stack, interrupts off.
pub fn initial_regs() -> kvm_bindings::kvm_regs {
    kvm_bindings::kvm_regs {
        rip: CODE_ADDR,
        rsp: STACK_TOP,
        rflags: 0x2,
        ..Default::default()
    }
}

/// What the guest reports in its control block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestStatus {
    /// Whether it finished its writes.
    pub finished: bool,
    /// Writes done (updated every batch).
    pub progress: u64,
    /// The hash (final once finished).
    pub hash: u64,
}

impl GuestStatus {
    /// Reads the control block through `read` (a guest-physical u64 reader).
    pub fn read(mut read: impl FnMut(u64) -> Option<u64>) -> Option<Self> {
        Some(GuestStatus {
            finished: read(ctrl::STATUS)? == 1,
            progress: read(ctrl::PROGRESS)?,
            hash: read(ctrl::HASH)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_and_data_pages() {
        let c = GuestConfig {
            memory: 1 << 30,
            ..GuestConfig::default()
        };
        assert_eq!(
            c.regions().unwrap(),
            vec![(0, 768 << 20), (HIGH_BASE, 256 << 20)]
        );
        assert_eq!(c.data_pages().unwrap(), ((1 << 30) - LARGE_PAGE) / PAGE);
        assert_eq!(data_chunks(&c.regions().unwrap()).len(), 511);
        let small = GuestConfig {
            memory: 4 << 20,
            ..GuestConfig::default()
        };
        assert_eq!(small.regions().unwrap(), vec![(0, 4 << 20)]);
        for bad in [0, 2 << 20, (4 << 20) + 4096, 512 << 30] {
            let c = GuestConfig {
                memory: bad,
                ..GuestConfig::default()
            };
            assert!(c.validate().is_err(), "{bad}");
        }
        let c = GuestConfig {
            hot_share: 0.8,
            sweep_share: 0.3,
            ..GuestConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("add up"));
    }

    #[test]
    fn the_expected_hash_depends_on_the_seed_and_the_pattern() {
        let c = GuestConfig {
            iterations: 10_000,
            ..GuestConfig::default()
        };
        let h = expected_hash(&c).unwrap();
        assert_eq!(h, expected_hash(&c).unwrap());
        assert_ne!(h, expected_hash(&GuestConfig { seed: 2, ..c }).unwrap());
        assert_ne!(
            h,
            expected_hash(&GuestConfig {
                sweep_share: 0.05,
                ..c
            })
            .unwrap()
        );
    }

    #[test]
    fn the_image_fits_below_the_data() {
        let c = GuestConfig {
            memory: MAX_MEMORY,
            ..GuestConfig::default()
        };
        let pieces = image(&c, 1_000_000).unwrap();
        for (at, bytes) in pieces {
            assert!(at + bytes.len() as u64 <= LARGE_PAGE);
        }
        assert_eq!(CODE.len(), 0x18c);
    }
}
