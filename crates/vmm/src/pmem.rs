//! Where virtio-pmem regions go in the guest and how KVM maps them: each device's backing
//! file (mapped by the device, see `vessel_virtio_devices::pmem`) gets a 2 MiB-aligned range
//! of the guest layout's device memory, past RAM and every device window and absent from the
//! e820 map, in configuration order, and a KVM memory slot of its own (read-only for a
//! read-only device, never dirty-logged: the contents live in the host file, which snapshots
//! and migration leave where it is). The guest's writes to a read-only region exit to the
//! VMM as MMIO writes: [`ReadOnlyRegion`] drops them and says so once, as Firecracker warns.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use vessel_memory::addr::PMEM_ALIGN;
use vessel_virtio_devices::pmem::PmemRegion;

use crate::error::{KvmContext, VmmError};

/// KVM memory slots of pmem regions: after RAM (0, 1) and the firmware images (16 on).
pub const FIRST_SLOT: u32 = 32;
/// The most pmem devices a VM may have (KVM offers far more slots; this keeps clear of
/// whatever takes slots after them).
pub const MAX_DEVICES: usize = 32;

/// Why a region could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    #[error(
        "no room for a pmem region of {size:#x} bytes at {at:#x} (device memory ends at {end:#x})"
    )]
    NoRoom { size: u64, at: u64, end: u64 },
    #[error("at most {MAX_DEVICES} pmem devices")]
    TooMany,
    #[error(
        "a recorded pmem region at {0:#x} is not in the device memory area or not 2 MiB aligned"
    )]
    Misplaced(u64),
    #[error("its recorded region at {at:#x} overlaps the one before it, now ending at {before:#x}: did the backing file change size?")]
    Overlap { at: u64, before: u64 },
}

/// Hands out consecutive 2 MiB-aligned ranges of `[start, end)`.
#[derive(Debug, Clone)]
pub struct Placer {
    start: u64,
    next: u64,
    end: u64,
    count: usize,
}

impl Placer {
    /// Places regions in `area` (the guest layout's `device_memory()`).
    pub fn new((start, end): (u64, u64)) -> Placer {
        Placer {
            start,
            next: start,
            end,
            count: 0,
        }
    }

    /// The guest-physical address of the next region of `size` bytes (a multiple of 2 MiB).
    pub fn place(&mut self, size: u64) -> Result<u64, PlaceError> {
        self.place_at(None, size)
    }

    /// [`Placer::place`], or at `at` (a recorded place: a restore's) if given; what comes
    /// next goes after the last region.
    pub fn place_at(&mut self, at: Option<u64>, size: u64) -> Result<u64, PlaceError> {
        if self.count == MAX_DEVICES {
            return Err(PlaceError::TooMany);
        }
        let at = match at {
            Some(at) if at % PMEM_ALIGN != 0 || at < self.start => {
                return Err(PlaceError::Misplaced(at))
            }
            Some(at) if at < self.next => {
                return Err(PlaceError::Overlap {
                    at,
                    before: self.next,
                })
            }
            Some(at) => at,
            None => self.next.next_multiple_of(PMEM_ALIGN),
        };
        let no_room = PlaceError::NoRoom {
            size,
            at,
            end: self.end,
        };
        let end = at.checked_add(size).ok_or(no_room.clone())?;
        if end > self.end {
            return Err(no_room);
        }
        self.next = self.next.max(end);
        self.count += 1;
        Ok(at)
    }
}

/// The MMIO side of a read-only region: KVM serves its reads from the file's pages; writes
/// exit here, are dropped, and the first one is logged.
pub(crate) struct ReadOnlyRegion {
    index: usize,
    writes: u64,
}

impl ReadOnlyRegion {
    /// The region of pmem device `index` (configuration order).
    pub(crate) fn new(index: usize) -> Self {
        ReadOnlyRegion { index, writes: 0 }
    }
}

impl vessel_devices::BusDevice for ReadOnlyRegion {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // KVM reads the slot itself; an access reaching here has no memory behind it.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if self.writes == 0 {
            log::warn!(
                "virtio-pmem: the guest wrote {} bytes at offset {offset:#x} of read-only pmem device {}; its writes are dropped",
                data.len(),
                self.index
            );
        }
        self.writes += 1;
    }
}

/// Takes region `index`'s slot out of the VM (an unplugged device, before its mapping goes).
pub(crate) fn unregister(vm: &VmFd, index: usize) -> Result<(), VmmError> {
    let region = kvm_userspace_memory_region {
        slot: slot(index),
        ..Default::default()
    };
    // SAFETY: a zero-sized region deletes the slot; no memory is handed to KVM.
    unsafe { vm.set_user_memory_region(region) }.kvm("KVM_SET_USER_MEMORY_REGION")
}

