//! Configuring the boot: the command line plus the zero page (64-bit entry) or the PVH start
//! info (32-bit entry), and the register values the boot vCPU starts with.

use vessel_memory::{addr, GuestLayout, GuestMemoryMmap};

use crate::cmdline::write_cmdline;
use crate::error::BootError;
use crate::loader::{EntryMode, LoadedKernel};
use crate::{pvh, zeropage};

/// What the kernel is told at boot.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootConfig<'a> {
    /// The kernel command line, without a terminating NUL.
    pub cmdline: &'a str,
    /// The initrd's guest-physical address and size, as [`crate::load_initrd`] returned them.
    pub initrd: Option<(u64, u64)>,
    /// Number of vCPUs (the CPU tables themselves come from the ACPI and MP table writers).
    pub num_cpus: u8,
    /// The ACPI RSDP address, as [`crate::create_acpi_tables`] returned it.
    pub rsdp_addr: Option<u64>,
    /// A seed for the kernel's RNG (e.g. from [`crate::host_rng_seed`]). For the 64-bit entry
    /// it goes in a `SETUP_RNG_SEED` `setup_data` node at [`crate::SETUP_DATA_START`], linked
    /// from the zero page: Linux 6.0+ then initialises its CRNG at boot. Ignored for PVH,
    /// whose start info has no place for it (nothing is written, no error).
    pub rng_seed: Option<[u8; crate::RNG_SEED_LEN]>,
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
/// command line, initrd, RSDP and the RNG seed's `setup_data`) or the PVH `hvm_start_info`
/// with its memory map and module list (32-bit entry). Returns the registers the boot vCPU
/// must start with.
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
    use crate::loader::{load_initrd_image, load_kernel_image, load_kernel_image_with};
    use crate::testutil::{self, read_bytes, BzImageBuilder, ElfBuilder, MIB};
    use crate::LoadOptions;
    use linux_loader::loader::bootparam::boot_params;
    use linux_loader::loader::elf::start_info::{
        hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
    };
    use std::io::Cursor;
    use vessel_memory::vm_memory::{Bytes, GuestAddress};

    const CMDLINE: &str = "console=ttyS0 root=/dev/ram0 rdinit=/init";

    type Booted = (
        GuestMemoryMmap,
        GuestLayout,
        LoadedKernel,
        (u64, u64),
        BootRegs,
    );

    /// Load `image` and a 1 MiB initrd in a guest of `mem_size`, configure the boot.
    fn boot(image: Vec<u8>, mem_size: u64) -> Booted {
        boot_with(image, mem_size, &LoadOptions::default(), None)
    }

    /// [`boot`] with the PVH entry preferred.
    fn boot_pvh(image: Vec<u8>, mem_size: u64) -> Booted {
        let options = LoadOptions {
            prefer_pvh: true,
            ..LoadOptions::default()
        };
        boot_with(image, mem_size, &options, None)
    }

    /// [`boot`] with load options and an RNG seed.
    fn boot_with(
        image: Vec<u8>,
        mem_size: u64,
        options: &LoadOptions,
        rng_seed: Option<[u8; 32]>,
    ) -> Booted {
        let (mem, layout) = testutil::guest(mem_size);
        let k = load_kernel_image_with(&mem, &layout, &mut Cursor::new(image), options).unwrap();
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
            rng_seed,
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
        let (mem, _, k, initrd, regs) = boot_pvh(image, 128 * MIB);
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
        assert_eq!(
            p.e820_entries, 5,
            "RAM, EBDA hole, RAM, ECAM, RAM above 4 GiB"
        );
        assert_eq!({ p.e820_table[4].addr }, 4 << 30);
        // The initrd stays below the MMIO gap.
        assert!(initrd.0 + initrd.1 <= 3 << 30);
    }

    #[test]
    fn pvh_start_info_reads_back() {
        let image = ElfBuilder::new().pvh_entry(0x100_0040).build();
        let (mem, layout, _, initrd, regs) = boot_pvh(image, 128 * MIB);
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
        let k = load_kernel_image_with(
            &mem,
            &layout,
            &mut Cursor::new(ElfBuilder::new().pvh_entry(0x100_0000).build()),
            &LoadOptions {
                prefer_pvh: true,
                ..LoadOptions::default()
            },
        )
        .unwrap();
        assert_eq!(k.mode, EntryMode::Pvh32);
        let cfg = BootConfig {
            cmdline: "",
            initrd: None,
            num_cpus: 1,
            rsdp_addr: None,
            rng_seed: None,
        };
        configure_boot(&mem, &layout, &k, &cfg).unwrap();
        let si: hvm_start_info = mem.read_obj(GuestAddress(addr::PVH_INFO_START)).unwrap();
        assert_eq!((si.nr_modules, si.modlist_paddr, si.rsdp_paddr), (0, 0, 0));
        assert_eq!(si.memmap_entries as usize, layout.e820().len());
    }

    const SEED: [u8; 32] = [
        0x3c, 0x91, 0x07, 0xee, 0x5a, 0x12, 0xb4, 0x68, 0x0d, 0xf3, 0x27, 0x8a, 0x41, 0xc6, 0x9e,
        0x50, 0x7b, 0x22, 0xd9, 0x04, 0xaf, 0x63, 0x18, 0xe5, 0x36, 0x8f, 0xca, 0x71, 0x2d, 0x94,
        0x5e, 0xb0,
    ];

    /// The `setup_data` node at `at`: next, type, len, data.
    fn read_setup_data(mem: &GuestMemoryMmap, at: u64) -> (u64, u32, u32, Vec<u8>) {
        let head = read_bytes(mem, at, 16);
        let len = testutil::u32_at(&head, 12);
        (
            testutil::u64_at(&head, 0),
            testutil::u32_at(&head, 8),
            len,
            read_bytes(mem, at + 16, len as usize),
        )
    }

    #[test]
    fn long64_boot_hands_the_kernel_an_rng_seed() {
        let elf = ElfBuilder::new().pvh_entry(0x100_0040).build();
        let host_decompressed = testutil::bzimage_with_payload(
            BzImageBuilder::new().cmdline_size(1000),
            &testutil::xz(&elf),
        );
        for image in [elf, host_decompressed, BzImageBuilder::new().build()] {
            let (mem, layout, k, initrd, regs) =
                boot_with(image, 128 * MIB, &LoadOptions::default(), Some(SEED));
            assert_eq!(regs.mode, EntryMode::Long64);
            check_zero_page(&mem, &layout, initrd);
            let p: boot_params = mem.read_obj(GuestAddress(addr::ZERO_PAGE_START)).unwrap();
            assert_eq!({ p.hdr.setup_data }, crate::SETUP_DATA_START);
            assert!(
                { p.hdr.version } >= 0x0209,
                "setup_data needs protocol 2.09"
            );
            let (next, kind, len, data) = read_setup_data(&mem, crate::SETUP_DATA_START);
            assert_eq!((next, kind, len), (0, 9, 32), "{}", k.source());
            assert_eq!(data, SEED);

            // The node is in RAM the e820 map reports, clear of everything else written.
            let node = crate::SETUP_DATA_START..crate::SETUP_DATA_START + 48;
            assert!(layout.e820().iter().any(|e| e.kind as u32 == 1
                && e.addr <= node.start
                && node.end <= e.addr + e.size));
            let cmdline_end = addr::CMDLINE_START + addr::CMDLINE_MAX_SIZE as u64;
            for (what, start, end) in [
                (
                    "zero page",
                    addr::ZERO_PAGE_START,
                    addr::ZERO_PAGE_START + 0x1000,
                ),
                ("page tables", addr::PML4_START, addr::PD_START + 4 * 0x1000),
                ("command line", addr::CMDLINE_START, cmdline_end),
                (
                    "MP table and BIOS area",
                    addr::EBDA_START,
                    addr::HIMEM_START,
                ),
                ("initrd", initrd.0, initrd.0 + initrd.1),
                ("kernel", addr::HIMEM_START, k.kernel_end),
            ] {
                assert!(
                    node.end <= start || end <= node.start,
                    "overlaps the {what}"
                );
            }
        }
    }

    #[test]
    fn long64_boot_without_a_seed_has_no_setup_data() {
        for image in [ElfBuilder::new().build(), BzImageBuilder::new().build()] {
            let (mem, _, _, _, regs) = boot(image, 64 * MIB);
            assert_eq!(regs.mode, EntryMode::Long64);
            let p: boot_params = mem.read_obj(GuestAddress(addr::ZERO_PAGE_START)).unwrap();
            assert_eq!({ p.hdr.setup_data }, 0);
            assert_eq!(read_bytes(&mem, crate::SETUP_DATA_START, 48), [0; 48]);
        }
    }

    #[test]
    fn rng_seed_goes_in_front_of_the_headers_setup_data() {
        // A bzImage whose own header already links a setup_data list (at 0x250).
        let mut image = BzImageBuilder::new().build();
        image[0x250..0x258].copy_from_slice(&0x4_5000u64.to_le_bytes());
        let (mem, _, _, _, _) = boot_with(image, 64 * MIB, &LoadOptions::default(), Some(SEED));
        let p: boot_params = mem.read_obj(GuestAddress(addr::ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.setup_data }, crate::SETUP_DATA_START);
        let (next, kind, len, data) = read_setup_data(&mem, crate::SETUP_DATA_START);
        assert_eq!((next, kind, len), (0x4_5000, 9, 32));
        assert_eq!(data, SEED);
    }

    #[test]
    fn pvh_boot_ignores_the_rng_seed() {
        let image = ElfBuilder::new().pvh_entry(0x100_0040).build();
        let options = LoadOptions {
            prefer_pvh: true,
            ..LoadOptions::default()
        };
        let (mem, _, _, initrd, regs) = boot_with(image, 64 * MIB, &options, Some(SEED));
        assert_eq!((regs.mode, regs.rip), (EntryMode::Pvh32, 0x100_0040));
        assert_eq!(read_bytes(&mem, crate::SETUP_DATA_START, 48), [0; 48]);
        // Nor is a zero page written.
        assert_eq!(read_bytes(&mem, addr::ZERO_PAGE_START, 0x1000), [0; 0x1000]);
        let si: hvm_start_info = mem.read_obj(GuestAddress(regs.rbx)).unwrap();
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(si.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), initrd);
    }

    #[test]
    fn entry_follows_prefer_pvh() {
        let image = ElfBuilder::new()
            .entry(0x100_0200)
            .pvh_entry(0x100_0040)
            .build();
        let (_, _, _, _, regs) = boot(image.clone(), 64 * MIB);
        assert_eq!(
            (regs.mode, regs.rip, regs.rsi, regs.rbx),
            (EntryMode::Long64, 0x100_0200, addr::ZERO_PAGE_START, 0)
        );
        let (_, _, _, _, regs) = boot_pvh(image, 64 * MIB);
        assert_eq!(
            (regs.mode, regs.rip, regs.rsi, regs.rbx),
            (EntryMode::Pvh32, 0x100_0040, 0, addr::PVH_INFO_START)
        );
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
            rng_seed: None,
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
                rng_seed: None,
            };
            let err = configure_boot(&mem, &layout, &k, &cfg).unwrap_err();
            assert!(matches!(err, BootError::InitrdOutOfRam { .. }), "{err}");
        }
    }
}
