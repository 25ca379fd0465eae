//! qcow2 images behind a virtio-blk device, through the `imago` crate (qcow2 v2 and v3,
//! backing chains, zero clusters; the same crate libkrun uses), in its synchronous mode: the
//! block worker calls it directly, as it calls `preadv` for a raw image.
//!
//! What Vessel adds around it: backing files are opened read-only, at most
//! [`MAX_CHAIN`] deep, and a chain that names an image twice (a loop) is refused instead of
//! recursing; an image with the dirty bit or an incompatible feature imago does not know is
//! refused by imago when it is opened.

use std::io;
use std::path::{Path, PathBuf};

use imago::file::File as ImageFile;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, Storage, StorageOpenOptions};

/// The magic at the start of every qcow2 image.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// The longest backing chain opened (the image itself included).
pub const MAX_CHAIN: usize = 16;

/// An open qcow2 image, with its backing chain.
pub struct Qcow2Image {
    access: FormatAccess<ImageFile>,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("size", &self.access.size())
            .finish()
    }
}

/// Opens backing images: read-only, refusing loops and chains longer than [`MAX_CHAIN`].
struct ChainGate {
    /// The canonical paths of the images above the one being opened.
    chain: Vec<PathBuf>,
}

impl ChainGate {
    /// The gate for the backing files of `image` (canonical), below `self.chain`.
    fn below(&self, image: PathBuf) -> io::Result<ChainGate> {
        if self.chain.contains(&image) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("backing chain loop: {} names itself", image.display()),
            ));
        }
        if self.chain.len() >= MAX_CHAIN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("backing chain deeper than {MAX_CHAIN} images"),
            ));
        }
        let mut chain = self.chain.clone();
        chain.push(image);
        Ok(ChainGate { chain })
    }
}

/// `path`, resolved; a missing file is named in the error, and so is anything but a regular
/// file or a block device (an image naming a FIFO or `/dev/stdin` would block the open).
fn canonical(path: &Path) -> io::Result<PathBuf> {
    let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let resolved = std::fs::canonicalize(path).map_err(named)?;
    let kind = std::fs::metadata(&resolved).map_err(named)?.file_type();
    if !kind.is_file() && !std::os::unix::fs::FileTypeExt::is_block_device(&kind) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file or a block device", path.display()),
        ));
    }
    Ok(resolved)
}

impl imago::format::gate::ImplicitOpenGate<ImageFile> for ChainGate {
    fn open_format<F: FormatDriverBuilder<ImageFile>>(
        &mut self,
        builder: F,
    ) -> io::Result<FormatAccess<ImageFile>> {
        let path = builder.get_image_path().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "a backing image without a path")
        })?;
        let below = self.below(canonical(&path)?)?;
        Ok(FormatAccess::new(builder.write(false).open(below)?))
    }

    fn open_storage(&mut self, options: StorageOpenOptions) -> io::Result<ImageFile> {
        // A raw backing file is opened here directly, without `open_format`.
        if let Some(path) = options.get_filename() {
            canonical(path)?;
        }
        // Writable only for the writable image's own data file: backing images are opened
        // read-only above, and their storage with them.
        ImageFile::open(options)
    }
}

impl Qcow2Image {
    /// Opens the qcow2 image at `path` (writable unless `read_only`) and its backing chain.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Qcow2Image> {
        let gate = ChainGate { chain: Vec::new() }.below(canonical(path)?)?;
        let image = Qcow2::<ImageFile>::builder_path(path)
            .write(!read_only)
            .open(gate)?;
        Ok(Qcow2Image {
            access: FormatAccess::new(image),
        })
    }

    /// The guest-visible size in bytes.
    pub fn size(&self) -> u64 {
        self.access.size()
    }

    /// Reads (`write == false`) or writes the whole of `iovs` at `offset`; returns the bytes
    /// moved.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that stays mapped, and that may be written (for a
    /// read), for the duration of the call, and no two may overlap.
    pub unsafe fn transfer(
        &self,
        iovs: &[libc::iovec],
        offset: u64,
        write: bool,
    ) -> io::Result<u64> {
        let iovs = iovs.iter().filter(|v| v.iov_len > 0);
        if write {
            let mut v = IoVector::new();
            for iov in iovs {
                // SAFETY: the caller guarantees the buffer is mapped for the call.
                v.push(unsafe { std::slice::from_raw_parts(iov.iov_base.cast(), iov.iov_len) });
            }
            let n = v.len();
            self.access.writev(v, offset)?;
            Ok(n)
        } else {
            let mut v = IoVectorMut::new();
            for iov in iovs {
                // SAFETY: the caller guarantees the buffer is mapped, writable and not
                // aliased by another iovec for the call.
                v.push(unsafe { std::slice::from_raw_parts_mut(iov.iov_base.cast(), iov.iov_len) });
            }
            let n = v.len();
            self.access.readv(v, offset)?;
            Ok(n)
        }
    }

    /// Writes out cached metadata and makes every completed write durable.
    pub fn flush(&self) -> io::Result<()> {
        self.access.flush()?;
        self.access.sync()
    }

    /// Zeroes `[offset, offset + len)` (zero clusters where the image allows).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.access.write_zeroes(offset, len)
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        // The L2 and refcount caches hold metadata not yet written.
        if let Err(e) = self.access.flush() {
            log::warn!("qcow2: flushing the image's metadata on close: {e}");
        }
    }
}

