//! Guest memory files.
//!
//! A memory file is the guest's RAM regions back to back, in guest-address order (the
//! regions are listed in the state file). Pages never written read as zero, so writers leave
//! zero pages as holes: a mostly idle guest gives a small file. A diff file holds only the
//! pages dirtied since the previous snapshot, at their place, with holes elsewhere;
//! [`rebase`] copies its data onto a full file, which gives the full file of the later
//! snapshot.
//!
//! Restore maps the file privately ([`map_private`]): nothing is read up front, the guest
//! faults pages in from the page cache as it touches them, and its writes stay in the VMM's
//! anonymous copy-on-write pages, so any number of clones can share one file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use vessel_memory::GuestMemoryMmap;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::dirty::{DirtyBitmap, MemRegion, PAGE_SIZE};
use crate::format::SnapshotError;

/// The regions of `mem`, in order.
pub fn layout(mem: &GuestMemoryMmap) -> Vec<MemRegion> {
    mem.iter()
        .map(|r| MemRegion {
            gpa: r.start_addr().0,
            size: r.len(),
        })
        .collect()
}

/// The pages the VMM itself (its devices) wrote since the last call, from guest memory's
/// own dirty bitmaps, which `vm-memory` sets on every write through its API, and resets
/// them. KVM's dirty log has the guest's writes; the union of both is what changed.
pub fn take_vmm_dirty(mem: &GuestMemoryMmap) -> DirtyBitmap {
    let mut bits = DirtyBitmap::new(&layout(mem));
    take_vmm_dirty_into(mem, &mut bits);
    bits
}

/// [`take_vmm_dirty`] ORed into `bits` (over the same regions). Bit by bit, without a copy
/// of the bitmaps (`get_and_reset` makes one, and writes every word): only words with a set
/// bit are written, so a large VM's mostly clean bitmaps stay unallocated. A bit the VMM sets
/// again between the read and the reset is not lost: its write came before, and is copied
/// with the page.
pub fn take_vmm_dirty_into(mem: &GuestMemoryMmap, bits: &mut DirtyBitmap) {
    for (i, r) in mem.iter().enumerate() {
        let map = std::ops::Deref::deref(r).bitmap();
        for page in 0..map.len() {
            if map.is_bit_set(page) {
                map.reset_bit(page);
                bits.set_page(i, page as u64);
            }
        }
    }
}

/// The pages of guest memory mapped in this process's page tables: those the guest (or the
/// VMM) touched since the memory was mapped, read from `/proc/self/pagemap`. Right after a
/// restore, that is the guest's working set.
pub fn resident_pages(mem: &GuestMemoryMmap) -> Result<DirtyBitmap, SnapshotError> {
    pagemap_pages(mem, |e| e >> 63 == 1)
}

/// The pages whose `/proc/self/pagemap` entry passes `keep`.
fn pagemap_pages(
    mem: &GuestMemoryMmap,
    keep: impl Fn(u64) -> bool,
) -> Result<DirtyBitmap, SnapshotError> {
    let path = Path::new("/proc/self/pagemap");
    let pagemap = File::open(path).map_err(SnapshotError::io(path))?;
    let regions = layout(mem);
    let mut bits = DirtyBitmap::new(&regions);
    let mut buf = vec![0u8; 8 * 4096];
    for r in mem.iter() {
        let host = r.as_ptr() as u64;
        let pages = r.len() / PAGE_SIZE;
        let mut p = 0u64;
        while p < pages {
            let n = ((pages - p) as usize).min(buf.len() / 8);
            let chunk = &mut buf[..n * 8];
            pagemap
                .read_exact_at(chunk, (host / PAGE_SIZE + p) * 8)
                .map_err(SnapshotError::io(path))?;
            for (k, e) in chunk.chunks_exact(8).enumerate() {
                let mut w = [0u8; 8];
                w.copy_from_slice(e);
                if keep(u64::from_le_bytes(w)) {
                    bits.mark(r.start_addr().0 + (p + k as u64) * PAGE_SIZE, 1);
                }
            }
            p += n as u64;
        }
    }
    Ok(bits)
}

