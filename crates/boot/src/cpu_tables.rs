//! The CPU structures the boot vCPU starts with: a flat GDT at [`addr::GDT_START`] and the
//! identity page tables (2 MiB pages over 0..4 GiB) at [`addr::PML4_START`].
//!
//! The segments are also returned as plain data, because KVM takes the hidden part of each
//! segment register directly (`kvm_segment`) rather than loading it from the GDT.

use vessel_memory::vm_memory::{Bytes, GuestAddress};
use vessel_memory::{addr, GuestMemoryMmap};

use crate::error::BootError;
use crate::loader::EntryMode;

/// Selector of the flat code segment (GDT entry 1).
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the flat data segment (GDT entry 2), for DS, ES, FS, GS and SS.
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of the TSS (GDT entry 3), for TR.
pub const TSS_SELECTOR: u16 = 0x18;
/// GDT entries: null, code, data, TSS.
const GDT_ENTRIES: usize = 4;
/// A minimal 32-bit TSS is 104 bytes.
const TSS_LIMIT: u32 = 0x67;

const _: () = assert!(addr::GDT_START + (GDT_ENTRIES as u64) * 8 <= addr::IDT_START);

/// One segment, in the form of KVM's `kvm_segment` (without the `avl`/`unusable` flags, both
/// 0). `limit` is in bytes, already scaled by the granularity bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    /// The 4-bit type field (e.g. 0xb: code, execute/read, accessed).
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// Default operand size (32-bit) for code, big for data.
    pub db: bool,
    /// Code or data segment (as opposed to a system segment such as the TSS).
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Limit counted in 4 KiB units.
    pub g: bool,
}

impl Segment {
    /// The 8-byte GDT descriptor of this segment.
    pub fn descriptor(&self) -> u64 {
        let limit = if self.g { self.limit >> 12 } else { self.limit };
        let limit = u64::from(limit & 0xf_ffff);
        let base = self.base & 0xffff_ffff;
        let access = u64::from(self.type_ & 0xf)
            | u64::from(self.s) << 4
            | u64::from(self.dpl & 3) << 5
            | u64::from(self.present) << 7;
        let flags = u64::from(self.l) << 1 | u64::from(self.db) << 2 | u64::from(self.g) << 3;
        (limit & 0xffff)
            | (base & 0xff_ffff) << 16
            | access << 40
            | (limit >> 16) << 48
            | flags << 52
            | (base >> 24) << 56
    }
}

/// The boot GDT: where it is and the segments it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gdt {
    /// Guest-physical base (for `sregs.gdt.base`).
    pub base: u64,
    /// Limit in bytes, minus one (for `sregs.gdt.limit`).
    pub limit: u16,
    /// For CS.
    pub code: Segment,
    /// For DS, ES, FS, GS and SS.
    pub data: Segment,
    /// For TR.
    pub tss: Segment,
}

/// The segments for `mode`: flat 4 GiB code and data, a 64-bit (L) code segment for
/// [`EntryMode::Long64`] and a 32-bit (D) one for [`EntryMode::Pvh32`].
pub fn boot_segments(mode: EntryMode) -> (Segment, Segment, Segment) {
    let flat = Segment {
        selector: 0,
        base: 0,
        limit: 0xffff_ffff,
        type_: 0,
        present: true,
        dpl: 0,
        db: true,
        s: true,
        l: false,
        g: true,
    };
    let code = Segment {
        selector: CODE_SELECTOR,
        type_: 0xb,
        db: mode == EntryMode::Pvh32,
        l: mode == EntryMode::Long64,
        ..flat
    };
    let data = Segment {
        selector: DATA_SELECTOR,
        type_: 0x3,
        ..flat
    };
    // A busy TSS (type 0xb; in long mode this reads as a busy 64-bit TSS), as VMX requires of
    // TR. The kernel loads its own before it needs one.
    let tss = Segment {
        selector: TSS_SELECTOR,
        limit: TSS_LIMIT,
        type_: 0xb,
        db: false,
        s: false,
        g: false,
        ..flat
    };
    (code, data, tss)
}

