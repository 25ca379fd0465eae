//! Making a disk image the way cloud images are laid out, for tests and the guest kit: a GPT
//! disk with one ext4 partition at 1 MiB, made from a directory by `mkfs.ext4 -d` (Debian's
//! e2fsprogs; no loop device, no root).

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;

/// Why an image could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MakeError {
    #[error("mkfs.ext4 (Debian's e2fsprogs) failed: {0}")]
    Mkfs(String),
    #[error("cannot run mkfs.ext4 (install Debian's e2fsprogs)")]
    NoMkfs(#[source] io::Error),
    #[error("writing the image")]
    Io(#[from] io::Error),
    #[error("writing the partition table")]
    Gpt(#[from] gpt::GptError),
    #[error("writing the protective MBR")]
    Mbr(#[from] gpt::mbr::MBRError),
}

/// Makes `disk` (in `dir`): a GPT disk whose one partition, "root", holds an ext4 filesystem
/// of `fs_mib` MiB with the contents of `root`.
pub fn gpt_ext4_disk(dir: &Path, root: &Path, fs_mib: u64) -> Result<PathBuf, MakeError> {
    let fs = dir.join("root.ext4");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(root)
        .arg(&fs)
        .arg(format!("{fs_mib}M"))
        .output()
        .map_err(MakeError::NoMkfs)?;
    if !out.status.success() {
        return Err(MakeError::Mkfs(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let disk = dir.join("disk.img");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&disk)?;
    let size = (fs_mib + 2) * MIB;
    file.set_len(size)?;
    let last_lba = u32::try_from(size / 512 - 1).unwrap_or(u32::MAX);
    gpt::mbr::ProtectiveMBR::with_lb_size(last_lba).overwrite_lba0(&mut file)?;
    let mut g = gpt::GptConfig::new()
        .writable(true)
        .create_from_device(file, None)?;
    let id = g.add_partition(
        "root",
        fs_mib * MIB,
        gpt::partition_types::LINUX_FS,
        0,
        Some(2048),
    )?;
    let start = g.partitions()[&id].bytes_start(gpt::disk::LogicalBlockSize::Lb512)?;
    let file = g.write()?;
    file.write_all_at(&std::fs::read(&fs)?, start)?;
    std::fs::remove_file(&fs)?;
    Ok(disk)
}
