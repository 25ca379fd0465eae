//! The state file format.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "VESSELSN"
//! 8       4     format version (little endian), FORMAT_VERSION
//! 12      4     flags, 0
//! 16      8     payload length in bytes
//! 24      4     CRC-32 (IEEE) of the payload
//! 28      4     reserved, 0
//! 32      ...   payload: UTF-8 JSON
//! ```
//!
//! JSON keeps the file self-describing (`jq` reads it) and lets later versions add fields;
//! the version number changes when a field changes meaning, and files of other versions are
//! refused rather than guessed at.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The magic at the start of every state file.
pub const MAGIC: &[u8; 8] = b"VESSELSN";
/// The state format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// The header size.
pub const HEADER_LEN: usize = 32;
/// State files larger than this are refused (a VM's state is tens of KiB).
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("not a Vessel snapshot state file (bad magic)")]
    BadMagic,
    /// Shorter than the header (Firecracker's words first).
    #[error("IO Error: File too short to contain CRC: {0} bytes, a state file's header has {HEADER_LEN}")]
    TooShort(u64),
    #[error("snapshot format version {found}, this Vessel reads version {supported}")]
    Version { found: u32, supported: u32 },
    #[error("snapshot state is truncated: {have} of {want} bytes")]
    Truncated { have: u64, want: u64 },
    #[error("snapshot state payload of {0} bytes is larger than the {MAX_PAYLOAD} allowed")]
    TooLarge(u64),
    #[error("snapshot state is damaged: checksum {found:#010x}, expected {expected:#010x}")]
    Checksum { found: u32, expected: u32 },
    #[error("snapshot state does not parse")]
    Parse(#[source] serde_json::Error),
    #[error("snapshot memory: region at {gpa:#x} of {size:#x} bytes does not fit this host")]
    RegionTooLarge { gpa: u64, size: u64 },
    #[error("snapshot memory: cannot map the region at {gpa:#x}")]
    Map {
        gpa: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("snapshot memory: the region at {0:#x} overflows")]
    RegionOverflow(u64),
    #[error("snapshot memory: the regions do not form guest memory")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    #[error("the snapshot does not fit this VM: {0}")]
    Mismatch(String),
}

