//! The PCI host of a VM: bus 0 behind the configuration ports and ECAM, the BAR allocator,
//! the MSI routes, and BARs that move. Vessel places every BAR itself, but a firmware
//! (SeaBIOS, OVMF) reassigns them all and a kernel may too: [`PciHost`] follows each move,
//! serving the BAR at its new address (a [`BarMap`] behind the MMIO bus) and moving the
//! queue-notify ioeventfds inside it.
//!
//! Booted through firmware, the host bridge is an i440FX, the identity SeaBIOS and OVMF
//! recognise; otherwise it is Vessel's own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vessel_devices::Bus;
use vessel_memory::{addr, ports};
use vessel_pci::{
    BarAllocator, BarMap, BarReprogram, HostBridge, PciBus, PciConfigIo, PciConfigMmio, PciDevice,
};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{KvmContext, VmmError};
use crate::msi::MsiRoutes;

/// The queue-notify ioeventfds inside one BAR, by offset from the BAR's base.
struct Kicks {
    bar: u8,
    fds: Vec<(EventFd, u64)>,
}

/// Which host bridge the bus has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bridge {
    /// Vessel's own (8086:0d57), for guests booted without firmware.
    Vessel,
    /// An i440FX (8086:1237), for SeaBIOS.
    I440fx,
    /// An i440FX with the PIIX3 ISA bridge and PIIX4 power management in slot 1, QEMU's
    /// `pc` machine, for OVMF (which finds its consoles under the ISA bridge and its timer
    /// through the PM function).
    I440fxPiix,
}

impl Bridge {
    /// Whether a firmware boots the guest (which then places the BARs).
    pub fn firmware(self) -> bool {
        self != Bridge::Vessel
    }
}

/// The PCI bus, created with the first PCI device.
pub(crate) struct PciHost {
    pub(crate) bus: Arc<Mutex<PciBus>>,
    pub(crate) bars: BarAllocator,
    pub(crate) routes: Arc<MsiRoutes>,
    map: Arc<BarMap>,
    kicks: Arc<Mutex<HashMap<u8, Kicks>>>,
    vm: Arc<VmFd>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn setup_err<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl FnOnce(E) -> VmmError {
    move |e| VmmError::Device(crate::device_manager::DeviceError::setup(what, e))
}

impl PciHost {
    /// Puts the configuration ports and the ECAM window on the buses, and the BAR map behind
    /// the MMIO bus.
    pub(crate) fn new(
        vm: Arc<VmFd>,
        bridge: Bridge,
        io_bus: &mut Bus,
        mmio_bus: &mut Bus,
    ) -> Result<PciHost, VmmError> {
        let kind = bridge;
        let bridge = match bridge {
            Bridge::Vessel => HostBridge::new(),
            Bridge::I440fx | Bridge::I440fxPiix => HostBridge::i440fx(),
        };
        let mut pci = PciBus::with_host_bridge(bridge);
        if kind == Bridge::I440fxPiix {
            use vessel_pci::piix::{Piix3Isa, Piix4Pm, PIIX4_PM_FUNCTION, PIIX_SLOT};
            pci.add_device_at(PIIX_SLOT, Arc::new(Mutex::new(Piix3Isa::new())))
                .map_err(setup_err("the PIIX3 ISA bridge"))?;
            pci.add_function(
                PIIX_SLOT,
                PIIX4_PM_FUNCTION,
                Arc::new(Mutex::new(Piix4Pm::new(ports::ACPI_PM1_EVT))),
            )
            .map_err(setup_err("the PIIX4 power management function"))?;
        }
        let bus = Arc::new(Mutex::new(pci));
        let map = Arc::new(BarMap::new());
        let kicks: Arc<Mutex<HashMap<u8, Kicks>>> = Arc::default();
        {
            let (map, kicks, vm) = (map.clone(), kicks.clone(), vm.clone());
            lock(&bus).set_reprogram_handler(move |r| follow(&vm, &map, &kicks, r));
        }
        io_bus
            .insert(
                Arc::new(Mutex::new(PciConfigIo::new(bus.clone()))),
                u64::from(ports::PCI_CONFIG_ADDRESS),
                ports::PCI_CONFIG_LEN,
            )
            .map_err(setup_err("PCI config ports"))?;
        mmio_bus
            .insert(
                Arc::new(Mutex::new(PciConfigMmio::new(bus.clone()))),
                addr::PCI_ECAM_START,
                addr::PCI_ECAM_SIZE,
            )
            .map_err(setup_err("PCI ECAM"))?;
        mmio_bus.set_fallback(map.clone());
        let bars = BarAllocator::new(
            (
                addr::PCI_MMIO32_START,
                addr::PCI_MMIO32_END - addr::PCI_MMIO32_START,
            ),
            None,
        )
        .map_err(setup_err("PCI BAR window"))?;
        Ok(PciHost {
            bus,
            bars,
            routes: Arc::new(MsiRoutes::new(vm.clone())),
            map,
            kicks,
            vm,
        })
    }

