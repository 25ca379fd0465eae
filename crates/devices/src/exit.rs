//! How devices ask the VMM to end the VM.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// What a device asks of the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExitReason {
    /// The guest powered itself off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042 command 0xfe, ACPI reset register).
    Reset,
}

const NONE: u8 = 0;
const POWER_OFF: u8 = 1;
const RESET: u8 = 2;

impl VmExitReason {
    fn encode(self) -> u8 {
        match self {
            VmExitReason::PowerOff => POWER_OFF,
            VmExitReason::Reset => RESET,
        }
    }

    fn decode(v: u8) -> Option<Self> {
        match v {
            POWER_OFF => Some(VmExitReason::PowerOff),
            RESET => Some(VmExitReason::Reset),
            _ => None,
        }
    }
}

struct Inner {
    reason: AtomicU8,
    evt: EventFd,
}

/// Shared by the devices that can end the VM.
///
/// Records the *first* reason requested (later requests do not change it) and writes an
/// `EventFd` the VMM's main loop waits on. Cheap to clone; all clones share one state.
///
/// The `EventFd` is non-blocking (`EFD_NONBLOCK`): wait on it with epoll/poll, or with
/// [`ExitSignal::wait`]. A `read()` on it returns `WouldBlock` until an exit is requested.
#[derive(Clone)]
pub struct ExitSignal {
    inner: Arc<Inner>,
}

impl ExitSignal {
    /// A signal with no reason recorded.
    pub fn new() -> io::Result<Self> {
        Ok(ExitSignal {
            inner: Arc::new(Inner {
                reason: AtomicU8::new(NONE),
                evt: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
            }),
        })
    }

    /// Ask the VMM to end the VM for `reason`. Only the first request's reason is kept; every
    /// request writes the event, so a waiter that already consumed it is woken again.
    pub fn request(&self, reason: VmExitReason) {
        let first = self
            .inner
            .reason
            .compare_exchange(NONE, reason.encode(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            log::debug!("guest requested {reason:?}");
        }
        // Fails only if the counter would overflow, which a u64 of ones cannot reach.
        if let Err(e) = self.inner.evt.write(1) {
            log::warn!("cannot signal VM exit ({reason:?}): {e}");
        }
    }

    /// The first reason requested, if any.
    pub fn reason(&self) -> Option<VmExitReason> {
        VmExitReason::decode(self.inner.reason.load(Ordering::Acquire))
    }

    /// The event written on each request (non-blocking), to add to the VMM's poll set.
    pub fn eventfd(&self) -> &EventFd {
        &self.inner.evt
    }

    /// Block until an exit is requested or `timeout` passes (`None`: no limit), and return the
    /// reason, if any. Consumes the event.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<Option<VmExitReason>> {
        if let Some(reason) = self.reason() {
            self.drain();
            return Ok(Some(reason));
        }
        let epoll = Epoll::new()?;
        let fd = self.inner.evt.as_raw_fd();
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, fd as u64),
        )?;
        let timeout_ms = match timeout {
            None => -1,
            Some(t) => i32::try_from(t.as_millis()).unwrap_or(i32::MAX),
        };
        let mut events = [EpollEvent::default()];
        loop {
            match epoll.wait(timeout_ms, &mut events) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.drain();
        Ok(self.reason())
    }

    fn drain(&self) {
        // WouldBlock when nothing is pending: nothing to consume.
        let _ = self.inner.evt.read();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_reason_and_signals_each_request() {
        let exit = ExitSignal::new().unwrap();
        assert_eq!(exit.reason(), None);
        assert_eq!(
            exit.eventfd().read().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );

        let clone = exit.clone();
        clone.request(VmExitReason::PowerOff);
        exit.request(VmExitReason::Reset);
        assert_eq!(exit.reason(), Some(VmExitReason::PowerOff));
        assert_eq!(clone.reason(), Some(VmExitReason::PowerOff));
        // Both requests wrote the event.
        assert_eq!(exit.eventfd().read().unwrap(), 2);
    }

    #[test]
    fn first_reason_wins_across_threads() {
        let exit = ExitSignal::new().unwrap();
        exit.request(VmExitReason::Reset);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let e = exit.clone();
                std::thread::spawn(move || e.request(VmExitReason::PowerOff))
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(exit.reason(), Some(VmExitReason::Reset));
        assert_eq!(exit.eventfd().read().unwrap(), 5);
    }

    #[test]
    fn wait_times_out_then_sees_a_request_from_another_thread() {
        let exit = ExitSignal::new().unwrap();
        assert_eq!(exit.wait(Some(Duration::from_millis(1))).unwrap(), None);

        let e = exit.clone();
        let t = std::thread::spawn(move || e.request(VmExitReason::Reset));
        assert_eq!(exit.wait(None).unwrap(), Some(VmExitReason::Reset));
        t.join().unwrap();
        // The event was consumed; the reason stays.
        assert!(exit.eventfd().read().is_err());
        assert_eq!(exit.reason(), Some(VmExitReason::Reset));
    }
}
