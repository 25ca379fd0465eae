//! Snapshot state of virtio devices: what [`crate::VirtioCommon`] and the transports save
//! after a quiesce and put back into freshly built ones (serde-serializable).
//!
//! The invariant that makes this small: once a device is quiesced, no queue has a chain
//! that was popped and not completed, so for every ready queue the device's next available
//! and next used positions both equal `used->idx` in guest memory. A restore reads them back
//! from there (checked against `avail->idx`) instead of saving them.

use serde::{Deserialize, Serialize};

/// `VIRTIO_MSI_NO_VECTOR`: no MSI-X vector (also what MMIO queues record).
pub const NO_VECTOR: u16 = 0xffff;

fn no_vector() -> u16 {
    NO_VECTOR
}

/// One queue's registers as the driver configured them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// The device's maximum (checked against the rebuilt device).
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// The MSI-X vector the driver chose for the queue (PCI), else [`NO_VECTOR`].
    #[serde(default = "no_vector")]
    pub vector: u16,
}

/// The transport-independent registers of a device, and its own state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VirtioCommonState {
    pub device_type: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    /// The features the driver wrote (the negotiated ones are these and the offered ones).
    pub driver_features: u64,
    /// The device status (without `DEVICE_NEEDS_RESET`, which is `broken`).
    pub status: u8,
    pub queue_select: u16,
    pub config_generation: u32,
    pub queues: Vec<QueueState>,
    /// The device needed a reset (`DEVICE_NEEDS_RESET`).
    pub broken: bool,
    /// What [`crate::VirtioDevice::save_device_state`] returned.
    #[serde(default)]
    pub device: DeviceState,
}

/// A virtio-mmio device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub common: VirtioCommonState,
    /// The interrupt status register.
    pub interrupt_status: u32,
}

/// A virtio-pci function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VirtioPciState {
    /// Queue vectors are in `common.queues[i].vector`.
    pub common: VirtioCommonState,
    pub config: vessel_pci::ConfigSpaceState,
    pub msix: vessel_pci::MsixState,
    pub isr: u8,
    pub config_vector: u16,
}

/// A device's own state in a snapshot: what [`crate::VirtioDevice::save_device_state`]
/// returns and [`crate::VirtioDevice::restore_device_state`] takes back.
///
/// The payloads live here rather than beside each device (in `vessel-virtio-devices`)
/// because the transports hold `Box<dyn VirtioDevice>` and carry this state without knowing
/// the device; each device converts its own variant to and from its fields, and checks it,
/// in its own file.
///
/// The JSON is untagged, the shape the snapshot files have always had: `null` (no state),
/// `{"mac": [6 bytes], "active_pairs": N}` (net), `{"cols": C, "rows": R}` (console) or
/// `{"num_pages": N, "actual": A}` (balloon) or `{"start": S, "size": N}` (pmem). The payloads refuse unknown fields, so the
/// shapes cannot be mistaken for one another.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "a virtio device state: null, {\"mac\": [6 bytes], \"active_pairs\": N} \
                 (net), {\"cols\": C, \"rows\": R} (console), \
                 {\"num_pages\": N, \"actual\": A} (balloon), {\"start\": S, \"size\": N} \
                 (pmem) or {\"requested_size\": R, \"usable_region_size\": U, \
                 \"plugged\": [[first, count]...]} (mem)"
)]
pub enum DeviceState {
    /// The device keeps nothing beyond what its construction gives back (`null`).
    #[default]
    None,
    Net(NetState),
    Console(ConsoleState),
    Balloon(BalloonState),
    Pmem(PmemState),
    Mem(MemState),
    /// The test device of this crate's unit tests.
    #[cfg(test)]
    Counter {
        served: u32,
    },
}

impl DeviceState {
    /// What kind of state this is, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceState::None => "no",
            DeviceState::Net(_) => "a virtio-net",
            DeviceState::Console(_) => "a virtio-console",
            DeviceState::Balloon(_) => "a virtio-balloon",
            DeviceState::Pmem(_) => "a virtio-pmem",
            DeviceState::Mem(_) => "a virtio-mem",
            #[cfg(test)]
            DeviceState::Counter { .. } => "a counter",
        }
    }
}

