//! What the balloon does with the pages the driver sends: PFN lists of inflateq and
//! deflateq, free page reports, statistics buffers, and dropping guest ranges from the host.

use std::io;

use vessel_memory::GuestMemoryMmap;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::{
    BalloonCounters, MAX_PFNS_PER_CHAIN, MAX_STATS_BYTES, PAGE_SHIFT, PAGE_SIZE, STAT_ENTRY_SIZE,
};

/// Reads the device-readable bytes of `chain`, at most `cap`; returns them with the number of
/// bytes ignored (writable buffers, bytes past `cap`, unreadable buffers). An unreadable
/// buffer ends the chain: what follows it would be misaligned.
pub(crate) fn read_driver_bytes(
    chain: DescriptorChain<&GuestMemoryMmap>,
    cap: usize,
) -> (Vec<u8>, u64) {
    let mem = chain.memory();
    let mut data = Vec::new();
    let mut ignored = 0u64;
    for desc in chain.clone() {
        let len = desc.len() as usize;
        if desc.is_write_only() {
            ignored += u64::from(desc.len());
            continue;
        }
        let take = len.min(cap - data.len());
        ignored += (len - take) as u64;
        if take == 0 {
            continue;
        }
        let at = data.len();
        data.resize(at + take, 0);
        if mem.read_slice(&mut data[at..], desc.addr()).is_err() {
            data.truncate(at);
            ignored += take as u64;
            break;
        }
    }
    (data, ignored)
}

/// The little-endian u32 PFNs of an inflate/deflate chain; counts trailing bytes.
pub(super) fn read_pfns(
    chain: DescriptorChain<&GuestMemoryMmap>,
    counters: &mut BalloonCounters,
) -> Vec<u32> {
    let (bytes, ignored) = read_driver_bytes(chain, MAX_PFNS_PER_CHAIN * 4);
    let chunks = bytes.chunks_exact(4);
    counters.malformed_bytes += ignored + chunks.remainder().len() as u64;
    chunks
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Calls `f(first_pfn, count)` for each run of consecutive PFNs, in the driver's order.
pub(super) fn for_each_run(pfns: &[u32], mut f: impl FnMut(u64, u64)) {
    let mut run: Option<(u64, u64)> = None;
    for &pfn in pfns {
        let pfn = u64::from(pfn);
        run = match run {
            Some((start, n)) if start + n == pfn => Some((start, n + 1)),
            Some((start, n)) => {
                f(start, n);
                Some((pfn, 1))
            }
            None => Some((pfn, 1)),
        };
    }
    if let Some((start, n)) = run {
        f(start, n);
    }
}

pub(super) fn inflate_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    counters: &mut BalloonCounters,
) {
    counters.inflate_chains += 1;
    let pfns = read_pfns(chain, counters);
    for_each_run(&pfns, |pfn, n| {
        let d = discard_range(mem, pfn << PAGE_SHIFT, n * PAGE_SIZE);
        counters.inflated_pages += d.done / PAGE_SIZE;
        counters.invalid_pages += d.outside / PAGE_SIZE;
        counters.discard_failures += d.failed / PAGE_SIZE;
    });
}

pub(super) fn deflate_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    counters: &mut BalloonCounters,
) {
    counters.deflate_chains += 1;
    // Nothing to do for the memory: a dropped page comes back (zeroed) when touched.
    for pfn in read_pfns(chain, counters) {
        let addr = vm_memory::GuestAddress(u64::from(pfn) << PAGE_SHIFT);
        if mem.check_range(addr, PAGE_SIZE as usize) {
            counters.deflated_pages += 1;
        } else {
            counters.invalid_pages += 1;
        }
    }
}

/// Drops the whole 4 KiB pages of every device-writable range of a free page report.
pub(super) fn report_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    counters: &mut BalloonCounters,
) {
    for desc in chain {
        if !desc.is_write_only() {
            counters.malformed_bytes += u64::from(desc.len());
            continue;
        }
        if let Some(done) = discard_buffer(mem, desc.addr().0, desc.len(), counters) {
            counters.reported_ranges += 1;
            counters.reported_bytes += done;
        }
    }
}

