//! A vCPU's state as device-state bytes: general registers, special registers, XSAVE (or the
//! legacy FPU where XSAVE is not offered), XCRs and the MSRs a 64-bit guest needs (TSC,
//! SYSENTER, STAR/LSTAR/CSTAR/SFMASK, KERNEL_GS_BASE, TSC_AUX, PAT), as far as the host
//! supports them.
//!
//! # Format (version 1, little-endian)
//! `b"MFKVMST1"`, then sections `tag: u8, len: u32, bytes`: 1 registers (18 × u64: rax, rbx,
//! rcx, rdx, rsi, rdi, rsp, rbp, r8–r15, rip, rflags); 2 special registers (8 segments cs, ds,
//! es, fs, gs, ss, tr, ldt of 23 bytes each: base u64, limit u32, selector u16, then type,
//! present, dpl, db, s, l, g, avl, unusable u8 each; gdt and idt as base u64 + limit u16;
//! cr0, cr2, cr3, cr4, cr8, efer, apic_base u64; interrupt bitmap 4 × u64); 3 XSAVE (4096
//! bytes); 4 FPU (fpr 8 × 16 bytes, fcw u16, fsw u16, ftwx u8, last_opcode u16, last_ip u64,
//! last_dp u64, xmm 16 × 16 bytes, mxcsr u32); 5 XCRs (flags u32, then per XCR index u32 +
//! value u64); 6 MSRs (per MSR index u32 + value u64). Unknown tags are refused; every length is
//! checked before use, so bad bytes give an error, never a panic.

use kvm_bindings::{kvm_dtable, kvm_msr_entry, kvm_segment, kvm_sregs, kvm_xcr, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

use super::KvmError;

const MAGIC: &[u8; 8] = b"MFKVMST1";
const REGS: u8 = 1;
const SREGS: u8 = 2;
const XSAVE: u8 = 3;
const FPU: u8 = 4;
const XCRS: u8 = 5;
const MSRS: u8 = 6;

/// The MSRs saved when the host supports them.
pub const WANTED_MSRS: &[u32] = &[
    0x10,        // IA32_TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// The MSRs of [`WANTED_MSRS`] that this host's KVM lists.
pub fn supported_msrs(kvm: &Kvm) -> Result<Vec<u32>, KvmError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| KvmError::sys("KVM_GET_MSR_INDEX_LIST failed", e))?;
    Ok(WANTED_MSRS
        .iter()
        .copied()
        .filter(|m| list.as_slice().contains(m))
        .collect())
}

struct Out(Vec<u8>);

impl Out {
    fn section(&mut self, tag: u8, body: Vec<u8>) {
        self.0.push(tag);
        self.0.extend_from_slice(&(body.len() as u32).to_le_bytes());
        self.0.extend_from_slice(&body);
    }
}

fn put_segment(b: &mut Vec<u8>, s: &kvm_segment) {
    b.extend_from_slice(&s.base.to_le_bytes());
    b.extend_from_slice(&s.limit.to_le_bytes());
    b.extend_from_slice(&s.selector.to_le_bytes());
    b.extend_from_slice(&[
        s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable,
    ]);
}

fn put_dtable(b: &mut Vec<u8>, d: &kvm_dtable) {
    b.extend_from_slice(&d.base.to_le_bytes());
    b.extend_from_slice(&d.limit.to_le_bytes());
}

