//! A CFI parallel NOR flash (Intel/Sharp command set, CFI primary vendor 0x0001), as QEMU's
//! `pflash_cfi01` models it: the writable UEFI variable store of OVMF.
//!
//! OVMF keeps its non-volatile variables in a flash device mapped just below its code image
//! (a per-VM copy of a file such as Debian's `OVMF_VARS_4M.fd`). Its driver
//! (`OvmfPkg/QemuFlashFvbServicesRuntimeDxe/QemuFlash.c`) probes the region for flash and then
//! programs bytes with `0x10, value` and erases blocks with `0x20, 0xd0`, all with 8-bit
//! accesses. Without a device that answers those commands, variables (boot order, Secure Boot
//! keys) would be lost at every boot.
//!
//! The device sits on the MMIO bus; every access traps (there is no KVM memory slot), so reads
//! in read-array mode are served from an in-memory copy of the file. Every program and erase is
//! written through to the file at once; [`Pflash::sync`] flushes it to the disk.
//!
//! Supported commands (the command is the low byte of the written value):
//!
//! - `0xff`/`0x00` read array; `0x70` read status; `0x90` read identifier; `0x98` CFI query;
//! - `0x10`/`0x40` program: the next write stores all its bytes (clipped to the device end);
//!   like QEMU, programming overwrites bytes rather than AND-ing them;
//! - `0x20` then `0xd0` erase the 4 KiB block holding the confirm's address to `0xff`;
//! - `0xe8` write to buffer: count-1, then that many data writes, then `0xd0`;
//! - `0x50` clear status: like QEMU, this clears the whole register (ready bit included) and
//!   returns to read-array mode. OVMF's probe relies on it: after `0x50, 0x70` it must read
//!   `0x00` (its `CLEARED_ARRAY_STATUS`) to decide that the region is flash;
//! - `0x60` lock setup followed by `0x01`/`0xd0`/`0x2f`, `0xb0` suspend, `0xd0` resume: accepted
//!   and ignored (nothing is ever locked and every operation completes at once).
//!
//! After a program or an erase the device reads the status register until `0xff`, like real
//! flash and QEMU. Unknown commands are logged at debug level and return to read-array mode.
//! Nothing a guest writes can make the device panic, touch bytes outside it, or grow the file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;

/// The erase block (sector) size, as on QEMU's pc machine flash.
const BLOCK_SIZE: u64 = 4096;
/// The largest file accepted (the CFI table counts blocks in 16 bits: 64 MiB is 16384 blocks).
const MAX_SIZE: u64 = 64 << 20;

// Commands.
const CMD_READ_ARRAY: u8 = 0xff;
const CMD_READ_ARRAY_ALT: u8 = 0x00;
const CMD_PROGRAM: u8 = 0x10;
const CMD_PROGRAM_ALT: u8 = 0x40;
const CMD_ERASE_SETUP: u8 = 0x20;
const CMD_CLEAR_STATUS: u8 = 0x50;
const CMD_LOCK_SETUP: u8 = 0x60;
const CMD_READ_STATUS: u8 = 0x70;
const CMD_READ_ID: u8 = 0x90;
const CMD_CFI_QUERY: u8 = 0x98;
const CMD_SUSPEND: u8 = 0xb0;
const CMD_CONFIRM: u8 = 0xd0;
const CMD_WRITE_BUFFER: u8 = 0xe8;
// Second cycles of lock setup: set lock bit, clear lock bits (confirm), lock-down.
const LOCK_SET: u8 = 0x01;
const LOCK_DOWN: u8 = 0x2f;

// Status register bits.
/// Write state machine ready.
const STATUS_READY: u8 = 0x80;
/// Erase (or clear lock bits) error.
const STATUS_ERASE_ERROR: u8 = 0x20;
/// Program (or set lock bit) error.
const STATUS_PROGRAM_ERROR: u8 = 0x10;
/// A command sequence error sets both error bits.
const STATUS_SEQUENCE_ERROR: u8 = STATUS_ERASE_ERROR | STATUS_PROGRAM_ERROR;

/// Manufacturer code read at offset 0 in identifier mode (Intel).
const MANUFACTURER_ID: u8 = 0x89;
/// Device code read at offset 1 in identifier mode (Intel 28F128J3, a 0x0001 command-set part).
const DEVICE_ID: u8 = 0x18;

/// log2 of the write buffer in bytes (256), CFI byte 0x2a (QEMU's value for an x8 bank).
const WRITE_BUFFER_LOG2: u8 = 8;
/// The most data writes one write-to-buffer sequence takes (the count is one byte on x8).
const WRITE_BUFFER_WRITES: usize = 1 << WRITE_BUFFER_LOG2;
/// The most bytes one buffered data write keeps (the widest access a bus makes).
const MAX_ACCESS: usize = 16;
/// Bytes of the CFI query table; reads past it (modulo 256, as in QEMU) return 0.
const CFI_TABLE_LEN: usize = 0x40;
/// CFI interface code at 0x28: x8-only asynchronous (QEMU writes 0x02, x8/x16).
const CFI_INTERFACE_X8: u8 = 0x00;

