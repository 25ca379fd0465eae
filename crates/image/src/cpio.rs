//! A small writer (and reader) for the cpio "newc" format, the format the
//! Linux kernel unpacks as its initramfs (see the kernel's
//! Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Each entry is a 110-byte ASCII header (`070701` + 13 eight-digit hex
//! fields), the NUL-terminated name padded so header + name is a multiple of
//! 4, then the data padded to a multiple of 4. The archive ends with an entry
//! named `TRAILER!!!`. Archives are written uncompressed and reproducibly
//! (mtime 0, uid/gid 0, inode numbers counting from 1).

use std::io::Write;

use crate::ImageError;

/// The magic of a newc header (no checksum variant).
pub const NEWC_MAGIC: &[u8; 6] = b"070701";
/// The name of the last entry.
pub const TRAILER: &str = "TRAILER!!!";
/// Length of a newc header.
pub const HEADER_LEN: usize = 110;

/// File type bits of `mode`.
pub const S_IFMT: u32 = 0o170_000;
/// Directory.
pub const S_IFDIR: u32 = 0o040_000;
/// Regular file.
pub const S_IFREG: u32 = 0o100_000;
/// Symbolic link.
pub const S_IFLNK: u32 = 0o120_000;
/// Character device.
pub const S_IFCHR: u32 = 0o020_000;

/// Longest name the kernel's unpacker accepts (PATH_MAX, including NUL).
const MAX_NAME: usize = 4096;

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// Checks and normalises an archive path: no leading `/`, no empty, `.` or
/// `..` components, no NUL.
fn normalize_name(name: &str) -> Result<String, ImageError> {
    let trimmed = name.trim_start_matches('/');
    let bad = trimmed.is_empty()
        || trimmed.len() + 1 > MAX_NAME
        || trimmed.contains('\0')
        || trimmed
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(ImageError::Cpio(format!("invalid entry name {name:?}")));
    }
    Ok(trimmed.to_string())
}

