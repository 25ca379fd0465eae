//! The targets: one `fn(&[u8])` per untrusted input.

use std::io::Cursor;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, OnceLock};

use arbitrary::{Arbitrary, Unstructured};
use vessel_api::backend::VmmBackend;
use vessel_api::controller::ApiController;
use vessel_api::http::{parse_request, Limits, Parsed};
use vessel_api::metrics::Metrics;
use vessel_api::resources::VmResources;
use vessel_api::ApiError;
use vessel_kvm::emulate::{complete, AccessError, GuestAccess};
use vessel_kvm::CpuState;
use vessel_memory::{create_guest_memory, GuestLayout, GuestMemoryMmap};

use crate::devices;

/// Guest RAM for the kernel loaders: 64 MiB, mapped once (pages a load touched stay).
fn boot_guest() -> &'static (GuestMemoryMmap, GuestLayout) {
    static GUEST: OnceLock<(GuestMemoryMmap, GuestLayout)> = OnceLock::new();
    GUEST.get_or_init(|| {
        let layout = GuestLayout::new(64 << 20).expect("a 64 MiB layout");
        let mem = create_guest_memory(&layout).expect("64 MiB of guest memory");
        (mem, layout)
    })
}

/// A memfd holding the kernel image (the loaders take a `File`).
fn kernel_file() -> &'static Mutex<std::fs::File> {
    static FILE: OnceLock<Mutex<std::fs::File>> = OnceLock::new();
    FILE.get_or_init(|| {
        // SAFETY: a NUL-terminated name and no flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vessel-fuzz-kernel".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create failed");
        // SAFETY: `fd` is a fresh descriptor owned by nothing else.
        Mutex::new(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    })
}

/// A bzImage or ELF kernel: `load_kernel` (and its PVH-preferring variant) over guest memory.
pub fn boot_loader(data: &[u8]) {
    let (mem, layout) = boot_guest();
    let Ok(mut file) = kernel_file().lock() else {
        return;
    };
    if file.set_len(0).is_err() || file.write_all_at(data, 0).is_err() {
        return;
    }
    let _ = vessel_boot::load_kernel(mem, layout, &mut file);
    let opts = vessel_boot::LoadOptions {
        prefer_pvh: true,
        decompress_on_host: false,
    };
    let _ = vessel_boot::load_kernel_with(mem, layout, &mut file, &opts);
}

/// A backend that accepts everything and touches nothing.
struct FakeBackend;

impl VmmBackend for FakeBackend {
    fn start(&mut self, _: &VmResources) -> Result<(), ApiError> {
        Ok(())
    }
    fn pause(&mut self) -> Result<(), ApiError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), ApiError> {
        Ok(())
    }
    fn stop(&mut self) -> Result<(), ApiError> {
        Ok(())
    }
}

/// Bytes from a client socket: every request `parse_request` finds in them (pipelined),
/// dispatched through the route table to a controller over a fake backend.
pub fn api_request(data: &[u8]) {
    let limits = Limits::default();
    let controller = Mutex::new(ApiController::new(Box::new(FakeBackend), "fuzz", "1.7.0"));
    let metrics = Metrics::new();
    let mut buf = data;
    for _ in 0..64 {
        match parse_request(buf, &limits) {
            Ok(Parsed::Request(req, used)) => {
                // `PUT /metrics` opens (creates) the file it names: keep the fuzzer off the
                // host's file system.
                if !req.path().starts_with("/metrics") {
                    let _ = vessel_api::routes::dispatch(&controller, &metrics, &req);
                }
                if used == 0 || used > buf.len() {
                    return;
                }
                buf = &buf[used..];
            }
            _ => return,
        }
    }
}

/// A `--config-file` (and `--metadata`, split at the first NUL).
pub fn config_file(data: &[u8]) {
    let (cfg, meta) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let Ok(cfg) = std::str::from_utf8(cfg) else {
        return;
    };
    let meta = meta.and_then(|m| std::str::from_utf8(m).ok());
    let _ = VmResources::from_config_json(cfg, meta);
}

