//! A read-only FAT12/16/32 (vfat) reader, for the EFI System Partitions and bare FAT images
//! that direct boot looks into: the boot sector's parameters, the allocation table, directories
//! with long (VFAT) names, and files, found by path without regard to case, as FAT names them.
//!
//! It is written here rather than on the `fatfs` crate (which makes the images: see
//! [`crate::make`] and [`crate::cloudinit`]) because images are untrusted and `fatfs` 0.3 trusts
//! their cluster numbers: one corrupted directory entry makes it panic (an arithmetic overflow)
//! and a cluster chain that loops makes it read a directory forever. Here every cluster number
//! is checked against the volume before it is used, every chain is followed a bounded number of
//! times (a file's by its size, a directory's by FAT's limit of 65,536 entries), and nothing is
//! ever written.

use std::cell::RefCell;
use std::io;

/// Reads bytes of the volume (a partition of the image, or all of it).
pub(crate) trait ReadAt {
    /// Fills `buf` from `offset`, or fails (past the end of the volume too).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// Why a FAT volume, or a file in it, could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FatError {
    #[error("not a FAT filesystem: {0}")]
    NotFat(&'static str),
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotADirectory,
    #[error("is a directory")]
    IsADirectory,
    #[error("the cluster chain at cluster {0} is broken")]
    BadChain(u32),
    #[error("the file claims {0} bytes, more than the volume holds")]
    BadSize(u64),
    #[error("reading the volume")]
    Io(#[from] io::Error),
}

/// The width of the allocation table's entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FatKind {
    Fat12,
    Fat16,
    Fat32,
}

/// A directory: FAT12/16's fixed root region, or a cluster chain.
#[derive(Debug, Clone, Copy)]
enum Dir {
    Region { offset: u64, len: u64 },
    Chain(u32),
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The long (VFAT) name when it has a valid one, else the 8.3 name.
    pub name: String,
    /// The 8.3 name, as `NAME.EXT`.
    pub short: String,
    pub is_dir: bool,
    first_cluster: u32,
    pub size: u32,
}

/// What a path names.
enum Node {
    Root,
    Entry(Entry),
}

/// FAT caps a directory at 65,536 entries of 32 bytes.
const MAX_DIR_BYTES: u64 = 65_536 * 32;
/// How much of the allocation table is read at once (and kept).
const FAT_CHUNK: u64 = 4096;

/// An open FAT volume.
pub(crate) struct Fat<R> {
    src: R,
    kind: FatKind,
    cluster_size: u64,
    /// Where the (active) allocation table starts, and its length, in bytes.
    fat_offset: u64,
    fat_len: u64,
    /// Where cluster 2 starts.
    data_offset: u64,
    /// Data clusters: the valid cluster numbers are 2..clusters + 2.
    clusters: u32,
    root: Dir,
    /// The part of the allocation table read last (chains are mostly sequential).
    cache: RefCell<Option<(u64, Vec<u8>)>>,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl<R: ReadAt> Fat<R> {
    /// Opens the volume `src` if its boot sector describes a FAT filesystem (the 0x55AA
    /// signature, a media byte and parameters that make sense), as Linux's vfat decides.
    pub(crate) fn open(src: R) -> Result<Self, FatError> {
        let mut bs = [0u8; 512];
        src.read_at(0, &mut bs)
            .map_err(|_| FatError::NotFat("shorter than a boot sector"))?;
        if bs[510..512] != [0x55, 0xAA] {
            return Err(FatError::NotFat("no boot sector signature"));
        }
        let bps = u64::from(u16_at(&bs, 11));
        let spc = u64::from(bs[13]);
        let reserved = u64::from(u16_at(&bs, 14));
        let fats = u64::from(bs[16]);
        let root_entries = u64::from(u16_at(&bs, 17));
        let total = match u16_at(&bs, 19) {
            0 => u64::from(u32_at(&bs, 32)),
            n => u64::from(n),
        };
        let media = bs[21];
        let spf16 = u64::from(u16_at(&bs, 22));
        if !matches!(bps, 512 | 1024 | 2048 | 4096) {
            return Err(FatError::NotFat("bad sector size"));
        }
        if !spc.is_power_of_two() || spc * bps > 64 << 10 {
            return Err(FatError::NotFat("bad cluster size"));
        }
        if reserved == 0 || !(1..=4).contains(&fats) || total == 0 {
            return Err(FatError::NotFat("bad reserved sectors, FAT count or size"));
        }
        if media < 0xF8 && media != 0xF0 {
            return Err(FatError::NotFat("bad media byte"));
        }
        let fat32 = spf16 == 0;
        let spf = if fat32 {
            u64::from(u32_at(&bs, 36))
        } else {
            spf16
        };
        if spf == 0 || fat32 != (root_entries == 0) {
            return Err(FatError::NotFat("bad FAT or root directory size"));
        }
        let root_sectors = (root_entries * 32).div_ceil(bps);
        let first_data = reserved + fats * spf + root_sectors;
        if first_data >= total {
            return Err(FatError::NotFat("no room for data"));
        }
        let data_clusters = (total - first_data) / spc;
        let kind = match (fat32, data_clusters) {
            (true, _) => FatKind::Fat32,
            (false, n) if n < 4085 => FatKind::Fat12,
            (false, _) => FatKind::Fat16,
        };
        // Cluster numbers must stay below the table's reserved values and fit in the table.
        let (max, bits) = match kind {
            FatKind::Fat12 => (0xFF4, 12),
            FatKind::Fat16 => (0xFFF4, 16),
            FatKind::Fat32 => (0x0FFF_FFF4, 32),
        };
        let fat_len = spf * bps;
        let in_table = (fat_len * 8 / bits).saturating_sub(2);
        let clusters = data_clusters.min(max).min(in_table);
        if clusters == 0 {
            return Err(FatError::NotFat("no clusters"));
        }
        let active = if fat32 && u16_at(&bs, 40) & 0x80 != 0 {
            u64::from(u16_at(&bs, 40) & 0x0F)
        } else {
            0
        };
        if active >= fats {
            return Err(FatError::NotFat("the active FAT does not exist"));
        }
        let mut fs = Fat {
            src,
            kind,
            cluster_size: spc * bps,
            fat_offset: (reserved + active * spf) * bps,
            fat_len,
            data_offset: first_data * bps,
            clusters: clusters as u32,
            root: Dir::Region {
                offset: (reserved + fats * spf) * bps,
                len: root_entries * 32,
            },
            cache: RefCell::new(None),
        };
        if fat32 {
            let c = u32_at(&bs, 44);
            if !fs.valid(c) {
                return Err(FatError::NotFat("bad root directory cluster"));
            }
            fs.root = Dir::Chain(c);
        }
        Ok(fs)
    }

    pub(crate) fn kind(&self) -> FatKind {
        self.kind
    }

    fn valid(&self, cluster: u32) -> bool {
        (2..u64::from(self.clusters) + 2).contains(&u64::from(cluster))
    }

    fn cluster_offset(&self, cluster: u32) -> u64 {
        self.data_offset + u64::from(cluster - 2) * self.cluster_size
    }

    fn fat_byte(&self, at: u64) -> Result<u8, FatError> {
        let base = at / FAT_CHUNK * FAT_CHUNK;
        let mut cache = self.cache.borrow_mut();
        let chunk = match &mut *cache {
            Some((b, chunk)) if *b == base => chunk,
            slot => {
                let mut chunk = vec![0; FAT_CHUNK.min(self.fat_len - base) as usize];
                self.src.read_at(self.fat_offset + base, &mut chunk)?;
                &mut slot.insert((base, chunk)).1
            }
        };
        Ok(chunk[(at - base) as usize])
    }

    /// The cluster after `cluster` in its chain; `None` at the end of the chain.
    fn next(&self, cluster: u32) -> Result<Option<u32>, FatError> {
        let c = u64::from(cluster);
        let (at, width) = match self.kind {
            FatKind::Fat12 => (c + c / 2, 2),
            FatKind::Fat16 => (c * 2, 2),
            FatKind::Fat32 => (c * 4, 4),
        };
        if at + width > self.fat_len {
            return Err(FatError::BadChain(cluster));
        }
        let mut b = [0u8; 4];
        for (i, byte) in b.iter_mut().enumerate().take(width as usize) {
            *byte = self.fat_byte(at + i as u64)?;
        }
        let raw = u32::from_le_bytes(b);
        let (value, end) = match self.kind {
            FatKind::Fat12 if cluster & 1 == 1 => (raw >> 4 & 0xFFF, 0xFF8),
            FatKind::Fat12 => (raw & 0xFFF, 0xFF8),
            FatKind::Fat16 => (raw & 0xFFFF, 0xFFF8),
            FatKind::Fat32 => (raw & 0x0FFF_FFFF, 0x0FFF_FFF8),
        };
        match value {
            v if v >= end => Ok(None),
            v if self.valid(v) => Ok(Some(v)),
            // Free, bad or out of the volume: the chain is corrupt.
            _ => Err(FatError::BadChain(cluster)),
        }
    }

    /// Reads `len` bytes of the chain starting at `first`, calling `out` with each run of
    /// contiguous clusters, until `out` returns `false`.
    fn read_chain(
        &self,
        first: u32,
        len: u64,
        mut out: impl FnMut(&[u8]) -> bool,
    ) -> Result<(), FatError> {
        let mut left = len;
        let mut cur = first;
        if left > 0 && !self.valid(cur) {
            return Err(FatError::BadChain(cur));
        }
        while left > 0 {
            let start = cur;
            let mut count = 1u64;
            let mut jump = None;
            while count * self.cluster_size < left {
                match self.next(cur)? {
                    Some(n) if n == cur + 1 => {
                        cur = n;
                        count += 1;
                    }
                    Some(n) => {
                        jump = Some(n);
                        break;
                    }
                    None => return Err(FatError::BadChain(cur)),
                }
            }
            let n = (count * self.cluster_size).min(left);
            // Reads of at most 16 MiB at a time.
            let mut at = self.cluster_offset(start);
            let mut run_left = n;
            while run_left > 0 {
                let mut buf = vec![0; run_left.min(16 << 20) as usize];
                self.src.read_at(at, &mut buf)?;
                if !out(&buf) {
                    return Ok(());
                }
                at += buf.len() as u64;
                run_left -= buf.len() as u64;
            }
            left -= n;
            if left > 0 {
                cur = jump.ok_or(FatError::BadChain(cur))?;
            }
        }
        Ok(())
    }

    /// Calls `f` with each entry of `dir` until it returns `Some`.
    fn scan<T>(
        &self,
        dir: Dir,
        mut f: impl FnMut(Entry) -> Option<T>,
    ) -> Result<Option<T>, FatError> {
        let mut names = LongName::default();
        let mut found = None;
        let mut each = |chunk: &[u8]| {
            for raw in chunk.chunks_exact(32) {
                match parse(raw, &mut names, self.kind) {
                    Parsed::End => return false,
                    Parsed::Skip => {}
                    Parsed::Entry(e) => {
                        if let Some(t) = f(e) {
                            found = Some(t);
                            return false;
                        }
                    }
                }
            }
            true
        };
        match dir {
            Dir::Region { offset, len } => {
                let mut buf = vec![0; len.min(MAX_DIR_BYTES) as usize];
                self.src.read_at(offset, &mut buf)?;
                each(&buf);
            }
            Dir::Chain(first) => {
                // A directory has no size: its chain runs to its end mark, or to FAT's limit.
                let mut cur = first;
                let mut read = 0;
                if !self.valid(cur) {
                    return Err(FatError::BadChain(cur));
                }
                loop {
                    let mut buf = vec![0; self.cluster_size as usize];
                    self.src.read_at(self.cluster_offset(cur), &mut buf)?;
                    read += self.cluster_size;
                    if !each(&buf) || read >= MAX_DIR_BYTES {
                        break;
                    }
                    match self.next(cur)? {
                        Some(n) => cur = n,
                        None => break,
                    }
                }
            }
        }
        Ok(found)
    }

    fn dir_of(&self, node: &Node) -> Result<Dir, FatError> {
        match node {
            Node::Root => Ok(self.root),
            Node::Entry(e) if !e.is_dir => Err(FatError::NotADirectory),
            // A directory entry with no cluster is an empty directory.
            Node::Entry(e) if e.first_cluster == 0 => Ok(Dir::Region { offset: 0, len: 0 }),
            Node::Entry(e) => Ok(Dir::Chain(e.first_cluster)),
        }
    }

    /// What `path` names: `/`-separated, case-insensitive, absolute or not.
    fn lookup(&self, path: &str) -> Result<Node, FatError> {
        let mut node = Node::Root;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let dir = self.dir_of(&node)?;
            let found = self.scan(dir, |e| {
                (same_name(&e.name, part) || same_name(&e.short, part)).then_some(e)
            })?;
            node = Node::Entry(found.ok_or(FatError::NotFound)?);
        }
        Ok(node)
    }

