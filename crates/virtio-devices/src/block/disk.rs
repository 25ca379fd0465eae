//! The backing image of a virtio-blk device: a raw file, a host block device or a qcow2 image
//! ([`super::qcow2`]), opened once, with the few operations requests need (vectored positional
//! reads and writes straight between the image and guest memory, `fdatasync`, hole punching
//! and zeroing).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::qcow2::{is_qcow2, Qcow2Image};
use super::{BlockError, SECTOR_SIZE};

/// Bytes of a device serial (`VIRTIO_BLK_ID_BYTES`).
pub const SERIAL_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;

/// Most iovecs one `preadv`/`pwritev` takes (Linux `UIO_MAXIOV`).
pub const IOV_MAX: usize = 1024;

/// The format of a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// The guest's bytes as they are: a file or a host block device.
    #[default]
    Raw,
    /// QEMU's copy-on-write format, with backing files.
    Qcow2,
}

/// An open disk image.
#[derive(Debug)]
pub struct Disk {
    /// The image file (for a qcow2 image: its top layer, for the serial and metadata only).
    file: File,
    /// `Some` for a qcow2 image: every request goes through it.
    qcow2: Option<Qcow2Image>,
    /// Usable size in bytes: the file size rounded down to a whole sector (changes when the
    /// backing file is replaced).
    size: AtomicU64,
    read_only: bool,
    serial: [u8; SERIAL_BYTES],
}

/// Zeros written where the file system cannot punch or zero a range itself.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

impl Disk {
    /// Opens the image at `path`; `format` `None` detects it from the header.
    pub fn open(
        path: &Path,
        read_only: bool,
        serial: Option<&str>,
        format: Option<DiskFormat>,
    ) -> Result<Disk, BlockError> {
        let p = || PathBuf::from(path);
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open { path: p(), source })?;
        let meta = file
            .metadata()
            .map_err(|source| BlockError::Open { path: p(), source })?;
        let ft = meta.file_type();
        if !ft.is_file() && !ft.is_block_device() {
            return Err(BlockError::NotAFileOrBlockDevice { path: p() });
        }
        let format = match format {
            Some(f) => f,
            None if is_qcow2(&file).map_err(|source| BlockError::Open { path: p(), source })? => {
                DiskFormat::Qcow2
            }
            None => DiskFormat::Raw,
        };
        let qcow2 = match format {
            DiskFormat::Raw => None,
            DiskFormat::Qcow2 => Some(
                Qcow2Image::open(path, read_only)
                    .map_err(|source| BlockError::Qcow2 { path: p(), source })?,
            ),
        };
        let raw_size = match &qcow2 {
            Some(q) => q.size(),
            // `seek(End)` gives the size of block devices too (their metadata length is 0).
            None => (&file)
                .seek(SeekFrom::End(0))
                .map_err(|source| BlockError::Size { path: p(), source })?,
        };
        let size = raw_size - raw_size % SECTOR_SIZE;
        if size != raw_size {
            log::warn!(
                "{}: size {raw_size} is not a multiple of {SECTOR_SIZE}; the last {} bytes are not used",
                path.display(),
                raw_size - size
            );
        }
        // An empty disk is a valid device of no sectors, as in Firecracker: Kata Containers
        // configures 0-byte placeholder drives and swaps the real file in later with
        // `PATCH /drives/{id}` (the capacity follows the new file).
        if size == 0 {
            log::info!("{}: an empty disk (0 sectors)", path.display());
        }
        let serial = match serial {
            Some(s) => {
                if s.len() > SERIAL_BYTES {
                    return Err(BlockError::SerialTooLong(s.to_string()));
                }
                s.to_string()
            }
            // Stable for the same file: device and inode (or the device number of a block
            // device), at most 20 characters.
            None if ft.is_block_device() => format!("vb{:x}", meta.rdev()),
            None => format!("vb{:x}-{:x}", meta.dev(), meta.ino()),
        };
        let mut id = [0u8; SERIAL_BYTES];
        let n = serial.len().min(SERIAL_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Ok(Disk {
            file,
            qcow2,
            size: AtomicU64::new(size),
            read_only,
            serial: id,
        })
    }

    /// The image's format.
    pub fn format(&self) -> DiskFormat {
        match self.qcow2 {
            Some(_) => DiskFormat::Qcow2,
            None => DiskFormat::Raw,
        }
    }

    /// A disk over any open file (tests use pipes to hold requests in flight).
    #[cfg(test)]
    pub fn from_file(file: File, size: u64, read_only: bool) -> Disk {
        Disk {
            file,
            qcow2: None,
            size: AtomicU64::new(size),
            read_only,
            serial: [0; SERIAL_BYTES],
        }
    }