/// A snapshot state file: as given (header checks), and as a payload wrapped in a valid
/// header so that the fuzzer reaches the parser past the checksum.
pub fn snapshot_state(data: &[u8]) {
    use vessel_snapshot::format::{decode, FORMAT_VERSION, MAGIC};
    use vessel_vmm::snapshot::{NoApi, VmSnapshot};
    let _ = decode::<VmSnapshot<NoApi>>(data);
    let mut file = Vec::with_capacity(32 + data.len());
    file.extend_from_slice(MAGIC);
    file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    file.extend_from_slice(&0u32.to_le_bytes());
    file.extend_from_slice(&(data.len() as u64).to_le_bytes());
    file.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    file.extend_from_slice(&0u32.to_le_bytes());
    file.extend_from_slice(data);
    let _ = decode::<VmSnapshot<NoApi>>(&file);
}

/// A migration stream: frames until the first error, `Pages` payloads split.
pub fn snapshot_frame(data: &[u8]) {
    use vessel_snapshot::stream::{parse_pages, read_frame, FrameType};
    let mut r = Cursor::new(data);
    let mut buf = Vec::new();
    while let Ok(kind) = read_frame(&mut r, &mut buf) {
        if kind == FrameType::Pages {
            let _ = parse_pages(&buf);
        }
    }
}

/// Flat mock guest memory for the completer: `bytes` at linear address `base`.
struct FlatMem {
    base: u64,
    bytes: Vec<u8>,
    read_only_page: Option<u64>,
}

impl FlatMem {
    fn range(
        &self,
        gva: u64,
        len: usize,
        write: bool,
    ) -> Result<std::ops::Range<usize>, AccessError> {
        if write {
            if let Some(p) = self.read_only_page {
                if gva < p.saturating_add(4096) && gva.saturating_add(len as u64) > p {
                    return Err(AccessError::ReadOnly(gva));
                }
            }
        }
        let start = gva
            .checked_sub(self.base)
            .ok_or(AccessError::Unbacked(gva))?;
        let end = start
            .checked_add(len as u64)
            .ok_or(AccessError::Unbacked(gva))?;
        if end > self.bytes.len() as u64 {
            return Err(AccessError::Unmapped(gva));
        }
        Ok(start as usize..end as usize)
    }
}

impl GuestAccess for FlatMem {
    fn read(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let r = self.range(gva, buf.len(), false)?;
        buf.copy_from_slice(&self.bytes[r]);
        Ok(())
    }
    fn write(&mut self, gva: u64, buf: &[u8]) -> Result<(), AccessError> {
        let r = self.range(gva, buf.len(), true)?;
        self.bytes[r].copy_from_slice(buf);
        Ok(())
    }
}

#[derive(Arbitrary, Debug)]
struct EmulateInput {
    mode: u8,
    /// General-purpose registers; small values are made to point into the mock memory.
    gprs: [u64; 16],
    rflags: u64,
    cs_base: u32,
    ds_base: u32,
    cpl3: bool,
    read_only_page: Option<u8>,
    insn: Vec<u8>,
    memory: Vec<u8>,
}

/// An instruction KVM could not emulate, in a register state built from the input, over mock
/// guest memory.
pub fn emulate(data: &[u8]) {
    let Ok(inp) = EmulateInput::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let mut cpu = CpuState::default();
    let s = &mut cpu.sregs;
    match inp.mode % 3 {
        0 => {
            s.cs.base = u64::from(inp.cs_base & 0xf_fff0);
        }
        1 => {
            s.cr0 = 0x11;
            s.cs.db = 1;
            s.cs.limit = 0xffff_ffff;
            s.cs.base = u64::from(inp.cs_base);
        }
        _ => {
            s.cr0 = 0x8005_0033;
            s.cr4 = 0x0020_06b0;
            s.efer = 0xd01;
            s.cs.l = 1;
        }
    }
    for seg in [
        &mut s.cs, &mut s.ss, &mut s.ds, &mut s.es, &mut s.fs, &mut s.gs,
    ] {
        seg.present = 1;
        seg.s = 1;
        seg.type_ = 3;
        if inp.cpl3 {
            seg.dpl = 3;
            seg.selector |= 3;
        }
    }
    s.cs.type_ = 0xb;
    s.ds.base = u64::from(inp.ds_base);
    // Memory: 64 KiB around RIP.
    let base = 0x10_0000u64;
    let r = &mut cpu.regs;
    let g = inp.gprs;
    let fix = |v: u64| if v >> 63 == 0 { base + (v & 0xffff) } else { v };
    (r.rax, r.rbx, r.rcx, r.rdx) = (g[0], fix(g[1]), g[2] & 0xffff, g[3]);
    (r.rsi, r.rdi, r.rsp, r.rbp) = (fix(g[4]), fix(g[5]), fix(g[6]), fix(g[7]));
    (r.r8, r.r9, r.r10, r.r11) = (g[8], g[9], g[10], g[11]);
    (r.r12, r.r13, r.r14, r.r15) = (g[12], g[13], g[14], g[15]);
    r.rflags = (inp.rflags & 0x3f_7fd5) | 2;
    r.rip = base + 0x8000 - cpu.sregs.cs.base.min(base);
    let mut bytes = inp.memory;
    bytes.resize(0x1_0000, 0);
    let mut mem = FlatMem {
        base,
        bytes,
        read_only_page: inp.read_only_page.map(|p| base + u64::from(p % 16) * 4096),
    };
    let insn = &inp.insn[..inp.insn.len().min(15)];
    let _ = complete(insn, &mut cpu, &mut mem);
}

