//! Decode-and-effect tests for every instruction the completer handles, over a mock guest memory.

use iced_x86::code_asm::*;

use super::handlers::x87;
use super::regs::rflags;
use super::*;
use crate::state::test_states::{long64, prot32, real16};

/// Guest memory as one flat range of linear addresses; one page of it may be marked not present
/// and one read-only.
struct MockMem {
    base: u64,
    bytes: Vec<u8>,
    not_present: Option<u64>,
    read_only: Option<u64>,
    tsc_aux: u32,
    reads: usize,
    /// The vCPU's FPU state, or `None` for a VMM that gives no access to it.
    fpu: Option<kvm_bindings::kvm_fpu>,
}

impl MockMem {
    fn new(base: u64, len: usize) -> Self {
        Self {
            base,
            bytes: vec![0; len],
            not_present: None,
            read_only: None,
            tsc_aux: 0,
            reads: 0,
            fpu: Some(kvm_bindings::kvm_fpu {
                fcw: 0x037f,
                mxcsr: 0x1f80,
                ..Default::default()
            }),
        }
    }

    /// Where `len` bytes at `gva` are in `bytes`, as the guest's page tables would allow.
    fn check(
        &self,
        gva: u64,
        len: usize,
        write: bool,
    ) -> Result<std::ops::Range<usize>, AccessError> {
        let end = gva + len as u64;
        let hits = |page: Option<u64>| page.filter(|&p| gva < p + PAGE_SIZE && end > p);
        if let Some(page) = hits(self.not_present) {
            return Err(AccessError::Unmapped(gva.max(page)));
        }
        if let Some(page) = hits(self.read_only).filter(|_| write) {
            return Err(AccessError::ReadOnly(gva.max(page)));
        }
        self.index(gva, len)
    }

    fn index(&self, gva: u64, len: usize) -> Result<std::ops::Range<usize>, AccessError> {
        let start = gva
            .checked_sub(self.base)
            .ok_or(AccessError::Unbacked(gva))? as usize;
        if start + len > self.bytes.len() {
            return Err(AccessError::Unbacked(gva));
        }
        Ok(start..start + len)
    }

    fn put(&mut self, gva: u64, data: &[u8]) {
        let r = self.index(gva, data.len()).unwrap();
        self.bytes[r].copy_from_slice(data);
    }

    fn get(&self, gva: u64, len: usize) -> &[u8] {
        let r = self.index(gva, len).unwrap();
        &self.bytes[r]
    }
}

impl GuestAccess for MockMem {
    fn read(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        self.reads += 1;
        let r = self.check(gva, buf.len(), false)?;
        buf.copy_from_slice(&self.bytes[r]);
        Ok(())
    }

    fn write(&mut self, gva: u64, buf: &[u8]) -> Result<(), AccessError> {
        let r = self.check(gva, buf.len(), true)?;
        self.bytes[r].copy_from_slice(buf);
        Ok(())
    }

    fn tsc_aux(&mut self) -> u32 {
        self.tsc_aux
    }

    fn fpu(&mut self) -> Option<kvm_bindings::kvm_fpu> {
        self.fpu
    }

    fn set_fpu(&mut self, fpu: &kvm_bindings::kvm_fpu) -> bool {
        self.fpu = Some(*fpu);
        true
    }
}

