//! Interrupt lines as `EventFd`s.
//!
//! The VMM registers each device's `EventFd` as a KVM irqfd for the device's GSI; writing the
//! event injects the interrupt. This crate never talks to KVM itself.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// An interrupt line: an `EventFd` that raises the interrupt when written.
#[derive(Debug)]
pub(crate) struct IrqLine {
    evt: EventFd,
    warned: AtomicBool,
}

impl IrqLine {
    pub(crate) fn new(evt: EventFd) -> Self {
        IrqLine {
            evt,
            warned: AtomicBool::new(false),
        }
    }

    pub(crate) fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Raise the interrupt. A failure (only possible if the counter would overflow) is logged
    /// once rather than per interrupt.
    pub(crate) fn raise(&self) {
        if let Err(e) = self.evt.write(1) {
            self.warn_once(&e);
        }
    }

    fn warn_once(&self, e: &io::Error) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            log::warn!("cannot raise interrupt: {e}");
        }
    }
}

impl Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.raise();
        Ok(())
    }
}