/// virtio-net: what the driver may have seen that a rebuilt device would not give back
/// (the TAP is reopened by name; the MAC may have been random).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    pub mac: [u8; 6],
    /// The queue pairs the driver enabled (1 without multiqueue).
    pub active_pairs: u16,
}

/// virtio-console: the console size the driver read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleState {
    pub cols: u16,
    pub rows: u16,
}

/// virtio-balloon: the target the host set, the size the driver reported and the latest
/// hinting run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonState {
    pub num_pages: u32,
    pub actual: u32,
    /// The id of the latest free page hinting run (0: none yet).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hint_cmd_id: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// virtio-pmem: where the driver found the persistent memory region (its configuration
/// space). The contents are in the host's backing file, not in the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PmemState {
    /// Guest-physical address of the region.
    pub start: u64,
    /// Its length in bytes (the backing file's size, rounded up to 2 MiB).
    pub size: u64,
}

/// virtio-mem: the size the host requested, the usable region the driver was shown, and the
/// plugged blocks as runs `(first block, count)`. The plugged memory itself is in guest
/// memory (the region is part of it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemState {
    pub requested_size: u64,
    pub usable_region_size: u64,
    pub plugged: Vec<(u64, u64)>,
}

/// Why a device refuses a saved [`DeviceState`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceStateError {
    #[error("{device} cannot take {saved} device state")]
    Kind {
        device: &'static str,
        saved: &'static str,
    },
    #[error("the MAC address {0:02x?} is not unicast")]
    NotUnicast([u8; 6]),
    #[error("{saved} active queue pairs where the device has 1 to {max}")]
    ActivePairs { saved: u16, max: u16 },
    #[error(
        "the pmem region was {saved_size:#x} bytes at {saved_start:#x}, now {size:#x} bytes at {start:#x} (did the backing file change size?)"
    )]
    PmemRegion {
        saved_start: u64,
        saved_size: u64,
        start: u64,
        size: u64,
    },
    #[error("virtio-mem state does not fit the device's region: {0}")]
    Mem(String),
}

impl DeviceStateError {
    /// `device` was given another device's state.
    pub fn kind(device: &'static str, saved: &DeviceState) -> Self {
        DeviceStateError::Kind {
            device,
            saved: saved.kind(),
        }
    }
}

/// Why a saved queue does not fit the device's queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueStateError {
    #[error("maximum size {saved} where this device has {actual}")]
    MaxSize { saved: u16, actual: u16 },
    #[error("invalid queue configuration")]
    Invalid(#[from] virtio_queue::Error),
}

