//! The virtio device manager: builds each configured device, puts it behind its transport
//! (virtio-mmio windows and IO-APIC pins, or a slot on the PCI bus with MSI-X), and wires it
//! to KVM: queue notifications as ioeventfds, interrupts as irqfds (MSI routes for PCI). What it
//! placed is reported to the ACPI tables as [`PlatformDevices`].
//!
//! Snapshots: [`VirtioManager::quiesce_all`], [`VirtioManager::save_all`],
//! [`VirtioManager::resume_all`] and [`VirtioManager::restore_all`] bring every device to a
//! consistent stop, save it as a [`VirtioDeviceState`], and start it again (in place, or in
//! devices rebuilt from the same configuration in a new process).

use std::sync::{Arc, Mutex, PoisonError};

use kvm_ioctls::{IoEventAddress, VmFd};
use vessel_boot::{MmioDeviceInfo, PlatformDevices};
use vessel_devices::Bus;
use vessel_memory::{addr, ports, GuestMemoryMmap};
use vessel_pci::{BarKind, BarSpec};
use vessel_virtio::mmio::{MmioTransport, NOTIFY_OFFSET};
use vessel_virtio::pci::{VirtioPciDevice, BAR0_SIZE};
use vessel_virtio::{MmioTransportState, VirtioDevice, VirtioPciState};

#[path = "device_hotplug.rs"]
pub(crate) mod hotplug;

use crate::device_config::{DeviceConfigs, Transport};
use crate::device_factory::{DeviceHandles, Role};
use crate::error::{KvmContext, VmmError};
use crate::msi::FunctionMsi;
use crate::pci_host::{Bridge, PciHost};

/// A placed device's transport, kept for snapshots.
enum Placed {
    Mmio(Arc<Mutex<MmioTransport>>),
    Pci(Arc<Mutex<VirtioPciDevice>>),
}

/// A placed device.
struct Managed {
    /// The device's name ("virtio-blk"); its id is `<name>-<position>` ("virtio-blk-0").
    name: &'static str,
    /// Which list of the configuration it comes from.
    role: Role,
    device_type: u32,
    transport: Placed,
    /// Its PCI slot and where its BAR 0 was allocated (PCI devices).
    pci: Option<(u8, u64)>,
}

/// The saved state of one virtio device, tagged with its transport.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "transport", rename_all = "lowercase")]
pub enum VirtioTransportState {
    Mmio(MmioTransportState),
    Pci(VirtioPciState),
}

impl VirtioTransportState {
    fn kind(&self) -> &'static str {
        match self {
            VirtioTransportState::Mmio(_) => "mmio",
            VirtioTransportState::Pci(_) => "pci",
        }
    }
}

/// One device of a snapshot, in the configuration's order.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VirtioDeviceState {
    /// `<name>-<position>` ("virtio-blk-0"), stable for a given configuration.
    pub id: String,
    pub device_type: u32,
    pub state: VirtioTransportState,
    /// The PCI slot of a PCI device (a restored VM puts it in the same one: hot-plugged and
    /// unplugged devices leave the slots out of order). Older state files have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u8>,
}

