//! Device worker threads: one per activated device, sleeping in `epoll` on the queues' kick
//! events, the backend's file descriptors and a stop event. Every device uses this instead of
//! writing its own event loop; [`drain_queue`] is the shared "pop chains, complete them,
//! decide whether to interrupt" loop with event-index suppression.

use std::any::Any;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vessel_memory::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{DeviceHealth, InterruptCause, VirtioInterrupt};

/// Token of the stop event; handlers never see it.
const STOP_TOKEN: u64 = u64::MAX;

/// What a device's worker does when one of its descriptors is ready.
pub trait EventHandler: Send + 'static {
    /// Called with the token registered for the ready descriptor and the ready events.
    /// Returning `Err` stops the worker (after logging).
    fn handle_event(
        &mut self,
        token: u64,
        events: EventSet,
        ctl: &mut WorkerControl,
    ) -> io::Result<()>;

    /// Called on the worker thread when [`Worker::quiesce`] stops it, before the handler is
    /// handed back: finish whatever is in flight (work submitted from this thread, such as
    /// io_uring requests, must complete before the thread exits, which would cancel it).
    fn quiesce(&mut self) {}
}

/// Lets a handler add or remove watched descriptors from inside the loop (vsock
/// connections come and go).
pub struct WorkerControl {
    epoll: Epoll,
}

