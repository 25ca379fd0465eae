//! The bodies of `/hotplug/memory` (Firecracker 1.16's memory hotplug, a virtio-mem device),
//! re-exported by [`crate::types`].

use serde::{Deserialize, Serialize};

fn default_block_size_mib() -> u64 {
    2
}

fn default_slot_size_mib() -> u64 {
    128
}

/// `PUT /hotplug/memory`, and `memory-hotplug` in the full VM configuration: the
/// hotpluggable memory (a virtio-mem device), all unplugged at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplugConfig {
    /// The most memory that can be plugged, in MiB (a multiple of the slot size).
    pub total_size_mib: u64,
    /// The unit the guest plugs, in MiB (a power of 2, at least 2).
    #[serde(default = "default_block_size_mib")]
    pub block_size_mib: u64,
    /// The unit the host maps into the guest, in MiB (a multiple of the block size, at
    /// least 128).
    #[serde(default = "default_slot_size_mib")]
    pub slot_size_mib: u64,
}

/// `PATCH /hotplug/memory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplugSizeUpdate {
    /// The plugged size the guest is asked to reach, in MiB.
    pub requested_size_mib: u64,
}

/// `GET /hotplug/memory`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplugStatus {
    /// The most memory that can be plugged, in MiB.
    pub total_size_mib: u64,
    /// The unit the guest plugs, in MiB.
    pub block_size_mib: u64,
    /// The unit the host maps into the guest, in MiB.
    pub slot_size_mib: u64,
    /// What the guest has plugged.
    pub plugged_size_mib: u64,
    /// What the host asked for.
    pub requested_size_mib: u64,
}