    /// The entries of the directory at `path`.
    pub(crate) fn read_dir(&self, path: &str) -> Result<Vec<Entry>, FatError> {
        let dir = self.dir_of(&self.lookup(path)?)?;
        let mut out = Vec::new();
        self.scan(dir, |e| {
            out.push(e);
            None::<()>
        })?;
        Ok(out)
    }

    /// The file at `path` (not a directory).
    pub(crate) fn metadata(&self, path: &str) -> Result<Entry, FatError> {
        match self.lookup(path)? {
            Node::Root => Err(FatError::IsADirectory),
            Node::Entry(e) if e.is_dir => Err(FatError::IsADirectory),
            Node::Entry(e) => Ok(e),
        }
    }

    /// The contents of the file at `path`.
    pub(crate) fn read(&self, path: &str) -> Result<Vec<u8>, FatError> {
        let e = self.metadata(path)?;
        let size = u64::from(e.size);
        // A file cannot hold more than the volume's clusters: a larger size is corrupt.
        if size.div_ceil(self.cluster_size) > u64::from(self.clusters) {
            return Err(FatError::BadSize(size));
        }
        let mut data = Vec::with_capacity(size as usize);
        self.read_chain(e.first_cluster, size, |b| {
            data.extend_from_slice(b);
            true
        })?;
        Ok(data)
    }
}

/// Compares two names as FAT does: without regard to case.
fn same_name(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
        || a.chars()
            .flat_map(char::to_uppercase)
            .eq(b.chars().flat_map(char::to_uppercase))
}

/// A long name being put together from its entries (they come last part first).
#[derive(Default)]
struct LongName {
    units: Vec<u16>,
    /// The sequence number the next part must have (0: the name is complete).
    expect: u8,
    checksum: u8,
    active: bool,
}

/// Where the 13 UTF-16 units of a long-name entry lie.
const LFN_UNITS: [usize; 13] = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];

