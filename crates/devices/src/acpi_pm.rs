//! The hardware-reduced ACPI sleep control/status and reset registers.
//!
//! Insert at `vessel_memory::ports::ACPI_SLEEP_CONTROL` with length [`AcpiPm::PORT_LEN`] (3):
//! offset 0 is the sleep control register (`ACPI_SLEEP_CONTROL`, 0x600), 1 the sleep status
//! register (`ACPI_SLEEP_STATUS`, 0x601), 2 the reset register (`ACPI_RESET`, 0x602). All are
//! one byte wide.
//!
//! Writing `(SLEEP_TYPE_S5 << 2) | SLP_EN` to sleep control requests
//! [`VmExitReason::PowerOff`]; other sleep types are not supported and are ignored (logged once
//! at debug level). Writing `ACPI_RESET_VALUE` to the reset register requests
//! [`VmExitReason::Reset`]. Sleep status reads 0: the guest never sleeps, so it never wakes.

use vessel_memory::ports::{
    ACPI_RESET, ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL, ACPI_SLEEP_STATUS, SLEEP_TYPE_S5,
};

use crate::bus::BusDevice;
use crate::exit::{ExitSignal, VmExitReason};

const SLEEP_CONTROL: u64 = 0;
const SLEEP_STATUS: u64 = (ACPI_SLEEP_STATUS - ACPI_SLEEP_CONTROL) as u64;
const RESET: u64 = (ACPI_RESET - ACPI_SLEEP_CONTROL) as u64;

/// `SLP_TYPx` field of the sleep control register (bits 2-4).
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x07;
/// `SLP_EN`: enter the sleep state given by `SLP_TYPx`.
pub const SLP_EN: u8 = 0x20;

/// The ACPI power management registers of a hardware-reduced platform.
pub struct AcpiPm {
    exit: ExitSignal,
    /// Whether an unsupported sleep request was already logged.
    logged_sleep: bool,
}

impl AcpiPm {
    /// Number of ports the registers occupy (sleep control, sleep status, reset).
    pub const PORT_LEN: u64 = RESET + 1;

    /// Registers that request power-off and reset through `exit`.
    pub fn new(exit: ExitSignal) -> Self {
        AcpiPm {
            exit,
            logged_sleep: false,
        }
    }

    fn write_sleep_control(&mut self, value: u8) {
        if value & SLP_EN == 0 {
            return;
        }
        let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if sleep_type == SLEEP_TYPE_S5 {
            self.exit.request(VmExitReason::PowerOff);
        } else if !self.logged_sleep {
            self.logged_sleep = true;
            log::debug!("guest asked for unsupported ACPI sleep type {sleep_type}; ignored");
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep control is write-only, sleep status has no wake event to report, and the
        // reset register reads as 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (reg, &value) in (offset..).zip(data) {
            match reg {
                SLEEP_CONTROL => self.write_sleep_control(value),
                RESET if value == ACPI_RESET_VALUE => self.exit.request(VmExitReason::Reset),
                // Write-1-to-clear wake status: there is never anything to clear.
                SLEEP_STATUS => {}
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm() -> (AcpiPm, ExitSignal) {
        let exit = ExitSignal::new().unwrap();
        (AcpiPm::new(exit.clone()), exit)
    }

    #[test]
    fn s5_powers_off() {
        let (mut pm, exit) = pm();
        pm.write(SLEEP_CONTROL, &[(SLEEP_TYPE_S5 << 2) | SLP_EN]);
        assert_eq!(exit.reason(), Some(VmExitReason::PowerOff));
        assert_eq!(exit.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn other_sleep_types_and_s5_without_slp_en_do_nothing() {
        let (mut pm, exit) = pm();
        // Linux clears the wake status first.
        pm.write(SLEEP_STATUS, &[0x80]);
        // S5 type without SLP_EN: only the type is set.
        pm.write(SLEEP_CONTROL, &[SLEEP_TYPE_S5 << 2]);
        for typ in (0..8).filter(|&t| t != SLEEP_TYPE_S5) {
            pm.write(SLEEP_CONTROL, &[(typ << 2) | SLP_EN]);
        }
        assert_eq!(exit.reason(), None);
        assert!(exit.eventfd().read().is_err());
        let mut status = [0xff];
        pm.read(SLEEP_STATUS, &mut status);
        assert_eq!(status, [0]);
    }

    #[test]
    fn reset_register() {
        let (mut pm, exit) = pm();
        pm.write(RESET, &[ACPI_RESET_VALUE.wrapping_add(1)]);
        assert_eq!(exit.reason(), None);
        pm.write(RESET, &[ACPI_RESET_VALUE]);
        assert_eq!(exit.reason(), Some(VmExitReason::Reset));
        // A later power-off does not replace the first reason.
        pm.write(SLEEP_CONTROL, &[(SLEEP_TYPE_S5 << 2) | SLP_EN]);
        assert_eq!(exit.reason(), Some(VmExitReason::Reset));
    }

    #[test]
    fn port_layout_matches_the_platform_map() {
        assert_eq!(
            ACPI_SLEEP_CONTROL as u64 + SLEEP_STATUS,
            ACPI_SLEEP_STATUS as u64
        );
        assert_eq!(ACPI_SLEEP_CONTROL as u64 + RESET, ACPI_RESET as u64);
        assert_eq!(AcpiPm::PORT_LEN, 3);
    }
}