/// Why a virtio device could not be placed, saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("Could not allocate GSI: The requested resource is not available. {0}: no interrupt line left for another virtio-mmio device (at most {1}); use transport=pci")]
    NoMmioIrq(&'static str, usize),
    #[error("{0}: too many queues")]
    TooManyQueues(&'static str),
    #[error("{0}: no notify address")]
    NoNotifyAddress(&'static str),
    #[error("{what}")]
    Setup {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{id}")]
    State {
        id: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{id}: the device cannot be stopped")]
    Quiesce { id: String },
    #[error("the snapshot's devices differ from the configured ones: {0}")]
    Differ(String),
    #[error("{0}: the VM has no PCI bus")]
    NoPciBus(&'static str),
}

impl DeviceError {
    /// `what` could not be set up because of `source`.
    pub(crate) fn setup(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> DeviceError {
        DeviceError::Setup {
            what: what.into(),
            source: Box::new(source),
        }
    }
}

fn state_err<E: std::error::Error + Send + Sync + 'static>(
    id: &str,
) -> impl FnOnce(E) -> DeviceError + '_ {
    move |e| DeviceError::State {
        id: id.to_string(),
        source: Box::new(e),
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Places virtio devices and records what the firmware tables must say about them.
pub struct VirtioManager {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    platform: PlatformDevices,
    bridge: Bridge,
    pci: Option<PciHost>,
    /// Every placed device, in creation order.
    devices: Vec<Managed>,
    /// One line per device for the log and `--stats`.
    placed: Vec<String>,
    /// Handles on running devices (balloon target, statistics).
    pub handles: DeviceHandles,
    /// The devices the VM has now: the configuration it was built from, with what was
    /// hot-plugged and unplugged since (what a snapshot records).
    pub(crate) configs: DeviceConfigs,
    /// PCI slots to put the devices in, by position (a restore's: the snapshot's slots).
    slot_plan: Vec<Option<u8>>,
    /// ACPI PCI hotplug, for guests booted without firmware that have a PCI bus.
    pub(crate) hotplug: Option<Arc<crate::pci_hotplug::HotplugController>>,
    /// Where the next pmem region goes, and the KVM region index of each pmem device (in
    /// `configs.pmem` order) and of the next one.
    pmem_placer: crate::pmem::Placer,
    pmem_regions: Vec<usize>,
    next_pmem_region: usize,
}

fn device_err<E: std::error::Error + Send + Sync + 'static>(
    what: &str,
) -> impl FnOnce(E) -> VmmError + '_ {
    move |e| VmmError::Device(DeviceError::setup(what, e))
}

impl VirtioManager {
    pub fn new(vm: Arc<VmFd>, mem: GuestMemoryMmap, bridge: Bridge) -> Self {
        VirtioManager {
            vm,
            mem,
            platform: PlatformDevices::default(),
            bridge,
            pci: None,
            devices: Vec::new(),
            placed: Vec::new(),
            handles: DeviceHandles::default(),
            configs: DeviceConfigs::default(),
            slot_plan: Vec::new(),
            hotplug: None,
            pmem_placer: crate::pmem::Placer::new((0, 0)),
            pmem_regions: Vec::new(),
            next_pmem_region: 0,
        }
    }

    /// The id of the device at `position`.
    fn id_at(&self, position: usize) -> String {
        format!("{}-{position}", self.devices[position].name)
    }
}

impl VirtioManager {
    // ---- snapshots ----
    //
    // Called with the vCPUs parked (outside KVM_RUN and any bus access), so no vCPU holds a
    // device lock; each call locks one device at a time.

    /// Stops every device at a consistent point: no request in flight, every popped chain
    /// completed (see `VirtioDevice::quiesce`). The registers stay. Quiesce before saving
    /// the vCPUs and the interrupt controller (a device completing its last requests raises
    /// interrupts) and before saving guest memory (it writes the used rings).
    pub fn quiesce_all(&self) -> Result<(), DeviceError> {
        for (i, d) in self.devices.iter().enumerate() {
            let r = match &d.transport {
                Placed::Mmio(t) => lock(t).quiesce(),
                Placed::Pci(t) => lock(t).quiesce(),
            };
            r.map_err(state_err(&self.id_at(i)))?;
        }
        Ok(())
    }

    /// The state of every device, in creation order (after [`VirtioManager::quiesce_all`]).
    pub fn save_all(&self) -> Result<Vec<VirtioDeviceState>, DeviceError> {
        self.devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let id = self.id_at(i);
                let state = match &d.transport {
                    Placed::Mmio(t) => lock(t).save_state().map(VirtioTransportState::Mmio),
                    Placed::Pci(t) => lock(t).save_state().map(VirtioTransportState::Pci),
                }
                .map_err(state_err(&id))?;
                Ok(VirtioDeviceState {
                    id,
                    device_type: d.device_type,
                    state,
                    slot: d.pci.map(|(slot, _)| slot),
                })
            })
            .collect()
    }

    /// Starts every quiesced device again, from where its used rings are (the same path a
    /// restore takes). A device whose rings no longer make sense is marked as needing reset.
    pub fn resume_all(&self) {
        for d in &self.devices {
            match &d.transport {
                Placed::Mmio(t) => lock(t).resume(),
                Placed::Pci(t) => lock(t).resume(),
            }
        }
    }

    /// What differs between `states` and the devices placed here.
    fn mismatches(&self, states: &[VirtioDeviceState]) -> Vec<String> {
        let mut out = Vec::new();
        if states.len() != self.devices.len() {
            out.push(format!(
                "the snapshot has {} virtio devices, the configuration {}",
                states.len(),
                self.devices.len()
            ));
        }
        for (i, (s, d)) in states.iter().zip(&self.devices).enumerate() {
            let kind = match d.transport {
                Placed::Mmio(_) => "mmio",
                Placed::Pci(_) => "pci",
            };
            let id = self.id_at(i);
            let slot = d.pci.map(|(slot, _)| slot);
            if s.id != id || s.device_type != d.device_type || s.state.kind() != kind {
                out.push(format!(
                    "device {i}: the snapshot has {} (type {}) on {}, the configuration {id} (type {}) on {kind}",
                    s.id,
                    s.device_type,
                    s.state.kind(),
                    d.device_type
                ));
            } else if s.slot.is_some() && s.slot != slot {
                out.push(format!(
                    "device {i}: {id} is in PCI slot {:?} in the snapshot, {slot:?} here",
                    s.slot
                ));
            }
        }
        out
    }

    /// Puts saved states into the devices of a freshly built VM (same configuration, so
    /// the same devices in the same order on the same transports), after guest memory was
    /// restored. PCI functions get their configuration space and MSI-X table back, which
    /// re-creates their KVM MSI routes; devices the driver had started are activated from
    /// their used rings (a restored vsock device tells the driver its connections are
    /// gone). A snapshot whose devices differ from the configured ones is refused, listing
    /// the differences, before any device is touched.
    pub fn restore_all(&self, states: &[VirtioDeviceState]) -> Result<(), DeviceError> {
        self.restore_states(states)?;
        if let Some(host) = &self.pci {
            host.follow_restored();
        }
        Ok(())
    }

    fn restore_states(&self, states: &[VirtioDeviceState]) -> Result<(), DeviceError> {
        let diff = self.mismatches(states);
        if !diff.is_empty() {
            return Err(DeviceError::Differ(diff.join("; ")));
        }
        for (i, (s, d)) in states.iter().zip(&self.devices).enumerate() {
            let r = match (&s.state, &d.transport) {
                (VirtioTransportState::Mmio(s), Placed::Mmio(t)) => lock(t).restore_state(s),
                (VirtioTransportState::Pci(s), Placed::Pci(t)) => lock(t).restore_state(s),
                _ => Err(vessel_virtio::StateError::Transport("virtio")),
            };
            r.map_err(state_err(&self.id_at(i)))?;
        }
        Ok(())
    }

    /// What the ACPI tables describe.
    /// The guest boots through firmware: full ACPI, and the firmware places the BARs (the
    /// tables then describe its windows: the MMIO gap, and `mmio64` above RAM).
    pub(crate) fn booted_by_firmware(&mut self, mmio64: (u64, u64)) {
        self.platform.firmware = true;
        self.platform.pci_mmio64 = Some(mmio64);
    }

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

    /// Adds `device` (from the configuration's list `role`) on `transport`, last.
    pub fn add(
        &mut self,
        io_bus: &mut Bus,
        mmio_bus: &mut Bus,
        device: Box<dyn VirtioDevice>,
        role: Role,
        transport: Transport,
    ) -> Result<(), VmmError> {
        match transport {
            Transport::Mmio => self.add_mmio(mmio_bus, device, role),
            Transport::Pci => {
                let slot = self.slot_plan.get(self.devices.len()).copied().flatten();
                self.pci_host(io_bus, mmio_bus)?;
                self.add_pci(device, role, slot, self.devices.len())
                    .map(|_| ())
            }
        }
    }

    fn add_mmio(
        &mut self,
        mmio_bus: &mut Bus,
        device: Box<dyn VirtioDevice>,
        role: Role,
    ) -> Result<(), VmmError> {
        let index = self.platform.virtio_mmio.len();
        let name = device.name();
        let irq = *ports::VIRTIO_MMIO_IRQS
            .get(index)
            .ok_or(DeviceError::NoMmioIrq(name, ports::VIRTIO_MMIO_IRQS.len()))?;
        let base = addr::VIRTIO_MMIO_START + index as u64 * addr::VIRTIO_MMIO_WINDOW;
        let irq_evt = crate::legacy::irqfd(&self.vm, irq)?;
        let device_type = device.device_type();
        let transport =
            MmioTransport::new(device, self.mem.clone(), irq_evt).map_err(device_err(name))?;
        for (queue, kick) in transport.queue_kicks().iter().enumerate() {
            self.vm
                .register_ioevent(
                    kick,
                    &IoEventAddress::Mmio(base + NOTIFY_OFFSET),
                    queue as u32,
                )
                .kvm("KVM_IOEVENTFD")?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio_bus
            .insert(transport.clone(), base, addr::VIRTIO_MMIO_WINDOW)
            .map_err(device_err(name))?;
        self.devices.push(Managed {
            name,
            role,
            device_type,
            transport: Placed::Mmio(transport),
            pci: None,
        });
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
            self.pci = Some(PciHost::new(
                self.vm.clone(),
                self.bridge,
                io_bus,
                mmio_bus,
            )?);
            self.platform.pci = true;
        }
        Ok(self.pci.as_mut().expect("just created"))
    }

    /// Puts `device` on the PCI bus (which must exist) in `slot` (the first free one with
    /// `None`), as device number `position`; returns the slot.
    fn add_pci(
        &mut self,
        device: Box<dyn VirtioDevice>,
        role: Role,
        slot: Option<u8>,
        position: usize,
    ) -> Result<u8, VmmError> {
        let name = device.name();
        let device_type = device.device_type();
        let mem = self.mem.clone();
        let host = self.pci.as_mut().ok_or(DeviceError::NoPciBus(name))?;
        let bar0 = host
            .bars
            .allocate(BarSpec {
                size: BAR0_SIZE,
                kind: BarKind::Memory64,
                prefetchable: false,
            })
            .map_err(device_err(name))?;
        let vectors = u16::try_from(device.queue_max_sizes().len() + 1)
            .map_err(|_| DeviceError::TooManyQueues(name))?;
        let msi = Arc::new(FunctionMsi::new(host.routes.clone(), vectors)?);
        let dev = VirtioPciDevice::new(device, mem, msi, bar0).map_err(device_err(name))?;
        let kicks = dev
            .queue_kicks()
            .iter()
            .enumerate()
            .map(|(queue, kick)| {
                let at = dev
                    .notify_address(queue as u16)
                    .ok_or(DeviceError::NoNotifyAddress(name))?;
                Ok((kick.try_clone().map_err(device_err(name))?, at))
            })
            .collect::<Result<Vec<_>, VmmError>>()?;
        let dev = Arc::new(Mutex::new(dev));
        let placed = {
            let mut bus = lock(&host.bus);
            match slot {
                Some(slot) => bus.add_device_at(slot, dev.clone()).map(|()| slot),
                None => bus.add_device(dev.clone()),
            }
        };
        let slot = match placed {
            Ok(slot) => slot,
            Err(e) => {
                let _ = host.bars.free(bar0, BAR0_SIZE);
                return Err(device_err(name)(e));
            }
        };
        let kicks: Vec<_> = kicks.iter().map(|(fd, at)| (fd, *at)).collect();
        host.map_bar(slot, 0, (bar0, BAR0_SIZE), dev.clone(), &kicks)?;
        self.devices.insert(
            position,
            Managed {
                name,
                role,
                device_type,
                transport: Placed::Pci(dev),
                pci: Some((slot, bar0)),
            },
        );
        self.placed.push(format!(
            "{name} on PCI 00:{slot:02x}.0, BAR0 {bar0:#x}, {vectors} MSI-X vectors"
        ));
        Ok(slot)
    }
}

/// Builds every device of `configs` and places it; pmem regions go in `device_memory`, PCI
/// devices in the slots of `slot_plan` (by position; a restore's) or the first free ones.
/// Guests booted without firmware that have a PCI bus get ACPI PCI hotplug.
#[allow(clippy::too_many_arguments)]
pub fn create(
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    io_bus: &mut Bus,
    mmio_bus: &mut Bus,
    configs: &DeviceConfigs,
    bridge: Bridge,
    device_memory: (u64, u64),
    slot_plan: &[Option<u8>],
) -> Result<VirtioManager, VmmError> {
    let mut m = VirtioManager::new(vm.clone(), mem.clone(), bridge);
    m.slot_plan = slot_plan.to_vec();
    // A firmware finds the platform by its host bridge, devices or not.
    if bridge.firmware() || configs.pci_bus {
        m.pci_host(io_bus, mmio_bus)?;
    }
    let mut placer = crate::pmem::Placer::new(device_memory);
    let (devices, handles) = crate::device_factory::build(configs, &mut placer)?;
    m.handles = handles;
    m.configs = configs.clone();
    let mut regions = 0;
    for planned in devices {
        if let Some(r) = &planned.pmem_region {
            if let Some(p) = m.configs.pmem.get_mut(regions) {
                p.guest_addr = Some(r.guest_addr);
            }
            crate::pmem::register(vm, regions, r)?;
            if r.read_only {
                let dev = Arc::new(Mutex::new(crate::pmem::ReadOnlyRegion::new(regions)));
                mmio_bus
                    .insert(dev, r.guest_addr, r.size)
                    .map_err(device_err("a read-only pmem region"))?;
            }
            m.placed.push(format!(
                "virtio-pmem region {:#x}..{:#x}{}",
                r.guest_addr,
                r.guest_addr + r.size,
                if r.read_only { " (read-only)" } else { "" }
            ));
            regions += 1;
        }
        m.add(
            io_bus,
            mmio_bus,
            planned.device,
            planned.role,
            planned.transport,
        )?;
    }
    m.pmem_placer = placer;
    m.pmem_regions = (0..regions).collect();
    m.next_pmem_region = regions;
    if m.platform.pci && bridge == Bridge::Vessel {
        let hotplug = crate::pci_hotplug::HotplugController::new(ports::GED_IRQ);
        io_bus
            .insert(
                hotplug.registers(),
                crate::pci_hotplug::PORT,
                ports::PCI_HOTPLUG_LEN,
            )
            .map_err(device_err("the PCI hotplug registers"))?;
        m.platform.pci_hotplug = Some(hotplug.gsi());
        m.hotplug = Some(hotplug);
        // A restored VM keeps its bus (and its guest's tables), whatever is on it then.
        m.configs.pci_bus = true;
    }
    for line in m.placed() {
        log::info!("{line}");
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_config::BalloonConfig;
    use crate::error::ErrorChain;
    use vessel_pci::MsiMessage;
    use vm_memory::GuestAddress;

    /// A VM with an irqchip, or `None` (and a note) without `/dev/kvm`.
    pub(super) fn new_vm() -> Option<Arc<VmFd>> {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("note: no /dev/kvm; skipped");
            return None;
        };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        Some(Arc::new(vm))
    }

    fn configs(rng: Transport, balloon: Transport) -> DeviceConfigs {
        DeviceConfigs {
            rng: Some(rng),
            balloon: Some(BalloonConfig {
                size_mib: 1,
                transport: balloon,
                ..BalloonConfig::default()
            }),
            ..DeviceConfigs::default()
        }
    }

    fn manager(vm: &Arc<VmFd>, mem: &GuestMemoryMmap, c: &DeviceConfigs) -> VirtioManager {
        create(
            vm,
            mem,
            &mut Bus::new(),
            &mut Bus::new(),
            c,
            Bridge::Vessel,
            (512 << 30, 1 << 46),
            &[],
        )
        .unwrap()
    }

    #[test]
    fn save_and_restore_all_devices_and_msi_routes() {
        let Some(vm) = new_vm() else { return };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let c = configs(Transport::Pci, Transport::Mmio);
        let m = manager(&vm, &mem, &c);
        // The guest programs and enables MSI-X vector 1 of the rng function.
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        };
        let Placed::Pci(rng) = &m.devices[0].transport else {
            panic!("the rng is on PCI");
        };
        {
            let d = lock(rng);
            d.msix()
                .write_table(16, &(msg.address as u32).to_le_bytes());
            d.msix().write_table(24, &msg.data.to_le_bytes());
            d.msix().write_table(28, &0u32.to_le_bytes());
            d.msix()
                .set_message_control(vessel_pci::msix::CONTROL_ENABLE);
        }
        m.quiesce_all().unwrap();
        let saved = m.save_all().unwrap();
        assert_eq!(
            saved.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            vec!["virtio-rng-0", "virtio-balloon-1"]
        );
        m.resume_all();
        let json = serde_json::to_string(&saved).unwrap();
        let saved: Vec<VirtioDeviceState> = serde_json::from_str(&json).unwrap();

        // A new VM built from the same configuration takes it, MSI routes included.
        let Some(vm2) = new_vm() else { return };
        let fresh = manager(&vm2, &mem, &c);
        let routes = fresh.pci.as_ref().unwrap().routes.clone();
        assert!(routes.msi_routes().is_empty());
        fresh.restore_all(&saved).unwrap();
        let r = routes.msi_routes();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].1, msg);
        let Placed::Pci(rng) = &fresh.devices[0].transport else {
            panic!("the rng is on PCI");
        };
        assert!(lock(rng).msix().enabled());

        // Other transports or devices: refused, listing what differs, nothing touched.
        let Some(vm3) = new_vm() else { return };
        let other = manager(&vm3, &mem, &configs(Transport::Mmio, Transport::Mmio));
        let e = other.restore_all(&saved).unwrap_err().to_string();
        assert!(e.contains("virtio-rng-0 (type 4) on pci"), "{e}");
        let e = other.restore_all(&saved[..1]).unwrap_err().to_string();
        assert!(e.contains("1 virtio devices, the configuration 2"), "{e}");
    }

    #[test]
    fn pmem_regions_are_mapped_saved_and_checked_on_restore() {
        let Some(vm) = new_vm() else { return };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let t = vmm_sys_util::tempfile::TempFile::new().unwrap();
        t.as_file().set_len(3 << 20).unwrap();
        let pmem = |transport| crate::device_config::PmemConfig {
            path: t.as_path().to_path_buf(),
            read_only: false,
            root: false,
            transport,
            rate_limiter: None,
            guest_addr: None,
        };
        let c = DeviceConfigs {
            pmem: vec![pmem(Transport::Mmio), pmem(Transport::Pci)],
            ..DeviceConfigs::default()
        };
        let m = manager(&vm, &mem, &c);
        assert_eq!(m.handles.pmem.len(), 2);
        // 3 MiB files: 4 MiB regions, one after the other from 512 GiB.
        assert!(
            m.placed()[0].contains("0x8000000000..0x8000400000"),
            "{:?}",
            m.placed()
        );
        assert!(
            m.placed()[2].contains("0x8000400000..0x8000800000"),
            "{:?}",
            m.placed()
        );
        m.quiesce_all().unwrap();
        let saved = m.save_all().unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        assert!(json.contains("\"start\":549760008192"), "{json}");
        let Some(vm2) = new_vm() else { return };
        manager(&vm2, &mem, &c).restore_all(&saved).unwrap();
        // The file grew: the region would no longer be what the guest mapped.
        t.as_file().set_len(5 << 20).unwrap();
        let Some(vm3) = new_vm() else { return };
        let e = manager(&vm3, &mem, &c).restore_all(&saved).unwrap_err();
        assert!(
            ErrorChain(&e)
                .to_string()
                .contains("did the backing file change size"),
            "{}",
            ErrorChain(&e)
        );
    }
}
