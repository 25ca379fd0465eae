//! virtio-console (virtio 1.2 section 5.3), one port, no multiport: receiveq (0) carries host
//! input to the guest, transmitq (1) guest output to the host.
//!
//! Output goes to a host sink (`Box<dyn Write + Send>`: stdout, a file, [`io::sink`]).
//! Input comes from a pollable host descriptor (stdin, a pipe, a socket) watched by the
//! worker, and from [`ConsoleHandle::enqueue_input`]. It is delivered into the driver's receive
//! buffers when there are some, and buffered (at most [`INPUT_BUFFER_LIMIT`] bytes, the oldest
//! dropped and counted) when there are none. `VIRTIO_CONSOLE_F_SIZE` is offered when a size is
//! given ([`ConsoleHandle::set_size`] changes it), and `VIRTIO_CONSOLE_F_EMERG_WRITE` always.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use vessel_memory::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::balloon::read_driver_bytes;
use vessel_virtio::worker::{
    consume, drain_queue, next_chain, notify_if_needed, EventHandler, Worker, WorkerControl,
};
use vessel_virtio::{
    device_type, features, read_config_bytes, ActivateContext, ActivateError, ActiveQueue,
    ConsoleState, DeviceHealth, DeviceState, DeviceStateError, InterruptCause, VirtioDevice,
    VirtioInterrupt,
};

/// Console feature bits (virtio 1.2 section 5.3.3).
pub mod feature {
    pub const SIZE: u64 = 1 << 0;
    pub const MULTIPORT: u64 = 1 << 1;
    pub const EMERG_WRITE: u64 = 1 << 2;
}

/// Size of both queues.
pub const QUEUE_SIZE: u16 = 256;
/// The most input bytes kept while the driver has no receive buffer.
pub const INPUT_BUFFER_LIMIT: usize = 64 * 1024;
/// The most bytes taken from one transmit chain (the rest is ignored).
pub const MAX_TX_BYTES_PER_CHAIN: usize = 64 * 1024;
/// The most bytes read from the input descriptor per wake-up.
const SOURCE_READ: usize = 4096;

const RECEIVEQ: u16 = 0;
const TRANSMITQ: u16 = 1;

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_INPUT: u64 = 2;
const TOKEN_SOURCE: u64 = 3;

/// Configuration space: cols, rows, max_nr_ports, emerg_wr.
const CONFIG_SIZE: usize = 12;
const EMERG_WR_OFFSET: u64 = 8;

/// What the console has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsoleCounters {
    /// Bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Bytes the guest wrote (sent to the sink, or lost if the sink failed).
    pub tx_bytes: u64,
    /// Input bytes dropped because the buffer was full (the oldest go first).
    pub dropped_input: u64,
    /// Transmit bytes ignored: wrong direction, unreadable, past the per-chain cap.
    pub malformed_bytes: u64,
}

struct Input {
    buf: VecDeque<u8>,
    counters: ConsoleCounters,
    cols: u16,
    rows: u16,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
}

impl Input {
    /// Appends `bytes`, dropping the oldest input past the limit.
    fn push(&mut self, bytes: &[u8]) {
        let bytes = if bytes.len() > INPUT_BUFFER_LIMIT {
            let skip = bytes.len() - INPUT_BUFFER_LIMIT;
            self.counters.dropped_input += skip as u64;
            &bytes[skip..]
        } else {
            bytes
        };
        let over = (self.buf.len() + bytes.len()).saturating_sub(INPUT_BUFFER_LIMIT);
        if over > 0 {
            self.buf.drain(..over);
            self.counters.dropped_input += over as u64;
        }
        self.buf.extend(bytes);
    }
}

struct Shared {
    input: Mutex<Input>,
    /// Written when input is enqueued from outside the worker.
    input_event: EventFd,
    sink: Mutex<Box<dyn Write + Send>>,
}

impl Shared {
    fn input(&self) -> MutexGuard<'_, Input> {
        // A poisoned lock only means another thread panicked mid-update of plain data.
        self.input.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sink(&self) -> MutexGuard<'_, Box<dyn Write + Send>> {
        self.sink.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The host's side of a console: cheap to clone, usable from any thread, before and after
/// activation.
#[derive(Clone)]
pub struct ConsoleHandle(Arc<Shared>);

impl ConsoleHandle {
    /// Queues `bytes` for the guest (delivered as soon as it has receive buffers).
    pub fn enqueue_input(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.0.input().push(bytes);
        if let Err(e) = self.0.input_event.write(1) {
            log::warn!("virtio-console: cannot wake the worker: {e}");
        }
    }

