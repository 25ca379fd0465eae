//! The I/O bus and the legacy PC devices of a Vessel VM.
//!
//! This crate owns *what answers* a guest's port I/O and MMIO accesses: the [`Bus`] that maps
//! address ranges to [`BusDevice`]s (used for both the port bus and the MMIO bus), the
//! [`ExitSignal`] through which devices ask the VMM to power off or reset the VM, and the
//! legacy devices themselves:
//!
//! - [`serial::Serial`]: a 16550 UART (COM1) built on `vm_superio`;
//! - [`i8042::I8042`]: the keyboard controller (and port 0x61), enough for Linux to probe it
//!   at once and to reset the machine with command 0xfe;
//! - [`rtc::Rtc`]: the MC146818 CMOS real-time clock;
//! - [`acpi_pm::AcpiPm`]: the hardware-reduced ACPI sleep control/status and reset registers;
//! - [`acpi_pm1::AcpiPm1`]: the full ACPI PM1 blocks and PM timer, for firmware-booted guests;
//! - [`debug_port::DebugPort`] (port 0x80) and [`debug_port::PortSink`] (known ports that need
//!   no emulation);
//! - [`boot_timer::BootTimer`]: Firecracker's boot timer (MMIO), which logs the guest's boot
//!   time when it writes 123;
//! - [`fw_cfg::FwCfg`]: QEMU's firmware configuration device (ports 0x510..0x51c, with DMA),
//!   which gives SeaBIOS and OVMF their items and files, and [`fw_cfg::loader`], the ACPI
//!   table-loader script;
//! - [`pflash::Pflash`]: a CFI parallel NOR flash backed by a file, OVMF's UEFI variable store.
//!
//! Port numbers come from `vessel_memory::ports`. The crate does not know about KVM: devices
//! raise interrupts by writing an [`EventFd`](vmm_sys_util::eventfd::EventFd) that the VMM
//! registers as an irqfd for the device's GSI.

pub mod acpi_pm;
pub mod acpi_pm1;
pub mod boot_timer;
pub mod bus;
pub mod debug_port;
pub mod exit;
pub mod fw_cfg;
pub mod i8042;
mod irq;
pub mod pflash;
pub mod rtc;
pub mod serial;
mod state;

pub use acpi_pm::AcpiPm;
pub use acpi_pm1::AcpiPm1;
pub use boot_timer::BootTimer;
pub use bus::{Bus, BusDevice, BusError, BusFallback};
pub use debug_port::{DebugPort, FirmwareLog, PortSink};
pub use exit::{ExitSignal, VmExitReason};
pub use fw_cfg::FwCfg;
pub use i8042::I8042;
pub use pflash::{Pflash, PflashError, PflashState};
pub use rtc::Rtc;
pub use serial::Serial;
pub use state::SavedStateError;