/// Why a flash file or a saved flash state was refused.
#[derive(Debug, thiserror::Error)]
pub enum PflashError {
    /// The file could not be opened read-write.
    #[error("cannot open flash file {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file could not be read.
    #[error("cannot read flash file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is empty.
    #[error("flash file {} is empty", path.display())]
    Empty { path: PathBuf },
    /// The file's size is not a whole number of 4 KiB blocks.
    #[error("flash file {} has {size} bytes, not a multiple of the {BLOCK_SIZE}-byte block", path.display())]
    Unaligned { path: PathBuf, size: u64 },
    /// The file is larger than 64 MiB.
    #[error("flash file {} has {size} bytes, more than the limit of {MAX_SIZE}", path.display())]
    TooLarge { path: PathBuf, size: u64 },
    /// A saved state's contents do not have the device's size.
    #[error("saved flash state has {found} bytes of contents, the device has {expected}")]
    StateSize { expected: u64, found: u64 },
    /// A saved state's write buffer does not fit its mode or the device's limits.
    #[error("saved flash state has an inconsistent write buffer")]
    StateBuffer,
    /// Restored contents could not be written to the file.
    #[error("cannot write restored contents to flash file {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What the device does with the next read and write.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Reads return the contents; writes are commands.
    ReadArray,
    /// Reads return the status register; writes are commands.
    ReadStatus,
    /// Reads return the identifier codes; writes are commands.
    ReadId,
    /// Reads return the CFI table; writes are commands.
    CfiQuery,
    /// After 0x10/0x40: the next write is the data.
    ProgramSetup,
    /// After 0x20: the next write must be 0xd0.
    EraseSetup,
    /// After 0x60: the next write must be 0x01, 0xd0 or 0x2f.
    LockSetup,
    /// After 0xe8: the next write is the number of data writes minus one.
    BufferCount,
    /// Inside write-to-buffer: `remaining` data writes (at least one) are still to come.
    BufferData { remaining: u16 },
    /// Write-to-buffer has all its data: the next write must be 0xd0.
    BufferConfirm,
}

/// A data write held in the write buffer until the confirm.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct BufferedWrite {
    offset: u64,
    data: Vec<u8>,
}

/// What a snapshot keeps of a [`Pflash`]: its command state, status register, any
/// half-done write-to-buffer, and the whole contents.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PflashState {
    mode: Mode,
    status: u8,
    buffer: Vec<BufferedWrite>,
    contents: Vec<u8>,
}

/// A CFI flash device backed by a file; a [`BusDevice`] for the MMIO bus.
pub struct Pflash {
    path: PathBuf,
    file: File,
    contents: Vec<u8>,
    mode: Mode,
    status: u8,
    /// Data writes of a write-to-buffer sequence, applied at the confirm.
    buffer: Vec<BufferedWrite>,
    cfi: [u8; CFI_TABLE_LEN],
    /// Whether a write-through failure was already logged.
    warned: bool,
}

impl Pflash {
    /// The erase block size in bytes.
    pub const BLOCK_SIZE: u64 = BLOCK_SIZE;
    /// The largest backing file accepted, in bytes.
    pub const MAX_SIZE: u64 = MAX_SIZE;

