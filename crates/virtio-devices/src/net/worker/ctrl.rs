//! The control queue: multiqueue (`VQ_PAIRS_SET`: which queue pairs receive) and the
//! receive filters, which are accepted and have no effect.

use std::io;

use vessel_memory::GuestMemoryMmap;
use vessel_virtio::worker::{consume, drain_queue};
use vessel_virtio::ErrorChain;
use virtio_bindings::virtio_net as vn;
use virtio_queue::DescriptorChain;
use vm_memory::Bytes;

use super::{NetHandler, TapPoll, Tokens};

impl NetHandler {
    /// Serves the control queue.
    pub(in crate::net) fn process_ctrl(&mut self, ctl: &mut dyn TapPoll) {
        let Some(cq) = self.ctrl.as_mut() else { return };
        consume(&cq.kick);
        let mem = &self.mem;
        let pairs = &mut self.pairs;
        let mq = self.mq;
        let stats = &mut self.stats;
        let mut enable = None;
        drain_queue(
            &mut cq.queue,
            cq.index,
            mem,
            self.interrupt.as_ref(),
            &self.health,
            |chain| {
                let (ack, new_pairs) = ctrl_command(mem, chain.clone(), mq, pairs.len());
                if new_pairs.is_some() {
                    enable = new_pairs;
                }
                match ack.and_then(|a| write_ack(mem, chain, a)) {
                    Some(()) => 1,
                    None => {
                        stats.bad_chains += 1;
                        0
                    }
                }
            },
        );
        if let Some(n) = enable {
            self.set_active_pairs(n, ctl);
        }
    }

    /// Uses the first `n` queue pairs for receiving (attaching their TAP queues) and detaches
    /// the others.
    pub(in crate::net) fn set_active_pairs(&mut self, n: usize, ctl: &mut dyn TapPoll) {
        for p in 0..self.pairs.len() {
            let on = p < n;
            let pair = &mut self.pairs[p];
            if pair.enabled == on {
                continue;
            }
            pair.enabled = on;
            if let Err(e) = pair.backend.set_queue_enabled(on) {
                log::warn!("virtio-net: {}", ErrorChain(&e));
            }
            if pair.rx.is_some() && pair.tap_polled != on {
                ctl.set_tap_polled(&pair.backend, Tokens::tap(p as u64), on);
                pair.tap_polled = on;
            }
            if on {
                self.process_rx(p, ctl);
            }
        }
    }
}

/// Decodes a control command; returns the ack (`None` for a malformed chain) and, for
/// `VQ_PAIRS_SET`, the number of pairs to use.
fn ctrl_command(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    mq: bool,
    max_pairs: usize,
) -> (Option<u8>, Option<usize>) {
    let Ok(mut reader) = chain.reader(mem) else {
        return (None, None);
    };
    let mut cmd = [0u8; 2];
    if io::Read::read_exact(&mut reader, &mut cmd).is_err() {
        return (None, None);
    }
    let ok = vn::VIRTIO_NET_OK as u8;
    let err = vn::VIRTIO_NET_ERR as u8;
    match (u32::from(cmd[0]), u32::from(cmd[1])) {
        (vn::VIRTIO_NET_CTRL_MQ, vn::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => {
            let mut v = [0u8; 2];
            if !mq || io::Read::read_exact(&mut reader, &mut v).is_err() {
                return (Some(err), None);
            }
            let n = usize::from(u16::from_le_bytes(v));
            if n == 0 || n > max_pairs {
                (Some(err), None)
            } else {
                (Some(ok), Some(n))
            }
        }
        // We receive everything the TAP gives; filters are accepted and have no effect.
        (vn::VIRTIO_NET_CTRL_RX, _)
        | (vn::VIRTIO_NET_CTRL_MAC, _)
        | (vn::VIRTIO_NET_CTRL_VLAN, _) => (Some(ok), None),
        (vn::VIRTIO_NET_CTRL_ANNOUNCE, vn::VIRTIO_NET_CTRL_ANNOUNCE_ACK) => (Some(ok), None),
        _ => (Some(err), None),
    }
}

fn write_ack(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    ack: u8,
) -> Option<()> {
    // The ack is the first (normally only) device-writable byte.
    let desc = chain.into_iter().find(|d| d.is_write_only())?;
    if desc.len() == 0 {
        return None;
    }
    mem.write_obj(ack, desc.addr()).ok()
}
