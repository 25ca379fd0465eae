//! The x87 floating-point instructions, carried out on the vCPU's FPU state (`KVM_GET_FPU`).
//!
//! Firmware and kernels compiled without SSE (OVMF's drivers are) do their few floating-point
//! computations on the x87; this host's emulator has none of it. Loads, stores and moves keep
//! the 80-bit values exactly; arithmetic is done in `f64`, which matches the hardware when
//! the precision control is double (OVMF sets it so) and rounds to nearest otherwise.
//! Exceptions are flagged in the status word as if masked (stack faults, invalid operands,
//! division by zero); an unmasked one is not delivered as #MF. The control instructions
//! (`fninit`, `fldcw`, `fnstsw`, `ldmxcsr`...) are here too: OVMF's SEC starts with them.

use iced_x86::{Instruction, MemorySize, Mnemonic, OpKind, Register};
use kvm_bindings::kvm_fpu;

use super::{exception, rflags, unsupported, vector, Op, Step, Stop};

/// Status word bits.
const FSW_IE: u16 = 1 << 0;
const FSW_ZE: u16 = 1 << 2;
const FSW_SF: u16 = 1 << 6;
const FSW_C0: u16 = 1 << 8;
const FSW_C1: u16 = 1 << 9;
const FSW_C2: u16 = 1 << 10;
const FSW_C3: u16 = 1 << 14;
const FSW_CC: u16 = FSW_C0 | FSW_C1 | FSW_C2 | FSW_C3;
const FSW_TOP_SHIFT: u16 = 11;
/// The x87 control word `fninit` sets: every exception masked, 64-bit precision, round to
/// nearest.
const FCW_INIT: u16 = 0x037f;
/// The MXCSR bits software may set (the default MXCSR_MASK): the rest raise #GP.
const MXCSR_WRITABLE: u32 = 0xffff;
const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR4_OSFXSR: u64 = 1 << 9;

/// An 80-bit extended-precision value: a 64-bit significand with its integer bit, then sign and
/// a 15-bit exponent (bias 16383).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct F80 {
    pub mant: u64,
    pub se: u16,
}

const BIAS: i32 = 16383;

impl F80 {
    pub const ZERO: F80 = F80 { mant: 0, se: 0 };
    pub const ONE: F80 = F80 {
        mant: 1 << 63,
        se: 0x3fff,
    };
    /// The "real indefinite" quiet NaN that masked invalid operations produce.
    pub const INDEFINITE: F80 = F80 {
        mant: 0xc000_0000_0000_0000,
        se: 0xffff,
    };

    pub fn from_bytes(b: &[u8]) -> F80 {
        F80 {
            mant: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            se: u16::from_le_bytes([b[8], b[9]]),
        }
    }

    pub fn to_bytes(self) -> [u8; 10] {
        let mut b = [0u8; 10];
        b[..8].copy_from_slice(&self.mant.to_le_bytes());
        b[8..].copy_from_slice(&self.se.to_le_bytes());
        b
    }

    fn negative(self) -> bool {
        self.se & 0x8000 != 0
    }

    fn exp(self) -> i32 {
        i32::from(self.se & 0x7fff)
    }

    /// Exact: every `f64` is an `F80`.
    pub fn from_f64(x: f64) -> F80 {
        let bits = x.to_bits();
        let sign = ((bits >> 48) as u16) & 0x8000;
        let exp = ((bits >> 52) & 0x7ff) as i32;
        let frac = bits & ((1 << 52) - 1);
        match (exp, frac) {
            (0, 0) => F80 { mant: 0, se: sign },
            (0, f) => {
                let lz = f.leading_zeros() as i32;
                F80 {
                    mant: f << lz,
                    se: sign | (63 - lz - 1074 + BIAS) as u16,
                }
            }
            (0x7ff, f) => F80 {
                mant: (1 << 63) | (f << 11),
                se: sign | 0x7fff,
            },
            (e, f) => F80 {
                mant: (1 << 63) | (f << 11),
                se: sign | (e - 1023 + BIAS) as u16,
            },
        }
    }

