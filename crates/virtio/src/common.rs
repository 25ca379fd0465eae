//! The transport-independent half of every virtio transport: feature negotiation, the device
//! status state machine, queue configuration, activation and reset (virtio 1.2, sections 2
//! and 3). The MMIO and PCI transports only decode their registers into calls on
//! [`VirtioCommon`].

use std::sync::Arc;

use vessel_memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{
    features, ActivateContext, ActiveQueue, DeviceHealth, InterruptCause, VirtioDevice,
    VirtioInterrupt,
};
use crate::state::{QueueState, QueueStateError, StateError, VirtioCommonState, NO_VECTOR};
use crate::ErrorChain;

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// A copy of a configured queue for the device (the transport keeps its own to read back).
fn clone_queue(q: &Queue) -> Option<Queue> {
    Queue::try_from(q.state()).ok()
}

/// The registers and state shared by every transport, around one device.
pub struct VirtioCommon {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    health: DeviceHealth,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    config_generation: u32,
    active: bool,
    /// Stopped by [`VirtioCommon::quiesce`], to be activated again by `resume`.
    quiesced: bool,
}

impl VirtioCommon {
    /// Wraps `device`; `interrupt` is the transport's way to interrupt the driver.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> std::io::Result<Self> {
        let mut queues = Vec::new();
        let mut kicks = Vec::new();
        for &max in device.queue_max_sizes() {
            // A zero or non-power-of-two maximum is a bug in the device, not guest input.
            let max = if max.is_power_of_two() { max } else { 256 };
            queues.push(Queue::new(max).expect("power-of-two queue size is valid"));
            kicks.push(EventFd::new(EFD_NONBLOCK)?);
        }
        let health = DeviceHealth::new(interrupt.clone());
        Ok(VirtioCommon {
            device,
            mem,
            interrupt,
            health,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues,
            kicks,
            config_generation: 0,
            active: false,
            quiesced: false,
        })
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    pub fn interrupt(&self) -> &Arc<dyn VirtioInterrupt> {
        &self.interrupt
    }

    /// The notification events, one per queue, in queue order: the VMM registers each as an
    /// ioeventfd on the transport's notify address.
    pub fn queue_kicks(&self) -> &[EventFd] {
        &self.kicks
    }