impl LongName {
    fn part(&mut self, raw: &[u8]) {
        let order = raw[0];
        let seq = order & 0x1F;
        if order & 0x40 != 0 {
            if seq == 0 || seq > 20 {
                self.active = false;
                return;
            }
            self.units = vec![0xFFFF; usize::from(seq) * 13];
            self.checksum = raw[13];
            self.active = true;
        } else if !self.active || seq == 0 || seq != self.expect || raw[13] != self.checksum {
            self.active = false;
            return;
        }
        let at = (usize::from(seq) - 1) * 13;
        for (i, &o) in LFN_UNITS.iter().enumerate() {
            self.units[at + i] = u16_at(raw, o);
        }
        self.expect = seq - 1;
    }

    /// The long name of the short entry `short`, if the parts before it make one.
    fn take(&mut self, short: &[u8]) -> Option<String> {
        let active = std::mem::take(&mut self.active);
        let sum = short[..11]
            .iter()
            .fold(0u8, |s, &b| s.rotate_right(1).wrapping_add(b));
        if !active || self.expect != 0 || sum != self.checksum {
            return None;
        }
        let end = self
            .units
            .iter()
            .position(|&u| u == 0)
            .unwrap_or(self.units.len());
        let name: String = char::decode_utf16(self.units[..end].iter().copied())
            .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
            .collect();
        (!name.is_empty()).then_some(name)
    }
}

