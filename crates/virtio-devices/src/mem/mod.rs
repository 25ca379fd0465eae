//! virtio-mem (memory device, virtio 1.2 section 5.15, device id 24): memory hotplug as
//! Firecracker 1.16 has it. The device manages a region of guest physical memory above RAM,
//! absent from the e820 map, cut into blocks the driver plugs and unplugs with requests on
//! one queue (`PLUG`, `UNPLUG`, `UNPLUG_ALL`, `STATE`) until the plugged size reaches the
//! size the host requests ([`MemHandle::set_requested_size`], announced with a configuration
//! interrupt).
//!
//! The host maps the region into the guest in slots (a multiple of the block size, 128 MiB
//! by default): a slot is mapped while any of its blocks is plugged, and unmapped when its
//! last block is unplugged, through [`MemorySlots`] (KVM memory slots in the VMM). Unplugged
//! blocks' host pages are dropped with `madvise(MADV_DONTNEED)`, so the host gets the memory
//! back. `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE` is offered: the guest cannot reach memory of an
//! unmapped slot. The VMM's own mapping of the region stays readable (zero pages), so a
//! device buffer a hostile driver places there is read as zeros, never a crash.
//!
//! The bookkeeping (and every check of the driver's ranges) is in [`blocks`]; the wire
//! format in [`wire`].

pub mod blocks;
pub mod wire;

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use vessel_memory::GuestMemoryMmap;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;

use vessel_virtio::worker::{consume, drain_queue, EventHandler, Worker, WorkerControl};
use vessel_virtio::{
    features, read_config_bytes, ActivateContext, ActivateError, ActiveQueue, DeviceHealth,
    DeviceState, DeviceStateError, InterruptCause, MemState, VirtioDevice, VirtioInterrupt,
};

pub use blocks::{BadGeometry, Blocks, Effects, MemGeometry, SizeError};
use wire::{Request, Response, REQUEST_LEN, RESPONSE_LEN};

/// The virtio device id of a memory device.
pub const DEVICE_TYPE: u32 = 24;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 128;
/// `VIRTIO_MEM_F_ACPI_PXM` (not offered: `node_id` is 0).
pub const F_ACPI_PXM: u64 = 1 << 0;
/// `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE`: the driver must not touch unplugged memory.
pub const F_UNPLUGGED_INACCESSIBLE: u64 = 1 << 1;

/// How the device maps and unmaps the region's slots in the guest (KVM memory slots).
pub trait MemorySlots: Send + Sync {
    /// Maps slot `index` of the region (`addr + index * slot_size`, `slot_size` bytes) into
    /// the guest (`present`) or removes it.
    fn set_slot(&self, index: usize, present: bool) -> io::Result<()>;
}

/// What the device has done, for statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemCounters {
    pub plugs: u64,
    pub unplugs: u64,
    pub unplug_alls: u64,
    pub states: u64,
    /// Requests answered `ERROR` or `NACK`, and chains too malformed to answer.
    pub refused: u64,
    /// Slot maps, unmaps or discards the host failed to do.
    pub host_failures: u64,
}

/// The device's figures, as the API reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemStatus {
    pub geometry: MemGeometry,
    pub plugged_size: u64,
    pub requested_size: u64,
    pub usable_region_size: u64,
    pub counters: MemCounters,
}

struct Inner {
    blocks: Blocks,
    counters: MemCounters,
    /// The running device's interrupt, for configuration changes.
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    /// A driver set the device up and has not reset it (a snapshot's quiesce keeps this).
    active: bool,
}

struct Shared {
    state: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked between plain updates.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The host's side of a virtio-mem device: cheap to clone, usable from any thread, before
/// and after activation.
#[derive(Clone)]
pub struct MemHandle(Arc<Shared>);

impl MemHandle {
    /// Asks the driver to plug (or unplug) memory until `bytes` are plugged, and tells it
    /// with a configuration interrupt. Refused, as Firecracker does, until a driver has set
    /// the device up: nothing would answer.
    pub fn set_requested_size(&self, bytes: u64) -> Result<(), SizeError> {
        let irq = {
            let mut s = self.0.lock();
            if !s.active {
                return Err(SizeError::NotActive);
            }
            s.blocks.set_requested_size(bytes)?;
            s.interrupt.clone()
        };
        if let Some(irq) = irq {
            if let Err(e) = irq.trigger(InterruptCause::Config) {
                log::warn!("virtio-mem: cannot raise the config interrupt: {e}");
            }
        }
        Ok(())
    }

