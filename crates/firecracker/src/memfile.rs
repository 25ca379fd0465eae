//! [`MemFile`]: data in a memfd, handed to code that opens files by path (the VMM's disk
//! and boot loaders) as its `/proc/self/fd/N` path. The path only means this file in this
//! process, while the `MemFile` lives.

use std::path::PathBuf;

/// A file in memory (a memfd), named by its `/proc/self/fd` path while it is open.
#[derive(Debug)]
pub struct MemFile {
    file: std::fs::File,
}

impl MemFile {
    /// A memfd named `name` (shown in `/proc/PID/fd` as `/memfd:NAME`) holding `data`.
    pub fn new(name: &std::ffi::CStr, data: &[u8]) -> Result<MemFile, String> {
        use std::io::Write;
        use std::os::fd::FromRawFd;
        // SAFETY: a NUL-terminated name and a flag; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("memfd: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor owned by nothing else.
        let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.write_all(data).map_err(|e| format!("memfd: {e}"))?;
        Ok(MemFile { file })
    }

    /// The `/proc/self/fd/N` path that opens the file (in this process only).
    pub fn path(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

/// True for a path that names a descriptor of the process that uses it (`/proc/self/fd/N`,
/// as a [`MemFile`]): another process (a restored or migrated VM's) cannot open it.
pub fn is_process_local(path: &std::path::Path) -> bool {
    path.starts_with("/proc/self/fd") || path.starts_with("/dev/fd")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memfile_reads_back_through_its_path_while_it_lives() {
        let f = MemFile::new(c"vessel-test", b"hello").unwrap();
        let p = f.path();
        assert!(is_process_local(&p));
        assert_eq!(std::fs::read(&p).unwrap(), b"hello");
        drop(f);
        assert_ne!(std::fs::read(&p).ok().as_deref(), Some(&b"hello"[..]));
        assert!(!is_process_local(std::path::Path::new("/var/lib/disk.img")));
    }
}
