//! Direct boot of a disk image without firmware: Vessel opens the image on the host (raw or
//! qcow2, read-only, through the block device's own `Disk`), reads its partition table (GPT
//! with the `gpt` crate, MBR, or none), finds the ext2/3/4 filesystems (`ext4-view`) and the
//! vfat ones (FAT12/16/32: EFI System Partitions, read by this crate's own read-only reader,
//! see `fat.rs`), reads the bootloader's own configuration (GRUB's `grub.cfg`, also an ESP's
//! `/EFI/<distribution>/grub.cfg`, or Boot Loader Spec entries, see [`config`]) and returns
//! the default entry's kernel, initrd and command line, which Vessel then boots as it boots
//! any kernel: in milliseconds instead of a firmware's seconds. An image it cannot read that
//! way gets an error saying what was looked at, so that the user can boot it through
//! firmware instead.
//!
//! [`cloudinit`] makes the NoCloud seed disks (a FAT filesystem labelled `CIDATA`) that cloud
//! images wait for; [`make`] makes disk images laid out as distributions lay them out.

pub mod cloudinit;
pub mod config;
mod fat;
pub mod make;

pub use fat::FatError;

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ext4_view::{Ext4, Ext4Read};
use vessel_virtio_devices::block::{BlockError, Disk};

use crate::config::Entry;

/// Why no Linux could be found in an image.
#[derive(Debug, thiserror::Error)]
pub enum DiskBootError {
    #[error("cannot open the disk image")]
    Open(#[source] BlockError),
    #[error("{} has no Linux Vessel can boot directly (looked at: {}); boot it through firmware", path.display(), looked.join("; "))]
    NoLinux { path: PathBuf, looked: Vec<String> },
    #[error(
        "{what} of {entry:?}: {size} bytes, more than the {MAX_FILE} a kernel, or the initrds together, may be"
    )]
    TooLarge {
        what: String,
        entry: String,
        size: u64,
    },
    #[error("{what} of {entry:?} cannot be read from the image")]
    Read {
        what: String,
        entry: String,
        #[source]
        source: FsError,
    },
}

/// Why a file could not be read from one of the image's filesystems.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    Ext4(#[from] ext4_view::Ext4Error),
    #[error(transparent)]
    Vfat(#[from] FatError),
}

/// What a disk boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootImage {
    pub title: String,
    pub kernel: Vec<u8>,
    /// The initrds, concatenated (Linux takes several cpio archives one after another).
    pub initrd: Option<Vec<u8>>,
    pub cmdline: String,
    /// Where it was found, for the log: "partition 1 (ext4): /boot/grub/grub.cfg".
    pub found_in: String,
}

/// The image as a byte stream (for the partition table crates). Writes are refused.
#[derive(Debug)]
struct ImageStream {
    disk: Arc<Disk>,
    pos: u64,
}

impl Read for ImageStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.disk.size().saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        self.disk.read_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for ImageStream {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let size = self.disk.size();
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok(self.pos)
    }
}

impl Write for ImageStream {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A range of the image (a partition) for `ext4-view` and the FAT reader.
struct PartitionReader {
    disk: Arc<Disk>,
    start: u64,
    len: u64,
}

impl Ext4Read for PartitionReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let end = start_byte.checked_add(dst.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err("read past the end of the partition".into());
        }
        Ok(self.disk.read_at(dst, self.start + start_byte)?)
    }
}

impl fat::ReadAt for PartitionReader {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the partition",
            ));
        }
        self.disk.read_at(buf, self.start + offset)
    }
}

/// The partitions of the image, as (number, first byte, length); the whole image when it has
/// no partition table.
fn partitions(disk: &Arc<Disk>) -> Vec<(u32, u64, u64)> {
    let stream = || ImageStream {
        disk: disk.clone(),
        pos: 0,
    };
    let gpt = gpt::GptConfig::new()
        .writable(false)
        .open_from_device(stream());
    if let Ok(g) = gpt {
        let lb = g.logical_block_size();
        return g
            .partitions()
            .iter()
            .filter(|(_, p)| p.is_used())
            .filter_map(|(&n, p)| Some((n, p.bytes_start(*lb).ok()?, p.bytes_len(*lb).ok()?)))
            .collect();
    }
    match mbr_partitions(disk) {
        Some(parts) if !parts.is_empty() => parts,
        _ => vec![(0, 0, disk.size())],
    }
}

/// The most tables of an extended partition's chain that are read (each holds a logical
/// partition, or none).
const MAX_LOGICAL: u32 = 128;

