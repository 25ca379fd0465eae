//! The firmware's table loader (QEMU's BIOSLinker, `hw/acpi/bios-linker-loader.c`) and the
//! ACPI tables as fw_cfg files.
//!
//! [`TableLoader`] writes the `etc/table-loader` file: 128-byte little-endian commands that
//! SeaBIOS and OVMF run in order: allocate a file in guest memory, add the address a file
//! was allocated at to a pointer field inside another, compute a checksum.
//!
//! [`acpi_files`] turns an RSDP and the tables it leads to into the three files QEMU gives the
//! firmware ([`ACPI_RSDP_FILE`], [`ACPI_TABLES_FILE`], [`LOADER_FILE`]): pointer fields hold
//! offsets in the tables file, which the loader turns into addresses; checksums are computed
//! by the firmware once the pointers are patched.

use super::{FwCfg, FwCfgError, MAX_FILE_NAME};

/// The loader script's fw_cfg file.
pub const LOADER_FILE: &str = "etc/table-loader";
/// The ACPI tables other than the RSDP, concatenated.
pub const ACPI_TABLES_FILE: &str = "etc/acpi/tables";
/// The RSDP.
pub const ACPI_RSDP_FILE: &str = "etc/acpi/rsdp";

/// Size of one loader command.
pub const COMMAND_LEN: usize = 128;
/// Size of a file name field in a command (NUL-terminated).
const NAME_LEN: usize = MAX_FILE_NAME + 1;

/// Command codes.
pub const CMD_ALLOCATE: u32 = 1;
pub const CMD_ADD_POINTER: u32 = 2;
pub const CMD_ADD_CHECKSUM: u32 = 3;

/// Where the firmware allocates a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Zone {
    /// Anywhere in RAM (below 4 GiB).
    High = 1,
    /// The F segment (0xf0000..0x100000), where the OS scans for the RSDP.
    FSeg = 2,
}

/// Why a loader command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoaderError {
    #[error("table-loader file name is empty")]
    EmptyName,
    #[error("table-loader file name of {len} bytes is longer than {MAX_FILE_NAME} bytes")]
    NameTooLong { len: usize },
    #[error("table-loader file name {0:?} contains a NUL byte")]
    NameHasNul(String),
    #[error("alignment {0} is not a power of two")]
    BadAlign(u32),
    #[error("pointer size {0} is not 1, 2, 4 or 8")]
    BadPointerSize(u8),
    #[error("file {0:?} is allocated twice")]
    AlreadyAllocated(String),
    #[error("file {0:?} is used before it is allocated")]
    NotAllocated(String),
}

/// The `etc/table-loader` script, built command by command.
#[derive(Debug, Clone, Default)]
pub struct TableLoader {
    commands: Vec<[u8; COMMAND_LEN]>,
    allocated: Vec<String>,
}

/// Put `name` in a command's 56-byte field at `at`.
fn put_name(cmd: &mut [u8; COMMAND_LEN], at: usize, name: &str) {
    cmd[at..at + name.len()].copy_from_slice(name.as_bytes());
}

