//! ACPI PCI hotplug, the guest's side of it: the controller's registers that the DSDT's
//! `\_SB_.PCI0` reads and writes (see `vessel_boot`'s `PlatformDevices::pci_hotplug`), at
//! [`ports::PCI_HOTPLUG`], and the edge on the generic event device's interrupt that makes
//! the guest read them.
//!
//! - A new device in slot `n`: bit `n` of `PCIU`, an edge; the guest's `PCNT` reads `PCIU`
//!   (which clears it) and sends the slot a device check: Linux's `acpiphp` scans the slot,
//!   assigns the BARs and binds the driver, with no rescan by hand.
//! - An unplug: bit `n` of `PCID`, an edge; the guest's `PCNT` sends the slot an eject
//!   request: `acpiphp` unbinds the driver, removes the function and runs the slot's `_EJ0`,
//!   which writes bit `n` to `B0EJ`. Only then does the VMM remove the device
//!   ([`HotplugController::wait_ejected`]); a guest that never ejects keeps its device.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vessel_devices::BusDevice;
use vessel_memory::ports;

use crate::error::VmmError;

/// Register offsets from [`ports::PCI_HOTPLUG`].
const PCIU: u64 = 0;
const PCID: u64 = 4;
const B0EJ: u64 = 8;

/// The controller's state, shared by its registers (on the port bus, accessed by vCPUs) and
/// the VMM (which plugs and unplugs).
#[derive(Debug)]
pub struct HotplugController {
    /// The generic event device's GSI.
    gsi: u32,
    /// Slots with a new device, not yet read by the guest.
    up: AtomicU32,
    /// Slots whose device the guest is asked to eject, not yet read by the guest.
    down: AtomicU32,
    /// Slots the guest ejected, not yet removed by the VMM.
    ejected: Mutex<u32>,
    ejected_changed: Condvar,
}

/// Slots 1..=31 (slot 0 is the host bridge).
fn bit(slot: u8) -> u32 {
    1u32.checked_shl(u32::from(slot)).unwrap_or(0) & !1
}

impl HotplugController {
    pub fn new(gsi: u32) -> Arc<HotplugController> {
        Arc::new(HotplugController {
            gsi,
            up: AtomicU32::new(0),
            down: AtomicU32::new(0),
            ejected: Mutex::new(0),
            ejected_changed: Condvar::new(),
        })
    }

    /// The generic event device's GSI (what the DSDT names).
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The registers, for the port bus.
    pub fn registers(self: &Arc<Self>) -> Arc<Mutex<HotplugRegisters>> {
        Arc::new(Mutex::new(HotplugRegisters(self.clone())))
    }

    /// Tells the guest that `slot` has a new device.
    pub fn announce(&self, vm: &VmFd, slot: u8) -> Result<(), VmmError> {
        self.up.fetch_or(bit(slot), Ordering::AcqRel);
        crate::legacy::edge(vm, self.gsi)
    }

    /// Asks the guest to release the device in `slot`.
    pub fn request_eject(&self, vm: &VmFd, slot: u8) -> Result<(), VmmError> {
        self.down.fetch_or(bit(slot), Ordering::AcqRel);
        crate::legacy::edge(vm, self.gsi)
    }

    /// Waits up to `timeout` for the guest to eject `slot`; true (and the slot's eject
    /// consumed) once it has.
    pub fn wait_ejected(&self, slot: u8, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut ejected = self.ejected.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if *ejected & bit(slot) != 0 {
                *ejected &= !bit(slot);
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            ejected = self
                .ejected_changed
                .wait_timeout(ejected, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Slots the guest ejected by itself (no unplug asked for them), consumed.
    pub fn take_ejected(&self) -> u32 {
        std::mem::take(&mut *self.ejected.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Forgets a pending eject request for `slot` (its device is gone another way).
    pub fn forget(&self, slot: u8) {
        self.down.fetch_and(!bit(slot), Ordering::AcqRel);
        *self.ejected.lock().unwrap_or_else(PoisonError::into_inner) &= !bit(slot);
    }
}

/// The controller's three 32-bit registers on the port bus. `PCIU` and `PCID` clear when
/// read (the guest's `PCNT` reads each once per event); `B0EJ` reads zero.
pub struct HotplugRegisters(Arc<HotplugController>);

impl BusDevice for HotplugRegisters {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (PCIU, 4) => self.0.up.swap(0, Ordering::AcqRel),
            (PCID, 4) => self.0.down.swap(0, Ordering::AcqRel),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset != B0EJ {
            return;
        }
        let slots = u32::from_le_bytes(bytes) & !1;
        if slots == 0 {
            return;
        }
        log::debug!("PCI hotplug: the guest ejected slots {slots:#x}");
        *self
            .0
            .ejected
            .lock()
            .unwrap_or_else(PoisonError::into_inner) |= slots;
        self.0.ejected_changed.notify_all();
    }
}

/// Where the registers go on the port bus.
pub(crate) const PORT: u64 = ports::PCI_HOTPLUG as u64;

#[cfg(test)]
mod tests {
    use super::*;

    fn read(r: &mut HotplugRegisters, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        r.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn registers_clear_on_read_and_ejects_wake_the_waiter() {
        let c = HotplugController::new(ports::GED_IRQ);
        let mut regs = HotplugRegisters(c.clone());
        c.up.fetch_or(bit(3) | bit(5), Ordering::AcqRel);
        c.down.fetch_or(bit(7), Ordering::AcqRel);
        assert_eq!(read(&mut regs, PCIU), (1 << 3) | (1 << 5));
        assert_eq!(read(&mut regs, PCIU), 0, "cleared by the read");
        assert_eq!(read(&mut regs, PCID), 1 << 7);
        assert_eq!(read(&mut regs, PCID), 0);
        assert_eq!(read(&mut regs, B0EJ), 0);
        // Narrow accesses neither read nor clear anything.
        c.up.fetch_or(bit(2), Ordering::AcqRel);
        let mut b = [0u8; 2];
        regs.read(PCIU, &mut b);
        assert_eq!(b, [0, 0]);
        assert_eq!(read(&mut regs, PCIU), 1 << 2);

        // Nothing ejected yet: the wait times out.
        assert!(!c.wait_ejected(7, Duration::from_millis(10)));
        // The guest's _EJ0 from another thread wakes it; slot 0 (the host bridge) and
        // narrow writes are ignored.
        let waiter = {
            let c = c.clone();
            std::thread::spawn(move || c.wait_ejected(7, Duration::from_secs(10)))
        };
        regs.write(B0EJ, &[1, 0]);
        regs.write(B0EJ, &1u32.to_le_bytes());
        regs.write(B0EJ, &(1u32 << 7 | 1 << 9).to_le_bytes());
        assert!(waiter.join().unwrap());
        // Slot 9 was never asked for: the VMM finds it among the guest's own ejects.
        assert_eq!(c.take_ejected(), 1 << 9);
        assert_eq!(c.take_ejected(), 0);
        // Bits past slot 31 cannot be set.
        assert_eq!(bit(32), 0);
        assert_eq!(bit(0), 0);
    }
}