    /// Rounded to nearest (even).
    pub fn to_f64(self) -> f64 {
        let sign = u64::from(self.negative()) << 63;
        if self.exp() == 0x7fff {
            let nan = self.mant << 1 != 0;
            let payload = if nan {
                (1 << 51) | ((self.mant << 1) >> 12)
            } else {
                0
            };
            return f64::from_bits(sign | (0x7ff << 52) | payload);
        }
        if self.mant == 0 {
            return f64::from_bits(sign);
        }
        let lz = self.mant.leading_zeros() as i32;
        let m = self.mant << lz;
        // The value is m * 2^(unbiased - 63), m in [2^63, 2^64).
        let unbiased = self.exp().max(1) - BIAS - lz;
        if unbiased > 1023 {
            return f64::from_bits(sign | (0x7ff << 52));
        }
        // Normal results keep 53 bits; subnormal ones fewer.
        let shift = 11 + (-1022 - unbiased).max(0);
        if shift > 64 {
            return f64::from_bits(sign);
        }
        let mant = round_shift(m, shift as u32, Rounding::Nearest, false);
        let field = if unbiased >= -1022 {
            ((unbiased + 1022) as u64) << 52
        } else {
            0
        };
        // A mantissa that rounded up to 2^53 carries into the exponent, as IEEE encoding
        // wants (and to infinity past the largest finite value).
        f64::from_bits(sign | (field + (mant & !(1 << 52)) + (mant & (1 << 52))))
    }

    /// Exact.
    pub fn from_i64(v: i64) -> F80 {
        if v == 0 {
            return F80::ZERO;
        }
        let sign = if v < 0 { 0x8000 } else { 0 };
        let mag = v.unsigned_abs();
        let lz = mag.leading_zeros() as i32;
        F80 {
            mant: mag << lz,
            se: sign | (BIAS + 63 - lz) as u16,
        }
    }

    /// The integer `rc` rounds this to; `None` for NaN, infinity or a magnitude of 2^64 or
    /// more.
    pub fn to_int(self, rc: Rounding) -> Option<i128> {
        if self.exp() == 0x7fff {
            return None;
        }
        if self.mant == 0 {
            return Some(0);
        }
        let shift = BIAS + 63 - self.exp().max(1);
        let mag = if shift <= 0 {
            if self.mant.leading_zeros() < (-shift) as u32 {
                return None;
            }
            self.mant << -shift
        } else if shift > 64 {
            // Below 1/2: only directed rounding away from zero gives 1.
            u64::from(rc.away(self.negative()))
        } else {
            round_shift(self.mant, shift as u32, rc, self.negative())
        };
        let mag = i128::from(mag);
        Some(if self.negative() { -mag } else { mag })
    }
}

/// The x87 rounding control (FCW bits 10-11).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rounding {
    Nearest,
    Down,
    Up,
    Zero,
}

impl Rounding {
    fn of(fcw: u16) -> Rounding {
        match (fcw >> 10) & 3 {
            0 => Rounding::Nearest,
            1 => Rounding::Down,
            2 => Rounding::Up,
            _ => Rounding::Zero,
        }
    }

    /// Whether an inexact magnitude of a value of this sign rounds away from zero.
    fn away(self, negative: bool) -> bool {
        match self {
            Rounding::Down => negative,
            Rounding::Up => !negative,
            Rounding::Nearest | Rounding::Zero => false,
        }
    }
}

/// `m >> shift` (1..=64) rounded as `rc` says for a value of the given sign.
fn round_shift(m: u64, shift: u32, rc: Rounding, negative: bool) -> u64 {
    let (int, rem, half) = if shift == 64 {
        (0u64, m, 1u64 << 63)
    } else {
        (m >> shift, m & ((1u64 << shift) - 1), 1u64 << (shift - 1))
    };
    let up = match rc {
        Rounding::Nearest => rem > half || (rem == half && int & 1 == 1),
        _ if rem == 0 => false,
        other => other.away(negative),
    };
    int + u64::from(up)
}

/// The register stack of a `kvm_fpu` (its `fpr` is in stack order, ST0 first; its abridged
/// tag has one bit per physical register).
struct Stack<'a>(&'a mut kvm_fpu);