/// Drops the whole 4 KiB pages of the driver's buffer `addr..addr + len` (free memory it
/// handed over: a partial page at either end may share a page with memory it still uses).
/// Returns the bytes dropped, or `None` when the buffer holds no whole page or wraps the
/// address space (counted as malformed); pages outside guest memory or that `madvise`
/// refused are counted.
pub(super) fn discard_buffer(
    mem: &GuestMemoryMmap,
    addr: u64,
    len: u32,
    counters: &mut BalloonCounters,
) -> Option<u64> {
    let Some(end) = addr.checked_add(u64::from(len)) else {
        counters.malformed_bytes += u64::from(len);
        return None;
    };
    let start = addr.div_ceil(PAGE_SIZE).saturating_mul(PAGE_SIZE);
    let end = end / PAGE_SIZE * PAGE_SIZE;
    if start >= end {
        return None;
    }
    let d = discard_range(mem, start, end - start);
    counters.invalid_pages += d.outside / PAGE_SIZE;
    counters.discard_failures += d.failed / PAGE_SIZE;
    Some(d.done)
}

/// Parses (tag: le16, value: le64) entries; returns them (a repeated tag keeps its last value)
/// with the number of bytes ignored.
pub(super) fn parse_stats(chain: DescriptorChain<&GuestMemoryMmap>) -> (Vec<(u16, u64)>, u64) {
    let (bytes, ignored) = read_driver_bytes(chain, MAX_STATS_BYTES);
    let chunks = bytes.chunks_exact(STAT_ENTRY_SIZE);
    let ignored = ignored + chunks.remainder().len() as u64;
    let mut entries: Vec<(u16, u64)> = Vec::new();
    for c in chunks {
        let tag = u16::from_le_bytes([c[0], c[1]]);
        let mut v = [0u8; 8];
        v.copy_from_slice(&c[2..10]);
        let value = u64::from_le_bytes(v);
        match entries.iter_mut().find(|e| e.0 == tag) {
            Some(e) => e.1 = value,
            None => entries.push((tag, value)),
        }
    }
    (entries, ignored)
}

/// What [`discard_range`] did, in bytes.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Discarded {
    pub(super) done: u64,
    pub(super) outside: u64,
    pub(super) failed: u64,
}

/// Drops the host pages behind guest range `start..start + len` (both 4 KiB multiples) with
/// `MADV_DONTNEED`, region by region; parts outside guest memory are counted, not touched.
pub(super) fn discard_range(mem: &GuestMemoryMmap, start: u64, len: u64) -> Discarded {
    let mut out = Discarded::default();
    let end = start.saturating_add(len);
    out.outside += len - (end - start);
    let mut cur = start;
    while cur < end {
        let Some(region) = mem.find_region(vm_memory::GuestAddress(cur)) else {
            // Skip to the next region, if any starts before `end`.
            let next = mem
                .iter()
                .map(|r| r.start_addr().0)
                .filter(|&s| s > cur)
                .min()
                .unwrap_or(end)
                .min(end);
            out.outside += next - cur;
            cur = next;
            continue;
        };
        let r_start = region.start_addr().0;
        let r_end = r_start.saturating_add(region.len());
        let chunk_end = end.min(r_end);
        let whole = (chunk_end - cur) / PAGE_SIZE * PAGE_SIZE;
        if whole > 0 && madvise_dontneed(region, cur - r_start, whole) {
            out.done += whole;
        } else {
            out.failed += whole;
        }
        // A partial page at the end of a region cannot be dropped.
        out.failed += (chunk_end - cur) - whole;
        cur = chunk_end;
    }
    out
}

pub(super) fn madvise_dontneed<R: GuestMemoryRegion>(region: &R, offset: u64, len: u64) -> bool {
    let Ok(host) = region.get_host_address(MemoryRegionAddress(offset)) else {
        return false;
    };
    let Ok(len) = usize::try_from(len) else {
        return false;
    };
    // The caller keeps `offset + len` within the region.
    // SAFETY: `host..host + len` lies inside the region's host mapping, which `mem` (borrowed
    // by the caller) keeps mapped. MADV_DONTNEED only replaces the contents of these private
    // anonymous pages with zeros on next access; no Rust reference points into guest memory
    // (it is only accessed through raw pointers and volatile copies), so nothing observes a
    // change it was promised would not happen.
    let r = unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTNEED) };
    if r != 0 {
        log::debug!(
            "virtio-balloon: madvise(DONTNEED) failed: {}",
            io::Error::last_os_error()
        );
        return false;
    }
    true
}
