//! A readable account of a vCPU stopped on an instruction, for logs and error reports.

use std::fmt::Write as _;

use iced_x86::{Decoder, DecoderError, DecoderOptions, Formatter, Instruction, IntelFormatter};
use kvm_bindings::kvm_segment;

use crate::state::CpuState;

/// Describes the vCPU and the instruction `bytes` at its RIP over several lines: the instruction
/// (Intel syntax, with its bytes), RIP, RSP, RFLAGS, all general-purpose registers, CS and SS,
/// CPL, CR0/CR2/CR3/CR4 and EFER. Never panics, whatever the bytes.
pub fn describe(cpu: &CpuState, bytes: &[u8]) -> String {
    let bitness = cpu.bitness();
    let mut out = String::new();
    let mut decoder = Decoder::with_ip(bitness, bytes, cpu.regs.rip, DecoderOptions::NONE);
    let instr = decoder.decode();
    match decoder.last_error() {
        DecoderError::None => {
            let len = instr.len().min(bytes.len());
            let _ = writeln!(
                out,
                "instruction: {}  [{}] ({bitness}-bit)",
                intel_text(&instr),
                hex(&bytes[..len])
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "instruction: (undecodable)  [{}] ({bitness}-bit)",
                hex(bytes)
            );
        }
    }
    let r = &cpu.regs;
    let s = &cpu.sregs;
    let _ = writeln!(
        out,
        "rip={:#018x} rsp={:#018x} rflags={:#010x}",
        r.rip, r.rsp, r.rflags
    );
    let gprs = [
        ("rax", r.rax),
        ("rbx", r.rbx),
        ("rcx", r.rcx),
        ("rdx", r.rdx),
        ("rsi", r.rsi),
        ("rdi", r.rdi),
        ("rbp", r.rbp),
        ("rsp", r.rsp),
        ("r8", r.r8),
        ("r9", r.r9),
        ("r10", r.r10),
        ("r11", r.r11),
        ("r12", r.r12),
        ("r13", r.r13),
        ("r14", r.r14),
        ("r15", r.r15),
    ];
    for row in gprs.chunks(4) {
        let line: Vec<String> = row
            .iter()
            .map(|(name, v)| format!("{name:>3}={v:#018x}"))
            .collect();
        let _ = writeln!(out, "{}", line.join(" "));
    }
    let _ = writeln!(out, "cs: {}", segment(&s.cs));
    let _ = writeln!(out, "ss: {}", segment(&s.ss));
    let _ = writeln!(out, "cpl={}", cpu.cpl());
    let _ = writeln!(
        out,
        "cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
        s.cr0, s.cr2, s.cr3, s.cr4, s.efer
    );
    out
}

fn segment(seg: &kvm_segment) -> String {
    format!(
        "selector={:#06x} base={:#x} limit={:#x} type={:#x} s={} dpl={} p={} db={} l={} g={}",
        seg.selector,
        seg.base,
        seg.limit,
        seg.type_,
        seg.s,
        seg.dpl,
        seg.present,
        seg.db,
        seg.l,
        seg.g
    )
}

/// The instruction in Intel syntax.
pub(crate) fn intel_text(instr: &Instruction) -> String {
    let mut text = String::new();
    IntelFormatter::new().format(instr, &mut text);
    text
}

/// Bytes as space-separated lowercase hex pairs.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let pairs: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    pairs.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_states::{long64, real16};

    #[test]
    fn shows_the_instruction_and_registers() {
        let mut cpu = long64();
        cpu.regs.rax = 0x1234;
        cpu.regs.r15 = 0xdead;
        let bytes = [0xf3, 0x48, 0x0f, 0xb8, 0x43, 0x10, 0x90, 0x90];
        let text = describe(&cpu, &bytes);
        assert!(
            text.contains("instruction: popcnt rax,[rbx+10h]  [f3 48 0f b8 43 10] (64-bit)"),
            "{text}"
        );
        assert!(text.contains("rip=0xffffffff81000000"), "{text}");
        assert!(text.contains("rax=0x0000000000001234"), "{text}");
        assert!(text.contains("r15=0x000000000000dead"), "{text}");
        assert!(text.contains("cs: selector=0x0010"), "{text}");
        assert!(text.contains("cpl=0"), "{text}");
        assert!(text.contains("efer=0xd01"), "{text}");
        assert!(text.lines().count() >= 9, "{text}");
    }

    #[test]
    fn garbage_and_empty_bytes_do_not_panic() {
        let cpu = real16();
        let text = describe(&cpu, &[]);
        assert!(
            text.contains("instruction: (undecodable)  [] (16-bit)"),
            "{text}"
        );
        // A lone operand-size prefix: not a whole instruction.
        let text = describe(&cpu, &[0x66]);
        assert!(text.contains("(undecodable)  [66]"), "{text}");
        // Every single-byte and two-byte 0f xx sequence, in 16-, 32- and 64-bit code.
        for bitness_state in [real16(), crate::state::test_states::prot32(), long64()] {
            for b in 0..=255u8 {
                let _ = describe(&bitness_state, &[b]);
                let _ = describe(&bitness_state, &[0x0f, b]);
            }
        }
    }
}