/// Reads the state of `vcpu` (which must not be running) as bytes; `msrs` from
/// [`supported_msrs`].
pub fn save(vcpu: &VcpuFd, msrs: &[u32]) -> Result<Vec<u8>, KvmError> {
    let mut out = Out(MAGIC.to_vec());
    let r = vcpu
        .get_regs()
        .map_err(|e| KvmError::sys("KVM_GET_REGS failed", e))?;
    let regs = [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags,
    ];
    out.section(REGS, regs.iter().flat_map(|v| v.to_le_bytes()).collect());
    let s = vcpu
        .get_sregs()
        .map_err(|e| KvmError::sys("KVM_GET_SREGS failed", e))?;
    let mut b = Vec::new();
    for seg in [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt] {
        put_segment(&mut b, seg);
    }
    put_dtable(&mut b, &s.gdt);
    put_dtable(&mut b, &s.idt);
    for v in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for v in s.interrupt_bitmap {
        b.extend_from_slice(&v.to_le_bytes());
    }
    out.section(SREGS, b);
    // XCRs before XSAVE: restore sets XCR0 first, which says which XSAVE parts are valid.
    if let Ok(x) = vcpu.get_xcrs() {
        let mut b = x.flags.to_le_bytes().to_vec();
        for xcr in x.xcrs.iter().take((x.nr_xcrs as usize).min(x.xcrs.len())) {
            b.extend_from_slice(&xcr.xcr.to_le_bytes());
            b.extend_from_slice(&xcr.value.to_le_bytes());
        }
        out.section(XCRS, b);
    }
    match vcpu.get_xsave() {
        Ok(x) => out.section(
            XSAVE,
            x.region.iter().flat_map(|w| w.to_le_bytes()).collect(),
        ),
        Err(_) => {
            let f = vcpu
                .get_fpu()
                .map_err(|e| KvmError::sys("KVM_GET_FPU failed", e))?;
            let mut b = Vec::new();
            f.fpr.iter().for_each(|r| b.extend_from_slice(r));
            b.extend_from_slice(&f.fcw.to_le_bytes());
            b.extend_from_slice(&f.fsw.to_le_bytes());
            b.push(f.ftwx);
            b.extend_from_slice(&f.last_opcode.to_le_bytes());
            b.extend_from_slice(&f.last_ip.to_le_bytes());
            b.extend_from_slice(&f.last_dp.to_le_bytes());
            f.xmm.iter().for_each(|r| b.extend_from_slice(r));
            b.extend_from_slice(&f.mxcsr.to_le_bytes());
            out.section(FPU, b);
        }
    }
    if !msrs.is_empty() {
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut list = Msrs::from_entries(&entries)
            .map_err(|e| KvmError::new(format!("too many MSRs: {e:?}")))?;
        let read = vcpu
            .get_msrs(&mut list)
            .map_err(|e| KvmError::sys("KVM_GET_MSRS failed", e))?;
        let mut b = Vec::new();
        for e in list.as_slice().iter().take(read) {
            b.extend_from_slice(&e.index.to_le_bytes());
            b.extend_from_slice(&e.data.to_le_bytes());
        }
        out.section(MSRS, b);
    }
    Ok(out.0)
}

/// A cursor over bytes that fails, never panics, when they run out.
struct In<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> In<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], KvmError> {
        if self.bytes.len() < n {
            return Err(KvmError::new(format!(
                "the vCPU state is cut short in its {}",
                self.what
            )));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, KvmError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, KvmError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, KvmError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, KvmError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn array16(&mut self) -> Result<[u8; 16], KvmError> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.take(16)?);
        Ok(a)
    }
    fn done(&self) -> Result<(), KvmError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(KvmError::new(format!(
                "the vCPU state's {} has {} bytes too many",
                self.what,
                self.bytes.len()
            )))
        }
    }
    fn segment(&mut self) -> Result<kvm_segment, KvmError> {
        Ok(kvm_segment {
            base: self.u64()?,
            limit: self.u32()?,
            selector: self.u16()?,
            type_: self.u8()?,
            present: self.u8()?,
            dpl: self.u8()?,
            db: self.u8()?,
            s: self.u8()?,
            l: self.u8()?,
            g: self.u8()?,
            avl: self.u8()?,
            unusable: self.u8()?,
            padding: 0,
        })
    }
    fn dtable(&mut self) -> Result<kvm_dtable, KvmError> {
        Ok(kvm_dtable {
            base: self.u64()?,
            limit: self.u16()?,
            padding: [0; 3],
        })
    }
}

/// The decoded state, checked in full before any of it is installed.
#[derive(Default)]
struct Decoded {
    regs: Option<kvm_bindings::kvm_regs>,
    sregs: Option<kvm_sregs>,
    xsave: Option<Box<kvm_bindings::kvm_xsave>>,
    fpu: Option<kvm_bindings::kvm_fpu>,
    xcrs: Option<kvm_bindings::kvm_xcrs>,
    msrs: Vec<kvm_msr_entry>,
}

