//! The fixed ACPI hardware of a PC, for guests booted through firmware: the PM1a event block
//! (status and enable), the PM1a control block and the 24-bit power-management timer, at
//! `vessel_memory::ports::ACPI_PM1_EVT` and on ([`AcpiPm1::PORT_LEN`] ports).
//!
//! A firmware-booted guest gets a full (not hardware-reduced) FADT pointing here: with a
//! hardware-reduced one Linux leaves the 8259 PICs as the firmware left them (SeaBIOS's
//! timer on vector 8), and OVMF and GRUB look for the PM timer. The control block is always
//! in ACPI mode (`SCI_EN` set; there is no SMI command port); writing `SLP_EN` with the S5
//! sleep type (`vessel_memory::ports::SLEEP_TYPE_S5`) powers the VM off. The timer counts
//! at 3.579545 MHz from the host's monotonic clock. No event ever raises an SCI.

use std::time::Instant;

use vessel_memory::ports::{ACPI_PM1_CNT, ACPI_PM1_EVT, ACPI_PM_TMR, SLEEP_TYPE_S5};

use crate::bus::BusDevice;
use crate::exit::{ExitSignal, VmExitReason};

/// Offsets of the registers from the start of the event block.
const STS: usize = 0;
const EN: usize = 2;
const CNT: usize = (ACPI_PM1_CNT - ACPI_PM1_EVT) as usize;
const TMR: usize = (ACPI_PM_TMR - ACPI_PM1_EVT) as usize;

/// PM1 control bits: the platform is in ACPI mode; sleep type (bits 10-12); sleep enable.
const SCI_EN: u16 = 1 << 0;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_EN: u16 = 1 << 13;
/// The PM timer's frequency (Hz) and width.
pub const PM_TIMER_HZ: u128 = 3_579_545;
const TMR_MASK: u32 = 0x00ff_ffff;

/// PM1a event and control blocks and the PM timer.
pub struct AcpiPm1 {
    exit: ExitSignal,
    status: u16,
    enable: u16,
    control: u16,
    start: Instant,
}

impl AcpiPm1 {
    /// Ports the three blocks occupy.
    pub const PORT_LEN: u64 = (TMR + 4) as u64;

    /// Registers that power the VM off through `exit`.
    pub fn new(exit: ExitSignal) -> Self {
        AcpiPm1 {
            exit,
            status: 0,
            enable: 0,
            control: SCI_EN,
            start: Instant::now(),
        }
    }

    /// The timer's count now.
    fn timer(&self) -> u32 {
        let ticks = self.start.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000;
        (ticks as u32) & TMR_MASK
    }

    /// The register file as bytes, the timer read now.
    fn bytes(&self) -> [u8; Self::PORT_LEN as usize] {
        let mut b = [0u8; Self::PORT_LEN as usize];
        b[STS..STS + 2].copy_from_slice(&self.status.to_le_bytes());
        b[EN..EN + 2].copy_from_slice(&self.enable.to_le_bytes());
        b[CNT..CNT + 2].copy_from_slice(&self.control.to_le_bytes());
        b[TMR..TMR + 4].copy_from_slice(&self.timer().to_le_bytes());
        b
    }
}

