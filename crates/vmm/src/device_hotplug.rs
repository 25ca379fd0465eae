//! Devices plugged into and out of a running VM's PCI bus (a child of `device_manager`).
//!
//! A hot-plugged device is built like a configured one and placed where a VM built from the
//! new configuration would have it (after the last device of its list), so that a snapshot
//! of the VM restores into the same devices in the same slots. The guest is told through
//! ACPI ([`crate::pci_hotplug`]). An unplug asks the guest to release the device and removes
//! it only once the guest has ejected it, or at once when no driver holds it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vessel_virtio::pci::BAR0_SIZE;
use vessel_virtio_devices::block::BlockHandle;
use vessel_virtio_devices::net::NetHandle;
use vessel_virtio_devices::pmem::PmemHandle;

use super::{lock, DeviceError, Placed, VirtioManager};
use crate::device_config::{DiskConfig, NetConfig, PmemConfig, Transport};
use crate::device_factory::{DiskHandles, Role};
use crate::error::VmmError;
use crate::pci_hotplug::HotplugController;

/// A device to plug in (its transport is PCI whatever the configuration says).
#[derive(Debug, Clone)]
pub enum Pluggable {
    Disk(DiskConfig),
    Net(NetConfig),
    Pmem(PmemConfig),
}

/// What a plugged-in device gives its user.
pub enum Plugged {
    Disk(DiskHandles),
    Net(NetHandle),
    Pmem(PmemHandle),
}

