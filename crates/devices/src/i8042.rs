//! The i8042 keyboard controller (and port 0x61).
//!
//! One device covers ports 0x60..=0x64: insert it at `vessel_memory::ports::I8042_DATA` with
//! length [`I8042::PORT_LEN`] (5). Offsets: 0 = data (0x60), 1 = system control port B (0x61),
//! 2 and 3 = nothing (0x62/0x63 read all-ones, writes ignored), 4 = status (read) / command
//! (write) (0x64).
//!
//! Enough of a controller for Linux's i8042 driver to probe it without waiting for a single
//! timeout: every command with a response answers at once; the AUX (mouse) port reports itself
//! absent the fast way (the loopback command 0xd3 answers without the AUX flag, the AUX
//! interface test 0xa9 answers "clock line stuck"), so the driver never tries the AUX IRQ test
//! that would wait 250 ms. Command 0xfe (pulse reset line), or writing the output port with
//! bit 0 clear, asks the VMM for a reset through the [`ExitSignal`].
//!
//! A keyboard is emulated just enough to answer the commands `atkbd` sends (acknowledge,
//! identify as an MF2 keyboard, echo, reset). Its answers reach the driver by interrupt: give
//! the device an IRQ 1 `EventFd` with [`I8042::with_kbd_irq`]. Without one, the controller
//! still works, but `atkbd` (which probes asynchronously, off the boot path) times out on its
//! commands and finds no keyboard.
//!
//! [`I8042::send_ctrl_alt_del`] types Ctrl-Alt-Del on that keyboard (the VMM's
//! `SendCtrlAltDel`): a Linux guest booted with `reboot=k` then restarts through this
//! controller's reset line.

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::exit::{ExitSignal, VmExitReason};
use crate::irq::IrqLine;

// Offsets from port 0x60.
const DATA: u64 = 0;
const PORT_B: u64 = 1;
const STATUS_COMMAND: u64 = 4;

// Status register bits.
const STR_OBF: u8 = 0x01;
const STR_SYS: u8 = 0x04;
/// The last write went to the command port.
const STR_CMD: u8 = 0x08;
/// Set when the keyboard is *not* locked.
const STR_KEYLOCK: u8 = 0x10;

// Controller configuration byte (CTR) bits.
const CTR_KBDINT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_KBDDIS: u8 = 0x10;
const CTR_AUXDIS: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;
/// As a BIOS leaves it: keyboard interrupt on, POST passed, AUX off, translation on.
const CTR_DEFAULT: u8 = CTR_KBDINT | CTR_SYS | CTR_AUXDIS | CTR_XLATE;

// Controller commands.
const CMD_READ_RAM: u8 = 0x20; // 0x20..=0x3f, 0x20 being the CTR
const CMD_WRITE_RAM: u8 = 0x60; // 0x60..=0x7f, 0x60 being the CTR
const CMD_PASSWORD_TEST: u8 = 0xa4;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_INPUT_PORT: u8 = 0xc0;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_BUFFER: u8 = 0xd2;
const CMD_WRITE_AUX_BUFFER: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_READ_TEST_INPUTS: u8 = 0xe0;
const CMD_PULSE_FIRST: u8 = 0xf0; // 0xf0..=0xff: pulse output lines whose bit is 0
/// Pulse output line 0 (the CPU reset line): the classic reset.
pub const CMD_RESET_CPU: u8 = 0xfe;

// Controller answers.
const SELF_TEST_OK: u8 = 0x55;
const KBD_TEST_OK: u8 = 0x00;
/// AUX interface test: "clock line stuck high", i.e. nothing there.
const AUX_TEST_ABSENT: u8 = 0x02;
const PASSWORD_NOT_INSTALLED: u8 = 0xf1;
/// Input port: bit 7 set = keyboard not inhibited.
const INPUT_PORT: u8 = 0x80;
/// Output port: bit 0 = reset line released, bit 1 = A20 enabled.
const OUTPUT_PORT_DEFAULT: u8 = 0x03;

// Keyboard commands and answers.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_GET_ID: u8 = 0xf2;
const KBD_SET_RATE: u8 = 0xf3;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_RESEND: u8 = 0xfe;
const KBD_BAT_OK: u8 = 0xaa;
/// MF2 keyboard id, and its second byte as the controller translates it.
const KBD_ID: [u8; 2] = [0xab, 0x83];
const KBD_ID_TRANSLATED: u8 = 0x41;