    /// Opens `path` read-write and loads it whole; its size must be a non-zero multiple of
    /// [`Pflash::BLOCK_SIZE`] no larger than [`Pflash::MAX_SIZE`]. The file keeps its size.
    pub fn open(path: &Path) -> Result<Pflash, PflashError> {
        let owned = || path.to_path_buf();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| PflashError::Open {
                path: owned(),
                source,
            })?;
        let size = file
            .metadata()
            .map_err(|source| PflashError::Read {
                path: owned(),
                source,
            })?
            .len();
        check_size(path, size)?;
        let mut contents = Vec::with_capacity(to_index(size));
        file.by_ref()
            .take(size)
            .read_to_end(&mut contents)
            .map_err(|source| PflashError::Read {
                path: owned(),
                source,
            })?;
        // The file may have shrunk between the two calls: check what was read.
        check_size(path, contents.len() as u64)?;
        Ok(Pflash {
            path: owned(),
            file,
            cfi: cfi_table(contents.len() as u64),
            contents,
            mode: Mode::ReadArray,
            status: STATUS_READY,
            buffer: Vec::new(),
            warned: false,
        })
    }

    /// The device's size in bytes (the backing file's).
    pub fn len(&self) -> u64 {
        self.contents.len() as u64
    }

    /// Always false: [`Pflash::open`] refuses empty files.
    pub fn is_empty(&self) -> bool {
        self.contents.is_empty()
    }

    /// Flushes the written-through contents to the disk (fdatasync); call when the VM stops.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// The device's state and contents, for a snapshot.
    pub fn save_state(&self) -> PflashState {
        PflashState {
            mode: self.mode,
            status: self.status,
            buffer: self.buffer.clone(),
            contents: self.contents.clone(),
        }
    }

    /// Loads a saved state and writes its contents through to the file. A state whose
    /// contents differ in size from the device, or whose write buffer is inconsistent, is
    /// refused and leaves the device as it was.
    pub fn restore_state(&mut self, s: &PflashState) -> Result<(), PflashError> {
        if s.contents.len() != self.contents.len() {
            return Err(PflashError::StateSize {
                expected: self.len(),
                found: s.contents.len() as u64,
            });
        }
        let buffer_ok = s.buffer.len() <= WRITE_BUFFER_WRITES
            && s.buffer.iter().all(|w| w.data.len() <= MAX_ACCESS)
            && match s.mode {
                Mode::BufferData { remaining } => {
                    remaining >= 1 && s.buffer.len() + usize::from(remaining) <= WRITE_BUFFER_WRITES
                }
                Mode::BufferConfirm => true,
                _ => s.buffer.is_empty(),
            };
        if !buffer_ok {
            return Err(PflashError::StateBuffer);
        }
        self.file
            .write_all_at(&s.contents, 0)
            .map_err(|source| PflashError::Write {
                path: self.path.clone(),
                source,
            })?;
        self.contents.copy_from_slice(&s.contents);
        self.mode = s.mode;
        self.status = s.status;
        self.buffer = s.buffer.clone();
        Ok(())
    }

    /// The byte range of the device that an access of `n` bytes at `offset` covers, clipped to
    /// the device's end; `None` when it covers nothing.
    fn clip(&self, offset: u64, n: usize) -> Option<Range<usize>> {
        let len = self.len();
        if offset >= len {
            return None;
        }
        let start = to_index(offset);
        let end = start + n.min(to_index(len - offset));
        (end > start).then_some(start..end)
    }

    /// Writes `range` of the contents to the file; a failure sets `error_bit` in the status
    /// register and is logged the first time.
    fn write_through(&mut self, range: Range<usize>, error_bit: u8) {
        let result = self
            .file
            .write_all_at(&self.contents[range.clone()], range.start as u64);
        if let Err(e) = result {
            self.status |= error_bit;
            if !self.warned {
                self.warned = true;
                log::warn!(
                    "flash {}: cannot write through {} bytes at {:#x}: {e}",
                    self.path.display(),
                    range.len(),
                    range.start
                );
            }
        }
    }

    /// Copies `data` to `offset` (clipped) and returns the bytes changed.
    fn store(&mut self, offset: u64, data: &[u8]) -> Option<Range<usize>> {
        let range = self.clip(offset, data.len())?;
        self.contents[range.clone()].copy_from_slice(&data[..range.len()]);
        Some(range)
    }

    /// The second cycle of a program: stores the access's bytes.
    fn program(&mut self, offset: u64, data: &[u8]) {
        match self.store(offset, data) {
            Some(range) => self.write_through(range, STATUS_PROGRAM_ERROR),
            None => self.status |= STATUS_PROGRAM_ERROR,
        }
        self.status |= STATUS_READY;
        self.mode = Mode::ReadStatus;
    }

    /// Erases the block holding `offset` to 0xff.
    fn erase(&mut self, offset: u64) {
        match self.clip(offset & !(BLOCK_SIZE - 1), to_index(BLOCK_SIZE)) {
            Some(range) => {
                self.contents[range.clone()].fill(0xff);
                self.write_through(range, STATUS_ERASE_ERROR);
            }
            None => self.status |= STATUS_ERASE_ERROR,
        }
        self.status |= STATUS_READY;
        self.mode = Mode::ReadStatus;
    }

    /// Applies the write buffer (the confirm of write-to-buffer).
    fn commit_buffer(&mut self) {
        let mut changed: Option<Range<usize>> = None;
        for w in std::mem::take(&mut self.buffer) {
            match self.store(w.offset, &w.data) {
                Some(r) => {
                    changed = Some(match changed {
                        Some(c) => c.start.min(r.start)..c.end.max(r.end),
                        None => r,
                    })
                }
                None => self.status |= STATUS_PROGRAM_ERROR,
            }
        }
        if let Some(range) = changed {
            self.write_through(range, STATUS_PROGRAM_ERROR);
        }
        self.status |= STATUS_READY;
        self.mode = Mode::ReadStatus;
    }

    /// A command sequence error: both error bits, read-status mode, buffer dropped.
    fn sequence_error(&mut self, value: u8) {
        log::debug!(
            "flash {}: command sequence error ({value:#04x} in {:?})",
            self.path.display(),
            self.mode
        );
        self.status |= STATUS_SEQUENCE_ERROR;
        self.buffer.clear();
        self.mode = Mode::ReadStatus;
    }

    /// A write in one of the read modes: a command.
    fn command(&mut self, offset: u64, cmd: u8) {
        self.mode = match cmd {
            CMD_READ_ARRAY | CMD_READ_ARRAY_ALT => Mode::ReadArray,
            CMD_PROGRAM | CMD_PROGRAM_ALT => Mode::ProgramSetup,
            CMD_ERASE_SETUP => Mode::EraseSetup,
            CMD_CLEAR_STATUS => {
                // QEMU clears every bit and returns to read-array mode; OVMF's probe expects it.
                self.status = 0;
                Mode::ReadArray
            }
            CMD_LOCK_SETUP => Mode::LockSetup,
            CMD_READ_STATUS => Mode::ReadStatus,
            CMD_READ_ID => Mode::ReadId,
            CMD_CFI_QUERY => Mode::CfiQuery,
            CMD_WRITE_BUFFER => {
                self.status |= STATUS_READY;
                self.buffer.clear();
                Mode::BufferCount
            }
            // Suspend and resume: nothing is ever in progress; the status says "done".
            CMD_SUSPEND | CMD_CONFIRM => Mode::ReadStatus,
            _ => {
                log::debug!(
                    "flash {}: unknown command {cmd:#04x} at {offset:#x}",
                    self.path.display()
                );
                Mode::ReadArray
            }
        };
    }

    /// The byte at `offset` in identifier mode.
    fn id_byte(offset: u64) -> u8 {
        match offset & 0xff {
            0 => MANUFACTURER_ID,
            1 => DEVICE_ID,
            _ => 0,
        }
    }

    /// The byte at `offset` in CFI query mode.
    fn cfi_byte(&self, offset: u64) -> u8 {
        self.cfi.get(to_index(offset & 0xff)).copied().unwrap_or(0)
    }
}

