//! Hotpluggable memory as the Firecracker API sees it: the configuration in the core's terms,
//! and the running virtio-mem device's status and requested size in MiB, with Firecracker's
//! messages.

use vessel_api::types::{MemoryHotplugConfig as ApiConfig, MemoryHotplugStatus};
use vessel_api::ApiError;
use vessel_virtio_devices::mem::MemHandle;
use vessel_vmm::device_config::Transport;
use vessel_vmm::hotplug::MemoryHotplugConfig;

const MIB: u64 = 1 << 20;

/// The core's configuration for the API's, on `transport`.
pub(super) fn config(c: &ApiConfig, transport: Transport) -> MemoryHotplugConfig {
    MemoryHotplugConfig {
        total_size_mib: c.total_size_mib,
        block_size_mib: c.block_size_mib,
        slot_size_mib: c.slot_size_mib,
        transport,
    }
}

/// `GET /hotplug/memory`.
pub(super) fn status(h: &MemHandle) -> MemoryHotplugStatus {
    let s = h.status();
    let g = s.geometry;
    MemoryHotplugStatus {
        total_size_mib: g.region_size / MIB,
        block_size_mib: g.block_size / MIB,
        slot_size_mib: g.slot_size / MIB,
        plugged_size_mib: s.plugged_size / MIB,
        requested_size_mib: s.requested_size / MIB,
    }
}

/// `PATCH /hotplug/memory`.
pub(super) fn update(h: &MemHandle, requested_size_mib: u64) -> Result<(), ApiError> {
    // A size past u64 is past the region too: the device refuses it with its own message.
    let bytes = requested_size_mib.saturating_mul(MIB);
    h.set_requested_size(bytes).map_err(|e| {
        ApiError::bad(format!(
            "Memory hotplug update error: Failed to create memory hotplug device: {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vessel_virtio_devices::mem::{MemGeometry, MemorySlots, VirtioMem};

    struct NoSlots;
    impl MemorySlots for NoSlots {
        fn set_slot(&self, _: usize, _: bool) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn figures_in_mib_and_firecracker_s_messages() {
        let dev = VirtioMem::new(
            MemGeometry {
                addr: 4 << 30,
                region_size: 1024 * MIB,
                block_size: 2 * MIB,
                slot_size: 128 * MIB,
            },
            Arc::new(NoSlots),
        )
        .unwrap();
        let h = dev.handle();
        assert_eq!(
            status(&h),
            MemoryHotplugStatus {
                total_size_mib: 1024,
                block_size_mib: 2,
                slot_size_mib: 128,
                plugged_size_mib: 0,
                requested_size_mib: 0,
            }
        );
        // No driver has set the device up: Firecracker's refusal. (The running device's
        // size refusals are checked through the API in tests/memory_hotplug.rs.)
        assert_eq!(
            update(&h, 512),
            Err(ApiError::bad(
                "Memory hotplug update error: Failed to create memory hotplug device: Device is not active"
            ))
        );
        assert_eq!(status(&h).requested_size_mib, 0, "refusals change nothing");
        let c = config(
            &ApiConfig {
                total_size_mib: 256,
                block_size_mib: 4,
                slot_size_mib: 128,
            },
            Transport::Mmio,
        );
        assert_eq!((c.total_size_mib, c.block_size_mib), (256, 4));
        assert_eq!(c.transport, Transport::Mmio);
    }
}