/// Write the boot GDT (null, code 0x08, data 0x10, TSS 0x18) at [`addr::GDT_START`].
///
/// The TSS entry is the 8-byte legacy form: the GDT must end before [`addr::IDT_START`],
/// and KVM takes TR from the returned segment, never from the table.
pub fn write_gdt(mem: &GuestMemoryMmap, mode: EntryMode) -> Result<Gdt, BootError> {
    let (code, data, tss) = boot_segments(mode);
    let entries = [0, code.descriptor(), data.descriptor(), tss.descriptor()];
    let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(addr::GDT_START))
        .map_err(BootError::write("GDT", addr::GDT_START))?;
    Ok(Gdt {
        base: addr::GDT_START,
        limit: (bytes.len() - 1) as u16,
        code,
        data,
        tss,
    })
}

const PAGE: u64 = 0x1000;
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PDE_PAGE_SIZE: u64 = 1 << 7;
/// Page directories needed for 4 GiB of 2 MiB pages (one per GiB).
const PAGE_DIRECTORIES: u64 = 4;

const _: () = assert!(addr::PDPT_START == addr::PML4_START + PAGE);
const _: () = assert!(addr::PD_START + PAGE_DIRECTORIES * PAGE <= addr::CMDLINE_START);

/// One 4 KiB table of 512 entries, as bytes.
fn table(entries: impl Iterator<Item = u64>) -> Vec<u8> {
    let mut t: Vec<u8> = entries.take(512).flat_map(|e| e.to_le_bytes()).collect();
    t.resize(PAGE as usize, 0);
    t
}

