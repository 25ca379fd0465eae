//! Reading an emulation failure out of `kvm_run`.
//!
//! When KVM's instruction emulator gives up on a guest instruction at CPL 0 it exits with
//! `KVM_EXIT_INTERNAL_ERROR`, suberror `KVM_INTERNAL_ERROR_EMULATION`. With
//! `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES` set in the flags (the first data word),
//! the next 16 bytes are `insn_size` (one byte) and up to 15 instruction bytes: `internal.data[1]`
//! holds the size in its low byte and the first 7 bytes above it, `data[2]` the other 8. The size
//! is the emulator's fetch window (often all 15 bytes), not the instruction's length, so bytes of
//! the following instructions may trail. On kernels that send no bytes, complete the instruction
//! from guest memory: [`crate::emulate::complete`] fetches at CS:RIP when given too few.
//!
//! Kernels since 5.17 offer `KVM_CAP_EXIT_ON_EMULATION_FAILURE`, which also makes failures at
//! CPL > 0 exit with the bytes instead of injecting #UD; at CPL 0 the bytes come either way (on
//! the lab host's 6.18 kernel they did, and no #UD was left pending in `KVM_GET_VCPU_EVENTS`).

use kvm_bindings::{
    kvm_enable_cap, kvm_run, KVM_CAP_EXIT_ON_EMULATION_FAILURE, KVM_EXIT_INTERNAL_ERROR,
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
};
use kvm_ioctls::VmFd;

use crate::error::KvmError;

/// The most bytes an emulation failure carries.
const MAX_INSN_BYTES: usize = 15;

/// The instruction bytes reported with an emulation failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmulationFailure {
    bytes: [u8; MAX_INSN_BYTES],
    len: usize,
}

impl EmulationFailure {
    /// The bytes at the failing RIP (possibly none, possibly more than one instruction).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The emulation failure in `run`, or `None` when the exit was something else.
pub fn emulation_failure(run: &kvm_run) -> Option<EmulationFailure> {
    if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
        return None;
    }
    // SAFETY: for KVM_EXIT_INTERNAL_ERROR the kernel fills the `internal` member, and the
    // `emulation_failure` member overlays it; both are plain integers, valid for any bits.
    let (internal, failure) = unsafe {
        (
            run.__bindgen_anon_1.internal,
            run.__bindgen_anon_1.emulation_failure,
        )
    };
    if internal.suberror != KVM_INTERNAL_ERROR_EMULATION {
        return None;
    }
    let mut out = EmulationFailure {
        bytes: [0; MAX_INSN_BYTES],
        len: 0,
    };
    let has_bytes = internal.ndata >= 3
        && failure.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0;
    if has_bytes {
        // SAFETY: the union has a single member, a pair of plain integers.
        let insn = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
        out.len = usize::from(insn.insn_size).min(MAX_INSN_BYTES);
        out.bytes = insn.insn_bytes;
    }
    Some(out)
}

