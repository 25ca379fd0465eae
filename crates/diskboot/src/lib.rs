//! Direct boot of a disk image without firmware: Vessel opens the image on the host (raw or
//! qcow2, read-only, through the block device's own `Disk`), reads its partition table (GPT
//! with the `gpt` crate, MBR with `mbrman`, or none), finds the ext2/3/4 filesystems
//! (`ext4-view`), reads the bootloader's own configuration (GRUB's `grub.cfg`, or Boot Loader
//! Spec entries, see [`config`]) and returns the default entry's kernel, initrd and command
//! line, which Vessel then boots as it boots any kernel: in milliseconds instead of a
//! firmware's seconds. An image it cannot read that way gets an error saying what was looked
//! at, so that the user can boot it through firmware instead.

pub mod config;
pub mod make;

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
        "{what} of {entry:?} is {size} bytes, more than the {MAX_FILE} a kernel or initrd may be"
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
        source: ext4_view::Ext4Error,
    },
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

/// A range of the image (a partition) for `ext4-view`.
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
    let mut s = stream();
    if let Ok(mbr) = mbrman::MBR::read_from(&mut s, 512) {
        let parts: Vec<(u32, u64, u64)> = mbr
            .iter()
            .filter(|(_, p)| p.is_used())
            .map(|(n, p)| {
                (
                    n as u32,
                    u64::from(p.starting_lba) * 512,
                    u64::from(p.sectors) * 512,
                )
            })
            .collect();
        if !parts.is_empty() {
            return parts;
        }
    }
    vec![(0, 0, disk.size())]
}

/// Where bootloader configurations live on a filesystem, `/boot` or not.
const GRUB_CONFIGS: [&str; 4] = [
    "/boot/grub/grub.cfg",
    "/grub/grub.cfg",
    "/boot/grub2/grub.cfg",
    "/grub2/grub.cfg",
];
const BLS_DIRS: [&str; 2] = ["/loader/entries", "/boot/loader/entries"];

/// The default entry a filesystem's bootloader configuration names, and the file it is in.
fn default_entry(fs: &Ext4) -> Option<(Entry, String)> {
    for cfg in GRUB_CONFIGS {
        if let Ok(text) = fs.read_to_string(cfg) {
            if let Some(e) = config::grub_default(&text) {
                return Some((e, cfg.to_string()));
            }
        }
    }
    for dir in BLS_DIRS {
        let Ok(entries) = fs.read_dir(dir) else {
            continue;
        };
        // The newest entry first: file names carry the version.
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .map(|e| e.path().display().to_string())
            .filter(|p| p.ends_with(".conf"))
            .collect();
        names.sort();
        for name in names.iter().rev() {
            if let Some(e) = fs
                .read_to_string(name.as_str())
                .ok()
                .and_then(|t| config::bls_entry(&t))
            {
                return Some((e, name.clone()));
            }
        }
    }
    None
}

/// The largest kernel or initrd read from an image (they are read into memory).
pub const MAX_FILE: u64 = 1 << 30;

/// Reads `path` from the filesystem that holds it: `fs` first (GRUB's root), then the others
/// (a separate `/boot` names its files without `/boot`, and the reverse).
/// `Ok(Err(size))` for a file larger than [`MAX_FILE`].
type FileRead = Result<Result<Vec<u8>, u64>, ext4_view::Ext4Error>;

fn read_file(filesystems: &[(u32, Ext4)], first: usize, path: &str) -> FileRead {
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
            match fs.metadata(c.as_str()) {
                Ok(m) if m.len() > MAX_FILE => return Ok(Err(m.len())),
                Ok(_) => match fs.read(c.as_str()) {
                    Ok(data) => return Ok(Ok(data)),
                    Err(e) => last = Some(e),
                },
                Err(e) => last = Some(e),
            }
        }
    }
    Err(last.unwrap_or(ext4_view::Ext4Error::NotFound))
}

/// Finds the Linux the image at `path` boots (see the crate docs).
pub fn find_linux(path: &Path) -> Result<BootImage, DiskBootError> {
    let disk = Arc::new(Disk::open(path, true, None, None).map_err(DiskBootError::Open)?);
    let mut looked = Vec::new();
    let mut filesystems = Vec::new();
    for (n, start, len) in partitions(&disk) {
        let reader = PartitionReader {
            disk: disk.clone(),
            start,
            len,
        };
        match Ext4::load(Box::new(reader)) {
            Ok(fs) => filesystems.push((n, fs)),
            Err(_) => looked.push(format!("partition {n}: not ext2/3/4")),
        }
    }
    for (i, (n, fs)) in filesystems.iter().enumerate() {
        let Some((entry, cfg)) = default_entry(fs) else {
            looked.push(format!("partition {n} (ext4): no grub.cfg or loader entry"));
            continue;
        };
        let read = |what: &str, file: &str| match read_file(&filesystems, i, file) {
            Ok(Ok(data)) => Ok(data),
            Ok(Err(size)) => Err(DiskBootError::TooLarge {
                what: format!("{what} {file}"),
                entry: entry.title.clone(),
                size,
            }),
            Err(source) => Err(DiskBootError::Read {
                what: format!("{what} {file}"),
                entry: entry.title.clone(),
                source,
            }),
        };
        let kernel = read("the kernel", &entry.kernel)?;
        let mut initrd: Option<Vec<u8>> = None;
        for f in &entry.initrds {
            initrd
                .get_or_insert_with(Vec::new)
                .extend(read("the initrd", f)?);
        }
        return Ok(BootImage {
            title: entry.title,
            kernel,
            initrd,
            cmdline: entry.cmdline,
            found_in: format!("partition {n} (ext4): {cfg}"),
        });
    }
    Err(DiskBootError::NoLinux {
        path: path.to_path_buf(),
        looked,
    })
}