    /// Serves BAR `bar` of the function in `slot` at `base..base + len`, with the queue
    /// notifications `kicks` (each at its guest-physical address, inside the BAR) as
    /// ioeventfds.
    pub(crate) fn map_bar(
        &self,
        slot: u8,
        bar: u8,
        (base, len): (u64, u64),
        dev: Arc<Mutex<dyn PciDevice>>,
        kicks: &[(&EventFd, u64)],
    ) -> Result<(), VmmError> {
        let mut fds = Vec::with_capacity(kicks.len());
        for (kick, at) in kicks {
            self.vm
                .register_ioevent(kick, &IoEventAddress::Mmio(*at), NoDatamatch)
                .kvm("KVM_IOEVENTFD")?;
            let fd = kick.try_clone().map_err(|source| VmmError::EventFd {
                what: "a queue notification".into(),
                source,
            })?;
            fds.push((fd, at - base));
        }
        lock(&self.kicks).insert(slot, Kicks { bar, fds });
        self.map.insert(slot, bar, base, len, dev);
        Ok(())
    }

    /// Takes the function in `slot` off the bus: its BARs stop answering, its queue
    /// notifications stop being ioeventfds. Returns the function.
    pub(crate) fn unplug(&self, slot: u8) -> Option<Arc<Mutex<dyn PciDevice>>> {
        let dev = lock(&self.bus).remove_device(slot);
        let bars = self.map.remove(slot);
        let kicks = lock(&self.kicks).remove(&slot);
        let base = kicks
            .as_ref()
            .and_then(|k| bars.iter().find(|(b, _)| *b == k.bar))
            .map(|(_, at)| *at);
        if let (Some(k), Some(base)) = (kicks, base) {
            for (fd, offset) in &k.fds {
                let at = IoEventAddress::Mmio(base.wrapping_add(*offset));
                if let Err(e) = self.vm.unregister_ioevent(fd, &at, NoDatamatch) {
                    log::debug!("PCI 00:{slot:02x}.0: cannot remove a queue notification: {e}");
                }
            }
        }
        dev
    }

    /// After a restore: serves every BAR where the restored configuration space says it is
    /// (a firmware-booted guest's BARs are not where Vessel first put them).
    pub(crate) fn follow_restored(&self) {
        let bus = lock(&self.bus);
        for slot in 1..vessel_pci::bus::NUM_SLOTS as u8 {
            let Some(dev) = bus.device(slot) else {
                continue;
            };
            let bars = lock(&dev).bars();
            for b in bars {
                if let Some(old) = self.map.base(slot, b.index).filter(|&o| o != b.base) {
                    let r = BarReprogram {
                        slot,
                        bar: b.index,
                        old_base: old,
                        new_base: b.base,
                        len: b.spec.size,
                    };
                    follow(&self.vm, &self.map, &self.kicks, &r);
                }
            }
        }
    }
}

/// Follows one move: the BAR answers at its new base, and the ioeventfds inside it move
/// with it. A failure to move an ioeventfd (a guest may put a BAR over another's
/// notifications) leaves that queue's notifications to the device's notify register
/// through the BAR (slower, not lost); it is logged at debug level, as a guest can repeat it
/// at will.
fn follow(vm: &VmFd, map: &BarMap, kicks: &Mutex<HashMap<u8, Kicks>>, r: &BarReprogram) {
    if !map.moved(r) {
        return;
    }
    log::debug!(
        "PCI 00:{:02x}.0 BAR {} moved from {:#x} to {:#x}",
        r.slot,
        r.bar,
        r.old_base,
        r.new_base
    );
    let kicks = lock(kicks);
    let Some(k) = kicks.get(&r.slot).filter(|k| k.bar == r.bar) else {
        return;
    };
    for (fd, offset) in &k.fds {
        let old = IoEventAddress::Mmio(r.old_base.wrapping_add(*offset));
        let new = IoEventAddress::Mmio(r.new_base.wrapping_add(*offset));
        if let Err(e) = vm.unregister_ioevent(fd, &old, NoDatamatch) {
            log::debug!("cannot remove a queue notification at its old address: {e}");
        }
        if let Err(e) = vm.register_ioevent(fd, &new, NoDatamatch) {
            log::debug!(
                "cannot move a queue notification of PCI 00:{:02x}.0 to {:#x}: {e}",
                r.slot,
                r.new_base.wrapping_add(*offset)
            );
        }
    }
}