/// Bytes the output buffer holds (the driver flushes at most 16).
const QUEUE_SIZE: usize = 16;

/// Ctrl, Alt, Del pressed then released, in scan code set 1 (what the driver reads while the
/// controller translates, `CTR_XLATE`) and set 2 (untranslated).
const CTRL_ALT_DEL_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
const CTRL_ALT_DEL_SET2: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];

/// Where a byte in the output buffer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Source {
    /// An answer to a controller command (polled by the driver, no interrupt).
    Controller,
    /// A byte from the keyboard (interrupt on IRQ 1 if the CTR enables it).
    Keyboard,
}

/// What the next byte written to the data port is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum DataTarget {
    Ram(u8),
    OutputPort,
    KbdBuffer,
    AuxBuffer,
    AuxDevice,
}

/// What a snapshot keeps of the controller (opaque to other crates).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042Snapshot {
    ram: Vec<u8>,
    output_port: u8,
    last_write_command: bool,
    pending: Option<DataTarget>,
    kbd_pending: Option<u8>,
    queue: Vec<(u8, Source)>,
    last_data: u8,
    port_b: u8,
    refresh: bool,
}

/// The i8042 controller with its keyboard, and system control port B.
pub struct I8042 {
    exit: ExitSignal,
    kbd_irq: Option<IrqLine>,
    /// Controller RAM; byte 0 is the CTR.
    ram: [u8; 32],
    output_port: u8,
    /// Whether the last write was to the command port (status bit 3).
    last_write_command: bool,
    /// A controller command waiting for its parameter byte.
    pending: Option<DataTarget>,
    /// A keyboard command waiting for its argument byte.
    kbd_pending: Option<u8>,
    queue: VecDeque<(u8, Source)>,
    /// The last byte read from the data port (read again when the buffer is empty).
    last_data: u8,
    port_b: u8,
    refresh: bool,
}

impl I8042 {
    /// Number of ports the device covers from 0x60 (0x60..=0x64).
    pub const PORT_LEN: u64 = 5;

    /// A controller that requests [`VmExitReason::Reset`] through `exit`.
    pub fn new(exit: ExitSignal) -> Self {
        let mut ram = [0; 32];
        ram[0] = CTR_DEFAULT;
        I8042 {
            exit,
            kbd_irq: None,
            ram,
            output_port: OUTPUT_PORT_DEFAULT,
            last_write_command: false,
            pending: None,
            kbd_pending: None,
            queue: VecDeque::with_capacity(QUEUE_SIZE),
            last_data: 0,
            port_b: 0,
            refresh: false,
        }
    }

    /// The controller's registers and output buffer, for a snapshot.
    pub fn save_state(&self) -> I8042Snapshot {
        I8042Snapshot {
            ram: self.ram.to_vec(),
            output_port: self.output_port,
            last_write_command: self.last_write_command,
            pending: self.pending,
            kbd_pending: self.kbd_pending,
            queue: self.queue.iter().copied().collect(),
            last_data: self.last_data,
            port_b: self.port_b,
            refresh: self.refresh,
        }
    }

    /// Loads a saved state (the interrupt line and exit signal stay this device's).
    pub fn restore_state(&mut self, s: &I8042Snapshot) -> Result<(), crate::SavedStateError> {
        if s.ram.len() != self.ram.len() || s.queue.len() > QUEUE_SIZE {
            return Err(crate::SavedStateError::I8042Size);
        }
        self.ram.copy_from_slice(&s.ram);
        self.output_port = s.output_port;
        self.last_write_command = s.last_write_command;
        self.pending = s.pending;
        self.kbd_pending = s.kbd_pending;
        self.queue = s.queue.iter().copied().collect();
        self.last_data = s.last_data;
        self.port_b = s.port_b;
        self.refresh = s.refresh;
        Ok(())
    }

    /// Raise the keyboard interrupt (IRQ 1) by writing `irq`.
    pub fn with_kbd_irq(mut self, irq: EventFd) -> Self {
        self.kbd_irq = Some(IrqLine::new(irq));
        self
    }

    fn ctr(&self) -> u8 {
        self.ram[0]
    }