fn slot(index: usize) -> u32 {
    FIRST_SLOT + u32::try_from(index).unwrap_or(u32::MAX - FIRST_SLOT)
}

/// Registers region `index` (the `index`th placed in this VM) with KVM.
pub(crate) fn register(vm: &VmFd, index: usize, r: &PmemRegion) -> Result<(), VmmError> {
    let slot = slot(index);
    let region = kvm_userspace_memory_region {
        slot,
        flags: if r.read_only { KVM_MEM_READONLY } else { 0 },
        guest_phys_addr: r.guest_addr,
        memory_size: r.size,
        userspace_addr: r.host_addr,
    };
    // SAFETY: the range is the device's live mapping of `size` bytes, which the device (kept
    // by the machine until every vCPU thread has ended) owns; the guest range was placed in
    // the layout's device memory, which overlaps no other slot.
    unsafe { vm.set_user_memory_region(region) }.kvm("KVM_SET_USER_MEMORY_REGION")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn regions_are_aligned_consecutive_and_bounded() {
        let mut p = Placer::new((512 * GIB, 512 * GIB + 10 * MIB));
        assert_eq!(p.place(2 * MIB), Ok(512 * GIB));
        assert_eq!(p.place(4 * MIB), Ok(512 * GIB + 2 * MIB));
        assert_eq!(
            p.place(6 * MIB),
            Err(PlaceError::NoRoom {
                size: 6 * MIB,
                at: 512 * GIB + 6 * MIB,
                end: 512 * GIB + 10 * MIB
            })
        );
        assert_eq!(p.place(4 * MIB), Ok(512 * GIB + 6 * MIB));
        let mut p = Placer::new((0, u64::MAX));
        for _ in 0..MAX_DEVICES {
            p.place(2 * MIB).unwrap();
        }
        assert_eq!(p.place(2 * MIB), Err(PlaceError::TooMany));
        let mut p = Placer::new((u64::MAX - 3 * MIB, u64::MAX));
        assert!(p.place(2 * MIB).is_err(), "no overflow");
    }

    #[test]
    fn recorded_places_are_kept_and_what_follows_goes_after_them() {
        let mut p = Placer::new((512 * GIB, 513 * GIB));
        // A restore: the second device sat after a gap an unplugged one left.
        assert_eq!(p.place_at(Some(512 * GIB), 2 * MIB), Ok(512 * GIB));
        assert_eq!(
            p.place_at(Some(512 * GIB + 6 * MIB), 2 * MIB),
            Ok(512 * GIB + 6 * MIB)
        );
        // A new one goes after the last, not into the gap.
        assert_eq!(p.place(2 * MIB), Ok(512 * GIB + 8 * MIB));
        // A recorded place outside the area, unaligned, or running past its end: refused.
        for bad in [GIB, 512 * GIB + 1] {
            assert_eq!(
                p.place_at(Some(bad), 2 * MIB),
                Err(PlaceError::Misplaced(bad))
            );
        }
        assert!(matches!(
            p.place_at(Some(513 * GIB - 2 * MIB), 4 * MIB),
            Err(PlaceError::NoRoom { .. })
        ));
        // A region recorded over the one before it (whose file grew): refused.
        assert_eq!(
            p.place_at(Some(512 * GIB + 8 * MIB), 2 * MIB),
            Err(PlaceError::Overlap {
                at: 512 * GIB + 8 * MIB,
                before: 512 * GIB + 10 * MIB
            })
        );
    }

    #[test]
    fn writes_to_a_read_only_region_are_dropped_and_counted() {
        use vessel_devices::BusDevice;
        let mut r = ReadOnlyRegion::new(2);
        let mut d = [0xffu8; 8];
        r.read(0, &mut d);
        assert_eq!(d, [0; 8]);
        r.write(0x1000, &[1, 2, 3, 4]);
        r.write(0x2000, &[5]);
        assert_eq!(r.writes, 2);
    }

    #[test]
    fn kvm_maps_the_region_into_the_guest() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("note: no /dev/kvm; skipped");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let t = vmm_sys_util::tempfile::TempFile::new().unwrap();
        t.as_file().set_len(MIB).unwrap();
        let mut dev =
            vessel_virtio_devices::pmem::Pmem::new(&vessel_virtio_devices::pmem::PmemParams {
                path: t.as_path().to_path_buf(),
                read_only: true,
            })
            .unwrap();
        dev.set_guest_address(512 * GIB);
        let r = dev.region();
        register(&vm, 0, &r).unwrap();
        // A second region over the same range is refused: KVM checks overlaps.
        let e = register(&vm, 1, &r).unwrap_err();
        assert!(e.to_string().contains("KVM_SET_USER_MEMORY_REGION"), "{e}");
    }
}