impl Stack<'_> {
    fn top(&self) -> u8 {
        ((self.0.fsw >> FSW_TOP_SHIFT) & 7) as u8
    }

    fn set_top(&mut self, top: u8) {
        self.0.fsw = (self.0.fsw & !(7 << FSW_TOP_SHIFT)) | (u16::from(top & 7) << FSW_TOP_SHIFT);
    }

    fn valid(&self, i: usize) -> bool {
        self.0.ftwx & (1 << ((usize::from(self.top()) + i) & 7)) != 0
    }

    fn set_valid(&mut self, i: usize, on: bool) {
        let bit = 1 << ((usize::from(self.top()) + i) & 7);
        if on {
            self.0.ftwx |= bit;
        } else {
            self.0.ftwx &= !bit;
        }
    }

    fn flag(&mut self, bits: u16) {
        self.0.fsw |= bits;
    }

    /// ST(i), or the indefinite NaN (and a stack fault) when it is empty.
    fn get(&mut self, i: usize) -> F80 {
        if !self.valid(i) {
            self.0.fsw &= !FSW_C1;
            self.flag(FSW_IE | FSW_SF);
            return F80::INDEFINITE;
        }
        F80::from_bytes(&self.0.fpr[i])
    }

    fn set(&mut self, i: usize, v: F80) {
        self.0.fpr[i] = [0; 16];
        self.0.fpr[i][..10].copy_from_slice(&v.to_bytes());
        self.set_valid(i, true);
    }

    /// Moves TOP by one and the stack-ordered registers with it.
    fn rotate(&mut self, push: bool) {
        if push {
            self.0.fpr.rotate_right(1);
            self.set_top(self.top().wrapping_sub(1));
        } else {
            self.0.fpr.rotate_left(1);
            self.set_top(self.top().wrapping_add(1));
        }
    }

    fn push(&mut self, v: F80) {
        self.rotate(true);
        let v = if self.valid(0) {
            self.flag(FSW_IE | FSW_SF | FSW_C1);
            F80::INDEFINITE
        } else {
            v
        };
        self.set(0, v);
    }

    fn pop(&mut self) {
        self.set_valid(0, false);
        self.rotate(false);
    }
}

/// The stack register an operand names, as an index (ST0 = 0).
fn st_index(reg: Register) -> Option<usize> {
    reg.is_st().then(|| reg as usize - Register::ST0 as usize)
}

/// Whether `instr` is one of the x87 instructions [`Op::x87`] carries out.
pub(super) fn handles(instr: &Instruction) -> bool {
    use Mnemonic::*;
    matches!(
        instr.mnemonic(),
        Fld | Fild
            | Fld1
            | Fldz
            | Fldpi
            | Fldl2e
            | Fldl2t
            | Fldlg2
            | Fldln2
            | Fst
            | Fstp
            | Fist
            | Fistp
            | Fisttp
            | Fadd
            | Faddp
            | Fiadd
            | Fsub
            | Fsubp
            | Fisub
            | Fsubr
            | Fsubrp
            | Fisubr
            | Fmul
            | Fmulp
            | Fimul
            | Fdiv
            | Fdivp
            | Fidiv
            | Fdivr
            | Fdivrp
            | Fidivr
            | Fcom
            | Fcomp
            | Fcompp
            | Fucom
            | Fucomp
            | Fucompp
            | Ficom
            | Ficomp
            | Fcomi
            | Fcomip
            | Fucomi
            | Fucomip
            | Ftst
            | Fxam
            | Fchs
            | Fabs
            | Fxch
            | Ffree
            | Fincstp
            | Fdecstp
            | Frndint
            | Fsqrt
            | Fnop
            | Fcmovb
            | Fcmove
            | Fcmovbe
            | Fcmovu
            | Fcmovnb
            | Fcmovne
            | Fcmovnbe
            | Fcmovnu
            | Fninit
            | Finit
            | Fnclex
            | Fclex
            | Fldcw
            | Fnstcw
            | Fstcw
            | Fnstsw
            | Fstsw
            | Ldmxcsr
            | Vldmxcsr
            | Stmxcsr
            | Vstmxcsr
    )
}

/// The arithmetic of an instruction: `dest op src`.
#[derive(Clone, Copy)]
enum Arith {
    Add,
    Sub,
    Subr,
    Mul,
    Div,
    Divr,
}