impl BusDevice for Pflash {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.mode {
            Mode::ReadArray => {
                data.fill(0xff);
                if let Some(range) = self.clip(offset, data.len()) {
                    data[..range.len()].copy_from_slice(&self.contents[range]);
                }
            }
            Mode::ReadId | Mode::CfiQuery => {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = match offset.checked_add(i as u64) {
                        Some(o) if self.mode == Mode::ReadId => Pflash::id_byte(o),
                        Some(o) => self.cfi_byte(o),
                        None => 0,
                    };
                }
            }
            _ => data.fill(self.status),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match self.mode {
            Mode::ProgramSetup => self.program(offset, data),
            Mode::EraseSetup if value == CMD_CONFIRM => self.erase(offset),
            Mode::LockSetup if matches!(value, LOCK_SET | CMD_CONFIRM | LOCK_DOWN) => {
                self.status |= STATUS_READY;
                self.mode = Mode::ReadStatus;
            }
            Mode::BufferCount => {
                self.buffer.clear();
                self.mode = Mode::BufferData {
                    remaining: u16::from(value) + 1,
                };
            }
            Mode::BufferData { remaining } => {
                let n = data.len().min(MAX_ACCESS);
                self.buffer.push(BufferedWrite {
                    offset,
                    data: data[..n].to_vec(),
                });
                self.mode = match remaining {
                    0 | 1 => Mode::BufferConfirm,
                    r => Mode::BufferData { remaining: r - 1 },
                };
            }
            Mode::BufferConfirm if value == CMD_CONFIRM => self.commit_buffer(),
            Mode::EraseSetup | Mode::LockSetup | Mode::BufferConfirm => self.sequence_error(value),
            Mode::ReadArray | Mode::ReadStatus | Mode::ReadId | Mode::CfiQuery => {
                self.command(offset, value)
            }
        }
    }
}

/// `offset` as an index into the contents (callers pass values below [`MAX_SIZE`]).
fn to_index(offset: u64) -> usize {
    usize::try_from(offset).unwrap_or(usize::MAX)
}

/// Refuses sizes [`Pflash::open`] does not accept.
fn check_size(path: &Path, size: u64) -> Result<(), PflashError> {
    let path = path.to_path_buf();
    if size == 0 {
        Err(PflashError::Empty { path })
    } else if size > MAX_SIZE {
        Err(PflashError::TooLarge { path, size })
    } else if !size.is_multiple_of(BLOCK_SIZE) {
        Err(PflashError::Unaligned { path, size })
    } else {
        Ok(())
    }
}