/// Maps the pages `pages` selects into the page tables ahead of the guest
/// (`MADV_POPULATE_READ`): a restored guest then takes no host page fault on them. Returns
/// the bytes prefetched.
pub fn prefetch(mem: &GuestMemoryMmap, pages: &DirtyBitmap) -> u64 {
    const MADV_POPULATE_READ: i32 = 22;
    let mut total = 0;
    for (i, r) in mem.iter().enumerate() {
        for (first, count) in pages.runs(i) {
            let (off, len) = (first * PAGE_SIZE, count * PAGE_SIZE);
            if off + len > r.len() {
                continue;
            }
            // SAFETY: the range lies inside this region's live mapping; populating pages
            // changes no memory contents.
            let rc = unsafe {
                libc::madvise(
                    r.as_ptr().add(off as usize).cast(),
                    len as usize,
                    MADV_POPULATE_READ,
                )
            };
            if rc == 0 {
                total += len;
            }
        }
    }
    total
}

/// A working set as a file: `[[region, first page, page count], ...]` in JSON.
pub fn save_working_set(path: &Path, pages: &DirtyBitmap) -> Result<(), SnapshotError> {
    let runs: Vec<(usize, u64, u64)> = (0..pages.regions().len())
        .flat_map(|i| pages.runs(i).into_iter().map(move |(f, c)| (i, f, c)))
        .collect();
    let text = serde_json::to_vec(&runs).map_err(SnapshotError::Parse)?;
    std::fs::write(path, text).map_err(SnapshotError::io(path))
}

/// Reads a working set saved by [`save_working_set`] for memory with `regions`.
pub fn load_working_set(path: &Path, regions: &[MemRegion]) -> Result<DirtyBitmap, SnapshotError> {
    let text = std::fs::read(path).map_err(SnapshotError::io(path))?;
    let runs: Vec<(usize, u64, u64)> =
        serde_json::from_slice(&text).map_err(SnapshotError::Parse)?;
    let mut bits = DirtyBitmap::new(regions);
    for (i, first, count) in runs {
        if let Some(r) = regions.get(i) {
            bits.mark(
                r.gpa.saturating_add(first.saturating_mul(PAGE_SIZE)),
                count.saturating_mul(PAGE_SIZE),
            );
        }
    }
    Ok(bits)
}

/// What writing a memory file did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteStats {
    /// Bytes of guest memory covered (the file's logical size for a full file).
    pub covered: u64,
    /// Bytes actually written.
    pub written: u64,
}

/// The host bytes of one region.
///
/// # Safety
/// Nothing may write the region while the slice lives: every vCPU is parked and every
/// device worker is quiesced.
unsafe fn region_bytes(r: &GuestRegionMmap<AtomicBitmap>) -> &[u8] {
    // SAFETY: the mapping is `r.len()` bytes long and lives as long as `r`; the caller
    // guarantees nobody writes it meanwhile.
    unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len() as usize) }
}