impl Op<'_> {
    /// Carries out an instruction [`handles`] accepts, on the vCPU's FPU state. CR0.EM or TS
    /// raise #NM, as the CPU does (an OS that switches FPU state lazily relies on it); the SSE
    /// control instructions raise #UD with CR0.EM set or without CR4.OSFXSR.
    pub(super) fn x87(&mut self) -> Step {
        let sse = matches!(
            self.instr.mnemonic(),
            Mnemonic::Ldmxcsr | Mnemonic::Vldmxcsr | Mnemonic::Stmxcsr | Mnemonic::Vstmxcsr
        );
        let (cr0, cr4) = (self.cpu.sregs.cr0, self.cpu.sregs.cr4);
        if sse && (cr0 & CR0_EM != 0 || cr4 & CR4_OSFXSR == 0) {
            return Ok(exception(vector::UD, None));
        }
        if cr0 & (CR0_EM | CR0_TS) != 0 {
            return Ok(exception(vector::NM, None));
        }
        let Some(mut fpu) = self.mem.fpu() else {
            return Err(self.no_fpu("the VMM gives the completer no access to the FPU state"));
        };
        let before = fpu;
        self.x87_on(&mut fpu)?;
        if fpu != before && !self.mem.set_fpu(&fpu) {
            return Err(self.no_fpu("the VMM could not set the FPU state"));
        }
        Ok(self.advance())
    }

    /// Writes `bytes` at the memory operand.
    fn store(&mut self, bytes: &[u8]) -> Step<()> {
        let linear = self.address()?;
        let result = self.mem.write(linear, bytes);
        self.check(result, true)
    }

    fn no_fpu(&self, reason: &'static str) -> Stop {
        Stop::Fail(super::EmulateError::Unsupported {
            instruction: crate::diagnose::intel_text(self.instr),
            reason,
        })
    }

    /// Operand `i`'s value: a stack register or memory (float or integer).
    fn fp_operand(&mut self, s: &mut Stack<'_>, i: u32) -> Step<F80> {
        if self.instr.op_kind(i) == OpKind::Register {
            return Ok(st_index(self.reg(i)).map_or(F80::INDEFINITE, |r| s.get(r)));
        }
        let linear = self.address()?;
        let mut b = [0u8; 10];
        let size = self.instr.memory_size();
        let n = size.size().min(10);
        let result = self.mem.read(linear, &mut b[..n]);
        self.check(result, false)?;
        let int = |n: usize| {
            let v = i64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
            let shift = 64 - 8 * n as u32;
            F80::from_i64((v << shift) >> shift)
        };
        Ok(match size {
            MemorySize::Float32 => {
                F80::from_f64(f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            }
            MemorySize::Float64 => F80::from_f64(f64::from_le_bytes(b[..8].try_into().expect("8"))),
            MemorySize::Float80 => F80::from_bytes(&b),
            MemorySize::Int16 | MemorySize::UInt16 => int(2),
            MemorySize::Int32 | MemorySize::UInt32 => int(4),
            _ => int(8),
        })
    }

    /// Stores `v` in memory operand 0 in the instruction's memory format.
    fn fp_store(&mut self, s: &mut Stack<'_>, v: F80, truncate: bool) -> Step<()> {
        let size = self.instr.memory_size();
        let bytes: Vec<u8> = match size {
            MemorySize::Float32 => (v.to_f64() as f32).to_le_bytes().to_vec(),
            MemorySize::Float64 => v.to_f64().to_le_bytes().to_vec(),
            MemorySize::Float80 => v.to_bytes().to_vec(),
            _ => {
                let n = size.size().clamp(2, 8);
                let rc = match truncate {
                    true => Rounding::Zero,
                    false => Rounding::of(s.0.fcw),
                };
                let max = 1i128 << (8 * n - 1);
                let int = match v.to_int(rc).filter(|i| (-max..max).contains(i)) {
                    Some(i) => i as i64,
                    None => {
                        s.flag(FSW_IE);
                        i64::MIN >> (64 - 8 * n)
                    }
                };
                int.to_le_bytes()[..n].to_vec()
            }
        };
        let linear = self.address()?;
        let result = self.mem.write(linear, &bytes);
        self.check(result, true)
    }

    /// Where operand `i` is on the stack (a register operand), else `None` (memory).
    fn st_of(&self, i: u32) -> Option<usize> {
        (self.instr.op_kind(i) == OpKind::Register)
            .then(|| st_index(self.reg(i)))
            .flatten()
    }

    /// Changes `fpu` as the instruction does (or stops with the exception it raises).
    fn x87_on(&mut self, fpu: &mut kvm_fpu) -> Step<()> {
        use Mnemonic::*;
        let mut s = Stack(fpu);
        let m = self.instr.mnemonic();
        let last = self.instr.op_count().saturating_sub(1);
        match m {
            Fld | Fild => {
                let v = self.fp_operand(&mut s, last)?;
                s.push(v);
            }
            Fld1 | Fldz | Fldpi | Fldl2e | Fldl2t | Fldlg2 | Fldln2 => s.push(constant(m)),
            Fst | Fstp | Fist | Fistp | Fisttp => {
                let v = s.get(0);
                match self.st_of(0) {
                    Some(i) => s.set(i, v),
                    None => self.fp_store(&mut s, v, m == Fisttp)?,
                }
                if matches!(m, Fstp | Fistp | Fisttp) {
                    s.pop();
                }
            }
            Fadd | Faddp | Fiadd => self.arith(&mut s, Arith::Add)?,
            Fsub | Fsubp | Fisub => self.arith(&mut s, Arith::Sub)?,
            Fsubr | Fsubrp | Fisubr => self.arith(&mut s, Arith::Subr)?,
            Fmul | Fmulp | Fimul => self.arith(&mut s, Arith::Mul)?,
            Fdiv | Fdivp | Fidiv => self.arith(&mut s, Arith::Div)?,
            Fdivr | Fdivrp | Fidivr => self.arith(&mut s, Arith::Divr)?,
            Fcom | Fcomp | Fcompp | Fucom | Fucomp | Fucompp | Ficom | Ficomp | Ftst => {
                let a = s.get(0).to_f64();
                let b = match (m, self.instr.op_count()) {
                    (Ftst, _) => 0.0,
                    (_, 0) => s.get(1).to_f64(),
                    _ => self.fp_operand(&mut s, last)?.to_f64(),
                };
                s.0.fsw &= !FSW_CC;
                s.0.fsw |= match a.partial_cmp(&b) {
                    None => FSW_C3 | FSW_C2 | FSW_C0,
                    Some(std::cmp::Ordering::Less) => FSW_C0,
                    Some(std::cmp::Ordering::Equal) => FSW_C3,
                    Some(std::cmp::Ordering::Greater) => 0,
                };
                let pops = match m {
                    Fcompp | Fucompp => 2,
                    Fcomp | Fucomp | Ficomp => 1,
                    _ => 0,
                };
                for _ in 0..pops {
                    s.pop();
                }
            }
            Fcomi | Fcomip | Fucomi | Fucomip => {
                let a = s.get(0).to_f64();
                let b = self.fp_operand(&mut s, last)?.to_f64();
                let set = match a.partial_cmp(&b) {
                    None => rflags::ZF | rflags::PF | rflags::CF,
                    Some(std::cmp::Ordering::Less) => rflags::CF,
                    Some(std::cmp::Ordering::Equal) => rflags::ZF,
                    Some(std::cmp::Ordering::Greater) => 0,
                };
                self.set_status_flags(set);
                s.0.fsw &= !FSW_C1;
                if matches!(m, Fcomip | Fucomip) {
                    s.pop();
                }
            }
            Fxam => {
                let empty = !s.valid(0);
                let v = F80::from_bytes(&s.0.fpr[0]);
                s.0.fsw &= !FSW_CC;
                if v.negative() {
                    s.0.fsw |= FSW_C1;
                }
                s.0.fsw |= match (empty, v.exp(), v.mant) {
                    (true, _, _) => FSW_C3 | FSW_C0,
                    (_, 0x7fff, m) if m << 1 == 0 => FSW_C2 | FSW_C0,
                    (_, 0x7fff, _) => FSW_C0,
                    (_, _, 0) => FSW_C3,
                    (_, 0, _) => FSW_C3 | FSW_C2,
                    _ => FSW_C2,
                };
            }
            Fchs | Fabs => {
                let v = s.get(0);
                let se = match m {
                    Fchs => v.se ^ 0x8000,
                    _ => v.se & 0x7fff,
                };
                s.set(0, F80 { mant: v.mant, se });
            }
            Fxch => {
                let i = self.st_of(last).unwrap_or(1);
                let (a, b) = (s.get(0), s.get(i));
                s.set(0, b);
                s.set(i, a);
            }
            Ffree => {
                let i = self.st_of(last).unwrap_or(0);
                s.set_valid(i, false);
            }
            Fincstp => s.rotate(false),
            Fdecstp => s.rotate(true),
            Frndint => {
                let v = s.get(0);
                if let Some(i) = v
                    .to_int(Rounding::of(s.0.fcw))
                    .filter(|i| i.unsigned_abs() < 1 << 63)
                {
                    let r = F80::from_i64(i as i64);
                    // Keep the sign of a negative value that rounds to zero.
                    s.set(
                        0,
                        if i == 0 {
                            F80 {
                                mant: 0,
                                se: v.se & 0x8000,
                            }
                        } else {
                            r
                        },
                    );
                }
            }
            Fsqrt => {
                let v = s.get(0).to_f64();
                if v < 0.0 {
                    s.flag(FSW_IE);
                }
                s.set(0, F80::from_f64(v.sqrt()));
            }
            Fcmovb | Fcmove | Fcmovbe | Fcmovu | Fcmovnb | Fcmovne | Fcmovnbe | Fcmovnu => {
                let f = self.cpu.regs.rflags;
                let (cf, zf, pf) = (
                    f & rflags::CF != 0,
                    f & rflags::ZF != 0,
                    f & rflags::PF != 0,
                );
                let take = match m {
                    Fcmovb => cf,
                    Fcmove => zf,
                    Fcmovbe => cf || zf,
                    Fcmovu => pf,
                    Fcmovnb => !cf,
                    Fcmovne => !zf,
                    Fcmovnbe => !cf && !zf,
                    _ => !pf,
                };
                if take {
                    let v = self.fp_operand(&mut s, last)?;
                    s.set(0, v);
                }
            }
            Fnop => {}
            Fninit | Finit => {
                s.0.fcw = FCW_INIT;
                s.0.fsw = 0;
                s.0.ftwx = 0;
                s.0.last_opcode = 0;
                s.0.last_ip = 0;
                s.0.last_dp = 0;
            }
            // The exception flags, stack fault, summary and busy bits.
            Fnclex | Fclex => s.0.fsw &= !0x80ff,
            Fldcw => s.0.fcw = self.read_rm(0, 2)? as u16,
            Fnstcw | Fstcw => self.store(&s.0.fcw.to_le_bytes())?,
            Fnstsw | Fstsw if self.instr.op_kind(0) == OpKind::Register => {
                self.cpu.regs.rax = (self.cpu.regs.rax & !0xffff) | u64::from(s.0.fsw);
            }
            Fnstsw | Fstsw => self.store(&s.0.fsw.to_le_bytes())?,
            Ldmxcsr | Vldmxcsr => {
                let value = self.read_rm(0, 4)? as u32;
                if value & !MXCSR_WRITABLE != 0 {
                    return Err(Stop::Raise(exception(vector::GP, Some(0))));
                }
                s.0.mxcsr = value;
            }
            Stmxcsr | Vstmxcsr => self.store(&s.0.mxcsr.to_le_bytes())?,
            _ => return Err(Stop::Fail(unsupported(self.instr))),
        }
        Ok(())
    }

    /// `dest = dest op src`: with a memory source, dest is ST0; with two registers, the first
    /// is dest; the `p` forms pop.
    fn arith(&mut self, s: &mut Stack<'_>, op: Arith) -> Step<()> {
        let count = self.instr.op_count();
        let (dest, src) = match count {
            0 => (1, None),
            1 => (0, Some(0)),
            _ => (self.st_of(0).unwrap_or(0), Some(1)),
        };
        let a = s.get(dest).to_f64();
        let b = match src {
            Some(i) => self.fp_operand(s, i)?.to_f64(),
            None => s.get(0).to_f64(),
        };
        let (x, y) = match op {
            Arith::Subr | Arith::Divr => (b, a),
            _ => (a, b),
        };
        let r = match op {
            Arith::Add => x + y,
            Arith::Sub | Arith::Subr => x - y,
            Arith::Mul => x * y,
            Arith::Div | Arith::Divr => {
                if y == 0.0 && x.is_finite() && x != 0.0 {
                    s.flag(FSW_ZE);
                }
                x / y
            }
        };
        if r.is_nan() && !x.is_nan() && !y.is_nan() {
            s.flag(FSW_IE);
        }
        s.set(dest, F80::from_f64(r));
        if matches!(
            self.instr.mnemonic(),
            Mnemonic::Faddp
                | Mnemonic::Fsubp
                | Mnemonic::Fsubrp
                | Mnemonic::Fmulp
                | Mnemonic::Fdivp
                | Mnemonic::Fdivrp
        ) {
            s.pop();
        }
        Ok(())
    }
}