fn decode(bytes: &[u8]) -> Result<Decoded, KvmError> {
    let mut input = In {
        bytes,
        what: "header",
    };
    if input.take(8).ok() != Some(&MAGIC[..]) {
        return Err(KvmError::new(
            "the device state is not a memferry KVM vCPU state (version 1)",
        ));
    }
    let mut d = Decoded::default();
    while !input.bytes.is_empty() {
        input.what = "section header";
        let tag = input.u8()?;
        let len = input.u32()? as usize;
        input.what = "sections";
        let mut s = In {
            bytes: input.take(len)?,
            what: match tag {
                REGS => "registers",
                SREGS => "special registers",
                XSAVE => "XSAVE area",
                FPU => "FPU state",
                XCRS => "XCRs",
                MSRS => "MSRs",
                _ => {
                    return Err(KvmError::new(format!(
                        "the vCPU state has a section of unknown kind {tag}"
                    )))
                }
            },
        };
        match tag {
            REGS => {
                let mut v = [0u64; 18];
                for x in &mut v {
                    *x = s.u64()?;
                }
                d.regs = Some(kvm_bindings::kvm_regs {
                    rax: v[0],
                    rbx: v[1],
                    rcx: v[2],
                    rdx: v[3],
                    rsi: v[4],
                    rdi: v[5],
                    rsp: v[6],
                    rbp: v[7],
                    r8: v[8],
                    r9: v[9],
                    r10: v[10],
                    r11: v[11],
                    r12: v[12],
                    r13: v[13],
                    r14: v[14],
                    r15: v[15],
                    rip: v[16],
                    rflags: v[17],
                });
            }
            SREGS => {
                let mut sr = kvm_sregs {
                    cs: s.segment()?,
                    ds: s.segment()?,
                    es: s.segment()?,
                    fs: s.segment()?,
                    gs: s.segment()?,
                    ss: s.segment()?,
                    tr: s.segment()?,
                    ldt: s.segment()?,
                    gdt: s.dtable()?,
                    idt: s.dtable()?,
                    ..Default::default()
                };
                sr.cr0 = s.u64()?;
                sr.cr2 = s.u64()?;
                sr.cr3 = s.u64()?;
                sr.cr4 = s.u64()?;
                sr.cr8 = s.u64()?;
                sr.efer = s.u64()?;
                sr.apic_base = s.u64()?;
                for w in &mut sr.interrupt_bitmap {
                    *w = s.u64()?;
                }
                d.sregs = Some(sr);
            }
            XSAVE => {
                let mut x: Box<kvm_bindings::kvm_xsave> = Box::default();
                for w in x.region.iter_mut() {
                    *w = s.u32()?;
                }
                d.xsave = Some(x);
            }
            FPU => {
                let mut f = kvm_bindings::kvm_fpu::default();
                for r in &mut f.fpr {
                    *r = s.array16()?;
                }
                f.fcw = s.u16()?;
                f.fsw = s.u16()?;
                f.ftwx = s.u8()?;
                f.last_opcode = s.u16()?;
                f.last_ip = s.u64()?;
                f.last_dp = s.u64()?;
                for r in &mut f.xmm {
                    *r = s.array16()?;
                }
                f.mxcsr = s.u32()?;
                d.fpu = Some(f);
            }
            XCRS => {
                let mut x = kvm_bindings::kvm_xcrs {
                    flags: s.u32()?,
                    ..Default::default()
                };
                while !s.bytes.is_empty() {
                    let n = x.nr_xcrs as usize;
                    if n >= x.xcrs.len() {
                        return Err(KvmError::new("the vCPU state has too many XCRs"));
                    }
                    x.xcrs[n] = kvm_xcr {
                        xcr: s.u32()?,
                        reserved: 0,
                        value: s.u64()?,
                    };
                    x.nr_xcrs += 1;
                }
                d.xcrs = Some(x);
            }
            MSRS => {
                while !s.bytes.is_empty() {
                    d.msrs.push(kvm_msr_entry {
                        index: s.u32()?,
                        reserved: 0,
                        data: s.u64()?,
                    });
                }
            }
            _ => unreachable!("unknown tags were refused above"),
        }
        s.done()?;
    }
    if d.regs.is_none() || d.sregs.is_none() {
        return Err(KvmError::new(
            "the vCPU state lacks its registers or special registers",
        ));
    }
    Ok(d)
}

