//! Tiny guests built by the tests: 64-bit code assembled with iced-x86's code assembler and
//! wrapped in a minimal ELF64 "vmlinux" (one PT_LOAD, no PVH note), so Vessel boots them through
//! the Linux 64-bit boot path: long mode, identity paging, RSI = zero page.
//!
//! The guest talks to the test through COM1 and ends with ACPI power-off or an i8042 reset.

use iced_x86::code_asm::*;

/// Where tiny guests are loaded and entered.
pub const LOAD_ADDR: u64 = 0x20_0000;

/// Wrap code into an ELF64 x86-64 executable loaded and entered at `LOAD_ADDR`.
pub fn elf(code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    f[58..60].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
    let ph = &mut f[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&7u32.to_le_bytes()); // RWX
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes()); // p_offset
    ph[16..24].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    ph[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(code.len() as u64 + 0x1000).to_le_bytes());
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    f.extend_from_slice(code);
    f
}

/// A guest program under construction, with the helpers every tiny guest needs.
pub struct Guest {
    pub a: CodeAssembler,
    puts: CodeLabel,
    put_hex: CodeLabel,
    data: Vec<(CodeLabel, Vec<u8>)>,
}

impl Guest {
    pub fn new() -> Self {
        let mut a = CodeAssembler::new(64).unwrap();
        let puts = a.create_label();
        let put_hex = a.create_label();
        Guest {
            a,
            puts,
            put_hex,
            data: Vec::new(),
        }
    }

    /// A string constant; returns its label.
    pub fn string(&mut self, s: &str) -> CodeLabel {
        let l = self.a.create_label();
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.data.push((l, b));
        l
    }

    /// Print a constant string (registers are preserved).
    pub fn print(&mut self, s: &str) {
        let l = self.string(s);
        self.a.push(rsi).unwrap();
        self.a.lea(rsi, ptr(l)).unwrap();
        self.a.call(self.puts).unwrap();
        self.a.pop(rsi).unwrap();
    }

    /// Print the NUL-terminated string at the address in `rsi`.
    pub fn print_rsi(&mut self) {
        self.a.call(self.puts).unwrap();
    }

    /// Print `rax` as 16 hex digits.
    pub fn print_rax_hex(&mut self) {
        self.a.call(self.put_hex).unwrap();
    }

    /// ACPI S5 through the sleep control register.
    pub fn power_off(&mut self) {
        let a = &mut self.a;
        a.mov(dx, 0x600u32).unwrap();
        a.mov(al, 0x34u32).unwrap();
        a.out(dx, al).unwrap();
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.hlt().unwrap();
        a.jmp(l).unwrap();
    }

    /// The i8042 reset command.
    pub fn i8042_reset(&mut self) {
        let a = &mut self.a;
        a.mov(al, 0xfeu32).unwrap();
        a.out(0x64u8 as u32, al).unwrap();
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.hlt().unwrap();
        a.jmp(l).unwrap();
    }

    /// Assemble, appending the helper routines and the data.
    pub fn finish(mut self) -> Vec<u8> {
        let a = &mut self.a;
        // puts: rsi -> COM1; preserves every register.
        a.set_label(&mut self.puts).unwrap();
        a.push(rax).unwrap();
        a.push(rdx).unwrap();
        a.push(rsi).unwrap();
        a.mov(dx, 0x3f8u32).unwrap();
        let mut next = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut next).unwrap();
        a.mov(al, byte_ptr(rsi)).unwrap();
        a.test(al, al).unwrap();
        a.jz(done).unwrap();
        a.out(dx, al).unwrap();
        a.inc(rsi).unwrap();
        a.jmp(next).unwrap();
        a.set_label(&mut done).unwrap();
        a.pop(rsi).unwrap();
        a.pop(rdx).unwrap();
        a.pop(rax).unwrap();
        a.ret().unwrap();
        // put_hex: rax -> 16 hex digits on COM1; preserves rax.
        a.set_label(&mut self.put_hex).unwrap();
        a.push(rax).unwrap();
        a.push(rbx).unwrap();
        a.push(rcx).unwrap();
        a.push(rdx).unwrap();
        a.mov(rbx, rax).unwrap();
        a.mov(ecx, 16u32).unwrap();
        a.mov(dx, 0x3f8u32).unwrap();
        let mut digit = a.create_label();
        let mut letter = a.create_label();
        let mut emit = a.create_label();
        a.set_label(&mut digit).unwrap();
        a.rol(rbx, 4u32).unwrap();
        a.mov(al, bl).unwrap();
        a.and(al, 0xfu32).unwrap();
        a.cmp(al, 10u32).unwrap();
        a.jae(letter).unwrap();
        a.add(al, b'0' as u32).unwrap();
        a.jmp(emit).unwrap();
        a.set_label(&mut letter).unwrap();
        a.add(al, (b'a' - 10) as u32).unwrap();
        a.set_label(&mut emit).unwrap();
        a.out(dx, al).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(digit).unwrap();
        a.pop(rdx).unwrap();
        a.pop(rcx).unwrap();
        a.pop(rbx).unwrap();
        a.pop(rax).unwrap();
        a.ret().unwrap();
        for (mut l, bytes) in std::mem::take(&mut self.data) {
            a.set_label(&mut l).unwrap();
            a.db(&bytes).unwrap();
        }
        self.a.assemble(LOAD_ADDR).unwrap()
    }
}
