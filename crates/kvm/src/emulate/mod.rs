//! User-space completion of guest instructions the host's KVM emulator gives up on.
//!
//! On a nested host where guest kernel code is emulated instruction by instruction, KVM exits
//! with `KVM_EXIT_INTERNAL_ERROR` / `KVM_INTERNAL_ERROR_EMULATION` on instructions its emulator
//! lacks (see [`crate::exit`] for getting the bytes out of `kvm_run`). [`complete`] decodes such
//! an instruction with iced-x86 and carries it out on a copy of the vCPU's registers and on guest
//! memory, or says which exception the VMM must inject.
//!
//! Not modelled: segment limits and access rights, single-step traps (RFLAGS.TF), interrupt
//! shadows, and `lock` atomicity beyond what [`GuestAccess::compare_exchange`] provides.

mod handlers;
mod regs;
#[cfg(test)]
mod tests;

use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction};
use thiserror::Error;

pub use crate::state::CpuState;

/// Exception vectors the completer raises.
pub mod vector {
    /// Breakpoint (`int3`), a trap.
    pub const BP: u8 = 3;
    /// Invalid opcode.
    pub const UD: u8 = 6;
    /// Device not available (x87/SSE with CR0.EM or CR0.TS set).
    pub const NM: u8 = 7;
    /// Stack-segment fault.
    pub const SS: u8 = 12;
    /// General protection.
    pub const GP: u8 = 13;
    /// Page fault; CR2 is set in the returned state.
    pub const PF: u8 = 14;
}

/// The longest x86 instruction.
const MAX_INSN_LEN: usize = 15;
/// Guest page size, for instruction fetches that stop at a page end.
const PAGE_SIZE: u64 = 0x1000;

/// Access to guest memory by guest-virtual (linear) address. The VMM implements it with
/// `KVM_TRANSLATE` and its guest memory map.
pub trait GuestAccess {
    /// Reads `buf.len()` bytes at linear address `gva`.
    fn read(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), AccessError>;

    /// Writes `buf` at linear address `gva`.
    fn write(&mut self, gva: u64, buf: &[u8]) -> Result<(), AccessError>;

    /// Compares the `expected.len()` bytes at `gva` with `expected` and, when equal, replaces
    /// them with `new` and returns true; otherwise stores the current bytes in `expected` and
    /// returns false.
    ///
    /// The default reads then writes, which is not atomic against other vCPUs: a VMM running
    /// SMP guests should override it with a host atomic compare-exchange on the backing memory.
    fn compare_exchange(
        &mut self,
        gva: u64,
        expected: &mut [u8],
        new: &[u8],
    ) -> Result<bool, AccessError> {
        compare_exchange_by_copy(self, gva, expected, new)
    }

    /// The vCPU's `IA32_TSC_AUX` (MSR 0xC000_0103), which `rdpid` returns; Linux keeps its CPU
    /// number there. The default, 0, is right only for vCPU 0: a VMM running SMP guests that
    /// may execute `rdpid` should read the MSR.
    fn tsc_aux(&mut self) -> u32 {
        0
    }

    /// The vCPU's x87 and SSE state (`KVM_GET_FPU`), for the FPU control instructions
    /// (`fldcw`, `ldmxcsr`...); `None` when the VMM gives the completer no access to it.
    fn fpu(&mut self) -> Option<kvm_bindings::kvm_fpu> {
        None
    }

    /// Sets the vCPU's x87 and SSE state (`KVM_SET_FPU`); false when it could not.
    fn set_fpu(&mut self, _fpu: &kvm_bindings::kvm_fpu) -> bool {
        false
    }
}

/// Compare-exchange as a read then a write (not atomic against other vCPUs): the default
/// [`GuestAccess::compare_exchange`], and the fallback of implementations that are atomic only
/// for some sizes. At most 16 bytes.
pub fn compare_exchange_by_copy<A: GuestAccess + ?Sized>(
    access: &mut A,
    gva: u64,
    expected: &mut [u8],
    new: &[u8],
) -> Result<bool, AccessError> {
    let mut current = [0u8; 16];
    let current = &mut current[..expected.len()];
    access.read(gva, current)?;
    if current == expected {
        access.write(gva, new)?;
        Ok(true)
    } else {
        expected.copy_from_slice(current);
        Ok(false)
    }
}