    /// Types Ctrl-Alt-Del: queues the key presses and releases as keyboard bytes (scan code
    /// set 1 while the controller translates, set 2 otherwise) and raises IRQ 1. Returns
    /// `false`, queuing nothing, when the output buffer lacks room (the guest is not reading
    /// its keyboard).
    pub fn send_ctrl_alt_del(&mut self) -> bool {
        let codes: &[u8] = if self.ctr() & CTR_XLATE != 0 {
            &CTRL_ALT_DEL_SET1
        } else {
            &CTRL_ALT_DEL_SET2
        };
        if QUEUE_SIZE - self.queue.len() < codes.len() {
            return false;
        }
        for &c in codes {
            self.push(c, Source::Keyboard);
        }
        true
    }

    fn set_ctr(&mut self, ctr: u8) {
        self.ram[0] = ctr;
        // The interrupt is a level on real hardware: enabling it with a keyboard byte
        // waiting raises it.
        self.kbd_irq_if_pending();
    }

    fn status(&self) -> u8 {
        let mut status = STR_KEYLOCK;
        if self.ctr() & CTR_SYS != 0 {
            status |= STR_SYS;
        }
        if !self.queue.is_empty() {
            status |= STR_OBF;
        }
        if self.last_write_command {
            status |= STR_CMD;
        }
        status
    }

    /// Raise IRQ 1 if the byte at the head of the buffer is from the keyboard and the CTR
    /// enables the keyboard interrupt.
    fn kbd_irq_if_pending(&self) {
        if let (Some((_, Source::Keyboard)), Some(irq)) = (self.queue.front(), &self.kbd_irq) {
            if self.ctr() & CTR_KBDINT != 0 {
                irq.raise();
            }
        }
    }

    fn push(&mut self, byte: u8, source: Source) {
        if self.queue.len() == QUEUE_SIZE {
            return;
        }
        self.queue.push_back((byte, source));
        if self.queue.len() == 1 {
            self.kbd_irq_if_pending();
        }
    }

    fn respond(&mut self, byte: u8) {
        self.push(byte, Source::Controller);
    }

    fn read_data(&mut self) -> u8 {
        if let Some((byte, _)) = self.queue.pop_front() {
            self.last_data = byte;
            self.kbd_irq_if_pending();
        }
        self.last_data
    }

    fn reset(&self) {
        self.exit.request(VmExitReason::Reset);
    }

    fn write_command(&mut self, cmd: u8) {
        self.last_write_command = true;
        // A new command cancels one waiting for its parameter, and its answer replaces any
        // unread answer to an earlier command (keyboard bytes stay).
        self.pending = None;
        self.queue
            .retain(|&(_, source)| source != Source::Controller);
        match cmd {
            CMD_READ_RAM..=0x3f => self.respond(self.ram[usize::from(cmd - CMD_READ_RAM)]),
            CMD_WRITE_RAM..=0x7f => self.pending = Some(DataTarget::Ram(cmd - CMD_WRITE_RAM)),
            CMD_PASSWORD_TEST => self.respond(PASSWORD_NOT_INSTALLED),
            CMD_AUX_DISABLE => self.ram[0] |= CTR_AUXDIS,
            CMD_AUX_ENABLE => self.ram[0] &= !CTR_AUXDIS,
            CMD_AUX_TEST => self.respond(AUX_TEST_ABSENT),
            CMD_SELF_TEST => {
                self.ram[0] |= CTR_SYS;
                self.respond(SELF_TEST_OK);
            }
            CMD_KBD_TEST => self.respond(KBD_TEST_OK),
            CMD_KBD_DISABLE => self.ram[0] |= CTR_KBDDIS,
            CMD_KBD_ENABLE => self.ram[0] &= !CTR_KBDDIS,
            CMD_READ_INPUT_PORT => self.respond(INPUT_PORT),
            CMD_READ_OUTPUT_PORT => self.respond(self.output_port),
            CMD_WRITE_OUTPUT_PORT => self.pending = Some(DataTarget::OutputPort),
            CMD_WRITE_KBD_BUFFER => self.pending = Some(DataTarget::KbdBuffer),
            CMD_WRITE_AUX_BUFFER => self.pending = Some(DataTarget::AuxBuffer),
            CMD_WRITE_AUX => self.pending = Some(DataTarget::AuxDevice),
            CMD_READ_TEST_INPUTS => self.respond(0),
            // Pulse the output lines whose bit is clear; line 0 is the reset line.
            CMD_PULSE_FIRST..=0xff if cmd & 1 == 0 => self.reset(),
            _ => {}
        }
    }

