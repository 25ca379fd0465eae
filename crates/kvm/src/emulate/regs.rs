//! Reading and writing general-purpose registers by their iced-x86 name, with the x86 rules for
//! partial writes: 8- and 16-bit writes keep the other bits, 32-bit writes zero the upper half.

use iced_x86::Register;
use kvm_bindings::kvm_regs;

/// RFLAGS bits the completer reads or writes.
pub(super) use crate::regs::rflags;

fn slot(regs: &kvm_regs, full: Register) -> Option<u64> {
    Some(match full {
        Register::RAX => regs.rax,
        Register::RCX => regs.rcx,
        Register::RDX => regs.rdx,
        Register::RBX => regs.rbx,
        Register::RSP => regs.rsp,
        Register::RBP => regs.rbp,
        Register::RSI => regs.rsi,
        Register::RDI => regs.rdi,
        Register::R8 => regs.r8,
        Register::R9 => regs.r9,
        Register::R10 => regs.r10,
        Register::R11 => regs.r11,
        Register::R12 => regs.r12,
        Register::R13 => regs.r13,
        Register::R14 => regs.r14,
        Register::R15 => regs.r15,
        _ => return None,
    })
}

fn slot_mut(regs: &mut kvm_regs, full: Register) -> Option<&mut u64> {
    Some(match full {
        Register::RAX => &mut regs.rax,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RBX => &mut regs.rbx,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        _ => return None,
    })
}

fn is_high_byte(reg: Register) -> bool {
    matches!(
        reg,
        Register::AH | Register::CH | Register::DH | Register::BH
    )
}

/// The value of a general-purpose register of any width; `None` for other registers.
pub(super) fn read_gpr(regs: &kvm_regs, reg: Register) -> Option<u64> {
    if !reg.is_gpr() {
        return None;
    }
    let full = slot(regs, reg.full_register())?;
    Some(if is_high_byte(reg) {
        (full >> 8) & 0xff
    } else {
        full & width_mask(reg.size())
    })
}

/// Writes a general-purpose register of any width as the CPU would; false for other registers.
pub(super) fn write_gpr(regs: &mut kvm_regs, reg: Register, value: u64) -> bool {
    if !reg.is_gpr() {
        return false;
    }
    let size = reg.size();
    let high = is_high_byte(reg);
    let Some(full) = slot_mut(regs, reg.full_register()) else {
        return false;
    };
    *full = match (size, high) {
        (1, true) => (*full & !0xff00) | ((value & 0xff) << 8),
        (1, false) => (*full & !0xff) | (value & 0xff),
        (2, _) => (*full & !0xffff) | (value & 0xffff),
        (4, _) => value & 0xffff_ffff,
        _ => value,
    };
    true
}

/// All ones in the low `bytes` bytes.
pub(super) fn width_mask(bytes: usize) -> u64 {
    match bytes {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_writes_follow_x86_rules() {
        let mut r = kvm_regs {
            rax: 0x1122_3344_5566_7788,
            ..Default::default()
        };
        assert!(write_gpr(&mut r, Register::AL, 0xaa));
        assert_eq!(r.rax, 0x1122_3344_5566_77aa);
        assert!(write_gpr(&mut r, Register::AH, 0xbb));
        assert_eq!(r.rax, 0x1122_3344_5566_bbaa);
        assert!(write_gpr(&mut r, Register::AX, 0x1234));
        assert_eq!(r.rax, 0x1122_3344_5566_1234);
        assert!(write_gpr(&mut r, Register::EAX, 0xdead_beef));
        assert_eq!(r.rax, 0xdead_beef, "32-bit writes zero-extend");
        assert!(write_gpr(&mut r, Register::R15, u64::MAX));
        assert_eq!(r.r15, u64::MAX);
        assert!(!write_gpr(&mut r, Register::XMM0, 1));
    }

    #[test]
    fn reads_pick_the_named_part() {
        let r = kvm_regs {
            rbx: 0x1122_3344_5566_7788,
            r9: 0xffff_0000_ffff_0001,
            ..Default::default()
        };
        assert_eq!(read_gpr(&r, Register::BL), Some(0x88));
        assert_eq!(read_gpr(&r, Register::BH), Some(0x77));
        assert_eq!(read_gpr(&r, Register::BX), Some(0x7788));
        assert_eq!(read_gpr(&r, Register::EBX), Some(0x5566_7788));
        assert_eq!(read_gpr(&r, Register::RBX), Some(0x1122_3344_5566_7788));
        assert_eq!(read_gpr(&r, Register::R9D), Some(0xffff_0001));
        assert_eq!(read_gpr(&r, Register::CS), None);
    }
}