pub fn virtio_block(data: &[u8]) {
    devices::run(devices::Kind::Block, data);
}

pub fn virtio_net(data: &[u8]) {
    devices::run(devices::Kind::Net, data);
}

pub fn virtio_vsock(data: &[u8]) {
    devices::run(devices::Kind::Vsock, data);
}

pub fn virtio_rng(data: &[u8]) {
    devices::run(devices::Kind::Rng, data);
}

pub fn virtio_balloon(data: &[u8]) {
    devices::run(devices::Kind::Balloon, data);
}

pub fn virtio_console(data: &[u8]) {
    devices::run(devices::Kind::Console, data);
}

pub fn virtio_pmem(data: &[u8]) {
    devices::run(devices::Kind::Pmem, data);
}

/// A qcow2 image (header, L1 and refcount tables, feature bits, backing file name): opened
/// read-only as a virtio-blk disk. Backing files it names are opened read-only when they are
/// regular files; a loop or a chain deeper than 16 is refused.
pub fn qcow2_open(data: &[u8]) {
    use vessel_virtio_devices::block::{Block, BlockEngine, BlockParams, DiskFormat};
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    let path = PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("vessel-fuzz-{}.qcow2", std::process::id()))
    });
    let Ok(_one) = LOCK.lock() else {
        return;
    };
    if std::fs::write(path, data).is_err() {
        return;
    }
    let disk = Block::new(BlockParams {
        path: path.clone(),
        format: Some(DiskFormat::Qcow2),
        read_only: true,
        serial: None,
        engine: BlockEngine::Sync,
    });
    if let Ok(d) = disk {
        let _ = d.capacity();
    }
}

/// A bootloader configuration read from a disk image for direct boot: GRUB's `grub.cfg` and a
/// Boot Loader Spec entry (`vessel_diskboot::config`).
pub fn boot_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = vessel_diskboot::config::grub_default(&text);
    let _ = vessel_diskboot::config::bls_entry(&text);
}

/// A disk image booted directly (`vessel_diskboot::find_linux`): its partition table (GPT,
/// MBR or none), its ext2/3/4 and FAT12/16/32 filesystems (boot sector, allocation table,
/// cluster chains, directories and long names), the bootloader configurations on them and the
/// kernel and initrds they name. Written to a file and opened read-only, as raw or, by its
/// header, as qcow2.
pub fn disk_scan(data: &[u8]) {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    let path = PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("vessel-fuzz-{}.disk", std::process::id()))
    });
    let Ok(_one) = LOCK.lock() else {
        return;
    };
    if std::fs::write(path, data).is_err() {
        return;
    }
    let _ = vessel_diskboot::find_linux(path);
}

