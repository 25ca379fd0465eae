//! The controller's device hotplug (see [`crate::hotplug`]): after `InstanceStart`, `PUT` on
//! `/drives`, `/network-interfaces` and `/pmem` hot-plugs a device and `DELETE` hot-unplugs
//! one, with Firecracker's checks and messages. The resources change only once the VMM has
//! done it, so `GET /vm/config` shows the devices the VM has.

use super::ApiController;
use crate::error::ApiError;
use crate::hotplug::{
    PluggedDevice, CANNOT_UNPLUG_ROOT_DEVICE, DEVICE_ID_IN_USE, DEVICE_NOT_FOUND,
    HOTPLUG_ROOT_DRIVE, HOTPLUG_ROOT_PMEM,
};
use crate::resources::VmResources;
use crate::types::{Drive, InstanceState, NetworkInterface, Pmem};

impl ApiController {
    /// Whether a `PUT` of a device is a hot-plug (the VM exists).
    pub(super) fn hotplugs(&self) -> bool {
        self.state != InstanceState::NotStarted
    }

    /// Refuses a hot-plug whose id is configured (`Device ID in use`) or of a root device
    /// (`root_fault`: the fault when it is one), and checks the body as a pre-boot `PUT` would (`set` on a copy of the
    /// resources): the copy is what to record once the VMM has plugged the device.
    fn check_hotplug(
        &self,
        device: &PluggedDevice,
        root_fault: Option<&str>,
        set: impl FnOnce(&mut VmResources) -> Result<(), ApiError>,
    ) -> Result<VmResources, ApiError> {
        self.require_started()?;
        if self.resources.plugged(device).is_some() {
            return Err(ApiError::bad(DEVICE_ID_IN_USE));
        }
        if let Some(fault) = root_fault {
            return Err(ApiError::bad(fault));
        }
        let mut next = self.resources.clone();
        set(&mut next)?;
        Ok(next)
    }

    /// Post-boot `PUT /drives/{id}`: hot-plugs the drive.
    pub(super) fn hotplug_drive(&mut self, d: Drive) -> Result<(), ApiError> {
        let device = PluggedDevice::Drive(d.drive_id.clone());
        let drive = d.clone();
        let root = d.is_root_device.then_some(HOTPLUG_ROOT_DRIVE);
        let next = self.check_hotplug(&device, root, |r| r.set_drive(d))?;
        self.backend.try_call(move |b| b.hotplug_drive(&drive))?;
        self.resources.drives = next.drives;
        Ok(())
    }

    /// Post-boot `PUT /network-interfaces/{id}`: hot-plugs the interface.
    pub(super) fn hotplug_network_interface(
        &mut self,
        n: NetworkInterface,
    ) -> Result<(), ApiError> {
        let device = PluggedDevice::NetworkInterface(n.iface_id.clone());
        let iface = n.clone();
        let next = self.check_hotplug(&device, None, |r| r.set_network_interface(n))?;
        self.backend
            .try_call(move |b| b.hotplug_network_interface(&iface))?;
        self.resources.network_interfaces = next.network_interfaces;
        Ok(())
    }

    /// Post-boot `PUT /pmem/{id}`: hot-plugs the pmem device.
    pub(super) fn hotplug_pmem(&mut self, p: Pmem) -> Result<(), ApiError> {
        let device = PluggedDevice::Pmem(p.id.clone());
        let pmem = p.clone();
        let root = p.root_device.then_some(HOTPLUG_ROOT_PMEM);
        let next = self.check_hotplug(&device, root, |r| r.set_pmem(p))?;
        self.backend.try_call(move |b| b.hotplug_pmem(&pmem))?;
        self.resources.pmem = next.pmem;
        Ok(())
    }

    /// `DELETE /drives|network-interfaces|pmem/{id}` (post-boot): hot-unplugs the device (the
    /// VMM asks the guest to release it), then forgets it.
    pub fn unplug_device(&mut self, device: PluggedDevice) -> Result<(), ApiError> {
        self.require_started()?;
        match self.resources.plugged(&device) {
            None => return Err(ApiError::bad(DEVICE_NOT_FOUND)),
            Some(true) => return Err(ApiError::bad(CANNOT_UNPLUG_ROOT_DEVICE)),
            Some(false) => {}
        }
        let d = device.clone();
        self.backend.try_call(move |b| b.unplug(&d))?;
        self.resources.remove_device(&device);
        Ok(())
    }
}