    fn write_data(&mut self, value: u8) {
        self.last_write_command = false;
        match self.pending.take() {
            Some(DataTarget::Ram(0)) => self.set_ctr(value),
            Some(DataTarget::Ram(i)) => self.ram[usize::from(i)] = value,
            Some(DataTarget::OutputPort) => {
                self.output_port = value;
                if value & 1 == 0 {
                    self.reset();
                }
            }
            Some(DataTarget::KbdBuffer) => self.push(value, Source::Keyboard),
            // There is no AUX port: the byte comes back, but not flagged as AUX data, which
            // tells Linux's loopback test at once that the port is absent.
            Some(DataTarget::AuxBuffer) => self.respond(value),
            Some(DataTarget::AuxDevice) => {}
            None => self.write_keyboard(value),
        }
    }

    /// A byte sent to the keyboard.
    fn write_keyboard(&mut self, value: u8) {
        if let Some(cmd) = self.kbd_pending.take() {
            // The argument of SET_LEDS, SCANCODE_SET or SET_RATE.
            self.push(KBD_ACK, Source::Keyboard);
            if cmd == KBD_SCANCODE_SET && value == 0 {
                self.push(2, Source::Keyboard);
            }
            return;
        }
        match value {
            KBD_RESET => {
                self.push(KBD_ACK, Source::Keyboard);
                self.push(KBD_BAT_OK, Source::Keyboard);
            }
            KBD_GET_ID => {
                self.push(KBD_ACK, Source::Keyboard);
                self.push(KBD_ID[0], Source::Keyboard);
                let second = if self.ctr() & CTR_XLATE != 0 {
                    KBD_ID_TRANSLATED
                } else {
                    KBD_ID[1]
                };
                self.push(second, Source::Keyboard);
            }
            KBD_ECHO => self.push(KBD_ECHO, Source::Keyboard),
            KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_SET_RATE => {
                self.kbd_pending = Some(value);
                self.push(KBD_ACK, Source::Keyboard);
            }
            // Enable, disable, set defaults, the set-3 key type commands, resend.
            0xf4..=0xfe => self.push(KBD_ACK, Source::Keyboard),
            _ => self.push(KBD_RESEND, Source::Keyboard),
        }
    }

