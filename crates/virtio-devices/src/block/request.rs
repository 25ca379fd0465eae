//! Turning a descriptor chain into a checked virtio-blk request (virtio 1.2, 5.2.6): the
//! 16-byte header, the data buffers and the status byte, every address checked against guest
//! memory and every sector range against the disk before any I/O is done. A chain that cannot
//! be served becomes a request that only reports its error status.

use std::ops::Range;

use vessel_memory::GuestMemoryMmap;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::disk::Disk;
use super::{MAX_DISCARD_SEG, SECTOR_SIZE};

/// Size of `struct virtio_blk_outhdr`.
pub const HEADER_LEN: u32 = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
pub const DWZ_SEGMENT_LEN: u64 = 16;

/// One guest buffer of a request's data, inside guest memory (checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub addr: GuestAddress,
    pub len: u32,
    /// Host address of the buffer when it lies in one guest memory region (the usual case),
    /// 0 when it spans regions (then resolved again piece by piece).
    pub host: usize,
}

/// Checks that `[addr, addr + len)` is guest memory; returns its host address if contiguous
/// there, 0 if it spans regions.
fn resolve(mem: &GuestMemoryMmap, addr: GuestAddress, len: u32) -> Option<usize> {
    if let Ok(s) = GuestMemoryBackend::get_slice(mem, addr, len as usize) {
        return Some(s.ptr_guard_mut().as_ptr() as usize);
    }
    GuestMemoryBackend::check_range(mem, addr, len as usize).then_some(0)
}

/// What a request asks for, once checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    /// Nothing to do: the request already has its final status (an error).
    Done,
}

/// A parsed request of a batch.
#[derive(Debug, Clone)]
pub struct Request {
    pub head: u16,
    pub op: Op,
    /// Where the status byte goes; `None` when the chain has no usable one (the chain is then
    /// returned with a used length of 0).
    pub status: Option<GuestAddress>,
    /// Byte offset on the disk (`In`/`Out`).
    pub offset: u64,
    /// Total data bytes.
    pub len: u64,
    /// The data buffers, indices into the batch's segment list.
    pub segs: Range<usize>,
    /// The status to report (`VIRTIO_BLK_S_*`), final once the request is executed.
    pub code: u8,
    /// Bytes written into the driver's data buffers (not counting the status byte).
    pub written: u32,
}

impl Request {
    fn failed(head: u16, status: Option<GuestAddress>, code: u32, segs_at: usize) -> Request {
        Request {
            head,
            op: Op::Done,
            status,
            offset: 0,
            len: 0,
            segs: segs_at..segs_at,
            code: code as u8,
            written: 0,
        }
    }
}

/// Parses `chain`; data buffers are appended to `segs`. `descs` is scratch space.
pub fn parse(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    disk: &Disk,
    descs: &mut Vec<Descriptor>,
    segs: &mut Vec<Seg>,
) -> Request {
    let head = chain.head_index();
    let at = segs.len();
    descs.clear();
    // The chain iterator stops loops (a chain is at most as long as its table) and chains
    // longer than 4 GiB in total.
    descs.extend(chain);

    // The status byte: last byte of the last descriptor, which must be device-writable. A
    // last descriptor that still says NEXT means the chain was cut short (a loop, a next index
    // out of the table or outside guest memory).
    let Some(last) = descs.last().copied() else {
        return Request::failed(head, None, VIRTIO_BLK_S_IOERR, at);
    };
    if last.has_next() || !last.is_write_only() || last.len() == 0 {
        return Request::failed(head, None, VIRTIO_BLK_S_IOERR, at);
    }
    let status = last
        .addr()
        .checked_add(u64::from(last.len() - 1))
        .filter(|a| GuestMemoryBackend::check_range(mem, *a, 1));
    let Some(status) = status else {
        return Request::failed(head, None, VIRTIO_BLK_S_IOERR, at);
    };
    let fail = |code| Request::failed(head, Some(status), code, at);

    // The header: the first 16 bytes of the first descriptor, driver-readable.
    let first = descs[0];
    if descs.len() < 2 || first.is_write_only() || first.len() < HEADER_LEN {
        return fail(VIRTIO_BLK_S_IOERR);
    }
    let hdr = GuestMemoryBackend::get_slice(mem, first.addr(), HEADER_LEN as usize)
        .and_then(|s| Ok(s.read_obj::<[u8; 16]>(0)?))
        .or_else(|_| mem.read_obj::<[u8; 16]>(first.addr()));
    let Ok(hdr) = hdr else {
        return fail(VIRTIO_BLK_S_IOERR);
    };
    let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);

    // The data: whatever lies between the header and the status byte, checked to be in guest
    // memory.
    let mut readable = false;
    let mut writable = false;
    let mut total = 0u64;
    let n = descs.len();
    let pieces = std::iter::once((
        first.addr().checked_add(u64::from(HEADER_LEN)),
        first.len() - HEADER_LEN,
        false,
    ))
    .chain(
        descs[1..n - 1]
            .iter()
            .map(|d| (Some(d.addr()), d.len(), d.is_write_only())),
    )
    .chain(std::iter::once((Some(last.addr()), last.len() - 1, true)));
    for (addr, len, w) in pieces {
        if len == 0 {
            continue;
        }
        let Some(addr) = addr else {
            segs.truncate(at);
            return fail(VIRTIO_BLK_S_IOERR);
        };
        let Some(host) = resolve(mem, addr, len) else {
            segs.truncate(at);
            return fail(VIRTIO_BLK_S_IOERR);
        };
        readable |= !w;
        writable |= w;
        total += u64::from(len);
        segs.push(Seg { addr, len, host });
    }
    let mut req = Request {
        head,
        op: Op::Done,
        status: Some(status),
        offset: 0,
        len: total,
        segs: at..segs.len(),
        code: VIRTIO_BLK_S_IOERR as u8,
        written: 0,
    };
    let op = match req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let is_in = req_type == VIRTIO_BLK_T_IN;
            let wrong_direction = if is_in { readable } else { writable };
            if wrong_direction || (!is_in && disk.read_only()) {
                None
            } else {
                disk_range(sector, total, disk).map(|off| {
                    req.offset = off;
                    if is_in {
                        Op::In
                    } else {
                        Op::Out
                    }
                })
            }
        }
        VIRTIO_BLK_T_FLUSH => Some(Op::Flush),
        VIRTIO_BLK_T_GET_ID if !readable && total > 0 => Some(Op::GetId),
        VIRTIO_BLK_T_GET_ID => None,
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let n_segs = total / DWZ_SEGMENT_LEN;
            let ok = !writable
                && !disk.read_only()
                && total > 0
                && total.is_multiple_of(DWZ_SEGMENT_LEN)
                && n_segs <= u64::from(MAX_DISCARD_SEG);
            ok.then_some(if req_type == VIRTIO_BLK_T_DISCARD {
                Op::Discard
            } else {
                Op::WriteZeroes
            })
        }
        _ => {
            segs.truncate(at);
            return fail(VIRTIO_BLK_S_UNSUPP);
        }
    };
    match op {
        Some(op) => req.op = op,
        None => {
            segs.truncate(at);
            return fail(VIRTIO_BLK_S_IOERR);
        }
    }
    req
}

/// The byte offset of `sectors` at `sector` if the whole range lies on the disk and `len` is a
/// whole number of sectors.
pub fn disk_range(sector: u64, len: u64, disk: &Disk) -> Option<u64> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return None;
    }
    let off = sector.checked_mul(SECTOR_SIZE)?;
    let end = off.checked_add(len)?;
    (end <= disk.size()).then_some(off)
}