fn put_u32(cmd: &mut [u8; COMMAND_LEN], at: usize, v: u32) {
    cmd[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn check_name(name: &str) -> Result<(), LoaderError> {
    if name.is_empty() {
        return Err(LoaderError::EmptyName);
    }
    if name.len() > MAX_FILE_NAME {
        return Err(LoaderError::NameTooLong { len: name.len() });
    }
    if name.as_bytes().contains(&0) {
        return Err(LoaderError::NameHasNul(name.to_owned()));
    }
    Ok(())
}

impl TableLoader {
    /// An empty script.
    pub fn new() -> Self {
        TableLoader::default()
    }

    /// A new command of type `code`.
    fn command(code: u32) -> [u8; COMMAND_LEN] {
        let mut cmd = [0u8; COMMAND_LEN];
        put_u32(&mut cmd, 0, code);
        cmd
    }

    fn check_allocated(&self, name: &str) -> Result<(), LoaderError> {
        check_name(name)?;
        if !self.allocated.iter().any(|a| a == name) {
            return Err(LoaderError::NotAllocated(name.to_owned()));
        }
        Ok(())
    }

    /// ALLOCATE: the firmware copies `file` to memory aligned to `align` (a power of two) in
    /// `zone`. Each file is allocated once, before other commands name it.
    pub fn allocate(&mut self, file: &str, align: u32, zone: Zone) -> Result<(), LoaderError> {
        check_name(file)?;
        if !align.is_power_of_two() {
            return Err(LoaderError::BadAlign(align));
        }
        if self.allocated.iter().any(|a| a == file) {
            return Err(LoaderError::AlreadyAllocated(file.to_owned()));
        }
        let mut cmd = Self::command(CMD_ALLOCATE);
        put_name(&mut cmd, 4, file);
        put_u32(&mut cmd, 4 + NAME_LEN, align);
        cmd[8 + NAME_LEN] = zone as u8;
        self.commands.push(cmd);
        self.allocated.push(file.to_owned());
        Ok(())
    }

    /// ADD_POINTER: the firmware adds the address `src` was allocated at to the `size`-byte
    /// little-endian value at `offset` in `dest`.
    pub fn add_pointer(
        &mut self,
        dest: &str,
        src: &str,
        offset: u32,
        size: u8,
    ) -> Result<(), LoaderError> {
        self.check_allocated(dest)?;
        self.check_allocated(src)?;
        if !matches!(size, 1 | 2 | 4 | 8) {
            return Err(LoaderError::BadPointerSize(size));
        }
        let mut cmd = Self::command(CMD_ADD_POINTER);
        put_name(&mut cmd, 4, dest);
        put_name(&mut cmd, 4 + NAME_LEN, src);
        put_u32(&mut cmd, 4 + 2 * NAME_LEN, offset);
        cmd[8 + 2 * NAME_LEN] = size;
        self.commands.push(cmd);
        Ok(())
    }

    /// ADD_CHECKSUM: the firmware sets the byte at `offset` in `file` so that the bytes
    /// `start..start + len` sum to 0 (the byte should be 0 beforehand, and inside the range).
    pub fn add_checksum(
        &mut self,
        file: &str,
        offset: u32,
        start: u32,
        len: u32,
    ) -> Result<(), LoaderError> {
        self.check_allocated(file)?;
        let mut cmd = Self::command(CMD_ADD_CHECKSUM);
        put_name(&mut cmd, 4, file);
        put_u32(&mut cmd, 4 + NAME_LEN, offset);
        put_u32(&mut cmd, 8 + NAME_LEN, start);
        put_u32(&mut cmd, 12 + NAME_LEN, len);
        self.commands.push(cmd);
        Ok(())
    }

    /// Number of commands.
    pub fn len(&self) -> usize {
        self.commands.len()
    }

    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// The file's contents.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.commands.concat()
    }
}

/// A pointer field inside an ACPI table (or the RSDP): `size` bytes at `offset` that must
/// hold the address of table `target` (an index in the tables given to [`acpi_files`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiPointer {
    pub offset: usize,
    pub size: u8,
    pub target: usize,
}

/// A table for [`acpi_files`]: its bytes (pointer fields may hold anything, they are
/// rewritten), its pointers, and where its checksum byte is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTable {
    pub bytes: Vec<u8>,
    pub pointers: Vec<AcpiPointer>,
    /// The checksum byte over the whole table (9 in the standard header; `None` for the
    /// FACS, which has none).
    pub checksum_offset: Option<usize>,
}

/// Checksum byte of the standard table header.
const HEADER_CHECKSUM: usize = 9;

impl AcpiTable {
    /// A table with the standard header (checksum at byte 9) and no pointers yet.
    pub fn new(bytes: Vec<u8>) -> Self {
        AcpiTable {
            bytes,
            pointers: Vec::new(),
            checksum_offset: Some(HEADER_CHECKSUM),
        }
    }

    /// A table without a checksum (the FACS).
    pub fn without_checksum(bytes: Vec<u8>) -> Self {
        AcpiTable {
            checksum_offset: None,
            ..AcpiTable::new(bytes)
        }
    }

    /// This table with a pointer of `size` bytes at `offset` to table `target`.
    pub fn with_pointer(mut self, offset: usize, size: u8, target: usize) -> Self {
        self.pointers.push(AcpiPointer {
            offset,
            size,
            target,
        });
        self
    }
}

/// The RSDP for [`acpi_files`]: 20 bytes (ACPI 1.0) or 36 (2.0+), its pointers (RSDT at 16,
/// 4 bytes; XSDT at 24, 8 bytes). Its checksums are computed by the firmware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rsdp {
    pub bytes: Vec<u8>,
    pub pointers: Vec<AcpiPointer>,
}

