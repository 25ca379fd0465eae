//! Gives back the pages of code and read-only data that one phase of the process used and
//! later ones do not: argument parsing, filter compilation and the API server's start, then
//! the VM's build (kernel loading, tables, device setup). They stay in the page cache, shared
//! with every other process of the same binary; only this process's mappings of them go, so
//! its resident set is what it runs from then on (code used again is mapped back on its next
//! use, a minor fault). Firecracker's tools judge a VMM by that figure.
//!
//! Only file-backed segments that are not writable are released: their pages are the file's
//! (never changed by the process: no text relocations), so nothing is lost. Writable segments,
//! RELRO included, keep their pages. Free heap memory goes back too (`malloc_trim`).

use std::ffi::{c_int, c_void, CStr};

/// Releases this process's mappings of read-only code and data, and free heap pages.
pub fn release_pages() {
    // SAFETY: dl_iterate_phdr calls `each_object` once per loaded object with a valid
    // `dl_phdr_info`, under the loader's lock; `each_object` only reads it and calls madvise.
    unsafe { libc::dl_iterate_phdr(Some(each_object), std::ptr::null_mut()) };
    // SAFETY: malloc_trim only returns free memory at the top of heaps to the kernel.
    unsafe { libc::malloc_trim(0) };
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
}