    pub fn status(&self) -> MemStatus {
        let s = self.0.lock();
        MemStatus {
            geometry: s.blocks.geometry(),
            plugged_size: s.blocks.plugged_size(),
            requested_size: s.blocks.requested_size(),
            usable_region_size: s.blocks.usable_region_size(),
            counters: s.counters,
        }
    }
}

/// The virtio memory device.
pub struct VirtioMem {
    shared: Arc<Shared>,
    slots: Arc<dyn MemorySlots>,
    worker: Option<Worker>,
}

impl VirtioMem {
    /// A device managing `geometry`, nothing plugged, mapping slots through `slots`.
    pub fn new(geometry: MemGeometry, slots: Arc<dyn MemorySlots>) -> Result<Self, BadGeometry> {
        Ok(VirtioMem {
            shared: Arc::new(Shared {
                state: Mutex::new(Inner {
                    blocks: Blocks::new(geometry)?,
                    counters: MemCounters::default(),
                    interrupt: None,
                    active: false,
                }),
            }),
            slots,
            worker: None,
        })
    }

    /// The host's control of this device.
    pub fn handle(&self) -> MemHandle {
        MemHandle(self.shared.clone())
    }

    fn stop(&mut self) {
        self.worker = None;
        self.shared.lock().interrupt = None;
    }
}

impl VirtioDevice for VirtioMem {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        features::COMMON | F_UNPLUGGED_INACCESSIBLE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.shared.lock().blocks.config_bytes();
        read_config_bytes(&c, offset, data);
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        self.stop();
        let queue = ctx.take_queue(0).ok_or(ActivateError::MissingQueue(0))?;
        let fds = [(queue.kick.as_raw_fd(), 0, EventSet::IN)];
        {
            let mut s = self.shared.lock();
            s.interrupt = Some(ctx.interrupt.clone());
            s.active = true;
        }
        let handler = MemWorker {
            mem: ctx.mem,
            queue,
            interrupt: ctx.interrupt,
            health: ctx.health,
            shared: self.shared.clone(),
            slots: self.slots.clone(),
        };
        match Worker::spawn("virtio-mem", &fds, handler) {
            Ok(w) => {
                self.worker = Some(w);
                Ok(())
            }
            Err(e) => {
                let mut s = self.shared.lock();
                s.interrupt = None;
                s.active = false;
                Err(ActivateError::Worker(e))
            }
        }
    }

    fn reset(&mut self) -> bool {
        // Plugged memory stays plugged across a reset (virtio 1.2 section 5.15.5): a driver
        // starting over unplugs it all first.
        self.stop();
        self.shared.lock().active = false;
        true
    }

    fn quiesce(&mut self) -> bool {
        // The worker serves each request at once: stopping it leaves nothing in flight. The
        // driver still has the device: it is activated again with the same queues.
        self.stop();
        true
    }

    fn name(&self) -> &'static str {
        "virtio-mem"
    }

    fn save_device_state(&self) -> DeviceState {
        let s = self.shared.lock();
        DeviceState::Mem(MemState {
            requested_size: s.blocks.requested_size(),
            usable_region_size: s.blocks.usable_region_size(),
            plugged: s
                .blocks
                .plugged_runs()
                .into_iter()
                .map(|(first, count)| (first as u64, count as u64))
                .collect(),
        })
    }

    /// Takes the saved bookkeeping and maps the slots holding plugged blocks (their contents
    /// came back with guest memory).
    fn restore_device_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        let DeviceState::Mem(m) = state else {
            return Err(DeviceStateError::kind(self.name(), state));
        };
        let mut s = self.shared.lock();
        let blocks = s
            .blocks
            .restored(m.requested_size, m.usable_region_size, &m.plugged)
            .map_err(DeviceStateError::Mem)?;
        let mut mapped = Vec::new();
        for slot in blocks.slots_in_use() {
            if let Err(e) = self.slots.set_slot(slot, true) {
                for &m in &mapped {
                    if let Err(e) = self.slots.set_slot(m, false) {
                        log::warn!("virtio-mem: cannot unmap slot {m}: {e}");
                    }
                }
                return Err(DeviceStateError::Mem(format!(
                    "cannot map slot {slot}: {e}"
                )));
            }
            mapped.push(slot);
        }
        s.blocks = blocks;
        Ok(())
    }
}

struct MemWorker {
    mem: GuestMemoryMmap,
    queue: ActiveQueue,
    interrupt: Arc<dyn VirtioInterrupt>,
    health: DeviceHealth,
    shared: Arc<Shared>,
    slots: Arc<dyn MemorySlots>,
}

impl EventHandler for MemWorker {
    fn handle_event(&mut self, _token: u64, _: EventSet, _: &mut WorkerControl) -> io::Result<()> {
        consume(&self.queue.kick);
        let (mem, shared, slots) = (&self.mem, &*self.shared, &*self.slots);
        drain_queue(
            &mut self.queue.queue,
            self.queue.index,
            mem,
            self.interrupt.as_ref(),
            &self.health,
            |chain| serve_chain(mem, chain, shared, slots),
        );
        Ok(())
    }
}