/// RSDP layout.
const RSDP_V1_LEN: usize = 20;
const RSDP_V2_LEN: usize = 36;
const RSDP_CHECKSUM: usize = 8;
const RSDP_EXT_CHECKSUM: usize = 32;

/// Alignment of the tables file and of each table in it (the FACS must be 64-byte aligned).
pub const TABLE_ALIGN: usize = 64;
/// Alignment of the RSDP (16, where the OS scans for it).
const RSDP_ALIGN: u32 = 16;

/// Which table an [`AcpiFilesError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableId {
    Rsdp,
    Table(usize),
}

impl std::fmt::Display for TableId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TableId::Rsdp => f.write_str("the RSDP"),
            TableId::Table(i) => write!(f, "table {i}"),
        }
    }
}

/// Why [`acpi_files`] refused its tables.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcpiFilesError {
    #[error("RSDP of {0} bytes is neither {RSDP_V1_LEN} nor {RSDP_V2_LEN} bytes")]
    RsdpLength(usize),
    #[error("{0} is empty")]
    Empty(TableId),
    #[error("{table}: pointer of {size} bytes at {offset:#x} lies outside it")]
    PointerOutside {
        table: TableId,
        offset: usize,
        size: u8,
    },
    #[error("{table}: pointer size {size} is not 1, 2, 4 or 8")]
    PointerSize { table: TableId, size: u8 },
    #[error("{table}: pointer at {offset:#x} names table {target}, which does not exist")]
    NoSuchTarget {
        table: TableId,
        offset: usize,
        target: usize,
    },
    #[error("{table}: pointer of {size} bytes at {offset:#x} cannot hold offset {value:#x}")]
    PointerTooNarrow {
        table: TableId,
        offset: usize,
        size: u8,
        value: usize,
    },
    #[error("{table}: checksum byte {offset:#x} lies outside it")]
    ChecksumOutside { table: TableId, offset: usize },
    #[error("ACPI tables of {0} bytes do not fit a 32-bit file")]
    TooLarge(usize),
    #[error("table-loader command refused")]
    Loader(#[from] LoaderError),
}

/// The three fw_cfg files that give the firmware the ACPI tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiBlobs {
    /// [`ACPI_TABLES_FILE`]: the tables, each at a [`TABLE_ALIGN`]ed offset.
    pub tables: Vec<u8>,
    /// [`ACPI_RSDP_FILE`].
    pub rsdp: Vec<u8>,
    /// [`LOADER_FILE`].
    pub loader: Vec<u8>,
    /// Where each table starts in `tables`.
    pub offsets: Vec<usize>,
}

impl AcpiBlobs {
    /// Add the three files to `fw`.
    pub fn add_to(self, fw: &mut FwCfg) -> Result<(), FwCfgError> {
        fw.add_file(ACPI_TABLES_FILE, self.tables)?;
        fw.add_file(ACPI_RSDP_FILE, self.rsdp)?;
        fw.add_file(LOADER_FILE, self.loader)
    }
}

/// Rewrite `table`'s pointer fields to the offsets of their targets in the tables file, and
/// add an ADD_POINTER per field to `loader` (`table` lives in `file` at `base`).
fn link_pointers(
    id: TableId,
    bytes: &mut [u8],
    pointers: &[AcpiPointer],
    offsets: &[usize],
    file: &str,
    base: usize,
    loader: &mut TableLoader,
) -> Result<(), AcpiFilesError> {
    for p in pointers {
        if !matches!(p.size, 1 | 2 | 4 | 8) {
            return Err(AcpiFilesError::PointerSize {
                table: id,
                size: p.size,
            });
        }
        let size = usize::from(p.size);
        let field = p
            .offset
            .checked_add(size)
            .and_then(|end| bytes.get_mut(p.offset..end))
            .ok_or(AcpiFilesError::PointerOutside {
                table: id,
                offset: p.offset,
                size: p.size,
            })?;
        let value = *offsets.get(p.target).ok_or(AcpiFilesError::NoSuchTarget {
            table: id,
            offset: p.offset,
            target: p.target,
        })?;
        if size < 8 && (value as u64) >> (8 * size) != 0 {
            return Err(AcpiFilesError::PointerTooNarrow {
                table: id,
                offset: p.offset,
                size: p.size,
                value,
            });
        }
        field.copy_from_slice(&(value as u64).to_le_bytes()[..size]);
        // The file is at most u32::MAX bytes (checked by the caller): offsets fit.
        loader.add_pointer(file, ACPI_TABLES_FILE, (base + p.offset) as u32, p.size)?;
    }
    Ok(())
}