    /// Port 0x61. Bits 0-3 (speaker gate and data, parity/channel check enables) read back;
    /// bit 4 (memory refresh) toggles on each read for code that times itself with it; bit 5
    /// (PIT channel 2 output) reads high so a wait for it ends; bits 6-7 (NMI sources) are 0.
    fn read_port_b(&mut self) -> u8 {
        self.refresh = !self.refresh;
        (self.port_b & 0x0f) | if self.refresh { 0x10 } else { 0 } | 0x20
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (port, byte) in (offset..).zip(data.iter_mut()) {
            *byte = match port {
                DATA => self.read_data(),
                PORT_B => self.read_port_b(),
                STATUS_COMMAND => self.status(),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (port, &value) in (offset..).zip(data) {
            match port {
                DATA => self.write_data(value),
                PORT_B => self.port_b = value & 0x0f,
                STATUS_COMMAND => self.write_command(value),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn i8042() -> (I8042, ExitSignal) {
        let exit = ExitSignal::new().unwrap();
        (I8042::new(exit.clone()), exit)
    }

    fn with_irq() -> (I8042, EventFd) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = I8042::new(ExitSignal::new().unwrap()).with_kbd_irq(irq.try_clone().unwrap());
        (dev, irq)
    }

    fn rd(d: &mut I8042, port: u64) -> u8 {
        let mut b = [0];
        d.read(port, &mut b);
        b[0]
    }

    fn status(d: &mut I8042) -> u8 {
        rd(d, STATUS_COMMAND)
    }

    fn cmd(d: &mut I8042, c: u8) {
        d.write(STATUS_COMMAND, &[c]);
    }

    fn data(d: &mut I8042, v: u8) {
        d.write(DATA, &[v]);
    }

    /// What Linux's `__i8042_command` does: wait for IBF clear, write the command, write the
    /// parameters, then for each answer byte poll for OBF (Linux polls up to 10000 times,
    /// 50 us apart, before giving up: here any wait at all is a failure).
    fn linux_command(
        d: &mut I8042,
        c: u8,
        params: &[u8],
        answers: usize,
    ) -> Result<Vec<u8>, &'static str> {
        assert_eq!(status(d) & 0x02, 0, "input buffer never busy");
        cmd(d, c);
        for &p in params {
            assert_eq!(status(d) & 0x02, 0);
            data(d, p);
        }
        let mut out = Vec::new();
        for _ in 0..answers {
            let st = status(d);
            if st & STR_OBF == 0 {
                return Err("timeout");
            }
            if c == CMD_WRITE_AUX_BUFFER && st & 0x20 == 0 {
                return Err("auxerr");
            }
            out.push(rd(d, DATA));
        }
        Ok(out)
    }

    /// Linux's `i8042_flush`: read while OBF, failing past 16 bytes.
    fn linux_flush(d: &mut I8042) -> Result<usize, &'static str> {
        let mut n = 0;
        while status(d) & STR_OBF != 0 {
            n += 1;
            if n > 16 {
                return Err("flush overflow");
            }
            rd(d, DATA);
        }
        Ok(n)
    }

    #[test]
    fn idle_status_and_self_test() {
        let (mut d, _) = i8042();
        // Nothing to read, input buffer free, POST passed, keyboard unlocked.
        assert_eq!(status(&mut d), STR_SYS | STR_KEYLOCK);
        cmd(&mut d, CMD_SELF_TEST);
        assert_eq!(status(&mut d), STR_OBF | STR_SYS | STR_CMD | STR_KEYLOCK);
        assert_eq!(rd(&mut d, DATA), 0x55);
        assert_eq!(status(&mut d) & STR_OBF, 0);
        cmd(&mut d, CMD_KBD_TEST);
        assert_eq!(rd(&mut d, DATA), 0x00);
    }

    #[test]
    fn ctr_read_write() {
        let (mut d, _) = i8042();
        cmd(&mut d, 0x20);
        assert_eq!(status(&mut d) & STR_OBF, STR_OBF);
        assert_eq!(rd(&mut d, DATA), CTR_DEFAULT);

        cmd(&mut d, 0x60);
        // A parameter, not an answer: nothing to read.
        assert_eq!(status(&mut d) & STR_OBF, 0);
        data(&mut d, 0x00);
        assert_eq!(
            status(&mut d) & (STR_CMD | STR_SYS),
            0,
            "SYS follows the CTR"
        );
        cmd(&mut d, 0x20);
        assert_eq!(rd(&mut d, DATA), 0x00);

        // Other controller RAM bytes.
        cmd(&mut d, 0x65);
        data(&mut d, 0xab);
        cmd(&mut d, 0x25);
        assert_eq!(rd(&mut d, DATA), 0xab);

        // Enable/disable bits.
        cmd(&mut d, CMD_KBD_DISABLE);
        cmd(&mut d, CMD_AUX_ENABLE);
        cmd(&mut d, 0x20);
        assert_eq!(rd(&mut d, DATA), CTR_KBDDIS);
        cmd(&mut d, CMD_KBD_ENABLE);
        cmd(&mut d, CMD_AUX_DISABLE);
        cmd(&mut d, 0x20);
        assert_eq!(rd(&mut d, DATA), CTR_AUXDIS);
    }

    #[test]
    fn reset_command_requests_reset() {
        let (mut d, exit) = i8042();
        cmd(&mut d, 0xff); // pulse nothing
        cmd(&mut d, 0xaa);
        assert_eq!(exit.reason(), None);
        assert!(exit.eventfd().read().is_err());
        cmd(&mut d, CMD_RESET_CPU);
        assert_eq!(exit.reason(), Some(VmExitReason::Reset));
        assert_eq!(exit.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn output_port_reset_line() {
        let (mut d, exit) = i8042();
        cmd(&mut d, CMD_READ_OUTPUT_PORT);
        assert_eq!(rd(&mut d, DATA), OUTPUT_PORT_DEFAULT);
        // Gate A20 off and on: no reset.
        cmd(&mut d, CMD_WRITE_OUTPUT_PORT);
        data(&mut d, 0xdd);
        cmd(&mut d, CMD_WRITE_OUTPUT_PORT);
        data(&mut d, 0xdf);
        assert_eq!(exit.reason(), None);
        cmd(&mut d, CMD_WRITE_OUTPUT_PORT);
        data(&mut d, 0xde);
        assert_eq!(exit.reason(), Some(VmExitReason::Reset));
    }

    #[test]
    fn linux_probe_never_waits() {
        let (mut d, _) = i8042();
        // i8042_controller_check, _selftest.
        assert_eq!(linux_flush(&mut d), Ok(0));
        assert_eq!(linux_command(&mut d, CMD_SELF_TEST, &[], 1), Ok(vec![0x55]));
        // i8042_controller_init: two stable CTR reads, then write it back.
        let ctr = linux_command(&mut d, 0x20, &[], 1).unwrap()[0];
        assert_eq!(linux_command(&mut d, 0x20, &[], 1), Ok(vec![ctr]));
        assert_ne!(
            status(&mut d) & STR_KEYLOCK,
            0,
            "no 'Keylock active' warning"
        );
        let ctr = (ctr | CTR_KBDDIS) & !CTR_KBDINT;
        assert_eq!(linux_command(&mut d, 0x60, &[ctr], 0), Ok(vec![]));
        assert_eq!(linux_flush(&mut d), Ok(0));
        // i8042_check_aux: the loopback fails at once, then the AUX test says "absent".
        assert_eq!(linux_flush(&mut d), Ok(0));
        assert_eq!(
            linux_command(&mut d, CMD_WRITE_AUX_BUFFER, &[0x5a], 1),
            Err("auxerr")
        );
        let aux = linux_command(&mut d, CMD_AUX_TEST, &[], 1).unwrap()[0];
        assert!(
            aux != 0 && aux != 0xfa && aux != 0xff,
            "AUX absent: {aux:#x}"
        );
        // i8042_setup_kbd: enable the keyboard port.
        let ctr = (ctr & !CTR_KBDDIS) | CTR_KBDINT;
        assert_eq!(linux_command(&mut d, 0x60, &[ctr], 0), Ok(vec![]));
        assert_eq!(linux_command(&mut d, 0x20, &[], 1), Ok(vec![ctr]));
        assert_eq!(linux_flush(&mut d), Ok(0));
    }

    #[test]
    fn keyboard_answers_by_interrupt() {
        let (mut d, irq) = with_irq();
        data(&mut d, KBD_GET_ID);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(status(&mut d) & (STR_OBF | STR_CMD), STR_OBF);
        assert_eq!(rd(&mut d, DATA), KBD_ACK);
        // Each following byte raises the interrupt again when it reaches the head.
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(rd(&mut d, DATA), 0xab);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(rd(&mut d, DATA), KBD_ID_TRANSLATED);
        assert!(irq.read().is_err());
        assert_eq!(status(&mut d) & STR_OBF, 0);
        // Reading an empty buffer returns the last byte again.
        assert_eq!(rd(&mut d, DATA), KBD_ID_TRANSLATED);

        // Untranslated: the raw MF2 id.
        cmd(&mut d, 0x60);
        data(&mut d, CTR_KBDINT | CTR_SYS);
        data(&mut d, KBD_GET_ID);
        let id: Vec<u8> = (0..3).map(|_| rd(&mut d, DATA)).collect();
        assert_eq!(id, [KBD_ACK, 0xab, 0x83]);

        // A command with an argument: ACK for each byte.
        data(&mut d, KBD_SET_LEDS);
        data(&mut d, 0x07);
        assert_eq!([rd(&mut d, DATA), rd(&mut d, DATA)], [KBD_ACK, KBD_ACK]);
        data(&mut d, KBD_RESET);
        assert_eq!([rd(&mut d, DATA), rd(&mut d, DATA)], [KBD_ACK, KBD_BAT_OK]);
        data(&mut d, KBD_ECHO);
        assert_eq!(rd(&mut d, DATA), KBD_ECHO);
        data(&mut d, 0x12);
        assert_eq!(rd(&mut d, DATA), KBD_RESEND);
    }

    #[test]
    fn keyboard_interrupt_follows_ctr() {
        let (mut d, irq) = with_irq();
        cmd(&mut d, 0x60);
        data(&mut d, CTR_SYS | CTR_XLATE);
        // Controller answers never interrupt.
        cmd(&mut d, 0x20);
        assert!(irq.read().is_err());
        rd(&mut d, DATA);
        // Keyboard bytes do, once the CTR enables it.
        cmd(&mut d, CMD_WRITE_KBD_BUFFER);
        data(&mut d, 0x1c);
        assert!(irq.read().is_err());
        assert_eq!(status(&mut d) & STR_OBF, STR_OBF);
        cmd(&mut d, 0x60);
        data(&mut d, CTR_KBDINT | CTR_SYS | CTR_XLATE);
        assert_eq!(irq.read().unwrap(), 1);
        // Commands do not drop keyboard bytes.
        assert_eq!(rd(&mut d, DATA), 0x1c);
    }

    #[test]
    fn ctrl_alt_del_is_typed_on_the_keyboard() {
        let (mut d, irq) = with_irq();
        // The interrupt is raised for the first byte, and again as each next byte reaches
        // the head of the buffer: the driver reads one byte per interrupt.
        assert!(d.send_ctrl_alt_del());
        let mut got = Vec::new();
        while status(&mut d) & STR_OBF != 0 {
            assert_eq!(irq.read().unwrap(), 1, "IRQ 1 for byte {}", got.len());
            got.push(rd(&mut d, DATA));
        }
        assert!(irq.read().is_err());
        // Translated (the default CTR): set 1, Ctrl Alt Del down, then up.
        assert_eq!(got, [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]);

        // Untranslated: set 2, releases with the 0xf0 prefix.
        cmd(&mut d, 0x60);
        data(&mut d, CTR_KBDINT | CTR_SYS);
        assert!(d.send_ctrl_alt_del());
        let got: Vec<u8> =
            std::iter::from_fn(|| (status(&mut d) & STR_OBF != 0).then(|| rd(&mut d, DATA)))
                .collect();
        assert_eq!(
            got,
            [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14]
        );
    }

    #[test]
    fn ctrl_alt_del_needs_room_in_the_buffer() {
        let (mut d, exit) = i8042();
        // A guest that never reads its keyboard: the second sequence fits, the third not.
        assert!(d.send_ctrl_alt_del());
        assert!(d.send_ctrl_alt_del());
        assert!(!d.send_ctrl_alt_del());
        assert_eq!(linux_flush(&mut d), Ok(QUEUE_SIZE));
        // Typing it does not itself reset the VM: the guest decides.
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn output_buffer_is_bounded() {
        let (mut d, _) = i8042();
        for i in 0..40 {
            cmd(&mut d, CMD_WRITE_KBD_BUFFER);
            data(&mut d, i);
        }
        assert_eq!(linux_flush(&mut d), Ok(QUEUE_SIZE));
    }

    #[test]
    fn port_b_and_unused_ports() {
        let (mut d, _) = i8042();
        d.write(PORT_B, &[0x03]);
        let a = rd(&mut d, PORT_B);
        let b = rd(&mut d, PORT_B);
        assert_eq!(a & 0xef, 0x23);
        assert_eq!(b & 0xef, 0x23);
        assert_ne!(a & 0x10, b & 0x10, "refresh bit toggles");
        assert_eq!(rd(&mut d, 2), 0xff);
        assert_eq!(rd(&mut d, 3), 0xff);
        d.write(2, &[0]);
        // A 16-bit read from 0x60 covers the data port and port B.
        cmd(&mut d, CMD_SELF_TEST);
        let mut w = [0; 2];
        d.read(DATA, &mut w);
        assert_eq!(w[0], 0x55);
        assert_eq!(w[1] & 0x2f, 0x23);
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;

    #[test]
    fn output_buffer_and_ram_carry_over() {
        let mut a = I8042::new(ExitSignal::new().unwrap());
        assert!(a.send_ctrl_alt_del());
        a.ram[1] = 0x77;
        let s = a.save_state();
        let mut b = I8042::new(ExitSignal::new().unwrap());
        b.restore_state(&s).unwrap();
        assert_eq!(b.save_state(), s);
        assert_eq!(b.queue, a.queue);
        let mut bad = s.clone();
        bad.ram.push(0);
        assert!(b.restore_state(&bad).is_err());
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<I8042Snapshot>(&json).unwrap(), s);
    }
}
