//! The built-in demo guest: the first thing a new user runs to see that the host works.
//!
//! A few dozen bytes of 64-bit code, assembled when the VM is built, that print a greeting on
//! COM1 and power the VM off through the ACPI sleep control register. It runs in the same
//! long-mode environment as a Linux kernel's 64-bit entry (boot GDT, identity page tables).

use iced_x86::code_asm::*;
use vessel_memory::{addr, ports};

/// What the demo guest prints.
pub const GREETING: &str = "Hello from a Vessel VM\r\n";

/// The demo guest's code, to be loaded and entered at `addr::HIMEM_START`.
pub fn code() -> Vec<u8> {
    assemble().expect("the demo guest's fixed code always assembles")
}

fn assemble() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut msg = a.create_label();
    let mut next = a.create_label();
    let mut done = a.create_label();
    a.mov(dx, ports::COM1 as u32)?;
    a.lea(rsi, ptr(msg))?;
    a.set_label(&mut next)?;
    a.mov(al, byte_ptr(rsi))?;
    a.test(al, al)?;
    a.jz(done)?;
    a.out(dx, al)?;
    a.inc(rsi)?;
    a.jmp(next)?;
    a.set_label(&mut done)?;
    // Sleep control register: SLP_TYP = S5, SLP_EN.
    a.mov(dx, ports::ACPI_SLEEP_CONTROL as u32)?;
    a.mov(al, ((ports::SLEEP_TYPE_S5 as u32) << 2) | 0x20)?;
    a.out(dx, al)?;
    let mut halt = a.create_label();
    a.set_label(&mut halt)?;
    a.hlt()?;
    a.jmp(halt)?;
    a.set_label(&mut msg)?;
    let mut text = GREETING.as_bytes().to_vec();
    text.push(0);
    a.db(&text)?;
    a.assemble(addr::HIMEM_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_code_carries_the_greeting_and_is_small() {
        let c = code();
        assert!(c.len() < 128, "{} bytes", c.len());
        let g = GREETING.as_bytes();
        assert!(c.windows(g.len()).any(|w| w == g));
        assert_eq!(*c.last().unwrap(), 0);
    }

    #[test]
    fn demo_code_decodes_to_out_and_poweroff() {
        use iced_x86::{Decoder, DecoderOptions, Mnemonic};
        let c = code();
        let mut d = Decoder::with_ip(64, &c, addr::HIMEM_START, DecoderOptions::NONE);
        let mut outs = 0;
        for i in d.iter() {
            if i.mnemonic() == Mnemonic::Out {
                outs += 1;
            }
            if i.mnemonic() == Mnemonic::Hlt {
                break;
            }
        }
        assert_eq!(outs, 2, "one OUT for the text, one for the power-off");
    }
}