    /// Input bytes not yet delivered.
    pub fn pending_input(&self) -> usize {
        self.0.input().buf.len()
    }

    pub fn counters(&self) -> ConsoleCounters {
        self.0.input().counters
    }

    /// Changes the console size the driver sees (with `VIRTIO_CONSOLE_F_SIZE`) and tells it
    /// through a config interrupt if the device is running.
    pub fn set_size(&self, cols: u16, rows: u16) {
        let irq = {
            let mut s = self.0.input();
            s.cols = cols;
            s.rows = rows;
            s.interrupt.clone()
        };
        if let Some(irq) = irq {
            if let Err(e) = irq.trigger(InterruptCause::Config) {
                log::warn!("virtio-console: cannot raise the config interrupt: {e}");
            }
        }
    }
}

/// The virtio console device.
pub struct Console {
    avail_features: u64,
    shared: Arc<Shared>,
    source: Option<Arc<File>>,
    worker: Option<Worker>,
}

impl Console {
    /// A console writing the guest's output to `sink` and reading input from `source`, which
    /// must be pollable (a pipe, a terminal, a socket; not a regular file). With `size`
    /// (columns, rows), `VIRTIO_CONSOLE_F_SIZE` is offered.
    pub fn new(
        sink: Box<dyn Write + Send>,
        source: Option<OwnedFd>,
        size: Option<(u16, u16)>,
    ) -> io::Result<Self> {
        if let Some(fd) = &source {
            // Fail now rather than at activation if epoll cannot watch it.
            let ep = Epoll::new()?;
            ep.ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )?;
        }
        let mut avail_features = features::COMMON | feature::EMERG_WRITE;
        if size.is_some() {
            avail_features |= feature::SIZE;
        }
        let (cols, rows) = size.unwrap_or((0, 0));
        Ok(Console {
            avail_features,
            shared: Arc::new(Shared {
                input: Mutex::new(Input {
                    buf: VecDeque::new(),
                    counters: ConsoleCounters::default(),
                    cols,
                    rows,
                    interrupt: None,
                }),
                input_event: EventFd::new(EFD_NONBLOCK)?,
                sink: Mutex::new(sink),
            }),
            source: source.map(|fd| Arc::new(File::from(fd))),
            worker: None,
        })
    }

    /// The host's control of this console.
    pub fn handle(&self) -> ConsoleHandle {
        ConsoleHandle(self.shared.clone())
    }

    /// See [`ConsoleHandle::enqueue_input`].
    pub fn enqueue_input(&self, bytes: &[u8]) {
        self.handle().enqueue_input(bytes);
    }

    fn stop(&mut self) {
        self.worker = None;
        self.shared.input().interrupt = None;
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let (cols, rows) = {
            let s = self.shared.input();
            (s.cols, s.rows)
        };
        let mut c = [0u8; CONFIG_SIZE];
        c[0..2].copy_from_slice(&cols.to_le_bytes());
        c[2..4].copy_from_slice(&rows.to_le_bytes());
        c[4..8].copy_from_slice(&1u32.to_le_bytes());
        read_config_bytes(&c, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Emergency write: the low byte of a write to `emerg_wr` is one output character.
        if offset == EMERG_WR_OFFSET {
            if let Some(&b) = data.first() {
                let mut sink = self.shared.sink();
                let _ = sink.write_all(&[b]).and_then(|_| sink.flush());
            }
        }
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        self.stop();
        let rx = ctx
            .take_queue(RECEIVEQ)
            .ok_or(ActivateError::MissingQueue(RECEIVEQ))?;
        let tx = ctx
            .take_queue(TRANSMITQ)
            .ok_or(ActivateError::MissingQueue(TRANSMITQ))?;
        let mut fds = vec![
            (rx.kick.as_raw_fd(), TOKEN_RX, EventSet::IN),
            (tx.kick.as_raw_fd(), TOKEN_TX, EventSet::IN),
            (
                self.shared.input_event.as_raw_fd(),
                TOKEN_INPUT,
                EventSet::IN,
            ),
        ];
        if let Some(src) = &self.source {
            fds.push((src.as_raw_fd(), TOKEN_SOURCE, EventSet::IN));
        }
        let handler = ConsoleHandler {
            mem: ctx.mem,
            interrupt: ctx.interrupt.clone(),
            health: ctx.health,
            rx,
            tx,
            source: self.source.clone(),
            shared: self.shared.clone(),
            sink_failed: false,
        };
        let worker =
            Worker::spawn("virtio-console", &fds, handler).map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        self.shared.input().interrupt = Some(ctx.interrupt);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // Input not yet delivered stays buffered for the next driver.
        self.stop();
        true
    }

    fn name(&self) -> &'static str {
        "virtio-console"
    }