/// Assembles the instructions `f` emits at `ip` in `bitness`-bit mode.
fn asm(
    bitness: u32,
    ip: u64,
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Vec<u8> {
    let mut a = CodeAssembler::new(bitness).unwrap();
    f(&mut a).unwrap();
    a.assemble(ip).unwrap()
}

fn asm64(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    asm(64, long64().regs.rip, f)
}

/// Guest data lives here in the 64-bit tests.
const DATA: u64 = 0xffff_8880_0000_1000;

fn mem64() -> MockMem {
    MockMem::new(DATA, 0x2000)
}

fn run(bytes: &[u8], cpu: &mut CpuState, mem: &mut MockMem) -> Completion {
    complete(bytes, cpu, mem).unwrap()
}

#[test]
fn int3_advances_rip_then_asks_for_bp() {
    let mut cpu = long64();
    let bytes = asm64(|a| a.int3());
    assert_eq!(bytes, [0xcc]);
    let c = run(&bytes, &mut cpu, &mut mem64());
    assert_eq!(
        c,
        Completion::InjectException {
            vector: vector::BP,
            error_code: None
        }
    );
    assert_eq!(
        cpu.regs.rip,
        long64().regs.rip + 1,
        "#BP is a trap: RIP after int3"
    );
}

#[test]
fn fwait_only_advances() {
    let mut cpu = long64();
    let before = cpu.regs;
    let bytes = asm64(|a| a.wait());
    assert_eq!(run(&bytes, &mut cpu, &mut mem64()), Completion::Done);
    assert_eq!(cpu.regs.rip, before.rip + 1);
    assert_eq!(cpu.regs.rflags, before.rflags);
    assert_eq!(cpu.regs.rax, before.rax);
}

const CR4_OSFXSR: u64 = 1 << 9;

#[test]
fn fninit_resets_the_x87_control_state() {
    let mut cpu = long64();
    let before = cpu.regs;
    let mut mem = mem64();
    let fpu = mem.fpu.as_mut().unwrap();
    (fpu.fcw, fpu.fsw, fpu.ftwx, fpu.mxcsr) = (0x027f, 0x3801, 0xff, 0x1f80);
    let bytes = asm64(|a| a.fninit());
    assert_eq!(bytes, [0xdb, 0xe3], "fninit has no fwait prefix");
    assert_eq!(run(&bytes, &mut cpu, &mut mem), Completion::Done);
    let fpu = mem.fpu.unwrap();
    assert_eq!((fpu.fcw, fpu.fsw, fpu.ftwx), (0x037f, 0, 0));
    assert_eq!(fpu.mxcsr, 0x1f80, "fninit leaves MXCSR alone");
    assert_eq!(cpu.regs.rip, before.rip + 2);
    assert_eq!(cpu.regs.rflags, before.rflags);
}

/// OVMF's SEC, in 32-bit protected mode: `fldcw [abs]` then `ldmxcsr [abs]` with the values
/// it keeps in its ROM; `fnstcw`/`stmxcsr` read them back.
#[test]
fn fldcw_and_ldmxcsr_load_what_fnstcw_and_stmxcsr_store() {
    let mut cpu = prot32();
    cpu.sregs.cr4 |= CR4_OSFXSR;
    let base = 0x1000u64;
    let mut mem = MockMem::new(base, 0x1000);
    mem.put(base, &0x027fu16.to_le_bytes());
    mem.put(base + 4, &0x1f80u32.to_le_bytes());
    let rip = cpu.regs.rip;
    let code = asm(32, rip, |a| {
        a.fldcw(word_ptr(base))?;
        a.ldmxcsr(dword_ptr(base + 4))?;
        a.fnstcw(word_ptr(base + 8))?;
        a.stmxcsr(dword_ptr(base + 12))
    });
    // One instruction at a time, as KVM reports them.
    for _ in 0..4 {
        let at = (cpu.regs.rip - rip) as usize;
        assert_eq!(run(&code[at..], &mut cpu, &mut mem), Completion::Done);
    }
    assert_eq!(cpu.regs.rip, rip + code.len() as u64);
    assert_eq!(mem.fpu.unwrap().fcw, 0x027f);
    assert_eq!(mem.get(base + 8, 2), 0x027fu16.to_le_bytes());
    assert_eq!(mem.get(base + 12, 4), 0x1f80u32.to_le_bytes());
}

#[test]
fn fnstsw_ax_and_fnclex() {
    let mut cpu = long64();
    cpu.regs.rax = 0xdead_beef_0000_0000;
    let mut mem = mem64();
    mem.fpu.as_mut().unwrap().fsw = 0x80a1;
    let bytes = asm64(|a| a.fnstsw(ax));
    assert_eq!(run(&bytes, &mut cpu, &mut mem), Completion::Done);
    assert_eq!(cpu.regs.rax, 0xdead_beef_0000_80a1, "only AX changes");
    let clex = asm(64, cpu.regs.rip, |a| a.fnclex());
    assert_eq!(run(&clex, &mut cpu, &mut mem), Completion::Done);
    assert_eq!(
        mem.fpu.unwrap().fsw,
        0,
        "exception, summary and busy bits cleared"
    );
}

#[test]
fn ldmxcsr_with_reserved_bits_is_gp_and_changes_nothing() {
    let mut cpu = long64();
    cpu.sregs.cr4 |= CR4_OSFXSR;
    let mut mem = mem64();
    mem.put(DATA, &0x0001_1f80u32.to_le_bytes());
    cpu.regs.rbx = DATA;
    let bytes = asm64(|a| a.ldmxcsr(dword_ptr(rbx)));
    let c = run(&bytes, &mut cpu, &mut mem);
    assert_eq!(
        c,
        Completion::InjectException {
            vector: vector::GP,
            error_code: Some(0)
        }
    );
    assert_eq!(cpu.regs.rip, long64().regs.rip);
    assert_eq!(mem.fpu.unwrap().mxcsr, 0x1f80);
}

#[test]
fn fpu_control_faults_as_the_cpu_does() {
    // CR0.TS: #NM (lazy FPU switching relies on it), nothing changed.
    let mut cpu = long64();
    cpu.sregs.cr0 |= 1 << 3;
    let mut mem = mem64();
    let c = run(&asm64(|a| a.fninit()), &mut cpu, &mut mem);
    assert_eq!(
        c,
        Completion::InjectException {
            vector: vector::NM,
            error_code: None
        }
    );
    assert_eq!(cpu.regs.rip, long64().regs.rip);
    // SSE control without CR4.OSFXSR: #UD.
    let mut cpu = long64();
    cpu.sregs.cr4 &= !CR4_OSFXSR;
    cpu.regs.rbx = DATA;
    let c = run(&asm64(|a| a.stmxcsr(dword_ptr(rbx))), &mut cpu, &mut mem);
    assert_eq!(
        c,
        Completion::InjectException {
            vector: vector::UD,
            error_code: None
        }
    );
    // A VMM that gives no FPU access: the instruction is not completed, with the reason.
    let mut mem = mem64();
    mem.fpu = None;
    let e = complete(&asm64(|a| a.fninit()), &mut long64(), &mut mem).unwrap_err();
    assert!(e.to_string().contains("no access to the FPU state"), "{e}");
}

#[test]
fn stac_sets_and_clac_clears_ac() {
    let mut cpu = long64();
    let stac = asm64(|a| a.stac());
    assert_eq!(run(&stac, &mut cpu, &mut mem64()), Completion::Done);
    assert_ne!(cpu.regs.rflags & rflags::AC, 0);
    assert_eq!(cpu.regs.rip, long64().regs.rip + 3);

    let clac = asm(64, cpu.regs.rip, |a| a.clac());
    assert_eq!(run(&clac, &mut cpu, &mut mem64()), Completion::Done);
    assert_eq!(cpu.regs.rflags & rflags::AC, 0);
    assert_eq!(cpu.regs.rip, long64().regs.rip + 6);
}

#[test]
fn clac_in_user_mode_is_ud_without_advancing() {
    let mut cpu = long64();
    cpu.sregs.ss.dpl = 3;
    cpu.regs.rflags |= rflags::AC;
    let c = run(&asm64(|a| a.clac()), &mut cpu, &mut mem64());
    assert_eq!(
        c,
        Completion::InjectException {
            vector: vector::UD,
            error_code: None
        }
    );
    assert_eq!(cpu.regs.rip, long64().regs.rip);
    assert_ne!(cpu.regs.rflags & rflags::AC, 0);
}

#[test]
fn popcnt_r64_r64_counts_and_clears_flags() {
    let mut cpu = long64();
    cpu.regs.rbx = 0xf000_0000_0000_00ff;
    cpu.regs.rflags |= rflags::STATUS;
    let bytes = asm64(|a| a.popcnt(rax, rbx));
    assert_eq!(bytes, [0xf3, 0x48, 0x0f, 0xb8, 0xc3], "REX.W popcnt");
    assert_eq!(run(&bytes, &mut cpu, &mut mem64()), Completion::Done);
    assert_eq!(cpu.regs.rax, 12);
    assert_eq!(cpu.regs.rflags & rflags::STATUS, 0);
    assert_eq!(cpu.regs.rip, long64().regs.rip + 5);
}

#[test]
fn popcnt_of_zero_sets_only_zf() {
    let mut cpu = long64();
    cpu.regs.rax = 77;
    cpu.regs.rflags |= rflags::CF | rflags::SF;
    assert_eq!(
        run(&asm64(|a| a.popcnt(rax, rcx)), &mut cpu, &mut mem64()),
        Completion::Done
    );
    assert_eq!(cpu.regs.rax, 0);
    assert_eq!(cpu.regs.rflags & rflags::STATUS, rflags::ZF);
}

#[test]
fn popcnt_r32_from_memory_with_displacement_zero_extends() {
    let mut cpu = long64();
    let mut mem = mem64();
    cpu.regs.rbx = DATA;
    cpu.regs.rdx = u64::MAX;
    mem.put(DATA + 0x10, &0x8000_0001u32.to_le_bytes());
    mem.put(DATA + 0x14, &[0xff; 4]); // must not be read: 32-bit operand
    let bytes = asm64(|a| a.popcnt(edx, dword_ptr(rbx + 0x10)));
    assert_eq!(run(&bytes, &mut cpu, &mut mem), Completion::Done);
    assert_eq!(cpu.regs.rdx, 2, "32-bit result zero-extends into rdx");
}

#[test]
fn popcnt_r16_keeps_upper_bits() {
    let mut cpu = long64();
    cpu.regs.rcx = 0xffff_ffff_ffff_0000;
    cpu.regs.rsi = 0xffff_0f0f;
    assert_eq!(
        run(&asm64(|a| a.popcnt(cx, si)), &mut cpu, &mut mem64()),
        Completion::Done
    );
    assert_eq!(cpu.regs.rcx, 0xffff_ffff_ffff_0008);
}

#[test]
fn popcnt_rip_relative_operand() {
    let mut cpu = long64();
    let rip = cpu.regs.rip;
    let mut mem = MockMem::new(rip, 0x100);
    let bytes = asm(64, rip, |a| {
        let mut data = a.create_label();
        a.popcnt(rax, qword_ptr(data))?;
        a.nop()?;
        a.set_label(&mut data)?;
        a.dq(&[0x0000_ffff_0000_0007])
    });
    mem.put(rip, &bytes);
    assert_eq!(run(&bytes, &mut cpu, &mut mem), Completion::Done);
    assert_eq!(cpu.regs.rax, 19);
    assert_eq!(cpu.regs.rip, rip + 9, "popcnt rax,[rip+disp32] is 9 bytes");
}

#[test]
fn popcnt_with_fs_override_uses_fs_base() {
    let mut cpu = long64();
    let mut mem = mem64();
    cpu.sregs.fs.base = DATA + 0x100;
    cpu.sregs.ds.base = 0x5000; // ignored in 64-bit mode
    cpu.regs.rax = 0x20;
    mem.put(DATA + 0x128, &u64::MAX.to_le_bytes());
    let bytes = asm64(|a| a.popcnt(rbx, qword_ptr(rax + 8).fs()));
    assert_eq!(bytes[0], 0x64, "fs prefix");
    assert_eq!(run(&bytes, &mut cpu, &mut mem), Completion::Done);
    assert_eq!(cpu.regs.rbx, 64);
}

#[test]
fn popcnt_32_bit_mode_adds_ds_base_and_wraps() {
    let mut cpu = prot32();
    let mut mem = MockMem::new(0x1000, 0x1000);
    cpu.sregs.ds.base = 0x1000;
    cpu.regs.rbx = 0x100;
    cpu.regs.rax = 0xdead_beef_0000_0000;
    mem.put(0x1000 + 0x100 + 0x40, &0x0f0fu32.to_le_bytes());
    let bytes = asm(32, cpu.regs.rip, |a| a.popcnt(eax, dword_ptr(ebx + 0x40)));
    assert_eq!(bytes, [0xf3, 0x0f, 0xb8, 0x43, 0x40]);
    assert_eq!(run(&bytes, &mut cpu, &mut mem), Completion::Done);
    assert_eq!(cpu.regs.rax, 8);
    assert_eq!(cpu.regs.rip, 0x0010_0005);
}

#[test]
fn cmpxchg16b_equal_stores_rcx_rbx_and_sets_zf() {
    let mut cpu = long64();
    let mut mem = mem64();
    let target = DATA + 0x40;
    mem.put(target, &1u64.to_le_bytes());
    mem.put(target + 8, &2u64.to_le_bytes());
    cpu.regs.rdi = target;
    (cpu.regs.rax, cpu.regs.rdx) = (1, 2);
    (cpu.regs.rbx, cpu.regs.rcx) = (0x1111, 0x2222);
    let bytes = asm64(|a| a.lock().cmpxchg16b(xmmword_ptr(rdi)));
    assert_eq!(bytes, [0xf0, 0x48, 0x0f, 0xc7, 0x0f]);
    assert_eq!(run(&bytes, &mut cpu, &mut mem), Completion::Done);
    assert_ne!(cpu.regs.rflags & rflags::ZF, 0);
    assert_eq!(mem.get(target, 8), 0x1111u64.to_le_bytes());
    assert_eq!(mem.get(target + 8, 8), 0x2222u64.to_le_bytes());
    assert_eq!((cpu.regs.rax, cpu.regs.rdx), (1, 2));
    assert_eq!(cpu.regs.rip, long64().regs.rip + 5);
}

#[test]
fn cmpxchg16b_unequal_loads_rdx_rax_and_clears_zf() {
    let mut cpu = long64();
    let mut mem = mem64();
    let target = DATA + 0x40;
    mem.put(target, &7u64.to_le_bytes());
    mem.put(target + 8, &8u64.to_le_bytes());
    cpu.regs.rdi = target;
    (cpu.regs.rax, cpu.regs.rdx) = (1, 2);
    (cpu.regs.rbx, cpu.regs.rcx) = (0x1111, 0x2222);
    cpu.regs.rflags |= rflags::ZF | rflags::CF;
    let bytes = asm64(|a| a.lock().cmpxchg16b(xmmword_ptr(rdi)));
    assert_eq!(run(&bytes, &mut cpu, &mut mem), Completion::Done);
    assert_eq!(cpu.regs.rflags & rflags::ZF, 0);
    assert_ne!(cpu.regs.rflags & rflags::CF, 0, "only ZF changes");
    assert_eq!((cpu.regs.rax, cpu.regs.rdx), (7, 8));
    assert_eq!(mem.get(target, 8), 7u64.to_le_bytes(), "memory unchanged");
}

#[test]
fn cmpxchg16b_misaligned_is_gp0() {
    let mut cpu = long64();
    let mut mem = mem64();
    cpu.regs.rdi = DATA + 8;
    let bytes = asm64(|a| a.cmpxchg16b(xmmword_ptr(rdi)));
    assert_eq!(
        run(&bytes, &mut cpu, &mut mem),
        Completion::InjectException {
            vector: vector::GP,
            error_code: Some(0)
        }
    );
    assert_eq!(
        cpu.regs.rip,
        long64().regs.rip,
        "a fault leaves RIP at the instruction"
    );
}

#[test]
fn cmpxchg8b_in_32_bit_mode() {
    let mut cpu = prot32();
    let mut mem = MockMem::new(0x2000, 0x100);
    mem.put(0x2010, &0x0000_0002_0000_0001u64.to_le_bytes());
    cpu.regs.rsi = 0x2000;
    (cpu.regs.rax, cpu.regs.rdx) = (1, 2);
    (cpu.regs.rbx, cpu.regs.rcx) = (0xaaaa, 0xbbbb);
    let bytes = asm(32, cpu.regs.rip, |a| a.cmpxchg8b(qword_ptr(esi + 0x10)));
    assert_eq!(run(&bytes, &mut cpu, &mut mem), Completion::Done);
    assert_ne!(cpu.regs.rflags & rflags::ZF, 0);
    assert_eq!(mem.get(0x2010, 8), 0x0000_bbbb_0000_aaaau64.to_le_bytes());

    // Again: now memory differs from EDX:EAX, which get loaded.
    let bytes = asm(32, cpu.regs.rip, |a| a.cmpxchg8b(qword_ptr(esi + 0x10)));
    assert_eq!(run(&bytes, &mut cpu, &mut mem), Completion::Done);
    assert_eq!(cpu.regs.rflags & rflags::ZF, 0);
    assert_eq!((cpu.regs.rax, cpu.regs.rdx), (0xaaaa, 0xbbbb));
}

#[test]
fn rdrand_r64_sets_cf_and_fills_the_register() {
    let mut cpu = long64();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        cpu.regs.rflags |= rflags::ZF | rflags::OF;
        let bytes = asm(64, cpu.regs.rip, |a| a.rdrand(rax));
        assert_eq!(run(&bytes, &mut cpu, &mut mem64()), Completion::Done);
        assert_eq!(cpu.regs.rflags & rflags::STATUS, rflags::CF);
        seen.insert(cpu.regs.rax);
    }
    assert!(seen.len() > 1, "four 64-bit random values were all equal");
    assert_eq!(cpu.regs.rip, long64().regs.rip + 4 * 4);
}