/// Whether every byte of `page` is zero (compared a word at a time).
pub fn is_zero(page: &[u8]) -> bool {
    // SAFETY: reinterpreting initialized bytes as u64 words; align_to handles alignment.
    let (pre, words, post) = unsafe { page.align_to::<u64>() };
    pre.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// Writes the pages of `bytes` (a region at file offset `base`) that `want` selects,
/// coalescing runs; zero pages are skipped when `skip_zero` (the file has holes there).
fn write_pages(
    file: &File,
    path: &Path,
    bytes: &[u8],
    base: u64,
    runs: &[(u64, u64)],
    skip_zero: bool,
) -> Result<u64, SnapshotError> {
    let mut written = 0u64;
    let page = PAGE_SIZE as usize;
    for &(first, count) in runs {
        let mut run_start: Option<usize> = None;
        let end_page = (first + count) as usize;
        let flush = |from: usize, to: usize, written: &mut u64| -> Result<(), SnapshotError> {
            let to = to.min(bytes.len());
            file.write_all_at(&bytes[from..to], base + from as u64)
                .map_err(SnapshotError::io(path))?;
            *written += (to - from) as u64;
            Ok(())
        };
        for p in first as usize..end_page {
            let off = p * page;
            if off >= bytes.len() {
                break;
            }
            let data = &bytes[off..(off + page).min(bytes.len())];
            let keep = !(skip_zero && is_zero(data));
            match (keep, run_start) {
                (true, None) => run_start = Some(off),
                (false, Some(s)) => {
                    flush(s, off, &mut written)?;
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run_start {
            flush(s, end_page * page, &mut written)?;
        }
    }
    Ok(written)
}

/// Writes all of guest memory to a new file that replaces `path` (see
/// [`crate::format::replace_file`]: a guest whose memory maps the old file, e.g. the VM being
/// snapshotted when it was restored from `path`, keeps it), zero pages as holes.
///
/// # Safety
/// Every vCPU must be parked and every device worker quiesced: nothing may write guest
/// memory while it is read.
pub unsafe fn write_full(mem: &GuestMemoryMmap, path: &Path) -> Result<WriteStats, SnapshotError> {
    let regions = layout(mem);
    // SAFETY: forwarded from the caller.
    unsafe { write_selected(mem, path, &DirtyBitmap::all(&regions), true, true) }
}

/// Writes the pages `dirty` marks to `path` at their place, creating it (sparse) if needed
/// and leaving every other byte of an existing file as it was.
///
/// # Safety
/// As for [`write_full`].
pub unsafe fn write_diff(
    mem: &GuestMemoryMmap,
    path: &Path,
    dirty: &DirtyBitmap,
) -> Result<WriteStats, SnapshotError> {
    // SAFETY: forwarded from the caller.
    unsafe { write_selected(mem, path, dirty, false, false) }
}

/// With `replace`, the pages go to a new file renamed over `path`; otherwise into `path` in
/// place (created if needed).
///
/// # Safety
/// As for [`write_full`].
unsafe fn write_selected(
    mem: &GuestMemoryMmap,
    path: &Path,
    pages: &DirtyBitmap,
    replace: bool,
    skip_zero: bool,
) -> Result<WriteStats, SnapshotError> {
    if pages.regions() != layout(mem).as_slice() {
        return Err(SnapshotError::Mismatch(
            "the dirty bitmap does not cover guest memory's regions".into(),
        ));
    }
    // SAFETY: forwarded from the caller.
    let write = |file: &File| unsafe { write_pages_of(mem, file, path, pages, skip_zero) };
    if replace {
        return crate::format::replace_file(path, |file, _| write(file));
    }
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(SnapshotError::io(path))?;
    let stats = write(&file)?;
    file.sync_data().map_err(SnapshotError::io(path))?;
    Ok(stats)
}

/// Writes the pages `pages` selects into `file` (named `path` in errors), growing it to the
/// size of guest memory if it is smaller.
///
/// # Safety
/// As for [`write_full`].
unsafe fn write_pages_of(
    mem: &GuestMemoryMmap,
    file: &File,
    path: &Path,
    pages: &DirtyBitmap,
    skip_zero: bool,
) -> Result<WriteStats, SnapshotError> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    if file.metadata().map_err(SnapshotError::io(path))?.len() < total {
        file.set_len(total).map_err(SnapshotError::io(path))?;
    }
    let mut stats = WriteStats {
        covered: total,
        written: 0,
    };
    // Anonymous memory never touched reads as zero: with `skip_zero`, only pages that are
    // present or swapped out (pagemap bits 63, 62) are looked at, so untouched memory is
    // neither scanned nor faulted in.
    let touched = if skip_zero {
        pagemap_pages(mem, |e| e >> 62 != 0).ok()
    } else {
        None
    };
    let mut base = 0u64;
    for (i, r) in mem.iter().enumerate() {
        // SAFETY: the caller guarantees guest memory is not written meanwhile.
        let bytes = unsafe { region_bytes(r) };
        let runs = match &touched {
            Some(t) if r.file_offset().is_none() => {
                let mut both = pages.clone();
                both.intersect(t);
                both.runs(i)
            }
            _ => pages.runs(i),
        };
        stats.written += write_pages(file, path, bytes, base, &runs, skip_zero)?;
        base += r.len();
    }
    Ok(stats)
}

/// Merges the data of `diff` (every extent that is not a hole) onto `base` at the same
/// offsets: `base` then holds the memory of the diff's snapshot. Returns the diff's bytes
/// copied.
///
/// The merged file is a new one that replaces `base` (see [`crate::format::replace_file`]),
/// so guests restored from the old `base` and still running on it (clones map it privately
/// and read untouched pages from it) keep their memory as it was.
pub fn rebase(base: &Path, diff: &Path) -> Result<u64, SnapshotError> {
    let src = File::open(diff).map_err(SnapshotError::io(diff))?;
    let old = File::open(base).map_err(SnapshotError::io(base))?;
    let len = src.metadata().map_err(SnapshotError::io(diff))?.len();
    let meta = old.metadata().map_err(SnapshotError::io(base))?;
    if meta.len() < len {
        return Err(SnapshotError::Mismatch(format!(
            "{} is smaller than the diff {}",
            base.display(),
            diff.display()
        )));
    }
    crate::format::replace_file(base, |dst, tmp| {
        dst.set_permissions(meta.permissions())
            .and_then(|_| dst.set_len(meta.len()))
            .map_err(SnapshotError::io(tmp))?;
        let mut buf = vec![0u8; 1 << 20];
        copy_data(&old, base, dst, tmp, meta.len(), &mut buf)?;
        copy_data(&src, diff, dst, tmp, len, &mut buf)
    })
}

/// Copies every data extent of `src` below `len` into `dst` at the same offset (holes stay
/// holes); the bytes copied.
fn copy_data(
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
    len: u64,
    buf: &mut [u8],
) -> Result<u64, SnapshotError> {
    let mut copied = 0u64;
    let mut pos = 0u64;
    while pos < len {
        let Some(start) = seek(src, pos, libc::SEEK_DATA) else {
            break;
        };
        if start >= len {
            break;
        }
        let end = seek(src, start, libc::SEEK_HOLE).unwrap_or(len).min(len);
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at)
                .map_err(SnapshotError::io(src_path))?;
            dst.write_all_at(&buf[..n], at)
                .map_err(SnapshotError::io(dst_path))?;
            at += n as u64;
        }
        copied += end - start;
        pos = end;
    }
    Ok(copied)
}

/// `lseek(fd, pos, whence)`; `None` past the last data (ENXIO).
fn seek(f: &File, pos: u64, whence: i32) -> Option<u64> {
    // SAFETY: lseek on a descriptor this function borrows; no memory is involved.
    let r = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, whence) };
    (r >= 0).then_some(r as u64)
}