/// The CFI query table of an x8 device of `len` bytes in uniform 4 KiB blocks, filled as
/// QEMU's `pflash_cfi01` fills it for a one-byte bank.
fn cfi_table(len: u64) -> [u8; CFI_TABLE_LEN] {
    let blocks = len / BLOCK_SIZE;
    let mut t = [0u8; CFI_TABLE_LEN];
    t[0x10..0x13].copy_from_slice(b"QRY");
    // Primary command set 0x0001 (Intel/Sharp), its extended table at 0x31; no alternate.
    t[0x13] = 0x01;
    t[0x15] = 0x31;
    // Vcc min 4.5 V, max 5.5 V; no Vpp.
    t[0x1b] = 0x45;
    t[0x1c] = 0x55;
    // Typical and maximum timeouts (single write, buffer write, block erase, chip erase).
    t[0x1f..0x27].copy_from_slice(&[0x07, 0x07, 0x0a, 0x00, 0x04, 0x04, 0x04, 0x00]);
    // Device size as log2 of bytes, rounded up for sizes that are not a power of two.
    t[0x27] = u8::try_from(len.next_power_of_two().trailing_zeros()).unwrap_or(u8::MAX);
    t[0x28] = CFI_INTERFACE_X8;
    t[0x2a] = WRITE_BUFFER_LOG2;
    // One uniform erase-block region: (blocks - 1) and the block size / 256, little-endian.
    t[0x2c] = 0x01;
    let last = u16::try_from(blocks.saturating_sub(1)).unwrap_or(u16::MAX);
    t[0x2d..0x2f].copy_from_slice(&last.to_le_bytes());
    let unit = u16::try_from(BLOCK_SIZE / 256).unwrap_or(u16::MAX);
    t[0x2f..0x31].copy_from_slice(&unit.to_le_bytes());
    // Primary extended query table "PRI", version 1.0, no optional features; one
    // protection field.
    t[0x31..0x36].copy_from_slice(b"PRI10");
    t[0x3f] = 0x01;
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    const SIZE: u64 = 64 * 1024;

    /// A uniquely named file under the temp directory, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(contents: &[u8]) -> TempFile {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "vessel-pflash-{}-{}.fd",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            let path = std::env::temp_dir().join(name);
            std::fs::write(&path, contents).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A patterned image: no byte is 0xff, and byte 0 is 0x00 (OVMF's probe skips it).
    fn pattern(len: u64) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    fn device(len: u64) -> (TempFile, Pflash) {
        let f = TempFile::new(&pattern(len));
        let p = Pflash::open(&f.0).unwrap();
        (f, p)
    }

    fn rd(p: &mut Pflash, offset: u64) -> u8 {
        let mut b = [0u8];
        p.read(offset, &mut b);
        b[0]
    }

    fn wr(p: &mut Pflash, offset: u64, v: u8) {
        p.write(offset, &[v]);
    }

    /// OVMF's QemuFlashWrite: 0x10, value per byte, then 0xff at the last address.
    fn ovmf_program(p: &mut Pflash, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            wr(p, offset + i as u64, CMD_PROGRAM);
            wr(p, offset + i as u64, b);
        }
        wr(p, offset + data.len() as u64 - 1, CMD_READ_ARRAY);
    }

    fn ovmf_erase(p: &mut Pflash, offset: u64) {
        wr(p, offset, CMD_ERASE_SETUP);
        wr(p, offset, CMD_CONFIRM);
        wr(p, offset, CMD_READ_ARRAY);
    }

    #[test]
    fn ovmf_detection_sees_flash() {
        let (_f, mut p) = device(SIZE);
        // QemuFlashDetected, step by step.
        let mut offset = 0;
        while offset < BLOCK_SIZE {
            let v = rd(&mut p, offset);
            if v != CMD_CLEAR_STATUS && v != CMD_READ_STATUS && v != 0x00 {
                break;
            }
            offset += 1;
        }
        assert_eq!(offset, 1, "byte 0 is 0x00 and must be skipped");
        let original = rd(&mut p, offset);
        wr(&mut p, offset, CMD_CLEAR_STATUS);
        let probe = rd(&mut p, offset);
        assert!(
            !(original != CMD_CLEAR_STATUS && probe == CMD_CLEAR_STATUS),
            "seen as RAM"
        );
        wr(&mut p, offset, CMD_READ_STATUS);
        let probe = rd(&mut p, offset);
        assert_ne!(probe, original, "seen as ROM");
        assert_eq!(probe, 0x00, "CLEARED_ARRAY_STATUS means flash");
        wr(&mut p, offset, CMD_READ_ARRAY);
        assert_eq!(rd(&mut p, offset), original);
        assert_eq!(rd(&mut p, 0x1234), pattern(SIZE)[0x1234]);
    }

    #[test]
    fn program_and_read_back() {
        let (f, mut p) = device(SIZE);
        ovmf_program(&mut p, 0x2000, &[0x11, 0x22, 0x33, 0x44, 0x0f]);
        let mut w = [0u8; 4];
        p.read(0x2000, &mut w);
        assert_eq!(w, [0x11, 0x22, 0x33, 0x44]);
        // A plain copy, not an AND: 0xf0 over 0x0f reads 0xf0, not 0x00.
        ovmf_program(&mut p, 0x2004, &[0xf0]);
        assert_eq!(rd(&mut p, 0x2004), 0xf0);
        // Wide program accesses store all their bytes.
        wr(&mut p, 0x3000, CMD_PROGRAM_ALT);
        p.write(0x3000, &0x0807_0605_0403_0201u64.to_le_bytes());
        wr(&mut p, 0x3000, CMD_READ_ARRAY);
        let mut q = [0u8; 8];
        p.read(0x3000, &mut q);
        assert_eq!(q, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            std::fs::read(&f.0).unwrap()[0x2000..0x2005],
            [0x11, 0x22, 0x33, 0x44, 0xf0]
        );
    }

    #[test]
    fn erase_clears_exactly_one_block() {
        let (f, mut p) = device(SIZE);
        let before = pattern(SIZE);
        ovmf_erase(&mut p, 0x5123);
        let mut all = vec![0u8; SIZE as usize];
        for (i, b) in all.iter_mut().enumerate() {
            *b = rd(&mut p, i as u64);
        }
        assert!(all[0x5000..0x6000].iter().all(|&b| b == 0xff));
        assert_eq!(all[..0x5000], before[..0x5000]);
        assert_eq!(all[0x6000..], before[0x6000..]);
        assert_eq!(std::fs::read(&f.0).unwrap(), all);
    }

    #[test]
    fn status_register() {
        let (_f, mut p) = device(SIZE);
        wr(&mut p, 0x10, CMD_PROGRAM);
        wr(&mut p, 0x10, 0xab);
        // Read-status mode until 0xff.
        assert_eq!(rd(&mut p, 0x10), STATUS_READY);
        let mut w = [0u8; 4];
        p.read(0x40, &mut w);
        assert_eq!(w, [STATUS_READY; 4]);
        wr(&mut p, 0, CMD_READ_ARRAY);
        assert_eq!(rd(&mut p, 0x10), 0xab);

        // A bad erase sequence: both error bits, read-status mode, nothing erased.
        wr(&mut p, 0x1000, CMD_ERASE_SETUP);
        wr(&mut p, 0x1000, 0x55);
        assert_eq!(rd(&mut p, 0x1000) & 0x30, 0x30);
        wr(&mut p, 0, CMD_READ_ARRAY);
        assert_eq!(rd(&mut p, 0x1001), pattern(SIZE)[0x1001]);
        wr(&mut p, 0, CMD_READ_STATUS);
        assert_eq!(rd(&mut p, 0) & 0x30, 0x30, "errors stay until cleared");
        wr(&mut p, 0, CMD_CLEAR_STATUS);
        assert_eq!(
            rd(&mut p, 0x1001),
            pattern(SIZE)[0x1001],
            "0x50 returns to read array"
        );
        wr(&mut p, 0, CMD_READ_STATUS);
        assert_eq!(rd(&mut p, 0), 0x00);
        // An erase sets ready again.
        ovmf_erase(&mut p, 0);
        wr(&mut p, 0, CMD_READ_STATUS);
        assert_eq!(rd(&mut p, 0), STATUS_READY);
    }

    #[test]
    fn cfi_query() {
        let (_f, mut p) = device(SIZE);
        wr(&mut p, 0x55, CMD_CFI_QUERY);
        let mut q = [0u8; 4];
        p.read(0x10, &mut q);
        assert_eq!(q, [b'Q', b'R', b'Y', 0x01]);
        assert_eq!(rd(&mut p, 0x14), 0x00);
        assert_eq!(rd(&mut p, 0x27), 16, "64 KiB is 2^16 bytes");
        assert_eq!(rd(&mut p, 0x28), CFI_INTERFACE_X8);
        assert_eq!(rd(&mut p, 0x2a), 8);
        assert_eq!(rd(&mut p, 0x2c), 1);
        assert_eq!([rd(&mut p, 0x2d), rd(&mut p, 0x2e)], [15, 0], "16 blocks");
        assert_eq!([rd(&mut p, 0x2f), rd(&mut p, 0x30)], [0x10, 0x00], "4 KiB");
        assert_eq!(rd(&mut p, 0x50), 0);
        assert_eq!(rd(&mut p, 0xff), 0);
        assert_eq!(rd(&mut p, u64::MAX), 0);
        wr(&mut p, 0, CMD_READ_ARRAY);
        assert_eq!(rd(&mut p, 0x10), pattern(SIZE)[0x10]);

        // OVMF_VARS_4M.fd: 528 KiB, 132 blocks; the size rounds up to 1 MiB.
        let t = cfi_table(528 * 1024);
        assert_eq!(t[0x27], 20);
        assert_eq!(u16::from_le_bytes([t[0x2d], t[0x2e]]), 131);
    }

    #[test]
    fn id_mode() {
        let (_f, mut p) = device(SIZE);
        wr(&mut p, 0x2000, CMD_READ_ID);
        assert_eq!(rd(&mut p, 0), MANUFACTURER_ID);
        assert_eq!(rd(&mut p, 1), DEVICE_ID);
        assert_eq!(rd(&mut p, 2), 0);
        let mut w = [0u8; 2];
        p.read(0x1000, &mut w);
        assert_eq!(w, [0x89, 0x18]);
        wr(&mut p, 0, CMD_READ_ARRAY);
        assert_eq!(rd(&mut p, 1), pattern(SIZE)[1]);
    }

    #[test]
    fn write_to_buffer() {
        let (f, mut p) = device(SIZE);
        wr(&mut p, 0x4000, CMD_WRITE_BUFFER);
        assert_eq!(rd(&mut p, 0x4000), STATUS_READY);
        wr(&mut p, 0x4000, 2); // three data writes
        wr(&mut p, 0x4000, 0xa1);
        p.write(0x4001, &[0xa2, 0xa3]);
        // Nothing is written before the confirm.
        wr(&mut p, 0x4003, 0xa4);
        assert_eq!(p.contents[0x4000], pattern(SIZE)[0x4000]);
        wr(&mut p, 0x4000, CMD_CONFIRM);
        assert_eq!(rd(&mut p, 0), STATUS_READY);
        wr(&mut p, 0, CMD_READ_ARRAY);
        let mut w = [0u8; 4];
        p.read(0x4000, &mut w);
        assert_eq!(w, [0xa1, 0xa2, 0xa3, 0xa4]);
        assert_eq!(std::fs::read(&f.0).unwrap()[0x4000..0x4004], w);

        // A bad confirm is a sequence error and writes nothing.
        wr(&mut p, 0x5000, CMD_WRITE_BUFFER);
        wr(&mut p, 0x5000, 0);
        wr(&mut p, 0x5000, 0x77);
        wr(&mut p, 0x5000, CMD_READ_ARRAY);
        assert_eq!(rd(&mut p, 0) & 0x30, 0x30);
        wr(&mut p, 0, CMD_READ_ARRAY);
        assert_eq!(rd(&mut p, 0x5000), pattern(SIZE)[0x5000]);
    }

    #[test]
    fn lock_suspend_and_unknown_commands() {
        let (_f, mut p) = device(SIZE);
        for second in [LOCK_SET, CMD_CONFIRM, LOCK_DOWN] {
            wr(&mut p, 0, CMD_LOCK_SETUP);
            wr(&mut p, 0, second);
            assert_eq!(rd(&mut p, 0), STATUS_READY);
        }
        wr(&mut p, 0, CMD_SUSPEND);
        assert_eq!(rd(&mut p, 0), STATUS_READY);
        wr(&mut p, 0, CMD_CONFIRM);
        assert_eq!(rd(&mut p, 0), STATUS_READY);
        wr(&mut p, 0, 0x42);
        assert_eq!(rd(&mut p, 3), 3, "unknown command: read array");
        // Locking never stops a program.
        ovmf_program(&mut p, 3, &[0x99]);
        assert_eq!(rd(&mut p, 3), 0x99);
    }

    #[test]
    fn contents_persist() {
        let f = TempFile::new(&pattern(SIZE));
        {
            let mut p = Pflash::open(&f.0).unwrap();
            ovmf_erase(&mut p, 0x8000);
            ovmf_program(&mut p, 0x8010, b"BootOrder");
            p.sync().unwrap();
        }
        let mut expected = pattern(SIZE);
        expected[0x8000..0x9000].fill(0xff);
        expected[0x8010..0x8019].copy_from_slice(b"BootOrder");
        let mut p = Pflash::open(&f.0).unwrap();
        assert_eq!(p.len(), SIZE);
        let mut got = vec![0u8; SIZE as usize];
        for (chunk, i) in got.chunks_mut(8).zip((0..).step_by(8)) {
            p.read(i, chunk);
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn state_round_trip() {
        let (_f1, mut a) = device(SIZE);
        let (f2, mut b) = device(SIZE);
        ovmf_program(&mut a, 0x100, &[1, 2, 3]);
        // Half-way through a write-to-buffer.
        wr(&mut a, 0x200, CMD_WRITE_BUFFER);
        wr(&mut a, 0x200, 1);
        wr(&mut a, 0x200, 0xee);
        let state = a.save_state();
        let json = serde_json::to_string(&state).unwrap();
        let back: PflashState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        b.restore_state(&back).unwrap();
        assert_eq!(b.save_state(), state);
        assert_eq!(std::fs::read(&f2.0).unwrap(), a.contents);
        // Both finish the sequence alike.
        for p in [&mut a, &mut b] {
            wr(p, 0x201, 0xef);
            wr(p, 0x200, CMD_CONFIRM);
            wr(p, 0x200, CMD_READ_ARRAY);
            assert_eq!([rd(p, 0x200), rd(p, 0x201)], [0xee, 0xef]);
        }
        assert_eq!(a.save_state(), b.save_state());

        // Wrong sizes and inconsistent buffers are refused, and change nothing.
        let (_f3, mut small) = device(SIZE / 2);
        let before = small.save_state();
        assert!(matches!(
            small.restore_state(&state),
            Err(PflashError::StateSize { .. })
        ));
        let mut bad = state.clone();
        bad.mode = Mode::ReadArray;
        let b_before = b.save_state();
        assert!(matches!(
            b.restore_state(&bad),
            Err(PflashError::StateBuffer)
        ));
        assert_eq!(small.save_state(), before);
        assert_eq!(b.save_state(), b_before);
    }

    #[test]
    fn hostile_guest() {
        let f = TempFile::new(&pattern(SIZE));
        let mut p = Pflash::open(&f.0).unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let offsets = [
            0,
            1,
            SIZE - 1,
            SIZE - 4,
            SIZE,
            SIZE + 1,
            u64::MAX,
            u64::MAX - 3,
        ];
        let commands = [
            0x10, 0x20, 0x40, 0x50, 0x60, 0x70, 0x90, 0x98, 0xb0, 0xd0, 0xe8, 0xff,
        ];
        for _ in 0..20_000 {
            let r = next();
            let offset = match r % 3 {
                0 => offsets[(r >> 8) as usize % offsets.len()],
                1 => next() % (SIZE + 64),
                _ => next(),
            };
            let width = [0, 1, 2, 4, 8, 16][(r >> 16) as usize % 6];
            let mut data = vec![0u8; width];
            for b in &mut data {
                *b = if next() % 2 == 0 {
                    commands[(next() % commands.len() as u64) as usize]
                } else {
                    next() as u8
                };
            }
            if r >> 63 == 0 {
                p.write(offset, &data);
            } else {
                p.read(offset, &mut data);
            }
        }
        // Whatever sequence is pending (up to 256 buffered writes) ends in read-array mode
        // after enough 0xff writes, which land past the end and so change nothing.
        for _ in 0..260 {
            wr(&mut p, u64::MAX, CMD_READ_ARRAY);
        }
        assert_eq!(p.mode, Mode::ReadArray);
        // A program at the last byte with an 8-byte access.
        wr(&mut p, 0, CMD_READ_ARRAY);
        wr(&mut p, SIZE - 1, CMD_PROGRAM);
        p.write(SIZE - 1, &[0x5a; 8]);
        wr(&mut p, 0, CMD_READ_ARRAY);
        assert_eq!(rd(&mut p, SIZE - 1), 0x5a);
        // And a buffered write running past the end.
        wr(&mut p, SIZE - 2, CMD_WRITE_BUFFER);
        wr(&mut p, SIZE - 2, 1);
        p.write(SIZE - 2, &[0x6b; 16]);
        p.write(u64::MAX, &[0x6b; 8]);
        wr(&mut p, SIZE - 2, CMD_CONFIRM);
        wr(&mut p, 0, CMD_READ_ARRAY);
        assert_eq!([rd(&mut p, SIZE - 2), rd(&mut p, SIZE - 1)], [0x6b, 0x6b]);
        assert_eq!(p.contents.len() as u64, SIZE);
        assert_eq!(std::fs::metadata(&f.0).unwrap().len(), SIZE);
        assert_eq!(std::fs::read(&f.0).unwrap(), p.contents);
    }

    #[test]
    fn bad_files_refused() {
        let empty = TempFile::new(&[]);
        let err = Pflash::open(&empty.0).err().unwrap();
        assert!(matches!(err, PflashError::Empty { .. }));
        assert!(err.to_string().contains(&*empty.0.to_string_lossy()));

        let odd = TempFile::new(&[0u8; 1000]);
        let err = Pflash::open(&odd.0).err().unwrap();
        assert!(matches!(err, PflashError::Unaligned { size: 1000, .. }));

        let big = TempFile::new(&[]);
        File::options()
            .write(true)
            .open(&big.0)
            .unwrap()
            .set_len(MAX_SIZE + BLOCK_SIZE)
            .unwrap();
        assert!(matches!(
            Pflash::open(&big.0),
            Err(PflashError::TooLarge { .. })
        ));
        assert_eq!(
            std::fs::metadata(&big.0).unwrap().len(),
            MAX_SIZE + BLOCK_SIZE
        );

        let missing =
            std::env::temp_dir().join(format!("vessel-pflash-missing-{}", std::process::id()));
        let err = Pflash::open(&missing).err().unwrap();
        assert!(matches!(err, PflashError::Open { .. }));
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(!err.to_string().contains(&source));
    }
}
