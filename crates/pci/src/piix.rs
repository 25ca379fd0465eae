//! The PIIX functions of QEMU's `pc` machine that OVMF looks for beside an i440FX host
//! bridge, in slot 1: the PIIX3 PCI-to-ISA bridge (00:01.0), under which OVMF finds the
//! COM1 serial port and the PS/2 keyboard it makes its consoles, and the PIIX4 power
//! management function (00:01.3), whose PMBA register says where the ACPI PM1 registers
//! and the PM timer are (OVMF's timer library reads it for every tick).
//!
//! The PM block does not move: PMBA reads the base Vessel's FADT names, with I/O decoding
//! already on, so a firmware finds it configured and leaves it (OVMF then skips its own
//! setup, as it does after a warm reset).

use crate::bus::PciDevice;
use crate::config::{BarMove, ConfigSpace, PciIds};

/// Intel's vendor id and the PIIX3 ISA bridge and PIIX4 PM function ids.
const INTEL: u16 = 0x8086;
pub const PIIX3_ISA_DEVICE_ID: u16 = 0x7000;
pub const PIIX4_PM_DEVICE_ID: u16 = 0x7113;
/// The slot both functions are in, and the PM function's number.
pub const PIIX_SLOT: u8 = 1;
pub const PIIX4_PM_FUNCTION: u8 = 3;
/// PIIX3's PIRQ route control registers (PIRQA..D): bit 7 set = not routed.
const PIRQRC: usize = 0x60;
/// PIIX4 PM: the PM I/O base (bit 0 reads 1: I/O space) and PMREGMISC (bit 0: PM I/O on).
const PMBA: usize = 0x40;
const PMREGMISC: usize = 0x80;

fn read_only(len: usize) -> Vec<u8> {
    vec![0; len]
}

/// The PIIX3 PCI-to-ISA bridge (8086:7000), function 0 of a multi-function slot. Its
/// device-specific registers (PIRQ routing and the like) read back what the guest writes and
/// change nothing: interrupts are routed by the ACPI tables and MSI-X.
pub struct Piix3Isa {
    config: ConfigSpace,
}

impl Piix3Isa {
    pub fn new() -> Self {
        let mut config = ConfigSpace::new(PciIds {
            vendor_id: INTEL,
            device_id: PIIX3_ISA_DEVICE_ID,
            class: 0x06,
            subclass: 0x01,
            ..PciIds::default()
        });
        config.set_multifunction();
        let regs = 0x100 - 0x40;
        config
            .define_register(0x40, &vec![0; regs], &vec![0xff; regs])
            .expect("the device registers fit");
        config
            .define_register(PIRQRC, &[0x80; 4], &[0x8f; 4])
            .expect("the PIRQ registers fit");
        Piix3Isa { config }
    }
}

impl Default for Piix3Isa {
    fn default() -> Self {
        Self::new()
    }
}

/// The PIIX4 power-management function (8086:7113), with its PM block at a fixed base.
pub struct Piix4Pm {
    config: ConfigSpace,
}

impl Piix4Pm {
    /// The function, with the PM1 registers and PM timer at I/O port `pm_base` (64-byte
    /// aligned).
    pub fn new(pm_base: u16) -> Self {
        let mut config = ConfigSpace::new(PciIds {
            vendor_id: INTEL,
            device_id: PIIX4_PM_DEVICE_ID,
            revision: 3,
            class: 0x06,
            subclass: 0x80,
            ..PciIds::default()
        });
        config.set_interrupt_pin(1);
        let regs = 0x100 - 0x40;
        config
            .define_register(0x40, &vec![0; regs], &vec![0xff; regs])
            .expect("the device registers fit");
        let pmba = u32::from(pm_base & !0x3f) | 1;
        config
            .define_register(PMBA, &pmba.to_le_bytes(), &read_only(4))
            .expect("PMBA fits");
        config
            .define_register(PMREGMISC, &[1], &read_only(1))
            .expect("PMREGMISC fits");
        // I/O decoding is on, as the firmware would have left it.
        config.write(
            crate::config::reg::COMMAND as u64,
            &crate::config::command::IO_SPACE.to_le_bytes(),
        );
        Piix4Pm { config }
    }
}

