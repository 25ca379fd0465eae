//! The virtio device manager: builds each configured device, puts it behind its transport
//! (virtio-mmio windows and IO-APIC pins, or a slot on the PCI bus with MSI-X), and wires it
//! to KVM: queue notifications as ioeventfds, interrupts as irqfds (MSI routes for PCI). What it
//! placed is reported to the ACPI tables as [`PlatformDevices`].

use std::sync::{Arc, Mutex, PoisonError};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vessel_boot::{MmioDeviceInfo, PlatformDevices};
use vessel_devices::Bus;
use vessel_memory::{addr, ports, GuestMemoryMmap};
use vessel_pci::{BarAllocator, BarKind, BarSpec, PciBus, PciConfigIo, PciConfigMmio};
use vessel_virtio::mmio::{MmioTransport, NOTIFY_OFFSET};
use vessel_virtio::pci::{VirtioPciDevice, BAR0_SIZE};
use vessel_virtio::VirtioDevice;

use crate::device_config::{DeviceConfigs, Transport};
use crate::error::{KvmContext, VmmError};
use crate::msi::{FunctionMsi, MsiRoutes};
use crate::virtio_devices::DeviceHandles;

/// The PCI bus, created with the first PCI device.
struct PciHost {
    bus: Arc<Mutex<PciBus>>,
    bars: BarAllocator,
    routes: Arc<MsiRoutes>,
}

/// Places virtio devices and records what the firmware tables must say about them.
pub struct VirtioManager {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    platform: PlatformDevices,
    pci: Option<PciHost>,
    /// One line per device for the log and `--stats`.
    placed: Vec<String>,
    /// Handles on running devices (balloon target, statistics).
    pub handles: DeviceHandles,
}

fn device_err(what: &str, e: impl std::fmt::Display) -> VmmError {
    VmmError::Device(format!("{what}: {e}"))
}

impl VirtioManager {
    pub fn new(vm: Arc<VmFd>, mem: GuestMemoryMmap) -> Self {
        VirtioManager {
            vm,
            mem,
            platform: PlatformDevices::default(),
            pci: None,
            placed: Vec::new(),
            handles: DeviceHandles::default(),
        }
    }

    /// What the ACPI tables describe.
    pub fn platform(&self) -> &PlatformDevices {
        &self.platform
    }

