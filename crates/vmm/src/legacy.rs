//! The legacy PC devices (COM1, the i8042, the RTC, the ACPI PM block, port 0x80): builds the port-I/O bus, places
//! every device at its port from `vessel_memory::ports`, and wires interrupts as irqfds.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vessel_devices::i8042::{I8042Snapshot, I8042};
use vessel_devices::rtc::{Rtc, RtcSnapshot};
use vessel_devices::serial::{Serial, SerialSnapshot};
use vessel_devices::{acpi_pm::AcpiPm, debug_port::DebugPort, Bus, BusDevice, ExitSignal};
use vessel_memory::ports;

use crate::serial_out::{self, SerialOut};
use vmm_sys_util::eventfd::EventFd;

use crate::config::SerialTarget;
use crate::error::{KvmContext, VmmError};
use crate::terminal;

pub struct LegacyDevices {
    serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    rtc: Arc<Mutex<Rtc>>,
    stdio: bool,
    /// Serial output bytes dropped (over the rate limit, or a full FIFO).
    serial_dropped: Arc<AtomicU64>,
}

/// What a snapshot keeps of the legacy devices (the ACPI PM block and port 0x80 have none).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LegacyState {
    pub serial: SerialSnapshot,
    pub i8042: I8042Snapshot,
    pub rtc: RtcSnapshot,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An edge on `gsi` (the generic event device's interrupt, for the VM generation ID and PCI
/// hotplug, is edge-triggered). A guest that never unmasked the pin does not see it, as on
/// hardware.
pub(crate) fn edge(vm: &VmFd, gsi: u32) -> Result<(), VmmError> {
    vm.set_irq_line(gsi, true).kvm("KVM_IRQ_LINE")?;
    vm.set_irq_line(gsi, false).kvm("KVM_IRQ_LINE")?;
    Ok(())
}

/// A new event registered with KVM as the irqfd of `gsi`: writing it raises the interrupt.
pub(crate) fn irqfd(vm: &VmFd, gsi: u32) -> Result<EventFd, VmmError> {
    let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmmError::EventFd {
        what: format!("IRQ {gsi}"),
        source,
    })?;
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
        .map_err(|source| VmmError::Bus {
            what: format!("port {base:#x}"),
            source,
        })
}

impl LegacyDevices {
    /// Creates the legacy devices and puts them on the port bus `io`.
    pub fn new(
        vm: &VmFd,
        io: &mut Bus,
        target: &SerialTarget,
        limit: Option<vessel_ratelimit::BucketConfig>,
        exit: &ExitSignal,
    ) -> Result<Self, VmmError> {
        let mut serial_dropped = Arc::default();
        let out: Box<dyn Write + Send> = match target {
            SerialTarget::Stdio => Box::new(std::io::stdout()),
            SerialTarget::Null => Box::new(std::io::sink()),
            SerialTarget::File(p) => {
                let out = SerialOut::new(
                    serial_out::open(p).map_err(|source| VmmError::Open {
                        path: p.clone(),
                        source,
                    })?,
                    limit,
                );
                serial_dropped = out.dropped();
                Box::new(out)
            }
        };
        let serial = Arc::new(Mutex::new(Serial::new(irqfd(vm, ports::COM1_IRQ)?, out)));
        insert(io, serial.clone(), ports::COM1, Serial::PORT_LEN)?;
        let i8042 = Arc::new(Mutex::new(
            I8042::new(exit.clone()).with_kbd_irq(irqfd(vm, ports::I8042_KBD_IRQ)?),
        ));
        insert(io, i8042.clone(), ports::I8042_DATA, I8042::PORT_LEN)?;
        let rtc = Arc::new(Mutex::new(Rtc::new()));
        insert(io, rtc.clone(), ports::RTC_INDEX, 2)?;
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
            rtc,
            stdio: matches!(target, SerialTarget::Stdio),
            serial_dropped,
        })
    }

    /// Serial output bytes dropped so far.
    pub fn serial_dropped_bytes(&self) -> u64 {
        self.serial_dropped.load(Ordering::Relaxed)
    }

    /// The devices' state, for a snapshot (the vCPUs are parked).
    pub fn save_state(&self) -> LegacyState {
        LegacyState {
            serial: lock(&self.serial).save_state(),
            i8042: lock(&self.i8042).save_state(),
            rtc: lock(&self.rtc).save_state(),
        }
    }

    /// Loads a snapshot's state into freshly created devices.
    pub fn restore_state(&self, s: &LegacyState) -> Result<(), vessel_devices::SavedStateError> {
        lock(&self.serial).restore_state(&s.serial)?;
        lock(&self.i8042).restore_state(&s.i8042)?;
        lock(&self.rtc).restore_state(&s.rtc)
    }

    /// Types Ctrl-Alt-Del on the keyboard; false if its buffer is full.
    pub fn send_ctrl_alt_del(&self) -> bool {
        lock(&self.i8042).send_ctrl_alt_del()
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
