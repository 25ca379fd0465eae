//! The worker's side of passt: frames from the stream are copied behind a plain virtio-net
//! header into the receive buffers; guest frames are queued without their header and sent
//! at the end of each transmit batch (the rest once the socket has room, watched with
//! `EPOLLOUT`). When passt goes away (end of stream, a broken socket, a lost framing) the
//! socket leaves the epoll set, the link goes down and the guest's frames are dropped; the
//! VM keeps running.

use std::sync::atomic::Ordering;
use std::sync::Mutex;

use vessel_virtio::InterruptCause;
use vmm_sys_util::epoll::EventSet;

use super::super::passt::keeper::KeeperMsg;
use super::copy::{deliver_copy, Delivery};
use super::{
    lock_stream, Backend, IoVecs, NetHandler, NetStats, PasstStream, Rx, RxBuffers, TapPoll,
    Tokens, VNET_HDR_LEN,
};

/// Queues the guest frame in `iovs` (`len` bytes, virtio-net header first) for passt.
pub(super) fn transmit(s: &Mutex<PasstStream>, iovs: &IoVecs, len: usize, stats: &mut NetStats) {
    if lock_stream(s).queue_frame(&iovs.0, VNET_HDR_LEN, len - VNET_HDR_LEN) {
        stats.tx_frames += 1;
        stats.tx_bytes += (len - VNET_HDR_LEN) as u64;
    } else {
        stats.tx_errors += 1;
    }
}

impl NetHandler {
    /// Receives one frame from passt into the receive buffers of pair `p`.
    pub(super) fn rx_frame_passt(&mut self, p: usize) -> Rx {
        let pair = &mut self.pairs[p];
        let Backend::Passt(stream) = &pair.backend else {
            return Rx::TapEmpty;
        };
        let Some(rxq) = pair.rx.as_mut() else {
            return Rx::TapEmpty;
        };
        let mut s = lock_stream(stream);
        let len = match s.peek_frame() {
            Ok(Some(len)) => len,
            // The end is seen (and dealt with) by `passt_sync`.
            Ok(None) | Err(_) => return Rx::TapEmpty,
        };
        let b = RxBuffers {
            q: &mut rxq.queue,
            qindex: rxq.index,
            mem: &self.mem,
            mrg_rxbuf: self.mrg_rxbuf,
            iovs: &mut self.iovs,
            chains: &mut self.rx_chains,
            bad_chains: &mut self.stats.bad_chains,
            health: &self.health,
        };
        match deliver_copy(b, s.frame()) {
            Delivery::Delivered => {
                s.consume_frame();
                self.stats.rx_frames += 1;
                self.stats.rx_bytes += len as u64;
                Rx::Delivered
            }
            Delivery::NoBuffers => Rx::NoBuffers,
            Delivery::Broken => Rx::Broken,
        }
    }

    /// Sends what the transmit batch of pair `p` queued for passt.
    pub(super) fn passt_flush(&mut self, p: usize) {
        if let Some(Backend::Passt(s)) = self.pairs.get(p).map(|pair| &pair.backend) {
            // A failure ends the stream, which `passt_sync` sees.
            let _ = lock_stream(s).flush();
        }
    }

    /// passt's socket is ready: room to write, frames to read, or passt went away.
    pub(in crate::net) fn passt_event(
        &mut self,
        p: usize,
        events: EventSet,
        ctl: &mut dyn TapPoll,
    ) {
        if events.contains(EventSet::OUT) {
            self.passt_flush(p);
        }
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            self.process_rx(p, ctl);
        }
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // Frames still buffered are given up: the guest may have no buffers for them,
            // and a hung-up socket would wake the worker for ever.
            if let Backend::Passt(s) = &self.pairs[p].backend {
                lock_stream(s).close();
            }
        }
    }

    /// After each event: takes the link down once passt is gone, and watches the socket for
    /// room to write exactly while bytes wait to be sent.
    pub(in crate::net) fn passt_sync(&mut self, ctl: &mut dyn TapPoll) {
        if self.passt_down {
            return;
        }
        let Some(pair) = self.pairs.first_mut() else {
            return;
        };
        let Backend::Passt(stream) = &pair.backend else {
            return;
        };
        let (end, out_changed) = {
            let s = lock_stream(stream);
            (s.end(), s.wants_out() != s.out_polled)
        };
        if let Some(end) = end {
            if self.keeper.is_some() {
                log::warn!(
                    "virtio-net: {end}; the link is down and the guest's frames are dropped \
                     until passt is started again"
                );
            } else {
                log::warn!(
                    "virtio-net: {end}; the link is down for good and the guest's frames are \
                     dropped (a passt Vessel did not start is not restarted)"
                );
            }
            ctl.forget(&pair.backend);
            self.passt_down = true;
            if let Some(link) = &self.link_up {
                link.store(false, Ordering::Release);
                if self.status {
                    if let Err(e) = self.interrupt.trigger(InterruptCause::Config) {
                        log::warn!("virtio-net: cannot signal the link change: {e}");
                    }
                }
            }
            return;
        }
        if out_changed {
            let polled = pair.tap_polled;
            ctl.set_tap_polled(&pair.backend, Tokens::tap(0), polled);
        }
    }

    /// The keeper sent something: a new passt's socket (it replaces the stream, the link
    /// comes back up), a failure to start passt, or its end.
    pub(in crate::net) fn keeper_event(&mut self, ctl: &mut dyn TapPoll) {
        let Some(keeper) = self.keeper.clone() else {
            return;
        };
        loop {
            match keeper.recv(false) {
                Ok(None) => return,
                Ok(Some(KeeperMsg::Passt { pid, sock })) => self.passt_replace(pid, sock, ctl),
                Ok(Some(KeeperMsg::Failed(m))) => {
                    log::warn!("virtio-net: cannot start passt again ({m}); trying later")
                }
                Err(e) => {
                    log::warn!(
                        "virtio-net: the passt keeper is gone ({e}); passt is not restarted"
                    );
                    ctl.forget_fd(std::os::unix::io::AsRawFd::as_raw_fd(keeper.as_ref()));
                    self.keeper = None;
                    return;
                }
            }
        }
    }

    /// Puts a new passt's socket in place of the stream (fresh buffers), watches it and
    /// takes the link up again.
    fn passt_replace(
        &mut self,
        pid: u32,
        sock: std::os::unix::net::UnixStream,
        ctl: &mut dyn TapPoll,
    ) {
        let Some(pair) = self.pairs.first_mut() else {
            return;
        };
        let Backend::Passt(stream) = &pair.backend else {
            return;
        };
        let new = match PasstStream::new(sock) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("virtio-net: cannot use the new passt's socket: {e}");
                return;
            }
        };
        if !self.passt_down {
            ctl.forget(&pair.backend);
        }
        *lock_stream(stream) = new;
        ctl.watch(&pair.backend, Tokens::tap(0));
        pair.tap_polled = true;
        self.passt_down = false;
        log::info!("virtio-net: passt started again (pid {pid}); the link is up");
        if let Some(link) = &self.link_up {
            link.store(true, Ordering::Release);
            if self.status {
                if let Err(e) = self.interrupt.trigger(InterruptCause::Config) {
                    log::warn!("virtio-net: cannot signal the link change: {e}");
                }
            }
        }
    }
}
