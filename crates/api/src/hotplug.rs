//! Device hotplug in the API, as Firecracker 1.16 has it: after `InstanceStart`, `PUT
//! /drives/{id}`, `PUT /network-interfaces/{id}` and `PUT /pmem/{id}` hot-plug a (virtio-pci)
//! device, and `DELETE` on the same paths hot-unplugs one. This module holds what names a
//! device ([`PluggedDevice`], re-exported as `vessel_api::types::PluggedDevice`), Firecracker's
//! fault messages, and the [`VmResources`] helpers that look devices up and remove them while
//! keeping the resources' invariants; the controller's side is in `controller/hotplug.rs`.

use crate::resources::VmResources;

/// A hot-pluggable device, by kind and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluggedDevice {
    /// A drive (`/drives/{id}`): virtio-block or vhost-user-block.
    Drive(String),
    /// A network interface (`/network-interfaces/{id}`): virtio-net.
    NetworkInterface(String),
    /// A pmem device (`/pmem/{id}`): virtio-pmem.
    Pmem(String),
}

impl PluggedDevice {
    /// The device's id (its path's `{id}`).
    pub fn id(&self) -> &str {
        match self {
            PluggedDevice::Drive(id)
            | PluggedDevice::NetworkInterface(id)
            | PluggedDevice::Pmem(id) => id,
        }
    }
}

/// Firecracker's fault for a hot-plug whose id is taken (`VmmActionError::DeviceIdInUse`).
pub const DEVICE_ID_IN_USE: &str = "Device ID in use";
/// Firecracker's fault for a hot-unplug of an unknown id (`VmmActionError::DeviceNotFound`).
pub const DEVICE_NOT_FOUND: &str = "Device not found";
/// Firecracker's fault for a hot-unplug of the root device
/// (`VmmActionError::CannotUnplugRootDevice`).
pub const CANNOT_UNPLUG_ROOT_DEVICE: &str = "Cannot unplug root device";
/// Firecracker's fault for a hot-plug or hot-unplug without PCI (`VmmActionError::PciNotEnabled`),
/// for a VMM whose devices are not on a PCI bus.
pub const PCI_NOT_ENABLED: &str = "PCI is not enabled";
/// Firecracker's fault for a hot-plugged root drive (`DriveError::RootBlockDeviceAlreadyAdded`).
pub const HOTPLUG_ROOT_DRIVE: &str = "Drive config error: A root block device already exists!";
/// Firecracker's fault for a hot-plugged root pmem device (`PmemConfigError::AddingSecondRootDevice`).
pub const HOTPLUG_ROOT_PMEM: &str = "Pmem config error: Attempt to add pmem as a root device while the root device defined as a block device";

impl VmResources {
    /// Whether `device` is configured: `None` when it is not, else `Some(is the root device)`.
    pub fn plugged(&self, device: &PluggedDevice) -> Option<bool> {
        match device {
            PluggedDevice::Drive(id) => self
                .drives
                .iter()
                .find(|d| &d.drive_id == id)
                .map(|d| d.is_root_device),
            PluggedDevice::NetworkInterface(id) => self
                .network_interfaces
                .iter()
                .any(|n| &n.iface_id == id)
                .then_some(false),
            PluggedDevice::Pmem(id) => self
                .pmem
                .iter()
                .find(|p| &p.id == id)
                .map(|p| p.root_device),
        }
    }

    /// Removes `device` (after the VMM unplugged it); false when it was not configured. The
    /// others keep their order. An interface that forwarded MMDS requests leaves the MMDS
    /// configuration's list, which goes when it is left empty (every interface it names
    /// exists, as `PUT /mmds/config` requires).
    pub fn remove_device(&mut self, device: &PluggedDevice) -> bool {
        let id = device.id();
        let before = self.device_count();
        match device {
            PluggedDevice::Drive(_) => self.drives.retain(|d| d.drive_id != id),
            PluggedDevice::NetworkInterface(_) => {
                self.network_interfaces.retain(|n| n.iface_id != id);
                if let Some(c) = &mut self.mmds_config {
                    c.network_interfaces.retain(|n| n != id);
                    if c.network_interfaces.is_empty() {
                        self.mmds_config = None;
                    }
                }
            }
            PluggedDevice::Pmem(_) => self.pmem.retain(|p| p.id != id),
        }
        self.device_count() != before
    }

    fn device_count(&self) -> usize {
        self.drives.len() + self.network_interfaces.len() + self.pmem.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resources() -> VmResources {
        serde_json::from_value::<crate::FullVmConfig>(json!({
            "drives": [
                {"drive_id": "root", "path_on_host": "/r", "is_root_device": true, "is_read_only": false},
                {"drive_id": "a", "path_on_host": "/a", "is_root_device": false, "is_read_only": false},
                {"drive_id": "b", "path_on_host": "/b", "is_root_device": false, "is_read_only": true}
            ],
            "network-interfaces": [
                {"iface_id": "eth0", "host_dev_name": "tap0"},
                {"iface_id": "eth1", "host_dev_name": "tap1"}
            ],
            "mmds-config": {"network_interfaces": ["eth0", "eth1"], "version": "V2"},
            "pmem": [{"id": "p", "path_on_host": "/p", "root_device": false}]
        }))
        .map(VmResources::recorded)
        .unwrap()
    }

    #[test]
    fn devices_are_found_with_their_root_flag() {
        let r = resources();
        let d = |s: &str| PluggedDevice::Drive(s.into());
        assert_eq!(r.plugged(&d("root")), Some(true));
        assert_eq!(r.plugged(&d("a")), Some(false));
        assert_eq!(r.plugged(&d("eth0")), None, "kinds are separate");
        assert_eq!(
            r.plugged(&PluggedDevice::NetworkInterface("eth1".into())),
            Some(false)
        );
        assert_eq!(r.plugged(&PluggedDevice::Pmem("p".into())), Some(false));
        assert_eq!(r.plugged(&PluggedDevice::Pmem("a".into())), None);
        assert_eq!(PluggedDevice::Pmem("p".into()).id(), "p");
    }

    #[test]
    fn removal_keeps_order_and_the_mmds_configuration_valid() {
        let mut r = resources();
        assert!(r.remove_device(&PluggedDevice::Drive("a".into())));
        assert!(!r.remove_device(&PluggedDevice::Drive("a".into())));
        assert_eq!(
            r.drives
                .iter()
                .map(|d| d.drive_id.as_str())
                .collect::<Vec<_>>(),
            ["root", "b"]
        );
        assert!(r.remove_device(&PluggedDevice::NetworkInterface("eth0".into())));
        assert_eq!(
            r.mmds_config.as_ref().map(|c| c.network_interfaces.clone()),
            Some(vec!["eth1".to_string()])
        );
        assert!(r.remove_device(&PluggedDevice::NetworkInterface("eth1".into())));
        assert!(r.network_interfaces.is_empty());
        assert_eq!(r.mmds_config, None);
        assert!(!r.remove_device(&PluggedDevice::Pmem("q".into())));
        assert!(r.remove_device(&PluggedDevice::Pmem("p".into())));
        assert!(r.pmem.is_empty());
    }
}
