//! The Linux zero page (`struct boot_params`) for the 64-bit boot protocol, written at
//! [`addr::ZERO_PAGE_START`] with linux-loader's `LinuxBootConfigurator`, and the
//! `setup_data` list it heads.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE, LOADED_HIGH,
};
use vessel_memory::vm_memory::GuestAddress;
use vessel_memory::{addr, GuestLayout, GuestMemoryMmap};

use crate::boot::BootConfig;
use crate::error::BootError;
use crate::loader::LoadedKernel;
use crate::setup_data;

/// `boot_flag`: the 0xAA55 boot sector signature.
const BOOT_FLAG: u16 = 0xaa55;
/// `header`: "HdrS".
const HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: "undefined" boot loader, as VMMs use.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Protocol version claimed for an ELF kernel (which has no setup header of its own): 2.15,
/// so every field Vessel fills (up to `acpi_rsdp_addr`) counts as valid.
const ELF_PROTOCOL_VERSION: u16 = 0x020f;

/// A setup header for an ELF kernel entered at its 64-bit entry.
fn elf_setup_header(cmdline_size: u32) -> setup_header {
    setup_header {
        boot_flag: BOOT_FLAG,
        header: HDR_MAGIC,
        version: ELF_PROTOCOL_VERSION,
        loadflags: LOADED_HIGH,
        code32_start: addr::HIMEM_START as u32,
        kernel_alignment: 0x100_0000,
        cmdline_size,
        initrd_addr_max: u32::MAX,
        ..Default::default()
    }
}

/// Fill and write the zero page.
pub(crate) fn write_zero_page(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    kernel: &LoadedKernel,
    cfg: &BootConfig,
) -> Result<(), BootError> {
    let mut hdr = match kernel.setup_header() {
        Some(h) => *h,
        None => elf_setup_header(kernel.cmdline_max_len() as u32),
    };
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.cmd_line_ptr = addr::CMDLINE_START as u32;
    let (initrd_start, initrd_size) = cfg.initrd.unwrap_or((0, 0));
    hdr.ramdisk_image = initrd_start as u32;
    hdr.ramdisk_size = initrd_size as u32;
    if let Some(seed) = &cfg.rng_seed {
        // In front of whatever list the header had (a bzImage's own header holds 0 here).
        hdr.setup_data = setup_data::write_rng_seed(mem, seed, hdr.setup_data)?;
    }

    let e820 = layout.e820();
    if e820.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(BootError::TableTooLarge {
            what: "e820 map",
            size: e820.len(),
            space: "zero page (128 entries)",
        });
    }
    let mut e820_table = [boot_e820_entry::default(); E820_MAX_ENTRIES_ZEROPAGE];
    for (slot, e) in e820_table.iter_mut().zip(&e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }

    let params = boot_params {
        hdr,
        ext_cmd_line_ptr: (addr::CMDLINE_START >> 32) as u32,
        ext_ramdisk_image: (initrd_start >> 32) as u32,
        ext_ramdisk_size: (initrd_size >> 32) as u32,
        acpi_rsdp_addr: cfg.rsdp_addr.unwrap_or(0),
        e820_entries: e820.len() as u8,
        e820_table,
        ..Default::default()
    };
    let bp = BootParams::new(&params, GuestAddress(addr::ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&bp, mem)
        .map_err(BootError::write("zero page", addr::ZERO_PAGE_START))
}
