//! The nested-host fallback, per vCPU.
//!
//! On hosts whose KVM emulates guest kernel mode (see `vessel_kvm::nested`), two things do not
//! work by themselves and are completed here:
//! - instructions the host's emulator cannot run (`KVM_EXIT_INTERNAL_ERROR`): decoded and
//!   completed with `vessel_kvm::emulate`, or reported with a full diagnosis;
//! - system calls from guest user mode: `syscall` loads RIP = LSTAR but stays in ring 3, so the
//!   first instruction fetch faults (#PF on a supervisor page). A hardware execution breakpoint
//!   on the guest's #PF handler (IDT vector 14) brings each page fault here; a ring-3 fault at
//!   RIP == LSTAR is turned into the kernel entry the `syscall` should have made. Any other
//!   fault is stepped over with the breakpoint off for one instruction.

use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_guest_debug, kvm_regs, kvm_segment, kvm_sregs, Msrs, KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
};
use kvm_ioctls::VcpuFd;
use vessel_kvm::emulate::{self, Completion, CpuState, GuestAccess};
use vessel_kvm::regs::{rflags, EFER_LMA};
use vessel_memory::GuestMemoryMmap;

use crate::error::{KvmContext, VcpuError, VmmError};
use crate::guest_access::VcpuMemory;

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const PF_VECTOR: u64 = 14;
/// How often the #PF handler address is re-read from the guest's IDT.
const IDT_RECHECK: Duration = Duration::from_millis(20);

/// Counters of what the fallback did, printed with the VM's statistics.
#[derive(Debug, Default, Clone, Copy)]
pub struct NestedStats {
    pub syscalls: u64,
    pub faults_stepped: u64,
    pub completed: u64,
    pub breakpoint_moves: u64,
}

/// Per-vCPU state of the fallback.
pub struct NestedVcpu {
    /// Guest-virtual address of the #PF handler the breakpoint is on.
    pf_handler: Option<u64>,
    /// Stepping over one instruction with the breakpoint off.
    stepping: bool,
    last_check: Option<Instant>,
    pub stats: NestedStats,
}

/// A 64-bit IDT gate's handler address, or `None` when the gate is not present.
pub fn idt_gate_offset(gate: &[u8; 16]) -> Option<u64> {
    if gate[5] & 0x80 == 0 {
        return None;
    }
    let lo = u16::from_le_bytes([gate[0], gate[1]]) as u64;
    let mid = u16::from_le_bytes([gate[6], gate[7]]) as u64;
    let hi = u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]]) as u64;
    Some(lo | (mid << 16) | (hi << 32))
}

/// The kernel's code and stack segments a `syscall` loads, from IA32_STAR.
pub fn syscall_segments(star: u64) -> (kvm_segment, kvm_segment) {
    let sel = ((star >> 32) & 0xfffc) as u16;
    let cs = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: sel,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let ss = kvm_segment {
        selector: sel + 8,
        type_: 0x3,
        db: 1,
        l: 0,
        ..cs
    };
    (cs, ss)
}

/// The exception frame of a #PF taken from ring 3, as the CPU pushed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultFrame {
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl FaultFrame {
    pub fn parse(b: &[u8; 48]) -> Self {
        let q = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
        FaultFrame {
            error_code: q(0),
            rip: q(1),
            cs: q(2),
            rflags: q(3),
            rsp: q(4),
            ss: q(5),
        }
    }
}

/// Turn the vCPU state at the #PF handler into the `syscall` entry the guest meant, when the
/// frame shows a ring-3 fault on the syscall entry point. Returns whether it did.
pub fn redirect_syscall(
    frame: &FaultFrame,
    lstar: u64,
    star: u64,
    sfmask: u64,
    regs: &mut kvm_regs,
    sregs: &mut kvm_sregs,
) -> bool {
    if frame.cs & 3 != 3 || frame.rip != lstar || lstar == 0 {
        return false;
    }
    let (cs, ss) = syscall_segments(star);
    sregs.cs = cs;
    sregs.ss = ss;
    regs.rip = lstar;
    regs.rsp = frame.rsp;
    regs.rflags = (frame.rflags & !sfmask & !rflags::RF) | rflags::FIXED;
    true
}

impl NestedVcpu {
    pub fn new() -> Self {
        NestedVcpu {
            pf_handler: None,
            stepping: false,
            last_check: None,
            stats: NestedStats::default(),
        }
    }

    fn set_debug(&self, vcpu: &VcpuFd) -> Result<(), VmmError> {
        let mut dbg = kvm_guest_debug::default();
        if self.stepping {
            dbg.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
        } else if let Some(addr) = self.pf_handler {
            dbg.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
            dbg.arch.debugreg[0] = addr;
            // DR7: L0 enable, execute breakpoint (R/W0 = 00, LEN0 = 00).
            dbg.arch.debugreg[7] = 0x1;
        }
        vcpu.set_guest_debug(&dbg).kvm("KVM_SET_GUEST_DEBUG")
    }

