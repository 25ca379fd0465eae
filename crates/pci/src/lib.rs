//! PCI for Vessel: type-0 configuration space, BARs, capabilities, MSI-X, and the host bridge
//! that serves configuration access through ports 0xcf8/0xcfc and ECAM.
//!
//! - [`config`]: [`ConfigSpace`], one function's type-0 header (BAR sizing, capability list,
//!   read-only bits) and the [`BarMove`]s a guest's rewrite of a BAR causes;
//! - [`msix`]: [`Msix`], the MSI-X capability, table and PBA, delivering through the VMM's
//!   [`MsiController`];
//! - [`bus`]: the [`PciDevice`] trait, [`PciBus`] (bus 0, host bridge in slot 0), and the
//!   [`PciConfigIo`] (ports 0xcf8-0xcff) and [`PciConfigMmio`] (ECAM) bus devices;
//! - [`allocator`]: [`BarAllocator`], where the VMM places BARs;
//! - [`bar_map`]: [`BarMap`], where the BARs are after the guest or its firmware moved them;
//! - [`piix`]: the PIIX3 ISA bridge and PIIX4 power-management functions OVMF needs beside
//!   an i440FX.
//!
//! Nothing here talks to KVM.

pub mod allocator;
pub mod bar_map;
pub mod bus;
pub mod config;
pub mod msix;
pub mod piix;

pub use allocator::{AllocError, BarAllocator};
pub use bar_map::BarMap;
pub use bus::{
    BarReprogram, HostBridge, PciBarRegion, PciBus, PciBusError, PciConfigIo, PciConfigMmio,
    PciDevice, ECAM_BUS_SIZE, I440FX_DEVICE_ID, PCI_CONFIG_IO_LEN, PCI_CONFIG_IO_PORT,
};
pub use config::{
    BarInfo, BarKind, BarMove, BarRegisterState, BarSpec, ConfigError, ConfigSpace,
    ConfigSpaceState, ConfigStateError, PciIds,
};
pub use msix::{
    MsiController, MsiMessage, Msix, MsixError, MsixLocation, MsixState, MsixStateError,
};