#[test]
fn rdseed_r16_keeps_upper_bits() {
    let mut cpu = long64();
    cpu.regs.rdx = 0x1234_5678_9abc_0000;
    let bytes = asm64(|a| a.rdseed(dx));
    assert_eq!(bytes, [0x66, 0x0f, 0xc7, 0xfa]);
    assert_eq!(run(&bytes, &mut cpu, &mut mem64()), Completion::Done);
    assert_eq!(cpu.regs.rdx & !0xffff, 0x1234_5678_9abc_0000);
    assert_eq!(cpu.regs.rflags & rflags::CF, rflags::CF);
}

#[test]
fn movbe_loads_and_stores_byte_swapped() {
    let mut cpu = long64();
    let mut mem = mem64();
    mem.put(DATA + 4, &[0x11, 0x22, 0x33, 0x44]);
    cpu.regs.rsi = DATA;
    cpu.regs.rax = u64::MAX;
    let load = asm64(|a| a.movbe(eax, dword_ptr(rsi + 4)));
    assert_eq!(run(&load, &mut cpu, &mut mem), Completion::Done);
    assert_eq!(cpu.regs.rax, 0x1122_3344);

    cpu.regs.rbx = 0x0102_0304_0506_0708;
    let store = asm(64, cpu.regs.rip, |a| a.movbe(qword_ptr(rsi + 0x20), rbx));
    assert_eq!(run(&store, &mut cpu, &mut mem), Completion::Done);
    assert_eq!(mem.get(DATA + 0x20, 8), [1, 2, 3, 4, 5, 6, 7, 8]);

    cpu.regs.rcx = 0xffff_ffff_ffff_ffff;
    let load16 = asm(64, cpu.regs.rip, |a| a.movbe(cx, word_ptr(rsi + 4)));
    assert_eq!(run(&load16, &mut cpu, &mut mem), Completion::Done);
    assert_eq!(cpu.regs.rcx, 0xffff_ffff_ffff_1122);
}

