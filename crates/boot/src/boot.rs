//! Configuring the boot: the command line plus the zero page (64-bit entry) or the PVH start
//! info (32-bit entry), and the register values the boot vCPU starts with.

use vessel_memory::{addr, GuestLayout, GuestMemoryMmap};

use crate::cmdline::write_cmdline;
use crate::error::BootError;
use crate::loader::{EntryMode, LoadedKernel};
use crate::{pvh, zeropage};

/// What the kernel is told at boot.
#[derive(Debug, Clone, Copy)]
pub struct BootConfig<'a> {
    /// The kernel command line, without a terminating NUL.
    pub cmdline: &'a str,
    /// The initrd's guest-physical address and size, as [`crate::load_initrd`] returned them.
    pub initrd: Option<(u64, u64)>,
    /// Number of vCPUs (the CPU tables themselves come from the ACPI and MP table writers).
    pub num_cpus: u8,
    /// The ACPI RSDP address, as [`crate::create_acpi_tables`] returned it.
    pub rsdp_addr: Option<u64>,
}

/// The boot vCPU's general registers at the kernel entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootRegs {
    /// The entry point.
    pub rip: u64,
    /// A stack in low memory ([`addr::BOOT_STACK_POINTER`]).
    pub rsp: u64,
    /// The zero page for [`EntryMode::Long64`]; 0 for PVH.
    pub rsi: u64,
    /// The `hvm_start_info` for [`EntryMode::Pvh32`]; 0 for the 64-bit entry.
    pub rbx: u64,
    /// 0x2: only the reserved bit, interrupts off.
    pub rflags: u64,
    /// The CPU mode the kernel expects (segments, paging: see [`crate::write_gdt`]).
    pub mode: EntryMode,
}

/// The value of RFLAGS at entry: bit 1 is reserved and always set; IF is clear.
pub const BOOT_RFLAGS: u64 = 0x2;