/// Maps the memory file at `path` as guest memory with `regions`, privately: pages are read
/// from the file when first touched, writes stay in this process.
pub fn map_private(regions: &[MemRegion], path: &Path) -> Result<GuestMemoryMmap, SnapshotError> {
    let file = Arc::new(File::open(path).map_err(SnapshotError::io(path))?);
    let total: u64 = regions.iter().map(|r| r.size).sum();
    let len = file.metadata().map_err(SnapshotError::io(path))?.len();
    if len < total {
        return Err(SnapshotError::Truncated {
            have: len,
            want: total,
        });
    }
    let mut out = Vec::with_capacity(regions.len());
    let mut offset = 0u64;
    for r in regions {
        let size = usize::try_from(r.size).map_err(|_| SnapshotError::RegionTooLarge {
            gpa: r.gpa,
            size: r.size,
        })?;
        let region = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| SnapshotError::Map { gpa: r.gpa, source })?;
        out.push(
            GuestRegionMmap::new(region, GuestAddress(r.gpa))
                .ok_or(SnapshotError::RegionOverflow(r.gpa))?,
        );
        offset += r.size;
    }
    GuestMemoryMmap::from_regions(out).map_err(SnapshotError::Regions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn tmp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("vessel-mem-{}-{name}", std::process::id()))
    }

    fn guest() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 64 * 4096),
            (GuestAddress(1 << 20), 16 * 4096),
        ])
        .unwrap()
    }

    fn allocated(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn full_file_round_trips_with_holes() {
        let mem = guest();
        mem.write_obj(0xdead_beef_u32, GuestAddress(4096 * 3 + 8))
            .unwrap();
        mem.write_obj(0x1234_u16, GuestAddress((1 << 20) + 4096 * 15))
            .unwrap();
        let p = tmp("full");
        // SAFETY: nothing else uses `mem`.
        let st = unsafe { write_full(&mem, &p) }.unwrap();
        assert_eq!(st.covered, 80 * 4096);
        assert_eq!(st.written, 2 * 4096, "zero pages are holes");
        assert!(allocated(&p) < 80 * 4096);
        let back = map_private(&layout(&mem), &p).unwrap();
        assert_eq!(
            back.read_obj::<u32>(GuestAddress(4096 * 3 + 8)).unwrap(),
            0xdead_beef
        );
        assert_eq!(
            back.read_obj::<u16>(GuestAddress((1 << 20) + 4096 * 15))
                .unwrap(),
            0x1234
        );
        // Writes to the restored guest stay private.
        back.write_obj(7u8, GuestAddress(0)).unwrap();
        let again = map_private(&layout(&mem), &p).unwrap();
        assert_eq!(again.read_obj::<u8>(GuestAddress(0)).unwrap(), 0);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn a_full_snapshot_onto_the_file_a_guest_runs_from_keeps_its_memory() {
        // A guest restored from `p` (mapped privately: untouched pages read from the file)
        // is snapshotted to `p` again, as `PUT /snapshot/create` with the same path does.
        let src = guest();
        for (i, at) in [0u64, 4096 * 7, (1 << 20) + 4096 * 3].iter().enumerate() {
            src.write_obj(0x1111_0000_u32 + i as u32, GuestAddress(*at))
                .unwrap();
        }
        let p = tmp("same-path");
        // SAFETY: nothing else uses `src`.
        unsafe { write_full(&src, &p) }.unwrap();
        let restored = map_private(&layout(&src), &p).unwrap();
        // The guest touches one page only; the other two are still the file's.
        restored
            .write_obj(0x2222_u32, GuestAddress(4096 * 7))
            .unwrap();
        // SAFETY: nothing else uses `restored`.
        unsafe { write_full(&restored, &p) }.unwrap();
        let expect = [0x1111_0000_u32, 0x2222, 0x1111_0002];
        let at = [0u64, 4096 * 7, (1 << 20) + 4096 * 3];
        let again = map_private(&layout(&src), &p).unwrap();
        for (want, at) in expect.iter().zip(at) {
            // The running guest still sees its memory, and the new file holds it.
            assert_eq!(restored.read_obj::<u32>(GuestAddress(at)).unwrap(), *want);
            assert_eq!(again.read_obj::<u32>(GuestAddress(at)).unwrap(), *want);
        }
        let dir = p.parent().unwrap();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let leftovers: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.contains(&name) && n.ends_with(".tmp")
            })
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn rebase_leaves_guests_running_on_the_old_base_alone() {
        let mem = guest();
        mem.write_obj(0xaaaa_u32, GuestAddress(4096)).unwrap();
        mem.write_obj(0xbbbb_u32, GuestAddress(4096 * 9)).unwrap();
        let (base, diff) = (tmp("rebase-live-base"), tmp("rebase-live-diff"));
        // SAFETY: nothing else uses `mem`.
        unsafe { write_full(&mem, &base) }.unwrap();
        // A clone runs on the base without having touched page 1.
        let clone = map_private(&layout(&mem), &base).unwrap();
        let _ = take_vmm_dirty(&mem);
        mem.write_obj(0xcccc_u32, GuestAddress(4096)).unwrap();
        let dirty = take_vmm_dirty(&mem);
        // SAFETY: nothing else uses `mem`.
        unsafe { write_diff(&mem, &diff, &dirty) }.unwrap();
        rebase(&base, &diff).unwrap();
        assert_eq!(clone.read_obj::<u32>(GuestAddress(4096)).unwrap(), 0xaaaa);
        let merged = map_private(&layout(&mem), &base).unwrap();
        assert_eq!(merged.read_obj::<u32>(GuestAddress(4096)).unwrap(), 0xcccc);
        assert_eq!(
            merged.read_obj::<u32>(GuestAddress(4096 * 9)).unwrap(),
            0xbbbb
        );
        let _ = std::fs::remove_file(&base);
        let _ = std::fs::remove_file(&diff);
    }

    #[test]
    fn diff_on_full_rebases_to_the_later_memory() {
        let mem = guest();
        mem.write_obj(1u64, GuestAddress(0)).unwrap();
        mem.write_obj(2u64, GuestAddress(4096 * 10)).unwrap();
        let full = tmp("base");
        let diff = tmp("diff");
        let _ = std::fs::remove_file(&diff);
        // SAFETY: nothing else uses `mem`.
        unsafe { write_full(&mem, &full) }.unwrap();
        // Later: page 10 zeroed, page 20 and the second region written.
        let mut dirty = DirtyBitmap::new(&layout(&mem));
        mem.write_obj(0u64, GuestAddress(4096 * 10)).unwrap();
        mem.write_obj(3u64, GuestAddress(4096 * 20)).unwrap();
        mem.write_obj(4u64, GuestAddress((1 << 20) + 8)).unwrap();
        dirty.mark(4096 * 10, 8);
        dirty.mark(4096 * 20, 8);
        dirty.mark((1 << 20) + 8, 8);
        // SAFETY: nothing else uses `mem`.
        let st = unsafe { write_diff(&mem, &diff, &dirty) }.unwrap();
        assert_eq!(st.written, 3 * 4096);
        rebase(&full, &diff).unwrap();
        let back = map_private(&layout(&mem), &full).unwrap();
        for (addr, want) in [
            (0u64, 1u64),
            (4096 * 10, 0),
            (4096 * 20, 3),
            ((1 << 20) + 8, 4),
        ] {
            assert_eq!(back.read_obj::<u64>(GuestAddress(addr)).unwrap(), want);
        }
        let _ = std::fs::remove_file(full);
        let _ = std::fs::remove_file(diff);
    }

    #[test]
    fn vmm_writes_are_tracked_and_reset() {
        let mem = guest();
        take_vmm_dirty(&mem);
        mem.write_obj(1u32, GuestAddress(4096 * 5 + 4)).unwrap();
        mem.write_slice(&[1; 8192], GuestAddress((1 << 20) + 4096))
            .unwrap();
        let d = take_vmm_dirty(&mem);
        assert_eq!(d.count(), 3);
        assert!(d.is_dirty(4096 * 5));
        assert!(d.is_dirty((1 << 20) + 2 * 4096));
        assert_eq!(take_vmm_dirty(&mem).count(), 0, "reading resets");
        // Restored memory tracks too.
        let p = tmp("track");
        // SAFETY: nothing else uses `mem`.
        unsafe { write_full(&mem, &p) }.unwrap();
        let back = map_private(&layout(&mem), &p).unwrap();
        take_vmm_dirty(&back);
        back.write_obj(9u8, GuestAddress(0)).unwrap();
        assert_eq!(take_vmm_dirty(&back).runs(0), [(0, 1)]);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn working_sets_are_recorded_saved_and_prefetched() {
        let mem = guest();
        mem.write_obj(5u8, GuestAddress(7 * 4096)).unwrap();
        let p = tmp("ws-mem");
        // SAFETY: nothing else uses `mem`.
        unsafe { write_full(&mem, &p) }.unwrap();
        let back = map_private(&layout(&mem), &p).unwrap();
        assert_eq!(
            resident_pages(&back).unwrap().count(),
            0,
            "nothing touched yet"
        );
        let _ = back.read_obj::<u8>(GuestAddress(7 * 4096)).unwrap();
        let _ = back
            .read_obj::<u8>(GuestAddress((1 << 20) + 3 * 4096))
            .unwrap();
        let ws = resident_pages(&back).unwrap();
        assert!(ws.is_dirty(7 * 4096) && ws.is_dirty((1 << 20) + 3 * 4096));
        let f = tmp("ws");
        save_working_set(&f, &ws).unwrap();
        let loaded = load_working_set(&f, &layout(&mem)).unwrap();
        assert_eq!(loaded, ws);
        // A fresh mapping with the set prefetched has those pages resident up front.
        let again = map_private(&layout(&mem), &p).unwrap();
        assert_eq!(prefetch(&again, &loaded), ws.count() * 4096);
        // (The kernel maps neighbouring cached pages too: fault-around.)
        let mut resident = resident_pages(&again).unwrap();
        let before = resident.clone();
        resident.merge(&ws);
        assert_eq!(resident, before, "every prefetched page is resident");
        let _ = std::fs::remove_file(p);
        let _ = std::fs::remove_file(f);
    }

    #[test]
    fn short_files_and_foreign_layouts_are_refused() {
        let mem = guest();
        let p = tmp("short");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        assert!(matches!(
            map_private(&layout(&mem), &p),
            Err(SnapshotError::Truncated { .. })
        ));
        let other = DirtyBitmap::new(&[MemRegion { gpa: 0, size: 4096 }]);
        // SAFETY: nothing else uses `mem`.
        assert!(unsafe { write_diff(&mem, &p, &other) }.is_err());
        assert!(map_private(&layout(&mem), Path::new("/nonexistent/mem")).is_err());
        let _ = std::fs::remove_file(p);
    }
}
