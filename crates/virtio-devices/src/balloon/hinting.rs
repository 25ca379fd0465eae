//! Free page hinting (`VIRTIO_BALLOON_F_FREE_PAGE_HINT`, virtio 1.2 section 5.5.6.7), run by
//! the host as Firecracker 1.16 runs it (`/balloon/hinting/{start,status,stop}`).
//!
//! The host starts a run by writing a new command id into the configuration space
//! (`free_page_hint_cmd_id`, raising a config interrupt). The driver answers on
//! free_page_vq: a device-readable buffer with that id, then device-writable buffers, each a
//! block of free guest memory it holds for the run (the device drops their host pages), then
//! a buffer with `CMD_ID_STOP` when it has no more. The driver gives the blocks back to its
//! allocator once the host writes `CMD_ID_DONE` (at once with `acknowledge_on_stop`).
//! Hints that arrive under an id other than the host's current one, or after the host said
//! stop or done, are used without dropping anything.

use vessel_memory::GuestMemoryMmap;
use virtio_queue::DescriptorChain;
use vm_memory::Bytes;

use super::pages::discard_buffer;
use super::BalloonCounters;

/// The host stops a run, or the driver says it has no more hints.
pub const CMD_ID_STOP: u32 = 0;
/// The host lets the driver take its hinted blocks back.
pub const CMD_ID_DONE: u32 = 1;

/// Why a hinting request cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HintingError {
    #[error("Attempting to use hinting when not enabled")]
    NotEnabled,
}

/// Where a hinting run stands, as `GET /balloon/hinting/status` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HintingStatus {
    /// The command id the host wrote last.
    pub host_cmd: u32,
    /// The command id the driver sent last, if any.
    pub guest_cmd: Option<u32>,
}

/// The host's and the driver's side of hinting runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Hinting {
    /// In the configuration space: `CMD_ID_STOP`, `CMD_ID_DONE` or the running command id.
    pub(super) host_cmd: u32,
    /// The id of the latest run started (kept in snapshots: the driver ignores a run whose
    /// id is the one it ran last).
    pub(super) last_cmd_id: u32,
    pub(super) guest_cmd: Option<u32>,
    /// Write `CMD_ID_DONE` as soon as the driver says it has no more hints.
    pub(super) ack_on_stop: bool,
}

impl Hinting {
    /// After a snapshot restore or a device reset: no run, the next one after `last_cmd_id`.
    pub(super) fn idle(last_cmd_id: u32) -> Self {
        Hinting {
            host_cmd: CMD_ID_STOP,
            last_cmd_id,
            guest_cmd: None,
            ack_on_stop: false,
        }
    }

    /// Starts a run with the id after the last one (ids 0 and 1 are commands).
    pub(super) fn start(&mut self, ack_on_stop: bool) {
        let mut id = self.last_cmd_id.wrapping_add(1);
        if id <= CMD_ID_DONE {
            id = CMD_ID_DONE + 1;
        }
        self.last_cmd_id = id;
        self.host_cmd = id;
        self.ack_on_stop = ack_on_stop;
    }

    pub(super) fn status(&self) -> HintingStatus {
        HintingStatus {
            host_cmd: self.host_cmd,
            guest_cmd: self.guest_cmd,
        }
    }

