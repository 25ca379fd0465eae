//! Memory hotplug (Firecracker 1.16's `/hotplug/memory`): the virtio-mem device's
//! configuration (`--memory-hotplug`, `memory-hotplug` in a config file), where its region
//! goes in the guest physical map, and the KVM memory slots it maps there.
//!
//! The region is placed by [`vessel_memory::DeviceMemoryAllocator`] above RAM, aligned to
//! 1 GiB (a multiple of Linux's 128 MiB memory blocks), and is part of guest memory (so
//! devices reach buffers the guest puts in plugged memory) but not of the e820 map; KVM maps
//! it slot by slot as the driver plugs blocks (slot numbers from [`FIRST_SLOT`]).
//!
//! A full snapshot carries the region (it is part of guest memory, written sparse) and the
//! device's plugged blocks; a restore maps their slots again. Diff snapshots and live
//! migration, which need KVM's dirty log of every slot, are refused (see `crate::snapshot`).

use std::io;
use std::str::FromStr;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Cap, VmFd};
use vessel_memory::vm_memory::{GuestAddress, GuestMemoryBackend};
use vessel_memory::{DeviceMemoryAllocator, GuestLayout, GuestMemoryMmap, DEVICE_MEMORY_ALIGN};
use vessel_virtio_devices::mem::{MemGeometry, MemHandle, MemorySlots, VirtioMem};

use crate::device_config::{DeviceOptionError, Transport};
use crate::error::VmmError;

const MIB: u64 = 1 << 20;
/// Firecracker's default and smallest block size.
pub const DEFAULT_BLOCK_SIZE_MIB: u64 = 2;
/// Firecracker's default and smallest slot size.
pub const DEFAULT_SLOT_SIZE_MIB: u64 = 128;
/// KVM slot of the region's first slot (RAM takes 0 and 1, firmware images 16..).
pub const FIRST_SLOT: u32 = 64;

fn default_block() -> u64 {
    DEFAULT_BLOCK_SIZE_MIB
}

fn default_slot() -> u64 {
    DEFAULT_SLOT_SIZE_MIB
}

/// The hotpluggable memory of a VM: `--memory-hotplug size=MIB[,block=MIB][,slot=MIB]`
/// `[,transport=pci|mmio]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryHotplugConfig {
    /// The most memory that can be plugged, in MiB.
    pub total_size_mib: u64,
    /// The unit the guest plugs, in MiB.
    #[serde(default = "default_block")]
    pub block_size_mib: u64,
    /// The unit the host maps into the guest, in MiB.
    #[serde(default = "default_slot")]
    pub slot_size_mib: u64,
    #[serde(default)]
    pub transport: Transport,
}

/// A hotplug configuration Firecracker would refuse, in its words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HotplugConfigError {
    #[error("Block size must not be lower than {0} MiB")]
    BlockSizeTooSmall(u64),
    #[error("Block size must be a power of 2")]
    BlockSizeNotPowerOfTwo,
    #[error("Slot size must not be lower than {0} MiB")]
    SlotSizeTooSmall(u64),
    #[error("Slot size must be a multiple of block size ({0} MiB)")]
    SlotSizeNotMultipleOfBlockSize(u64),
    #[error("Total size must not be lower than slot size ({0} MiB)")]
    TotalSizeTooSmall(u64),
    #[error("Total size must be a multiple of slot size ({0} MiB)")]
    TotalSizeNotMultipleOfSlotSize(u64),
    /// Vessel's own limit: the region must fit below 64 TiB.
    #[error("Total size must not be larger than {0} MiB")]
    TotalSizeTooLarge(u64),
}

/// The largest region accepted (32 TiB: room above any RAM Vessel takes).
const MAX_TOTAL_MIB: u64 = 32 << 20;

