//! Receiving frames the worker holds in its own memory (MMDS answers, frames from passt):
//! a plain virtio-net header and a copy of the frame into the guest's receive buffers.

use virtio_queue::{QueueOwnedT, QueueT};

use super::{gather_rx_buffers, write_iovs, Gathered, RxBuffers, VNET_HDR_LEN};

/// What became of one frame.
pub(super) enum Delivery {
    Delivered,
    NoBuffers,
    Broken,
}

/// Copies `frame` behind a header without offloads (its checksums are complete) into the
/// receive chains of `b`'s queue, merged when negotiated; without merged buffers a frame
/// takes one chain and is cut to its size, like the TAP's.
pub(super) fn deliver_copy(mut b: RxBuffers<'_>, frame: &[u8]) -> Delivery {
    let total = VNET_HDR_LEN + frame.len();
    let need = if b.mrg_rxbuf { total } else { 1 };
    let capacity = match gather_rx_buffers(&mut b, need) {
        Gathered::Ready(c) => c,
        Gathered::NoBuffers => return Delivery::NoBuffers,
        Gathered::Broken => return Delivery::Broken,
    };
    let RxBuffers {
        q,
        qindex,
        mem,
        iovs,
        chains,
        health,
        ..
    } = b;
    let written = total.min(capacity);
    let mut used = 0usize;
    let mut left = written;
    for &(_, len, _) in chains.iter() {
        if left == 0 {
            break;
        }
        left = left.saturating_sub(len);
        used += 1;
    }
    for _ in used..chains.len() {
        q.go_to_previous_position();
    }
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[10..].copy_from_slice(&(used as u16).to_le_bytes());
    write_iovs(&iovs.0, 0, &hdr);
    write_iovs(&iovs.0, VNET_HDR_LEN, frame);
    let mut left = written;
    for &(head, len, _) in &chains[..used] {
        let this = left.min(len);
        left -= this;
        if let Err(e) = q.add_used(mem, head, this as u32) {
            health.mark_broken(&format_args!("queue {qindex}: {e}"));
            return Delivery::Broken;
        }
    }
    Delivery::Delivered
}
