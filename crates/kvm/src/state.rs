//! The vCPU state the user-space instruction completer and the diagnosis work on, and what
//! follows from it: the CPU mode, the code bitness and the privilege level.

use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::regs::{rflags, CR0_PE, EFER_LMA};

/// General and special registers of one vCPU, as `KVM_GET_REGS`/`KVM_GET_SREGS` return them.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuState {
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER.
    pub sregs: kvm_sregs,
}

impl CpuState {
    /// True in protected or long mode (CR0.PE set).
    pub fn protected(&self) -> bool {
        self.sregs.cr0 & CR0_PE != 0
    }

    /// True in 64-bit mode: long mode active and a 64-bit code segment.
    pub fn long_mode_64(&self) -> bool {
        self.sregs.efer & EFER_LMA != 0 && self.sregs.cs.l != 0
    }

    /// The code size the current instruction is decoded with: 16, 32 or 64.
    pub fn bitness(&self) -> u32 {
        if !self.protected() || self.regs.rflags & rflags::VM != 0 {
            16
        } else if self.long_mode_64() {
            64
        } else if self.sregs.cs.db != 0 {
            32
        } else {
            16
        }
    }

    /// The current privilege level: 0 in real mode, 3 in virtual-8086 mode, else SS.DPL (which
    /// is where KVM keeps the CPL on both Intel and AMD).
    pub fn cpl(&self) -> u8 {
        if !self.protected() {
            0
        } else if self.regs.rflags & rflags::VM != 0 {
            3
        } else {
            self.sregs.ss.dpl
        }
    }

    /// Masks an instruction pointer to the width of the current code size (IP, EIP or RIP).
    pub fn mask_ip(&self, ip: u64) -> u64 {
        match self.bitness() {
            64 => ip,
            32 => ip & 0xffff_ffff,
            _ => ip & 0xffff,
        }
    }

    /// Masks a linear address (segment base plus offset) to the width the current mode has.
    pub fn mask_linear(&self, linear: u64) -> u64 {
        if self.long_mode_64() {
            linear
        } else {
            linear & 0xffff_ffff
        }
    }

    /// The linear address of the current instruction: CS.base + RIP (the base is 0 in 64-bit
    /// mode).
    pub fn linear_rip(&self) -> u64 {
        if self.long_mode_64() {
            self.regs.rip
        } else {
            self.mask_linear(self.sregs.cs.base.wrapping_add(self.regs.rip))
        }
    }
}

#[cfg(test)]
pub(crate) mod test_states {
    //! Register states for the unit tests of this crate.
    use super::*;

    /// A 64-bit long-mode kernel state, CPL 0, RIP 0xffff_ffff_8100_0000.
    pub(crate) fn long64() -> CpuState {
        let mut s = CpuState::default();
        s.sregs.cr0 = 0x8005_0033;
        s.sregs.cr4 = 0x0020_06b0;
        s.sregs.efer = 0xd01;
        s.sregs.cs.l = 1;
        s.sregs.cs.selector = 0x10;
        s.sregs.cs.present = 1;
        s.sregs.cs.s = 1;
        s.sregs.cs.type_ = 0xb;
        s.sregs.ss.selector = 0x18;
        s.sregs.ss.present = 1;
        s.sregs.ss.db = 1;
        s.sregs.ss.s = 1;
        s.sregs.ss.type_ = 3;
        s.regs.rip = 0xffff_ffff_8100_0000;
        s.regs.rsp = 0xffff_c900_0000_3f00;
        s.regs.rflags = 0x2;
        s
    }

    /// A flat 32-bit protected-mode state, CPL 0, EIP 0x0010_0000.
    pub(crate) fn prot32() -> CpuState {
        let mut s = CpuState::default();
        s.sregs.cr0 = 0x11;
        s.sregs.cs.db = 1;
        s.sregs.cs.selector = 0x8;
        s.sregs.cs.present = 1;
        s.sregs.cs.s = 1;
        s.sregs.cs.type_ = 0xb;
        s.sregs.cs.limit = 0xffff_ffff;
        s.sregs.ss.db = 1;
        s.sregs.ss.selector = 0x10;
        s.sregs.ss.present = 1;
        s.sregs.ss.s = 1;
        s.sregs.ss.type_ = 3;
        s.regs.rip = 0x0010_0000;
        s.regs.rsp = 0x0009_f000;
        s.regs.rflags = 0x2;
        s
    }

    /// A real-mode state with CS = 0x1000 (base 0x10000), IP 0x100.
    pub(crate) fn real16() -> CpuState {
        let mut s = CpuState::default();
        s.sregs.cs.selector = 0x1000;
        s.sregs.cs.base = 0x10000;
        s.regs.rip = 0x100;
        s.regs.rflags = 0x2;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::test_states::*;
    use super::*;

    #[test]
    fn bitness_follows_mode() {
        assert_eq!(long64().bitness(), 64);
        assert_eq!(prot32().bitness(), 32);
        assert_eq!(real16().bitness(), 16);
        let mut compat = long64();
        compat.sregs.cs.l = 0;
        compat.sregs.cs.db = 1;
        assert_eq!(compat.bitness(), 32, "compatibility mode decodes as 32-bit");
        let mut vm86 = prot32();
        vm86.regs.rflags |= rflags::VM;
        assert_eq!(vm86.bitness(), 16);
        assert_eq!(vm86.cpl(), 3);
    }

    #[test]
    fn cpl_comes_from_ss_dpl_in_protected_mode() {
        let mut s = long64();
        assert_eq!(s.cpl(), 0);
        s.sregs.ss.dpl = 3;
        assert_eq!(s.cpl(), 3);
        let mut r = real16();
        r.sregs.ss.dpl = 3;
        assert_eq!(r.cpl(), 0, "real mode is always CPL 0");
    }

    #[test]
    fn linear_rip_adds_cs_base_outside_64_bit_mode() {
        assert_eq!(real16().linear_rip(), 0x10100);
        let mut l = long64();
        l.sregs.cs.base = 0x1234; // ignored in 64-bit mode
        assert_eq!(l.linear_rip(), 0xffff_ffff_8100_0000);
        let mut p = prot32();
        p.sregs.cs.base = 0xffff_f000;
        p.regs.rip = 0x2000;
        assert_eq!(p.linear_rip(), 0x1000, "32-bit linear addresses wrap");
    }
}