/// The constants `fld1`, `fldz`, `fldpi`... push, to the register's full precision.
fn constant(m: Mnemonic) -> F80 {
    let (mant, se) = match m {
        Mnemonic::Fld1 => return F80::ONE,
        Mnemonic::Fldpi => (0xc90f_daa2_2168_c235, 0x4000),
        Mnemonic::Fldl2e => (0xb8aa_3b29_5c17_f0bc, 0x3fff),
        Mnemonic::Fldl2t => (0xd49a_784b_cd1b_8afe, 0x4000),
        Mnemonic::Fldlg2 => (0x9a20_9a84_fbcf_f799, 0x3ffd),
        Mnemonic::Fldln2 => (0xb172_17f7_d1cf_79ac, 0x3ffe),
        _ => return F80::ZERO,
    };
    F80 { mant, se }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f64_values_go_through_f80_unchanged() {
        for x in [
            0.0,
            -0.0,
            1.0,
            -2.5,
            0.1,
            1e300,
            -1e-300,
            f64::MIN_POSITIVE,
            5e-324,
            f64::MAX,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            let f = F80::from_f64(x);
            assert_eq!(f.to_f64().to_bits(), x.to_bits(), "{x:e}");
        }
        assert!(F80::from_f64(f64::NAN).to_f64().is_nan());
        assert_eq!(F80::from_f64(1.0), F80::ONE);
        assert_eq!(F80::from_f64(-2.0).to_bytes()[8..], [0x00, 0xc0]);
    }

    #[test]
    fn f80_rounds_to_the_nearest_f64_and_overflows_to_infinity() {
        // 1 + 2^-60 is not a double: it rounds to 1; 1 + 2^-52 + 2^-53 rounds up (to even).
        let f = F80 {
            mant: (1 << 63) | (1 << 3),
            se: 0x3fff,
        };
        assert_eq!(f.to_f64(), 1.0);
        let f = F80 {
            mant: (1 << 63) | (1 << 11) | (1 << 10),
            se: 0x3fff,
        };
        assert_eq!(f.to_f64(), 1.0 + 2.0 * f64::EPSILON);
        let huge = F80 {
            mant: 1 << 63,
            se: 0x3fff + 2000,
        };
        assert_eq!(huge.to_f64(), f64::INFINITY);
        let tiny = F80 {
            mant: 1 << 63,
            se: 0x3fff - 2000,
        };
        assert_eq!(tiny.to_f64(), 0.0);
        // The largest f80 below 2^1024 rounds up to infinity.
        let edge = F80 {
            mant: u64::MAX,
            se: 0x3fff + 1023,
        };
        assert_eq!(edge.to_f64(), f64::INFINITY);
    }

    #[test]
    fn integers_are_exact_and_round_as_the_control_word_says() {
        for v in [0i64, 1, -1, 128, i64::MAX, i64::MIN, 1 << 53 | 1] {
            assert_eq!(
                F80::from_i64(v).to_int(Rounding::Nearest),
                Some(i128::from(v))
            );
        }
        let x = |v: f64| F80::from_f64(v);
        let r = |v: f64, rc| x(v).to_int(rc).unwrap();
        assert_eq!(r(2.5, Rounding::Nearest), 2);
        assert_eq!(r(3.5, Rounding::Nearest), 4);
        assert_eq!(r(-2.5, Rounding::Down), -3);
        assert_eq!(r(2.1, Rounding::Up), 3);
        assert_eq!(r(-2.9, Rounding::Zero), -2);
        assert_eq!(r(0.25, Rounding::Up), 1);
        assert_eq!(r(-0.25, Rounding::Up), 0);
        assert_eq!(r(1e18, Rounding::Zero), 1_000_000_000_000_000_000);
        assert_eq!(x(f64::NAN).to_int(Rounding::Zero), None);
        assert_eq!(x(1e20).to_int(Rounding::Zero), None, "2^64 and up");
    }
}