/// Whether the file at `path` starts with the qcow2 magic.
pub fn is_qcow2(file: &std::fs::File) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 4];
    match file.read_exact_at(&mut magic, 0) {
        Ok(()) => Ok(magic == QCOW2_MAGIC),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockError, Disk, DiskFormat};
    use std::process::Command;

    const MIB: usize = 1 << 20;

    /// A fresh directory for one test.
    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vessel-qcow2-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Runs `qemu-img` (Debian's qemu-utils); `None` when it is not installed.
    fn qemu_img(args: &[&str]) -> Option<std::process::Output> {
        let out = Command::new("qemu-img").args(args).output().ok()?;
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(out)
    }

    /// A raw base image with a recognizable pattern, and a qcow2 overlay backed by it.
    fn overlay(dir: &Path) -> Option<(PathBuf, PathBuf, Vec<u8>)> {
        let base = dir.join("base.raw");
        let pattern: Vec<u8> = (0..MIB).map(|i| (i / 512) as u8 ^ (i as u8)).collect();
        std::fs::write(&base, &pattern).unwrap();
        let top = dir.join("top.qcow2");
        let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "raw", t])?;
        Some((base, top, pattern))
    }

    fn read(disk: &Disk, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        }];
        // SAFETY: `buf` is ours and outlives the call.
        let n = unsafe { disk.transfer(&mut iov, offset, false) }.unwrap();
        assert_eq!(n, len as u64);
        buf
    }

    fn write(disk: &Disk, offset: u64, data: &[u8]) {
        let (a, b) = data.split_at(data.len() / 3);
        let mut iov = [
            libc::iovec {
                iov_base: a.as_ptr().cast_mut().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_ptr().cast_mut().cast(),
                iov_len: b.len(),
            },
        ];
        // SAFETY: both buffers outlive the call; a write only reads them.
        let n = unsafe { disk.transfer(&mut iov, offset, true) }.unwrap();
        assert_eq!(n, data.len() as u64);
    }

    #[test]
    fn an_overlay_reads_through_to_its_backing_file_and_keeps_its_own_writes() {
        let dir = scratch("overlay");
        let Some((base, top, pattern)) = overlay(&dir) else {
            eprintln!("note: qemu-img is not installed (Debian's qemu-utils)");
            return;
        };
        let disk = Disk::open(&top, false, None, None).unwrap();
        assert_eq!(disk.format(), DiskFormat::Qcow2, "detected from the header");
        assert_eq!(disk.size(), MIB as u64);
        assert_eq!(disk.fd(), None, "no io_uring on a qcow2 image");
        assert_eq!(read(&disk, 4096, 8192), pattern[4096..4096 + 8192]);
        // A write across a cluster boundary, from two buffers.
        let data = vec![0xabu8; 96 * 1024];
        write(&disk, 60 * 1024, &data);
        disk.write_zeroes(512 * 1024, 64 * 1024, false).unwrap();
        disk.discard(768 * 1024, 4096).unwrap();
        assert_eq!(read(&disk, 60 * 1024, data.len()), data);
        assert_eq!(read(&disk, 512 * 1024, 64 * 1024), vec![0u8; 64 * 1024]);
        assert_eq!(read(&disk, 768 * 1024, 4096), vec![0u8; 4096]);
        disk.flush().unwrap();
        drop(disk);

        // QEMU reads the same image back: consistent, with the writes, over the base.
        let t = top.to_str().unwrap();
        qemu_img(&["check", "-q", t]).unwrap();
        let out = dir.join("out.raw");
        qemu_img(&["convert", "-O", "raw", t, out.to_str().unwrap()]).unwrap();
        let mut want = pattern.clone();
        want[60 * 1024..60 * 1024 + data.len()].copy_from_slice(&data);
        want[512 * 1024..576 * 1024].fill(0);
        want[768 * 1024..768 * 1024 + 4096].fill(0);
        assert!(
            std::fs::read(&out).unwrap() == want,
            "qemu-img sees other bytes"
        );
        assert!(
            std::fs::read(&base).unwrap() == pattern,
            "the backing file is never written"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_read_only_qcow2_disk_refuses_writes_and_format_raw_reads_the_container() {
        let dir = scratch("ro");
        let Some((_, top, pattern)) = overlay(&dir) else {
            eprintln!("note: qemu-img is not installed (Debian's qemu-utils)");
            return;
        };
        let disk = Disk::open(&top, true, None, Some(DiskFormat::Qcow2)).unwrap();
        assert_eq!(read(&disk, 0, 4096), pattern[..4096]);
        let mut byte = [1u8];
        let mut iov = [libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        }];
        // SAFETY: `byte` outlives the call.
        assert!(unsafe { disk.transfer(&mut iov, 0, true) }.is_err());
        drop(disk);
        // Told it is raw, the file is the guest's bytes: the qcow2 header itself.
        let raw = Disk::open(&top, true, None, Some(DiskFormat::Raw)).unwrap();
        assert_eq!(raw.format(), DiskFormat::Raw);
        assert_eq!(read(&raw, 0, 4), QCOW2_MAGIC);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The error's whole text, sources included.
    fn refusal(path: &Path) -> String {
        match Disk::open(path, false, None, None) {
            Ok(_) => panic!("{} was opened", path.display()),
            Err(e @ BlockError::Qcow2 { .. }) => vessel_virtio::ErrorChain(&e).to_string(),
            Err(e) => panic!("not a qcow2 refusal: {e:?}"),
        }
    }

    #[test]
    fn broken_qcow2_images_are_refused_with_the_reason() {
        let dir = scratch("broken");
        let Some((base, top, _)) = overlay(&dir) else {
            eprintln!("note: qemu-img is not installed (Debian's qemu-utils)");
            return;
        };
        // Garbage behind the magic.
        let garbage = dir.join("garbage.qcow2");
        let mut bytes = QCOW2_MAGIC.to_vec();
        bytes.extend((0..4096u32).map(|i| (i * 7) as u8));
        std::fs::write(&garbage, &bytes).unwrap();
        let e = refusal(&garbage);
        assert!(e.contains("garbage.qcow2"), "{e}");

        // The dirty bit, and an incompatible feature nobody knows (bit 40).
        for (name, bit) in [("dirty", 0u32), ("unknown", 40)] {
            let img = dir.join(format!("{name}.qcow2"));
            std::fs::copy(&top, &img).unwrap();
            let mut h = std::fs::read(&img).unwrap();
            h[72..80].copy_from_slice(&(1u64 << bit).to_be_bytes());
            std::fs::write(&img, &h).unwrap();
            let e = refusal(&img);
            assert!(e.contains("incompatible feature"), "{name}: {e}");
        }

        // A backing chain that loops: a -> b -> a.
        let (a, b) = (dir.join("a.qcow2"), dir.join("b.qcow2"));
        let (sa, sb) = (a.to_str().unwrap(), b.to_str().unwrap());
        qemu_img(&["create", "-q", "-f", "qcow2", sa, "1M"]).unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", sa, "-F", "qcow2", sb]).unwrap();
        qemu_img(&["rebase", "-q", "-u", "-b", sb, "-F", "qcow2", sa]).unwrap();
        let e = refusal(&b);
        assert!(e.contains("loop"), "{e}");

        // A backing "file" that is a character device (it could block the open) is refused.
        let dev = dir.join("dev.qcow2");
        let sd = dev.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", sd, "1M"]).unwrap();
        qemu_img(&["rebase", "-q", "-u", "-b", "/dev/zero", "-F", "raw", sd]).unwrap();
        let e = refusal(&dev);
        assert!(e.contains("not a regular file"), "{e}");

        // A missing backing file is named.
        std::fs::remove_file(&base).unwrap();
        let e = refusal(&top);
        assert!(e.contains("base.raw"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
