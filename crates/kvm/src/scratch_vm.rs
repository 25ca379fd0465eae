//! A throwaway VM for host probes: one vCPU and four pages of anonymous memory at guest-physical
//! address 0, with the probe's code copied to [`CODE_GPA`]. The vCPU starts in real mode, or in
//! 64-bit mode at a chosen privilege level over identity-mapping page tables.

use std::io;
use std::ptr::NonNull;

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::error::KvmError;

/// Size of the probe guest's memory: the code page and three page-table pages.
const MEM_SIZE: usize = 0x4000;
/// The page tables for 64-bit mode: PML4, PDPT and PD, one page each.
const PML4_GPA: u64 = 0x1000;
const PDPT_GPA: u64 = 0x2000;
const PD_GPA: u64 = 0x3000;
/// Where the probe's code starts, above the real-mode interrupt vector table.
pub(crate) const CODE_GPA: u64 = 0x800;
/// Where KVM may put the TSS it needs for real mode on hosts without unrestricted guests.
const TSS_GPA: usize = 0xfffb_d000;

/// Private anonymous memory of MEM_SIZE bytes, unmapped on drop.
struct AnonPage {
    ptr: NonNull<u8>,
}

impl AnonPage {
    fn new() -> Result<Self, KvmError> {
        // SAFETY: an anonymous private mapping with a null hint touches no existing memory; the
        // result is checked against MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(KvmError::Mmap(io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| KvmError::Mmap(io::Error::other("mmap returned null")))?;
        Ok(Self { ptr })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is MEM_SIZE bytes, readable and writable, owned by self for its
        // whole life, and `&mut self` makes this the only reference from this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), MEM_SIZE) }
    }
}

impl Drop for AnonPage {
    fn drop(&mut self) {
        // SAFETY: ptr/MEM_SIZE is exactly the mapping made in `new`, and nothing refers to it any
        // more (the VM that used it is dropped first, see the field order of `ScratchVm`).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), MEM_SIZE);
        }
    }
}

/// A VM with one vCPU about to run the code it was built with, in real mode until
/// [`ScratchVm::enter_long_mode`].
pub(crate) struct ScratchVm {
    // Field order is drop order: the vCPU and VM go before the memory they map.
    pub(crate) vcpu: VcpuFd,
    _vm: VmFd,
    mem: AnonPage,
}

impl ScratchVm {
    /// Builds the VM, copies `code` to [`CODE_GPA`] and points the vCPU's CS:IP at it.
    pub(crate) fn new(kvm: &Kvm, code: &[u8]) -> Result<Self, KvmError> {
        let start = CODE_GPA as usize;
        if code.len() > PML4_GPA as usize - start {
            return Err(KvmError::Probe(format!(
                "probe code of {} bytes does not fit below the page tables",
                code.len()
            )));
        }
        let mut mem = AnonPage::new()?;
        mem.as_mut_slice()[start..start + code.len()].copy_from_slice(code);

        let vm = kvm.create_vm().map_err(KvmError::ioctl("KVM_CREATE_VM"))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: mem.ptr.as_ptr() as u64,
        };
        // SAFETY: the region describes the whole of `mem`, a live mapping that outlives the VM
        // (it is dropped after `vm` in `ScratchVm`), so the kernel never sees a dangling range.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(KvmError::ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        vm.set_tss_address(TSS_GPA)
            .map_err(KvmError::ioctl("KVM_SET_TSS_ADDR"))?;

        let vcpu = vm
            .create_vcpu(0)
            .map_err(KvmError::ioctl("KVM_CREATE_VCPU"))?;
        let mut sregs = vcpu.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs)
            .map_err(KvmError::ioctl("KVM_SET_SREGS"))?;
        let mut regs = vcpu.get_regs().map_err(KvmError::ioctl("KVM_GET_REGS"))?;
        regs.rip = CODE_GPA;
        regs.rflags = 0x2;
        regs.rsp = CODE_GPA; // a stack just below the code, above the IVT
        vcpu.set_regs(&regs)
            .map_err(KvmError::ioctl("KVM_SET_REGS"))?;
        Ok(Self { vcpu, _vm: vm, mem })
    }

    /// The VM, for tests that set VM-wide capabilities.
    #[cfg(test)]
    pub(crate) fn vm(&self) -> &VmFd {
        &self._vm
    }

    /// The guest's memory (guest-physical address 0 is index 0).
    #[cfg(test)]
    pub(crate) fn memory(&mut self) -> &mut [u8] {
        self.mem.as_mut_slice()
    }

    /// Switches the vCPU to 64-bit mode at privilege level `cpl` (0 or 3), with paging on and the
    /// first 2 MiB identity-mapped for user and kernel, and IOPL 3 so that `in`/`out` work at
    /// any CPL. RIP goes back to [`CODE_GPA`].
    pub(crate) fn enter_long_mode(&mut self, cpl: u8) -> Result<(), KvmError> {
        const PRESENT_RW_USER: u64 = 0x7;
        const PAGE_SIZE_2M: u64 = 0x80;
        let mem = self.mem.as_mut_slice();
        for (table, entry) in [
            (PML4_GPA, PDPT_GPA | PRESENT_RW_USER),
            (PDPT_GPA, PD_GPA | PRESENT_RW_USER),
            (PD_GPA, PAGE_SIZE_2M | PRESENT_RW_USER),
        ] {
            let at = table as usize;
            mem[at..at + 8].copy_from_slice(&entry.to_le_bytes());
        }

        let mut sregs = self
            .vcpu
            .get_sregs()
            .map_err(KvmError::ioctl("KVM_GET_SREGS"))?;
        sregs.cr3 = PML4_GPA;
        sregs.cr4 = 1 << 5; // PAE
        sregs.cr0 = (1 << 31) | (1 << 4) | 1; // PG, ET, PE
        sregs.efer = (1 << 10) | (1 << 8); // LMA, LME
        let segment = |index: u16, type_: u8, long: u8| kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: (index << 3) | u16::from(cpl),
            type_,
            present: 1,
            dpl: cpl,
            db: 1 - long,
            s: 1,
            l: long,
            g: 1,
            ..Default::default()
        };
        sregs.cs = segment(3, 0xb, 1); // execute/read, accessed
        sregs.ss = segment(4, 0x3, 0); // read/write, accessed
        (sregs.ds, sregs.es, sregs.fs, sregs.gs) = (sregs.ss, sregs.ss, sregs.ss, sregs.ss);
        self.vcpu
            .set_sregs(&sregs)
            .map_err(KvmError::ioctl("KVM_SET_SREGS"))?;

        let mut regs = self
            .vcpu
            .get_regs()
            .map_err(KvmError::ioctl("KVM_GET_REGS"))?;
        regs.rip = CODE_GPA;
        regs.rsp = CODE_GPA;
        regs.rflags = 0x3002; // IOPL 3, reserved bit 1
        self.vcpu
            .set_regs(&regs)
            .map_err(KvmError::ioctl("KVM_SET_REGS"))
    }
}