impl BusDevice for AcpiPm1 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let b = self.bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| b.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut b = self.bytes();
        let mut touched = [false; Self::PORT_LEN as usize];
        for (i, &v) in data.iter().enumerate() {
            let Some(o) = usize::try_from(offset).ok().and_then(|o| o.checked_add(i)) else {
                continue;
            };
            if let Some(slot) = b.get_mut(o) {
                *slot = v;
                touched[o] = true;
            }
        }
        let word = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        if touched[STS] || touched[STS + 1] {
            // Write 1 to clear.
            self.status &= !word(STS);
        }
        if touched[EN] || touched[EN + 1] {
            self.enable = word(EN);
        }
        if touched[CNT] || touched[CNT + 1] {
            let value = word(CNT);
            // SLP_EN is write-only and SCI_EN stays set (no legacy mode to go back to).
            self.control = (value & !SLP_EN) | SCI_EN;
            if value & SLP_EN != 0 {
                let sleep_type = (value >> SLP_TYP_SHIFT) & 0x7;
                if sleep_type == u16::from(SLEEP_TYPE_S5) {
                    self.exit.request(VmExitReason::PowerOff);
                } else {
                    log::debug!(
                        "guest asked for unsupported ACPI sleep type {sleep_type}; ignored"
                    );
                }
            }
        }
        // The timer is read-only.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm1() -> (AcpiPm1, ExitSignal) {
        let exit = ExitSignal::new().unwrap();
        (AcpiPm1::new(exit.clone()), exit)
    }

    fn read16(pm: &mut AcpiPm1, at: usize) -> u16 {
        let mut d = [0u8; 2];
        pm.read(at as u64, &mut d);
        u16::from_le_bytes(d)
    }

    #[test]
    fn s5_through_pm1_control_powers_off_and_other_types_do_not() {
        let (mut pm, exit) = pm1();
        assert_eq!(read16(&mut pm, CNT) & SCI_EN, SCI_EN, "always in ACPI mode");
        for typ in (0..8u16).filter(|&t| t != u16::from(SLEEP_TYPE_S5)) {
            pm.write(CNT as u64, &((typ << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes());
        }
        // The type alone, without SLP_EN, only sets the field.
        let s5 = u16::from(SLEEP_TYPE_S5) << SLP_TYP_SHIFT;
        pm.write(CNT as u64, &s5.to_le_bytes());
        assert_eq!(exit.reason(), None);
        assert_eq!(read16(&mut pm, CNT), s5 | SCI_EN);
        // Linux writes the high byte on its own too.
        pm.write(CNT as u64 + 1, &[((s5 | SLP_EN) >> 8) as u8]);
        assert_eq!(exit.reason(), Some(VmExitReason::PowerOff));
        assert_eq!(read16(&mut pm, CNT) & SLP_EN, 0, "SLP_EN reads 0");
    }

    #[test]
    fn the_timer_counts_at_3_58_mhz_and_wraps_at_24_bits() {
        let (mut pm, _) = pm1();
        let mut d = [0u8; 4];
        pm.read(TMR as u64, &mut d);
        let a = u32::from_le_bytes(d);
        std::thread::sleep(std::time::Duration::from_millis(20));
        pm.read(TMR as u64, &mut d);
        let b = u32::from_le_bytes(d);
        let ticks = b.wrapping_sub(a) & TMR_MASK;
        // 20 ms is 71,591 ticks; the sleep may run long, never short.
        assert!((71_000..3_579_545).contains(&ticks), "{ticks} ticks");
        assert_eq!(b & !TMR_MASK, 0);
        pm.write(TMR as u64, &[0xff; 4]);
        pm.read(TMR as u64, &mut d);
        assert_eq!(u32::from_le_bytes(d) & !TMR_MASK, 0, "writes do not set it");
    }

    #[test]
    fn status_is_write_one_to_clear_and_enable_keeps_what_is_written() {
        let (mut pm, _) = pm1();
        pm.status = 0x0101;
        pm.write(STS as u64, &0x0001u16.to_le_bytes());
        assert_eq!(read16(&mut pm, STS), 0x0100);
        pm.write(EN as u64, &0x0120u16.to_le_bytes());
        assert_eq!(read16(&mut pm, EN), 0x0120);
        // Out of range, wide or odd accesses neither panic nor change anything.
        pm.write(100, &[1, 2, 3]);
        pm.write(u64::MAX, &[1, 2]);
        let mut d = [0xaa; 8];
        pm.read(10, &mut d);
        assert_eq!(&d[2..], &[0; 6]);
        assert_eq!(AcpiPm1::PORT_LEN, 12);
    }
}
