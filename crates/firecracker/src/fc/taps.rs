//! Firecracker opens a network interface's TAP when it is configured (`PUT
//! /network-interfaces/{id}`), so a TAP that cannot be used is refused there, in Firecracker's
//! words, rather than at `InstanceStart`. Vessel opens each TAP once to check it and closes it;
//! the VM opens it again when it starts.

use vessel_api::error::tap_open_fault as tap_fault;
use vessel_api::{ApiError, VmResources};
use vessel_virtio_devices::net::{Tap, TapError};

/// Opens every configured TAP once (single-queue, as Firecracker's): a multi-queue TAP, one
/// another process holds, or one this user may not open is refused now.
pub fn check_taps(resources: &VmResources) -> Result<(), ApiError> {
    for n in &resources.network_interfaces {
        if let Err(e) = Tap::open(&n.host_dev_name, false) {
            let detail = e.to_string();
            return Err(match &e {
                TapError::Permission { source, .. }
                | TapError::Busy { source, .. }
                | TapError::Io { source, .. } => tap_fault(&n.host_dev_name, source, &detail),
                TapError::NoTunDevice | TapError::BadName(_) => tap_fault(
                    &n.host_dev_name,
                    &std::io::Error::from_raw_os_error(libc::EINVAL),
                    &detail,
                ),
            });
        }
    }
    Ok(())
}
