//! Guest-virtual memory access for one vCPU: `KVM_TRANSLATE` page by page, then guest memory
//! (and, for reads, the firmware's read-only images); and the vCPU's FPU state.

use std::ops::Not;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_ioctls::VcpuFd;
use vessel_kvm::emulate::{self, AccessError, GuestAccess};
use vessel_memory::vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vessel_memory::GuestMemoryMmap;

const PAGE: u64 = 4096;
const MSR_TSC_AUX: u32 = 0xc000_0103;

/// Reads and writes guest-virtual addresses through the vCPU's current page tables.
pub struct VcpuMemory<'a> {
    pub vcpu: &'a VcpuFd,
    pub mem: &'a GuestMemoryMmap,
    /// The firmware's images (read-only flash below 4 GiB), which instructions read too.
    pub rom: Option<&'a GuestMemoryMmap>,
}

impl VcpuMemory<'_> {
    fn translate(&self, gva: u64, write: bool) -> Result<u64, AccessError> {
        let t = self
            .vcpu
            .translate_gva(gva)
            .map_err(|_| AccessError::Unmapped(gva))?;
        if t.valid == 0 {
            return Err(AccessError::Unmapped(gva));
        }
        if write && t.writeable == 0 {
            return Err(AccessError::ReadOnly(gva));
        }
        Ok(t.physical_address)
    }

    /// Walk `[gva, gva + len)` a page at a time, giving each piece's guest-physical address.
    fn for_each_piece(
        &self,
        gva: u64,
        len: usize,
        write: bool,
        mut f: impl FnMut(u64, std::ops::Range<usize>) -> Result<(), AccessError>,
    ) -> Result<(), AccessError> {
        let mut done = 0usize;
        while done < len {
            let addr = gva.wrapping_add(done as u64);
            let in_page = (PAGE - (addr % PAGE)) as usize;
            let n = in_page.min(len - done);
            let gpa = self.translate(addr, write)?;
            f(gpa, done..done + n).map_err(|_| AccessError::Unbacked(addr))?;
            done += n;
        }
        Ok(())
    }
}

impl GuestAccess for VcpuMemory<'_> {
    fn read(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let len = buf.len();
        self.for_each_piece(gva, len, false, |gpa, r| {
            let at = GuestAddress(gpa);
            match self.rom {
                Some(rom) if self.mem.address_in_range(at).not() => rom.read_slice(&mut buf[r], at),
                _ => self.mem.read_slice(&mut buf[r], at),
            }
            .map_err(|_| AccessError::Unbacked(gpa))
        })
    }

    fn write(&mut self, gva: u64, buf: &[u8]) -> Result<(), AccessError> {
        self.for_each_piece(gva, buf.len(), true, |gpa, r| {
            self.mem
                .write_slice(&buf[r], GuestAddress(gpa))
                .map_err(|_| AccessError::Unbacked(gpa))
        })
    }

    /// Eight aligned bytes are exchanged with a host atomic, so other vCPUs see a real
    /// `lock cmpxchg8b`; other sizes fall back to read-then-write (Vessel's nested-host kernel
    /// parameters keep Linux off `cmpxchg16b`).
    fn compare_exchange(
        &mut self,
        gva: u64,
        expected: &mut [u8],
        new: &[u8],
    ) -> Result<bool, AccessError> {
        if expected.len() == 8 && gva.is_multiple_of(8) {
            let gpa = self.translate(gva, true)?;
            let host = self
                .mem
                .get_host_address(GuestAddress(gpa))
                .map_err(|_| AccessError::Unbacked(gva))?;
            // SAFETY: `host` points into a live guest RAM mapping owned by `mem`, is 8-byte
            // aligned (gva and gpa share their page offset), and the 8 bytes stay inside one
            // page, hence one region. Guest memory is shared with the guest, which is exactly
            // why an atomic is used.
            let cell = unsafe { AtomicU64::from_ptr(host as *mut u64) };
            let old = u64::from_le_bytes(expected[..8].try_into().unwrap());
            let new = u64::from_le_bytes(new[..8].try_into().unwrap());
            return match cell.compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => Ok(true),
                Err(cur) => {
                    expected.copy_from_slice(&cur.to_le_bytes());
                    Ok(false)
                }
            };
        }
        emulate::compare_exchange_by_copy(self, gva, expected, new)
    }

    fn fpu(&mut self) -> Option<kvm_bindings::kvm_fpu> {
        self.vcpu.get_fpu().ok()
    }

    fn set_fpu(&mut self, fpu: &kvm_bindings::kvm_fpu) -> bool {
        self.vcpu.set_fpu(fpu).is_ok()
    }

    fn tsc_aux(&mut self) -> u32 {
        let mut msrs = match kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: MSR_TSC_AUX,
            ..Default::default()
        }]) {
            Ok(m) => m,
            Err(_) => return 0,
        };
        match self.vcpu.get_msrs(&mut msrs) {
            Ok(1) => msrs.as_slice()[0].data as u32,
            _ => 0,
        }
    }
}