    /// Usable size in bytes (a multiple of [`SECTOR_SIZE`]).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Makes `other`'s file the backing file of this disk, keeping this disk's descriptor
    /// number (so requests submitted afterwards, by either engine, reach the new file) and
    /// taking `other`'s size. Requests already in the kernel finish on the old file.
    /// Raw images only: a qcow2 image on either side is refused (`EOPNOTSUPP`).
    pub fn replace_with(&self, other: Disk) -> io::Result<()> {
        if self.qcow2.is_some() || other.qcow2.is_some() {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        // SAFETY: both descriptors are open and owned by live `File`s; dup3 atomically makes
        // our descriptor number refer to `other`'s open file (closing our old one), so
        // `self.file` stays a valid, owned descriptor. `other` then closes its own copy.
        let r = unsafe {
            libc::dup3(
                other.file.as_raw_fd(),
                self.file.as_raw_fd(),
                libc::O_CLOEXEC,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        self.size.store(other.size(), Ordering::Release);
        Ok(())
    }

    /// The image's file descriptor, for io_uring submissions: raw images only (a qcow2
    /// image's requests need its metadata, so they go through [`Disk::transfer`]).
    pub fn fd(&self) -> Option<std::os::unix::io::RawFd> {
        self.qcow2.is_none().then(|| self.file.as_raw_fd())
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The serial as `GET_ID` returns it: NUL-padded to 20 bytes.
    pub fn serial(&self) -> &[u8; SERIAL_BYTES] {
        &self.serial
    }

    /// Reads (`write == false`) or writes the whole of `iovs` at `offset`, going on after
    /// short transfers. `iovs` is consumed (advanced) in place.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that stays mapped, and that may be written (for a
    /// read), for the duration of the call.
    pub unsafe fn transfer(
        &self,
        iovs: &mut [libc::iovec],
        mut offset: u64,
        write: bool,
    ) -> io::Result<u64> {
        if let Some(q) = &self.qcow2 {
            // SAFETY: the caller's guarantees, passed on.
            let n = unsafe { q.transfer(iovs, offset, write) }?;
            // Consumed, as a raw transfer leaves them.
            for v in iovs.iter_mut() {
                v.iov_len = 0;
            }
            return Ok(n);
        }
        let fd = self.file.as_raw_fd();
        let mut total = 0u64;
        let mut at = 0usize;
        loop {
            // Zero-length iovecs at the front would make the call return 0.
            while at < iovs.len() && iovs[at].iov_len == 0 {
                at += 1;
            }
            if at == iovs.len() {
                return Ok(total);
            }
            let cnt = (iovs.len() - at).min(IOV_MAX);
            let off = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            let ptr = iovs[at..].as_ptr();
            // SAFETY: the caller guarantees the iovecs point to valid memory; `cnt` iovecs
            // exist from `ptr` on.
            let n = unsafe {
                if cnt == 1 {
                    // One buffer: the plain call is a little cheaper.
                    let v = *ptr;
                    if write {
                        libc::pwrite(fd, v.iov_base, v.iov_len, off)
                    } else {
                        libc::pread(fd, v.iov_base, v.iov_len, off)
                    }
                } else if write {
                    libc::pwritev(fd, ptr, cnt as libc::c_int, off)
                } else {
                    libc::preadv(fd, ptr, cnt as libc::c_int, off)
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                // The file shrank under us.
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let mut n = n as usize;
            total += n as u64;
            offset += n as u64;
            // Skip what was transferred.
            while n > 0 {
                let Some(v) = iovs.get_mut(at) else { break };
                if n < v.iov_len {
                    // SAFETY: stays within the iovec's buffer since `n < iov_len`.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                    v.iov_len -= n;
                    n = 0;
                } else {
                    n -= v.iov_len;
                    at += 1;
                }
            }
        }
    }

    /// Reads `buf.len()` bytes at `offset` into `buf` (host-side reads of an image, e.g. to
    /// find the kernel it boots).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.size())
        {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the one iovec is `buf`, borrowed mutably for the whole call.
        unsafe { self.transfer(&mut iov, offset, false) }.map(drop)
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> io::Result<()> {
        match &self.qcow2 {
            Some(q) => q.flush(),
            None => self.file.sync_data(),
        }
    }

    /// Discards `[offset, offset + len)`: punches a hole, or writes zeros where the host
    /// cannot.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if let Some(q) = &self.qcow2 {
            return q.write_zeroes(offset, len);
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if self.fallocate(mode, offset, len).is_ok() {
            return Ok(());
        }
        self.write_zeros(offset, len)
    }

    /// Zeroes `[offset, offset + len)`, deallocating it if `unmap` (hole punching reads back as
    /// zeros), falling back to writing zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if let Some(q) = &self.qcow2 {
            return q.write_zeroes(offset, len);
        }
        if unmap {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            if self.fallocate(mode, offset, len).is_ok() {
                return Ok(());
            }
        }
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if self.fallocate(mode, offset, len).is_ok() {
            return Ok(());
        }
        self.write_zeros(offset, len)
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let len =
            libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: plain syscall on a file descriptor we own; no memory is passed.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn write_zeros(&self, mut offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        while offset < end {
            let n = (end - offset).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}