    fn save_device_state(&self) -> DeviceState {
        // Input not yet delivered stays buffered in the device, as across a reset.
        let s = self.shared.input();
        DeviceState::Console(ConsoleState {
            cols: s.cols,
            rows: s.rows,
        })
    }

    fn restore_device_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        let DeviceState::Console(ConsoleState { cols, rows }) = *state else {
            return Err(DeviceStateError::kind(self.name(), state));
        };
        let mut s = self.shared.input();
        s.cols = cols;
        s.rows = rows;
        Ok(())
    }
}

struct ConsoleHandler {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    health: DeviceHealth,
    rx: ActiveQueue,
    tx: ActiveQueue,
    source: Option<Arc<File>>,
    shared: Arc<Shared>,
    /// Whether a sink error was already logged.
    sink_failed: bool,
}

impl EventHandler for ConsoleHandler {
    fn handle_event(
        &mut self,
        token: u64,
        events: EventSet,
        ctl: &mut WorkerControl,
    ) -> io::Result<()> {
        match token {
            TOKEN_RX => {
                consume(&self.rx.kick);
                self.deliver_input();
            }
            TOKEN_TX => {
                consume(&self.tx.kick);
                self.process_tx();
            }
            TOKEN_INPUT => {
                consume(&self.shared.input_event);
                self.deliver_input();
            }
            TOKEN_SOURCE => {
                if !self.read_source(events) {
                    if let Some(src) = self.source.take() {
                        let _ = ctl.remove(src.as_raw_fd());
                    }
                }
                self.deliver_input();
            }
            _ => {}
        }
        Ok(())
    }
}

impl ConsoleHandler {
    /// Reads once from the input descriptor into the buffer; false when it is finished (end
    /// of file, hang-up or error) and must no longer be watched.
    fn read_source(&mut self, events: EventSet) -> bool {
        let Some(src) = &self.source else {
            return false;
        };
        let mut buf = [0u8; SOURCE_READ];
        match (&**src).read(&mut buf) {
            Ok(0) => {
                log::debug!("virtio-console: end of input");
                false
            }
            Ok(n) => {
                self.shared.input().push(&buf[..n]);
                true
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                !events.contains(EventSet::HANG_UP) && !events.contains(EventSet::ERROR)
            }
            Err(e) => {
                log::warn!("virtio-console: input failed, no more input: {e}");
                false
            }
        }
    }

    /// Moves buffered input into the driver's receive buffers while there are both.
    fn deliver_input(&mut self) {
        let q = &mut self.rx;
        let mut completed = false;
        loop {
            if self.health.is_broken() {
                return;
            }
            if self.shared.input().buf.is_empty() {
                // Keep the avail event current so that the driver's next buffers are seen.
                if let Err(e) = q.queue.enable_notification(&self.mem) {
                    self.health.mark_broken(&format_args!("receiveq: {e}"));
                    return;
                }
                break;
            }
            let Ok(chain) = next_chain(&mut q.queue, &self.mem, &self.health, &"receiveq") else {
                return;
            };
            let Some(chain) = chain else {
                // No buffer: wait for the driver's kick (re-checking the ring once
                // notifications are on, for buffers that raced with us).
                match q.queue.enable_notification(&self.mem) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        self.health.mark_broken(&format_args!("receiveq: {e}"));
                        return;
                    }
                }
            };
            let head = chain.head_index();
            let len = {
                let mut input = self.shared.input();
                let n = fill_rx_chain(chain, &mut input.buf);
                input.counters.rx_bytes += u64::from(n);
                n
            };
            if let Err(e) = q.queue.add_used(&self.mem, head, len) {
                self.health.mark_broken(&format_args!("receiveq: {e}"));
                return;
            }
            completed = true;
        }
        if completed {
            notify_if_needed(&mut q.queue, q.index, &self.mem, self.interrupt.as_ref());
        }
    }

    /// Sends every transmit chain's bytes to the sink.
    fn process_tx(&mut self) {
        let mut sink = self.shared.sink();
        let mut counters = ConsoleCounters::default();
        let mut failed = self.sink_failed;
        drain_queue(
            &mut self.tx.queue,
            self.tx.index,
            &self.mem,
            self.interrupt.as_ref(),
            &self.health,
            |chain| {
                let (bytes, ignored) = read_driver_bytes(chain, MAX_TX_BYTES_PER_CHAIN);
                counters.malformed_bytes += ignored;
                counters.tx_bytes += bytes.len() as u64;
                if let Err(e) = sink.write_all(&bytes) {
                    if !failed {
                        log::warn!("virtio-console: output lost: {e}");
                        failed = true;
                    }
                }
                0
            },
        );
        if let Err(e) = sink.flush() {
            if !failed {
                log::warn!("virtio-console: output lost: {e}");
                failed = true;
            }
        }
        drop(sink);
        self.sink_failed = failed;
        let mut input = self.shared.input();
        input.counters.tx_bytes += counters.tx_bytes;
        input.counters.malformed_bytes += counters.malformed_bytes;
    }
}