impl MemoryHotplugConfig {
    /// A configuration with Firecracker's defaults.
    pub fn new(total_size_mib: u64) -> Self {
        MemoryHotplugConfig {
            total_size_mib,
            block_size_mib: DEFAULT_BLOCK_SIZE_MIB,
            slot_size_mib: DEFAULT_SLOT_SIZE_MIB,
            transport: Transport::default(),
        }
    }

    /// Firecracker's checks, in its order.
    pub fn validate(&self) -> Result<(), HotplugConfigError> {
        use HotplugConfigError::*;
        if self.block_size_mib < DEFAULT_BLOCK_SIZE_MIB {
            return Err(BlockSizeTooSmall(DEFAULT_BLOCK_SIZE_MIB));
        }
        if !self.block_size_mib.is_power_of_two() {
            return Err(BlockSizeNotPowerOfTwo);
        }
        if self.slot_size_mib < DEFAULT_SLOT_SIZE_MIB {
            return Err(SlotSizeTooSmall(DEFAULT_SLOT_SIZE_MIB));
        }
        if !self.slot_size_mib.is_multiple_of(self.block_size_mib) {
            return Err(SlotSizeNotMultipleOfBlockSize(self.block_size_mib));
        }
        if self.total_size_mib < self.slot_size_mib {
            return Err(TotalSizeTooSmall(self.slot_size_mib));
        }
        if !self.total_size_mib.is_multiple_of(self.slot_size_mib) {
            return Err(TotalSizeNotMultipleOfSlotSize(self.slot_size_mib));
        }
        if self.total_size_mib > MAX_TOTAL_MIB {
            return Err(TotalSizeTooLarge(MAX_TOTAL_MIB));
        }
        Ok(())
    }

    /// The device's geometry at `addr`. Only for a validated configuration.
    fn geometry(&self, addr: u64) -> MemGeometry {
        MemGeometry {
            addr,
            region_size: self.total_size_mib * MIB,
            block_size: self.block_size_mib * MIB,
            slot_size: self.slot_size_mib * MIB,
        }
    }
}