/// Why a saved PCI function state does not fit this function.
#[derive(Debug, thiserror::Error)]
pub enum PciStateError {
    #[error("config vector {0}")]
    ConfigVector(u16),
    #[error("queue vector {0}")]
    QueueVector(u16),
    #[error("configuration space")]
    Config(#[from] vessel_pci::ConfigStateError),
    #[error("MSI-X")]
    Msix(#[from] vessel_pci::MsixStateError),
}

/// Why a transport's device cannot be quiesced, or its saved state (transport registers,
/// queues, device state) saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{0}: the device could not be stopped")]
    Quiesce(&'static str),
    #[error("{0}: the device is running; quiesce it before saving its state")]
    Running(&'static str),
    #[error("{0}: the device was already set up by a driver; restore into a fresh device")]
    NotFresh(&'static str),
    #[error("{0}: the saved state is for another transport")]
    Transport(&'static str),
    #[error("the saved device is of type {saved}, this one of type {actual}")]
    DeviceType { saved: u32, actual: u32 },
    #[error("{name}: the saved device has {saved} queues, this one {actual}")]
    QueueCount {
        name: &'static str,
        saved: usize,
        actual: usize,
    },
    #[error("{name}: saved queue {index}")]
    Queue {
        name: &'static str,
        index: usize,
        #[source]
        source: QueueStateError,
    },
    #[error("{name}: the saved driver features {features:#x} were accepted but this device offers only {offered:#x}")]
    Features {
        name: &'static str,
        features: u64,
        offered: u64,
    },
    #[error("{name}: device state")]
    Device {
        name: &'static str,
        #[source]
        source: DeviceStateError,
    },
    #[error("{name}: PCI state")]
    Pci {
        name: &'static str,
        #[source]
        source: PciStateError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::status;
    use crate::device::{
        features, ActivateContext, ActivateError, ActiveQueue, DeviceHealth, VirtioDevice,
        VirtioInterrupt,
    };
    use crate::mmio::MmioTransport;
    use crate::worker::{consume, drain_queue, EventHandler, Worker, WorkerControl};
    use std::os::unix::io::AsRawFd;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use vessel_devices::BusDevice;
    use vessel_memory::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::epoll::EventSet;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const QSIZE: u16 = 16;
    const Q0: u64 = 0x4000;

    /// A device that answers every chain with its own count of served chains as the used
    /// length, and keeps that count as its device state.
    struct Counter {
        served: Arc<AtomicU32>,
        worker: Option<Worker>,
        queues: Vec<u16>,
    }

    impl Counter {
        fn new(queues: usize) -> Self {
            Counter {
                served: Arc::new(AtomicU32::new(0)),
                worker: None,
                queues: vec![QSIZE; queues],
            }
        }
    }

    struct CounterHandler {
        q: ActiveQueue,
        mem: GuestMemoryMmap,
        irq: Arc<dyn VirtioInterrupt>,
        health: DeviceHealth,
        served: Arc<AtomicU32>,
    }

    impl EventHandler for CounterHandler {
        fn handle_event(
            &mut self,
            _: u64,
            _: EventSet,
            _: &mut WorkerControl,
        ) -> std::io::Result<()> {
            consume(&self.q.kick);
            let served = &self.served;
            drain_queue(
                &mut self.q.queue,
                0,
                &self.mem,
                self.irq.as_ref(),
                &self.health,
                |_| served.fetch_add(1, Ordering::SeqCst) + 1,
            );
            Ok(())
        }
    }

    impl VirtioDevice for Counter {
        fn device_type(&self) -> u32 {
            4
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.queues
        }
        fn avail_features(&self) -> u64 {
            features::COMMON
        }
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
            let q = ctx.take_queue(0).ok_or(ActivateError::MissingQueue(0))?;
            let fds = [(q.kick.as_raw_fd(), 0, EventSet::IN)];
            let h = CounterHandler {
                q,
                mem: ctx.mem,
                irq: ctx.interrupt,
                health: ctx.health,
                served: self.served.clone(),
            };
            self.worker = Some(Worker::spawn("counter", &fds, h).map_err(ActivateError::Worker)?);
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.worker = None;
            true
        }
        fn name(&self) -> &'static str {
            "counter"
        }
        fn save_device_state(&self) -> DeviceState {
            DeviceState::Counter {
                served: self.served.load(Ordering::SeqCst),
            }
        }
        fn restore_device_state(&mut self, v: &DeviceState) -> Result<(), DeviceStateError> {
            let DeviceState::Counter { served } = v else {
                return Err(DeviceStateError::kind(self.name(), v));
            };
            self.served.store(*served, Ordering::SeqCst);
            Ok(())
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// The driver's side of queue 0: descriptor table, available and used rings.
    struct Ring<'a> {
        mem: &'a GuestMemoryMmap,
        added: u16,
    }

    impl Ring<'_> {
        const DESC: u64 = Q0;
        const AVAIL: u64 = Q0 + 0x100;
        const USED: u64 = Q0 + 0x200;

        fn add(&mut self) -> u16 {
            let head = self.added % QSIZE;
            let d = Self::DESC + 16 * u64::from(head);
            let m = self.mem;
            m.write_obj(0x8_0000u64 + 0x100 * u64::from(head), GuestAddress(d))
                .unwrap();
            m.write_obj(0x100u32, GuestAddress(d + 8)).unwrap();
            m.write_obj(2u16, GuestAddress(d + 12)).unwrap(); // device-writable
            let slot = Self::AVAIL + 4 + 2 * u64::from(self.added % QSIZE);
            m.write_obj(head, GuestAddress(slot)).unwrap();
            self.added = self.added.wrapping_add(1);
            m.write_obj(self.added, GuestAddress(Self::AVAIL + 2))
                .unwrap();
            head
        }

        fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(Self::USED + 2)).unwrap()
        }

        fn used(&self, i: u16) -> (u32, u32) {
            let e = Self::USED + 4 + 8 * u64::from(i % QSIZE);
            (
                self.mem.read_obj(GuestAddress(e)).unwrap(),
                self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
            )
        }

        fn wait_used(&self, n: u16) {
            let end = Instant::now() + Duration::from_secs(20);
            while self.used_idx() != n {
                assert!(Instant::now() < end, "timed out waiting for used index {n}");
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn transport(m: &GuestMemoryMmap, dev: Counter) -> (MmioTransport, EventFd) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(Box::new(dev), m.clone(), irq.try_clone().unwrap()).unwrap();
        (t, irq)
    }

    /// The driver's probe: features, queue 0 at `Q0`, DRIVER_OK.
    fn probe(t: &mut MmioTransport) {
        let s = |v: u8| u32::from(v);
        wr(t, 0x70, s(status::ACKNOWLEDGE | status::DRIVER));
        wr(t, 0x24, 1);
        wr(t, 0x20, 1); // VERSION_1
        wr(
            t,
            0x70,
            s(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
        );
        wr(t, 0x30, 0);
        wr(t, 0x38, u32::from(QSIZE));
        wr(t, 0x80, Ring::DESC as u32);
        wr(t, 0x90, Ring::AVAIL as u32);
        wr(t, 0xa0, Ring::USED as u32);
        wr(t, 0x44, 1);
        let all = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        wr(t, 0x70, s(all));
        assert!(t.common().is_active());
    }

    fn round_trip(s: &MmioTransportState) -> MmioTransportState {
        serde_json::from_str(&serde_json::to_string(s).unwrap()).unwrap()
    }

    #[test]
    fn restore_into_a_fresh_device_continues_the_rings() {
        let m = mem();
        let mut ring = Ring { mem: &m, added: 0 };
        let (mut t, _) = transport(&m, Counter::new(1));
        probe(&mut t);
        ring.add();
        ring.add();
        wr(&mut t, 0x50, 0);
        ring.wait_used(2);
        // Made available, never kicked: the restored device must still serve it.
        ring.add();
        t.quiesce().unwrap();
        assert!(!t.common().is_active());
        assert!(t.common().is_quiesced());
        let state = round_trip(&t.save_state().unwrap());
        assert_eq!(state.common.device, DeviceState::Counter { served: 2 });
        assert_eq!(state.common.queues[0].desc, Ring::DESC);
        drop(t);

        let (mut fresh, irq) = transport(&m, Counter::new(1));
        fresh.restore_state(&state).unwrap();
        assert!(fresh.common().is_active());
        assert_eq!(rd(&mut fresh, 0x70), u32::from(state.common.status));
        ring.wait_used(3);
        ring.add();
        wr(&mut fresh, 0x50, 0);
        ring.wait_used(4);
        // The count went on from the saved one, the used ring from where it was.
        assert_eq!(ring.used(2), (2, 3));
        assert_eq!(ring.used(3), (3, 4));
        assert!(irq.read().unwrap() > 0);
    }

    #[test]
    fn quiesce_and_resume_in_place() {
        let m = mem();
        let mut ring = Ring { mem: &m, added: 0 };
        let (mut t, _) = transport(&m, Counter::new(1));
        probe(&mut t);
        ring.add();
        wr(&mut t, 0x50, 0);
        ring.wait_used(1);
        t.quiesce().unwrap();
        // Nothing is served while quiesced...
        ring.add();
        wr(&mut t, 0x50, 0);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(ring.used_idx(), 1);
        assert!(t.common().save_state().is_ok());
        // ...and everything once resumed.
        t.resume();
        assert!(t.common().is_active());
        ring.wait_used(2);
        assert_eq!(ring.used(1), (1, 2));
        // Saving a running device is refused.
        assert!(matches!(t.save_state(), Err(StateError::Running(_))));
        // A guest reset after a quiesce works as usual.
        t.quiesce().unwrap();
        wr(&mut t, 0x70, 0);
        assert_eq!(rd(&mut t, 0x70), 0);
        assert!(!t.common().is_quiesced());
    }

    #[test]
    fn mismatched_states_are_refused_untouched() {
        let m = mem();
        let (mut t, _) = transport(&m, Counter::new(1));
        probe(&mut t);
        t.quiesce().unwrap();
        let state = t.save_state().unwrap();

        let mut other_type = state.clone();
        other_type.common.device_type = 2;
        let (mut fresh, _) = transport(&m, Counter::new(1));
        assert!(matches!(
            fresh.restore_state(&other_type),
            Err(StateError::DeviceType {
                saved: 2,
                actual: 4
            })
        ));
        let (mut two, _) = transport(&m, Counter::new(2));
        let e = two.restore_state(&state).unwrap_err();
        assert!(matches!(
            e,
            StateError::QueueCount {
                saved: 1,
                actual: 2,
                ..
            }
        ));
        assert!(e.to_string().contains("1 queues"), "{e}");
        let mut bad_queue = state.clone();
        bad_queue.common.queues[0].size = 3;
        assert!(matches!(
            fresh.restore_state(&bad_queue),
            Err(StateError::Queue { index: 0, .. })
        ));
        let mut bad_features = state.clone();
        bad_features.common.driver_features |= 1 << 40;
        assert!(matches!(
            fresh.restore_state(&bad_features),
            Err(StateError::Features { .. })
        ));
        let mut bad_device = state.clone();
        bad_device.common.device = DeviceState::Console(ConsoleState { cols: 1, rows: 2 });
        assert!(matches!(
            fresh.restore_state(&bad_device),
            Err(StateError::Device { .. })
        ));
        // Nothing was applied: the device is as built, and a good state still goes in.
        assert_eq!(rd(&mut fresh, 0x70), 0);
        assert!(!fresh.common().is_active());
        fresh.restore_state(&state).unwrap();
        assert!(fresh.common().is_active());
        // A device the driver already set up is not a restore target.
        let mut again = round_trip(&state);
        again.interrupt_status = 0;
        assert!(matches!(
            fresh.restore_state(&again),
            Err(StateError::NotFresh(_))
        ));
    }

    #[test]
    fn hostile_used_index_marks_the_device_broken() {
        let m = mem();
        let mut ring = Ring { mem: &m, added: 0 };
        let (mut t, _) = transport(&m, Counter::new(1));
        probe(&mut t);
        ring.add();
        wr(&mut t, 0x50, 0);
        ring.wait_used(1);
        t.quiesce().unwrap();
        let state = t.save_state().unwrap();
        drop(t);
        // The guest scribbles over used->idx: far beyond avail->idx.
        m.write_obj(0x8000u16, GuestAddress(Ring::USED + 2))
            .unwrap();
        let (mut fresh, irq) = transport(&m, Counter::new(1));
        fresh.restore_state(&state).unwrap();
        assert!(!fresh.common().is_active());
        assert_ne!(rd(&mut fresh, 0x70) as u8 & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(
            rd(&mut fresh, 0x60),
            3,
            "the saved used-ring bit and a config interrupt"
        );
        assert_eq!(irq.read().unwrap(), 2);
        // The driver resets it and starts over.
        wr(&mut fresh, 0x70, 0);
        m.write_obj(0u16, GuestAddress(Ring::USED + 2)).unwrap();
        m.write_obj(0u16, GuestAddress(Ring::AVAIL + 2)).unwrap();
        probe(&mut fresh);
    }

    #[test]
    fn broken_and_idle_devices_round_trip() {
        let m = mem();
        // Never probed: restores to a device that is not running.
        let (t, _) = transport(&m, Counter::new(1));
        let idle = round_trip(&t.save_state().unwrap());
        let (mut fresh, _) = transport(&m, Counter::new(1));
        fresh.restore_state(&idle).unwrap();
        assert!(!fresh.common().is_active());
        assert_eq!(rd(&mut fresh, 0x70), 0);
        // Saved broken: restored broken, without a new interrupt, not running.
        let (mut t, _) = transport(&m, Counter::new(1));
        probe(&mut t);
        t.quiesce().unwrap();
        let mut state = t.save_state().unwrap();
        state.common.broken = true;
        let (mut fresh, irq) = transport(&m, Counter::new(1));
        fresh.restore_state(&state).unwrap();
        assert!(!fresh.common().is_active());
        assert_ne!(rd(&mut fresh, 0x70) as u8 & status::DEVICE_NEEDS_RESET, 0);
        assert!(irq.read().is_err(), "no interrupt");
    }

    #[test]
    fn device_states_parse_from_the_json_snapshot_files_hold() {
        let parse = |j: &str| serde_json::from_str::<DeviceState>(j).unwrap();
        assert_eq!(parse("null"), DeviceState::None);
        assert_eq!(
            parse(r#"{"mac":[2,0,0,0,0,1],"active_pairs":2}"#),
            DeviceState::Net(NetState {
                mac: [2, 0, 0, 0, 0, 1],
                active_pairs: 2
            })
        );
        assert_eq!(
            parse(r#"{"cols":80,"rows":25}"#),
            DeviceState::Console(ConsoleState { cols: 80, rows: 25 })
        );
        assert_eq!(
            parse(r#"{"num_pages":256,"actual":128}"#),
            DeviceState::Balloon(BalloonState {
                num_pages: 256,
                actual: 128,
                hint_cmd_id: 0
            })
        );
        assert_eq!(
            parse(r#"{"num_pages":256,"actual":128,"hint_cmd_id":7}"#),
            DeviceState::Balloon(BalloonState {
                num_pages: 256,
                actual: 128,
                hint_cmd_id: 7
            })
        );
        // And they are written back in the same shape.
        for j in [
            "null",
            r#"{"mac":[2,0,0,0,0,1],"active_pairs":2}"#,
            r#"{"cols":80,"rows":25}"#,
            r#"{"num_pages":256,"actual":128}"#,
            r#"{"num_pages":256,"actual":128,"hint_cmd_id":7}"#,
        ] {
            assert_eq!(serde_json::to_string(&parse(j)).unwrap(), j);
        }
        // A common state without a device state (older files) has none.
        let mut common = serde_json::to_value(VirtioCommonState {
            device_type: 1,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            config_generation: 0,
            queues: Vec::new(),
            broken: false,
            device: DeviceState::Balloon(BalloonState {
                num_pages: 1,
                actual: 1,
                hint_cmd_id: 0,
            }),
        })
        .unwrap();
        common.as_object_mut().unwrap().remove("device");
        let common: VirtioCommonState = serde_json::from_value(common).unwrap();
        assert_eq!(common.device, DeviceState::None);
    }

    #[test]
    fn wrong_device_state_shapes_are_refused_clearly() {
        for bad in [
            r#"{"mac":[2,0,0,0,0,1]}"#,
            r#"{"mac":[2,0,0,0,0],"active_pairs":1}"#,
            r#"{"cols":80,"rows":25,"extra":1}"#,
            r#"{"num_pages":-1,"actual":0}"#,
            r#"{"cols":70000,"rows":25}"#,
            r#""nonsense""#,
            "{}",
        ] {
            let e = serde_json::from_str::<DeviceState>(bad).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("a virtio device state"), "{bad}: {msg}");
            assert!(msg.contains("(balloon)"), "{bad}: {msg}");
        }
        // A device refuses another device's state, and says which.
        let e = DeviceStateError::kind(
            "virtio-rng",
            &DeviceState::Console(ConsoleState { cols: 1, rows: 1 }),
        );
        assert_eq!(
            e.to_string(),
            "virtio-rng cannot take a virtio-console device state"
        );
    }
}
