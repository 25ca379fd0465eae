//! Test helpers: guest memory, crafted kernel images, temporary files, table readers.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use vessel_memory::vm_memory::{Bytes, GuestAddress};
use vessel_memory::{create_guest_memory, GuestLayout, GuestMemoryMmap};

pub const MIB: u64 = 1 << 20;

/// A guest of `size` bytes: its memory and layout.
/// Load `image` as a kernel into a fresh guest of `mem_size` bytes.
pub fn load(image: Vec<u8>, mem_size: u64) -> Result<crate::LoadedKernel, crate::BootError> {
    let (mem, layout) = guest(mem_size);
    crate::loader::load_kernel_image(&mem, &layout, &mut std::io::Cursor::new(image))
}

pub fn guest(size: u64) -> (GuestMemoryMmap, GuestLayout) {
    let layout = GuestLayout::new(size).unwrap();
    (create_guest_memory(&layout).unwrap(), layout)
}

/// `len` bytes of guest memory at `addr`.
pub fn read_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

pub fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

pub fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

pub fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// The byte sum of `b`, which is 0 for a correctly checksummed table.
pub fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

/// A minimal bzImage: setup sectors holding a setup header, then "protected-mode code".
pub struct BzImageBuilder {
    setup_sects: u8,
    version: u16,
    loadflags: u8,
    xloadflags: u16,
    payload_len: usize,
    syssize: Option<u32>,
    cmdline_size: u32,
    initrd_addr_max: u32,
    pref_address: u64,
    init_size: u32,
    payload: (u32, u32),
}