/// Enables `KVM_CAP_EXIT_ON_EMULATION_FAILURE` on `vm`; false when this kernel lacks it.
pub fn enable_exit_on_emulation_failure(vm: &VmFd) -> Result<bool, KvmError> {
    if vm.check_extension_raw(u64::from(KVM_CAP_EXIT_ON_EMULATION_FAILURE)) <= 0 {
        return Ok(false);
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_EXIT_ON_EMULATION_FAILURE,
        args: [1, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(KvmError::ioctl("KVM_ENABLE_CAP(EXIT_ON_EMULATION_FAILURE)"))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulate::{self, AccessError, Completion, GuestAccess};
    use crate::scratch_vm::{ScratchVm, CODE_GPA};
    use crate::state::CpuState;
    use iced_x86::code_asm::*;
    use kvm_ioctls::{Kvm, VcpuExit};

    fn failure_run(ndata: u32, flags: u64, size: u8, bytes: &[u8]) -> kvm_run {
        let mut run = kvm_run {
            exit_reason: KVM_EXIT_INTERNAL_ERROR,
            ..Default::default()
        };
        let mut insn = [0u8; 15];
        insn[..bytes.len()].copy_from_slice(bytes);
        let mut data = [0u64; 16];
        data[0] = flags;
        let mut window = [0u8; 16];
        window[0] = size;
        window[1..].copy_from_slice(&insn);
        data[1] = u64::from_le_bytes(window[..8].try_into().unwrap());
        data[2] = u64::from_le_bytes(window[8..].try_into().unwrap());
        run.__bindgen_anon_1.internal.suberror = KVM_INTERNAL_ERROR_EMULATION;
        run.__bindgen_anon_1.internal.ndata = ndata;
        run.__bindgen_anon_1.internal.data = data;
        run
    }

    #[test]
    fn bytes_are_read_from_the_documented_layout() {
        let run = failure_run(8, 1, 5, &[0xf3, 0x0f, 0xb8, 0x47, 0x10, 0xf4]);
        let f = emulation_failure(&run).unwrap();
        assert_eq!(f.bytes(), [0xf3, 0x0f, 0xb8, 0x47, 0x10]);
    }

    #[test]
    fn no_bytes_without_the_flag_and_nothing_for_other_exits() {
        let run = failure_run(8, 0, 5, &[0xf3]);
        assert_eq!(emulation_failure(&run).unwrap().bytes(), [] as [u8; 0]);
        let mut other = run;
        other.exit_reason = kvm_bindings::KVM_EXIT_HLT;
        assert_eq!(emulation_failure(&other), None);
        let mut oversize = failure_run(8, 1, 200, &[0x90; 15]);
        assert_eq!(emulation_failure(&oversize).unwrap().bytes().len(), 15);
        oversize.__bindgen_anon_1.internal.suberror = 2;
        assert_eq!(emulation_failure(&oversize), None);
    }

    /// Real-mode guest memory of the scratch VM: linear address = physical address.
    struct ScratchMem<'a>(&'a mut [u8]);

    impl ScratchMem<'_> {
        fn range(&self, gva: u64, len: usize) -> Result<std::ops::Range<usize>, AccessError> {
            let start = usize::try_from(gva).map_err(|_| AccessError::Unbacked(gva))?;
            if start + len > self.0.len() {
                return Err(AccessError::Unbacked(gva));
            }
            Ok(start..start + len)
        }
    }

    impl GuestAccess for ScratchMem<'_> {
        fn read(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), AccessError> {
            let r = self.range(gva, buf.len())?;
            buf.copy_from_slice(&self.0[r]);
            Ok(())
        }
        fn write(&mut self, gva: u64, buf: &[u8]) -> Result<(), AccessError> {
            let r = self.range(gva, buf.len())?;
            self.0[r].copy_from_slice(buf);
            Ok(())
        }
    }

    /// On this kind of host the emulator fails on popcnt in real mode: the failure's bytes,
    /// completed in user space, let the guest run on to its HLT with the right result.
    #[test]
    fn real_failure_is_completed_and_the_guest_runs_on() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("/dev/kvm not openable: skipping");
            return;
        };
        let mut a = CodeAssembler::new(16).unwrap();
        a.mov(bx, 0x400u32).unwrap();
        a.mov(word_ptr(bx + 0x10), 0x0f0fu32).unwrap();
        a.popcnt(ax, word_ptr(bx + 0x10)).unwrap();
        a.hlt().unwrap();
        let code = a.assemble(CODE_GPA).unwrap();
        let mut vm = ScratchVm::new(&kvm, &code).unwrap();
        let enabled = enable_exit_on_emulation_failure(vm.vm()).unwrap();
        eprintln!("KVM_CAP_EXIT_ON_EMULATION_FAILURE enabled: {enabled}");

        let mut completed = 0;
        for _ in 0..8 {
            let exit = vm.vcpu.run().unwrap();
            match exit {
                VcpuExit::Hlt => break,
                VcpuExit::InternalError => {
                    let failure = emulation_failure(vm.vcpu.get_kvm_run()).unwrap();
                    let mut cpu = CpuState {
                        regs: vm.vcpu.get_regs().unwrap(),
                        sregs: vm.vcpu.get_sregs().unwrap(),
                    };
                    eprintln!("{}", crate::diagnose::describe(&cpu, failure.bytes()));
                    let mut mem = ScratchMem(vm.memory());
                    let done = emulate::complete(failure.bytes(), &mut cpu, &mut mem).unwrap();
                    assert_eq!(done, Completion::Done);
                    vm.vcpu.set_regs(&cpu.regs).unwrap();
                    completed += 1;
                }
                other => panic!("unexpected exit {other:?}"),
            }
        }
        let regs = vm.vcpu.get_regs().unwrap();
        if completed == 0 {
            eprintln!("this host's KVM emulated popcnt itself");
        }
        assert_eq!(regs.rax & 0xffff, 8, "popcnt(0x0f0f)");
        assert_eq!(
            regs.rip,
            CODE_GPA + code.len() as u64,
            "stopped after the hlt"
        );
    }
}