/// Writes a newc archive entry by entry. Parents must be added before their
/// children (the kernel does not create missing directories).
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Adds a directory with permissions `perm` (e.g. 0o755).
    pub fn dir(&mut self, name: &str, perm: u32) -> Result<(), ImageError> {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// Adds a regular file with permissions `perm` and contents `data`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), ImageError> {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// Adds a symbolic link `name` pointing at `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<(), ImageError> {
        if target.is_empty() || target.contains('\0') {
            return Err(ImageError::Cpio(format!(
                "invalid symlink target {target:?} for {name:?}"
            )));
        }
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Adds a character device node `major:minor` with permissions `perm`.
    pub fn char_device(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), ImageError> {
        self.entry(name, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), ImageError> {
        let name = normalize_name(name)?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.raw_entry(&name, ino, mode, nlink, rdev, data)
    }

    fn raw_entry(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), ImageError> {
        let size = u32::try_from(data.len())
            .map_err(|_| ImageError::Cpio(format!("{name}: file larger than 4 GiB")))?;
        let namesize = name.len() + 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            namesize as u32,
            0, // check
        ];
        let mut buf = Vec::with_capacity(HEADER_LEN + namesize + 3);
        buf.extend_from_slice(NEWC_MAGIC);
        for f in fields {
            buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        buf.extend_from_slice(name.as_bytes());
        buf.push(0);
        buf.resize(buf.len() + pad4(HEADER_LEN + namesize), 0);
        self.put(&buf)?;
        self.put(data)?;
        self.put(&[0; 3][..pad4(data.len())])
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), ImageError> {
        self.out
            .write_all(bytes)
            .map_err(|e| ImageError::Cpio(format!("write: {e}")))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> Result<W, ImageError> {
        self.raw_entry(TRAILER, 0, 0, 1, (0, 0), &[])?;
        self.out
            .flush()
            .map_err(|e| ImageError::Cpio(format!("flush: {e}")))?;
        Ok(self.out)
    }
}

/// One entry read back from a newc archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpioEntry {
    /// The path, without a leading `/`.
    pub name: String,
    /// Inode number.
    pub ino: u32,
    /// Type and permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Link count.
    pub nlink: u32,
    /// Modification time.
    pub mtime: u32,
    /// Device number of a device node: (major, minor).
    pub rdev: (u32, u32),
    /// Contents (file data or symlink target).
    pub data: Vec<u8>,
}

impl CpioEntry {
    /// The type bits of `mode`.
    pub fn file_type(&self) -> u32 {
        self.mode & S_IFMT
    }
}

/// Parses a newc archive up to its trailer (which is required). Checks the
/// magic and the 4-byte alignment of every header and data block.
pub fn parse(archive: &[u8]) -> Result<Vec<CpioEntry>, ImageError> {
    let mut entries = Vec::new();
    let mut pos = 0usize;
    loop {
        if pos & 3 != 0 {
            return Err(ImageError::Cpio(format!("header at {pos} not 4-aligned")));
        }
        let header = archive
            .get(pos..pos + HEADER_LEN)
            .ok_or_else(|| ImageError::Cpio(format!("truncated header at {pos}")))?;
        if &header[..6] != NEWC_MAGIC {
            return Err(ImageError::Cpio(format!("bad magic at {pos}")));
        }
        let mut f = [0u32; 13];
        for (i, v) in f.iter_mut().enumerate() {
            let text = std::str::from_utf8(&header[6 + i * 8..14 + i * 8])
                .map_err(|_| ImageError::Cpio(format!("non-ASCII header at {pos}")))?;
            *v = u32::from_str_radix(text, 16)
                .map_err(|_| ImageError::Cpio(format!("bad hex field {text:?} at {pos}")))?;
        }
        let (filesize, namesize) = (f[6] as usize, f[11] as usize);
        let name_start = pos + HEADER_LEN;
        let name_bytes = archive
            .get(name_start..name_start + namesize)
            .ok_or_else(|| ImageError::Cpio(format!("truncated name at {pos}")))?;
        let (name, nul) = name_bytes
            .split_last()
            .map(|(last, rest)| (rest, *last))
            .ok_or_else(|| ImageError::Cpio(format!("empty name at {pos}")))?;
        if nul != 0 {
            return Err(ImageError::Cpio(format!(
                "name at {pos} not NUL-terminated"
            )));
        }
        let name = String::from_utf8(name.to_vec())
            .map_err(|_| ImageError::Cpio(format!("non-UTF-8 name at {pos}")))?;
        let name_pad = pad4(HEADER_LEN + namesize);
        if archive[name_start + namesize..]
            .iter()
            .take(name_pad)
            .any(|&b| b != 0)
        {
            return Err(ImageError::Cpio(format!(
                "non-zero name padding for {name}"
            )));
        }
        let data_start = name_start + namesize + name_pad;
        let data = archive
            .get(data_start..data_start + filesize)
            .ok_or_else(|| ImageError::Cpio(format!("truncated data for {name}")))?;
        pos = data_start + filesize + pad4(filesize);
        if pos > archive.len() {
            return Err(ImageError::Cpio(format!("missing data padding for {name}")));
        }
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(CpioEntry {
            name,
            ino: f[0],
            mode: f[1],
            uid: f[2],
            gid: f[3],
            nlink: f[4],
            mtime: f[5],
            rdev: (f[9], f[10]),
            data: data.to_vec(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/bin", 0o755).unwrap();
        w.file("bin/busybox", 0o755, b"\x7fELF-ish").unwrap();
        w.symlink("/bin/sh", "busybox").unwrap();
        w.dir("dev", 0o755).unwrap();
        w.char_device("/dev/console", 0o600, 5, 1).unwrap();
        w.file("empty", 0o644, b"").unwrap();
        w.file("abc", 0o644, b"abc").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn first_header_is_byte_exact() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("init", 0o755, b"hello").unwrap();
        let out = w.finish().unwrap();
        let expect_header = concat!(
            "070701", "00000001", "000081ed", "00000000", "00000000", "00000001", "00000000",
            "00000005", "00000000", "00000000", "00000000", "00000000", "00000005", "00000000"
        );
        assert_eq!(&out[..110], expect_header.as_bytes());
        // name "init\0" (5) -> 115, padded to 116; data 5 -> padded to 8.
        assert_eq!(&out[110..116], b"init\0\0");
        assert_eq!(&out[116..124], b"hello\0\0\0");
        // Trailer follows: ino 0, mode 0, nlink 1, namesize 11.
        assert_eq!(&out[124..130], NEWC_MAGIC);
        assert_eq!(&out[124 + 110..124 + 121], b"TRAILER!!!\0");
        assert_eq!(out.len() % 4, 0);
        assert_eq!(out.len(), 124 + 110 + 11 + 3);
    }

    #[test]
    fn round_trips_every_entry_kind() {
        let out = sample();
        assert_eq!(out.len() % 4, 0);
        let entries = parse(&out).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "dev",
                "dev/console",
                "empty",
                "abc"
            ]
        );
        let by = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(by("bin").mode, S_IFDIR | 0o755);
        assert_eq!(by("bin").nlink, 2);
        assert_eq!(by("bin/busybox").mode, S_IFREG | 0o755);
        assert_eq!(by("bin/busybox").data, b"\x7fELF-ish");
        assert_eq!(by("bin/sh").file_type(), S_IFLNK);
        assert_eq!(by("bin/sh").data, b"busybox");
        assert_eq!(by("dev/console").mode, S_IFCHR | 0o600);
        assert_eq!(by("dev/console").rdev, (5, 1));
        assert!(by("empty").data.is_empty());
        assert_eq!(by("abc").data, b"abc");
        // Unique inodes, reproducible metadata.
        let mut inos: Vec<u32> = entries.iter().map(|e| e.ino).collect();
        inos.dedup();
        assert_eq!(inos, (1..=7).collect::<Vec<_>>());
        assert!(entries
            .iter()
            .all(|e| e.mtime == 0 && e.uid == 0 && e.gid == 0));
        assert_eq!(sample(), out, "output is deterministic");
    }

    #[test]
    fn padding_is_correct_for_every_name_and_data_length() {
        for name_len in 1..=9 {
            for data_len in 0..=9 {
                let name = "n".repeat(name_len);
                let data = vec![0xabu8; data_len];
                let mut w = CpioWriter::new(Vec::new());
                w.file(&name, 0o644, &data).unwrap();
                let out = w.finish().unwrap();
                assert_eq!(out.len() % 4, 0);
                let e = parse(&out).unwrap();
                assert_eq!(e.len(), 1);
                assert_eq!(e[0].name, name);
                assert_eq!(e[0].data, data);
            }
        }
    }

    #[test]
    fn rejects_bad_names_and_targets() {
        let mut w = CpioWriter::new(Vec::new());
        for bad in ["", "/", "a//b", "a/../b", "./a", "a\0b"] {
            assert!(w.file(bad, 0o644, b"").is_err(), "{bad:?} accepted");
        }
        assert!(w.symlink("l", "").is_err());
        assert_eq!(w.written(), 0, "nothing written for rejected entries");
    }

    #[test]
    fn parse_rejects_corruption() {
        let out = sample();
        assert!(parse(&out[..out.len() - 4]).is_err(), "missing trailer");
        let mut bad = out.clone();
        bad[0] = b'1';
        assert!(parse(&bad).unwrap_err().to_string().contains("bad magic"));
        let mut bad = out.clone();
        bad[6] = b'z';
        assert!(parse(&bad).is_err());
    }

    #[test]
    fn system_cpio_lists_the_archive_when_available() {
        // Cross-check with GNU cpio when the host has it; not required.
        let Some(cpio) = crate::tools::find_program("cpio") else {
            return;
        };
        let path = std::env::temp_dir().join(format!("vessel-cpio-{}.cpio", std::process::id()));
        std::fs::write(&path, sample()).unwrap();
        let out = std::process::Command::new(cpio)
            .args(["-t", "--quiet", "-F"])
            .arg(&path)
            .output()
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(out.status.success(), "{out:?}");
        let listed = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            listed.lines().collect::<Vec<_>>(),
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "dev",
                "dev/console",
                "empty",
                "abc"
            ]
        );
    }
}
