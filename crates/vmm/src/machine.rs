//! The [`Machine`]: everything a VM is made of but its vCPU threads, built once by
//! [`crate::builder`] and shared, behind one `Arc`, by the vCPU threads, the controller
//! ([`crate::VmHandle`]), snapshots, migration and the supervisor. Nobody repacks it.
//!
//! Dropping the last `Arc` unmaps guest memory and closes the VM: the vCPU threads hold one
//! each, so the guest never runs on memory or devices that are gone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::VmFd;
use vessel_devices::{Bus, ExitSignal};
use vessel_memory::GuestMemoryMmap;

use crate::config::VmConfig;
use crate::device_manager::VirtioManager;
use crate::legacy::LegacyDevices;
use crate::vcpu::PauseGate;
use crate::vmgenid::VmGenIdState;

/// A VM's memory, buses, devices and shared run-time flags.
pub struct Machine {
    /// The KVM VM (MSI routes, ioeventfds and irqfds live on it).
    pub(crate) vm: Arc<VmFd>,
    pub(crate) mem: GuestMemoryMmap,
    /// Port I/O and MMIO exits go here.
    pub(crate) io_bus: Bus,
    pub(crate) mmio_bus: Bus,
    /// Raised by a device (or the console) when the guest asks to power off or reset.
    pub(crate) exit: ExitSignal,
    pub(crate) legacy: LegacyDevices,
    pub(crate) virtio: Mutex<VirtioManager>,
    /// The configuration the machine was built from (a restored one: the snapshot's, with
    /// its host-side changes).
    pub(crate) config: VmConfig,
    /// The nested-host fallback is on.
    pub(crate) nested: bool,
    /// The interrupt controllers KVM emulates.
    pub(crate) irqchip: crate::kvm_vm::Irqchip,
    /// The firmware's read-only images, mapped below 4 GiB (firmware boots only).
    pub(crate) firmware: Option<crate::firmware::FirmwareRom>,
    /// The VM generation ID device, for guests that have one.
    pub(crate) vmgenid: Option<VmGenIdState>,
    /// vCPUs leave their loop at the next exit once set.
    pub(crate) stop: AtomicBool,
    /// Where vCPUs park while the VM is paused.
    pub(crate) pause: Arc<PauseGate>,
    /// One snapshot (or migration) at a time.
    pub(crate) snapshot_lock: Mutex<()>,
    /// The virtio devices were quiesced by a pause (and are resumed with the vCPUs).
    pub(crate) devices_quiesced: AtomicBool,
}

impl Machine {
    /// The number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.config.cpus as usize
    }

    /// The virtio device manager, locked (one device lock at a time is taken inside).
    pub(crate) fn virtio(&self) -> MutexGuard<'_, VirtioManager> {
        self.virtio.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the VM is ending (or has ended).
    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// A machine around a VM and buses a test made: no virtio devices, the console nowhere.
    #[cfg(test)]
    pub(crate) fn for_test(
        vm: VmFd,
        mem: GuestMemoryMmap,
        mut io_bus: Bus,
        mmio_bus: Bus,
        pause: Arc<PauseGate>,
    ) -> Machine {
        let exit = ExitSignal::new().expect("eventfd");
        let config = VmConfig::default();
        let legacy = LegacyDevices::new(
            &vm,
            &mut io_bus,
            &crate::config::SerialTarget::Null,
            None,
            &exit,
        )
        .expect("legacy devices");
        let vm = Arc::new(vm);
        Machine {
            virtio: Mutex::new(VirtioManager::new(
                vm.clone(),
                mem.clone(),
                crate::pci_host::Bridge::Vessel,
            )),
            firmware: None,
            vm,
            mem,
            io_bus,
            mmio_bus,
            exit,
            legacy,
            config,
            nested: false,
            irqchip: crate::kvm_vm::Irqchip::Pc,
            vmgenid: None,
            stop: AtomicBool::new(false),
            pause,
            snapshot_lock: Mutex::new(()),
            devices_quiesced: AtomicBool::new(false),
        }
    }

    /// The configuration the VM has now: the one it was built from, with the devices
    /// hot-plugged and unplugged since (what snapshots and migrations carry).
    pub fn current_config(&self) -> VmConfig {
        let mut c = self.config.clone();
        c.devices = self.virtio().configs.clone();
        c
    }

    /// Handles the VMM keeps on running devices: for the API and statistics.
    pub fn device_handles(&self) -> crate::device_factory::DeviceHandles {
        self.virtio().handles.clone()
    }
}