    pub fn num_queues(&self) -> u16 {
        self.queues.len() as u16
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    // ---- features ----

    pub fn set_device_features_sel(&mut self, sel: u32) {
        self.device_features_sel = sel;
    }

    /// The device feature select register (readable in virtio-pci's common config).
    pub fn device_features_sel(&self) -> u32 {
        self.device_features_sel
    }

    /// The driver feature select register.
    pub fn driver_features_sel(&self) -> u32 {
        self.driver_features_sel
    }

    /// The 32 feature bits selected by the device feature select register.
    pub fn device_features(&self) -> u32 {
        let all = self.device.avail_features() | features::VERSION_1;
        match self.device_features_sel {
            0 => all as u32,
            1 => (all >> 32) as u32,
            _ => 0,
        }
    }

    pub fn set_driver_features_sel(&mut self, sel: u32) {
        self.driver_features_sel = sel;
    }

    pub fn driver_features(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// Driver feature writes count only between `DRIVER` and `FEATURES_OK`.
    pub fn write_driver_features(&mut self, value: u32) {
        if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
            log::debug!(
                "virtio: driver features written in status {:#x}",
                self.status
            );
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            _ => return,
        };
        self.driver_features &= !(0xffff_ffffu64 << shift);
        self.driver_features |= u64::from(value) << shift;
    }

    /// Features both sides agreed on.
    pub fn acked_features(&self) -> u64 {
        self.driver_features & (self.device.avail_features() | features::VERSION_1)
    }

    // ---- status ----

    pub fn status(&self) -> u8 {
        if self.health.is_broken() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Writes the device status: 0 resets; otherwise bits may only be added, in the order the
    /// spec gives. `FEATURES_OK` is refused (left clear) when the driver asked for features the
    /// device never offered or without `VIRTIO_F_VERSION_1`; `DRIVER_OK` activates the device.
    pub fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let added = value & !old;
        if value & old != old {
            log::debug!("virtio: status {old:#x} -> {value:#x} clears bits; ignored");
            return;
        }
        let mut new = old | (added & !status::DEVICE_NEEDS_RESET);
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.avail_features() | features::VERSION_1;
            let unoffered = self.driver_features & !offered;
            if unoffered != 0 || self.driver_features & features::VERSION_1 == 0 {
                log::warn!(
                    "{}: driver asked for features {:#x} (offered {offered:#x}); refusing",
                    self.device.name(),
                    self.driver_features
                );
                new &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 {
            if new & status::FEATURES_OK == 0 {
                log::debug!("virtio: DRIVER_OK without FEATURES_OK; ignored");
                new &= !status::DRIVER_OK;
            } else if new & status::FAILED == 0 {
                self.status = new;
                self.activate();
                return;
            }
        }
        self.status = new;
    }

    fn activate(&mut self) {
        let event_idx = self.acked_features() & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::new();
        for (index, queue) in self.queues.iter_mut().enumerate() {
            if !queue.ready() {
                continue;
            }
            if !queue.is_valid(&self.mem) {
                self.health.mark_broken(&format_args!(
                    "{}: queue {index} has an invalid size or addresses outside guest memory",
                    self.device.name()
                ));
                return;
            }
            queue.set_event_idx(event_idx);
            let kick = match self.kicks[index].try_clone() {
                Ok(k) => k,
                Err(e) => {
                    self.health
                        .mark_broken(&format_args!("cannot clone queue event: {e}"));
                    return;
                }
            };
            let Some(copy) = clone_queue(queue) else {
                self.health
                    .mark_broken(&format_args!("queue {index}: inconsistent configuration"));
                return;
            };
            queues.push(ActiveQueue {
                queue: copy,
                kick,
                index: index as u16,
            });
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            acked_features: self.acked_features(),
            queues,
            interrupt: self.interrupt.clone(),
            health: self.health.clone(),
        };
        match self.device.activate(ctx) {
            Ok(()) => self.active = true,
            Err(e) => {
                self.health
                    .mark_broken(&format_args!("{}: {}", self.device.name(), ErrorChain(&e)))
            }
        }
    }

    fn reset(&mut self) {
        if (self.active || self.quiesced) && !self.device.reset() {
            log::warn!("{}: device cannot be reset", self.device.name());
            // The status does not read back 0, so the driver knows the reset failed.
            self.status |= status::FAILED;
            return;
        }
        self.active = false;
        self.quiesced = false;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.health.clear();
    }

    // ---- snapshots ----

    /// Whether [`VirtioCommon::quiesce`] stopped the device (and `resume` has not yet
    /// started it again).
    pub fn is_quiesced(&self) -> bool {
        self.quiesced
    }

    /// Stops a running device at a consistent point ([`VirtioDevice::quiesce`]), keeping
    /// every register. Nothing to do for a device that is not running. The guest must not
    /// run until [`VirtioCommon::resume`] (or for good, if the VMM ends).
    pub fn quiesce(&mut self) -> Result<(), StateError> {
        if !self.active {
            return Ok(());
        }
        if !self.device.quiesce() {
            return Err(StateError::Quiesce(self.device.name()));
        }
        self.active = false;
        self.quiesced = true;
        Ok(())
    }

    /// The registers and the device's state; the device must not be running (quiesce it).
    pub fn save_state(&self) -> Result<VirtioCommonState, StateError> {
        if self.active {
            return Err(StateError::Running(self.device.name()));
        }
        Ok(VirtioCommonState {
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            queue_select: self.queue_select,
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .map(|q| QueueState {
                    max_size: q.max_size(),
                    size: q.size(),
                    ready: q.ready(),
                    desc: q.desc_table(),
                    avail: q.avail_ring(),
                    used: q.used_ring(),
                    vector: NO_VECTOR,
                })
                .collect(),
            broken: self.health.is_broken(),
            device: self.device.save_device_state(),
        })
    }

    /// Starts a quiesced device again with the same queues, from where `used->idx` says
    /// (exactly what a restore does). Nothing to do for a device that was not quiesced. A
    /// queue whose indices no longer make sense marks the device as needing reset.
    pub fn resume(&mut self) {
        if !self.quiesced {
            return;
        }
        self.quiesced = false;
        if !self.health.is_broken() {
            self.activate_from_used_idx();
        }
    }

    /// Checks `state` against this device and builds its queues, changing nothing.
    fn restored_queues(&self, state: &VirtioCommonState) -> Result<Vec<Queue>, StateError> {
        let name = self.device.name();
        let actual = self.device.device_type();
        if state.device_type != actual {
            return Err(StateError::DeviceType {
                saved: state.device_type,
                actual,
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(StateError::QueueCount {
                name,
                saved: state.queues.len(),
                actual: self.queues.len(),
            });
        }
        let offered = self.device.avail_features() | features::VERSION_1;
        if state.status & status::FEATURES_OK != 0 && state.driver_features & !offered != 0 {
            return Err(StateError::Features {
                name,
                features: state.driver_features,
                offered,
            });
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (index, (s, mine)) in state.queues.iter().zip(&self.queues).enumerate() {
            let err = |source: QueueStateError| StateError::Queue {
                name,
                index,
                source,
            };
            if s.max_size != mine.max_size() {
                return Err(err(QueueStateError::MaxSize {
                    saved: s.max_size,
                    actual: mine.max_size(),
                }));
            }
            let set = |q: &mut Queue| -> Result<(), virtio_queue::Error> {
                q.try_set_size(s.size)?;
                q.try_set_desc_table_address(vm_memory::GuestAddress(s.desc))?;
                q.try_set_avail_ring_address(vm_memory::GuestAddress(s.avail))?;
                q.try_set_used_ring_address(vm_memory::GuestAddress(s.used))
            };
            let mut q = Queue::new(mine.max_size()).map_err(|e| err(e.into()))?;
            set(&mut q).map_err(|e| err(e.into()))?;
            q.set_ready(s.ready);
            queues.push(q);
        }
        Ok(queues)
    }

    /// Puts a saved state into this freshly built device (built from the same configuration
    /// as the saved one, over guest memory already holding the saved contents) and, if the
    /// driver had started it, activates it from `used->idx` and kicks every ready queue.
    /// A state that does not fit (another device type, queue count or layout, unoffered
    /// features, device state the device refuses) is refused with nothing changed.
    pub fn restore_state(&mut self, state: &VirtioCommonState) -> Result<(), StateError> {
        let name = self.device.name();
        if self.active || self.quiesced || self.status != 0 {
            return Err(StateError::NotFresh(name));
        }
        let queues = self.restored_queues(state)?;
        self.device
            .restore_device_state(&state.device)
            .map_err(|source| StateError::Device { name, source })?;
        self.queues = queues;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.status = state.status & !status::DEVICE_NEEDS_RESET;
        self.queue_select = state.queue_select;
        self.config_generation = state.config_generation;
        if state.broken {
            // The driver already knows; it will reset the device.
            self.health.set_broken_quietly();
            return Ok(());
        }
        let running = status::FEATURES_OK | status::DRIVER_OK;
        if self.status & running == running && self.status & status::FAILED == 0 {
            self.activate_from_used_idx();
        }
        Ok(())
    }

    /// Activates the device with every ready queue positioned at `used->idx`, after checking
    /// that the driver's available index is at most a queue size ahead of it; then kicks
    /// every ready queue, for the buffers whose notification the stopped device missed.
    fn activate_from_used_idx(&mut self) {
        use std::sync::atomic::Ordering;
        let name = self.device.name();
        for (index, q) in self.queues.iter_mut().enumerate() {
            if !q.ready() {
                continue;
            }
            if !q.is_valid(&self.mem) {
                self.health.mark_broken(&format_args!(
                    "{name}: queue {index} has an invalid size or addresses outside guest memory"
                ));
                return;
            }
            let used = q.used_idx(&self.mem, Ordering::Acquire);
            let avail = q.avail_idx(&self.mem, Ordering::Acquire);
            match (used, avail) {
                (Ok(used), Ok(avail)) if (avail - used).0 <= q.size() => {
                    q.set_next_avail(used.0);
                    q.set_next_used(used.0);
                }
                (Ok(used), Ok(avail)) => {
                    self.health.mark_broken(&format_args!(
                        "{name}: queue {index}: used index {} is more than the queue size behind the available index {}",
                        used.0, avail.0
                    ));
                    return;
                }
                (Err(e), _) | (_, Err(e)) => {
                    self.health
                        .mark_broken(&format_args!("{name}: queue {index}: {e}"));
                    return;
                }
            }
        }
        self.activate();
        if self.active {
            for (q, kick) in self.queues.iter().zip(&self.kicks) {
                if q.ready() {
                    if let Err(e) = kick.write(1) {
                        log::warn!("{name}: cannot kick a restored queue: {e}");
                    }
                }
            }
        }
    }

    // ---- queues ----

    pub fn queue_select(&self) -> u16 {
        self.queue_select
    }

    pub fn set_queue_select(&mut self, index: u16) {
        self.queue_select = index;
    }

    fn selected(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// Runs `f` on the selected queue if the driver may still configure it (the queue exists
    /// and the device is not running). Returns whether the write was applied.
    pub fn configure_queue(&mut self, f: impl FnOnce(&mut Queue)) -> bool {
        if self.status & status::DRIVER_OK != 0 {
            log::debug!("virtio: queue configured after DRIVER_OK; ignored");
            return false;
        }
        match self.queues.get_mut(usize::from(self.queue_select)) {
            Some(q) => {
                f(q);
                true
            }
            None => false,
        }
    }

    /// Maximum size of the selected queue; 0 when it does not exist.
    pub fn queue_max_size(&self) -> u16 {
        self.selected().map_or(0, |q| q.max_size())
    }

    pub fn queue_size(&self) -> u16 {
        self.selected().map_or(0, |q| q.size())
    }

    pub fn queue_ready(&self) -> bool {
        self.selected().is_some_and(|q| q.ready())
    }

    pub fn queue_desc(&self) -> u64 {
        self.selected().map_or(0, |q| q.desc_table())
    }

    pub fn queue_avail(&self) -> u64 {
        self.selected().map_or(0, |q| q.avail_ring())
    }

    pub fn queue_used(&self) -> u64 {
        self.selected().map_or(0, |q| q.used_ring())
    }

    /// The driver notified queue `index` through a register write (when no ioeventfd caught
    /// it): forwarded to the device's worker.
    pub fn notify_queue(&self, index: u32) {
        match self.kicks.get(index as usize) {
            Some(k) => {
                if let Err(e) = k.write(1) {
                    log::warn!("virtio: cannot signal queue {index}: {e}");
                }
            }
            None => log::debug!("virtio: notification for missing queue {index}"),
        }
    }

    // ---- configuration space ----

    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.device.read_config(offset, data);
    }

    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.device.write_config(offset, data);
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    /// Tells the driver that the configuration changed (e.g. a resized disk).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Err(e) = self.interrupt.trigger(InterruptCause::Config) {
            log::warn!("virtio: cannot raise the config interrupt: {e}");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::device::{read_config_bytes, ActivateError};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    /// A device that records what happens to it.
    pub(crate) struct FakeDevice {
        pub activations: Arc<AtomicUsize>,
        pub queues_seen: Arc<Mutex<Vec<u16>>>,
        pub resettable: bool,
        pub config: Vec<u8>,
    }

    impl FakeDevice {
        pub(crate) fn new() -> Self {
            FakeDevice {
                activations: Arc::new(AtomicUsize::new(0)),
                queues_seen: Arc::new(Mutex::new(Vec::new())),
                resettable: true,
                config: vec![0xaa, 0xbb, 0xcc, 0xdd],
            }
        }
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            4
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn avail_features(&self) -> u64 {
            features::COMMON | 1 << 5
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Some(b) = self.config.get_mut(offset as usize) {
                *b = data[0];
            }
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            if ctx.queues.is_empty() {
                return Err(ActivateError::MissingQueue(0));
            }
            self.activations.fetch_add(1, Ordering::SeqCst);
            *self.queues_seen.lock().unwrap() = ctx.queues.iter().map(|q| q.index).collect();
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resettable
        }
        fn name(&self) -> &'static str {
            "fake"
        }
    }

    #[derive(Default)]
    pub(crate) struct CountingInterrupt {
        pub causes: Mutex<Vec<InterruptCause>>,
    }

    impl VirtioInterrupt for CountingInterrupt {
        fn trigger(&self, cause: InterruptCause) -> std::io::Result<()> {
            self.causes.lock().unwrap().push(cause);
            Ok(())
        }
    }

    pub(crate) fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn common(dev: FakeDevice) -> (VirtioCommon, Arc<CountingInterrupt>) {
        let irq = Arc::new(CountingInterrupt::default());
        let c = VirtioCommon::new(Box::new(dev), mem(), irq.clone()).unwrap();
        (c, irq)
    }

    /// Drives the common state the way the Linux driver does, up to DRIVER_OK.
    fn negotiate(c: &mut VirtioCommon, features: u64) {
        c.set_status(status::ACKNOWLEDGE);
        c.set_status(status::ACKNOWLEDGE | status::DRIVER);
        c.set_driver_features_sel(0);
        c.write_driver_features(features as u32);
        c.set_driver_features_sel(1);
        c.write_driver_features((features >> 32) as u32);
        c.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    }

    fn setup_queue(c: &mut VirtioCommon, index: u16, base: u64) {
        c.set_queue_select(index);
        assert!(c.configure_queue(|q| {
            q.set_size(8);
            q.set_desc_table_address(Some(base as u32), Some(0));
            q.set_avail_ring_address(Some(base as u32 + 0x1000), Some(0));
            q.set_used_ring_address(Some(base as u32 + 0x2000), Some(0));
            q.set_ready(true);
        }));
    }

    #[test]
    fn feature_pages() {
        let (mut c, _) = common(FakeDevice::new());
        c.set_device_features_sel(0);
        assert_eq!(c.device_features(), (features::COMMON | 1 << 5) as u32);
        c.set_device_features_sel(1);
        assert_eq!(c.device_features(), 1, "VERSION_1 is bit 32");
        c.set_device_features_sel(7);
        assert_eq!(c.device_features(), 0);
    }

    #[test]
    fn happy_negotiation_activates_ready_queues() {
        let dev = FakeDevice::new();
        let activations = dev.activations.clone();
        let seen = dev.queues_seen.clone();
        let (mut c, _) = common(dev);
        negotiate(&mut c, features::VERSION_1 | 1 << 5);
        assert_ne!(c.status() & status::FEATURES_OK, 0);
        setup_queue(&mut c, 1, 0x4000);
        c.set_status(c.status() | status::DRIVER_OK);
        assert_eq!(activations.load(Ordering::SeqCst), 1);
        assert_eq!(*seen.lock().unwrap(), vec![1]);
        assert!(c.is_active());
        // Queue configuration is frozen while running.
        c.set_queue_select(0);
        assert!(!c.configure_queue(|q| q.set_size(4)));
    }

    #[test]
    fn unoffered_features_are_refused() {
        let (mut c, _) = common(FakeDevice::new());
        negotiate(&mut c, features::VERSION_1 | 1 << 20);
        assert_eq!(c.status() & status::FEATURES_OK, 0);
        // Without FEATURES_OK, DRIVER_OK does not start the device.
        c.set_status(c.status() | status::DRIVER_OK);
        assert!(!c.is_active());
    }

    #[test]
    fn legacy_drivers_without_version_1_are_refused() {
        let (mut c, _) = common(FakeDevice::new());
        negotiate(&mut c, 1 << 5);
        assert_eq!(c.status() & status::FEATURES_OK, 0);
    }

    #[test]
    fn queue_outside_memory_marks_device_broken() {
        let (mut c, irq) = common(FakeDevice::new());
        negotiate(&mut c, features::VERSION_1);
        setup_queue(&mut c, 0, 0xfff_f000);
        c.set_status(c.status() | status::DRIVER_OK);
        assert!(!c.is_active());
        assert_ne!(c.status() & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(*irq.causes.lock().unwrap(), vec![InterruptCause::Config]);
        // A reset clears it and the device can start again.
        c.set_status(0);
        assert_eq!(c.status(), 0);
        negotiate(&mut c, features::VERSION_1);
        setup_queue(&mut c, 0, 0x4000);
        c.set_status(c.status() | status::DRIVER_OK);
        assert!(c.is_active());
    }

    #[test]
    fn out_of_range_queue_select_is_harmless() {
        let (mut c, _) = common(FakeDevice::new());
        c.set_queue_select(9);
        assert_eq!(c.queue_max_size(), 0);
        assert!(!c.queue_ready());
        assert!(!c.configure_queue(|q| q.set_ready(true)));
        c.notify_queue(9);
        c.notify_queue(u32::MAX);
    }

    #[test]
    fn status_bits_cannot_be_cleared_without_reset() {
        let (mut c, _) = common(FakeDevice::new());
        negotiate(&mut c, features::VERSION_1);
        let before = c.status();
        c.set_status(status::ACKNOWLEDGE);
        assert_eq!(c.status(), before);
    }

    #[test]
    fn failed_reset_reports_failure() {
        let mut dev = FakeDevice::new();
        dev.resettable = false;
        let (mut c, _) = common(dev);
        negotiate(&mut c, features::VERSION_1);
        setup_queue(&mut c, 0, 0x4000);
        c.set_status(c.status() | status::DRIVER_OK);
        c.set_status(0);
        assert_ne!(c.status(), 0);
    }

    #[test]
    fn config_writes_bump_generation() {
        let (mut c, irq) = common(FakeDevice::new());
        let g = c.config_generation();
        c.write_config(1, &[7]);
        let mut b = [0u8; 2];
        c.read_config(0, &mut b);
        assert_eq!(b, [0xaa, 7]);
        assert_ne!(c.config_generation(), g);
        c.config_changed();
        assert_eq!(*irq.causes.lock().unwrap(), vec![InterruptCause::Config]);
    }
}