/// The fw_cfg files for `rsdp` and `tables`, as QEMU builds them: the tables concatenated in
/// [`ACPI_TABLES_FILE`] (allocated high, 64-byte aligned), the RSDP in [`ACPI_RSDP_FILE`]
/// (allocated in the F segment, 16-byte aligned), and a [`LOADER_FILE`] that allocates both,
/// patches every pointer (whose field is rewritten here to its target's offset in the tables
/// file) and computes every checksum (whose byte is zeroed here): each table's over itself,
/// the RSDP's over its first 20 bytes and, for a 36-byte RSDP, the extended one over all 36.
pub fn acpi_files(rsdp: &Rsdp, tables: &[AcpiTable]) -> Result<AcpiBlobs, AcpiFilesError> {
    if rsdp.bytes.len() != RSDP_V1_LEN && rsdp.bytes.len() != RSDP_V2_LEN {
        return Err(AcpiFilesError::RsdpLength(rsdp.bytes.len()));
    }
    let mut offsets = Vec::with_capacity(tables.len());
    let mut end = 0usize;
    for (i, t) in tables.iter().enumerate() {
        if t.bytes.is_empty() {
            return Err(AcpiFilesError::Empty(TableId::Table(i)));
        }
        let at = end
            .checked_next_multiple_of(TABLE_ALIGN)
            .ok_or(AcpiFilesError::TooLarge(usize::MAX))?;
        offsets.push(at);
        end = at
            .checked_add(t.bytes.len())
            .ok_or(AcpiFilesError::TooLarge(usize::MAX))?;
    }
    if u32::try_from(end).is_err() {
        return Err(AcpiFilesError::TooLarge(end));
    }

    let mut loader = TableLoader::new();
    loader.allocate(ACPI_RSDP_FILE, RSDP_ALIGN, Zone::FSeg)?;
    loader.allocate(ACPI_TABLES_FILE, TABLE_ALIGN as u32, Zone::High)?;

    let mut blob = vec![0u8; end];
    for (i, (t, &at)) in tables.iter().zip(&offsets).enumerate() {
        let id = TableId::Table(i);
        let bytes = &mut blob[at..at + t.bytes.len()];
        bytes.copy_from_slice(&t.bytes);
        link_pointers(
            id,
            bytes,
            &t.pointers,
            &offsets,
            ACPI_TABLES_FILE,
            at,
            &mut loader,
        )?;
        if let Some(c) = t.checksum_offset {
            *bytes.get_mut(c).ok_or(AcpiFilesError::ChecksumOutside {
                table: id,
                offset: c,
            })? = 0;
            // Within a file of at most u32::MAX bytes.
            loader.add_checksum(
                ACPI_TABLES_FILE,
                (at + c) as u32,
                at as u32,
                t.bytes.len() as u32,
            )?;
        }
    }

    let mut rsdp_bytes = rsdp.bytes.clone();
    link_pointers(
        TableId::Rsdp,
        &mut rsdp_bytes,
        &rsdp.pointers,
        &offsets,
        ACPI_RSDP_FILE,
        0,
        &mut loader,
    )?;
    rsdp_bytes[RSDP_CHECKSUM] = 0;
    loader.add_checksum(ACPI_RSDP_FILE, RSDP_CHECKSUM as u32, 0, RSDP_V1_LEN as u32)?;
    if rsdp_bytes.len() == RSDP_V2_LEN {
        rsdp_bytes[RSDP_EXT_CHECKSUM] = 0;
        loader.add_checksum(
            ACPI_RSDP_FILE,
            RSDP_EXT_CHECKSUM as u32,
            0,
            RSDP_V2_LEN as u32,
        )?;
    }

    Ok(AcpiBlobs {
        tables: blob,
        rsdp: rsdp_bytes,
        loader: loader.to_bytes(),
        offsets,
    })
}

#[cfg(test)]
#[path = "loader_tests.rs"]
mod tests;
