//! The KVM side of a VM that waits in the kernel: `KVM_CREATE_VM` with its TSS and
//! identity-map pages, the in-kernel irqchip and PIT, and the guest memory slots.
//!
//! Creating the irqchip and the PIT registers devices on KVM's I/O buses and registering
//! memory swaps the VM's memslots; each waits for SRCU grace periods and, for the PIT, a new
//! kernel thread, which on a nested host takes milliseconds while the VMM has nothing to do.
//! So the VMM takes these waits off the critical path:
//!
//! - [`prepare_ahead`] creates the VM (irqchip and PIT included) on a helper thread as soon as
//!   a process knows it will run one (the API server before `InstanceStart` or
//!   `PUT /snapshot/load`, a migration receiver while it listens, `vessel snapshot restore`
//!   while it reads the state file), and [`take_or_create`] hands that VM to the first VM
//!   built in the process. Every VM starts from the same empty KVM VM, so any may take it.
//! - [`register_memory_in_background`] registers guest memory on a helper thread while the
//!   VMM creates the vCPUs, the devices and the boot image; [`MemorySlots::wait`] joins it
//!   before anything needs guest memory in KVM (vCPU state with guest-physical pointers,
//!   the first `KVM_RUN`).

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vessel_memory::vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vessel_memory::GuestMemoryMmap;

use crate::error::{KvmContext, VmmError};

/// KVM's TSS (3 pages) and identity-map page, just below the IO-APIC/LAPIC area, in the gap.
const KVM_TSS_ADDR: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// A KVM VM with its TSS and identity-map pages, an in-kernel irqchip and a PIT; no memory
/// and no vCPUs yet.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, VmmError> {
    let vm = kvm.create_vm().kvm("KVM_CREATE_VM")?;
    vm.set_tss_address(KVM_TSS_ADDR).kvm("KVM_SET_TSS_ADDR")?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
        .kvm("KVM_SET_IDENTITY_MAP_ADDR")?;
    vm.create_irq_chip().kvm("KVM_CREATE_IRQCHIP")?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).kvm("KVM_CREATE_PIT2")?;
    Ok(vm)
}

/// A VM being made ahead of time on a helper thread, until someone takes it.
struct Ahead(Mutex<Option<JoinHandle<Option<VmFd>>>>);

impl Ahead {
    const fn new() -> Self {
        Ahead(Mutex::new(None))
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<JoinHandle<Option<VmFd>>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn prepare(&self) {
        let mut slot = self.slot();
        if slot.is_some() {
            return;
        }
        *slot = std::thread::Builder::new()
            .name("vm-prepare".into())
            .spawn(|| {
                let kvm = vessel_kvm::system::open().ok()?;
                vessel_kvm::system::check_capabilities(&kvm).ok()?;
                create_vm(&kvm).ok()
            })
            .ok();
    }

    fn take(&self) -> Option<VmFd> {
        let handle = self.slot().take()?;
        handle.join().ok().flatten()
    }
}

/// The process's VM made ahead of time.
static AHEAD: Ahead = Ahead::new();

/// Starts creating a VM on a helper thread for the next [`take_or_create`]. Does nothing if
/// one is already being made or waiting. Failures are not reported here: the VM is then
/// created (and the error reported) where it is needed.
pub fn prepare_ahead() {
    AHEAD.prepare();
}

/// The VM [`prepare_ahead`] made (waiting for it if it is still being made), or a new one.
pub fn take_or_create(kvm: &Kvm) -> Result<VmFd, VmmError> {
    match AHEAD.take() {
        Some(vm) => Ok(vm),
        None => create_vm(kvm),
    }
}

/// Give KVM every region of guest memory, one slot each (slot `i` is region `i`), with
/// dirty-page logging when `log_dirty`.
pub fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap, log_dirty: bool) -> Result<(), VmmError> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, the slots do not overlap, and
        // `run` joins every vCPU thread before `mem` is unmapped, so the guest never runs
        // on memory that is gone.
        unsafe { vm.set_user_memory_region(r) }.kvm("KVM_SET_USER_MEMORY_REGION")?;
    }
    Ok(())
}

/// Guest memory being registered with KVM on a helper thread.
#[must_use = "wait for the memory slots before any vCPU runs"]
pub struct MemorySlots(MemorySlotsInner);

enum MemorySlotsInner {
    Background(JoinHandle<Result<(), VmmError>>),
    /// The thread could not be started: registered on the caller's thread instead.
    Done(Result<(), VmmError>),
}

/// Starts [`register_memory`] on a helper thread (or runs it here if no thread can be
/// started). The thread keeps `mem` mapped while it works.
pub fn register_memory_in_background(
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    log_dirty: bool,
) -> MemorySlots {
    let (vm2, mem2) = (vm.clone(), mem.clone());
    match std::thread::Builder::new()
        .name("vm-memslots".into())
        .spawn(move || register_memory(&vm2, &mem2, log_dirty))
    {
        Ok(h) => MemorySlots(MemorySlotsInner::Background(h)),
        Err(_) => MemorySlots(MemorySlotsInner::Done(register_memory(
            &vm, &mem, log_dirty,
        ))),
    }
}

impl MemorySlots {
    /// Waits until every slot is registered; the first error if one was refused.
    pub fn wait(self) -> Result<(), VmmError> {
        match self.0 {
            MemorySlotsInner::Done(r) => r,
            MemorySlotsInner::Background(h) => h.join().unwrap_or_else(|_| {
                Err(VmmError::Device(
                    "the thread registering guest memory panicked".into(),
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vessel_memory::vm_memory::GuestAddress;

    fn kvm() -> Option<Kvm> {
        Kvm::new().ok()
    }

    #[test]
    fn a_prepared_vm_is_taken_once() {
        if kvm().is_none() {
            eprintln!("skipping: no /dev/kvm");
            return;
        }
        let ahead = Ahead::new();
        assert!(ahead.take().is_none(), "nothing prepared yet");
        ahead.prepare();
        ahead.prepare(); // a second call while one is waiting changes nothing
        let vm = ahead.take().expect("the prepared VM");
        assert!(ahead.take().is_none(), "taken once");
        // A complete VM: the irqchip and the PIT exist (their state can be read).
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).unwrap();
        vm.get_pit2().unwrap();
    }

    #[test]
    fn memory_registered_in_the_background_is_visible_to_the_vm() {
        let Some(kvm) = kvm() else {
            eprintln!("skipping: no /dev/kvm");
            return;
        };
        let vm = Arc::new(create_vm(&kvm).unwrap());
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 2 << 20),
            (GuestAddress(4 << 20), 1 << 20),
        ])
        .unwrap();
        register_memory_in_background(vm.clone(), mem.clone(), true)
            .wait()
            .unwrap();
        // Dirty logging was asked for: KVM has a bitmap for each slot, of the slot's size.
        assert_eq!(vm.get_dirty_log(0, 2 << 20).unwrap().len(), 512 / 64);
        assert_eq!(vm.get_dirty_log(1, 1 << 20).unwrap().len(), 256 / 64);
        assert!(vm.get_dirty_log(2, 1 << 20).is_err(), "no third slot");
        // A slot KVM refuses (slot 0 again, at another address and size) reports its error.
        let refused = GuestMemoryMmap::from_ranges(&[(GuestAddress(1 << 20), 1 << 20)]).unwrap();
        let e = register_memory_in_background(vm, refused, false)
            .wait()
            .unwrap_err();
        assert!(e.to_string().contains("KVM_SET_USER_MEMORY_REGION"), "{e}");
    }
}
