//! The device against mock guest memory: requests through a real split queue, slots through
//! a recording [`MemorySlots`], discards checked in memory.

use std::sync::{Arc, Mutex};

use vessel_virtio::{features, InterruptCause, VirtioDevice};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::wire::{Request, RESP_ACK, RESP_ERROR, RESP_NACK, STATE_MIXED, STATE_PLUGGED};
use super::*;
use crate::rng::testing::*;

const MIB: u64 = 1 << 20;
/// The device region: 16 MiB at 16 MiB, 2 MiB blocks, 4 MiB slots.
const BASE: u64 = 16 * MIB;
const REQ_AT: u64 = 0x8_0000;
const RESP_AT: u64 = 0x9_0000;

fn geometry() -> MemGeometry {
    MemGeometry {
        addr: BASE,
        region_size: 16 * MIB,
        block_size: 2 * MIB,
        slot_size: 4 * MIB,
    }
}

/// RAM at 0 (queues and buffers) and the device's region.
fn guest() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x10_0000),
        (GuestAddress(BASE), (16 * MIB) as usize),
    ])
    .unwrap()
}

/// Records slot changes; fails to map the slots listed in `refuse`.
#[derive(Default)]
struct Slots {
    log: Mutex<Vec<(usize, bool)>>,
    refuse: Vec<usize>,
}

impl MemorySlots for Slots {
    fn set_slot(&self, index: usize, present: bool) -> io::Result<()> {
        if present && self.refuse.contains(&index) {
            return Err(io::Error::other("no slot"));
        }
        self.log.lock().unwrap().push((index, present));
        Ok(())
    }
}

impl Slots {
    fn take(&self) -> Vec<(usize, bool)> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

struct Rig {
    mem: GuestMemoryMmap,
    shared: Arc<Shared>,
    slots: Arc<Slots>,
}

impl Rig {
    fn new(slots: Slots) -> Rig {
        let slots = Arc::new(slots);
        let dev = VirtioMem::new(geometry(), slots.clone()).unwrap();
        // The rig is the driver's side of the queue: the device counts as set up.
        dev.shared.lock().active = true;
        Rig {
            mem: guest(),
            shared: dev.shared.clone(),
            slots,
        }
    }

    fn handle(&self) -> MemHandle {
        MemHandle(self.shared.clone())
    }

    /// Sends `req` through a fresh queue; returns (used length, response bytes).
    fn send(&self, bufs: &[Buf], req: Option<Request>) -> (u32, [u8; RESPONSE_LEN]) {
        let m = &self.mem;
        m.write_slice(&[0xee; RESPONSE_LEN], GuestAddress(RESP_AT))
            .unwrap();
        if let Some(r) = req {
            m.write_slice(&r.to_bytes(), GuestAddress(REQ_AT)).unwrap();
        }
        let vq = MockSplitQueue::new(m, 16);
        add_chain(&vq, 0, bufs);
        let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        let health = DeviceHealth::new(irq.clone());
        let shared = &*self.shared;
        let slots = &*self.slots;
        drain_queue(&mut q, 0, m, irq.as_ref(), &health, |c| {
            serve_chain(m, c, shared, slots)
        });
        assert!(!health.is_broken());
        let used = used(&vq);
        assert_eq!(used.len(), 1, "one chain completed");
        let mut out = [0u8; RESPONSE_LEN];
        m.read_slice(&mut out, GuestAddress(RESP_AT)).unwrap();
        (used[0].1, out)
    }