/// A device to unplug, by the handle it was given.
#[derive(Clone, Copy)]
pub enum PluggedRef<'a> {
    Disk(&'a BlockHandle),
    Net(&'a NetHandle),
    Pmem(&'a PmemHandle),
}

/// Why a device could not be plugged in or out.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    #[error("PCI is not enabled")]
    NoPci,
    #[error("Device not found")]
    NotFound,
    #[error("the device is not on the PCI bus (only PCI devices can be unplugged)")]
    NotPci,
    #[error("the guest has not released the device within {0:?} (nothing was removed; is it in use, or has the guest no ACPI PCI hotplug?)")]
    NotReleased(Duration),
    #[error("the VM is paused: the guest cannot release the device (resume it first)")]
    Paused,
    #[error("the VM is not running")]
    Ended,
    #[error("cannot switch the disk to another file")]
    DiskFile(#[source] vessel_virtio_devices::block::BlockError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

impl From<DeviceError> for HotplugError {
    fn from(e: DeviceError) -> Self {
        HotplugError::Vmm(VmmError::Device(e))
    }
}

/// A limiter's configuration, `None` when it limits nothing (as configurations say it).
fn limits(l: &vessel_ratelimit::RateLimiter) -> Option<vessel_ratelimit::RateLimiterConfig> {
    let c = l.config();
    (c.bandwidth.is_some() || c.ops.is_some()).then_some(c)
}

/// The first step of an unplug: what to wait for.
pub(crate) enum Unplugging {
    /// The device was not in use: it is gone.
    Done,
    /// The guest was asked to eject this slot.
    Requested(u8, Arc<HotplugController>),
}

impl VirtioManager {
    fn controller(&self) -> Result<Arc<HotplugController>, HotplugError> {
        self.hotplug.clone().ok_or(HotplugError::NoPci)
    }

    /// Where a new device of `role` goes: after the last one of its list.
    fn position_for(&self, role: Role) -> usize {
        self.devices.iter().take_while(|d| d.role <= role).count()
    }

    /// The position of the `index`th device of list `role`.
    fn position_of(&self, role: Role, index: usize) -> Option<usize> {
        self.devices
            .iter()
            .enumerate()
            .filter(|(_, d)| d.role == role)
            .nth(index)
            .map(|(i, _)| i)
    }

    /// Builds `what`, puts it on the PCI bus and tells the guest; returns its slot.
    pub(crate) fn plug(&mut self, what: Pluggable) -> Result<(u8, Plugged), HotplugError> {
        let hotplug = self.controller()?;
        self.remove_ejected();
        let (slot, plugged) = match what {
            Pluggable::Disk(mut d) => {
                d.transport = Transport::Pci;
                let (dev, h) = crate::device_factory::disk(&d)?;
                let at = self.position_for(Role::Disk);
                let slot = self.add_pci(dev.device, Role::Disk, None, at)?;
                self.handles.disks.push(h.stats.clone());
                self.handles.blocks.push(h.control.clone());
                self.configs.disks.push(d);
                (slot, Plugged::Disk(h))
            }
            Pluggable::Net(mut n) => {
                n.transport = Transport::Pci;
                let (dev, h) = crate::device_factory::net(&n)?;
                let at = self.position_for(Role::Net);
                let slot = self.add_pci(dev.device, Role::Net, None, at)?;
                self.handles.nets.push(h.clone());
                self.configs.nets.push(n);
                (slot, Plugged::Net(h))
            }
            Pluggable::Pmem(p) => self.plug_pmem(p)?,
        };
        hotplug.forget(slot);
        hotplug.announce(&self.vm, slot)?;
        log::info!("{}", self.placed.last().map_or("", String::as_str));
        Ok((slot, plugged))
    }

    /// A pmem device: its region placed after the others and given a KVM slot, then the
    /// device on the bus. A read-only region's stray writes are dropped as unhandled MMIO.
    fn plug_pmem(&mut self, mut p: PmemConfig) -> Result<(u8, Plugged), HotplugError> {
        p.transport = Transport::Pci;
        p.root = false;
        p.guest_addr = None;
        let mut placer = self.pmem_placer.clone();
        let (dev, h) = crate::device_factory::pmem_device(&p, &mut placer)?;
        let region = dev.pmem_region.ok_or(HotplugError::NotFound)?;
        let index = self.next_pmem_region;
        crate::pmem::register(&self.vm, index, &region)?;
        let at = self.position_for(Role::Pmem);
        let slot = match self.add_pci(dev.device, Role::Pmem, None, at) {
            Ok(slot) => slot,
            Err(e) => {
                let _ = crate::pmem::unregister(&self.vm, index);
                return Err(e.into());
            }
        };
        self.pmem_placer = placer;
        self.next_pmem_region += 1;
        self.pmem_regions.push(index);
        p.guest_addr = Some(region.guest_addr);
        self.placed.push(format!(
            "virtio-pmem region {:#x}..{:#x}",
            region.guest_addr,
            region.guest_addr + region.size
        ));
        self.handles.pmem.push(h.clone());
        self.configs.pmem.push(p);
        Ok((slot, Plugged::Pmem(h)))
    }

    /// Switches `disk` to the file at `path` and records the file in the configuration that
    /// snapshots and migrations carry (a restore opens the file the guest was using).
    pub(crate) fn replace_disk_file(
        &mut self,
        disk: &BlockHandle,
        path: &std::path::Path,
    ) -> Result<u64, HotplugError> {
        let (_, index) = self
            .find(PluggedRef::Disk(disk))
            .ok_or(HotplugError::NotFound)?;
        let sectors = disk
            .replace_backing_file(path)
            .map_err(HotplugError::DiskFile)?;
        self.configs.disks[index].path = path.to_path_buf();
        Ok(sectors)
    }

    /// Records the rate limiters of `target` as they are now (changed through its handle)
    /// in the configuration that snapshots and migrations carry.
    pub(crate) fn record_limiters(&mut self, target: PluggedRef<'_>) -> Result<(), HotplugError> {
        let (_, i) = self.find(target).ok_or(HotplugError::NotFound)?;
        let c = &mut self.configs;
        match target {
            PluggedRef::Disk(h) => c.disks[i].rate_limiter = limits(h.rate_limiter()),
            PluggedRef::Net(h) => {
                c.nets[i].rx_rate_limiter = limits(&h.rx);
                c.nets[i].tx_rate_limiter = limits(&h.tx);
            }
            PluggedRef::Pmem(h) => c.pmem[i].rate_limiter = limits(&h.limiter),
        }
        Ok(())
    }

    /// The list and index of the device `target` names.
    fn find(&self, target: PluggedRef<'_>) -> Option<(Role, usize)> {
        match target {
            PluggedRef::Disk(h) => self
                .handles
                .blocks
                .iter()
                .position(|b| b.rate_limiter().same(h.rate_limiter()))
                .map(|i| (Role::Disk, i)),
            PluggedRef::Net(h) => self
                .handles
                .nets
                .iter()
                .position(|n| n.rx.same(&h.rx))
                .map(|i| (Role::Net, i)),
            PluggedRef::Pmem(h) => self
                .handles
                .pmem
                .iter()
                .position(|p| p.limiter.same(&h.limiter))
                .map(|i| (Role::Pmem, i)),
        }
    }

    /// Starts unplugging `target`: removed at once when no driver holds it, otherwise the
    /// guest is asked to eject it (when it `can_answer`: its vCPUs run).
    pub(crate) fn unplug_begin(
        &mut self,
        target: PluggedRef<'_>,
        can_answer: bool,
    ) -> Result<Unplugging, HotplugError> {
        let hotplug = self.controller()?;
        self.remove_ejected();
        let (role, index) = self.find(target).ok_or(HotplugError::NotFound)?;
        let at = self
            .position_of(role, index)
            .ok_or(HotplugError::NotFound)?;
        let d = &self.devices[at];
        let (Placed::Pci(dev), Some((slot, _))) = (&d.transport, d.pci) else {
            return Err(HotplugError::NotPci);
        };
        if lock(dev).driver_status() == 0 {
            self.remove_slot(slot);
            return Ok(Unplugging::Done);
        }
        if !can_answer {
            return Err(HotplugError::Paused);
        }
        hotplug.request_eject(&self.vm, slot)?;
        Ok(Unplugging::Requested(slot, hotplug))
    }

    /// Removes the device in `slot` (the guest ejected it): off the bus, out of the
    /// configuration and the handles, its workers stopped, its interrupts gone.
    pub(crate) fn remove_slot(&mut self, slot: u8) -> bool {
        let Some(at) = self
            .devices
            .iter()
            .position(|d| d.pci.is_some_and(|(s, _)| s == slot))
        else {
            return false;
        };
        let role = self.devices[at].role;
        let index = self.devices[..at].iter().filter(|d| d.role == role).count();
        let gone = self.devices.remove(at);
        if let Some(host) = &mut self.pci {
            host.unplug(slot);
            if let Some((_, bar0)) = gone.pci {
                let _ = host.bars.free(bar0, BAR0_SIZE);
            }
        }
        if let Placed::Pci(dev) = &gone.transport {
            lock(dev).shut_down();
        }
        if role == Role::Pmem {
            // The slot goes before the device (and its mapping of the file) does.
            let region = self.pmem_regions.remove(index);
            if let Err(e) = crate::pmem::unregister(&self.vm, region) {
                log::warn!("pmem region {region}: {e}");
            }
            self.configs.pmem.remove(index);
            self.handles.pmem.remove(index);
        }
        match role {
            Role::Disk => {
                self.configs.disks.remove(index);
                self.handles.disks.remove(index);
                self.handles.blocks.remove(index);
            }
            Role::Net => {
                self.configs.nets.remove(index);
                self.handles.nets.remove(index);
            }
            _ => {}
        }
        if let Some(h) = &self.hotplug {
            h.forget(slot);
        }
        log::info!("{} unplugged from PCI 00:{slot:02x}.0", gone.name);
        true
    }

    /// Removes what the guest ejected on its own (no unplug asked for it).
    pub(crate) fn remove_ejected(&mut self) {
        let Some(h) = &self.hotplug else { return };
        let slots = h.take_ejected();
        for slot in (1..32u8).filter(|s| slots & (1 << s) != 0) {
            if self.remove_slot(slot) {
                log::info!("the guest ejected PCI 00:{slot:02x}.0");
            }
        }
    }
}

/// Waits for the guest to eject `slot` (without holding the manager), then removes it.
pub(crate) fn finish_unplug(
    virtio: &Mutex<VirtioManager>,
    unplugging: Unplugging,
    timeout: Duration,
) -> Result<(), HotplugError> {
    let Unplugging::Requested(slot, hotplug) = unplugging else {
        return Ok(());
    };
    if !hotplug.wait_ejected(slot, timeout) {
        return Err(HotplugError::NotReleased(timeout));
    }
    lock(virtio).remove_slot(slot);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::new_vm;
    use super::*;
    use crate::device_config::DeviceConfigs;
    use crate::pci_host::Bridge;
    use kvm_ioctls::VmFd;
    use vessel_devices::Bus;
    use vessel_memory::GuestMemoryMmap;
    use vm_memory::GuestAddress;

    fn build(
        vm: &Arc<VmFd>,
        mem: &GuestMemoryMmap,
        c: &DeviceConfigs,
        slots: &[Option<u8>],
    ) -> VirtioManager {
        super::super::create(
            vm,
            mem,
            &mut Bus::new(),
            &mut Bus::new(),
            c,
            Bridge::Vessel,
            (512 << 30, 1 << 46),
            slots,
        )
        .unwrap()
    }

    fn disk(path: &std::path::Path) -> DiskConfig {
        DiskConfig {
            path: path.to_path_buf(),
            format: None,
            read_only: true,
            serial: None,
            transport: Transport::Mmio,
            rate_limiter: None,
        }
    }

    /// A disk switched to another file and new limits: the configuration a snapshot carries
    /// names the new file and the limits; a file that does not open changes nothing.
    #[test]
    fn a_disks_new_file_and_limits_are_recorded() {
        let Some(vm) = new_vm() else { return };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (f, g) = (
            vmm_sys_util::tempfile::TempFile::new().unwrap(),
            vmm_sys_util::tempfile::TempFile::new().unwrap(),
        );
        f.as_file().set_len(1 << 20).unwrap();
        g.as_file().set_len(2 << 20).unwrap();
        let c = DeviceConfigs {
            disks: vec![disk(f.as_path())],
            ..DeviceConfigs::default()
        };
        let mut m = build(&vm, &mem, &c, &[]);
        let h = m.handles.blocks[0].clone();
        assert_eq!(m.replace_disk_file(&h, g.as_path()).unwrap(), 4096);
        assert_eq!(m.configs.disks[0].path, g.as_path());
        assert!(matches!(
            m.replace_disk_file(&h, std::path::Path::new("/nonexistent/disk")),
            Err(HotplugError::DiskFile(_))
        ));
        assert_eq!(m.configs.disks[0].path, g.as_path());
        let ops = vessel_ratelimit::BucketConfig {
            size: 10,
            one_time_burst: 0,
            refill_time_ms: 1000,
        };
        h.rate_limiter().update(
            vessel_ratelimit::BucketUpdate::Keep,
            vessel_ratelimit::BucketUpdate::Set(ops),
        );
        m.record_limiters(PluggedRef::Disk(&h)).unwrap();
        assert_eq!(
            m.configs.disks[0].rate_limiter,
            Some(vessel_ratelimit::RateLimiterConfig {
                bandwidth: None,
                ops: Some(ops)
            })
        );
        h.rate_limiter().update(
            vessel_ratelimit::BucketUpdate::Keep,
            vessel_ratelimit::BucketUpdate::Disable,
        );
        m.record_limiters(PluggedRef::Disk(&h)).unwrap();
        assert_eq!(m.configs.disks[0].rate_limiter, None, "no limit left");
    }

    /// Plugged and unplugged devices leave the slots out of order; the configuration and the
    /// saved slots bring a new VM (a restore's, a migration's) back to the same bus.
    #[test]
    fn plugged_devices_keep_their_slots_in_a_rebuilt_vm() {
        let Some(vm) = new_vm() else { return };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        // No bus without `pci_bus` or a PCI device: hotplug is refused.
        let mut none = build(&vm, &mem, &DeviceConfigs::default(), &[]);
        assert!(matches!(
            none.plug(Pluggable::Disk(disk(f.as_path()))),
            Err(HotplugError::NoPci)
        ));
        let Some(vm) = new_vm() else { return };
        let c = DeviceConfigs {
            rng: Some(Transport::Pci),
            ..DeviceConfigs::default()
        };
        let mut m = build(&vm, &mem, &c, &[]);
        assert!(m.platform().pci_hotplug.is_some());
        let (a, Plugged::Disk(ha)) = m.plug(Pluggable::Disk(disk(f.as_path()))).unwrap() else {
            panic!("a disk");
        };
        let (b, Plugged::Disk(_)) = m.plug(Pluggable::Disk(disk(f.as_path()))).unwrap() else {
            panic!("a disk");
        };
        assert_eq!((a, b), (2, 3), "after the rng in slot 1");
        // Disks come first in a VM built from the configuration; so here.
        let names: Vec<_> = (0..m.devices.len()).map(|i| m.id_at(i)).collect();
        assert_eq!(names, ["virtio-blk-0", "virtio-blk-1", "virtio-rng-2"]);
        assert!(m
            .configs
            .disks
            .iter()
            .all(|d| d.transport == Transport::Pci));
        // No driver holds the first: it goes at once, and with it its config and handles.
        assert!(matches!(
            m.unplug_begin(PluggedRef::Disk(&ha.control), true),
            Ok(Unplugging::Done)
        ));
        assert_eq!(m.configs.disks.len(), 1);
        assert_eq!(m.handles.blocks.len(), 1);
        assert!(lock(&m.pci.as_ref().unwrap().bus).device(2).is_none());
        assert!(matches!(
            m.unplug_begin(PluggedRef::Disk(&ha.control), true),
            Err(HotplugError::NotFound)
        ));
        m.quiesce_all().unwrap();
        let saved = m.save_all().unwrap();
        let slots: Vec<_> = saved.iter().map(|s| s.slot).collect();
        assert_eq!(slots, [Some(3), Some(1)]);

        // Rebuilt from the configuration the VM has now, in the saved slots: restored.
        let Some(vm2) = new_vm() else { return };
        let again = build(&vm2, &mem, &m.configs, &slots);
        again.restore_all(&saved).unwrap();
        assert!(lock(&again.pci.as_ref().unwrap().bus).device(3).is_some());
        // Without the slots (first free ones) the bus differs: refused, saying where.
        let Some(vm3) = new_vm() else { return };
        let packed = build(&vm3, &mem, &m.configs, &[]);
        let e = packed.restore_all(&saved).unwrap_err().to_string();
        assert!(e.contains("PCI slot Some(3)"), "{e}");
    }
}