/// Port accesses and DMA descriptors from a guest's firmware: the fw_cfg device
/// (`vessel_devices::fw_cfg`) over two 64 KiB regions of guest memory with a hole between
/// them, holding a few items and files. The input is a sequence of operations, each an opcode
/// byte (mod 6) and its operands (integers little-endian):
///
/// - 0 select: `u16` key;
/// - 1 data reads: `u8` count of 1-byte reads of the data port;
/// - 2 port write: `u8` offset (mod 12), `u8` width (1, 2, 4 or 8 by its low bits, cut at the
///   end of the range), `u64` value;
/// - 3 port read: `u8` offset, `u8` width;
/// - 4 DMA: `u32` descriptor address, `u32` control, `u32` length, `u64` buffer address, `u8`
///   how to start it (bit 0: one 64-bit write, else two 32-bit writes; bit 1: a high half of
///   1); the descriptor is stored big-endian where it fits in memory;
/// - 5 memory write: `u32` address, `u8` length, then that many bytes.
pub fn fw_cfg(data: &[u8]) {
    use vessel_devices::fw_cfg::{e820_bytes, keys, FwCfg};
    use vessel_memory::vm_memory::GuestAddress;

    const HOLE_START: u64 = 0x1_0000;
    const HIGH_START: u64 = 0x2_0000;
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), HOLE_START as usize),
        (GuestAddress(HIGH_START), 0x1_0000),
    ]) else {
        return;
    };
    let mut fw = FwCfg::new(mem.clone());
    let _ = fw.add_u16(keys::NB_CPUS, 2);
    let e820 = e820_bytes(&[(0, HOLE_START, 1), (HIGH_START, 0x1_0000, 1)]);
    let _ = fw.add_file("etc/e820", e820);
    let _ = fw.add_file("bootorder", b"/pci@i0cf8/*@1\n".to_vec());
    let _ = fw.add_file("etc/acpi/tables", (0..=255u8).cycle().take(5000).collect());

    let mut input = Reader(data);
    // Bounded: every operation consumes at least one byte.
    while fw_cfg_step(&mut fw, &mem, &mut input).is_some() {}
}

/// Input bytes, consumed from the front.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    /// `n` bytes as a little-endian integer.
    fn le(&mut self, n: usize) -> Option<u64> {
        Some(
            self.take(n)?
                .iter()
                .rev()
                .fold(0, |v, &x| v << 8 | u64::from(x)),
        )
    }
    /// A port offset and an access width that fits the device's range from it.
    fn access(&mut self) -> Option<(u64, usize)> {
        use vessel_devices::fw_cfg::FW_CFG_PORT_LEN;
        let offset = u64::from(self.byte()?) % FW_CFG_PORT_LEN;
        let width = [1usize, 2, 4, 8][usize::from(self.byte()? & 3)];
        Some((offset, width.min((FW_CFG_PORT_LEN - offset) as usize)))
    }
}

/// One operation of the `fw_cfg` target; `None` at the end of the input.
fn fw_cfg_step(
    fw: &mut vessel_devices::FwCfg,
    mem: &GuestMemoryMmap,
    r: &mut Reader,
) -> Option<()> {
    use vessel_devices::BusDevice;
    use vessel_memory::vm_memory::{Bytes, GuestAddress};
    match r.byte()? % 6 {
        0 => fw.write(0, r.take(2)?),
        1 => {
            for _ in 0..r.byte()? {
                fw.read(1, &mut [0]);
            }
        }
        2 => {
            let (offset, width) = r.access()?;
            fw.write(offset, &r.take(8)?[..width]);
        }
        3 => {
            let (offset, width) = r.access()?;
            fw.read(offset, &mut [0u8; 8][..width]);
        }
        4 => {
            let desc = r.le(4)?;
            let control = r.le(4)? as u32;
            let length = r.le(4)? as u32;
            let address = r.le(8)?;
            let how = r.byte()?;
            let mut d = [0u8; 16];
            d[..4].copy_from_slice(&control.to_be_bytes());
            d[4..8].copy_from_slice(&length.to_be_bytes());
            d[8..].copy_from_slice(&address.to_be_bytes());
            let _ = mem.write_slice(&d, GuestAddress(desc));
            let high = u32::from(how & 2 != 0);
            if how & 1 != 0 {
                fw.write(4, &(u64::from(high) << 32 | desc).to_be_bytes());
            } else {
                fw.write(4, &high.to_be_bytes());
                fw.write(8, &(desc as u32).to_be_bytes());
            }
        }
        _ => {
            let at = r.le(4)?;
            let n = usize::from(r.byte()?);
            let _ = mem.write_slice(r.take(n)?, GuestAddress(at));
        }
    }
    Some(())
}