    /// Re-read the guest's #PF handler (at most every `IDT_RECHECK`) and move the breakpoint
    /// when the guest changed its IDT.
    pub fn maybe_recheck(&mut self, vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> Result<(), VmmError> {
        let now = Instant::now();
        if self.stepping
            || self
                .last_check
                .is_some_and(|t| now.duration_since(t) < IDT_RECHECK)
        {
            return Ok(());
        }
        self.last_check = Some(now);
        let sregs = vcpu.get_sregs().kvm("KVM_GET_SREGS")?;
        if sregs.efer & EFER_LMA == 0 || (sregs.idt.limit as u64) < PF_VECTOR * 16 + 15 {
            return Ok(());
        }
        let mut gate = [0u8; 16];
        let mut access = VcpuMemory {
            vcpu,
            mem,
            rom: None,
        };
        if access
            .read(sregs.idt.base + PF_VECTOR * 16, &mut gate)
            .is_err()
        {
            return Ok(());
        }
        let handler = idt_gate_offset(&gate);
        if handler != self.pf_handler {
            self.pf_handler = handler;
            self.stats.breakpoint_moves += 1;
            log::debug!("#PF handler at {:x?}: breakpoint moved", handler);
            self.set_debug(vcpu)?;
        }
        Ok(())
    }

    /// A `KVM_EXIT_DEBUG`: the #PF handler was reached, or a step finished.
    pub fn on_debug(
        &mut self,
        vcpu: &VcpuFd,
        mem: &GuestMemoryMmap,
        pc: u64,
    ) -> Result<(), VmmError> {
        if self.stepping {
            self.stepping = false;
            return self.set_debug(vcpu);
        }
        if Some(pc) != self.pf_handler {
            // Not ours (a stale breakpoint): re-arm from the IDT.
            self.last_check = None;
            return self.maybe_recheck(vcpu, mem);
        }
        let mut regs = vcpu.get_regs().kvm("KVM_GET_REGS")?;
        let mut raw = [0u8; 48];
        let mut access = VcpuMemory {
            vcpu,
            mem,
            rom: None,
        };
        if access.read(regs.rsp, &mut raw).is_ok() {
            let frame = FaultFrame::parse(&raw);
            if frame.cs & 3 == 3 {
                let [star, lstar, sfmask] =
                    read_msrs(vcpu, [MSR_STAR, MSR_LSTAR, MSR_SYSCALL_MASK])?;
                let mut sregs = vcpu.get_sregs().kvm("KVM_GET_SREGS")?;
                if redirect_syscall(&frame, lstar, star, sfmask, &mut regs, &mut sregs) {
                    vcpu.set_sregs(&sregs).kvm("KVM_SET_SREGS")?;
                    vcpu.set_regs(&regs).kvm("KVM_SET_REGS")?;
                    self.stats.syscalls += 1;
                    return Ok(());
                }
            }
        }
        // A real page fault: let the guest's handler run its first instruction unwatched.
        self.stats.faults_stepped += 1;
        self.stepping = true;
        self.set_debug(vcpu)
    }

    /// A `KVM_EXIT_INTERNAL_ERROR`: complete the instruction or explain why not.
    pub fn on_internal_error(
        &mut self,
        vcpu: &mut VcpuFd,
        mem: &GuestMemoryMmap,
        rom: Option<&GuestMemoryMmap>,
    ) -> Result<(), VmmError> {
        let failure = vessel_kvm::exit::emulation_failure(vcpu.get_kvm_run());
        let regs = vcpu.get_regs().kvm("KVM_GET_REGS")?;
        let sregs = vcpu.get_sregs().kvm("KVM_GET_SREGS")?;
        let mut cpu = CpuState { regs, sregs };
        let Some(failure) = failure else {
            // SAFETY: the exit is KVM_EXIT_INTERNAL_ERROR, so `internal` is the member KVM
            // filled; it holds plain integers.
            let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
            return Err(diagnosis(
                &cpu,
                &[],
                &format!("KVM internal error, suberror {suberror}"),
            ));
        };
        let bytes = failure.bytes();
        let mut access = VcpuMemory { vcpu, mem, rom };
        match emulate::complete(bytes, &mut cpu, &mut access) {
            Ok(Completion::Done) => {
                vcpu.set_regs(&cpu.regs).kvm("KVM_SET_REGS")?;
                self.stats.completed += 1;
                Ok(())
            }
            Ok(Completion::InjectException { vector, error_code }) => {
                vcpu.set_regs(&cpu.regs).kvm("KVM_SET_REGS")?;
                if vector == emulate::vector::PF {
                    // CR2 travels in sregs.
                    vcpu.set_sregs(&cpu.sregs).kvm("KVM_SET_SREGS")?;
                }
                let mut ev = vcpu.get_vcpu_events().kvm("KVM_GET_VCPU_EVENTS")?;
                ev.exception.injected = 1;
                ev.exception.nr = vector;
                ev.exception.has_error_code = error_code.is_some() as u8;
                ev.exception.error_code = error_code.unwrap_or(0);
                vcpu.set_vcpu_events(&ev).kvm("KVM_SET_VCPU_EVENTS")?;
                self.stats.completed += 1;
                Ok(())
            }
            Err(e) => Err(diagnosis(
                &cpu,
                bytes,
                &format!("the host cannot run this guest instruction: {e}"),
            )),
        }
    }
}

impl Default for NestedVcpu {
    fn default() -> Self {
        Self::new()
    }
}

fn diagnosis(cpu: &CpuState, bytes: &[u8], what: &str) -> VmmError {
    VmmError::Vcpu {
        cpu: 0,
        source: VcpuError::Diagnosed {
            what: what.to_string(),
            diagnosis: vessel_kvm::diagnose::describe(cpu, bytes),
        },
    }
}

fn read_msrs<const N: usize>(vcpu: &VcpuFd, idx: [u32; N]) -> Result<[u64; N], VmmError> {
    let entries: Vec<_> = idx
        .iter()
        .map(|&index| kvm_bindings::kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(VmmError::MsrList)?;
    vcpu.get_msrs(&mut msrs).kvm("KVM_GET_MSRS")?;
    let mut out = [0u64; N];
    for (o, e) in out.iter_mut().zip(msrs.as_slice()) {
        *o = e.data;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idt_gate_decodes_a_present_interrupt_gate() {
        let handler: u64 = 0xffff_ffff_8160_1230;
        let mut g = [0u8; 16];
        g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
        g[2..4].copy_from_slice(&0x10u16.to_le_bytes());
        g[5] = 0x8e;
        g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
        g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
        assert_eq!(idt_gate_offset(&g), Some(handler));
        g[5] = 0x0e;
        assert_eq!(idt_gate_offset(&g), None);
    }

    fn frame(cs: u64, rip: u64) -> FaultFrame {
        FaultFrame {
            error_code: 0x15,
            rip,
            cs,
            rflags: 0x246 | (1 << 9),
            rsp: 0x7ffd_0000,
            ss: 0x2b,
        }
    }

    #[test]
    fn ring3_fault_at_lstar_becomes_the_syscall_entry() {
        let lstar = 0xffff_ffff_8180_0000;
        // Linux: kernel CS 0x10 in STAR[47:32], user base 0x23 in STAR[63:48].
        let star = (0x23u64 << 48) | (0x10u64 << 32);
        let sfmask = 0x47700; // TF|DF|IF|IOPL|AC|NT
        let mut regs = kvm_regs {
            rip: lstar,
            rcx: 0x40_1000,
            r11: 0x246,
            ..Default::default()
        };
        let mut sregs = kvm_sregs::default();
        let f = frame(0x33, lstar);
        assert!(redirect_syscall(
            &f, lstar, star, sfmask, &mut regs, &mut sregs
        ));
        assert_eq!(regs.rip, lstar);
        assert_eq!(regs.rsp, f.rsp);
        assert_eq!(regs.rflags & (1 << 9), 0, "IF masked by SFMASK");
        assert_eq!(regs.rflags & 2, 2);
        assert_eq!(
            (regs.rcx, regs.r11),
            (0x40_1000, 0x246),
            "RCX/R11 left as syscall set them"
        );
        assert_eq!((sregs.cs.selector, sregs.cs.dpl, sregs.cs.l), (0x10, 0, 1));
        assert_eq!(
            (sregs.ss.selector, sregs.ss.dpl, sregs.ss.type_),
            (0x18, 0, 3)
        );
    }

    #[test]
    fn other_faults_are_left_alone() {
        let lstar = 0xffff_ffff_8180_0000;
        let mut regs = kvm_regs::default();
        let mut sregs = kvm_sregs::default();
        // Ring-3 fault elsewhere.
        assert!(!redirect_syscall(
            &frame(0x33, 0x40_0000),
            lstar,
            0,
            0,
            &mut regs,
            &mut sregs
        ));
        // Kernel fault at LSTAR.
        assert!(!redirect_syscall(
            &frame(0x10, lstar),
            lstar,
            0,
            0,
            &mut regs,
            &mut sregs
        ));
        // No LSTAR set yet.
        assert!(!redirect_syscall(
            &frame(0x33, 0),
            0,
            0,
            0,
            &mut regs,
            &mut sregs
        ));
        assert_eq!(regs.rip, 0);
    }

    #[test]
    fn frame_parses_in_push_order() {
        let mut b = [0u8; 48];
        for i in 0..6u64 {
            b[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&(i + 1).to_le_bytes());
        }
        let f = FaultFrame::parse(&b);
        assert_eq!(
            (f.error_code, f.rip, f.cs, f.rflags, f.rsp, f.ss),
            (1, 2, 3, 4, 5, 6)
        );
    }
}