enum Parsed {
    End,
    Skip,
    Entry(Entry),
}

/// One 32-byte directory entry.
fn parse(raw: &[u8], names: &mut LongName, kind: FatKind) -> Parsed {
    let attr = raw[11];
    match raw[0] {
        0x00 => return Parsed::End,
        0xE5 => {
            names.active = false;
            return Parsed::Skip;
        }
        _ => {}
    }
    if attr & 0x3F == 0x0F {
        names.part(raw);
        return Parsed::Skip;
    }
    // Volume labels, and `.` and `..`.
    if attr & 0x08 != 0 || raw[0] == b'.' {
        names.active = false;
        return Parsed::Skip;
    }
    let long = names.take(raw);
    let text = |bytes: &[u8], lower: bool| -> String {
        let end = bytes.iter().rposition(|&b| b != b' ').map_or(0, |p| p + 1);
        bytes[..end]
            .iter()
            .enumerate()
            .map(|(i, &b)| match b {
                // 0x05 stands for a name starting with 0xE5.
                0x05 if i == 0 => char::REPLACEMENT_CHARACTER,
                b if b.is_ascii() && lower => char::from(b.to_ascii_lowercase()),
                b if b.is_ascii() => char::from(b),
                _ => char::REPLACEMENT_CHARACTER,
            })
            .collect()
    };
    // Windows NT's flags for an all-lowercase base or extension.
    let mut short = text(&raw[..8], raw[12] & 0x08 != 0);
    let ext = text(&raw[8..11], raw[12] & 0x10 != 0);
    if !ext.is_empty() {
        short.push('.');
        short.push_str(&ext);
    }
    let hi = if kind == FatKind::Fat32 {
        u32::from(u16_at(raw, 20)) << 16
    } else {
        0
    };
    Parsed::Entry(Entry {
        name: long.unwrap_or_else(|| short.clone()),
        short,
        is_dir: attr & 0x10 != 0,
        first_cluster: hi | u32::from(u16_at(raw, 26)),
        size: u32_at(raw, 28),
    })
}

#[cfg(test)]
mod tests;
