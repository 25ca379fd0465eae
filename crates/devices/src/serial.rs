//! The 16550 UART (COM1), built on `vm_superio::Serial`.
//!
//! Insert at `vessel_memory::ports::COM1` with length [`Serial::PORT_LEN`] (8 ports); register
//! the interrupt `EventFd` as an irqfd for `COM1_IRQ` (4).
//!
//! Output: the guest's bytes are buffered and handed to the sink at the end of each line, when
//! the guest ends a transmit burst (it writes IER or reads IIR, which both Linux's console and
//! its interrupt-driven tty driver do after each burst), when the buffer fills, on
//! [`Serial::flush`], and when the device is dropped. So the console is line-complete, shell
//! prompts without a newline appear, and the sink sees one write per line or burst instead of
//! one per byte.
//!
//! Input: [`Serial::enqueue_input`] (called by the VMM's stdin thread) never blocks and never
//! makes the guest wait: what does not fit in the 64-byte receive FIFO waits in a bounded
//! backlog and is moved into the FIFO when the guest has drained it.

use std::collections::VecDeque;
use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::irq::IrqLine;

type Uart = vm_superio::Serial<IrqLine, NoEvents, ConsoleOut>;

/// Register offsets (with DLAB clear) that the wrapper cares about.
const DATA: u8 = 0;
const IER: u8 = 1;
const IIR: u8 = 2;

/// Output buffered before it is written to the sink even without a newline.
const OUT_BUF_SIZE: usize = 1024;
/// Input accepted beyond the UART's FIFO, waiting for the guest to drain it.
const INPUT_BACKLOG_SIZE: usize = 4096;

/// The sink of the guest's output, buffering it until the end of a line or burst.
struct ConsoleOut {
    out: Box<dyn Write + Send>,
    buf: Vec<u8>,
    /// Bytes the sink refused (it returned an error); they are dropped.
    lost: u64,
}

impl ConsoleOut {
    fn new(out: Box<dyn Write + Send>) -> Self {
        ConsoleOut {
            out,
            buf: Vec::with_capacity(OUT_BUF_SIZE),
            lost: 0,
        }
    }

    /// Hand the buffered bytes to the sink and flush it.
    fn push(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let res = self
            .out
            .write_all(&self.buf)
            .and_then(|()| self.out.flush());
        if let Err(e) = res {
            if self.lost == 0 {
                log::warn!("serial output lost: {e}");
            }
            self.lost += self.buf.len() as u64;
        }
        self.buf.clear();
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > OUT_BUF_SIZE {
            self.push();
        }
        // The UART writes one byte at a time, so this never grows the buffer past its
        // capacity (no allocation on the vCPU's path).
        self.buf.extend_from_slice(data);
        if data.contains(&b'\n') || self.buf.len() >= OUT_BUF_SIZE {
            self.push();
        }
        Ok(data.len())
    }

    /// `vm_superio` flushes after every byte; the real flush happens at the end of a line or
    /// burst (see the module documentation), so this is deliberately a no-op.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleOut {
    fn drop(&mut self) {
        self.push();
    }
}

/// What a snapshot keeps of the UART.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// The receive FIFO.
    pub fifo: Vec<u8>,
    /// Input waiting behind the FIFO.
    pub backlog: Vec<u8>,
}

/// A 16550A UART on the port bus.
pub struct Serial {
    uart: Uart,
    /// The FIFO's size (its free space when empty).
    fifo_size: usize,
    /// Input waiting for room in the FIFO (bounded by `INPUT_BACKLOG_SIZE`).
    backlog: VecDeque<u8>,
    /// Whether an interrupt failure was already logged.
    warned: bool,
}

impl Serial {
    /// Number of ports the UART occupies.
    pub const PORT_LEN: u64 = 8;

