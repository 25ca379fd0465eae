//! The Linux boot protocol and the platform tables.
//!
//! This crate owns *what the guest finds in memory when its first instruction runs*:
//!
//! - the kernel, loaded from a bzImage or an ELF vmlinux ([`load_kernel`]; a bzImage's
//!   payload is decompressed on the host where it can be, see [`LoadOptions`]), and the
//!   initrd ([`load_initrd`]);
//! - the command line and the zero page (64-bit entry, the default; with an RNG seed in its
//!   `setup_data`, see [`host_rng_seed`]) or PVH start info (32-bit entry, when asked for with
//!   [`LoadOptions::prefer_pvh`]), with the registers the boot vCPU starts with
//!   ([`configure_boot`]);
//! - the boot GDT and identity page tables ([`write_gdt`], [`write_identity_page_tables`]);
//! - the ACPI tables ([`create_acpi_tables`]) and the MP table ([`create_mptable`]).
//!
//! Addresses come from `vessel_memory::addr`, I/O ports from `vessel_memory::ports`. Nothing
//! here talks to KVM: segments and registers are returned as plain data for the VMM.

mod acpi;
mod boot;
mod bzimage;
mod cmdline;
mod cpu_tables;
mod decompress;
mod elf;
mod error;
mod loader;
mod mptable;
mod pvh;
mod setup_data;
mod zeropage;

#[cfg(test)]
mod testutil;

pub use acpi::{
    create_acpi_tables, firmware_acpi_tables, FirmwareAcpi, MmioDeviceInfo, PlatformDevices,
    VmGenIdInfo, IOAPIC_ID, OEM_ID,
};
pub use boot::{configure_boot, BootConfig, BootRegs, BOOT_RFLAGS};
pub use cpu_tables::{
    boot_segments, write_gdt, write_identity_page_tables, Gdt, Segment, CODE_SELECTOR,
    DATA_SELECTOR, TSS_SELECTOR,
};
pub use decompress::{Compression, MAX_DECOMPRESSED};
pub use error::BootError;
pub use loader::{
    load_initrd, load_kernel, load_kernel_with, EntryMode, KernelSource, LoadOptions, LoadedKernel,
    ELF_CMDLINE_MAX,
};
pub use mptable::create_mptable;
pub use setup_data::{host_random, host_rng_seed, RNG_SEED_LEN, SETUP_DATA_START};
pub use zeropage::LOADER_TYPE_UNDEFINED;
