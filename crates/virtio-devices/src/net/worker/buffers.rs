//! Guest receive and transmit buffers as host `iovec`s: turning descriptor chains into
//! `iovec`s pointing into guest memory ([`collect_iovs`]), copying into and out of them
//! ([`write_iovs`], [`read_iovs`]), and taking enough receive chains for one frame
//! ([`gather_rx_buffers`]).

use vessel_memory::GuestMemoryMmap;
use vessel_virtio::DeviceHealth;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryBackend;

use super::VNET_HDR_LEN;

/// Most `iovec`s one `readv`/`writev` takes (`IOV_MAX`).
pub(super) const MAX_IOVS: usize = 1024;

/// Host views (`iovec`s) of guest buffers, rebuilt for every frame.
pub(in crate::net) struct IoVecs(pub(in crate::net) Vec<libc::iovec>);

// SAFETY: the raw pointers in the vector point into guest memory, which is shared with the
// guest anyway; they are only dereferenced (by `readv`/`writev`) while the worker holds the
// `GuestMemoryMmap` that maps them, on whatever thread owns the vector.
unsafe impl Send for IoVecs {}

impl IoVecs {
    pub(super) fn new() -> Self {
        IoVecs(Vec::with_capacity(64))
    }
}

/// Appends the host addresses of every descriptor of `chain` to `iovs`, all of which must be
/// device-writable (`writable`) or all device-readable. Returns the chain's total length, or
/// `None` for a malformed chain (wrong direction, outside guest memory, too many buffers),
/// in which case `iovs` may hold a partial list that the caller truncates.
pub(super) fn collect_iovs(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    writable: bool,
    iovs: &mut IoVecs,
) -> Option<usize> {
    let mut total = 0usize;
    for desc in chain {
        if desc.is_write_only() != writable {
            return None;
        }
        let len = desc.len() as usize;
        if len == 0 {
            continue;
        }
        for slice in GuestMemoryBackend::get_slices(mem, desc.addr(), len) {
            let slice = slice.ok()?;
            if iovs.0.len() >= MAX_IOVS {
                return None;
            }
            let guard = slice.ptr_guard_mut();
            iovs.0.push(libc::iovec {
                iov_base: guard.as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
        total = total.checked_add(len)?;
    }
    Some(total)
}

/// Copies `data` into the buffers described by `iovs`, starting `offset` bytes in.
pub(super) fn write_iovs(iovs: &[libc::iovec], mut offset: usize, data: &[u8]) {
    let mut data = data;
    for iov in iovs {
        if data.is_empty() {
            return;
        }
        if offset >= iov.iov_len {
            offset -= iov.iov_len;
            continue;
        }
        let n = data.len().min(iov.iov_len - offset);
        // SAFETY: `iov` was built by `collect_iovs` from a guest memory slice of `iov_len`
        // bytes that stays mapped while the worker holds the memory; `offset + n <= iov_len`.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), iov.iov_base.cast::<u8>().add(offset), n);
        }
        data = &data[n..];
        offset = 0;
    }
}

/// Copies bytes from the buffers described by `iovs`, starting `offset` bytes in, into
/// `out`; returns how many were copied.
pub(in crate::net) fn read_iovs(iovs: &[libc::iovec], mut offset: usize, out: &mut [u8]) -> usize {
    let mut done = 0;
    for iov in iovs {
        if done == out.len() {
            break;
        }
        if offset >= iov.iov_len {
            offset -= iov.iov_len;
            continue;
        }
        let n = (out.len() - done).min(iov.iov_len - offset);
        // SAFETY: each iovec describes `iov_len` readable bytes (built by `collect_iovs` from
        // guest memory that stays mapped while the worker holds it, or a live host buffer);
        // `offset + n <= iov_len` and `done + n <= out.len()`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                iov.iov_base.cast::<u8>().add(offset),
                out.as_mut_ptr().add(done),
                n,
            );
        }
        done += n;
        offset = 0;
    }
    done
}

/// What [`gather_rx_buffers`] works on (fields of the handler, borrowed apart from the queue).
pub(super) struct RxBuffers<'a> {
    pub q: &'a mut virtio_queue::Queue,
    pub qindex: u16,
    pub mem: &'a GuestMemoryMmap,
    pub mrg_rxbuf: bool,
    pub iovs: &'a mut IoVecs,
    /// (head, length, first iovec) of each chain taken.
    pub chains: &'a mut Vec<(u16, usize, usize)>,
    pub bad_chains: &'a mut u64,
    pub health: &'a DeviceHealth,
}

/// What gathering receive buffers for one frame gave.
pub(super) enum Gathered {
    /// Chains holding this many bytes are in `chains` and `iovs`.
    Ready(usize),
    /// Not enough buffers yet; nothing was taken.
    NoBuffers,
    /// The ring is broken (the device was marked as needing reset).
    Broken,
}

/// Takes receive chains until they hold `need` bytes (with merged buffers) or one chain
/// (without); chains too short for the virtio-net header are returned empty. A ring full of
/// buffers is used even when short of `need`: the driver will never give more.
pub(super) fn gather_rx_buffers(b: &mut RxBuffers<'_>, need: usize) -> Gathered {
    let (qindex, mem, mrg_rxbuf, health) = (b.qindex, b.mem, b.mrg_rxbuf, b.health);
    let (q, iovs, chains) = (&mut *b.q, &mut *b.iovs, &mut *b.chains);
    let bad_chains = &mut *b.bad_chains;
    iovs.0.clear();
    chains.clear();
    let mut capacity = 0usize;
    while capacity < need && iovs.0.len() < MAX_IOVS {
        if !mrg_rxbuf && !chains.is_empty() {
            break;
        }
        let chain = match q.iter(mem) {
            Ok(mut it) => it.next(),
            Err(e) => {
                health.mark_broken(&format_args!("queue {qindex}: {e}"));
                return Gathered::Broken;
            }
        };
        let Some(chain) = chain else { break };
        let head = chain.head_index();
        let start = iovs.0.len();
        match collect_iovs(mem, chain, true, iovs) {
            Some(len) if len >= VNET_HDR_LEN => {
                chains.push((head, len, start));
                capacity += len;
            }
            _ => {
                iovs.0.truncate(start);
                *bad_chains += 1;
                if let Err(e) = q.add_used(mem, head, 0) {
                    health.mark_broken(&format_args!("queue {qindex}: {e}"));
                    return Gathered::Broken;
                }
            }
        }
    }
    let ring_full = chains.len() >= usize::from(q.size());
    if chains.is_empty() || (capacity < need && !ring_full) {
        for _ in 0..chains.len() {
            q.go_to_previous_position();
        }
        return Gathered::NoBuffers;
    }
    Gathered::Ready(capacity)
}