    /// A UART raising its interrupt by writing `irq` and sending the guest's output to `out`
    /// (stdout, a file, `io::sink()`...).
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        let uart = Uart::new(IrqLine::new(irq), ConsoleOut::new(out));
        let fifo_size = uart.fifo_capacity();
        Serial {
            uart,
            fifo_size,
            backlog: VecDeque::with_capacity(INPUT_BACKLOG_SIZE),
            warned: false,
        }
    }

    /// A UART whose output is discarded (a guest console nobody watches).
    pub fn with_sink(irq: EventFd) -> Self {
        Serial::new(irq, Box::new(io::sink()))
    }

    /// The interrupt event (to register as an irqfd for the UART's GSI).
    pub fn irq_eventfd(&self) -> &EventFd {
        self.uart.interrupt_evt().eventfd()
    }

    /// Queue input for the guest. Takes as much of `input` as fits in the receive FIFO and the
    /// backlog behind it (4 KiB), raises the receive interrupt if the guest enabled it, and
    /// returns how many bytes were taken; the caller retries the rest later. Never blocks.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let take = input.len().min(INPUT_BACKLOG_SIZE - self.backlog.len());
        self.backlog.extend(&input[..take]);
        self.refill();
        take
    }

    /// Input taken by [`Serial::enqueue_input`] that is not yet in the FIFO.
    pub fn input_backlog(&self) -> usize {
        self.backlog.len()
    }

    /// Hand any buffered output to the sink and flush it (the VMM calls this when the VM
    /// exits; it also happens on drop).
    pub fn flush(&mut self) {
        self.uart.writer_mut().push();
    }

    /// Bytes of output the sink refused (write errors); they were dropped.
    pub fn lost_output_bytes(&self) -> u64 {
        self.uart.writer().lost
    }

    /// The UART's registers, FIFO and input backlog, for a snapshot.
    pub fn save_state(&self) -> SerialSnapshot {
        let u = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: u.baud_divisor_low,
            baud_divisor_high: u.baud_divisor_high,
            interrupt_enable: u.interrupt_enable,
            interrupt_identification: u.interrupt_identification,
            line_control: u.line_control,
            line_status: u.line_status,
            modem_control: u.modem_control,
            modem_status: u.modem_status,
            scratch: u.scratch,
            fifo: u.in_buffer,
            backlog: self.backlog.iter().copied().collect(),
        }
    }

    /// Loads a saved state into this UART, keeping its interrupt line and output. An
    /// interrupt the saved state had pending is raised again.
    pub fn restore_state(&mut self, s: &SerialSnapshot) -> Result<(), crate::SavedStateError> {
        if s.backlog.len() > INPUT_BACKLOG_SIZE {
            return Err(crate::SavedStateError::SerialBacklog(s.backlog.len()));
        }
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.fifo.clone(),
        };
        let irq = self
            .uart
            .interrupt_evt()
            .eventfd()
            .try_clone()
            .map_err(crate::SavedStateError::SerialInterrupt)?;
        let out = std::mem::replace(
            self.uart.writer_mut(),
            ConsoleOut::new(Box::new(io::sink())),
        );
        match Uart::from_state(&state, IrqLine::new(irq), NoEvents, out) {
            Ok(u) => self.uart = u,
            Err(e) => return Err(crate::SavedStateError::SerialRefused(e)),
        }
        self.backlog = s.backlog.iter().copied().collect();
        Ok(())
    }

    /// Move backlog into the FIFO, as much as fits.
    fn refill(&mut self) {
        let n = self.uart.fifo_capacity().min(self.backlog.len());
        if n == 0 {
            return;
        }
        let bytes = &self.backlog.make_contiguous()[..n];
        match self.uart.enqueue_raw_bytes(bytes) {
            // Zero in loopback mode: the input waits.
            Ok(taken) => {
                self.backlog.drain(..taken);
            }
            Err(e) => self.warn_once(e),
        }
    }

    fn warn_once(&mut self, e: vm_superio::serial::Error<io::Error>) {
        if !self.warned {
            self.warned = true;
            log::warn!("serial: {e:?}");
        }
    }

    fn read_reg(&mut self, reg: u8) -> u8 {
        let value = self.uart.read(reg);
        match reg {
            // Reading IIR is how an interrupt-driven transmitter starts each burst.
            IIR => self.uart.writer_mut().push(),
            // Refill only once the guest has emptied the FIFO: one receive interrupt per
            // FIFO-full of input rather than one per byte.
            DATA if !self.backlog.is_empty() && self.uart.fifo_capacity() == self.fifo_size => {
                self.refill()
            }
            _ => {}
        }
        value
    }

    fn write_reg(&mut self, reg: u8, value: u8) {
        if let Err(e) = self.uart.write(reg, value) {
            self.warn_once(e);
        }
        // Drivers write IER at the end of a burst (the console restores it, the tty driver
        // masks THRE when it has nothing more to send).
        if reg == IER {
            self.uart.writer_mut().push();
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (reg, byte) in (offset..).zip(data.iter_mut()) {
            *byte = match u8::try_from(reg) {
                Ok(reg) if u64::from(reg) < Serial::PORT_LEN => self.read_reg(reg),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (reg, &value) in (offset..).zip(data) {
            if let Ok(reg) = u8::try_from(reg) {
                if u64::from(reg) < Serial::PORT_LEN {
                    self.write_reg(reg, value);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const SCR: u64 = 7;
    const IER_RDA: u8 = 0x01;
    const IER_THRE: u8 = 0x02;
    const IIR_NONE: u8 = 0x01;
    const IIR_THRE: u8 = 0x02;
    const IIR_RDA: u8 = 0x04;
    const IIR_FIFO: u8 = 0xc0;
    const LSR_DR: u8 = 0x01;
    const LSR_THRE: u8 = 0x20;
    const LSR_TEMT: u8 = 0x40;
    const LCR_DLAB: u8 = 0x80;

    /// A sink the test can look into; counts the writes that reach it.
    #[derive(Clone, Default)]
    struct Capture {
        data: Arc<Mutex<Vec<u8>>>,
        writes: Arc<Mutex<usize>>,
    }

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8(self.data.lock().unwrap().clone()).unwrap()
        }
        fn writes(&self) -> usize {
            *self.writes.lock().unwrap()
        }
    }

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.data.lock().unwrap().extend_from_slice(buf);
            *self.writes.lock().unwrap() += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn serial() -> (Serial, EventFd, Capture) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let out = Capture::default();
        let serial = Serial::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        (serial, irq, out)
    }

    fn rd(s: &mut Serial, reg: u64) -> u8 {
        let mut b = [0];
        s.read(reg, &mut b);
        b[0]
    }

    fn wr(s: &mut Serial, reg: u64, v: u8) {
        s.write(reg, &[v]);
    }

    fn irq_count(irq: &EventFd) -> u64 {
        irq.read().unwrap_or(0)
    }

    #[test]
    fn thr_bytes_reach_the_sink_in_order_and_raise_thre() {
        let (mut s, irq, out) = serial();
        wr(&mut s, IER as u64, IER_THRE);
        // Enabling THRE with an empty transmitter raises it at once.
        assert_eq!(irq_count(&irq), 1);
        assert_eq!(rd(&mut s, IIR as u64), IIR_FIFO | IIR_THRE);
        // Reading IIR acknowledged it.
        assert_eq!(rd(&mut s, IIR as u64), IIR_FIFO | IIR_NONE);

        for &b in b"hello\n" {
            wr(&mut s, DATA as u64, b);
            assert_eq!(rd(&mut s, LSR) & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
        }
        // The first byte raised THRE; the later ones found it still pending.
        assert_eq!(irq_count(&irq), 1);
        assert_eq!(rd(&mut s, IIR as u64), IIR_FIFO | IIR_THRE);
        assert_eq!(out.text(), "hello\n");
        // One write for the whole line, not one per byte.
        assert_eq!(out.writes(), 1);

        wr(&mut s, DATA as u64, b'x');
        assert_eq!(irq_count(&irq), 1);
    }

    #[test]
    fn no_interrupt_without_ier() {
        let (mut s, irq, out) = serial();
        for &b in b"ab\n" {
            wr(&mut s, DATA as u64, b);
        }
        assert_eq!(out.text(), "ab\n");
        assert!(irq.read().is_err());
        assert_eq!(rd(&mut s, IIR as u64), IIR_FIFO | IIR_NONE);
    }

    #[test]
    fn output_is_pushed_at_line_and_burst_ends() {
        let (mut s, _irq, out) = serial();
        wr(&mut s, DATA as u64, b'$');
        wr(&mut s, DATA as u64, b' ');
        assert_eq!(out.text(), "");
        // The console driver restores IER after its burst.
        wr(&mut s, IER as u64, 0);
        assert_eq!(out.text(), "$ ");
        wr(&mut s, DATA as u64, b'a');
        // The interrupt-driven driver reads IIR before each burst.
        rd(&mut s, IIR as u64);
        assert_eq!(out.text(), "$ a");
        wr(&mut s, DATA as u64, b'b');
        s.flush();
        assert_eq!(out.text(), "$ ab");
        wr(&mut s, DATA as u64, b'c');
        drop(s);
        assert_eq!(out.text(), "$ abc");
        assert_eq!(out.writes(), 4);
    }

    #[test]
    fn long_output_without_newline_is_pushed_when_the_buffer_fills() {
        let (mut s, _irq, out) = serial();
        for i in 0..OUT_BUF_SIZE + 10 {
            wr(&mut s, DATA as u64, b'a' + (i % 26) as u8);
        }
        assert_eq!(out.text().len(), OUT_BUF_SIZE);
        s.flush();
        assert_eq!(out.text().len(), OUT_BUF_SIZE + 10);
        assert!(out.text().starts_with("abcdefghijklmnopqrstuvwxyzabc"));
    }

    #[test]
    fn failing_sink_counts_lost_bytes() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq, Box::new(Broken));
        for &b in b"12\n345\n" {
            wr(&mut s, DATA as u64, b);
        }
        assert_eq!(s.lost_output_bytes(), 7);
        // The guest still sees an idle transmitter.
        assert_eq!(rd(&mut s, LSR) & LSR_THRE, LSR_THRE);
    }

    #[test]
    fn dlab_divisor_latch() {
        let (mut s, irq, out) = serial();
        wr(&mut s, IER as u64, IER_RDA);
        wr(&mut s, LCR, LCR_DLAB | 0x03);
        // With DLAB set, offsets 0 and 1 are the divisor latch (115200 / 12 = 9600 baud).
        wr(&mut s, DATA as u64, 12);
        wr(&mut s, IER as u64, 0);
        assert_eq!(rd(&mut s, DATA as u64), 12);
        assert_eq!(rd(&mut s, IER as u64), 0);
        assert_eq!(rd(&mut s, LCR), LCR_DLAB | 0x03);
        wr(&mut s, LCR, 0x03);
        // Back to THR/IER: nothing was transmitted, IER kept its value.
        assert_eq!(rd(&mut s, IER as u64), IER_RDA);
        s.flush();
        assert_eq!(out.text(), "");
        assert!(irq.read().is_err());
        // Set DLAB again: the latch kept its value.
        wr(&mut s, LCR, LCR_DLAB | 0x03);
        assert_eq!(rd(&mut s, DATA as u64), 12);
        assert_eq!(rd(&mut s, IER as u64), 0);
    }

    #[test]
    fn lsr_and_scratch_and_wide_access() {
        let (mut s, _irq, _out) = serial();
        assert_eq!(rd(&mut s, LSR), LSR_THRE | LSR_TEMT);
        wr(&mut s, SCR, 0x5a);
        assert_eq!(rd(&mut s, SCR), 0x5a);
        // A 16-bit access covers two registers: LCR then MCR.
        s.write(LCR, &[0x03, 0x0b]);
        let mut word = [0; 2];
        s.read(LCR, &mut word);
        assert_eq!(word, [0x03, 0x0b]);
        assert_eq!(rd(&mut s, MCR), 0x0b);
    }

    #[test]
    fn input_raises_receive_interrupt_and_reads_back_through_rbr() {
        let (mut s, irq, _out) = serial();
        assert_eq!(s.enqueue_input(b"ok"), 2);
        // RDA is not enabled yet: data ready but no interrupt.
        assert_eq!(rd(&mut s, LSR), LSR_DR | LSR_THRE | LSR_TEMT);
        assert!(irq.read().is_err());
        // Enabling RDA with data pending raises it.
        wr(&mut s, IER as u64, IER_RDA);
        assert_eq!(irq_count(&irq), 1);
        assert_eq!(rd(&mut s, IIR as u64), IIR_FIFO | IIR_RDA);
        assert_eq!(rd(&mut s, DATA as u64), b'o');
        assert_eq!(rd(&mut s, LSR) & LSR_DR, LSR_DR);
        assert_eq!(rd(&mut s, DATA as u64), b'k');
        assert_eq!(rd(&mut s, LSR), LSR_THRE | LSR_TEMT);

        // More input while RDA is enabled raises it right away.
        assert_eq!(s.enqueue_input(b"z"), 1);
        assert_eq!(irq_count(&irq), 1);
        assert_eq!(rd(&mut s, IIR as u64), IIR_FIFO | IIR_RDA);
        assert_eq!(rd(&mut s, DATA as u64), b'z');
    }

    #[test]
    fn input_beyond_the_fifo_waits_in_the_backlog_in_order() {
        let (mut s, irq, _out) = serial();
        wr(&mut s, IER as u64, IER_RDA);
        let input: Vec<u8> = (0..200u8).collect();
        assert_eq!(s.enqueue_input(&input), 200);
        assert_eq!(s.input_backlog(), 200 - s.fifo_size);
        assert_eq!(irq_count(&irq), 1);

        let mut got = Vec::new();
        let mut interrupts = 0;
        while rd(&mut s, LSR) & LSR_DR != 0 {
            got.push(rd(&mut s, DATA as u64));
            interrupts += irq_count(&irq);
        }
        assert_eq!(got, input);
        assert_eq!(s.input_backlog(), 0);
        // One interrupt per refill of the (64-byte) FIFO, not one per byte.
        assert_eq!(interrupts, 3);
    }

    #[test]
    fn full_backlog_takes_only_what_fits() {
        let (mut s, _irq, _out) = serial();
        let big = vec![b'x'; INPUT_BACKLOG_SIZE + 100];
        let taken = s.enqueue_input(&big);
        assert_eq!(taken, INPUT_BACKLOG_SIZE);
        assert_eq!(s.input_backlog(), INPUT_BACKLOG_SIZE - s.fifo_size);
        // The first FIFO-full moved out of the backlog, making room for as much again.
        assert_eq!(s.enqueue_input(&big[..s.fifo_size - 4]), s.fifo_size - 4);
        assert_eq!(s.enqueue_input(b"more"), 4);
        assert_eq!(s.enqueue_input(b"more"), 0);
        assert_eq!(s.enqueue_input(b""), 0);
    }

    #[test]
    fn input_never_blocks_on_a_guest_that_does_not_read() {
        let (mut s, _irq, _out) = serial();
        let mut total = 0;
        for _ in 0..1000 {
            total += s.enqueue_input(b"0123456789");
        }
        // The FIFO and the backlog behind it filled up; the rest was refused, not waited on.
        assert_eq!(total, s.fifo_size + INPUT_BACKLOG_SIZE);
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;
    use crate::BusDevice;

    fn uart() -> Serial {
        Serial::with_sink(EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn state_moves_to_a_new_uart() {
        let mut a = uart();
        a.write(3, &[0x80]); // DLAB
        a.write(0, &[0x01]); // divisor 1
        a.write(3, &[0x03]); // 8N1
        a.write(7, &[0x5a]); // scratch
        a.write(1, &[0x01]); // receive interrupt on
        a.enqueue_input(b"hello");
        let s = a.save_state();
        assert_eq!(s.fifo, b"hello");
        assert_eq!(s.scratch, 0x5a);

        let mut b = uart();
        b.restore_state(&s).unwrap();
        assert_eq!(b.save_state(), s);
        let mut byte = [0u8];
        b.read(7, &mut byte);
        assert_eq!(byte[0], 0x5a);
        b.read(0, &mut byte);
        assert_eq!(byte[0], b'h', "the FIFO carries over");
        // The pending receive interrupt is raised again on the new line.
        assert!(b.irq_eventfd().read().unwrap() >= 1);

        let mut bad = s.clone();
        bad.backlog = vec![0; INPUT_BACKLOG_SIZE + 1];
        assert!(b.restore_state(&bad).is_err());
    }
}