    /// One line per device with what it did, for `--stats`.
    pub fn stats_lines(&self) -> Vec<String> {
        self.handles
            .disks
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let s = s.snapshot();
                format!(
                    "vessel: disk {i}: {} requests in {} worker wake-ups ({:.1} per wake-up), {} interrupts, {} KiB read, {} KiB written",
                    s.requests,
                    s.wakeups,
                    s.requests as f64 / s.wakeups.max(1) as f64,
                    s.interrupts,
                    s.bytes_read / 1024,
                    s.bytes_written / 1024
                )
            })
            .collect()
    }

    /// One line per placed device ("virtio-blk on mmio 0xd0000000 irq 5").
    pub fn placed(&self) -> &[String] {
        &self.placed
    }

    /// Adds `device` on `transport`.
    pub fn add(
        &mut self,
        io_bus: &mut Bus,
        mmio_bus: &mut Bus,
        device: Box<dyn VirtioDevice>,
        transport: Transport,
    ) -> Result<(), VmmError> {
        match transport {
            Transport::Mmio => self.add_mmio(mmio_bus, device),
            Transport::Pci => self.add_pci(io_bus, mmio_bus, device),
        }
    }

    fn add_mmio(
        &mut self,
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
        let irq_evt = crate::devices::irqfd(&self.vm, irq)?;
        let transport = MmioTransport::new(device, self.mem.clone(), irq_evt)
            .map_err(|e| device_err(name, e))?;
        for (queue, kick) in transport.queue_kicks().iter().enumerate() {
            self.vm
                .register_ioevent(
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

    /// The PCI host: created (config ports, ECAM window, BAR allocator) on first use.
    fn pci_host(&mut self, io_bus: &mut Bus, mmio_bus: &mut Bus) -> Result<&mut PciHost, VmmError> {
        if self.pci.is_none() {
            let bus = Arc::new(Mutex::new(PciBus::new()));
            bus.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .set_reprogram_handler(|r| {
                    log::warn!(
                        "the guest moved BAR {} of PCI slot {} from {:#x} to {:#x}; Vessel keeps serving it at {:#x}",
                        r.bar, r.slot, r.old_base, r.new_base, r.old_base
                    )
                });
            io_bus
                .insert(
                    Arc::new(Mutex::new(PciConfigIo::new(bus.clone()))),
                    u64::from(ports::PCI_CONFIG_ADDRESS),
                    ports::PCI_CONFIG_LEN,
                )
                .map_err(|e| device_err("PCI config ports", e))?;
            mmio_bus
                .insert(
                    Arc::new(Mutex::new(PciConfigMmio::new(bus.clone()))),
                    addr::PCI_ECAM_START,
                    addr::PCI_ECAM_SIZE,
                )
                .map_err(|e| device_err("PCI ECAM", e))?;
            let bars = BarAllocator::new(
                (
                    addr::PCI_MMIO32_START,
                    addr::PCI_MMIO32_END - addr::PCI_MMIO32_START,
                ),
                None,
            )
            .map_err(|e| device_err("PCI BAR window", e))?;
            self.platform.pci = true;
            self.pci = Some(PciHost {
                bus,
                bars,
                routes: Arc::new(MsiRoutes::new(self.vm.clone())),
            });
        }
        Ok(self.pci.as_mut().expect("just created"))
    }

    fn add_pci(
        &mut self,
        io_bus: &mut Bus,
        mmio_bus: &mut Bus,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(), VmmError> {
        let name = device.name();
        let mem = self.mem.clone();
        let vm = self.vm.clone();
        let host = self.pci_host(io_bus, mmio_bus)?;
        let bar0 = host
            .bars
            .allocate(BarSpec {
                size: BAR0_SIZE,
                kind: BarKind::Memory64,
                prefetchable: false,
            })
            .map_err(|e| device_err(name, e))?;
        let vectors = u16::try_from(device.queue_max_sizes().len() + 1)
            .map_err(|_| device_err(name, "too many queues"))?;
        let msi = Arc::new(FunctionMsi::new(host.routes.clone(), vectors)?);
        let dev = VirtioPciDevice::new(device, mem, msi, bar0).map_err(|e| device_err(name, e))?;
        for (queue, kick) in dev.queue_kicks().iter().enumerate() {
            let at = dev
                .notify_address(queue as u16)
                .ok_or_else(|| device_err(name, "no notify address"))?;
            vm.register_ioevent(kick, &IoEventAddress::Mmio(at), NoDatamatch)
                .kvm("KVM_IOEVENTFD")?;
        }
        let dev = Arc::new(Mutex::new(dev));
        let slot = host
            .bus
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add_device(dev.clone())
            .map_err(|e| device_err(name, e))?;
        mmio_bus
            .insert(dev, bar0, BAR0_SIZE)
            .map_err(|e| device_err(name, e))?;
        self.placed.push(format!(
            "{name} on PCI 00:{slot:02x}.0, BAR0 {bar0:#x}, {vectors} MSI-X vectors"
        ));
        Ok(())
    }
}

/// Builds every device of `configs` and places it.
pub fn create(
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    io_bus: &mut Bus,
    mmio_bus: &mut Bus,
    configs: &DeviceConfigs,
) -> Result<VirtioManager, VmmError> {
    let mut m = VirtioManager::new(vm.clone(), mem.clone());
    let (devices, handles) = crate::virtio_devices::build(configs)?;
    m.handles = handles;
    for planned in devices {
        m.add(io_bus, mmio_bus, planned.device, planned.transport)?;
    }
    for line in m.placed() {
        log::info!("{line}");
    }
    Ok(m)
}