/// Write page tables mapping guest-physical 0..4 GiB to itself with 2 MiB pages (PML4 at
/// [`addr::PML4_START`], one PDPT, four page directories from [`addr::PD_START`]).
/// Returns the value for CR3.
pub fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<u64, BootError> {
    let pml4 = table(std::iter::once(
        addr::PDPT_START | PTE_PRESENT | PTE_WRITABLE,
    ));
    let pdpt = table(
        (0..PAGE_DIRECTORIES).map(|i| (addr::PD_START + i * PAGE) | PTE_PRESENT | PTE_WRITABLE),
    );
    let pds: Vec<u8> = (0..PAGE_DIRECTORIES * 512)
        .flat_map(|i| ((i << 21) | PTE_PRESENT | PTE_WRITABLE | PDE_PAGE_SIZE).to_le_bytes())
        .collect();
    for (bytes, at, what) in [
        (&pml4, addr::PML4_START, "PML4"),
        (&pdpt, addr::PDPT_START, "PDPT"),
        (&pds, addr::PD_START, "page directories"),
    ] {
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(BootError::write(what, at))?;
    }
    Ok(addr::PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{self, read_bytes, u64_at, MIB};

    /// Decode an 8-byte descriptor back into its parts.
    fn decode(d: u64) -> (u64, u32, u8, bool, u8, bool, bool, bool, bool) {
        let base = ((d >> 16) & 0xff_ffff) | ((d >> 56) & 0xff) << 24;
        let raw_limit = ((d & 0xffff) | ((d >> 48) & 0xf) << 16) as u32;
        let access = (d >> 40) as u8;
        let flags = ((d >> 52) & 0xf) as u8;
        let g = flags & 8 != 0;
        let limit = if g {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        };
        (
            base,
            limit,
            access & 0xf,
            access & 0x10 != 0,
            (access >> 5) & 3,
            access & 0x80 != 0,
            flags & 2 != 0,
            flags & 4 != 0,
            g,
        )
    }

    fn check_against_table(seg: &Segment, desc: u64) {
        let (base, limit, type_, s, dpl, p, l, db, g) = decode(desc);
        assert_eq!(
            (base, limit, type_, s, dpl, p, l, db, g),
            (
                seg.base,
                seg.limit,
                seg.type_,
                seg.s,
                seg.dpl,
                seg.present,
                seg.l,
                seg.db,
                seg.g
            ),
            "{seg:?} vs {desc:#018x}"
        );
    }

    #[test]
    fn long_mode_gdt_reads_back() {
        let (mem, _) = testutil::guest(16 * MIB);
        let gdt = write_gdt(&mem, EntryMode::Long64).unwrap();
        assert_eq!((gdt.base, gdt.limit), (addr::GDT_START, 31));
        let raw = read_bytes(&mem, addr::GDT_START, 32);
        assert_eq!(u64_at(&raw, 0), 0, "null descriptor");
        // The well-known flat descriptors.
        assert_eq!(u64_at(&raw, 8), 0x00af_9b00_0000_ffff);
        assert_eq!(u64_at(&raw, 16), 0x00cf_9300_0000_ffff);
        for (seg, i) in [(gdt.code, 1), (gdt.data, 2), (gdt.tss, 3)] {
            assert_eq!(seg.selector as usize, i * 8);
            check_against_table(&seg, u64_at(&raw, i * 8));
        }
        assert!(gdt.code.l && !gdt.code.db);
        assert_eq!(gdt.code.limit, 0xffff_ffff);
        assert!(!gdt.tss.s && gdt.tss.type_ == 0xb && gdt.tss.present);
    }

    #[test]
    fn pvh_gdt_has_a_32_bit_code_segment() {
        let (mem, _) = testutil::guest(16 * MIB);
        let gdt = write_gdt(&mem, EntryMode::Pvh32).unwrap();
        let raw = read_bytes(&mem, addr::GDT_START, 32);
        assert_eq!(u64_at(&raw, 8), 0x00cf_9b00_0000_ffff);
        assert!(!gdt.code.l && gdt.code.db);
        check_against_table(&gdt.code, u64_at(&raw, 8));
        check_against_table(&gdt.data, u64_at(&raw, 16));
        // The IDT slot right after the GDT is untouched.
        assert_eq!(read_bytes(&mem, addr::IDT_START, 8), [0; 8]);
    }

    /// Translate `va` through 4-level paging from `cr3`, as the CPU would. `None` when not
    /// mapped.
    fn walk(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
        let entry = |table: u64, index: u64| -> u64 {
            u64_at(&read_bytes(mem, (table & !0xfff) + index * 8, 8), 0)
        };
        let frame = |e: u64| e & 0x000f_ffff_ffff_f000;
        let pml4e = entry(cr3, (va >> 39) & 0x1ff);
        if pml4e & PTE_PRESENT == 0 {
            return None;
        }
        let pdpte = entry(frame(pml4e), (va >> 30) & 0x1ff);
        if pdpte & PTE_PRESENT == 0 {
            return None;
        }
        assert_eq!(pdpte & PDE_PAGE_SIZE, 0, "no 1 GiB pages expected");
        let pde = entry(frame(pdpte), (va >> 21) & 0x1ff);
        if pde & PTE_PRESENT == 0 {
            return None;
        }
        assert_ne!(pde & PDE_PAGE_SIZE, 0, "2 MiB pages expected");
        assert_ne!(pde & PTE_WRITABLE, 0);
        Some((pde & 0x000f_ffff_ffe0_0000) | (va & 0x1f_ffff))
    }

    #[test]
    fn page_tables_map_four_gib_to_themselves() {
        let (mem, _) = testutil::guest(64 * MIB);
        // Stale entries from an earlier boot must not survive.
        mem.write_slice(&[0xff; 8], GuestAddress(addr::PML4_START + 8))
            .unwrap();
        let cr3 = write_identity_page_tables(&mem).unwrap();
        assert_eq!(cr3, addr::PML4_START);
        for va in [
            0,
            0x1234,
            2 * MIB,
            2 * MIB + 0x5678,
            (1 << 30) + 0x12_3456,
            0xc000_0000,
            addr::IOAPIC_START,
            addr::LAPIC_START + 0x20,
            (4 << 30) - 1,
        ] {
            assert_eq!(walk(&mem, cr3, va), Some(va), "{va:#x}");
        }
        assert_eq!(walk(&mem, cr3, 4 << 30), None);
        assert_eq!(walk(&mem, cr3, 1 << 39), None);
    }
}