/// Both functions only have registers: no BARs.
macro_rules! registers_only {
    ($t:ty) => {
        impl PciDevice for $t {
            fn config_read(&mut self, offset: u64, data: &mut [u8]) {
                self.config.read(offset, data);
            }
            fn config_write(&mut self, offset: u64, data: &[u8]) -> Vec<BarMove> {
                self.config.write(offset, data)
            }
        }
    };
}
registers_only!(Piix3Isa);
registers_only!(Piix4Pm);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::PciBus;
    use std::sync::{Arc, Mutex};

    fn read32(bus: &PciBus, dev: u8, func: u8, reg: u64) -> u32 {
        let mut b = [0u8; 4];
        bus.config_read(0, dev, func, reg, &mut b);
        u32::from_le_bytes(b)
    }

    fn bus() -> PciBus {
        let mut bus = PciBus::new();
        bus.add_device_at(PIIX_SLOT, Arc::new(Mutex::new(Piix3Isa::new())))
            .unwrap();
        bus.add_function(
            PIIX_SLOT,
            PIIX4_PM_FUNCTION,
            Arc::new(Mutex::new(Piix4Pm::new(0xb000))),
        )
        .unwrap();
        bus
    }

    #[test]
    fn a_scan_finds_both_functions_of_slot_one() {
        let bus = bus();
        assert_eq!(read32(&bus, 1, 0, 0), 0x7000_8086);
        assert_eq!(
            read32(&bus, 1, 0, 0x08) >> 8,
            0x06_01_00,
            "ISA bridge class"
        );
        assert_eq!(
            read32(&bus, 1, 0, 0x0c) >> 16 & 0xff,
            0x80,
            "multi-function"
        );
        assert_eq!(read32(&bus, 1, 3, 0), 0x7113_8086);
        assert_eq!(read32(&bus, 1, 3, 0x08), 0x0680_0003, "class, revision 3");
        for func in [1, 2, 4, 7] {
            assert_eq!(
                read32(&bus, 1, func, 0),
                u32::MAX,
                "function {func} is empty"
            );
        }
    }

    /// OVMF's sequence (PlatformInitLib `PlatformMiscInitialization`): when PMREGMISC bit 0
    /// is clear it writes PMBA and sets it. Here it is set, and PMBA keeps the FADT's base
    /// whatever is written, so the timer is where the tables say.
    #[test]
    fn the_pm_base_is_the_fadt_one_and_stays() {
        let bus = bus();
        assert_eq!(read32(&bus, 1, 3, 0x80) & 1, 1, "PM I/O already on");
        assert_eq!(read32(&bus, 1, 3, 0x40), 0xb001);
        assert_eq!(read32(&bus, 1, 3, 0x04) & 1, 1, "I/O decoding on");
        bus.config_write(0, 1, 3, 0x40, &0x0601u32.to_le_bytes());
        bus.config_write(0, 1, 3, 0x80, &[0]);
        assert_eq!(read32(&bus, 1, 3, 0x40), 0xb001);
        assert_eq!(read32(&bus, 1, 3, 0x80) & 1, 1);
        // Other registers (the SMBus base, say) read back what was written.
        bus.config_write(0, 1, 3, 0x90, &0x1101u32.to_le_bytes());
        assert_eq!(read32(&bus, 1, 3, 0x90), 0x1101);
    }

    #[test]
    fn pirq_routes_read_back_and_start_unrouted() {
        let bus = bus();
        assert_eq!(read32(&bus, 1, 0, 0x60), 0x8080_8080);
        bus.config_write(0, 1, 0, 0x60, &[0x0a, 0x0a, 0x0b, 0x0b]);
        assert_eq!(read32(&bus, 1, 0, 0x60), 0x0b0b_0a0a);
    }
}