impl Default for BzImageBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BzImageBuilder {
    pub fn new() -> Self {
        BzImageBuilder {
            setup_sects: 4,
            version: 0x020f,
            loadflags: 0x01,
            xloadflags: 0x01,
            payload_len: 8192,
            syssize: None,
            cmdline_size: 2047,
            initrd_addr_max: 0x7fff_ffff,
            pref_address: 0,
            init_size: 0,
            payload: (0, 0),
        }
    }
    pub fn setup_sects(mut self, n: u8) -> Self {
        self.setup_sects = n;
        self
    }
    pub fn version(mut self, v: u16) -> Self {
        self.version = v;
        self
    }
    pub fn loadflags(mut self, f: u8) -> Self {
        self.loadflags = f;
        self
    }
    pub fn xloadflags(mut self, f: u16) -> Self {
        self.xloadflags = f;
        self
    }
    pub fn payload_len(mut self, n: usize) -> Self {
        self.payload_len = n;
        self
    }
    pub fn syssize(mut self, paragraphs: u32) -> Self {
        self.syssize = Some(paragraphs);
        self
    }
    pub fn cmdline_size(mut self, n: u32) -> Self {
        self.cmdline_size = n;
        self
    }
    pub fn initrd_addr_max(mut self, a: u32) -> Self {
        self.initrd_addr_max = a;
        self
    }
    pub fn pref_address(mut self, a: u64) -> Self {
        self.pref_address = a;
        self
    }
    pub fn init_size(mut self, n: u32) -> Self {
        self.init_size = n;
        self
    }
    pub fn payload(mut self, offset: u32, len: u32) -> Self {
        self.payload = (offset, len);
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let sects = if self.setup_sects == 0 {
            4
        } else {
            self.setup_sects as usize
        };
        let setup_len = (sects + 1) * 512;
        let mut v = vec![0u8; setup_len];
        let syssize = self.syssize.unwrap_or(self.payload_len.div_ceil(16) as u32);
        v[0x1f1] = self.setup_sects;
        v[0x1f4..0x1f8].copy_from_slice(&syssize.to_le_bytes());
        v[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        v[0x202..0x206].copy_from_slice(b"HdrS");
        v[0x206..0x208].copy_from_slice(&self.version.to_le_bytes());
        v[0x211] = self.loadflags;
        v[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        v[0x22c..0x230].copy_from_slice(&self.initrd_addr_max.to_le_bytes());
        v[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
        v[0x234] = 1; // relocatable
        v[0x236..0x238].copy_from_slice(&self.xloadflags.to_le_bytes());
        v[0x238..0x23c].copy_from_slice(&self.cmdline_size.to_le_bytes());
        v[0x248..0x24c].copy_from_slice(&self.payload.0.to_le_bytes());
        v[0x24c..0x250].copy_from_slice(&self.payload.1.to_le_bytes());
        v[0x258..0x260].copy_from_slice(&self.pref_address.to_le_bytes());
        v[0x260..0x264].copy_from_slice(&self.init_size.to_le_bytes());
        v.extend((0..self.payload_len).map(|i| (i % 253) as u8 ^ 0x5a));
        v
    }
}

/// A minimal x86_64 ELF vmlinux: one PT_LOAD (0x2000 file bytes at file offset 0x1000,
/// 0x3000 memory bytes at 16 MiB) and a PT_NOTE, with a PVH entry note when asked for.
/// `e_entry` is the segment's start unless set.
pub struct ElfBuilder {
    machine: u16,
    paddr: u64,
    memsz: u64,
    entry: Option<u64>,
    pvh_entry: Option<u32>,
}

impl Default for ElfBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ElfBuilder {
    pub fn new() -> Self {
        ElfBuilder {
            machine: 62,
            paddr: 0x100_0000,
            memsz: 0x3000,
            entry: None,
            pvh_entry: None,
        }
    }
    pub fn machine(mut self, m: u16) -> Self {
        self.machine = m;
        self
    }
    pub fn paddr(mut self, a: u64) -> Self {
        self.paddr = a;
        self
    }
    pub fn memsz(mut self, n: u64) -> Self {
        self.memsz = n;
        self
    }
    pub fn entry(mut self, a: u64) -> Self {
        self.entry = Some(a);
        self
    }
    pub fn pvh_entry(mut self, a: u32) -> Self {
        self.pvh_entry = Some(a);
        self
    }

    /// One ELF note: name (NUL-terminated, padded to 4), type, descriptor (padded to 4).
    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.push(0);
        while n.len() % 4 != 0 {
            n.push(0);
        }
        n.extend_from_slice(desc);
        while n.len() % 4 != 0 {
            n.push(0);
        }
        n
    }

    pub fn build(&self) -> Vec<u8> {
        // Notes: an unrelated GNU build-id first, then (maybe) Xen's PHYS32_ENTRY.
        let mut notes = Self::note(b"GNU", 3, &[0x11; 20]);
        if let Some(e) = self.pvh_entry {
            notes.extend(Self::note(b"Xen", 18, &e.to_le_bytes()));
        }
        let notes_off = 0x800u64;
        let text_off = 0x1000u64;
        let text_len = 0x2000u64;

        let mut v = vec![0u8; (text_off + text_len) as usize];
        v[0..4].copy_from_slice(b"\x7fELF");
        v[4] = 2; // 64-bit
        v[5] = 1; // little-endian
        v[6] = 1; // version
        v[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        v[18..20].copy_from_slice(&self.machine.to_le_bytes());
        v[20..24].copy_from_slice(&1u32.to_le_bytes());
        v[24..32].copy_from_slice(&self.entry.unwrap_or(self.paddr).to_le_bytes()); // e_entry
        v[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        v[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        v[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        v[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum

        let phdr = |p_type: u32, off: u64, paddr: u64, filesz: u64, memsz: u64| {
            let mut p = Vec::with_capacity(56);
            p.extend_from_slice(&p_type.to_le_bytes());
            p.extend_from_slice(&5u32.to_le_bytes()); // R+X
            p.extend_from_slice(&off.to_le_bytes());
            p.extend_from_slice(&(paddr | 0xffff_ffff_8000_0000).to_le_bytes()); // vaddr
            p.extend_from_slice(&paddr.to_le_bytes());
            p.extend_from_slice(&filesz.to_le_bytes());
            p.extend_from_slice(&memsz.to_le_bytes());
            p.extend_from_slice(&0x1000u64.to_le_bytes());
            p
        };
        let load = phdr(1, text_off, self.paddr, text_len, self.memsz.max(text_len));
        let note = phdr(4, notes_off, 0, notes.len() as u64, notes.len() as u64);
        v[64..120].copy_from_slice(&load);
        v[120..176].copy_from_slice(&note);
        v[notes_off as usize..notes_off as usize + notes.len()].copy_from_slice(&notes);
        for (i, b) in v[text_off as usize..].iter_mut().enumerate() {
            *b = (i % 241) as u8 ^ 0xc3;
        }
        v
    }
}

/// A file in the temporary directory, removed when dropped.
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    pub fn with_contents(tag: &str, data: &[u8]) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "vessel-boot-test-{}-{}-{tag}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, data).unwrap();
        TempFile { path }
    }

    pub fn open(&self) -> std::fs::File {
        std::fs::File::open(&self.path).unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `data` gzip-compressed.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `data` xz-compressed as the kernel's `xz_wrap.sh` does: x86 BCJ filter, then LZMA2, with
/// a CRC32 check.
pub fn xz(data: &[u8]) -> Vec<u8> {
    use liblzma::stream::{Check, Filters, LzmaOptions, Stream};
    use std::io::Write;
    let opts = LzmaOptions::new_preset(6).unwrap();
    let mut filters = Filters::new();
    filters.x86().lzma2(&opts);
    let stream = Stream::new_stream_encoder(&filters, Check::Crc32).unwrap();
    let mut e = liblzma::write::XzEncoder::new_stream(Vec::new(), stream);
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `data` in the legacy `.lzma` format.
pub fn lzma_alone(data: &[u8]) -> Vec<u8> {
    use liblzma::stream::{LzmaOptions, Stream};
    use std::io::Write;
    let stream = Stream::new_lzma_encoder(&LzmaOptions::new_preset(6).unwrap()).unwrap();
    let mut e = liblzma::write::XzEncoder::new_stream(Vec::new(), stream);
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `data` in lz4's legacy frame format (`lz4 -l`), in blocks of at most 8 MiB of input.
pub fn lz4_legacy_frame(data: &[u8]) -> Vec<u8> {
    let mut v = 0x184c_2102u32.to_le_bytes().to_vec();
    for chunk in data.chunks(8 << 20) {
        let block = lz4_flex::block::compress(chunk);
        v.extend_from_slice(&(block.len() as u32).to_le_bytes());
        v.extend_from_slice(&block);
    }
    v
}

/// `data` as a zstd frame built by hand (ruzstd only decodes): a 128 KiB window, then one
/// block per 128 KiB of input, RLE where the chunk is one repeated byte, raw otherwise.
pub fn zstd_raw_frame(data: &[u8]) -> Vec<u8> {
    const BLOCK: usize = 128 * 1024;
    // Magic; frame header descriptor 0 (no content size, no checksum, no dictionary, not a
    // single segment); window descriptor: exponent 7 => 2^17 bytes.
    let mut v = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 7 << 3];
    let chunks: Vec<&[u8]> = data.chunks(BLOCK).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let last = u32::from(i + 1 == chunks.len());
        let rle = chunk.iter().all(|&b| b == chunk[0]);
        let header = last | (u32::from(rle) << 1) | ((chunk.len() as u32) << 3);
        v.extend_from_slice(&header.to_le_bytes()[..3]);
        if rle {
            v.push(chunk[0]);
        } else {
            v.extend_from_slice(chunk);
        }
    }
    v
}

/// A bzImage whose payload is `payload`: it sits 0x100 bytes into the protected-mode code,
/// which is padded to 16-byte paragraphs.
pub fn bzimage_with_payload(builder: BzImageBuilder, payload: &[u8]) -> Vec<u8> {
    const OFFSET: usize = 0x100;
    let code_len = (OFFSET + payload.len()).next_multiple_of(16);
    let mut image = builder
        .payload_len(code_len)
        .payload(OFFSET as u32, payload.len() as u32)
        .build();
    let setup_len = image.len() - code_len;
    image[setup_len + OFFSET..setup_len + OFFSET + payload.len()].copy_from_slice(payload);
    image
}

/// Debian's stock kernel, if this machine has it: `VESSEL_TEST_BZIMAGE`, else the guest
/// kit's cache.
pub fn debian_bzimage() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VESSEL_TEST_BZIMAGE") {
        return Some(p.into());
    }
    let home = std::env::var_os("HOME")?;
    let dir = std::path::Path::new(&home).join(".cache/vessel/images/debian");
    ["kernel", "vmlinuz"]
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
}
