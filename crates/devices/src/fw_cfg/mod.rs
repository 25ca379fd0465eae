//! QEMU's firmware configuration device (fw_cfg), through which SeaBIOS and OVMF learn about
//! the machine: numeric items (CPU count, kernel for direct boot, ...) and named files
//! (`etc/e820`, the ACPI tables and their [`loader::TableLoader`] script, ...).
//!
//! The x86 I/O port interface of QEMU's `docs/specs/fw_cfg.rst`, at
//! [`FW_CFG_PORT_BASE`]..+[`FW_CFG_PORT_LEN`]:
//!
//! - offset 0 ([`FW_CFG_SELECTOR`]): a 16-bit little-endian write selects an item and rewinds
//!   its read offset;
//! - offset 1 ([`FW_CFG_DATA`]): each byte read returns the next byte of the selected item, 0
//!   past its end; writes are ignored (no item is writable);
//! - offsets 4..12 ([`FW_CFG_DMA`]): the big-endian guest-physical address of a DMA access
//!   descriptor, written as two 32-bit halves (the low half, at offset 8, starts the transfer)
//!   or as one 64-bit write; reads return the signature `"QEMU CFG"`.
//!
//! Everything the guest sends is untrusted: no access panics, and a DMA transfer touches guest
//! memory only after checking the whole range it covers (see `dma.rs`).

mod dma;
mod kernel;
pub mod loader;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use vessel_memory::GuestMemoryMmap;

use crate::bus::BusDevice;

/// The first port of the device (the selector register).
pub const FW_CFG_PORT_BASE: u16 = 0x510;
/// Number of ports, from the selector through the DMA address register.
pub const FW_CFG_PORT_LEN: u64 = 0x0c;
/// The selector register (16-bit write).
pub const FW_CFG_SELECTOR: u16 = 0x510;
/// The data register (8-bit read).
pub const FW_CFG_DATA: u16 = 0x511;
/// The DMA address register (big-endian 64-bit, high half first).
pub const FW_CFG_DMA: u16 = 0x514;

/// Offsets in the port range.
const SELECTOR_OFFSET: u64 = (FW_CFG_SELECTOR - FW_CFG_PORT_BASE) as u64;
const DATA_OFFSET: u64 = (FW_CFG_DATA - FW_CFG_PORT_BASE) as u64;
const DMA_OFFSET: u64 = (FW_CFG_DMA - FW_CFG_PORT_BASE) as u64;

/// What reads of the DMA address register return (`"QEMU CFG"`, big-endian).
pub const DMA_SIGNATURE: [u8; 8] = *b"QEMU CFG";

/// Selector bit: the item is selected for writing (writes are ignored; reads are unaffected).
pub const SELECTOR_WRITE: u16 = 0x4000;
/// Selector bit: an architecture-specific item.
pub const SELECTOR_ARCH_LOCAL: u16 = 0x8000;

/// Longest file name: the directory's 56-byte field, NUL-terminated.
pub const MAX_FILE_NAME: usize = 55;
/// Most files the device holds (selectors [`keys::FILE_FIRST`]..0x1000).
pub const MAX_FILES: usize = 0x1000 - keys::FILE_FIRST as usize;

/// Item keys (QEMU's `FW_CFG_*`).
pub mod keys {
    /// `"QEMU"` (present from [`FwCfg::new`](super::FwCfg::new)).
    pub const SIGNATURE: u16 = 0x00;
    /// Interface features, u32 little-endian (present from `new`).
    pub const ID: u16 = 0x01;
    pub const UUID: u16 = 0x02;
    pub const RAM_SIZE: u16 = 0x03;
    pub const NOGRAPHIC: u16 = 0x04;
    pub const NB_CPUS: u16 = 0x05;
    pub const MACHINE_ID: u16 = 0x06;
    pub const KERNEL_ADDR: u16 = 0x07;
    pub const KERNEL_SIZE: u16 = 0x08;
    pub const KERNEL_CMDLINE: u16 = 0x09;
    pub const INITRD_ADDR: u16 = 0x0a;
    pub const INITRD_SIZE: u16 = 0x0b;
    pub const BOOT_DEVICE: u16 = 0x0c;
    pub const NUMA: u16 = 0x0d;
    pub const BOOT_MENU: u16 = 0x0e;
    pub const MAX_CPUS: u16 = 0x0f;
    pub const KERNEL_ENTRY: u16 = 0x10;
    pub const KERNEL_DATA: u16 = 0x11;
    pub const INITRD_DATA: u16 = 0x12;
    pub const CMDLINE_ADDR: u16 = 0x13;
    pub const CMDLINE_SIZE: u16 = 0x14;
    pub const CMDLINE_DATA: u16 = 0x15;
    pub const SETUP_ADDR: u16 = 0x16;
    pub const SETUP_SIZE: u16 = 0x17;
    pub const SETUP_DATA: u16 = 0x18;
    /// The file directory (maintained by the device).
    pub const FILE_DIR: u16 = 0x19;
    /// The selector of the first file (in name order).
    pub const FILE_FIRST: u16 = 0x20;
    /// x86: the legacy e820 table (arch-local; firmware prefers the `etc/e820` file).
    pub const E820_TABLE: u16 = super::SELECTOR_ARCH_LOCAL | 0x03;
}