#[test]
fn movbe_store_in_32_bit_mode() {
    let mut cpu = prot32();
    let mut mem = MockMem::new(0x3000, 0x100);
    cpu.regs.rdi = 0x3000;
    cpu.regs.rdx = 0xa1b2_c3d4;
    let bytes = asm(32, cpu.regs.rip, |a| a.movbe(dword_ptr(edi + 8), edx));
    assert_eq!(run(&bytes, &mut cpu, &mut mem), Completion::Done);
    assert_eq!(mem.get(0x3008, 4), [0xa1, 0xb2, 0xc3, 0xd4]);
}

#[test]
fn rdpid_returns_tsc_aux() {
    let mut cpu = long64();
    let mut mem = mem64();
    mem.tsc_aux = 3;
    cpu.regs.r10 = u64::MAX;
    let bytes = asm64(|a| a.rdpid(r10));
    assert_eq!(run(&bytes, &mut cpu, &mut mem), Completion::Done);
    assert_eq!(cpu.regs.r10, 3);
}

#[test]
fn ud2_asks_for_ud_at_the_instruction() {
    let mut cpu = long64();
    let c = run(&asm64(|a| a.ud2()), &mut cpu, &mut mem64());
    assert_eq!(
        c,
        Completion::InjectException {
            vector: vector::UD,
            error_code: None
        }
    );
    assert_eq!(cpu.regs.rip, long64().regs.rip);
}

