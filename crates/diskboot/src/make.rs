//! Making disk images the way distributions lay them out, for tests and the guest kit: GPT
//! disks with an ext4 root made from a directory by `mkfs.ext4 -d` (Debian's e2fsprogs; no loop
//! device, no root), and with an EFI System Partition (vfat) made in memory from a directory
//! with the `fatfs` crate. Partitions start at 1 MiB and are aligned to 1 MiB.

use std::io::{self, Cursor, Write};
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
    #[error("making the vfat filesystem")]
    Vfat(#[source] io::Error),
    #[error("writing the image")]
    Io(#[from] io::Error),
    #[error("writing the partition table")]
    Gpt(#[from] gpt::GptError),
    #[error("writing the protective MBR")]
    Mbr(#[from] gpt::mbr::MBRError),
}

/// An ext4 filesystem of `fs_mib` MiB with the contents of `root`, made in `dir`.
fn ext4(dir: &Path, root: &Path, fs_mib: u64) -> Result<Vec<u8>, MakeError> {
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
    let bytes = std::fs::read(&fs)?;
    std::fs::remove_file(&fs)?;
    Ok(bytes)
}

/// A FAT filesystem of `mib` MiB (FAT12, 16 or 32 as `fatfs` picks for the size) with the
/// contents of `root` (files and directories; names as they are, long where they need to be),
/// labelled `label` (11 bytes, padded with spaces) or `NO NAME`.
pub fn vfat(root: &Path, mib: u64, label: Option<[u8; 11]>) -> Result<Vec<u8>, MakeError> {
    let mut img = Cursor::new(vec![0u8; (mib * MIB) as usize]);
    let mut options = fatfs::FormatVolumeOptions::new();
    if let Some(label) = label {
        options = options.volume_label(label);
    }
    fatfs::format_volume(&mut img, options).map_err(MakeError::Vfat)?;
    {
        let fs =
            fatfs::FileSystem::new(&mut img, fatfs::FsOptions::new()).map_err(MakeError::Vfat)?;
        copy_into(&fs.root_dir(), root)?;
        fs.unmount().map_err(MakeError::Vfat)?;
    }
    Ok(img.into_inner())
}

/// Copies the directory `from` (of the host) into `dir` (of a FAT filesystem).
fn copy_into<T: fatfs::ReadWriteSeek>(
    dir: &fatfs::Dir<'_, T>,
    from: &Path,
) -> Result<(), MakeError> {
    let mut entries = std::fs::read_dir(from)?.collect::<Result<Vec<_>, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type()?.is_dir() {
            let sub = dir.create_dir(&name).map_err(MakeError::Vfat)?;
            copy_into(&sub, &e.path())?;
        } else {
            let data = std::fs::read(e.path())?;
            let mut f = dir.create_file(&name).map_err(MakeError::Vfat)?;
            f.truncate().map_err(MakeError::Vfat)?;
            f.write_all(&data).map_err(MakeError::Vfat)?;
        }
    }
    Ok(())
}

/// Makes `disk.img` in `dir`: a GPT disk whose partitions (name, type, filesystem) follow
/// one another from 1 MiB, each as long as its filesystem rounded up to a MiB.
fn gpt_disk(
    dir: &Path,
    parts: &[(&str, gpt::partition_types::Type, &[u8])],
) -> Result<PathBuf, MakeError> {
    let disk = dir.join("disk.img");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&disk)?;
    let lens: Vec<u64> = parts
        .iter()
        .map(|p| (p.2.len() as u64).div_ceil(MIB).max(1) * MIB)
        .collect();
    let size = lens.iter().sum::<u64>() + 2 * MIB;
    file.set_len(size)?;
    let last_lba = u32::try_from(size / 512 - 1).unwrap_or(u32::MAX);
    gpt::mbr::ProtectiveMBR::with_lb_size(last_lba).overwrite_lba0(&mut file)?;
    let mut g = gpt::GptConfig::new()
        .writable(true)
        .create_from_device(file, None)?;
    let mut starts = Vec::new();
    for ((name, kind, _), len) in parts.iter().zip(&lens) {
        let id = g.add_partition(name, *len, kind.clone(), 0, Some(2048))?;
        starts.push(g.partitions()[&id].bytes_start(gpt::disk::LogicalBlockSize::Lb512)?);
    }
    let file = g.write()?;
    for ((_, _, bytes), start) in parts.iter().zip(starts) {
        file.write_all_at(bytes, start)?;
    }
    Ok(disk)
}

/// Makes `disk.img` (in `dir`): a GPT disk whose one partition, "root", holds an ext4
/// filesystem of `fs_mib` MiB with the contents of `root`.
pub fn gpt_ext4_disk(dir: &Path, root: &Path, fs_mib: u64) -> Result<PathBuf, MakeError> {
    let fs = ext4(dir, root, fs_mib)?;
    gpt_disk(dir, &[("root", gpt::partition_types::LINUX_FS, &fs)])
}

/// Makes `disk.img` (in `dir`), laid out as Debian's, Ubuntu's and Fedora's UEFI images are:
/// a GPT disk whose first partition, "esp", is an EFI System Partition of `esp_mib` MiB (vfat)
/// with the contents of `esp`, and, with `root` (a directory and a size in MiB), whose second,
/// "root", holds ext4 with the contents of that directory.
pub fn gpt_esp_disk(
    dir: &Path,
    esp: &Path,
    esp_mib: u64,
    root: Option<(&Path, u64)>,
) -> Result<PathBuf, MakeError> {
    let esp = vfat(esp, esp_mib, None)?;
    let root = match root {
        Some((root, fs_mib)) => Some(ext4(dir, root, fs_mib)?),
        None => None,
    };
    let mut parts = vec![("esp", gpt::partition_types::EFI, &esp[..])];
    if let Some(root) = &root {
        parts.push(("root", gpt::partition_types::LINUX_FS, &root[..]));
    }
    gpt_disk(dir, &parts)
}