/// [`keys::ID`] bit: the traditional (port) interface.
const ID_TRADITIONAL: u32 = 1 << 0;
/// [`keys::ID`] bit: the DMA interface.
const ID_DMA: u32 = 1 << 1;

/// Size of one file directory entry: size (4), select (2), reserved (2), name (56).
const DIR_ENTRY_LEN: usize = 64;

/// Why an item or file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FwCfgError {
    #[error("fw_cfg key {0:#06x} is reserved or not a numeric item key")]
    InvalidKey(u16),
    #[error("fw_cfg item {0:#06x} is already set")]
    DuplicateItem(u16),
    #[error("fw_cfg file name is empty")]
    EmptyName,
    #[error("fw_cfg file name of {len} bytes is longer than {MAX_FILE_NAME} bytes")]
    NameTooLong { len: usize },
    #[error("fw_cfg file name {0:?} contains a NUL byte")]
    NameHasNul(String),
    #[error("fw_cfg file {0:?} already exists")]
    DuplicateFile(String),
    #[error("fw_cfg holds at most {MAX_FILES} files")]
    TooManyFiles,
    #[error("fw_cfg item of {0} bytes does not fit a 32-bit size")]
    TooLarge(usize),
    #[error("kernel for direct boot: {0}")]
    BadKernel(&'static str),
    #[error("kernel command line contains a NUL byte")]
    CmdlineHasNul,
}

/// The fw_cfg device: numeric items, files, and the selection the guest is reading.
pub struct FwCfg {
    mem: GuestMemoryMmap,
    /// Numeric items by key, arch-local ones with [`SELECTOR_ARCH_LOCAL`] set.
    items: BTreeMap<u16, Vec<u8>>,
    /// Files sorted by name: file `i` has selector [`keys::FILE_FIRST`]` + i`.
    files: Vec<(String, Vec<u8>)>,
    /// The file directory ([`keys::FILE_DIR`]), rebuilt before the guest sees it when
    /// `dir_stale`.
    dir: Vec<u8>,
    dir_stale: bool,
    /// The selector last written (with its write and arch bits as given).
    selector: u16,
    /// Read offset in the selected item.
    offset: usize,
    /// The DMA address register (the high half, until the low half is written).
    dma_addr: u64,
}

impl FwCfg {
    /// A device over `mem` (the target of DMA transfers) holding the signature and the ID
    /// (traditional and DMA interfaces), and an empty file directory.
    pub fn new(mem: GuestMemoryMmap) -> Self {
        let mut items = BTreeMap::new();
        items.insert(keys::SIGNATURE, b"QEMU".to_vec());
        items.insert(keys::ID, (ID_TRADITIONAL | ID_DMA).to_le_bytes().to_vec());
        FwCfg {
            mem,
            items,
            files: Vec::new(),
            dir: 0u32.to_be_bytes().to_vec(),
            dir_stale: false,
            selector: 0,
            offset: 0,
            dma_addr: 0,
        }
    }

    /// Add the numeric item `key` (one of [`keys`] below [`keys::FILE_DIR`], or an arch-local
    /// key `0x8000 | k` with `k < 0x20`, such as [`keys::E820_TABLE`]).
    ///
    /// The signature, the ID and the directory belong to the device; file selectors and keys
    /// with the write bit are refused, and so is a key already set.
    pub fn add_item(&mut self, key: u16, data: Vec<u8>) -> Result<(), FwCfgError> {
        let index = key & !SELECTOR_ARCH_LOCAL;
        let reserved = key == keys::SIGNATURE || key == keys::ID || key == keys::FILE_DIR;
        if index >= keys::FILE_FIRST || reserved {
            return Err(FwCfgError::InvalidKey(key));
        }
        check_size(&data)?;
        if self.items.contains_key(&key) {
            return Err(FwCfgError::DuplicateItem(key));
        }
        self.items.insert(key, data);
        Ok(())
    }

    /// Add a `u16` item, little-endian (as QEMU's `fw_cfg_add_i16`).
    pub fn add_u16(&mut self, key: u16, value: u16) -> Result<(), FwCfgError> {
        self.add_item(key, value.to_le_bytes().to_vec())
    }

    /// Add a `u32` item, little-endian (as QEMU's `fw_cfg_add_i32`).
    pub fn add_u32(&mut self, key: u16, value: u32) -> Result<(), FwCfgError> {
        self.add_item(key, value.to_le_bytes().to_vec())
    }

    /// Add a `u64` item, little-endian (as QEMU's `fw_cfg_add_i64`).
    pub fn add_u64(&mut self, key: u16, value: u64) -> Result<(), FwCfgError> {
        self.add_item(key, value.to_le_bytes().to_vec())
    }