/// The partitions of an MBR (DOS) partition table, as [`partitions`] gives them: the primary
/// ones (1 to 4) and the logical ones of an extended partition (5 on), numbered as Linux
/// numbers them; `None` without a table. Read here, not with `mbrman`, which panics on some
/// tables (a used entry at sector 0) and overflows on others.
fn mbr_partitions(disk: &Disk) -> Option<Vec<(u32, u64, u64)>> {
    // A sector of the table: the boot signature, then four entries of type, start, sectors.
    let table = |lba: u64| -> Option<[(u8, u64, u64); 4]> {
        let mut s = [0u8; 512];
        disk.read_at(&mut s, lba.checked_mul(512)?).ok()?;
        if s[510..512] != [0x55, 0xAA] {
            return None;
        }
        Some(std::array::from_fn(|i| {
            let e = &s[446 + 16 * i..462 + 16 * i];
            let le =
                |at: usize| u64::from(u32::from_le_bytes([e[at], e[at + 1], e[at + 2], e[at + 3]]));
            (e[4], le(8), le(12))
        }))
    };
    let mut parts = Vec::new();
    let mut logical = 5;
    for (i, (kind, start, sectors)) in table(0)?.into_iter().enumerate() {
        match kind {
            0 => {}
            // An extended partition: a chain of tables, each holding one logical partition
            // (its start relative to that table) and where the next table is (relative to the
            // extended partition), always further on.
            0x05 | 0x0F | 0x85 => {
                let mut next = 0;
                for _ in 0..MAX_LOGICAL {
                    let Some([(kind, at, sectors), (more, to, _), ..]) = table(start + next) else {
                        break;
                    };
                    if kind != 0 {
                        parts.push((logical, (start + next + at) * 512, sectors * 512));
                        logical += 1;
                    }
                    if more == 0 || to <= next {
                        break;
                    }
                    next = to;
                }
            }
            _ => parts.push((i as u32 + 1, start * 512, sectors * 512)),
        }
    }
    Some(parts)
}

/// Where bootloader configurations live on a filesystem, `/boot` or not (and, on an EFI System
/// Partition, in `/EFI/<distribution>/`).
const GRUB_CONFIGS: [&str; 4] = [
    "/boot/grub/grub.cfg",
    "/grub/grub.cfg",
    "/boot/grub2/grub.cfg",
    "/grub2/grub.cfg",
];
const BLS_DIRS: [&str; 2] = ["/loader/entries", "/boot/loader/entries"];

/// The largest bootloader configuration file read (a real `grub.cfg` is a few tens of KiB).
const MAX_CONFIG: u64 = 1 << 20;
/// The most `/EFI/<distribution>` directories, and the most loader entries (the newest), of a
/// filesystem that are read: a few in practice, and each costs a lookup.
const MAX_CANDIDATES: usize = 64;

/// A filesystem of the image.
enum Fs {
    Ext4(Ext4),
    Vfat(fat::Fat<PartitionReader>),
}

impl Fs {
    /// For the log and the errors: "ext4" (ext2 and ext3 too) or "vfat".
    fn kind(&self) -> &'static str {
        match self {
            Fs::Ext4(_) => "ext4",
            Fs::Vfat(_) => "vfat",
        }
    }

    /// The length of the file at `path`.
    fn file_len(&self, path: &str) -> Result<u64, FsError> {
        Ok(match self {
            Fs::Ext4(fs) => fs.metadata(path)?.len(),
            Fs::Vfat(fs) => u64::from(fs.metadata(path)?.size),
        })
    }

    fn read(&self, path: &str) -> Result<Vec<u8>, FsError> {
        Ok(match self {
            Fs::Ext4(fs) => fs.read(path)?,
            Fs::Vfat(fs) => fs.read(path)?,
        })
    }

    /// A configuration file's text; `None` when it is missing, a directory or too large.
    fn read_text(&self, path: &str) -> Option<String> {
        if self.file_len(path).ok()? > MAX_CONFIG {
            log::warn!("{path}: larger than {MAX_CONFIG} bytes, not read");
            return None;
        }
        let data = self.read(path).ok()?;
        Some(String::from_utf8_lossy(&data).into_owned())
    }

    /// The names in the directory at `path` (none when it is not one).
    fn dir_names(&self, path: &str) -> Vec<String> {
        match self {
            Fs::Ext4(fs) => fs
                .read_dir(path)
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .filter_map(|e| e.file_name().as_str().ok().map(str::to_owned))
                        .filter(|n| n != "." && n != "..")
                        .collect()
                })
                .unwrap_or_default(),
            Fs::Vfat(fs) => fs
                .read_dir(path)
                .map(|entries| entries.into_iter().map(|e| e.name).collect())
                .unwrap_or_default(),
        }
    }
}