/// Serves one request chain: the request in its device-readable buffers, the response into
/// its first device-writable one. Returns the bytes written (0 for a chain with no room for
/// an answer, which is not carried out).
fn serve_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    shared: &Shared,
    slots: &dyn MemorySlots,
) -> u32 {
    let mut req = [0u8; REQUEST_LEN];
    let mut got = 0;
    let mut unreadable = false;
    let mut resp_at = None;
    for desc in chain {
        if desc.is_write_only() {
            if resp_at.is_none() {
                resp_at = Some((desc.addr(), desc.len() as usize));
            }
        } else if got < REQUEST_LEN && resp_at.is_none() {
            let n = (REQUEST_LEN - got).min(desc.len() as usize);
            if mem.read_slice(&mut req[got..got + n], desc.addr()).is_err() {
                unreadable = true;
            }
            got += n;
        }
    }
    // A request the driver cannot hear the answer to is not carried out.
    let Some(resp_at) = resp_at
        .filter(|&(at, len)| len >= RESPONSE_LEN && mem.check_range(at, RESPONSE_LEN))
        .map(|(at, _)| at)
    else {
        log::debug!("virtio-mem: a request without room for its response");
        shared.lock().counters.refused += 1;
        return 0;
    };
    let response = if got < REQUEST_LEN || unreadable {
        Response::Error
    } else {
        execute(mem, Request::parse(&req), shared, slots)
    };
    if !matches!(response, Response::Ack(_)) {
        shared.lock().counters.refused += 1;
    }
    match mem.write_slice(&response.to_bytes(), resp_at) {
        Ok(()) => RESPONSE_LEN as u32,
        Err(_) => 0,
    }
}

/// Carries out one request under the device's lock: the bookkeeping, then the slots and the
/// discards it calls for. A plug whose slots cannot be mapped is undone and answered
/// `ERROR`.
fn execute(
    mem: &GuestMemoryMmap,
    req: Request,
    shared: &Shared,
    slots: &dyn MemorySlots,
) -> Response {
    let mut s = shared.lock();
    let c = &mut s.counters;
    match req {
        Request::Plug { .. } => c.plugs += 1,
        Request::Unplug { .. } => c.unplugs += 1,
        Request::UnplugAll => c.unplug_alls += 1,
        Request::State { .. } => c.states += 1,
        Request::Unknown(t) => log::debug!("virtio-mem: unknown request type {t}"),
    }
    let (response, effects) = s.blocks.handle(req);
    let mut mapped = Vec::new();
    for &(slot, present) in &effects.slots {
        match slots.set_slot(slot, present) {
            Ok(()) if present => mapped.push(slot),
            Ok(()) => {}
            Err(e) if present => {
                log::warn!("virtio-mem: cannot map slot {slot}: {e}");
                s.counters.host_failures += 1;
                for &m in &mapped {
                    if let Err(e) = slots.set_slot(m, false) {
                        log::warn!("virtio-mem: cannot unmap slot {m}: {e}");
                    }
                }
                if let Request::Plug { addr, nb_blocks } = req {
                    s.blocks.undo_plug(addr, nb_blocks);
                }
                return Response::Error;
            }
            Err(e) => {
                // The guest keeps a view of memory it gave back: harmless, but logged.
                log::warn!("virtio-mem: cannot unmap slot {slot}: {e}");
                s.counters.host_failures += 1;
            }
        }
    }
    for &(start, len) in &effects.discard {
        if !discard(mem, start, len) {
            s.counters.host_failures += 1;
        }
    }
    response
}

/// Drops the host pages behind `start..start + len` (inside one region of `mem`).
fn discard(mem: &GuestMemoryMmap, start: u64, len: u64) -> bool {
    let Some(region) = mem.find_region(GuestAddress(start)) else {
        return false;
    };
    let offset = start - region.start_addr().0;
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return false;
    }
    let (Ok(host), Ok(len)) = (
        region.get_host_address(vm_memory::MemoryRegionAddress(offset)),
        usize::try_from(len),
    ) else {
        return false;
    };
    // SAFETY: `host..host + len` lies inside the region's host mapping (checked above), which
    // `mem` keeps mapped. MADV_DONTNEED only replaces these private anonymous pages with zero
    // pages on next access; guest memory is only ever accessed through raw pointers and
    // volatile copies, never through Rust references, so nothing is invalidated.
    let r = unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTNEED) };
    if r != 0 {
        log::warn!(
            "virtio-mem: madvise(DONTNEED) failed: {}",
            io::Error::last_os_error()
        );
    }
    r == 0
}

#[cfg(test)]
mod tests;