/// Write the command line and the zero page (64-bit entry: `boot_params` with the e820 map,
/// command line, initrd and RSDP) or the PVH `hvm_start_info` with its memory map and module
/// list (32-bit entry). Returns the registers the boot vCPU must start with.
pub fn configure_boot(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    kernel: &LoadedKernel,
    cfg: &BootConfig,
) -> Result<BootRegs, BootError> {
    if let Some((start, size)) = cfg.initrd {
        let below_4g = start
            .checked_add(size)
            .is_some_and(|end| end <= addr::MMIO_GAP_END);
        if size == 0 || !below_4g || !layout.is_ram(start, size) {
            return Err(BootError::InitrdOutOfRam { addr: start, size });
        }
    }
    write_cmdline(mem, cfg.cmdline, kernel.cmdline_max_len())?;
    let (rsi, rbx) = match kernel.mode {
        EntryMode::Long64 => {
            zeropage::write_zero_page(mem, layout, kernel, cfg)?;
            (addr::ZERO_PAGE_START, 0)
        }
        EntryMode::Pvh32 => {
            pvh::write_start_info(mem, layout, cfg)?;
            (0, addr::PVH_INFO_START)
        }
    };
    Ok(BootRegs {
        rip: kernel.entry,
        rsp: addr::BOOT_STACK_POINTER,
        rsi,
        rbx,
        rflags: BOOT_RFLAGS,
        mode: kernel.mode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::{load_initrd_image, load_kernel_image};
    use crate::testutil::{self, read_bytes, BzImageBuilder, ElfBuilder, MIB};
    use linux_loader::loader::bootparam::boot_params;
    use linux_loader::loader::elf::start_info::{
        hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
    };
    use std::io::Cursor;
    use vessel_memory::vm_memory::{Bytes, GuestAddress};

    const CMDLINE: &str = "console=ttyS0 root=/dev/ram0 rdinit=/init";

    /// Load `image` and a 1 MiB initrd in a guest of `mem_size`, configure the boot.
    fn boot(
        image: Vec<u8>,
        mem_size: u64,
    ) -> (
        GuestMemoryMmap,
        GuestLayout,
        LoadedKernel,
        (u64, u64),
        BootRegs,
    ) {
        let (mem, layout) = testutil::guest(mem_size);
        let k = load_kernel_image(&mem, &layout, &mut Cursor::new(image)).unwrap();
        let initrd = load_initrd_image(
            &mem,
            &layout,
            &k,
            &mut Cursor::new(vec![0x42u8; MIB as usize]),
        )
        .unwrap();
        let cfg = BootConfig {
            cmdline: CMDLINE,
            initrd: Some(initrd),
            num_cpus: 2,
            rsdp_addr: Some(addr::RSDP_START),
        };
        let regs = configure_boot(&mem, &layout, &k, &cfg).unwrap();
        (mem, layout, k, initrd, regs)
    }

    fn read_cstr(mem: &GuestMemoryMmap, at: u64) -> String {
        let b = read_bytes(mem, at, 4096);
        let n = b.iter().position(|&c| c == 0).unwrap();
        String::from_utf8(b[..n].to_vec()).unwrap()
    }

    fn check_zero_page(mem: &GuestMemoryMmap, layout: &GuestLayout, initrd: (u64, u64)) {
        let p: boot_params = mem.read_obj(GuestAddress(addr::ZERO_PAGE_START)).unwrap();
        let e820 = layout.e820();
        assert_eq!(p.e820_entries as usize, e820.len());
        for (got, want) in p.e820_table.iter().zip(&e820) {
            assert_eq!({ got.addr }, want.addr);
            assert_eq!({ got.size }, want.size);
            assert_eq!({ got.r#type }, want.kind as u32);
        }
        assert_eq!({ p.hdr.cmd_line_ptr } as u64, addr::CMDLINE_START);
        assert_eq!({ p.ext_cmd_line_ptr }, 0);
        assert_eq!(read_cstr(mem, addr::CMDLINE_START), CMDLINE);
        assert_eq!({ p.hdr.ramdisk_image } as u64, initrd.0);
        assert_eq!({ p.hdr.ramdisk_size } as u64, initrd.1);
        assert_eq!({ p.ext_ramdisk_image }, 0);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.acpi_rsdp_addr }, addr::RSDP_START);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
    }

    #[test]
    fn bzimage_zero_page_reads_back() {
        let image = BzImageBuilder::new().cmdline_size(1000).build();
        let (mem, layout, k, initrd, regs) = boot(image, 128 * MIB);
        check_zero_page(&mem, &layout, initrd);
        let p: boot_params = mem.read_obj(GuestAddress(addr::ZERO_PAGE_START)).unwrap();
        // The kernel's own header fields are kept.
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.cmdline_size }, 1000);
        assert_eq!({ p.hdr.code32_start } as u64, addr::HIMEM_START);
        assert_eq!({ p.hdr.initrd_addr_max }, 0x7fff_ffff);
        assert_eq!(
            regs,
            BootRegs {
                rip: k.entry,
                rsp: addr::BOOT_STACK_POINTER,
                rsi: addr::ZERO_PAGE_START,
                rbx: 0,
                rflags: 2,
                mode: EntryMode::Long64,
            }
        );
    }

    #[test]
    fn elf_zero_page_has_sensible_header() {
        let (mem, layout, k, initrd, regs) = boot(ElfBuilder::new().build(), 128 * MIB);
        assert_eq!(k.mode, EntryMode::Long64);
        check_zero_page(&mem, &layout, initrd);
        let p: boot_params = mem.read_obj(GuestAddress(addr::ZERO_PAGE_START)).unwrap();
        assert!({ p.hdr.version } >= 0x020e, "acpi_rsdp_addr needs 2.14");
        assert_eq!({ p.hdr.cmdline_size } as usize, k.cmdline_max_len());
        assert_eq!(regs.rsi, addr::ZERO_PAGE_START);
        assert_eq!(regs.rip, 0x100_0000);
    }

    #[test]
    fn elf_from_bzimage_zero_page_keeps_the_bzimage_header() {
        // A kernel without a PVH note, decompressed on the host: entered at the vmlinux's
        // 64-bit entry with a zero page built from the bzImage's own setup header.
        let elf = ElfBuilder::new().build();
        let image = testutil::bzimage_with_payload(
            BzImageBuilder::new()
                .cmdline_size(1000)
                .initrd_addr_max(0x3ff_ffff),
            &testutil::xz(&elf),
        );
        let (mem, layout, k, initrd, regs) = boot(image.clone(), 128 * MIB);
        assert!(matches!(
            k.source(),
            crate::KernelSource::ElfFromBzImage { .. }
        ));
        check_zero_page(&mem, &layout, initrd);
        let p: boot_params = mem.read_obj(GuestAddress(addr::ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.cmdline_size }, 1000);
        assert_eq!({ p.hdr.initrd_addr_max }, 0x3ff_ffff);
        assert_eq!({ p.hdr.xloadflags }, 1);
        assert_eq!({ p.hdr.loadflags } & 1, 1, "LOADED_HIGH");
        // The rest of the header is the file's, byte for byte, but for the fields the loader
        // fills (type_of_loader, ramdisk_image/size, cmd_line_ptr).
        let mut hdr = p.hdr;
        hdr.type_of_loader = 0;
        hdr.ramdisk_image = 0;
        hdr.ramdisk_size = 0;
        hdr.cmd_line_ptr = 0;
        assert_eq!(
            vessel_memory::vm_memory::ByteValued::as_slice(&hdr),
            &image[0x1f1..0x1f1 + std::mem::size_of_val(&hdr)]
        );
        // The initrd respects the bzImage's initrd_addr_max.
        assert!(initrd.0 + initrd.1 <= 0x400_0000);
        assert_eq!(
            regs,
            BootRegs {
                rip: 0x100_0000,
                rsp: addr::BOOT_STACK_POINTER,
                rsi: addr::ZERO_PAGE_START,
                rbx: 0,
                rflags: 2,
                mode: EntryMode::Long64,
            }
        );
    }

    #[test]
    fn pvh_elf_from_bzimage_gets_start_info() {
        let elf = ElfBuilder::new().pvh_entry(0x100_0040).build();
        let image = testutil::bzimage_with_payload(BzImageBuilder::new(), &testutil::gzip(&elf));
        let (mem, _, k, initrd, regs) = boot(image, 128 * MIB);
        assert_eq!(
            (regs.mode, regs.rip, regs.rbx),
            (EntryMode::Pvh32, 0x100_0040, addr::PVH_INFO_START)
        );
        assert_eq!(k.cmdline_max_len(), 2047);
        let si: hvm_start_info = mem.read_obj(GuestAddress(regs.rbx)).unwrap();
        assert_eq!(si.magic, 0x336e_c578);
        assert_eq!(read_cstr(&mem, si.cmdline_paddr), CMDLINE);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(si.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), initrd);
        // The bzImage's initrd_addr_max (2 GiB - 1 in the builder) still bounds the initrd.
        assert!(initrd.0 + initrd.1 <= 0x8000_0000);
    }

    #[test]
    fn zero_page_of_a_large_guest_lists_high_ram() {
        let (mem, layout, _, initrd, _) = boot(BzImageBuilder::new().build(), 4 * 1024 * MIB);
        check_zero_page(&mem, &layout, initrd);
        let p: boot_params = mem.read_obj(GuestAddress(addr::ZERO_PAGE_START)).unwrap();
        assert_eq!(p.e820_entries, 4);
        assert_eq!({ p.e820_table[3].addr }, 4 << 30);
        // The initrd stays below the MMIO gap.
        assert!(initrd.0 + initrd.1 <= 3 << 30);
    }

    #[test]
    fn pvh_start_info_reads_back() {
        let image = ElfBuilder::new().pvh_entry(0x100_0040).build();
        let (mem, layout, _, initrd, regs) = boot(image, 128 * MIB);
        assert_eq!(
            regs,
            BootRegs {
                rip: 0x100_0040,
                rsp: addr::BOOT_STACK_POINTER,
                rsi: 0,
                rbx: addr::PVH_INFO_START,
                rflags: 2,
                mode: EntryMode::Pvh32,
            }
        );
        let si: hvm_start_info = mem.read_obj(GuestAddress(regs.rbx)).unwrap();
        assert_eq!(si.magic, 0x336e_c578);
        assert_eq!(si.version, 1);
        assert_eq!(si.cmdline_paddr, addr::CMDLINE_START);
        assert_eq!(read_cstr(&mem, si.cmdline_paddr), CMDLINE);
        assert_eq!(si.rsdp_paddr, addr::RSDP_START);

        assert_eq!(si.nr_modules, 1);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(si.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), initrd);
        assert_eq!(read_bytes(&mem, m.paddr, 4), [0x42; 4]);

        let e820 = layout.e820();
        assert_eq!(si.memmap_entries as usize, e820.len());
        for (i, want) in e820.iter().enumerate() {
            let e: hvm_memmap_table_entry = mem
                .read_obj(GuestAddress(si.memmap_paddr + 24 * i as u64))
                .unwrap();
            assert_eq!(
                (e.addr, e.size, e.type_),
                (want.addr, want.size, want.kind as u32)
            );
        }
        // Everything stays in the PVH page, clear of the zero page.
        assert!(si.memmap_paddr + 24 * e820.len() as u64 <= addr::ZERO_PAGE_START);
        assert!(si.modlist_paddr >= addr::PVH_INFO_START + 56);
    }

    #[test]
    fn pvh_without_initrd_has_no_modules() {
        let (mem, layout) = testutil::guest(64 * MIB);
        let k = load_kernel_image(
            &mem,
            &layout,
            &mut Cursor::new(ElfBuilder::new().pvh_entry(0x100_0000).build()),
        )
        .unwrap();
        let cfg = BootConfig {
            cmdline: "",
            initrd: None,
            num_cpus: 1,
            rsdp_addr: None,
        };
        configure_boot(&mem, &layout, &k, &cfg).unwrap();
        let si: hvm_start_info = mem.read_obj(GuestAddress(addr::PVH_INFO_START)).unwrap();
        assert_eq!((si.nr_modules, si.modlist_paddr, si.rsdp_paddr), (0, 0, 0));
        assert_eq!(si.memmap_entries as usize, layout.e820().len());
    }

    #[test]
    fn cmdline_over_the_kernel_limit_is_refused() {
        let (mem, layout) = testutil::guest(64 * MIB);
        let k = load_kernel_image(
            &mem,
            &layout,
            &mut Cursor::new(BzImageBuilder::new().cmdline_size(64).build()),
        )
        .unwrap();
        let long = "x".repeat(65);
        let cfg = BootConfig {
            cmdline: &long,
            initrd: None,
            num_cpus: 1,
            rsdp_addr: None,
        };
        let err = configure_boot(&mem, &layout, &k, &cfg).unwrap_err();
        assert!(
            matches!(err, BootError::CmdlineTooLong { len: 65, max: 64 }),
            "{err}"
        );
    }

    #[test]
    fn initrd_outside_ram_is_refused() {
        let (mem, layout) = testutil::guest(64 * MIB);
        let k = load_kernel_image(
            &mem,
            &layout,
            &mut Cursor::new(BzImageBuilder::new().build()),
        )
        .unwrap();
        for initrd in [(60 * MIB, 8 * MIB), (u64::MAX - 10, 100), (32 * MIB, 0)] {
            let cfg = BootConfig {
                cmdline: "",
                initrd: Some(initrd),
                num_cpus: 1,
                rsdp_addr: None,
            };
            let err = configure_boot(&mem, &layout, &k, &cfg).unwrap_err();
            assert!(matches!(err, BootError::InitrdOutOfRam { .. }), "{err}");
        }
    }
}
