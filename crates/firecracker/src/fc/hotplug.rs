//! Devices plugged into and out of a started VM through Firecracker's API (a child of
//! `backend`): a post-boot `PUT /drives/{id}` or `PUT /network-interfaces/{id}` adds a
//! virtio-pci device, as Firecracker 1.16 does with `--enable-pci`, and `DELETE` removes it.
//! Unlike Firecracker, the guest is told (ACPI PCI hotplug), so a Linux guest binds and
//! releases the device by itself, and an unplug waits for the guest to let go.

use std::time::Duration;

use vessel_api::hotplug::{DEVICE_NOT_FOUND, PCI_NOT_ENABLED};
use vessel_api::types::{Drive, NetworkInterface, PluggedDevice, Pmem};
use vessel_api::ApiError;
use vessel_vmm::device_config::Transport;
use vessel_vmm::{ErrorChain, HotplugError, Pluggable, Plugged, PluggedRef};

use super::super::config::{disk_config, net_config};
use super::ApiBackend;

/// How long an unplug waits for the guest to eject the device (within the API's 30 s reply
/// timeout; a guest kernel on an emulating host needs seconds).
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(20);

/// `HotplugError` in Firecracker's words where it has them.
fn hotplug_error(prefix: &str, e: HotplugError) -> ApiError {
    match e {
        HotplugError::NoPci => ApiError::bad(PCI_NOT_ENABLED),
        HotplugError::NotFound => ApiError::bad(DEVICE_NOT_FOUND),
        e => ApiError::bad(format!("{prefix}{}", ErrorChain(&e))),
    }
}

impl ApiBackend {
    /// `PUT /drives/{id}` on a started VM.
    pub(super) fn plug_drive(&mut self, d: &Drive) -> Result<(), ApiError> {
        let vm = self.running()?.clone();
        if d.socket.is_some() {
            return Err(ApiError::bad(
                "Drive config error: a vhost-user-block drive cannot be hot-plugged in Vessel; configure it before InstanceStart.",
            ));
        }
        let disk = disk_config(d, Transport::Pci)?;
        let (slot, plugged) = vm.plug(Pluggable::Disk(disk)).map_err(|e| {
            hotplug_error(
                "Drive config error: Unable to create the virtio block device: ",
                e,
            )
        })?;
        let Plugged::Disk(h) = plugged else {
            return Err(ApiError::Internal(
                "a disk plugged in as another device".into(),
            ));
        };
        self.drives.push((d.drive_id.clone(), h.control));
        if let Some(c) = self.api_config.as_mut() {
            c.drives.push(d.clone());
        }
        log::info!("drive {} hot-plugged into PCI slot {slot}", d.drive_id);
        Ok(())
    }

    /// `PUT /network-interfaces/{id}` on a started VM.
    pub(super) fn plug_network_interface(&mut self, n: &NetworkInterface) -> Result<(), ApiError> {
        let vm = self.running()?.clone();
        let net = net_config(n, None, Transport::Pci)?;
        let (slot, plugged) = vm
            .plug(Pluggable::Net(net))
            .map_err(|e| hotplug_error("Could not create the network device: ", e))?;
        let Plugged::Net(h) = plugged else {
            return Err(ApiError::Internal(
                "a NIC plugged in as another device".into(),
            ));
        };
        self.nets.push((n.iface_id.clone(), h));
        if let Some(c) = self.api_config.as_mut() {
            c.network_interfaces.push(n.clone());
        }
        log::info!(
            "network interface {} hot-plugged into PCI slot {slot}",
            n.iface_id
        );
        Ok(())
    }

    /// `PUT /pmem/{id}` on a started VM.
    pub(super) fn plug_pmem(&mut self, p: &Pmem) -> Result<(), ApiError> {
        let vm = self.running()?.clone();
        let config = super::super::pmem::config(p, Transport::Pci);
        let (slot, plugged) = vm
            .plug(Pluggable::Pmem(config))
            .map_err(|e| hotplug_error("Pmem config error: ", e))?;
        let Plugged::Pmem(h) = plugged else {
            return Err(ApiError::Internal(
                "a pmem device plugged in as another device".into(),
            ));
        };
        self.pmem.push(p.id.clone(), h);
        if let Some(c) = self.api_config.as_mut() {
            c.pmem.push(p.clone());
        }
        log::info!("pmem device {} hot-plugged into PCI slot {slot}", p.id);
        Ok(())
    }

    /// `DELETE /drives/{id}`, `/network-interfaces/{id}` or `/pmem/{id}` on a started VM.
    pub(super) fn unplug_device(&mut self, device: &PluggedDevice) -> Result<(), ApiError> {
        let vm = self.running()?.clone();
        let not_found = || ApiError::bad(DEVICE_NOT_FOUND);
        match device {
            PluggedDevice::Drive(id) => {
                let i = self
                    .drives
                    .iter()
                    .position(|(d, _)| d == id)
                    .ok_or_else(not_found)?;
                vm.unplug(PluggedRef::Disk(&self.drives[i].1), UNPLUG_TIMEOUT)
                    .map_err(|e| hotplug_error("Drive config error: ", e))?;
                self.drives.remove(i);
                if let Some(c) = self.api_config.as_mut() {
                    c.drives.retain(|d| d.drive_id != *id);
                }
            }
            PluggedDevice::NetworkInterface(id) => {
                let i = self
                    .nets
                    .iter()
                    .position(|(n, _)| n == id)
                    .ok_or_else(not_found)?;
                vm.unplug(PluggedRef::Net(&self.nets[i].1), UNPLUG_TIMEOUT)
                    .map_err(|e| hotplug_error("Network interface error: ", e))?;
                self.nets.remove(i);
                if let Some(c) = self.api_config.as_mut() {
                    c.network_interfaces.retain(|n| n.iface_id != *id);
                }
            }
            PluggedDevice::Pmem(id) => {
                let h = self.pmem.handle(id).ok_or_else(not_found)?.clone();
                vm.unplug(PluggedRef::Pmem(&h), UNPLUG_TIMEOUT)
                    .map_err(|e| hotplug_error("Pmem config error: ", e))?;
                self.pmem.remove(id);
                if let Some(c) = self.api_config.as_mut() {
                    c.pmem.retain(|p| p.id != *id);
                }
            }
        }
        log::info!("{} {} unplugged", device_kind(device), device.id());
        Ok(())
    }
}

fn device_kind(d: &PluggedDevice) -> &'static str {
    match d {
        PluggedDevice::Drive(_) => "drive",
        PluggedDevice::NetworkInterface(_) => "network interface",
        PluggedDevice::Pmem(_) => "pmem device",
    }
}