    /// A well-formed request: its response type (and state).
    fn ask(&self, req: Request) -> (u8, u8) {
        let (len, out) = self.send(
            &[
                (REQ_AT, REQUEST_LEN as u32, false),
                (RESP_AT, RESPONSE_LEN as u32, true),
            ],
            Some(req),
        );
        assert_eq!(len, RESPONSE_LEN as u32);
        (out[0], out[8])
    }
}

fn plug(addr: u64, nb_blocks: u16) -> Request {
    Request::Plug { addr, nb_blocks }
}

fn unplug(addr: u64, nb_blocks: u16) -> Request {
    Request::Unplug { addr, nb_blocks }
}

#[test]
fn plug_maps_slots_and_unplug_unmaps_and_discards() {
    let rig = Rig::new(Slots::default());
    rig.handle().set_requested_size(8 * MIB).unwrap();
    // Blocks 1 and 2 straddle slots 0 and 1.
    let at = BASE + 2 * MIB;
    assert_eq!(rig.ask(plug(at, 2)).0, RESP_ACK as u8);
    assert_eq!(rig.slots.take(), vec![(0, true), (1, true)]);
    assert_eq!(rig.handle().status().plugged_size, 4 * MIB);
    assert_eq!(
        rig.ask(Request::State {
            addr: at,
            nb_blocks: 2
        }),
        (RESP_ACK as u8, STATE_PLUGGED as u8)
    );
    assert_eq!(
        rig.ask(Request::State {
            addr: BASE,
            nb_blocks: 2
        }),
        (RESP_ACK as u8, STATE_MIXED as u8)
    );
    // The guest fills block 2; unplugging it drops its pages (they read as zero again).
    rig.mem
        .write_slice(&[0x5a; 4096], GuestAddress(at + 2 * MIB))
        .unwrap();
    assert_eq!(rig.ask(unplug(at + 2 * MIB, 1)).0, RESP_ACK as u8);
    assert_eq!(rig.slots.take(), vec![(1, false)]);
    assert_eq!(read_bytes(&rig.mem, at + 2 * MIB, 4096), vec![0; 4096]);
    let st = rig.handle().status();
    assert_eq!((st.plugged_size, st.counters.plugs), (2 * MIB, 1));
    assert_eq!((st.counters.unplugs, st.counters.refused), (1, 0));
}

#[test]
fn plugs_past_the_request_are_nacked_and_bad_ranges_errored() {
    let rig = Rig::new(Slots::default());
    rig.handle().set_requested_size(2 * MIB).unwrap();
    assert_eq!(rig.ask(plug(BASE, 2)).0, RESP_NACK as u8);
    assert_eq!(rig.ask(plug(BASE + 4096, 1)).0, RESP_ERROR as u8);
    // Past the usable region (4 MiB: one slot).
    assert_eq!(rig.ask(plug(BASE + 4 * MIB, 1)).0, RESP_ERROR as u8);
    assert_eq!(rig.ask(plug(0, 1)).0, RESP_ERROR as u8);
    assert_eq!(rig.ask(unplug(BASE, 1)).0, RESP_ERROR as u8);
    assert_eq!(rig.ask(Request::Unknown(77)).0, RESP_ERROR as u8);
    assert!(rig.slots.take().is_empty());
    assert_eq!(rig.handle().status().counters.refused, 6);
    assert_eq!(rig.handle().status().plugged_size, 0);
}

#[test]
fn a_plug_the_host_cannot_map_is_undone() {
    let rig = Rig::new(Slots {
        refuse: vec![1],
        ..Default::default()
    });
    rig.handle().set_requested_size(8 * MIB).unwrap();
    // Slot 0 is mapped, slot 1 refused: slot 0 is unmapped again and nothing is plugged.
    assert_eq!(rig.ask(plug(BASE + 2 * MIB, 2)).0, RESP_ERROR as u8);
    assert_eq!(rig.slots.take(), vec![(0, true), (0, false)]);
    let st = rig.handle().status();
    assert_eq!((st.plugged_size, st.counters.host_failures), (0, 1));
    assert_eq!(rig.ask(plug(BASE, 1)).0, RESP_ACK as u8);
}

#[test]
fn unplug_all_unmaps_every_used_slot() {
    let rig = Rig::new(Slots::default());
    rig.handle().set_requested_size(16 * MIB).unwrap();
    assert_eq!(rig.ask(plug(BASE, 1)).0, RESP_ACK as u8);
    assert_eq!(rig.ask(plug(BASE + 12 * MIB, 2)).0, RESP_ACK as u8);
    rig.slots.take();
    assert_eq!(rig.ask(Request::UnplugAll).0, RESP_ACK as u8);
    assert_eq!(rig.slots.take(), vec![(0, false), (3, false)]);
    assert_eq!(rig.handle().status().plugged_size, 0);
}

#[test]
fn hostile_chains_get_errors_or_nothing_and_never_break_the_device() {
    let rig = Rig::new(Slots::default());
    rig.handle().set_requested_size(16 * MIB).unwrap();
    let req = Some(plug(BASE, 1));
    let resp = (RESP_AT, RESPONSE_LEN as u32, true);
    // A short request: ERROR.
    let (len, out) = rig.send(&[(REQ_AT, 8, false), resp], req);
    assert_eq!((len, out[0]), (RESPONSE_LEN as u32, RESP_ERROR as u8));
    // A request outside guest memory: ERROR.
    let (len, out) = rig.send(&[(0x4000_0000, REQUEST_LEN as u32, false), resp], req);
    assert_eq!((len, out[0]), (RESPONSE_LEN as u32, RESP_ERROR as u8));
    // No response buffer, one too small, one outside memory: completed with nothing.
    for bufs in [
        vec![(REQ_AT, REQUEST_LEN as u32, false)],
        vec![(REQ_AT, REQUEST_LEN as u32, false), (RESP_AT, 4, true)],
        vec![
            (REQ_AT, REQUEST_LEN as u32, false),
            (u64::MAX - 4, RESPONSE_LEN as u32, true),
        ],
    ] {
        let (len, out) = rig.send(&bufs, req);
        assert_eq!(len, 0);
        assert_eq!(
            out, [0xee; RESPONSE_LEN],
            "the response buffer is untouched"
        );
        assert_eq!(rig.handle().status().plugged_size, 0, "not carried out");
    }
    // A request split over two buffers is read whole.
    let (len, out) = rig.send(&[(REQ_AT, 10, false), (REQ_AT + 10, 14, false), resp], req);
    assert_eq!((len, out[0]), (RESPONSE_LEN as u32, RESP_ACK as u8));
    assert_eq!(rig.handle().status().plugged_size, 2 * MIB);
}

#[test]
fn the_device_serves_kicks_and_announces_new_sizes() {
    let m = guest();
    let vq = MockSplitQueue::new(&m, 16);
    let irq = Arc::new(CountingInterrupt::default());
    let aq = active_queue(&vq, 0);
    let kick = aq.kick.try_clone().unwrap();
    let slots = Arc::new(Slots::default());
    let mut dev = VirtioMem::new(geometry(), slots.clone()).unwrap();
    assert_eq!(dev.device_type(), 24);
    assert_ne!(dev.avail_features() & F_UNPLUGGED_INACCESSIBLE, 0);
    let h = dev.handle();
    // Before activation, no driver would answer: refused, in Firecracker's words.
    assert_eq!(h.set_requested_size(4 * MIB), Err(SizeError::NotActive));
    assert_eq!(SizeError::NotActive.to_string(), "Device is not active");
    let mut cfg = [0u8; 8];
    dev.read_config(48, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 0);
    dev.activate(context(&m, features::COMMON, vec![aq], &irq))
        .unwrap();
    h.set_requested_size(4 * MIB).unwrap();
    dev.read_config(48, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 4 * MIB);
    h.set_requested_size(8 * MIB).unwrap();
    assert_eq!(irq.count(InterruptCause::Config), 2);
    assert_eq!(
        h.set_requested_size(3 * MIB),
        Err(SizeError::InvalidSize(3 * MIB))
    );
    m.write_slice(&plug(BASE, 2).to_bytes(), GuestAddress(REQ_AT))
        .unwrap();
    add_chain(
        &vq,
        0,
        &[
            (REQ_AT, REQUEST_LEN as u32, false),
            (RESP_AT, RESPONSE_LEN as u32, true),
        ],
    );
    kick.write(1).unwrap();
    wait_until("the plug request", || vq.used().idx().load() == 1);
    assert_eq!(used(&vq), vec![(0, RESPONSE_LEN as u32)]);
    assert_eq!(h.status().plugged_size, 4 * MIB);
    dev.read_config(40, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 4 * MIB, "plugged_size in config");
    // A snapshot's quiesce keeps the device active; the size changes, the interrupt waits
    // for the device to run again.
    assert!(dev.quiesce());
    h.set_requested_size(2 * MIB).unwrap();
    assert_eq!(irq.count(InterruptCause::Config), 2);
    // A reset keeps what is plugged, and the device is not active until set up again.
    assert!(dev.reset());
    assert_eq!(h.status().plugged_size, 4 * MIB);
    assert_eq!(h.set_requested_size(0), Err(SizeError::NotActive));
    assert_eq!(irq.count(InterruptCause::Config), 2);
}

#[test]
fn state_is_saved_and_restored_with_its_slots() {
    let rig = Rig::new(Slots::default());
    rig.handle().set_requested_size(12 * MIB).unwrap();
    assert_eq!(rig.ask(plug(BASE, 1)).0, RESP_ACK as u8);
    assert_eq!(rig.ask(plug(BASE + 8 * MIB, 2)).0, RESP_ACK as u8);
    let dev = VirtioMem {
        shared: rig.shared.clone(),
        slots: rig.slots.clone(),
        worker: None,
    };
    let saved = dev.save_device_state();
    assert_eq!(
        saved,
        DeviceState::Mem(MemState {
            requested_size: 12 * MIB,
            usable_region_size: 12 * MIB,
            plugged: vec![(0, 1), (4, 2)],
        })
    );
    // Through JSON, as in a state file.
    let text = serde_json::to_string(&saved).unwrap();
    let back: DeviceState = serde_json::from_str(&text).unwrap();
    assert_eq!(back, saved);
    let slots = Arc::new(Slots::default());
    let mut fresh = VirtioMem::new(geometry(), slots.clone()).unwrap();
    fresh.restore_device_state(&back).unwrap();
    assert_eq!(slots.take(), vec![(0, true), (2, true)]);
    let st = fresh.handle().status();
    assert_eq!((st.plugged_size, st.requested_size), (6 * MIB, 12 * MIB));
    // A state that does not fit is refused and changes nothing; so is a slot KVM refuses.
    let bad = DeviceState::Mem(MemState {
        requested_size: 12 * MIB,
        usable_region_size: 12 * MIB,
        plugged: vec![(7, 2)],
    });
    let mut other = VirtioMem::new(geometry(), slots.clone()).unwrap();
    assert!(matches!(
        other.restore_device_state(&bad),
        Err(DeviceStateError::Mem(_))
    ));
    assert!(other.restore_device_state(&DeviceState::None).is_err());
    let refusing = Arc::new(Slots {
        refuse: vec![2],
        ..Default::default()
    });
    let mut third = VirtioMem::new(geometry(), refusing.clone()).unwrap();
    assert!(third.restore_device_state(&saved).is_err());
    assert_eq!(refusing.take(), vec![(0, true), (0, false)]);
    assert_eq!(third.handle().status().plugged_size, 0);
    assert_eq!(other.handle().status().plugged_size, 0);
}
