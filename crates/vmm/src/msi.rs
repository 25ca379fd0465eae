//! MSI routes: each MSI-X vector of a PCI device gets a GSI above the IO-APIC pins, an irqfd
//! on it, and a KVM routing entry with the address/data the guest programmed. KVM's routing
//! table is replaced as a whole on every change, so this module keeps the full table: the
//! default PIC/IO-APIC routes plus every MSI route.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vessel_memory::ports::MSI_GSI_START;
use vessel_pci::{MsiController, MsiMessage};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{KvmContext, VmmError};

/// Number of IO-APIC pins of KVM's in-kernel IO-APIC.
const IOAPIC_PINS: u32 = 24;
/// KVM's limit on GSIs (KVM_MAX_IRQ_ROUTES is 4096 on x86).
const MAX_GSI: u32 = 4096;

/// The MSI-X vectors of one PCI function: a GSI and an irqfd each, routed as the guest
/// programs the function's MSI-X table.
pub struct FunctionMsi {
    routes: Arc<MsiRoutes>,
    vectors: Vec<(u32, EventFd)>,
}

impl FunctionMsi {
    /// Allocates `count` vectors.
    pub fn new(routes: Arc<MsiRoutes>, count: u16) -> Result<Self, VmmError> {
        let vectors = (0..count)
            .map(|_| routes.allocate())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(FunctionMsi { routes, vectors })
    }
}

/// An unplugged function's vectors: routes and irqfds go (the GSIs are not reused).
impl Drop for FunctionMsi {
    fn drop(&mut self) {
        for (gsi, evt) in &self.vectors {
            if let Err(e) = self.routes.set(*gsi, None) {
                log::debug!("MSI route of GSI {gsi}: {e}");
            }
            if let Err(e) = self.routes.vm.unregister_irqfd(evt, *gsi) {
                log::debug!("irqfd of GSI {gsi}: {e}");
            }
        }
    }
}

impl MsiController for FunctionMsi {
    fn update(&self, vector: u16, msg: Option<MsiMessage>) {
        if let Some((gsi, _)) = self.vectors.get(usize::from(vector)) {
            if let Err(e) = self.routes.set(*gsi, msg) {
                log::warn!("MSI-X vector {vector}: {e}");
            }
        }
    }

    fn trigger(&self, vector: u16, _msg: MsiMessage) -> io::Result<()> {
        match self.vectors.get(usize::from(vector)) {
            Some((_, evt)) => evt.write(1),
            None => Ok(()),
        }
    }
}

struct Table {
    next_gsi: u32,
    /// Programmed MSI routes by GSI; a masked or unprogrammed vector has none.
    msi: Vec<(u32, MsiMessage)>,
}

/// The VM's interrupt routing table.
pub struct MsiRoutes {
    vm: Arc<VmFd>,
    table: Mutex<Table>,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_entry(gsi: u32, m: &MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = m.address as u32;
    e.u.msi.address_hi = (m.address >> 32) as u32;
    e.u.msi.data = m.data;
    e
}

/// The routes KVM sets up by itself for the in-kernel PIC and IO-APIC: replacing the table
/// must keep them or the legacy devices go silent.
fn default_entries() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..16 {
        let chip = if gsi < 8 {
            KVM_IRQCHIP_PIC_MASTER
        } else {
            KVM_IRQCHIP_PIC_SLAVE
        };
        v.push(irqchip_entry(gsi, chip, gsi % 8));
    }
    for gsi in 0..IOAPIC_PINS {
        v.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    v
}

impl MsiRoutes {
    pub fn new(vm: Arc<VmFd>) -> Self {
        MsiRoutes {
            vm,
            table: Mutex::new(Table {
                next_gsi: MSI_GSI_START,
                msi: Vec::new(),
            }),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new GSI with an irqfd on it: writing the event delivers the GSI's MSI (once routed).
    pub fn allocate(&self) -> Result<(u32, EventFd), VmmError> {
        let gsi = {
            let mut t = self.table();
            if t.next_gsi >= MAX_GSI {
                return Err(VmmError::OutOfMsiRoutes);
            }
            t.next_gsi += 1;
            t.next_gsi - 1
        };
        Ok((gsi, crate::legacy::irqfd(&self.vm, gsi)?))
    }

    /// The MSI routes in the table: (GSI, message).
    #[cfg(test)]
    pub(crate) fn msi_routes(&self) -> Vec<(u32, MsiMessage)> {
        self.table().msi.clone()
    }

    /// Routes `gsi` to `msg`, or removes its route (`None`: masked or disabled).
    pub fn set(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), VmmError> {
        let mut t = self.table();
        let existing = t.msi.iter().position(|(g, _)| *g == gsi);
        match (existing, msg) {
            (Some(i), Some(m)) if t.msi[i].1 == m => return Ok(()),
            (Some(i), Some(m)) => t.msi[i].1 = m,
            (Some(i), None) => {
                t.msi.remove(i);
            }
            (None, Some(m)) => t.msi.push((gsi, m)),
            (None, None) => return Ok(()),
        }
        let mut entries = default_entries();
        entries.extend(t.msi.iter().map(|(g, m)| msi_entry(*g, m)));
        let routing = KvmIrqRouting::from_entries(&entries).map_err(VmmError::RoutingTable)?;
        self.vm.set_gsi_routing(&routing).kvm("KVM_SET_GSI_ROUTING")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_cover_pic_and_ioapic() {
        let d = default_entries();
        assert_eq!(d.len(), 16 + 24);
        // SAFETY: reading the union member these entries were written with.
        let pins: Vec<(u32, u32, u32)> = d
            .iter()
            .map(|e| unsafe { (e.gsi, e.u.irqchip.irqchip, e.u.irqchip.pin) })
            .collect();
        assert!(pins.contains(&(9, KVM_IRQCHIP_PIC_SLAVE, 1)));
        assert!(pins.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
    }

    #[test]
    fn routes_are_set_in_kvm() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("note: no /dev/kvm; skipped");
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let r = MsiRoutes::new(vm);
        let (g1, _e1) = r.allocate().unwrap();
        let (g2, _e2) = r.allocate().unwrap();
        assert_eq!((g1, g2), (MSI_GSI_START, MSI_GSI_START + 1));
        let m = MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        };
        r.set(g1, Some(m)).unwrap();
        r.set(g2, Some(m)).unwrap();
        assert_eq!(r.table().msi.len(), 2);
        r.set(g1, None).unwrap();
        assert_eq!(r.table().msi, vec![(g2, m)]);
    }
}