/// Writes the front of `buf` into the device-writable buffers of `chain` and removes what was
/// written; returns the byte count. A buffer outside guest memory ends the chain; readable
/// buffers are skipped.
fn fill_rx_chain(chain: DescriptorChain<&GuestMemoryMmap>, buf: &mut VecDeque<u8>) -> u32 {
    let mem = chain.memory();
    let mut written = 0usize;
    for desc in chain.clone() {
        if buf.is_empty() {
            break;
        }
        if !desc.is_write_only() {
            continue;
        }
        let take = (desc.len() as usize).min(buf.len());
        let data = &buf.make_contiguous()[..take];
        let n = mem.write(data, desc.addr()).unwrap_or(0);
        buf.drain(..n);
        written += n;
        if n < take {
            break;
        }
    }
    // At most INPUT_BUFFER_LIMIT bytes.
    u32::try_from(written).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::testing::*;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use virtio_queue::QueueOwnedT;
    use vm_memory::GuestAddress;

    /// A sink the test can read.
    #[derive(Clone, Default)]
    struct SharedSink(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedSink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl SharedSink {
        fn take(&self) -> Vec<u8> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    struct Running<'a> {
        rxq: MockSplitQueue<'a, GuestMemoryMmap>,
        txq: MockSplitQueue<'a, GuestMemoryMmap>,
        rx_kick: EventFd,
        tx_kick: EventFd,
        irq: Arc<CountingInterrupt>,
        sink: SharedSink,
        dev: Console,
    }

    fn start(m: &GuestMemoryMmap, source: Option<OwnedFd>) -> Running<'_> {
        let rxq = MockSplitQueue::create(m, queue_base(0), 16);
        let txq = MockSplitQueue::create(m, queue_base(1), 16);
        let (a, b) = (active_queue(&rxq, 0), active_queue(&txq, 1));
        let rx_kick = a.kick.try_clone().unwrap();
        let tx_kick = b.kick.try_clone().unwrap();
        let sink = SharedSink::default();
        let irq = Arc::new(CountingInterrupt::default());
        let mut dev = Console::new(Box::new(sink.clone()), source, Some((80, 25))).unwrap();
        dev.activate(context(m, features::COMMON, vec![a, b], &irq))
            .unwrap();
        Running {
            rxq,
            txq,
            rx_kick,
            tx_kick,
            irq,
            sink,
            dev,
        }
    }

    #[test]
    fn tx_reaches_the_sink() {
        let m = mem();
        let r = start(&m, None);
        m.write_slice(b"hello ", GuestAddress(0x8_0000)).unwrap();
        m.write_slice(b"world\n", GuestAddress(0x8_1000)).unwrap();
        // A writable buffer in a transmit chain is the wrong direction: ignored.
        add_chain(
            &r.txq,
            0,
            &[
                (0x8_0000, 6, false),
                (0x8_2000, 32, true),
                (0x8_1000, 6, false),
            ],
        );
        r.tx_kick.write(1).unwrap();
        wait_until("tx", || r.txq.used().idx().load() == 1);
        assert_eq!(r.sink.take(), b"hello world\n");
        assert_eq!(used(&r.txq), vec![(0, 0)]);
        let c = r.dev.handle().counters();
        assert_eq!((c.tx_bytes, c.malformed_bytes), (12, 32));
        wait_until("tx interrupt", || {
            r.irq.count(InterruptCause::Queue(1)) == 1
        });
    }

    #[test]
    fn rx_delivers_bytes() {
        let m = mem();
        let r = start(&m, None);
        // A readable buffer is skipped; the 2- and 8-byte writable ones get the input.
        add_chain(
            &r.rxq,
            0,
            &[
                (0x8_3000, 4, false),
                (0x8_0000, 2, true),
                (0x8_1000, 8, true),
            ],
        );
        r.rx_kick.write(1).unwrap();
        r.dev.enqueue_input(b"abcde");
        wait_until("rx", || r.rxq.used().idx().load() == 1);
        assert_eq!(used(&r.rxq), vec![(0, 5)]);
        assert_eq!(read_bytes(&m, 0x8_0000, 2), b"ab");
        assert_eq!(read_bytes(&m, 0x8_1000, 4), b"cde\0");
        assert_eq!(r.dev.handle().pending_input(), 0);
        wait_until("rx interrupt", || {
            r.irq.count(InterruptCause::Queue(0)) == 1
        });
    }

    #[test]
    fn rx_without_buffers_buffers_then_delivers_on_kick() {
        let m = mem();
        let r = start(&m, None);
        let h = r.dev.handle();
        h.enqueue_input(b"0123456789");
        // 4 bytes fit in the first buffer; the rest waits.
        add_chain(&r.rxq, 0, &[(0x8_0000, 4, true)]);
        r.rx_kick.write(1).unwrap();
        wait_until("first rx", || r.rxq.used().idx().load() == 1);
        assert_eq!(h.pending_input(), 6);
        add_chain(&r.rxq, 1, &[(0x8_1000, 64, true)]);
        r.rx_kick.write(1).unwrap();
        wait_until("second rx", || r.rxq.used().idx().load() == 2);
        assert_eq!(used(&r.rxq), vec![(0, 4), (1, 6)]);
        assert_eq!(read_bytes(&m, 0x8_0000, 4), b"0123");
        assert_eq!(read_bytes(&m, 0x8_1000, 6), b"456789");
        assert_eq!(h.counters().rx_bytes, 10);
    }

    #[test]
    fn input_from_a_pipe() {
        let m = mem();
        let (rd, wr) = pipe();
        let r = start(&m, Some(rd));
        let mut wr = File::from(wr);
        wr.write_all(b"typed").unwrap();
        wait_until("pipe input read", || {
            r.dev.handle().counters().rx_bytes + r.dev.handle().pending_input() as u64 == 5
        });
        add_chain(&r.rxq, 0, &[(0x8_0000, 64, true)]);
        r.rx_kick.write(1).unwrap();
        wait_until("rx", || r.rxq.used().idx().load() == 1);
        assert_eq!(read_bytes(&m, 0x8_0000, 5), b"typed");
        // End of input: the worker stops watching the pipe and keeps serving the queues.
        drop(wr);
        r.dev.enqueue_input(b"!");
        add_chain(&r.rxq, 1, &[(0x8_1000, 64, true)]);
        r.rx_kick.write(1).unwrap();
        wait_until("rx after eof", || r.rxq.used().idx().load() == 2);
        assert_eq!(used(&r.rxq)[1], (1, 1));
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(r, 0);
        use std::os::unix::io::FromRawFd;
        // SAFETY: pipe2 just created these descriptors; nothing else owns them.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn input_overflow_drops_oldest() {
        let m = mem();
        let sink = SharedSink::default();
        let dev = Console::new(Box::new(sink), None, None).unwrap();
        let h = dev.handle();
        let data: Vec<u8> = (0..INPUT_BUFFER_LIMIT + 10).map(|i| i as u8).collect();
        h.enqueue_input(&data[..100]);
        h.enqueue_input(&data[100..]);
        assert_eq!(h.pending_input(), INPUT_BUFFER_LIMIT);
        assert_eq!(h.counters().dropped_input, 10);
        // One oversized write alone.
        h.enqueue_input(&vec![7u8; INPUT_BUFFER_LIMIT + 3]);
        assert_eq!(
            h.counters().dropped_input,
            10 + INPUT_BUFFER_LIMIT as u64 + 3
        );
        // What is left is delivered in order, starting past the dropped bytes.
        let h2 = dev.handle();
        h2.0.input().buf.clear();
        h.enqueue_input(&data[..100]);
        h.enqueue_input(&data[100..]);
        let vq = MockSplitQueue::new(&m, 16);
        add_chain(&vq, 0, &[(0x8_0000, 16, true)]);
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(&m).unwrap().next().unwrap();
        let n = fill_rx_chain(chain, &mut h.0.input().buf);
        assert_eq!(n, 16);
        assert_eq!(read_bytes(&m, 0x8_0000, 16), data[10..26]);
    }

    #[test]
    fn hostile_rx_and_tx_chains() {
        let m = mem();
        let r = start(&m, None);
        let h = r.dev.handle();
        h.enqueue_input(b"xyz");
        // Receive: outside memory, readable only, straddling the end of memory.
        add_chain(&r.rxq, 0, &[(0x20_0000, 16, true)]);
        add_chain(&r.rxq, 1, &[(0x8_0000, 16, false)]);
        add_chain(&r.rxq, 2, &[(0x10_0000 - 2, 16, true)]);
        add_chain(&r.rxq, 3, &[(0x8_1000, 16, true)]);
        r.rx_kick.write(1).unwrap();
        wait_until("rx", || r.rxq.used().idx().load() == 4);
        assert_eq!(used(&r.rxq), vec![(0, 0), (1, 0), (2, 2), (3, 1)]);
        assert_eq!(read_bytes(&m, 0x10_0000 - 2, 2), b"xy");
        assert_eq!(read_bytes(&m, 0x8_1000, 1), b"z");
        // Transmit: outside memory, a huge length (capped), overflowing the address space.
        m.write_slice(b"ok", GuestAddress(0x8_2000)).unwrap();
        add_chain(&r.txq, 0, &[(0x20_0000, 16, false)]);
        add_chain(&r.txq, 1, &[(0x8_0000, u32::MAX, false)]);
        add_chain(&r.txq, 2, &[(u64::MAX - 1, 16, false)]);
        add_chain(&r.txq, 3, &[(0x8_2000, 2, false)]);
        r.tx_kick.write(1).unwrap();
        wait_until("tx", || r.txq.used().idx().load() == 4);
        let out = r.sink.take();
        assert_eq!(out.len(), MAX_TX_BYTES_PER_CHAIN + 2);
        assert!(out.ends_with(b"ok"));
    }

    #[test]
    fn config_size_and_emergency_write() {
        let m = mem();
        let mut r = start(&m, None);
        assert_ne!(r.dev.avail_features() & feature::SIZE, 0);
        assert_eq!(r.dev.avail_features() & feature::MULTIPORT, 0);
        let mut c = [0u8; 4];
        r.dev.read_config(0, &mut c);
        assert_eq!(c, [80, 0, 25, 0]);
        r.dev.handle().set_size(132, 43);
        assert_eq!(r.irq.count(InterruptCause::Config), 1);
        r.dev.read_config(0, &mut c);
        assert_eq!(c, [132, 0, 43, 0]);
        r.dev
            .write_config(EMERG_WR_OFFSET, &u32::from(b'!').to_le_bytes());
        r.dev.write_config(0, &[1, 2]);
        assert_eq!(r.sink.take(), b"!");
        let mut past = [0xffu8; 4];
        r.dev.read_config(u64::MAX, &mut past);
        assert_eq!(past, [0; 4]);
        // Without a size, no SIZE feature.
        let d = Console::new(Box::new(io::sink()), None, None).unwrap();
        assert_eq!(d.avail_features() & feature::SIZE, 0);
        // Reset stops the worker and config changes no longer interrupt.
        assert!(r.dev.reset());
        assert!(r.dev.worker.is_none());
        r.dev.handle().set_size(1, 1);
        assert_eq!(r.irq.count(InterruptCause::Config), 1);
    }

    #[test]
    fn unpollable_source_is_refused() {
        let f = File::open("/proc/self/status").unwrap();
        assert!(Console::new(Box::new(io::sink()), Some(f.into()), None).is_err());
    }

    #[test]
    fn missing_queues_fail_activation() {
        let m = mem();
        let irq = Arc::new(CountingInterrupt::default());
        let mut dev = Console::new(Box::new(io::sink()), None, None).unwrap();
        let vq = MockSplitQueue::new(&m, 16);
        assert!(matches!(
            dev.activate(context(&m, 0, vec![active_queue(&vq, 0)], &irq)),
            Err(ActivateError::MissingQueue(1))
        ));
    }
}
