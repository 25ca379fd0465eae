//! The virtio device manager: builds each configured device, puts it behind its transport
//! (virtio-mmio windows and IO-APIC pins, or a slot on the PCI bus with MSI-X), and wires it
//! to KVM: queue notifications as ioeventfds, interrupts as irqfds (MSI routes for PCI). What it
//! placed is reported to the ACPI tables as [`PlatformDevices`].

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vessel_boot::{MmioDeviceInfo, PlatformDevices};
use vessel_devices::Bus;
use vessel_memory::{addr, ports, GuestMemoryMmap};
use vessel_virtio::mmio::{MmioTransport, NOTIFY_OFFSET};
use vessel_virtio::VirtioDevice;
use vmm_sys_util::eventfd::EventFd;

use crate::device_config::{DeviceConfigs, Transport};
use crate::virtio_devices::DeviceHandles;
use crate::error::{KvmContext, VmmError};

/// Places virtio devices and records what the firmware tables must say about them.
pub struct VirtioManager {
    mem: GuestMemoryMmap,
    platform: PlatformDevices,
    /// One line per device for the log and `--stats`.
    placed: Vec<String>,
    /// Handles on running devices (balloon target, statistics).
    pub handles: DeviceHandles,
}

fn device_err(what: &str, e: impl std::fmt::Display) -> VmmError {
    VmmError::Device(format!("{what}: {e}"))
}

impl VirtioManager {
    pub fn new(mem: GuestMemoryMmap) -> Self {
        VirtioManager {
            mem,
            platform: PlatformDevices::default(),
            placed: Vec::new(),
            handles: DeviceHandles::default(),
        }
    }

    /// What the ACPI tables describe.
    pub fn platform(&self) -> &PlatformDevices {
        &self.platform
    }

    /// One line per placed device ("virtio-blk on mmio 0xd0000000 irq 5").
    pub fn placed(&self) -> &[String] {
        &self.placed
    }

    /// Adds `device` on `transport`.
    pub fn add(
        &mut self,
        vm: &VmFd,
        mmio_bus: &mut Bus,
        device: Box<dyn VirtioDevice>,
        transport: Transport,
    ) -> Result<(), VmmError> {
        match transport {
            Transport::Mmio => self.add_mmio(vm, mmio_bus, device),
            Transport::Pci => Err(VmmError::Device(format!(
                "{}: the PCI transport is not available yet; use transport=mmio",
                device.name()
            ))),
        }
    }

    fn add_mmio(
        &mut self,
        vm: &VmFd,
        mmio_bus: &mut Bus,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(), VmmError> {
        let index = self.platform.virtio_mmio.len();
        let name = device.name();
        let irq = *ports::VIRTIO_MMIO_IRQS.get(index).ok_or_else(|| {
            VmmError::Device(format!(
                "{name}: no interrupt line left for another virtio-mmio device (at most {}); use transport=pci",
                ports::VIRTIO_MMIO_IRQS.len()
            ))
        })?;
        let base = addr::VIRTIO_MMIO_START + index as u64 * addr::VIRTIO_MMIO_WINDOW;
        let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| device_err(name, e))?;
        vm.register_irqfd(&irq_evt, irq).kvm("KVM_IRQFD")?;
        let transport = MmioTransport::new(device, self.mem.clone(), irq_evt)
            .map_err(|e| device_err(name, e))?;
        for (queue, kick) in transport.queue_kicks().iter().enumerate() {
            vm.register_ioevent(
                kick,
                &IoEventAddress::Mmio(base + NOTIFY_OFFSET),
                queue as u32,
            )
            .kvm("KVM_IOEVENTFD")?;
        }
        mmio_bus
            .insert(
                Arc::new(Mutex::new(transport)),
                base,
                addr::VIRTIO_MMIO_WINDOW,
            )
            .map_err(|e| device_err(name, e))?;
        self.platform.virtio_mmio.push(MmioDeviceInfo {
            base,
            len: addr::VIRTIO_MMIO_WINDOW,
            irq,
        });
        self.placed
            .push(format!("{name} on virtio-mmio {base:#x} irq {irq}"));
        Ok(())
    }
}

/// Builds every device of `configs` and places it.
pub fn create(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio_bus: &mut Bus,
    configs: &DeviceConfigs,
) -> Result<VirtioManager, VmmError> {
    let mut m = VirtioManager::new(mem.clone());
    let (devices, handles) = crate::virtio_devices::build(configs)?;
    m.handles = handles;
    for planned in devices {
        m.add(vm, mmio_bus, planned.device, planned.transport)?;
    }
    for line in m.placed() {
        log::info!("{line}");
    }
    Ok(m)
}
