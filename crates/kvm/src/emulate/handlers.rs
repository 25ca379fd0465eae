//! The instructions the completer carries out, one function each.

use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};

use super::regs::{read_gpr, rflags, width_mask, write_gpr};
use super::{vector, AccessError, Completion, CpuState, EmulateError, GuestAccess};

/// CR4.LA57: 57-bit linear addresses.
use crate::regs::CR4_LA57;

#[path = "x87.rs"]
pub(super) mod x87;

/// Carries out `instr` on `cpu` and `mem`.
pub(super) fn execute(
    instr: &Instruction,
    cpu: &mut CpuState,
    mem: &mut dyn GuestAccess,
) -> Result<Completion, EmulateError> {
    let mut op = Op {
        instr,
        cpu: &mut *cpu,
        mem,
    };
    let result = match instr.code() {
        Code::Int3 => {
            op.advance();
            Ok(exception(vector::BP, None))
        }
        Code::Wait => Ok(op.advance()),
        // The x87 and its control instructions (OVMF's SEC runs `fninit`, `fldcw` and
        // `ldmxcsr`; its drivers compute on the x87), which this host's emulator lacks.
        _ if x87::handles(instr) => op.x87(),
        Code::Clac => op.set_ac(false),
        Code::Stac => op.set_ac(true),
        Code::Ud2 => Ok(exception(vector::UD, None)),
        Code::Popcnt_r16_rm16 | Code::Popcnt_r32_rm32 | Code::Popcnt_r64_rm64 => op.popcnt(),
        Code::Cmpxchg8b_m64 | Code::Cmpxchg16b_m128 => op.cmpxchg_double(),
        Code::Rdrand_r16
        | Code::Rdrand_r32
        | Code::Rdrand_r64
        | Code::Rdseed_r16
        | Code::Rdseed_r32
        | Code::Rdseed_r64 => op.random(),
        Code::Movbe_r16_m16 | Code::Movbe_r32_m32 | Code::Movbe_r64_m64 => op.movbe_load(),
        Code::Movbe_m16_r16 | Code::Movbe_m32_r32 | Code::Movbe_m64_r64 => op.movbe_store(),
        Code::Rdpid_r32 | Code::Rdpid_r64 => op.rdpid(),
        // Linux's MDS mitigation (`CLEAR_CPU_BUFFERS`) runs `verw` on its data selector at
        // every return to user mode; the flag result is all the architecture defines.
        Code::Verw_rm16 | Code::Verw_r32m16 | Code::Verw_r64m16 => op.verify_segment(true),
        Code::Verr_rm16 | Code::Verr_r32m16 | Code::Verr_r64m16 => op.verify_segment(false),
        _ => Err(Stop::Fail(unsupported(instr))),
    };
    match result {
        Ok(done) => Ok(done),
        Err(Stop::Raise(exception)) => Ok(exception),
        Err(Stop::PageFault { gva, error_code }) => {
            cpu.sregs.cr2 = gva;
            Ok(exception(vector::PF, Some(error_code)))
        }
        Err(Stop::Fail(e)) => Err(e),
    }
}

/// Why an instruction stopped before taking effect (RIP still at the instruction).
enum Stop {
    /// It raises this exception.
    Raise(Completion),
    /// It raises a page fault at `gva` (which becomes CR2).
    PageFault { gva: u64, error_code: u32 },
    /// It cannot be completed.
    Fail(EmulateError),
}

/// #PF error code bits.
const PF_PRESENT: u32 = 1 << 0;
const PF_WRITE: u32 = 1 << 1;
const PF_USER: u32 = 1 << 2;

type Step<T = Completion> = Result<T, Stop>;

fn exception(vector: u8, error_code: Option<u32>) -> Completion {
    Completion::InjectException { vector, error_code }
}

fn unsupported(instr: &Instruction) -> EmulateError {
    let reason = match instr.mnemonic() {
        Mnemonic::Xsave
        | Mnemonic::Xsave64
        | Mnemonic::Xsaveopt
        | Mnemonic::Xsaveopt64
        | Mnemonic::Xsavec
        | Mnemonic::Xsavec64
        | Mnemonic::Xsaves
        | Mnemonic::Xsaves64
        | Mnemonic::Xrstor
        | Mnemonic::Xrstor64
        | Mnemonic::Xrstors
        | Mnemonic::Xrstors64
        | Mnemonic::Xsetbv
        | Mnemonic::Xgetbv => {
            "the XSAVE family is not completed: boot the guest kernel with `noxsave`"
        }
        Mnemonic::Hlt => "hlt exits to the VMM as KVM_EXIT_HLT and never needs completing",
        _ => "no user-space completion for this instruction",
    };
    EmulateError::Unsupported {
        instruction: crate::diagnose::intel_text(instr),
        reason,
    }
}

/// One instruction being carried out.
struct Op<'a> {
    instr: &'a Instruction,
    cpu: &'a mut CpuState,
    mem: &'a mut dyn GuestAccess,
}