impl SnapshotError {
    pub fn io(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
        move |source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The whole file for `state`.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, SnapshotError> {
    let payload = serde_json::to_vec(state).map_err(SnapshotError::Parse)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

/// The format version in the header of the state file at `path`, whatever it is (for
/// `--describe-snapshot`): only the magic is checked.
pub fn read_format_version(path: &Path) -> Result<u32, SnapshotError> {
    let mut head = Vec::with_capacity(12);
    File::open(path)
        .and_then(|f| f.take(12).read_to_end(&mut head))
        .map_err(SnapshotError::io(path))?;
    if head.len() < 8 || &head[..8] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    if head.len() < 12 {
        return Err(SnapshotError::Truncated {
            have: head.len() as u64,
            want: HEADER_LEN as u64,
        });
    }
    Ok(u32_at(&head, 8))
}

/// Checks the header and checksum of a whole file and parses its payload.
pub fn decode<T: DeserializeOwned>(file: &[u8]) -> Result<T, SnapshotError> {
    let payload = check(file)?;
    serde_json::from_slice(payload).map_err(SnapshotError::Parse)
}

/// Checks the header and checksum; returns the payload.
fn check(file: &[u8]) -> Result<&[u8], SnapshotError> {
    if file.len() < HEADER_LEN {
        return Err(SnapshotError::TooShort(file.len() as u64));
    }
    if &file[..8] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let version = u32_at(file, 8);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&file[16..24]);
    let len = u64::from_le_bytes(len);
    if len > MAX_PAYLOAD {
        return Err(SnapshotError::TooLarge(len));
    }
    let have = (file.len() - HEADER_LEN) as u64;
    if have < len {
        return Err(SnapshotError::Truncated {
            have: file.len() as u64,
            want: HEADER_LEN as u64 + len,
        });
    }
    let payload = &file[HEADER_LEN..HEADER_LEN + len as usize];
    let expected = u32_at(file, 24);
    let found = crc32fast::hash(payload);
    if found != expected {
        return Err(SnapshotError::Checksum { found, expected });
    }
    Ok(payload)
}

/// Writes `state` to `path` atomically (see [`replace_file`]).
pub fn write_state<T: Serialize>(path: &Path, state: &T) -> Result<(), SnapshotError> {
    let bytes = encode(state)?;
    replace_file(path, |f, tmp| {
        let mut f = f;
        f.write_all(&bytes).map_err(SnapshotError::io(tmp))
    })
}

/// Makes a new file for `path` with `fill`, then renames it over `path`: a temporary file
/// beside it, filled, synced, renamed. A crash never leaves a half-written file under the
/// final name, and whoever still has the old file open or mapped (a guest restored from a
/// memory file, its clones) keeps the old contents. On failure the temporary file is removed.
pub fn replace_file<T>(
    path: &Path,
    fill: impl FnOnce(&File, &Path) -> Result<T, SnapshotError>,
) -> Result<T, SnapshotError> {
    let tmp = temp_path(path);
    let result = (|| {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(SnapshotError::io(&tmp))?;
        let v = fill(&f, &tmp)?;
        f.sync_all().map_err(SnapshotError::io(&tmp))?;
        fs::rename(&tmp, path).map_err(SnapshotError::io(path))?;
        Ok(v)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `dir/.name.PID.tmp` for `dir/name`.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Reads and checks a state file.
pub fn read_state<T: DeserializeOwned>(path: &Path) -> Result<T, SnapshotError> {
    let mut f = File::open(path).map_err(SnapshotError::io(path))?;
    let len = f.metadata().map_err(SnapshotError::io(path))?.len();
    if len > MAX_PAYLOAD + HEADER_LEN as u64 {
        return Err(SnapshotError::TooLarge(len));
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.read_to_end(&mut buf).map_err(SnapshotError::io(path))?;
    decode(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct S {
        a: u64,
        b: Vec<u8>,
    }

    fn sample() -> S {
        S {
            a: 42,
            b: vec![1, 2, 3],
        }
    }

    #[test]
    fn round_trip_through_a_file() {
        let p = std::env::temp_dir().join(format!("vessel-fmt-{}", std::process::id()));
        write_state(&p, &sample()).unwrap();
        assert_eq!(read_state::<S>(&p).unwrap(), sample());
        assert_eq!(read_format_version(&p).unwrap(), FORMAT_VERSION);
        assert!(!temp_path(&p).exists());
        // The version of another format is reported, not refused; other files are.
        let mut other = encode(&sample()).unwrap();
        other[8..12].copy_from_slice(&7u32.to_le_bytes());
        fs::write(&p, &other).unwrap();
        assert_eq!(read_format_version(&p).unwrap(), 7);
        fs::write(&p, b"VESSELSN").unwrap();
        assert!(matches!(
            read_format_version(&p),
            Err(SnapshotError::Truncated { .. })
        ));
        fs::write(&p, b"not a snapshot").unwrap();
        assert!(matches!(
            read_format_version(&p),
            Err(SnapshotError::BadMagic)
        ));
        let _ = fs::remove_file(p);
    }

    #[test]
    fn damaged_files_are_refused() {
        let good = encode(&sample()).unwrap();
        // Every truncation is refused; one shorter than the header in Firecracker's words.
        for n in 0..good.len() {
            assert!(decode::<S>(&good[..n]).is_err(), "truncated to {n}");
        }
        let e = decode::<S>(&[]).unwrap_err();
        assert!(matches!(e, SnapshotError::TooShort(0)));
        assert!(e
            .to_string()
            .starts_with("IO Error: File too short to contain CRC"));
        // Any flipped payload byte fails the checksum.
        for i in HEADER_LEN..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(
                matches!(decode::<S>(&bad), Err(SnapshotError::Checksum { .. })),
                "byte {i}"
            );
        }
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(decode::<S>(&bad), Err(SnapshotError::BadMagic)));
        let mut bad = good.clone();
        bad[8] = 2;
        assert!(matches!(
            decode::<S>(&bad),
            Err(SnapshotError::Version {
                found: 2,
                supported: 1
            })
        ));
        let mut bad = good.clone();
        bad[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode::<S>(&bad), Err(SnapshotError::TooLarge(_))));
        // A valid file of another shape is a parse error, not a panic.
        let other = encode(&serde_json::json!({"a": "x"})).unwrap();
        assert!(matches!(decode::<S>(&other), Err(SnapshotError::Parse(_))));
    }
}
