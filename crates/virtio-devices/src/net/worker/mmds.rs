//! MMDS on this interface: frames the guest sends to the MMDS address go to a
//! [`MmdsStack`] instead of the TAP, and the stack's frames reach the receive queue of the
//! first pair ahead of the TAP's. The stack only speaks in answer to the guest, so the
//! worker needs no extra event: it delivers after each transmit batch and whenever the
//! driver adds receive buffers.

use vessel_mmds::{MmdsStack, MAX_FRAME_LEN};

use super::copy::{deliver_copy, Delivery};
use super::read_iovs;
use super::{
    enable_notification_past_avail, notify_if_needed, NetHandler, RxBuffers, VNET_HDR_LEN,
};

/// The first bytes of a frame the stack needs to tell whether the frame may be its own.
const HEAD_LEN: usize = 42;

/// The MMDS stack of a device and its buffers.
pub(in crate::net) struct MmdsPath {
    pub(in crate::net) stack: MmdsStack,
    /// A guest frame being offered to the stack.
    frame: Vec<u8>,
    /// A frame taken from the stack that waits for receive buffers (`out[..len]`).
    out: Vec<u8>,
    out_len: Option<usize>,
}

impl MmdsPath {
    pub(in crate::net) fn new(stack: MmdsStack) -> Self {
        MmdsPath {
            stack,
            frame: Vec::new(),
            out: vec![0; MAX_FRAME_LEN],
            out_len: None,
        }
    }

    /// Offers the frame in `iovs` (`len` bytes, virtio header first) to the stack; true
    /// when it was for MMDS and must not reach the TAP.
    pub(super) fn divert(&mut self, iovs: &[libc::iovec], len: usize) -> bool {
        let mut head = [0u8; HEAD_LEN];
        let n = read_iovs(iovs, VNET_HDR_LEN, &mut head);
        if !self.stack.may_intercept(&head[..n]) {
            return false;
        }
        self.frame.resize(len.saturating_sub(VNET_HDR_LEN), 0);
        let n = read_iovs(iovs, VNET_HDR_LEN, &mut self.frame);
        self.stack.intercept(&self.frame[..n])
    }

    fn has_frames(&self) -> bool {
        self.out_len.is_some() || self.stack.has_frames()
    }
}

impl NetHandler {
    /// Hands the MMDS stack's frames to the guest until either runs out.
    pub(super) fn mmds_rx(&mut self) {
        if self.health.is_broken() || !self.mmds.as_ref().is_some_and(MmdsPath::has_frames) {
            return;
        }
        let mut delivered = 0;
        loop {
            match self.mmds_rx_frame() {
                Some(Delivery::Delivered) => delivered += 1,
                None | Some(Delivery::Broken) => break,
                Some(Delivery::NoBuffers) => {
                    let Some(rxq) = self.pairs.first_mut().and_then(|p| p.rx.as_mut()) else {
                        break;
                    };
                    match enable_notification_past_avail(&mut rxq.queue, &self.mem) {
                        Ok(true) => continue,
                        Ok(false) => break,
                        Err(e) => {
                            self.health
                                .mark_broken(&format_args!("queue {}: {e}", rxq.index));
                            break;
                        }
                    }
                }
            }
        }
        if delivered > 0 {
            if let Some(rxq) = self.pairs.first_mut().and_then(|p| p.rx.as_mut()) {
                notify_if_needed(
                    &mut rxq.queue,
                    rxq.index,
                    &self.mem,
                    self.interrupt.as_ref(),
                );
            }
        }
    }

    /// Writes one frame of the stack into the receive buffers of the first pair.
    /// `None` when the stack has nothing to send.
    fn mmds_rx_frame(&mut self) -> Option<Delivery> {
        let mem = &self.mem;
        let path = self.mmds.as_mut()?;
        let rxq = self.pairs.first_mut().and_then(|p| p.rx.as_mut())?;
        let frame_len = match path.out_len {
            Some(n) => n,
            None => match path.stack.pop_frame(&mut path.out) {
                Some(n) => {
                    path.out_len = Some(n);
                    n
                }
                None => return None,
            },
        };
        let b = RxBuffers {
            q: &mut rxq.queue,
            qindex: rxq.index,
            mem,
            mrg_rxbuf: self.mrg_rxbuf,
            iovs: &mut self.iovs,
            chains: &mut self.rx_chains,
            bad_chains: &mut self.stats.bad_chains,
            health: &self.health,
        };
        let d = deliver_copy(b, &path.out[..frame_len]);
        if matches!(d, Delivery::Delivered) {
            path.out_len = None;
        }
        Some(d)
    }
}

#[cfg(test)]
mod tests;