impl Op<'_> {
    /// Moves RIP past the instruction.
    fn advance(&mut self) -> Completion {
        self.cpu.regs.rip = self.cpu.mask_ip(self.instr.next_ip());
        Completion::Done
    }

    fn reg(&self, operand: u32) -> Register {
        self.instr.op_register(operand)
    }

    fn read_reg(&self, operand: u32) -> u64 {
        read_gpr(&self.cpu.regs, self.reg(operand)).unwrap_or(0)
    }

    fn write_reg(&mut self, operand: u32, value: u64) {
        let reg = self.reg(operand);
        write_gpr(&mut self.cpu.regs, reg, value);
    }

    /// Clears the arithmetic flags, then sets those in `set`.
    fn set_status_flags(&mut self, set: u64) {
        self.cpu.regs.rflags = (self.cpu.regs.rflags & !rflags::STATUS) | set;
    }

    /// The linear address of the memory operand, or the #GP a non-canonical address raises.
    fn address(&self) -> Step<u64> {
        let cpu = &*self.cpu;
        let va = (0..self.instr.op_count())
            .find(|&i| self.instr.op_kind(i) == OpKind::Memory)
            .and_then(|operand| {
                self.instr.virtual_address(operand, 0, |reg, _, _| {
                    if reg.is_segment_register() {
                        Some(segment_base(cpu, reg))
                    } else {
                        read_gpr(&cpu.regs, reg)
                    }
                })
            })
            .ok_or_else(|| Stop::Fail(unsupported(self.instr)))?;
        let linear = cpu.mask_linear(va);
        if cpu.long_mode_64() && !canonical(linear, cpu.sregs.cr4 & CR4_LA57 != 0) {
            let vector = if self.instr.memory_segment() == Register::SS {
                vector::SS
            } else {
                vector::GP
            };
            return Err(Stop::Raise(exception(vector, Some(0))));
        }
        Ok(linear)
    }

    /// The value of operand `operand` (a register or memory) of `size` bytes.
    fn read_rm(&mut self, operand: u32, size: usize) -> Step<u64> {
        if self.instr.op_kind(operand) == OpKind::Register {
            return Ok(self.read_reg(operand));
        }
        let linear = self.address()?;
        let mut buf = [0u8; 8];
        let result = self.mem.read(linear, &mut buf[..size]);
        self.check(result, false)?;
        Ok(u64::from_le_bytes(buf))
    }

    /// Turns a failed access into the #PF the CPU would raise, or an error when the address
    /// is not RAM.
    fn check<T>(&self, result: Result<T, AccessError>, write: bool) -> Step<T> {
        let user = if self.cpu.cpl() == 3 { PF_USER } else { 0 };
        let write = if write { PF_WRITE } else { 0 };
        result.map_err(|e| match e {
            AccessError::Unmapped(gva) => Stop::PageFault {
                gva,
                error_code: write | user,
            },
            AccessError::ReadOnly(gva) => Stop::PageFault {
                gva,
                error_code: PF_PRESENT | write | user,
            },
            AccessError::Unbacked(_) => Stop::Fail(EmulateError::Memory(e)),
        })
    }

    /// `verw` / `verr`: ZF set when the selector names a GDT segment the current privilege
    /// level may write (`verw`) or read (`verr`); no other flag changes. An LDT selector is
    /// reported inaccessible (no guest Vessel runs uses an LDT at that point). Real mode
    /// raises #UD.
    fn verify_segment(&mut self, write: bool) -> Step {
        if self.cpu.sregs.cr0 & 1 == 0 {
            return Ok(exception(vector::UD, None));
        }
        let selector = self.read_rm(0, 2)? as u16;
        let index = u64::from(selector & !7);
        let gdt = self.cpu.sregs.gdt;
        let ok = if selector & 4 != 0 || index == 0 || index + 7 > u64::from(gdt.limit) {
            false
        } else {
            let mut d = [0u8; 8];
            let at = self.cpu.mask_linear(gdt.base.wrapping_add(index));
            let result = self.mem.read(at, &mut d);
            self.check(result, false)?;
            let d = u64::from_le_bytes(d);
            let (system, code) = (d & (1 << 44) == 0, d & (1 << 43) != 0);
            // Writable data; readable data or code; conforming code skips the DPL check.
            let bit41 = d & (1 << 41) != 0;
            let conforming = code && d & (1 << 42) != 0;
            let dpl = ((d >> 45) & 3) as u8;
            let rpl = (selector & 3) as u8;
            let allowed = conforming || (dpl >= self.cpu.cpl() && dpl >= rpl);
            let kind = match write {
                true => !code && bit41,
                false => !code || bit41,
            };
            !system && kind && (allowed || (!write && conforming))
        };
        let flags = self.cpu.regs.rflags & !rflags::ZF;
        self.cpu.regs.rflags = flags | if ok { rflags::ZF } else { 0 };
        Ok(self.advance())
    }

    fn set_ac(&mut self, on: bool) -> Step {
        if self.cpu.cpl() != 0 {
            return Ok(exception(vector::UD, None));
        }
        if on {
            self.cpu.regs.rflags |= rflags::AC;
        } else {
            self.cpu.regs.rflags &= !rflags::AC;
        }
        Ok(self.advance())
    }

    /// `popcnt r, r/m`: ZF when the source is 0, the other status flags cleared.
    fn popcnt(&mut self) -> Step {
        let size = self.reg(0).size();
        let source = self.read_rm(1, size)? & width_mask(size);
        self.write_reg(0, u64::from(source.count_ones()));
        self.set_status_flags(if source == 0 { rflags::ZF } else { 0 });
        Ok(self.advance())
    }

    /// `cmpxchg8b m64` / `cmpxchg16b m128`: compare EDX:EAX (RDX:RAX) with memory; if equal
    /// store ECX:EBX (RCX:RBX) and set ZF, else load memory into EDX:EAX (RDX:RAX) and clear ZF.
    fn cmpxchg_double(&mut self) -> Step {
        let half = if self.instr.code() == Code::Cmpxchg16b_m128 {
            8
        } else {
            4
        };
        let linear = self.address()?;
        if half == 8 && linear % 16 != 0 {
            return Ok(exception(vector::GP, Some(0)));
        }
        let regs = &self.cpu.regs;
        let mut expected = [0u8; 16];
        expected[..half].copy_from_slice(&regs.rax.to_le_bytes()[..half]);
        expected[half..2 * half].copy_from_slice(&regs.rdx.to_le_bytes()[..half]);
        let mut new = [0u8; 16];
        new[..half].copy_from_slice(&regs.rbx.to_le_bytes()[..half]);
        new[half..2 * half].copy_from_slice(&regs.rcx.to_le_bytes()[..half]);

        let result = self
            .mem
            .compare_exchange(linear, &mut expected[..2 * half], &new[..2 * half]);
        // A locked read-modify-write faults as a write.
        let swapped = self.check(result, true)?;
        if swapped {
            self.cpu.regs.rflags |= rflags::ZF;
        } else {
            self.cpu.regs.rflags &= !rflags::ZF;
            let mut lo = [0u8; 8];
            let mut hi = [0u8; 8];
            lo[..half].copy_from_slice(&expected[..half]);
            hi[..half].copy_from_slice(&expected[half..2 * half]);
            // Writing EAX/EDX zero-extends in 64-bit mode, as the CPU does.
            self.cpu.regs.rax = u64::from_le_bytes(lo);
            self.cpu.regs.rdx = u64::from_le_bytes(hi);
        }
        Ok(self.advance())
    }

    /// `rdrand r` / `rdseed r`: random bits from the host kernel, CF=1, other flags cleared.
    fn random(&mut self) -> Step {
        let mut buf = [0u8; 8];
        if !getrandom(&mut buf) {
            // The architectural way to say "no entropy now": CF=0, destination 0.
            self.write_reg(0, 0);
            self.set_status_flags(0);
        } else {
            self.write_reg(0, u64::from_le_bytes(buf));
            self.set_status_flags(rflags::CF);
        }
        Ok(self.advance())
    }

    /// `movbe r, m`: load with the bytes reversed.
    fn movbe_load(&mut self) -> Step {
        let size = self.reg(0).size();
        let value = self.read_rm(1, size)?;
        let swapped = value.swap_bytes() >> (64 - 8 * size);
        self.write_reg(0, swapped);
        Ok(self.advance())
    }

    /// `movbe m, r`: store with the bytes reversed.
    fn movbe_store(&mut self) -> Step {
        let size = self.reg(1).size();
        let linear = self.address()?;
        let value = self.read_reg(1);
        let bytes = value.to_be_bytes();
        let result = self.mem.write(linear, &bytes[8 - size..]);
        self.check(result, true)?;
        Ok(self.advance())
    }

    /// `rdpid r`: the guest's IA32_TSC_AUX, zero-extended.
    fn rdpid(&mut self) -> Step {
        let value = u64::from(self.mem.tsc_aux());
        self.write_reg(0, value);
        Ok(self.advance())
    }
}

/// The base of a segment register: from `sregs`, except that ES, CS, SS and DS have base 0 in
/// 64-bit mode.
fn segment_base(cpu: &CpuState, reg: Register) -> u64 {
    let s = &cpu.sregs;
    let flat_in_64 = cpu.long_mode_64();
    match reg {
        Register::FS => s.fs.base,
        Register::GS => s.gs.base,
        _ if flat_in_64 => 0,
        Register::ES => s.es.base,
        Register::CS => s.cs.base,
        Register::SS => s.ss.base,
        Register::DS => s.ds.base,
        _ => 0,
    }
}

/// True when `addr` is canonical for 48-bit (or, with LA57, 57-bit) linear addresses.
fn canonical(addr: u64, la57: bool) -> bool {
    let bits = if la57 { 57 } else { 48 };
    let shift = 64 - bits;
    (((addr << shift) as i64) >> shift) as u64 == addr
}

/// Fills `buf` from the host kernel's random source; false when it could not.
fn getrandom(buf: &mut [u8]) -> bool {
    // SAFETY: getrandom writes at most buf.len() bytes into buf, a valid exclusive slice.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    usize::try_from(n).ok() == Some(buf.len())
}
