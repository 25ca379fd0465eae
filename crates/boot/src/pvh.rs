//! The PVH start of day structure (`hvm_start_info`), its module list (the initrd) and its
//! memory map, all in the page at [`addr::PVH_INFO_START`], written with linux-loader's
//! `PvhBootConfigurator`.

use std::mem::size_of;

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vessel_memory::vm_memory::GuestAddress;
use vessel_memory::{addr, GuestLayout, GuestMemoryMmap};

use crate::boot::BootConfig;
use crate::error::BootError;

/// `hvm_start_info` version 1: the memory map fields are present.
const START_INFO_VERSION: u32 = 1;

/// Fill and write `hvm_start_info`, the module list and the memory map.
pub(crate) fn write_start_info(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    cfg: &BootConfig,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = layout
        .e820()
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            // The e820 kinds (1 RAM, 2 reserved, 3 ACPI) are the XEN_HVM_MEMMAP_TYPE_* values.
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = cfg
        .initrd
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .into_iter()
        .collect();

    // start_info, then the module list, then the memory map, 8-byte aligned, in one page.
    let modlist_addr =
        addr::PVH_INFO_START + size_of::<hvm_start_info>().next_multiple_of(8) as u64;
    let memmap_addr = modlist_addr + (modules.len() * size_of::<hvm_modlist_entry>()) as u64;
    let end = memmap_addr + (memmap.len() * size_of::<hvm_memmap_table_entry>()) as u64;
    if end > addr::PVH_INFO_START + 0x1000 {
        return Err(BootError::TableTooLarge {
            what: "PVH start info and memory map",
            size: (end - addr::PVH_INFO_START) as usize,
            space: "page at PVH_INFO_START",
        });
    }

    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: START_INFO_VERSION,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { modlist_addr },
        cmdline_paddr: addr::CMDLINE_START,
        rsdp_paddr: cfg.rsdp_addr.unwrap_or(0),
        memmap_paddr: memmap_addr,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    let mut bp = BootParams::new(&start_info, GuestAddress(addr::PVH_INFO_START));
    bp.set_sections(&memmap, GuestAddress(memmap_addr));
    if !modules.is_empty() {
        bp.set_modules(&modules, GuestAddress(modlist_addr));
    }
    PvhBootConfigurator::write_bootparams(&bp, mem)
        .map_err(BootError::write("PVH start info", addr::PVH_INFO_START))
}