    /// Add the file `name` (1 to [`MAX_FILE_NAME`] bytes, no NUL, not already present).
    ///
    /// Files are kept sorted by name, as QEMU does: file selectors follow that order from
    /// [`keys::FILE_FIRST`], so adding a file renumbers the ones after it. Add files before
    /// the guest runs.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<(), FwCfgError> {
        if name.is_empty() {
            return Err(FwCfgError::EmptyName);
        }
        if name.len() > MAX_FILE_NAME {
            return Err(FwCfgError::NameTooLong { len: name.len() });
        }
        if name.as_bytes().contains(&0) {
            return Err(FwCfgError::NameHasNul(name.to_owned()));
        }
        check_size(&data)?;
        let at = match self.files.binary_search_by(|(n, _)| n.as_str().cmp(name)) {
            Ok(_) => return Err(FwCfgError::DuplicateFile(name.to_owned())),
            Err(at) => at,
        };
        if self.files.len() >= MAX_FILES {
            return Err(FwCfgError::TooManyFiles);
        }
        self.files.insert(at, (name.to_owned(), data));
        self.dir_stale = true;
        Ok(())
    }

    /// The selector of the file `name`, if present.
    pub fn file_selector(&self, name: &str) -> Option<u16> {
        self.files
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            // At most MAX_FILES files: the selector stays below 0x1000.
            .map(|i| keys::FILE_FIRST + i as u16)
    }

    /// Number of files.
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// Rebuild the directory if a file was added since it was last built.
    fn refresh_dir(&mut self) {
        if !self.dir_stale {
            return;
        }
        self.dir_stale = false;
        let mut dir = Vec::with_capacity(4 + self.files.len() * DIR_ENTRY_LEN);
        // At most MAX_FILES files, each at most u32::MAX bytes: the casts are exact.
        dir.extend_from_slice(&(self.files.len() as u32).to_be_bytes());
        for (i, (name, data)) in self.files.iter().enumerate() {
            dir.extend_from_slice(&(data.len() as u32).to_be_bytes());
            dir.extend_from_slice(&(keys::FILE_FIRST + i as u16).to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut field = [0u8; DIR_ENTRY_LEN - 8];
            field[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&field);
        }
        self.dir = dir;
    }

    /// The item `selector` names, if any (the write bit does not change what is read).
    fn item(&self, selector: u16) -> Option<&[u8]> {
        let key = selector & !SELECTOR_WRITE;
        if key & SELECTOR_ARCH_LOCAL == 0 {
            if key == keys::FILE_DIR {
                return Some(&self.dir);
            }
            if key >= keys::FILE_FIRST {
                let i = usize::from(key - keys::FILE_FIRST);
                return self.files.get(i).map(|(_, d)| d.as_slice());
            }
        }
        self.items.get(&key).map(Vec::as_slice)
    }

    /// Select `selector` and rewind.
    fn select(&mut self, selector: u16) {
        self.selector = selector;
        self.offset = 0;
    }

    /// The rest of the selected item from the read offset (empty past its end or when no item
    /// is selected).
    fn remaining(&self) -> &[u8] {
        self.item(self.selector)
            .and_then(|d| d.get(self.offset..))
            .unwrap_or(&[])
    }

    /// The next byte of the selected item, 0 past its end.
    fn next_byte(&mut self) -> u8 {
        match self.remaining().first() {
            Some(&b) => {
                self.offset += 1;
                b
            }
            None => 0,
        }
    }
}

/// Item sizes are 32-bit in the directory and the DMA interface.
fn check_size(data: &[u8]) -> Result<(), FwCfgError> {
    if u32::try_from(data.len()).is_err() {
        return Err(FwCfgError::TooLarge(data.len()));
    }
    Ok(())
}

/// The `etc/e820` file: one packed little-endian `{ u64 address, u64 length, u32 type }` per
/// `(address, length, type)` entry, 20 bytes each.
pub fn e820_bytes(entries: &[(u64, u64, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 20);
    for &(addr, len, kind) in entries {
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
    }
    out
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.refresh_dir();
        match offset {
            DATA_OFFSET => data.iter_mut().for_each(|b| *b = self.next_byte()),
            o if o >= DMA_OFFSET => {
                // The signature, big-endian from offset 4; 0 past it.
                let start = usize::try_from(o - DMA_OFFSET).unwrap_or(usize::MAX);
                for (i, b) in data.iter_mut().enumerate() {
                    *b = start
                        .checked_add(i)
                        .and_then(|at| DMA_SIGNATURE.get(at))
                        .copied()
                        .unwrap_or(0);
                }
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.refresh_dir();
        match (offset, data.len()) {
            (SELECTOR_OFFSET, 2) => self.select(u16::from_le_bytes([data[0], data[1]])),
            (DMA_OFFSET, 4) => {
                let high = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                self.dma_addr = u64::from(high) << 32;
            }
            (o, 4) if o == DMA_OFFSET + 4 => {
                let low = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                let addr = self.dma_addr | u64::from(low);
                self.dma_addr = 0;
                self.dma_transfer(addr);
            }
            (DMA_OFFSET, 8) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(data);
                self.dma_addr = 0;
                self.dma_transfer(u64::from_be_bytes(b));
            }
            // Data port writes (no item is writable), 1-byte selector writes, anything else.
            _ => {}
        }
    }
}
