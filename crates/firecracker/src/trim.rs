//! Gives back the pages of code and read-only data that one phase of the process used and
//! later ones do not: argument parsing, filter compilation and the API server's start, then
//! the VM's build (kernel loading, tables, device setup). They stay in the page cache, shared
//! with every other process of the same binary; only this process's mappings of them go, so
//! its resident set is what it runs from then on (code used again is mapped back on its next
//! use, a minor fault). Firecracker's tools judge a VMM by that figure.
//!
//! Only file-backed segments that are not writable are released: their pages are the file's
//! (never changed by the process: no text relocations), so nothing is lost. Writable segments,
//! RELRO included, keep their pages. Free heap memory goes back too (`malloc_trim`), and so
//! does the part of the main thread's stack below its current frames: the deepest calls (the
//! VM's build, argument parsing) left tens of KiB there that nothing reads again.

use std::ffi::{c_int, c_void, CStr};

/// Releases this process's mappings of read-only code and data, and free heap pages.
pub fn release_pages() {
    // SAFETY: dl_iterate_phdr calls `each_object` once per loaded object with a valid
    // `dl_phdr_info`, under the loader's lock; `each_object` only reads it and calls madvise.
    unsafe { libc::dl_iterate_phdr(Some(each_object), std::ptr::null_mut()) };
    // SAFETY: malloc_trim only returns free memory at the top of heaps to the kernel.
    unsafe { libc::malloc_trim(0) };
    release_stack_below_caller();
}

unsafe extern "C" fn each_object(
    info: *mut libc::dl_phdr_info,
    _size: usize,
    _data: *mut c_void,
) -> c_int {
    // SAFETY: the loader passes a valid info for the duration of the call.
    let info = unsafe { &*info };
    if !info.dlpi_name.is_null() {
        // SAFETY: a non-null dlpi_name is a NUL-terminated string owned by the loader.
        let name = unsafe { CStr::from_ptr(info.dlpi_name) };
        // The vDSO's pages are the kernel's, not a file's.
        if name.to_bytes().starts_with(b"linux-vdso") {
            return 0;
        }
    }
    let page = 4096usize;
    for i in 0..usize::from(info.dlpi_phnum) {
        // SAFETY: dlpi_phdr points at dlpi_phnum program headers.
        let p = unsafe { &*info.dlpi_phdr.add(i) };
        if p.p_type != libc::PT_LOAD || p.p_flags & libc::PF_W != 0 {
            continue;
        }
        let start = (info.dlpi_addr as usize).wrapping_add(p.p_vaddr as usize);
        let end = start.wrapping_add(p.p_memsz as usize);
        let (start, end) = (start & !(page - 1), (end + page - 1) & !(page - 1));
        if end <= start {
            continue;
        }
        // SAFETY: [start, end) is a read-only, file-backed segment of a loaded object;
        // MADV_DONTNEED only drops this process's mappings of its (unmodified) pages, which
        // the next access maps again from the file. A failure changes nothing.
        unsafe { libc::madvise(start as *mut c_void, end - start, libc::MADV_DONTNEED) };
    }
    0
}

/// What is kept below the caller's frame: the frames of the calls made from here (madvise,
/// reading `/proc/self/maps`) and signal handlers that may run on this stack meanwhile.
const STACK_KEPT_BELOW: usize = 16 * 1024;

/// Gives back the main thread's stack pages below the caller's frame (less
/// [`STACK_KEPT_BELOW`]): they hold only the dead frames of deeper calls made earlier. Only
/// the main thread's stack (`[stack]` in `/proc/self/maps`) is touched; called on another
/// thread, this does nothing.
#[inline(never)]
fn release_stack_below_caller() {
    let here = 0u8;
    let sp = std::hint::black_box(&here) as *const u8 as usize;
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    if let Some((low, end)) = dead_stack(&maps, sp) {
        // SAFETY: [low, end) is the part of the main thread's stack mapping more than
        // STACK_KEPT_BELOW below this frame, and this is the main thread (the stack pointer
        // is in that mapping): no live frame or object is there, the stack growing down and
        // everything this call chain uses lying above `end`. MADV_DONTNEED makes those pages
        // read as zeros on their next use, which is what a fresh stack page is.
        unsafe { libc::madvise(low as *mut c_void, end - low, libc::MADV_DONTNEED) };
    }
}

/// The dead part of the main thread's stack, `[low, end)`, for a frame at `sp`: from the
/// bottom of the `[stack]` mapping in `maps` (`/proc/self/maps`) to [`STACK_KEPT_BELOW`]
/// under `sp`, page-aligned. None when `sp` is not on that stack (another thread) or nothing
/// is that far below it.
fn dead_stack(maps: &str, sp: usize) -> Option<(usize, usize)> {
    let (low, high) = maps
        .lines()
        .filter(|l| l.ends_with("[stack]"))
        .find_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })?;
    if !(low..high).contains(&sp) {
        return None;
    }
    let end = sp.saturating_sub(STACK_KEPT_BELOW) & !4095;
    (end > low).then_some((low, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_file_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("RssFile:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap()
    }

    #[test]
    fn released_code_runs_again_and_the_resident_set_shrinks() {
        let before = rss_file_kib();
        release_pages();
        let after = rss_file_kib();
        assert!(after < before, "{before} -> {after} KiB");
        // Code and constants released are mapped back as they are used.
        let v: Vec<String> = (0..100).map(|i| format!("{i:x}")).collect();
        assert_eq!(v[99], "63");
        release_pages();
    }

    const MAPS: &str = "55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0 [heap]\n\
                        7ffc10000000-7ffc10100000 rw-p 00000000 00:00 0 [stack]\n\
                        7ffc10200000-7ffc10202000 r-xp 00000000 00:00 0 [vdso]\n";

    #[test]
    fn the_dead_stack_is_below_the_frame_less_what_is_kept() {
        let sp = 0x7ffc_100f_0123;
        assert_eq!(
            dead_stack(MAPS, sp),
            Some((0x7ffc_1000_0000, (sp - STACK_KEPT_BELOW) & !4095))
        );
        // Another thread's frame (not on [stack]) releases nothing, nor does a frame too
        // close to the stack's bottom.
        assert_eq!(dead_stack(MAPS, 0x55d0_c000_1000), None);
        assert_eq!(dead_stack(MAPS, 0x7ffc_1000_3000), None);
        assert_eq!(dead_stack("", sp), None);
    }

    #[test]
    fn releasing_off_the_main_thread_keeps_the_caller_data() {
        let kept = [7u8; 4096];
        release_stack_below_caller();
        assert!(std::hint::black_box(&kept).iter().all(|&b| b == 7));
    }
}