/// Installs a state [`save`] produced into `vcpu` (which must not be running). The bytes are
/// checked in full first: bad bytes change nothing.
pub fn restore(vcpu: &VcpuFd, bytes: &[u8]) -> Result<(), KvmError> {
    let d = decode(bytes)?;
    if let Some(sregs) = &d.sregs {
        vcpu.set_sregs(sregs)
            .map_err(|e| KvmError::sys("KVM_SET_SREGS failed", e))?;
    }
    if !d.msrs.is_empty() {
        let list = Msrs::from_entries(&d.msrs)
            .map_err(|e| KvmError::new(format!("too many MSRs: {e:?}")))?;
        let set = vcpu
            .set_msrs(&list)
            .map_err(|e| KvmError::sys("KVM_SET_MSRS failed", e))?;
        if set != d.msrs.len() {
            return Err(KvmError::new(format!(
                "KVM_SET_MSRS took {set} of {} MSRs (MSR {:#x} refused)",
                d.msrs.len(),
                d.msrs[set].index
            )));
        }
    }
    if let Some(xcrs) = &d.xcrs {
        vcpu.set_xcrs(xcrs)
            .map_err(|e| KvmError::sys("KVM_SET_XCRS failed", e))?;
    }
    if let Some(xsave) = &d.xsave {
        // SAFETY: a 4096-byte legacy XSAVE area, as KVM_GET_XSAVE returned it on the source;
        // KVM_SET_XSAVE reads no more than that.
        unsafe { vcpu.set_xsave(xsave) }.map_err(|e| KvmError::sys("KVM_SET_XSAVE failed", e))?;
    }
    if let Some(fpu) = &d.fpu {
        vcpu.set_fpu(fpu)
            .map_err(|e| KvmError::sys("KVM_SET_FPU failed", e))?;
    }
    if let Some(regs) = &d.regs {
        vcpu.set_regs(regs)
            .map_err(|e| KvmError::sys("KVM_SET_REGS failed", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_state_bytes_are_refused_without_panicking() {
        assert!(decode(b"").is_err());
        assert!(decode(b"MFKVMST1")
            .err()
            .unwrap()
            .to_string()
            .contains("lacks"));
        let mut cut = MAGIC.to_vec();
        cut.extend_from_slice(&[REGS, 144, 0, 0, 0, 1, 2, 3]);
        assert!(decode(&cut)
            .err()
            .unwrap()
            .to_string()
            .contains("cut short"));
        let mut unknown = MAGIC.to_vec();
        unknown.extend_from_slice(&[99, 0, 0, 0, 0]);
        assert!(decode(&unknown)
            .err()
            .unwrap()
            .to_string()
            .contains("unknown"));
        let mut long = MAGIC.to_vec();
        long.push(REGS);
        long.extend_from_slice(&152u32.to_le_bytes());
        long.extend_from_slice(&[0; 152]);
        assert!(decode(&long)
            .err()
            .unwrap()
            .to_string()
            .contains("too many"));
        // Every prefix of a well-formed state fails cleanly.
        let mut good = MAGIC.to_vec();
        good.push(REGS);
        good.extend_from_slice(&144u32.to_le_bytes());
        good.extend_from_slice(&[7; 144]);
        good.push(SREGS);
        good.extend_from_slice(&(8 * 23 + 2 * 10 + 7 * 8 + 32u32).to_le_bytes());
        good.extend_from_slice(&[0; 8 * 23 + 2 * 10 + 7 * 8 + 32]);
        let d = decode(&good).unwrap();
        assert_eq!(d.regs.unwrap().rip, 0x0707_0707_0707_0707);
        for n in 0..good.len() {
            assert!(decode(&good[..n]).is_err(), "prefix {n}");
        }
    }
}