#[test]
fn xsave_family_and_hlt_are_unsupported_with_their_text() {
    let mut cpu = long64();
    let bytes = asm64(|a| a.xrstor(ptr(rsp)));
    match complete(&bytes, &mut cpu, &mut mem64()) {
        Err(EmulateError::Unsupported {
            instruction,
            reason,
        }) => {
            assert_eq!(instruction, "xrstor [rsp]");
            assert!(reason.contains("noxsave"), "{reason}");
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    let err = complete(&asm64(|a| a.xsetbv()), &mut cpu, &mut mem64()).unwrap_err();
    assert!(err.to_string().contains("`xsetbv`"), "{err}");
    let err = complete(&asm64(|a| a.hlt()), &mut cpu, &mut mem64()).unwrap_err();
    assert!(err.to_string().contains("`hlt`"), "{err}");
    assert_eq!(cpu.regs.rip, long64().regs.rip);
}

#[test]
fn page_fault_on_operand_sets_cr2_and_leaves_rip() {
    let mut cpu = long64();
    let mut mem = mem64();
    mem.not_present = Some(DATA + 0x1000);
    cpu.regs.rbx = DATA + 0x1000;
    let c = run(
        &asm64(|a| a.movbe(qword_ptr(rbx + 8), rax)),
        &mut cpu,
        &mut mem,
    );
    assert_eq!(
        c,
        Completion::InjectException {
            vector: vector::PF,
            error_code: Some(2)
        },
        "not present, write, supervisor"
    );
    assert_eq!(cpu.sregs.cr2, DATA + 0x1008);
    assert_eq!(cpu.regs.rip, long64().regs.rip);
}

#[test]
fn page_fault_error_code_has_present_and_user_bits() {
    // A read at CPL 3 of a not-present page.
    let mut cpu = long64();
    cpu.sregs.ss.dpl = 3;
    let mut mem = mem64();
    mem.not_present = Some(DATA);
    cpu.regs.rsi = DATA + 0x10;
    let c = run(
        &asm64(|a| a.popcnt(rax, qword_ptr(rsi))),
        &mut cpu,
        &mut mem,
    );
    assert_eq!(
        c,
        Completion::InjectException {
            vector: vector::PF,
            error_code: Some(4)
        }
    );
    assert_eq!(cpu.sregs.cr2, DATA + 0x10);

    // cmpxchg16b on a read-only page at CPL 0: present, write.
    let mut cpu = long64();
    let mut mem = mem64();
    mem.read_only = Some(DATA);
    cpu.regs.rdi = DATA + 0x40;
    let c = run(
        &asm64(|a| a.cmpxchg16b(xmmword_ptr(rdi))),
        &mut cpu,
        &mut mem,
    );
    assert_eq!(
        c,
        Completion::InjectException {
            vector: vector::PF,
            error_code: Some(3)
        }
    );
    assert_eq!(cpu.sregs.cr2, DATA + 0x40);
    assert_eq!(cpu.regs.rip, long64().regs.rip);
}

#[test]
fn unbacked_memory_is_an_error() {
    let mut cpu = long64();
    cpu.regs.rbx = 0x10;
    let err = complete(
        &asm64(|a| a.popcnt(rax, qword_ptr(rbx))),
        &mut cpu,
        &mut mem64(),
    )
    .unwrap_err();
    assert!(
        matches!(err, EmulateError::Memory(AccessError::Unbacked(0x10))),
        "{err}"
    );
}

#[test]
fn non_canonical_address_is_gp() {
    let mut cpu = long64();
    cpu.regs.rbx = 0x0000_8000_0000_0000;
    let c = run(
        &asm64(|a| a.popcnt(rax, qword_ptr(rbx))),
        &mut cpu,
        &mut mem64(),
    );
    assert_eq!(
        c,
        Completion::InjectException {
            vector: vector::GP,
            error_code: Some(0)
        }
    );
}

#[test]
fn short_bytes_are_completed_from_guest_memory_at_cs_ip() {
    // Real mode, CS base 0x10000: the instruction is at linear 0x10100.
    let mut cpu = real16();
    let mut mem = MockMem::new(0x10000, 0x1000);
    let bytes = asm(16, cpu.regs.rip, |a| a.popcnt(ax, word_ptr(bx + 0x20)));
    assert_eq!(bytes, [0xf3, 0x0f, 0xb8, 0x47, 0x20]);
    mem.put(0x10100, &bytes);
    // DS base 0x20000 is outside the mock: make DS = CS.
    cpu.sregs.ds.base = 0x10000;
    cpu.regs.rbx = 0x200;
    mem.put(0x10220, &0x7u16.to_le_bytes());
    // KVM may report only the opcode bytes its decoder got through.
    assert_eq!(run(&bytes[..3], &mut cpu, &mut mem), Completion::Done);
    assert_eq!(cpu.regs.rax, 3);
    assert_eq!(cpu.regs.rip, 0x105);
}

#[test]
fn fetch_stops_at_an_unreadable_next_page() {
    let mut cpu = long64();
    // The instruction ends 3 bytes before a not-present page.
    cpu.regs.rip = DATA + 0x1000 - 5;
    let mut mem = mem64();
    mem.not_present = Some(DATA + 0x1000);
    let bytes = asm(64, cpu.regs.rip, |a| a.popcnt(rax, rbx));
    mem.put(cpu.regs.rip, &bytes);
    cpu.regs.rbx = 3;
    assert_eq!(run(&[], &mut cpu, &mut mem), Completion::Done);
    assert_eq!(cpu.regs.rax, 2);
}

#[test]
fn trailing_bytes_after_the_instruction_are_ignored() {
    let mut cpu = long64();
    let mut bytes = asm64(|a| a.popcnt(rax, rbx));
    bytes.extend_from_slice(&[0xf4; 10]);
    cpu.regs.rbx = 1;
    let mut mem = mem64();
    assert_eq!(run(&bytes, &mut cpu, &mut mem), Completion::Done);
    assert_eq!(mem.reads, 0, "a whole instruction needs no fetch");
    assert_eq!(cpu.regs.rip, long64().regs.rip + 5);
}

#[test]
fn invalid_bytes_are_undecodable() {
    let mut cpu = long64();
    // 0x06 (push es) does not exist in 64-bit mode.
    let err = complete(&[0x06, 0x90, 0x90], &mut cpu, &mut mem64()).unwrap_err();
    assert!(
        matches!(&err, EmulateError::Undecodable { bytes, bitness: 64 } if bytes == "06 90 90"),
        "{err}"
    );
}

#[test]
fn default_compare_exchange_reports_current_bytes() {
    let mut mem = MockMem::new(0, 16);
    mem.put(0, &[1, 2, 3, 4]);
    let mut expected = [9, 9, 9, 9];
    assert!(!mem
        .compare_exchange(0, &mut expected, &[5, 5, 5, 5])
        .unwrap());
    assert_eq!(expected, [1, 2, 3, 4]);
    assert!(mem
        .compare_exchange(0, &mut expected, &[5, 5, 5, 5])
        .unwrap());
    assert_eq!(mem.get(0, 4), [5, 5, 5, 5]);
}

#[test]
fn verw_and_verr_check_the_gdt_descriptor_and_set_only_zf() {
    // Linux's GDT: null, kernel code32, kernel code64 (0x10), kernel data (0x18), user
    // code32 (0x23), user data (0x2b), user code64 (0x33).
    let gdt: [u64; 7] = [
        0,
        0x00cf_9b00_0000_ffff,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_fb00_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
    ];
    let mut mem = mem64();
    let table: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    mem.put(DATA + 0x100, &table);
    // The selector Linux's CLEAR_CPU_BUFFERS names, in memory.
    mem.put(DATA, &0x18u16.to_le_bytes());
    let cpu0 = || {
        let mut cpu = long64();
        cpu.sregs.gdt.base = DATA + 0x100;
        cpu.sregs.gdt.limit = (table.len() - 1) as u16;
        cpu.regs.rflags |= rflags::CF;
        cpu
    };
    let verw_mem = asm64(|a| a.verw(word_ptr(rbx)));
    let mut cpu = cpu0();
    cpu.regs.rbx = DATA;
    assert_eq!(run(&verw_mem, &mut cpu, &mut mem), Completion::Done);
    assert_eq!(cpu.regs.rip, long64().regs.rip + verw_mem.len() as u64);
    assert_eq!(
        cpu.regs.rflags & rflags::STATUS,
        rflags::ZF | rflags::CF,
        "ZF set, CF kept"
    );
    // (selector, writable?, readable?) at CPL 0.
    for (selector, w, r) in [
        (0x10u64, false, true), // code: readable, never writable
        (0x18, true, true),     // kernel data
        (0x2b, true, true),     // user data (DPL 3 >= CPL 0)
        (0x00, false, false),   // null
        (0x3b, false, false),   // past the limit
        (0x1c, false, false),   // an LDT selector
    ] {
        for (write, expect) in [(true, w), (false, r)] {
            let mut cpu = cpu0();
            cpu.regs.rax = selector;
            let bytes = match write {
                true => asm64(|a| a.verw(ax)),
                false => asm64(|a| a.verr(ax)),
            };
            assert_eq!(run(&bytes, &mut cpu, &mut mem), Completion::Done);
            let zf = cpu.regs.rflags & rflags::ZF != 0;
            assert_eq!(zf, expect, "selector {selector:#x}, write {write}");
        }
    }
    // At CPL 3 the kernel's data segment (DPL 0) is out of reach.
    let mut cpu = cpu0();
    cpu.sregs.cs.selector = 0x33;
    cpu.sregs.cs.dpl = 3;
    cpu.sregs.ss.dpl = 3;
    cpu.regs.rax = 0x18;
    assert_eq!(
        run(&asm64(|a| a.verw(ax)), &mut cpu, &mut mem),
        Completion::Done
    );
    assert_eq!(cpu.regs.rflags & rflags::ZF, 0);
}

/// Runs `code` one instruction at a time (as KVM reports each failure), from `cpu`'s RIP.
fn run_each(code: &[u8], cpu: &mut CpuState, mem: &mut MockMem) {
    let start = cpu.regs.rip;
    while ((cpu.regs.rip - start) as usize) < code.len() {
        let at = (cpu.regs.rip - start) as usize;
        assert_eq!(run(&code[at..], cpu, mem), Completion::Done, "at +{at}");
    }
}

fn x87_empty(mem: &MockMem) -> bool {
    let f = mem.fpu.unwrap();
    f.ftwx == 0 && (f.fsw >> 11) & 7 == 0
}

/// What OpenSSL's `RAND_add(buf, 128, 128.0)` compiles to without SSE: `(size_t)(8 * n)`
/// with the x87, truncating through a changed control word.
#[test]
fn x87_int_to_double_multiply_and_truncate() {
    let mut cpu = long64();
    let mut mem = mem64();
    cpu.regs.rbx = DATA;
    mem.put(DATA, &128i32.to_le_bytes());
    mem.put(DATA + 8, &8.0f64.to_le_bytes());
    mem.put(DATA + 18, &0x0e7fu16.to_le_bytes());
    let code = asm64(|a| {
        a.fild(dword_ptr(rbx))?;
        a.fmul(qword_ptr(rbx + 8))?;
        a.fnstcw(word_ptr(rbx + 16))?;
        a.fldcw(word_ptr(rbx + 18))?;
        a.fistp(qword_ptr(rbx + 24))?;
        a.fldcw(word_ptr(rbx + 16))
    });
    run_each(&code, &mut cpu, &mut mem);
    assert_eq!(mem.get(DATA + 24, 8), 1024u64.to_le_bytes());
    assert!(x87_empty(&mem), "the stack is empty again");
    assert_eq!(mem.fpu.unwrap().fcw, 0x037f);
}

/// Register forms: `fld st(i)`, `fsubrp`, `fdivp`, `fxch`, `fchs`, and `fcomip` setting
/// EFLAGS; stores to m32 and m80.
#[test]
fn x87_register_forms_and_compares() {
    let mut cpu = long64();
    let mut mem = mem64();
    cpu.regs.rbx = DATA;
    mem.put(DATA, &3.0f32.to_le_bytes());
    mem.put(DATA + 4, &(-12i16).to_le_bytes());
    let code = asm64(|a| {
        a.fld(dword_ptr(rbx))?; // 3
        a.fild(word_ptr(rbx + 4))?; // -12, 3
        a.fld(st1)?; // 3, -12, 3
        a.fsubrp(st1, st0)?; // st1 = 3 - (-12) = 15: 15, 3
        a.fdivp(st1, st0)?; // st1 = 3 / 15 = 0.2: 0.2
        a.fld1()?; // 1, 0.2
        a.fxch(st0, st1)?; // 0.2, 1
        a.fchs()?; // -0.2, 1
        a.fcomip(st0, st1)?; // -0.2 < 1: CF; pops: 1
        a.fstp(tword_ptr(rbx + 16)) // stores 1.0 as f80
    });
    run_each(&code, &mut cpu, &mut mem);
    assert_ne!(cpu.regs.rflags & rflags::CF, 0, "-0.2 < 1");
    assert_eq!(cpu.regs.rflags & rflags::ZF, 0);
    assert_eq!(mem.get(DATA + 16, 10), x87::F80::ONE.to_bytes());
    assert!(x87_empty(&mem));
}

/// A ninth push overflows the stack: the invalid-operation and stack-fault flags, and the
/// indefinite NaN; storing a NaN or a too-large value as an integer gives the integer
/// indefinite.
#[test]
fn x87_stack_overflow_and_integer_indefinite() {
    let mut cpu = long64();
    let mut mem = mem64();
    cpu.regs.rbx = DATA;
    let mut code = Vec::new();
    for _ in 0..9 {
        code.extend(asm(64, cpu.regs.rip + code.len() as u64, |a| a.fldz()));
    }
    code.extend(asm(64, cpu.regs.rip + code.len() as u64, |a| {
        a.fistp(dword_ptr(rbx))
    }));
    run_each(&code, &mut cpu, &mut mem);
    let fsw = mem.fpu.unwrap().fsw;
    assert_eq!(fsw & 0x41, 0x41, "IE and SF: {fsw:#x}");
    assert_eq!(mem.get(DATA, 4), 0x8000_0000u32.to_le_bytes());
}

#[test]
fn x87_with_ts_set_is_nm() {
    let mut cpu = long64();
    cpu.sregs.cr0 |= 1 << 3;
    let c = run(&asm64(|a| a.fld1()), &mut cpu, &mut mem64());
    assert_eq!(
        c,
        Completion::InjectException {
            vector: vector::NM,
            error_code: None
        }
    );
}

#[test]
fn fcmov_moves_only_when_its_condition_holds() {
    let mut cpu = long64();
    let mut mem = mem64();
    cpu.regs.rbx = DATA;
    cpu.regs.rflags &= !(rflags::CF | rflags::ZF);
    let code = asm64(|a| {
        a.fld1()?; // 1
        a.fldz()?; // 0, 1
        a.fcmovnbe(st0, st1)?; // above: st0 = 1
        a.fcmovb(st0, st2)?; // not below: unchanged (st2 is empty, never read)
        a.fstp(qword_ptr(rbx))?;
        a.fstp(st0)
    });
    run_each(&code, &mut cpu, &mut mem);
    assert_eq!(mem.get(DATA, 8), 1.0f64.to_le_bytes());
    assert!(x87_empty(&mem));
    assert_eq!(mem.fpu.unwrap().fsw & 0x41, 0, "no stack fault");
}
