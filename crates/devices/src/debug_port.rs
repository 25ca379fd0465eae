//! Ports that need an answer but no emulation.
//!
//! [`DebugPort`]: the POST code port 0x80 ([`DEBUG_PORT`], length 1), which Linux also writes
//! as an I/O delay (`io_delay`). Accesses are answered silently and counted in a counter the
//! VMM can read for its statistics ([`DebugPort::counter`]) without locking the device.
//!
//! [`FirmwareLog`]: QEMU's debug console port 0x402 ([`FIRMWARE_LOG_PORT`]), where SeaBIOS and
//! OVMF write their log; each line goes to Vessel's log at debug level
//! (`--log-level debug`).
//!
//! [`PortSink`]: a device for known ports Vessel does not emulate (e.g. 0x87 DMA page, 0xed
//! delay port): reads return all-ones as from an empty slot, writes are dropped, and neither
//! counts as an unknown access on the bus.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::bus::BusDevice;

/// The POST code / I/O delay port.
pub use vessel_memory::ports::DEBUG_PORT;

/// Port 0x80: POST codes and I/O delays.
#[derive(Default)]
pub struct DebugPort {
    accesses: Arc<AtomicU64>,
    last_code: u8,
}

impl DebugPort {
    /// Number of ports.
    pub const PORT_LEN: u64 = 1;

    /// A port with its access count at 0.
    pub fn new() -> Self {
        DebugPort::default()
    }

    /// The access counter (reads and writes), shared: keep a clone to read it lock-free.
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.accesses.clone()
    }

    /// How many times the guest accessed the port.
    pub fn accesses(&self) -> u64 {
        self.accesses.load(Ordering::Relaxed)
    }

    /// The last POST code written.
    pub fn last_code(&self) -> u8 {
        self.last_code
    }
}

impl BusDevice for DebugPort {
    /// Reads return the last code written (as many chipsets do).
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        self.accesses.fetch_add(1, Ordering::Relaxed);
        data.fill(self.last_code);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.accesses.fetch_add(1, Ordering::Relaxed);
        if let Some(&code) = data.first() {
            self.last_code = code;
        }
    }
}

/// Swallows accesses to ports known to need no emulation: reads all-ones, writes dropped.
#[derive(Debug, Default, Clone, Copy)]
pub struct PortSink;

impl PortSink {
    pub fn new() -> Self {
        PortSink
    }
}

impl BusDevice for PortSink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// QEMU's `isa-debugcon` port, where SeaBIOS and OVMF write their debug log.
pub const FIRMWARE_LOG_PORT: u16 = 0x402;

/// The longest line kept; longer ones are logged in pieces.
const MAX_LINE: usize = 512;

/// Port 0x402: the firmware's log, a line at a time, at debug level. Reads return 0xe9, the
/// value a firmware checks to know the port is there.
#[derive(Default)]
pub struct FirmwareLog {
    line: Vec<u8>,
    lines: u64,
}

impl FirmwareLog {
    pub fn new() -> Self {
        FirmwareLog::default()
    }

    /// Lines logged so far.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    fn flush(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        log::debug!("firmware: {}", text.trim_end());
        self.line.clear();
        self.lines += 1;
    }
}

impl BusDevice for FirmwareLog {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xe9);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        for &b in data {
            match b {
                b'\n' => self.flush(),
                b'\r' => {}
                _ => {
                    self.line.push(b);
                    if self.line.len() >= MAX_LINE {
                        self.flush();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use std::sync::Mutex;

    #[test]
    fn debug_port_is_counted_apart_from_unknown_ports() {
        let mut bus = Bus::new();
        let port = DebugPort::new();
        let counter = port.counter();
        let port = Arc::new(Mutex::new(port));
        bus.insert(port.clone(), DEBUG_PORT.into(), DebugPort::PORT_LEN)
            .unwrap();
        for code in [0x10, 0x20, 0x00] {
            assert!(bus.write(0x80, &[code]));
        }
        bus.write(0x80, &[0x42]);
        let mut b = [0];
        assert!(bus.read(0x80, &mut b));
        assert_eq!(b, [0x42]);
        assert_eq!(counter.load(Ordering::Relaxed), 5);
        assert_eq!(port.lock().unwrap().accesses(), 5);
        assert_eq!(port.lock().unwrap().last_code(), 0x42);
        assert_eq!(bus.unhandled(), (0, 0));
    }

    #[test]
    fn port_sink_swallows_without_counting() {
        let mut bus = Bus::new();
        let sink = Arc::new(Mutex::new(PortSink::new()));
        bus.insert(sink.clone(), 0x87, 1).unwrap();
        bus.insert(sink, 0xed, 1).unwrap();
        let mut w = [0; 2];
        assert!(bus.read(0x87, &mut w[..1]));
        assert_eq!(w[0], 0xff);
        assert!(bus.write(0xed, &[0]));
        // Next door is still unknown.
        assert!(!bus.write(0xee, &[0]));
        assert!(!bus.read(0x87, &mut w));
        assert_eq!(bus.unhandled(), (1, 1));
    }

    #[test]
    fn the_firmware_log_is_cut_in_lines_and_long_lines_in_pieces() {
        let mut l = FirmwareLog::new();
        for b in b"SeaBIOS (version 1.16)\r\nhalf" {
            l.write(0, &[*b]);
        }
        assert_eq!(l.lines(), 1);
        l.write(0, b" line\n");
        assert_eq!(l.lines(), 2);
        l.write(0, &[b'x'; 2 * MAX_LINE]);
        assert_eq!(l.lines(), 4);
        let mut d = [0u8; 1];
        l.read(0, &mut d);
        assert_eq!(d, [0xe9]);
    }
}
