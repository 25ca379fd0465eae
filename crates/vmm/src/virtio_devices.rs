//! Turns the configured virtio devices into device models (`vessel-virtio-devices`), with
//! the transport each goes on.

use vessel_virtio::VirtioDevice;

use crate::device_config::{DeviceConfigs, Transport};
use crate::error::VmmError;

/// A device model and where it goes.
pub struct PlannedDevice {
    pub device: Box<dyn VirtioDevice>,
    pub transport: Transport,
}

/// The device models for `configs`, in a stable order (disks, nets, vsock, rng, balloon).
pub fn build(configs: &DeviceConfigs) -> Result<Vec<PlannedDevice>, VmmError> {
    if configs.is_empty() {
        return Ok(Vec::new());
    }
    Err(VmmError::Device(
        "virtio devices are not available in this build yet".into(),
    ))
}