/// Why hotpluggable memory cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    #[error("memory hotplug")]
    Config(#[from] HotplugConfigError),
    #[error("no room for the hotpluggable memory")]
    Place(#[source] vessel_memory::MemoryError),
    #[error("the hotpluggable region {addr:#x} is not in guest memory")]
    NotMapped { addr: u64 },
    #[error("the hotpluggable memory needs {needed} KVM memory slots from {FIRST_SLOT}; KVM has {available}: use a larger slot size")]
    TooManySlots { needed: u64, available: i32 },
    #[error("virtio-mem")]
    Device(#[source] vessel_virtio_devices::mem::BadGeometry),
}

impl From<HotplugError> for VmmError {
    fn from(e: HotplugError) -> Self {
        VmmError::Device(crate::device_manager::DeviceError::setup(
            "--memory-hotplug",
            e,
        ))
    }
}

/// Where `cfg`'s region goes: `(start, size)` from `alloc` (the VM's one allocator of
/// device memory, so that every device-managed range gets its own place).
pub fn place(
    alloc: &mut DeviceMemoryAllocator,
    cfg: &MemoryHotplugConfig,
) -> Result<(u64, u64), HotplugError> {
    cfg.validate()?;
    let size = cfg.total_size_mib * MIB;
    let align = DEVICE_MEMORY_ALIGN.max(cfg.block_size_mib * MIB);
    let addr = alloc.allocate(size, align).map_err(HotplugError::Place)?;
    Ok((addr, size))
}

/// The device-managed memory of a VM above its RAM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Every range `(start, size)`, in allocation order (the same every time for the same
    /// configuration).
    pub ranges: Vec<(u64, u64)>,
    /// The hotpluggable region's place.
    pub hotplug: Option<(u64, u64)>,
}

/// The device-managed memory of `config` above `layout`'s RAM.
pub fn device_memory(
    layout: &GuestLayout,
    config: &crate::config::VmConfig,
) -> Result<DeviceMemory, HotplugError> {
    let mut alloc = DeviceMemoryAllocator::new(layout);
    let mut ranges = Vec::new();
    let hotplug = config
        .devices
        .memory_hotplug
        .as_ref()
        .map(|c| place(&mut alloc, c))
        .transpose()?;
    ranges.extend(hotplug);
    Ok(DeviceMemory { ranges, hotplug })
}

/// Maps the region's slots with KVM. Holds guest memory, so the mapping outlives the slots.
struct KvmSlots {
    vm: Arc<VmFd>,
    _mem: GuestMemoryMmap,
    guest_addr: u64,
    host_addr: u64,
    slot_size: u64,
    slots: usize,
}

impl MemorySlots for KvmSlots {
    fn set_slot(&self, index: usize, present: bool) -> io::Result<()> {
        if index >= self.slots {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("slot {index} of {}", self.slots),
            ));
        }
        let off = index as u64 * self.slot_size;
        let r = kvm_userspace_memory_region {
            // `index < slots`, and `create` checked FIRST_SLOT + slots against KVM's limit.
            slot: FIRST_SLOT + index as u32,
            flags: 0,
            guest_phys_addr: self.guest_addr + off,
            memory_size: if present { self.slot_size } else { 0 },
            userspace_addr: self.host_addr + off,
        };
        // SAFETY: `host_addr + off .. + slot_size` lies in the region's host mapping (slot
        // `index` of the region, checked above), which `_mem` keeps mapped as long as this
        // object, and so as long as the VM can use the slot; the region is not RAM and no
        // other slot covers its guest addresses.
        unsafe { self.vm.set_user_memory_region(r) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

/// The virtio-mem device for `cfg`'s region at `addr` in `mem`, and its handle.
pub fn create_device(
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    cfg: &MemoryHotplugConfig,
    addr: u64,
) -> Result<(VirtioMem, MemHandle), HotplugError> {
    cfg.validate()?;
    let geometry = cfg.geometry(addr);
    let not_mapped = || HotplugError::NotMapped { addr };
    let region = mem.find_region(GuestAddress(addr)).ok_or_else(not_mapped)?;
    use vessel_memory::vm_memory::GuestMemoryRegion;
    if region.start_addr().0 != addr || region.len() != geometry.region_size {
        return Err(not_mapped());
    }
    let host_addr = region.as_ptr() as u64;
    let slots = geometry.region_size / geometry.slot_size;
    let available = vm.check_extension_int(Cap::NrMemslots);
    if u64::from(FIRST_SLOT) + slots > u64::try_from(available).unwrap_or(0) {
        return Err(HotplugError::TooManySlots {
            needed: slots,
            available,
        });
    }
    let kvm = KvmSlots {
        vm: vm.clone(),
        _mem: mem.clone(),
        guest_addr: addr,
        host_addr,
        slot_size: geometry.slot_size,
        slots: slots as usize,
    };
    let dev = VirtioMem::new(geometry, Arc::new(kvm)).map_err(HotplugError::Device)?;
    let handle = dev.handle();
    Ok((dev, handle))
}

impl FromStr for MemoryHotplugConfig {
    type Err = DeviceOptionError;
    fn from_str(s: &str) -> Result<Self, DeviceOptionError> {
        crate::device_config::parse_memory_hotplug(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_checks_and_messages() {
        let c = |total, block, slot| MemoryHotplugConfig {
            total_size_mib: total,
            block_size_mib: block,
            slot_size_mib: slot,
            transport: Transport::Pci,
        };
        assert_eq!(c(1024, 2, 128).validate(), Ok(()));
        for (cfg, msg) in [
            (c(1024, 1, 128), "Block size must not be lower than 2 MiB"),
            (c(1024, 3, 128), "Block size must be a power of 2"),
            (c(1024, 2, 1), "Slot size must not be lower than 128 MiB"),
            (
                c(1024, 4, 130),
                "Slot size must be a multiple of block size (4 MiB)",
            ),
            (
                c(64, 2, 128),
                "Total size must not be lower than slot size (128 MiB)",
            ),
            (
                c(1000, 2, 128),
                "Total size must be a multiple of slot size (128 MiB)",
            ),
            (
                c(64 << 20, 2, 128),
                "Total size must not be larger than 33554432 MiB",
            ),
        ] {
            assert_eq!(cfg.validate().unwrap_err().to_string(), msg);
        }
    }

    #[test]
    fn the_region_goes_above_ram_aligned() {
        let layout = GuestLayout::new(512 * MIB).unwrap();
        let mut config = crate::config::VmConfig::default();
        assert_eq!(
            device_memory(&layout, &config).unwrap(),
            DeviceMemory::default()
        );
        config.devices.memory_hotplug = Some(MemoryHotplugConfig::new(1024));
        let d = device_memory(&layout, &config).unwrap();
        assert_eq!(d.hotplug, Some((4 << 30, 1 << 30)));
        assert_eq!(d.ranges, vec![(4 << 30, 1 << 30)]);
        // A block larger than 1 GiB aligns the region to itself.
        let big = MemoryHotplugConfig {
            block_size_mib: 2048,
            slot_size_mib: 2048,
            ..MemoryHotplugConfig::new(4096)
        };
        // RAM up to 6 GiB + 4 KiB: the next 2 GiB boundary is 8 GiB.
        let big_layout = GuestLayout::new((5 << 30) + 4096).unwrap();
        let mut alloc = DeviceMemoryAllocator::new(&big_layout);
        assert_eq!(place(&mut alloc, &big).unwrap(), (8 << 30, 4 << 30));
        let bad = MemoryHotplugConfig::new(100);
        assert!(matches!(
            place(&mut alloc, &bad),
            Err(HotplugError::Config(_))
        ));
    }

    #[test]
    fn the_device_needs_its_region_in_guest_memory() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipping: no /dev/kvm");
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        let layout = GuestLayout::new(64 * MIB).unwrap();
        let cfg = MemoryHotplugConfig::new(256);
        let at = layout.device_memory_start();
        let ram_only = vessel_memory::create_guest_memory(&layout).unwrap();
        assert!(matches!(
            create_device(&vm, &ram_only, &cfg, at),
            Err(HotplugError::NotMapped { .. })
        ));
        let mem = vessel_memory::create_guest_memory_with(&layout, &[(at, 256 * MIB)]).unwrap();
        let (_dev, handle) = create_device(&vm, &mem, &cfg, at).unwrap();
        let st = handle.status();
        assert_eq!((st.geometry.addr, st.geometry.region_size), (at, 256 * MIB));
        assert_eq!(st.geometry.slot_size, 128 * MIB);
        // Its slots map and unmap in KVM; a slot past the region is refused.
        let slots = KvmSlots {
            vm: vm.clone(),
            _mem: mem.clone(),
            guest_addr: at,
            host_addr: mem.find_region(GuestAddress(at)).unwrap().as_ptr() as u64,
            slot_size: 128 * MIB,
            slots: 2,
        };
        slots.set_slot(1, true).unwrap();
        slots.set_slot(0, true).unwrap();
        slots.set_slot(1, false).unwrap();
        assert_eq!(
            slots.set_slot(2, true).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        // KVM's refusals come back as errors: RAM mapped at 0, a slot over it is refused.
        crate::kvm_vm::register_ram(&vm, &mem, 1, false).unwrap();
        let clash = KvmSlots {
            guest_addr: 0,
            ..slots
        };
        assert!(clash.set_slot(1, true).is_ok(), "128 MiB..256 MiB is free");
        clash.set_slot(1, false).unwrap();
        assert!(clash.set_slot(0, true).is_err(), "0..128 MiB overlaps RAM");
    }
}