/// Why a guest memory access failed. The first two become a #PF for the guest.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum AccessError {
    /// No present translation for this linear address.
    #[error("guest address {0:#x} is not mapped")]
    Unmapped(u64),
    /// A write to a linear address mapped read-only.
    #[error("guest address {0:#x} is mapped read-only")]
    ReadOnly(u64),
    /// The address translates to guest-physical memory the VMM has no RAM for (e.g. MMIO).
    #[error("guest address {0:#x} is not backed by guest RAM")]
    Unbacked(u64),
}

/// What the VMM does after a successful [`complete`]: in every case it writes `cpu.regs` back
/// (`KVM_SET_REGS`); for a #PF it also writes `cpu.sregs` back, which carries CR2 (without
/// `KVM_CAP_EXCEPTION_PAYLOAD`, injecting a #PF does not set CR2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The instruction took effect: registers and memory updated, RIP advanced.
    Done,
    /// Inject this exception (`KVM_SET_VCPU_EVENTS`). RIP is already where the exception wants
    /// it: past the instruction for traps (#BP), at it for faults (#UD, #GP, #PF).
    InjectException {
        /// The exception vector, see [`vector`].
        vector: u8,
        /// The error code, for the exceptions that push one.
        error_code: Option<u32>,
    },
}

/// Why an instruction could not be completed.
#[derive(Debug, Error)]
pub enum EmulateError {
    /// The instruction decoded but is not one the completer carries out.
    #[error("cannot complete `{instruction}` in user space: {reason}")]
    Unsupported {
        /// The instruction in Intel syntax.
        instruction: String,
        /// Why not, and what avoids it.
        reason: &'static str,
    },
    /// The bytes are not a valid instruction in the current CPU mode.
    #[error("cannot decode instruction bytes [{bytes}] in {bitness}-bit mode")]
    Undecodable {
        /// The bytes, in hex.
        bytes: String,
        /// The code size they were decoded with.
        bitness: u32,
    },
    /// Guest memory could not be read or written, and it was not a page fault: the address is
    /// not RAM, or the instruction bytes could not be fetched.
    #[error("guest memory access failed")]
    Memory(#[from] AccessError),
}

/// Completes the instruction at the vCPU's RIP, whose first bytes are `bytes` (those KVM reported
/// with the emulation failure; if they stop short of a whole instruction the rest is read from
/// guest memory at CS.base + RIP).
///
/// On success `cpu` holds the registers to write back; see [`Completion`].
pub fn complete(
    bytes: &[u8],
    cpu: &mut CpuState,
    mem: &mut dyn GuestAccess,
) -> Result<Completion, EmulateError> {
    let instr = decode(bytes, cpu, mem)?;
    handlers::execute(&instr, cpu, mem)
}

/// Decodes one instruction at RIP in the CPU's current mode, fetching from guest memory when
/// `bytes` is too short.
fn decode(
    bytes: &[u8],
    cpu: &CpuState,
    mem: &mut dyn GuestAccess,
) -> Result<Instruction, EmulateError> {
    let bitness = cpu.bitness();
    match decode_one(bitness, bytes, cpu.regs.rip) {
        Err(DecoderError::NoMoreBytes) => {}
        other => return other.map_err(|_| undecodable(bytes, bitness)),
    }
    let fetched = fetch(cpu, mem)?;
    decode_one(bitness, &fetched, cpu.regs.rip).map_err(|_| undecodable(&fetched, bitness))
}

fn decode_one(bitness: u32, bytes: &[u8], rip: u64) -> Result<Instruction, DecoderError> {
    let mut decoder = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let instr = decoder.decode();
    match decoder.last_error() {
        DecoderError::None => Ok(instr),
        e => Err(e),
    }
}

/// Reads up to 15 instruction bytes at CS.base + RIP, stopping at the end of the page if the
/// next one is not readable.
fn fetch(cpu: &CpuState, mem: &mut dyn GuestAccess) -> Result<Vec<u8>, EmulateError> {
    let at = cpu.linear_rip();
    let mut buf = vec![0u8; MAX_INSN_LEN];
    if mem.read(at, &mut buf).is_ok() {
        return Ok(buf);
    }
    let to_page_end = (PAGE_SIZE - (at % PAGE_SIZE)) as usize;
    buf.truncate(to_page_end.min(MAX_INSN_LEN));
    mem.read(at, &mut buf)?;
    Ok(buf)
}

fn undecodable(bytes: &[u8], bitness: u32) -> EmulateError {
    EmulateError::Undecodable {
        bytes: crate::diagnose::hex(bytes),
        bitness,
    }
}