    /// Serves one chain of free_page_vq. Returns whether the driver ended its run in it (its
    /// last command id was `CMD_ID_STOP`, or `CMD_ID_DONE`, which only the host should send).
    pub(super) fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        counters: &mut BalloonCounters,
    ) -> Option<bool> {
        let mut ended = None;
        for desc in chain {
            let len = u64::from(desc.len());
            if !desc.is_write_only() {
                // A command id: 4 bytes (anything after them is ignored).
                match mem.read_obj::<u32>(desc.addr()) {
                    Ok(id) if len >= 4 => {
                        let id = u32::from_le(id);
                        self.guest_cmd = Some(id);
                        ended = Some(id == CMD_ID_STOP || id == CMD_ID_DONE);
                        counters.malformed_bytes += len - 4;
                    }
                    _ => counters.malformed_bytes += len,
                }
                continue;
            }
            if self.host_cmd == CMD_ID_STOP
                || self.host_cmd == CMD_ID_DONE
                || self.guest_cmd != Some(self.host_cmd)
            {
                // A hint of a run that is over, or of an older one.
                counters.stale_hint_bytes += len;
                continue;
            }
            if let Some(done) = discard_buffer(mem, desc.addr().0, desc.len(), counters) {
                counters.hinted_ranges += 1;
                counters.hinted_bytes += done;
            }
        }
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::testing::*;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::GuestAddress;

    /// Serves one chain made of `bufs` (`(addr, len, device_writable)`).
    fn serve(
        h: &mut Hinting,
        m: &GuestMemoryMmap,
        bufs: &[Buf],
    ) -> (Option<bool>, BalloonCounters) {
        let vq = MockSplitQueue::new(m, 16);
        add_chain(&vq, 0, bufs);
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(m).unwrap().next().unwrap();
        let mut c = BalloonCounters::default();
        let ended = h.serve(m, chain, &mut c);
        (ended, c)
    }

    fn cmd(m: &GuestMemoryMmap, at: u64, id: u32) -> Buf {
        m.write_slice(&id.to_le_bytes(), GuestAddress(at)).unwrap();
        (at, 4, false)
    }

    fn fill(m: &GuestMemoryMmap, at: u64, len: usize, byte: u8) {
        m.write_slice(&vec![byte; len], GuestAddress(at)).unwrap();
    }

    #[test]
    fn run_ids_skip_the_commands_and_wrap() {
        let mut h = Hinting::idle(0);
        h.start(true);
        assert_eq!((h.host_cmd, h.last_cmd_id, h.ack_on_stop), (2, 2, true));
        h.start(false);
        assert_eq!(h.host_cmd, 3);
        let mut h = Hinting::idle(u32::MAX);
        h.start(false);
        assert_eq!(h.host_cmd, 2);
        assert_eq!(
            h.status(),
            HintingStatus {
                host_cmd: 2,
                guest_cmd: None
            }
        );
    }

    #[test]
    fn hints_of_the_current_run_are_dropped() {
        let m = mem();
        fill(&m, 0x9_0000, 0x3000, 0xab);
        fill(&m, 0xc_0000, 0x1000, 0xcd);
        let mut h = Hinting::idle(0);
        h.start(true);
        // The driver acknowledges the run, then hints two pages and a half.
        let (ended, c) = serve(
            &mut h,
            &m,
            &[cmd(&m, 0x8_0000, 2), (0x9_0000, 0x2800, true)],
        );
        assert_eq!(ended, Some(false));
        assert_eq!(h.guest_cmd, Some(2));
        assert_eq!(read_bytes(&m, 0x9_0000, 0x2000), vec![0; 0x2000]);
        // The partial page stays.
        assert_eq!(read_bytes(&m, 0x9_2000, 0x1000), vec![0xab; 0x1000]);
        assert_eq!(c.hinted_bytes, 0x2000);
        // A hint in a chain of its own, then the driver's stop.
        let (ended, c) = serve(&mut h, &m, &[(0xc_0000, 0x1000, true)]);
        assert_eq!((ended, c.hinted_bytes), (None, 0x1000));
        assert_eq!(read_bytes(&m, 0xc_0000, 0x1000), vec![0; 0x1000]);
        let (ended, _) = serve(&mut h, &m, &[cmd(&m, 0x8_0000, CMD_ID_STOP)]);
        assert_eq!(ended, Some(true));
        assert_eq!(h.guest_cmd, Some(CMD_ID_STOP));
    }

    #[test]
    fn stale_and_hostile_hints_drop_nothing() {
        let m = mem();
        fill(&m, 0x9_0000, 0x1000, 0xab);
        let mut h = Hinting::idle(0);
        // No run: a hint is ignored, even under a command id the host never wrote.
        let (_, c) = serve(
            &mut h,
            &m,
            &[cmd(&m, 0x8_0000, 7), (0x9_0000, 0x1000, true)],
        );
        assert_eq!((c.hinted_bytes, c.stale_hint_bytes), (0, 0x1000));
        // A run, but the hint comes under the previous run's id.
        h.start(true);
        h.start(true);
        let (_, c) = serve(
            &mut h,
            &m,
            &[cmd(&m, 0x8_0000, 2), (0x9_0000, 0x1000, true)],
        );
        assert_eq!(c.stale_hint_bytes, 0x1000);
        // The host said done: in-flight hints of the run are ignored.
        serve(&mut h, &m, &[cmd(&m, 0x8_0000, 3)]);
        h.host_cmd = CMD_ID_DONE;
        let (_, c) = serve(&mut h, &m, &[(0x9_0000, 0x1000, true)]);
        assert_eq!(c.stale_hint_bytes, 0x1000);
        assert_eq!(read_bytes(&m, 0x9_0000, 0x1000), vec![0xab; 0x1000]);
        // Hostile buffers: a short command id, a hint past guest memory, one wrapping the
        // address space. Nothing panics, nothing in memory changes.
        h.start(true);
        let (ended, c) = serve(&mut h, &m, &[(0x8_0000, 2, false)]);
        assert_eq!((ended, c.malformed_bytes), (None, 2));
        let run = cmd(&m, 0x8_0000, h.host_cmd);
        serve(&mut h, &m, &[run]);
        let (_, c) = serve(
            &mut h,
            &m,
            &[
                (0x7fff_f000_0000, 0x2000, true),
                (u64::MAX - 0xfff, 0x2000, true),
            ],
        );
        assert_eq!(c.hinted_bytes, 0);
        assert_eq!(c.invalid_pages, 2);
        assert_eq!(c.malformed_bytes, 0x2000);
        assert_eq!(read_bytes(&m, 0x9_0000, 0x1000), vec![0xab; 0x1000]);
    }
}
