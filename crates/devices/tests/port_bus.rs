//! The devices wired on a port bus at the platform's ports, as the VMM does, driven only
//! through `Bus` accesses.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vessel_devices::debug_port::DEBUG_PORT;
use vessel_devices::{
    AcpiPm, Bus, DebugPort, ExitSignal, PortSink, Rtc, Serial, VmExitReason, I8042,
};
use vessel_memory::ports;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Platform {
    bus: Bus,
    exit: ExitSignal,
    out: Capture,
    serial: Arc<Mutex<Serial>>,
    com1_irq: EventFd,
}

fn platform() -> Platform {
    let exit = ExitSignal::new().unwrap();
    let out = Capture::default();
    let com1_irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let serial = Arc::new(Mutex::new(Serial::new(
        com1_irq.try_clone().unwrap(),
        Box::new(out.clone()),
    )));
    let mut bus = Bus::new();
    bus.insert(serial.clone(), ports::COM1.into(), Serial::PORT_LEN)
        .unwrap();
    bus.insert(
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        ports::I8042_DATA.into(),
        I8042::PORT_LEN,
    )
    .unwrap();
    bus.insert(
        Arc::new(Mutex::new(Rtc::with_clock(|| 1_795_581_950))),
        ports::RTC_INDEX.into(),
        Rtc::PORT_LEN,
    )
    .unwrap();
    bus.insert(
        Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
        ports::ACPI_SLEEP_CONTROL.into(),
        AcpiPm::PORT_LEN,
    )
    .unwrap();
    bus.insert(
        Arc::new(Mutex::new(DebugPort::new())),
        DEBUG_PORT.into(),
        DebugPort::PORT_LEN,
    )
    .unwrap();
    let sink = Arc::new(Mutex::new(PortSink::new()));
    bus.insert(sink.clone(), 0x87, 1).unwrap();
    bus.insert(sink, 0xed, 1).unwrap();
    Platform {
        bus,
        exit,
        out,
        serial,
        com1_irq,
    }
}

fn inb(bus: &Bus, port: u16) -> u8 {
    let mut b = [0];
    assert!(bus.read(port.into(), &mut b), "port {port:#x} unhandled");
    b[0]
}

fn outb(bus: &Bus, port: u16, v: u8) {
    assert!(bus.write(port.into(), &[v]), "port {port:#x} unhandled");
}

#[test]
fn console_round_trip() {
    let p = platform();
    let com1 = ports::COM1;
    outb(&p.bus, com1 + 1, 0x01); // IER: receive interrupt
    for &b in b"boot ok\n" {
        while inb(&p.bus, com1 + 5) & 0x20 == 0 {}
        outb(&p.bus, com1, b);
    }
    assert_eq!(&p.out.0.lock().unwrap()[..], b"boot ok\n");

    assert_eq!(p.serial.lock().unwrap().enqueue_input(b"ls\n"), 3);
    assert_eq!(p.com1_irq.read().unwrap(), 1);
    let mut typed = Vec::new();
    while inb(&p.bus, com1 + 5) & 0x01 != 0 {
        typed.push(inb(&p.bus, com1));
    }
    assert_eq!(typed, b"ls\n");
    assert_eq!(p.bus.unhandled(), (0, 0));
}

#[test]
fn rtc_and_quiet_ports() {
    let p = platform();
    outb(&p.bus, ports::RTC_INDEX, 0x80 | 0x09); // year, NMIs masked
    assert_eq!(inb(&p.bus, ports::RTC_DATA), 0x26);
    outb(&p.bus, 0x80, 0x55);
    outb(&p.bus, 0xed, 0);
    assert_eq!(inb(&p.bus, 0x87), 0xff);
    assert_eq!(inb(&p.bus, 0x61) & 0xc0, 0);
    assert_eq!(p.bus.unhandled(), (0, 0));
    // COM2 is not there.
    let mut b = [0];
    assert!(!p.bus.read(0x2f8, &mut b));
    assert_eq!(b, [0xff]);
    assert_eq!(p.bus.unhandled(), (1, 0));
}

#[test]
fn i8042_reset() {
    let p = platform();
    outb(&p.bus, ports::I8042_COMMAND, 0xaa);
    assert_eq!(inb(&p.bus, ports::I8042_COMMAND) & 0x01, 0x01);
    assert_eq!(inb(&p.bus, ports::I8042_DATA), 0x55);
    outb(&p.bus, ports::I8042_COMMAND, 0xfe);
    assert_eq!(p.exit.reason(), Some(VmExitReason::Reset));
    assert_eq!(p.exit.eventfd().read().unwrap(), 1);
}

#[test]
fn acpi_power_off() {
    let p = platform();
    outb(&p.bus, ports::ACPI_SLEEP_STATUS, 0x80);
    outb(
        &p.bus,
        ports::ACPI_SLEEP_CONTROL,
        (ports::SLEEP_TYPE_S5 << 2) | 0x20,
    );
    assert_eq!(p.exit.wait(None).unwrap(), Some(VmExitReason::PowerOff));
}