impl WorkerControl {
    pub fn add(&mut self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    pub fn modify(&mut self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    pub fn remove(&mut self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

/// What the thread hands back when it ends: its handler, when asked to keep it.
type Kept = Option<Box<dyn Any + Send>>;

/// A running worker thread; dropping it stops and joins the thread.
pub struct Worker {
    stop: EventFd,
    /// Set before `stop` is signalled when the handler is to be handed back.
    keep: Arc<AtomicBool>,
    thread: Option<JoinHandle<Kept>>,
}

impl Worker {
    /// Starts thread `name` watching `fds` (descriptor, token, events) and calling `handler`.
    pub fn spawn<H: EventHandler>(
        name: &str,
        fds: &[(RawFd, u64, EventSet)],
        mut handler: H,
    ) -> io::Result<Worker> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let mut ctl = WorkerControl {
            epoll: Epoll::new()?,
        };
        ctl.add(stop.as_raw_fd(), STOP_TOKEN, EventSet::IN)?;
        for &(fd, token, events) in fds {
            ctl.add(fd, token, events)?;
        }
        let thread_stop = stop.try_clone()?;
        let keep = Arc::new(AtomicBool::new(false));
        let thread_keep = keep.clone();
        let thread_name = name.to_string();
        let thread =
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || -> Kept {
                    let _stop = thread_stop;
                    // The device's filter, before the first event from the guest.
                    if let Err(e) = vessel_seccomp::apply_worker(&thread_name) {
                        log::error!("{thread_name}: {e}");
                        return None;
                    }
                    let mut events = vec![EpollEvent::default(); 32];
                    loop {
                        let n = match ctl.epoll.wait(-1, &mut events) {
                            Ok(n) => n,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => {
                                log::error!("{thread_name}: epoll failed: {e}");
                                return None;
                            }
                        };
                        for ev in &events[..n] {
                            let token = ev.data();
                            if token == STOP_TOKEN {
                                // Events after the stop in this batch stay pending on their
                                // (level-triggered) descriptors for the next worker.
                                if thread_keep.load(Ordering::Acquire) {
                                    handler.quiesce();
                                    return Some(Box::new(handler));
                                }
                                return None;
                            }
                            let set = EventSet::from_bits_truncate(ev.events);
                            if let Err(e) = handler.handle_event(token, set, &mut ctl) {
                                log::error!("{thread_name}: stopping: {e}");
                                return None;
                            }
                        }
                    }
                })?;
        Ok(Worker {
            stop,
            keep,
            thread: Some(thread),
        })
    }

    /// Stops the thread between two events, runs [`EventHandler::quiesce`] on it and hands
    /// the handler back (with the queues and everything else it owns), for a device that
    /// quiesces. `None` if the thread had
    /// already ended (an error stopped it; the handler was dropped) or `H` is not the
    /// handler's type.
    pub fn quiesce<H: EventHandler>(&mut self) -> Option<H> {
        let t = self.thread.take()?;
        self.keep.store(true, Ordering::Release);
        let _ = self.stop.write(1);
        match t.join() {
            Ok(Some(h)) => h.downcast::<H>().ok().map(|h| *h),
            _ => None,
        }
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Empties a kick event (it is non-blocking; an empty event is fine).
pub fn consume(evt: &EventFd) {
    let _ = evt.read();
}

/// The driver broke a queue's ring; the device is marked as needing reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Broken;

/// The next available chain of `queue` (`None` when the driver has made none available), or
/// [`Broken`] after marking the device as needing reset when the ring is invalid (an available
/// index more than the queue size ahead, a ring outside guest memory). `what` names the queue
/// in the log.
pub fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    health: &DeviceHealth,
    what: &dyn std::fmt::Display,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, Broken> {
    // `iter` checks the available index against the queue size.
    match queue.iter(mem) {
        Ok(mut it) => Ok(it.next()),
        Err(e) => {
            health.mark_broken(&format_args!("{what}: {e}"));
            Err(Broken)
        }
    }
}

/// What [`drain_queue`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Chains completed (put in the used ring).
    pub completed: u32,
    /// Whether the driver was interrupted.
    pub notified: bool,
}

/// Serves every available chain of `queue`: `serve` returns the number of bytes it wrote into
/// the chain's device-writable buffers (0 for a chain it rejected). Keeps going until the
/// driver has nothing more (re-enabling notifications to close the race), then interrupts the
/// driver if event-index suppression says so.
///
/// A broken ring (an available index that jumps by more than the queue size, rings outside
/// guest memory) marks the device as needing reset and stops serving the queue.
pub fn drain_queue<F>(
    queue: &mut Queue,
    index: u16,
    mem: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
    health: &DeviceHealth,
    mut serve: F,
) -> Drained
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    drain_queue_while(queue, index, mem, interrupt, health, |c| Some(serve(c)))
}

/// As [`drain_queue`], but `serve` may decline a chain (`None`, e.g. over a rate limit): the
/// chain goes back to the available ring, untouched, and serving stops until the next call.
pub fn drain_queue_while<F>(
    queue: &mut Queue,
    index: u16,
    mem: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
    health: &DeviceHealth,
    mut serve: F,
) -> Drained
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> Option<u32>,
{
    let mut out = Drained::default();
    if health.is_broken() {
        return out;
    }
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            health.mark_broken(&format_args!("queue {index}: {e}"));
            return out;
        }
        loop {
            let Ok(chain) = next_chain(queue, mem, health, &format_args!("queue {index}")) else {
                return out;
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let Some(len) = serve(chain) else {
                queue.go_to_previous_position();
                if out.completed > 0 {
                    out.notified = notify_if_needed(queue, index, mem, interrupt);
                }
                return out;
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                health.mark_broken(&format_args!("queue {index}: {e}"));
                return out;
            }
            out.completed += 1;
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue, // more arrived while notifications were off
            Ok(false) => break,
            Err(e) => {
                health.mark_broken(&format_args!("queue {index}: {e}"));
                return out;
            }
        }
    }
    if out.completed > 0 {
        out.notified = notify_if_needed(queue, index, mem, interrupt);
    }
    out
}

/// Interrupts the driver for `queue` unless event-index suppression says it asked not to be.
pub fn notify_if_needed(
    queue: &mut Queue,
    index: u16,
    mem: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
) -> bool {
    // On a ring read error, notify: a spurious interrupt is harmless, a missing one hangs.
    if queue.needs_notification(mem).unwrap_or(true) {
        if let Err(e) = interrupt.trigger(InterruptCause::Queue(index)) {
            log::warn!("cannot interrupt the driver for queue {index}: {e}");
        }
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::tests::CountingInterrupt;
    use std::sync::mpsc;
    use std::sync::Arc;
    use vessel_memory::GuestMemoryMmap;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    struct Echo(mpsc::Sender<u64>);

    impl EventHandler for Echo {
        fn handle_event(
            &mut self,
            token: u64,
            _: EventSet,
            _: &mut WorkerControl,
        ) -> io::Result<()> {
            self.0.send(token).unwrap();
            Ok(())
        }
    }

    #[test]
    fn worker_dispatches_and_stops() {
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let mut w = Worker::spawn(
            "test-worker",
            &[(kick.as_raw_fd(), 7, EventSet::IN)],
            Echo(tx),
        )
        .unwrap();
        kick.write(1).unwrap();
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(),
            7
        );
        w.stop();
        assert!(w.thread.is_none());
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn drains_all_chains_and_notifies() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x8000, 16, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x9000, 16, 0, 0)),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        let health = DeviceHealth::new(irq.clone());
        let mut served = Vec::new();
        let d = drain_queue(&mut q, 0, &m, irq.as_ref(), &health, |c| {
            served.push(c.head_index());
            4
        });
        assert_eq!(d.completed, 2);
        assert!(d.notified);
        assert_eq!(served, vec![0, 1]);
        assert_eq!(
            q.used_idx(&m, std::sync::atomic::Ordering::Acquire)
                .unwrap()
                .0,
            2
        );
        // Nothing more: no interrupt.
        let d = drain_queue(&mut q, 0, &m, irq.as_ref(), &health, |_| 0);
        assert_eq!(d, Drained::default());
        assert_eq!(irq.causes.lock().unwrap().len(), 1);
    }

    #[test]
    fn avail_index_jump_marks_broken() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        // The driver claims 1000 new buffers in a 16-entry ring.
        vq.avail().idx().store(1000);
        let irq = Arc::new(CountingInterrupt::default());
        let health = DeviceHealth::new(irq.clone());
        let d = drain_queue(&mut q, 0, &m, irq.as_ref(), &health, |_| 0);
        assert_eq!(d.completed, 0);
        assert!(health.is_broken());
        assert_eq!(*irq.causes.lock().unwrap(), vec![InterruptCause::Config]);
    }
}