/// The default entry a filesystem's bootloader configuration names, and the file it is in.
/// A `grub.cfg` without an entry (an ESP's stub that only finds and loads the real one with
/// `configfile`) is passed over.
fn default_entry(fs: &Fs) -> Option<(Entry, String)> {
    let mut efi = fs.dir_names("/EFI");
    efi.sort();
    efi.truncate(MAX_CANDIDATES);
    let grub = GRUB_CONFIGS
        .iter()
        .map(|c| c.to_string())
        .chain(efi.iter().map(|d| format!("/EFI/{d}/grub.cfg")));
    for cfg in grub {
        if let Some(e) = fs.read_text(&cfg).and_then(|t| config::grub_default(&t)) {
            return Some((e, cfg));
        }
    }
    for dir in BLS_DIRS {
        // The newest entry first: file names carry the version.
        let mut names: Vec<String> = fs
            .dir_names(dir)
            .into_iter()
            .filter(|n| n.to_ascii_lowercase().ends_with(".conf"))
            .map(|n| format!("{dir}/{n}"))
            .collect();
        names.sort();
        for name in names.iter().rev().take(MAX_CANDIDATES) {
            if let Some(e) = fs.read_text(name).and_then(|t| config::bls_entry(&t)) {
                return Some((e, name.clone()));
            }
        }
    }
    None
}

/// The largest kernel, and the most initrd, read from an image (they are read into memory).
pub const MAX_FILE: u64 = 1 << 30;

/// Reads `path` from the filesystem that holds it: `fs` first (GRUB's root), then the others
/// (a separate `/boot` names its files without `/boot`, and the reverse).
/// `Ok(Err(size))` for a file larger than `limit`.
type FileRead = Result<Result<Vec<u8>, u64>, FsError>;

fn read_file(filesystems: &[(u32, Fs)], first: usize, path: &str, limit: u64) -> FileRead {
    let candidates = [
        path.to_string(),
        format!("/boot{path}"),
        path.trim_start_matches("/boot").to_string(),
    ];
    let order = std::iter::once(first).chain((0..filesystems.len()).filter(|&i| i != first));
    let mut last = None;
    for i in order {
        for c in &candidates {
            let fs = &filesystems[i].1;
            match fs.file_len(c) {
                Ok(len) if len > limit => return Ok(Err(len)),
                Ok(_) => match fs.read(c) {
                    Ok(data) => return Ok(Ok(data)),
                    Err(e) => last = Some(e),
                },
                Err(e) => last = Some(e),
            }
        }
    }
    Err(last.unwrap_or(FsError::Ext4(ext4_view::Ext4Error::NotFound)))
}

/// Finds the Linux the image at `path` boots (see the crate docs).
pub fn find_linux(path: &Path) -> Result<BootImage, DiskBootError> {
    find(path, MAX_FILE)
}

/// [`find_linux`], with `max` for [`MAX_FILE`].
fn find(path: &Path, max: u64) -> Result<BootImage, DiskBootError> {
    let disk = Arc::new(Disk::open(path, true, None, None).map_err(DiskBootError::Open)?);
    let mut looked = Vec::new();
    let mut filesystems = Vec::new();
    for (n, start, len) in partitions(&disk) {
        let reader = PartitionReader {
            disk: disk.clone(),
            start,
            len,
        };
        if let Ok(fs) = Ext4::load(Box::new(reader)) {
            filesystems.push((n, Fs::Ext4(fs)));
            continue;
        }
        let reader = PartitionReader {
            disk: disk.clone(),
            start,
            len,
        };
        match fat::Fat::open(reader) {
            Ok(fs) => {
                log::debug!("partition {n}: vfat ({:?})", fs.kind());
                filesystems.push((n, Fs::Vfat(fs)));
            }
            Err(_) => looked.push(format!("partition {n}: not ext2/3/4 or vfat")),
        }
    }
    for (i, (n, fs)) in filesystems.iter().enumerate() {
        let Some((entry, cfg)) = default_entry(fs) else {
            looked.push(format!(
                "partition {n} ({}): no grub.cfg or loader entry",
                fs.kind()
            ));
            continue;
        };
        // `before`: the bytes of the initrds read before this one (they count together).
        let read = |what: &str, file: &str, before: u64| {
            let found = read_file(&filesystems, i, file, max - before);
            match found {
                Ok(Ok(data)) => Ok(data),
                Ok(Err(size)) if before == 0 => Err(DiskBootError::TooLarge {
                    what: format!("{what} {file}"),
                    entry: entry.title.clone(),
                    size,
                }),
                Ok(Err(size)) => Err(DiskBootError::TooLarge {
                    what: format!("{what}s up to {file}"),
                    entry: entry.title.clone(),
                    size: before + size,
                }),
                Err(source) => Err(DiskBootError::Read {
                    what: format!("{what} {file}"),
                    entry: entry.title.clone(),
                    source,
                }),
            }
        };
        let kernel = read("the kernel", &entry.kernel, 0)?;
        let mut initrd: Option<Vec<u8>> = None;
        for f in &entry.initrds {
            let all = initrd.get_or_insert_with(Vec::new);
            let data = read("the initrd", f, all.len() as u64)?;
            all.extend(data);
        }
        return Ok(BootImage {
            title: entry.title,
            kernel,
            initrd,
            cmdline: entry.cmdline,
            found_in: format!("partition {n} ({}): {cfg}", fs.kind()),
        });
    }
    Err(DiskBootError::NoLinux {
        path: path.to_path_buf(),
        looked,
    })
}

#[cfg(test)]
mod tests;
