//! The device manager for the legacy PC platform: builds the port-I/O bus, places
//! every device at its port from `vessel_memory::ports`, and wires interrupts as irqfds.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vessel_devices::{
    acpi_pm::AcpiPm, debug_port::DebugPort, i8042::I8042, rtc::Rtc, serial::Serial, Bus, BusDevice,
    ExitSignal,
};
use vessel_memory::ports;
use vmm_sys_util::eventfd::EventFd;

use crate::config::SerialTarget;
use crate::error::{KvmContext, VmmError};
use crate::terminal;

pub struct LegacyDevices {
    serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    stdio: bool,
}

/// A new event registered with KVM as the irqfd of `gsi`: writing it raises the interrupt.
pub(crate) fn irqfd(vm: &VmFd, gsi: u32) -> Result<EventFd, VmmError> {
    let fd = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| VmmError::Device(format!("eventfd for IRQ {gsi}: {e}")))?;
    vm.register_irqfd(&fd, gsi).kvm("KVM_IRQFD")?;
    Ok(fd)
}

fn insert(
    bus: &mut Bus,
    dev: Arc<Mutex<dyn BusDevice>>,
    base: u16,
    len: u64,
) -> Result<(), VmmError> {
    bus.insert(dev, base as u64, len)
        .map_err(|e| VmmError::Device(format!("port {base:#x}: {e}")))
}

impl LegacyDevices {
    /// Creates the legacy devices and puts them on the port bus `io`.
    pub fn new(
        vm: &VmFd,
        io: &mut Bus,
        target: &SerialTarget,
        exit: &ExitSignal,
    ) -> Result<Self, VmmError> {
        let out: Box<dyn Write + Send> = match target {
            SerialTarget::Stdio => Box::new(std::io::stdout()),
            SerialTarget::Null => Box::new(std::io::sink()),
            SerialTarget::File(p) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| VmmError::Open {
                        path: p.clone(),
                        source,
                    })?,
            ),
        };
        let serial = Arc::new(Mutex::new(Serial::new(irqfd(vm, ports::COM1_IRQ)?, out)));
        insert(io, serial.clone(), ports::COM1, Serial::PORT_LEN)?;
        let i8042 = Arc::new(Mutex::new(
            I8042::new(exit.clone()).with_kbd_irq(irqfd(vm, ports::I8042_KBD_IRQ)?),
        ));
        insert(io, i8042.clone(), ports::I8042_DATA, I8042::PORT_LEN)?;
        insert(io, Arc::new(Mutex::new(Rtc::new())), ports::RTC_INDEX, 2)?;
        insert(
            io,
            Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
            ports::ACPI_SLEEP_CONTROL,
            4,
        )?;
        insert(io, Arc::new(Mutex::new(DebugPort::default())), 0x80, 1)?;
        Ok(LegacyDevices {
            serial,
            i8042,
            stdio: matches!(target, SerialTarget::Stdio),
        })
    }

    /// The keyboard controller (Ctrl-Alt-Del is typed on its keyboard).
    pub fn i8042(&self) -> Arc<Mutex<I8042>> {
        self.i8042.clone()
    }

    pub fn console_is_stdio(&self) -> bool {
        self.stdio
    }

    /// Feed the terminal's input to COM1 from a thread of its own.
    pub fn start_stdin_pump(
        &self,
        quit: Arc<AtomicBool>,
        exit: ExitSignal,
    ) -> Result<(), VmmError> {
        let serial = self.serial.clone();
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                terminal::pump_stdin(
                    |mut bytes| {
                        // The UART takes what fits; wait for the guest to drain the rest.
                        while !bytes.is_empty() {
                            let taken = serial
                                .lock()
                                .map(|mut s| s.enqueue_input(bytes))
                                .unwrap_or(bytes.len());
                            bytes = &bytes[taken..];
                            if !bytes.is_empty() {
                                std::thread::sleep(std::time::Duration::from_millis(5));
                            }
                        }
                    },
                    &quit,
                    || {
                        let _ = exit.eventfd().write(1);
                    },
                )
            })
            .map_err(VmmError::Thread)?;
        Ok(())
    }

    pub fn flush(&self) {
        if let Ok(mut s) = self.serial.lock() {
            s.flush();
        }
    }
}
