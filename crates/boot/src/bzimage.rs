//! bzImage kernels: checking the setup header, then loading the protected-mode code at 1 MiB
//! with linux-loader's `BzImage`.
//!
//! Vessel skips the real-mode setup code and enters the kernel at its 64-bit entry point
//! (`startup_64`, 0x200 bytes into the protected-mode code), so it needs boot protocol 2.12+
//! with `XLF_KERNEL_64` set.
//!
//! Unless told not to, it first tries to decompress the payload on the host and load the
//! `vmlinux` inside through the ELF path (PVH entry where the kernel has one), keeping the
//! bzImage's setup header for the zero page; where that cannot be done it says why and loads
//! the bzImage as above.

use std::io::{Cursor, Read, Seek, SeekFrom};
use std::time::Instant;

use linux_loader::loader::bootparam::{setup_header, LOADED_HIGH, XLF_KERNEL_64};
use linux_loader::loader::{BzImage, KernelLoader};
use vessel_memory::vm_memory::{ByteValued, GuestAddress, ReadVolatile};
use vessel_memory::{addr, GuestLayout, GuestMemoryMmap};

use thiserror::Error;

use crate::decompress::{self, Compression, DecompressError};
use crate::elf;
use crate::error::{BootError, Size};
use crate::loader::{EntryMode, KernelSource, LoadOptions, LoadedKernel};

/// Where the setup header starts in the file (and in the zero page).
const HEADER_OFFSET: usize = 0x1f1;
/// Where the `HdrS` magic sits.
const MAGIC_OFFSET: usize = 0x202;
const MAGIC: &[u8; 4] = b"HdrS";
/// The oldest protocol with `xloadflags`, which says whether the 64-bit entry exists.
const MIN_VERSION: u16 = 0x020c;
/// Offset of the 64-bit entry point from the start of the protected-mode code.
const ENTRY_64_OFFSET: u64 = 0x200;

/// Whether `head` (the file's first bytes) carries the setup header magic.
pub(crate) fn has_magic(head: &[u8]) -> bool {
    head.get(MAGIC_OFFSET..MAGIC_OFFSET + MAGIC.len()) == Some(MAGIC.as_slice())
}

/// Why a bzImage's payload was not decompressed and loaded on the host.
#[derive(Debug, Error)]
enum HostLoadError {
    #[error(transparent)]
    Decompress(#[from] DecompressError),
    #[error("its payload (at {offset:#x}, {len} bytes) is not inside the file")]
    PayloadOutsideFile { offset: u64, len: u64 },
    #[error("cannot read its payload")]
    Io(#[source] std::io::Error),
    #[error("its {format} payload is not an ELF vmlinux (it starts with {head})")]
    NotElf { format: Compression, head: String },
    #[error("the vmlinux in its {format} payload cannot be loaded")]
    Elf {
        format: Compression,
        #[source]
        source: BootError,
    },
}

/// Check the header of a bzImage of `len` bytes whose first bytes are `head`, and load it:
/// its decompressed payload as an ELF if `options` ask for that and it can be done, else the
/// bzImage itself.
pub(crate) fn load<F>(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    image: &mut F,
    len: u64,
    head: &[u8],
    options: &LoadOptions,
) -> Result<LoadedKernel, BootError>
where
    F: Read + Seek + ReadVolatile,
{
    let hdr = parse_header(head, len)?;
    let load_addr = addr::HIMEM_START;
    let needed_end = check_header(&hdr, len, load_addr)?;

    let reason = if options.decompress_on_host {
        match load_decompressed(mem, layout, image, len, &hdr, options.prefer_pvh) {
            Ok(kernel) => return Ok(kernel),
            Err(e) => {
                // The reason with every cause, on one line.
                let mut reason = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    reason = format!("{reason}: {c}");
                    cause = c.source();
                }
                log::info!("bzImage left for the guest to decompress: {reason}");
                reason
            }
        }
    } else {
        "host decompression is off".to_string()
    };

    if needed_end > layout.low_ram_end() {
        return Err(BootError::KernelTooLarge {
            needed_end,
            ram_end: layout.low_ram_end(),
        });
    }

    let result = BzImage::load(mem, Some(GuestAddress(load_addr)), image, None).map_err(|e| {
        BootError::KernelLoad {
            format: "bzImage",
            source: e,
        }
    })?;
    let hdr = result.setup_header.unwrap_or(hdr);
    log::debug!(
        "bzImage: protocol {:#x}, {} bytes of protected-mode code at {load_addr:#x}, needs memory up to {needed_end:#x}",
        { hdr.version },
        result.kernel_end - load_addr,
    );
    Ok(LoadedKernel {
        entry: load_addr + ENTRY_64_OFFSET,
        mode: EntryMode::Long64,
        kernel_end: needed_end.max(result.kernel_end),
        setup_header: Some(hdr),
        source: KernelSource::BzImage { reason },
    })
}

/// Decompress the payload of the bzImage whose (checked) header is `hdr` and load the ELF
/// `vmlinux` it holds.
fn load_decompressed<F>(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    image: &mut F,
    len: u64,
    hdr: &setup_header,
    prefer_pvh: bool,
) -> Result<LoadedKernel, HostLoadError>
where
    F: Read + Seek,
{
    // The payload's offset counts from the start of the protected-mode code.
    let offset = setup_size(hdr) + u64::from(hdr.payload_offset);
    let payload_len = u64::from(hdr.payload_length);
    if payload_len == 0 {
        return Err(DecompressError::NoPayload.into());
    }
    if offset.checked_add(payload_len).is_none_or(|end| end > len) {
        return Err(HostLoadError::PayloadOutsideFile {
            offset,
            len: payload_len,
        });
    }
    let mut payload = vec![0u8; payload_len as usize];
    image
        .seek(SeekFrom::Start(offset))
        .and_then(|_| image.read_exact(&mut payload))
        .map_err(HostLoadError::Io)?;

    let started = Instant::now();
    let (format, vmlinux) =
        decompress::decompress(&payload, decompress::output_limit(layout.mem_size()))?;
    let elapsed = started.elapsed();
    drop(payload);

    let head = &vmlinux[..vmlinux.len().min(4096)];
    if !elf::has_magic(head) {
        return Err(HostLoadError::NotElf {
            format,
            head: head[..head.len().min(8)]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        });
    }
    let size = vmlinux.len() as u64;
    let mut kernel = elf::load(
        mem,
        layout,
        &mut Cursor::new(vmlinux.as_slice()),
        size,
        head,
        prefer_pvh,
    )
    .map_err(|source| HostLoadError::Elf { format, source })?;
    // The zero page (64-bit entry) and the command line and initrd limits come from the
    // kernel's own setup header, as for the bzImage itself.
    kernel.setup_header = Some(*hdr);
    kernel.source = KernelSource::ElfFromBzImage {
        format,
        decompressed_size: size,
        elapsed,
    };
    log::info!(
        "bzImage: {format} payload of {} decompressed on the host to a {} vmlinux in {} ms; {:?} entry at {:#x}",
        Size(payload_len),
        Size(size),
        elapsed.as_millis(),
        kernel.mode,
        kernel.entry,
    );
    Ok(kernel)
}

/// The bytes before the protected-mode code: the boot sector and the setup sectors.
fn setup_size(hdr: &setup_header) -> u64 {
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    (setup_sects + 1) * 512
}

/// The setup header, copied out of the file's first bytes.
fn parse_header(head: &[u8], len: u64) -> Result<setup_header, BootError> {
    let mut hdr = setup_header::default();
    let size = hdr.as_slice().len();
    let bytes =
        head.get(HEADER_OFFSET..HEADER_OFFSET + size)
            .ok_or(BootError::TruncatedBzImage {
                expected: (HEADER_OFFSET + size) as u64,
                actual: len,
            })?;
    hdr.as_mut_slice().copy_from_slice(bytes);
    Ok(hdr)
}

/// Check that the header describes a 64-bit-capable kernel whose code is all in the file
/// (`len` bytes), and return the first byte past the memory the kernel needs when its
/// protected-mode code is loaded at `load_addr`.
fn check_header(hdr: &setup_header, len: u64, load_addr: u64) -> Result<u64, BootError> {
    // Copies: the header is packed.
    let version = hdr.version;
    let xloadflags = hdr.xloadflags;
    let syssize = u64::from(hdr.syssize);
    let payload_end = u64::from(hdr.payload_offset) + u64::from(hdr.payload_length);
    let init_size = u64::from(hdr.init_size);
    let pref_address = hdr.pref_address;
    let alignment = u64::from(hdr.kernel_alignment);

    if version < MIN_VERSION {
        return Err(BootError::BzImageTooOld(version));
    }
    if hdr.loadflags & LOADED_HIGH == 0 {
        return Err(BootError::BzImageNotLoadedHigh);
    }
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::BzImageNot64Bit);
    }

    let setup_size = setup_size(hdr);
    // syssize counts 16-byte paragraphs of protected-mode code, rounded up; the compressed
    // payload lies inside that code. The code must not be empty.
    let code_len = (syssize * 16).saturating_sub(15).max(payload_end).max(1);
    let expected = setup_size + code_len;
    if len < expected {
        return Err(BootError::TruncatedBzImage {
            expected,
            actual: len,
        });
    }
    let image_end = load_addr + (len - setup_size);

    // A relocatable kernel decompresses itself at the load address rounded up to its
    // alignment, or at its preferred address (LOAD_PHYSICAL_ADDR) if that is higher; a fixed
    // one at its preferred address. It needs init_size bytes from there.
    let runtime_start = if hdr.relocatable_kernel != 0 && alignment.is_power_of_two() {
        load_addr
            .checked_next_multiple_of(alignment)
            .unwrap_or(u64::MAX)
            .max(pref_address)
    } else if pref_address != 0 {
        pref_address
    } else {
        load_addr
    };
    let runtime_end = runtime_start.saturating_add(init_size);
    Ok(image_end.max(runtime_end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::{load_kernel_image, load_kernel_image_with};
    use crate::testutil::{self, bzimage_with_payload, BzImageBuilder, ElfBuilder, MIB};
    use std::io::Cursor;
    use vessel_memory::vm_memory::Bytes;

    use crate::testutil::load;

    #[test]
    fn crafted_bzimage_loads_at_one_mib() {
        let (mem, layout) = testutil::guest(64 * MIB);
        let image = BzImageBuilder::new()
            .setup_sects(4)
            .payload_len(70_000)
            .build();
        let k = load_kernel_image(&mem, &layout, &mut Cursor::new(image.clone())).unwrap();
        assert_eq!(k.mode, EntryMode::Long64);
        assert_eq!(k.entry, 0x10_0200);
        // Relocatable with 2 MiB alignment: it decompresses at 2 MiB, so it owns up to there
        // even with init_size 0.
        assert_eq!(k.kernel_end, 0x20_0000);
        // The protected-mode code (everything after the 5 setup sectors) is at 1 MiB.
        let mut loaded = vec![0u8; 70_000];
        mem.read_slice(&mut loaded, GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(loaded, image[5 * 512..]);
        // Nothing of the setup code went there.
        let before: u8 = mem.read_obj(GuestAddress(0xf_ffff)).unwrap();
        assert_eq!(before, 0);
        let hdr = k.setup_header().unwrap();
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!({ hdr.code32_start }, 0x10_0000);
    }

    #[test]
    fn zero_setup_sects_means_four() {
        let image = BzImageBuilder::new()
            .setup_sects(0)
            .payload_len(4096)
            .build();
        assert_eq!(image.len(), 5 * 512 + 4096);
        let (mem, layout) = testutil::guest(64 * MIB);
        load_kernel_image(&mem, &layout, &mut Cursor::new(image.clone())).unwrap();
        let mut loaded = vec![0u8; 4096];
        mem.read_slice(&mut loaded, GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(loaded, image[5 * 512..]);
    }

    #[test]
    fn kernel_end_covers_decompression_room() {
        // A relocatable kernel that runs at 16 MiB and needs 20 MiB there.
        let image = BzImageBuilder::new()
            .pref_address(0x100_0000)
            .init_size(20 * MIB as u32)
            .build();
        let k = load(image, 64 * MIB).unwrap();
        assert_eq!(k.kernel_end, 36 * MIB);
    }

    #[test]
    fn wrong_magic_is_not_a_kernel() {
        let mut image = BzImageBuilder::new().build();
        image[MAGIC_OFFSET..MAGIC_OFFSET + 4].copy_from_slice(b"HdrZ");
        let err = load(image, 64 * MIB).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel), "{err}");
    }

    #[test]
    fn truncated_payload_is_refused() {
        let mut image = BzImageBuilder::new().payload_len(100_000).build();
        image.truncate(image.len() - 5_000);
        let err = load(image, 64 * MIB).unwrap_err();
        assert!(
            matches!(
                err,
                BootError::TruncatedBzImage {
                    expected,
                    actual
                } if expected >= 5 * 512 + 100_000 - 15 && actual == 5 * 512 + 95_000
            ),
            "{err}"
        );
        assert!(err.to_string().starts_with("truncated bzImage"), "{err}");
    }

    #[test]
    fn header_cut_short_is_truncated() {
        let image = BzImageBuilder::new().build();
        let err = load(image[..0x210].to_vec(), 64 * MIB).unwrap_err();
        assert!(matches!(err, BootError::TruncatedBzImage { .. }), "{err}");
    }

    #[test]
    fn setup_code_without_payload_is_truncated() {
        let image = BzImageBuilder::new().payload_len(0).syssize(0).build();
        let err = load(image, 64 * MIB).unwrap_err();
        assert!(matches!(err, BootError::TruncatedBzImage { .. }), "{err}");
    }

    #[test]
    fn payload_past_the_code_is_truncated() {
        // payload_offset/length point past the end of the file.
        let image = BzImageBuilder::new()
            .payload_len(4096)
            .payload(0x800, 0x1000)
            .build();
        let err = load(image, 64 * MIB).unwrap_err();
        assert!(matches!(err, BootError::TruncatedBzImage { .. }), "{err}");
    }

    #[test]
    fn old_protocol_is_refused() {
        for version in [0x0205, 0x0206, 0x020b] {
            let err = load(BzImageBuilder::new().version(version).build(), 64 * MIB).unwrap_err();
            assert!(
                matches!(err, BootError::BzImageTooOld(v) if v == version),
                "{err}"
            );
        }
        let err = load(BzImageBuilder::new().version(0x0206).build(), 64 * MIB).unwrap_err();
        assert!(
            err.to_string().contains("protocol 2.06 is too old"),
            "{err}"
        );
    }

    #[test]
    fn kernel_without_64_bit_entry_is_refused() {
        let err = load(BzImageBuilder::new().xloadflags(0).build(), 64 * MIB).unwrap_err();
        assert!(matches!(err, BootError::BzImageNot64Bit), "{err}");
    }

    #[test]
    fn zimage_is_refused() {
        let err = load(BzImageBuilder::new().loadflags(0).build(), 64 * MIB).unwrap_err();
        assert!(matches!(err, BootError::BzImageNotLoadedHigh), "{err}");
    }

    #[test]
    fn kernel_larger_than_memory_is_refused() {
        // Needs 16 MiB + 60 MiB to decompress; the guest has 64 MiB.
        let image = BzImageBuilder::new()
            .pref_address(0x100_0000)
            .init_size(60 * MIB as u32)
            .build();
        let err = load(image, 64 * MIB).unwrap_err();
        assert!(
            matches!(err, BootError::KernelTooLarge { needed_end, ram_end }
                if needed_end == 76 * MIB && ram_end == 64 * MIB),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "kernel needs guest memory up to 76 MiB but the guest has 64 MiB of low RAM"
        );
        // The protected-mode code alone too large for a 16 MiB guest.
        let image = BzImageBuilder::new()
            .payload_len(15 * MIB as usize + 1)
            .build();
        let err = load(image, 16 * MIB).unwrap_err();
        assert!(matches!(err, BootError::KernelTooLarge { .. }), "{err}");
    }

    /// The real kernel the lead's CI builds (or the host's own), if there is one.
    fn real_bzimage() -> Option<std::path::PathBuf> {
        if let Some(p) = testutil::debian_bzimage() {
            return Some(p);
        }
        let mut boot: Vec<_> = std::fs::read_dir("/boot")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
            })
            .collect();
        boot.sort();
        boot.pop()
    }

    #[test]
    fn real_debian_kernel_header_is_accepted() {
        let Some(path) = real_bzimage() else {
            eprintln!(
                "note: no real kernel found (VESSEL_TEST_BZIMAGE, ~/.cache/vessel/images/debian/kernel, /boot/vmlinuz-*): skipping"
            );
            return;
        };
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("note: cannot open {}: {e}: skipping", path.display());
                return;
            }
        };
        let bytes = std::fs::read(&path).unwrap();
        let (mem, layout) = testutil::guest(512 * MIB);
        let in_guest = LoadOptions {
            decompress_on_host: false,
            ..LoadOptions::default()
        };
        let k = crate::load_kernel_with(&mem, &layout, &mut file, &in_guest)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(k.mode, EntryMode::Long64);
        assert_eq!(
            k.source(),
            &KernelSource::BzImage {
                reason: "host decompression is off".into()
            }
        );
        assert_eq!(k.entry, 0x10_0200);
        let hdr = *k.setup_header().unwrap();
        assert!({ hdr.version } >= 0x020c);
        assert_ne!({ hdr.xloadflags } & XLF_KERNEL_64, 0);
        assert!(k.cmdline_max_len() >= 255);
        let setup_sects = match hdr.setup_sects {
            0 => 4,
            n => n as usize,
        };
        let code = &bytes[(setup_sects + 1) * 512..];
        let mut loaded = vec![0u8; code.len()];
        mem.read_slice(&mut loaded, GuestAddress(0x10_0000))
            .unwrap();
        assert!(
            loaded == code,
            "protected-mode code differs in guest memory"
        );
        let runtime_end = { hdr.pref_address } + u64::from(hdr.init_size);
        assert!(k.kernel_end >= runtime_end);
        eprintln!(
            "{}: protocol {:#x}, kernel needs memory up to {:#x}",
            path.display(),
            { hdr.version },
            k.kernel_end
        );

        // The same kernel in a guest too small for its decompression room (and for its
        // vmlinux, which is what the host decompression tries first).
        if runtime_end > 32 * MIB {
            let (mem, layout) = testutil::guest(32 * MIB);
            let err = crate::load_kernel(&mem, &layout, &mut file).unwrap_err();
            assert!(matches!(err, BootError::KernelTooLarge { .. }), "{err}");
        }
    }

    #[test]
    fn real_debian_kernel_is_decompressed_on_the_host() {
        let Some(path) = testutil::debian_bzimage() else {
            eprintln!(
                "note: no Debian kernel found (VESSEL_TEST_BZIMAGE, ~/.cache/vessel/images/debian/{{kernel,vmlinuz}}): skipping"
            );
            return;
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("note: cannot read {}: {e}: skipping", path.display());
                return;
            }
        };
        let (mem, layout) = testutil::guest(512 * MIB);
        let started = std::time::Instant::now();
        let k = crate::load_kernel(&mem, &layout, &mut std::fs::File::open(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let total = started.elapsed();
        let KernelSource::ElfFromBzImage {
            format,
            decompressed_size,
            elapsed,
        } = k.source().clone()
        else {
            panic!(
                "{}: not decompressed on the host: {}",
                path.display(),
                k.source()
            );
        };
        eprintln!(
            "{}: {} (load_kernel took {} ms in all)",
            path.display(),
            k.source(),
            total.as_millis()
        );
        // Debian's 6.1 kernels are xz-compressed, with CONFIG_PVH; the 64-bit entry is the
        // default.
        assert_eq!(format, Compression::Xz);
        assert_eq!(k.mode, EntryMode::Long64);
        assert!(
            (16 * MIB..k.kernel_end).contains(&k.entry),
            "{:#x}",
            k.entry
        );
        // The header is the bzImage's own.
        let hdr = *k.setup_header().unwrap();
        assert_eq!(
            hdr.as_slice(),
            &bytes[HEADER_OFFSET..HEADER_OFFSET + hdr.as_slice().len()]
        );
        assert_eq!(
            k.cmdline_max_len(),
            (hdr.cmdline_size as usize).min(addr::CMDLINE_MAX_SIZE - 1)
        );
        // Nothing went to 1 MiB, where the bzImage would have been.
        assert!(testutil::read_bytes(&mem, 0x10_0000, 4096)
            .iter()
            .all(|&b| b == 0));

        // The first segment is in place: compare with an independent decompression.
        let offset = setup_size(&hdr) as usize + hdr.payload_offset as usize;
        let payload = &bytes[offset..offset + hdr.payload_length as usize];
        let (_, vmlinux) = decompress::decompress(payload, 512 << 20).unwrap();
        assert_eq!(vmlinux.len() as u64, decompressed_size);
        let ph = &vmlinux[testutil::u64_at(&vmlinux, 32) as usize..];
        assert_eq!(
            testutil::u32_at(ph, 0),
            1,
            "first program header is PT_LOAD"
        );
        let (off, paddr) = (testutil::u64_at(ph, 8), testutil::u64_at(ph, 24));
        let want = &vmlinux[off as usize..off as usize + (1 << 20)];
        assert!(testutil::read_bytes(&mem, paddr, want.len()) == want);
        // Entered at the vmlinux's e_entry: startup_64, the start of .text at 16 MiB.
        assert_eq!(k.entry, testutil::u64_at(&vmlinux, 24));
        assert_eq!(k.entry, 16 * MIB);

        // Asked to, the same kernel is entered at its PVH entry.
        let (mem, layout) = testutil::guest(512 * MIB);
        let options = LoadOptions {
            prefer_pvh: true,
            ..LoadOptions::default()
        };
        let pvh = crate::load_kernel_with(
            &mem,
            &layout,
            &mut std::fs::File::open(&path).unwrap(),
            &options,
        )
        .unwrap();
        assert_eq!(pvh.mode, EntryMode::Pvh32);
        assert_ne!(pvh.entry, k.entry);
        assert!(
            (16 * MIB..pvh.kernel_end).contains(&pvh.entry),
            "{:#x}",
            pvh.entry
        );

        assert!(
            elapsed < std::time::Duration::from_secs(5),
            "decompression took {elapsed:?}"
        );
    }

    /// Load `image` in a 64 MiB guest with the default options.
    fn load_host(image: Vec<u8>) -> (GuestMemoryMmap, LoadedKernel) {
        let (mem, layout) = testutil::guest(64 * MIB);
        let k = load_kernel_image(&mem, &layout, &mut Cursor::new(image)).unwrap();
        (mem, k)
    }

    /// The reason a kernel was left for the guest to decompress.
    fn fallback_reason(k: &LoadedKernel) -> &str {
        match k.source() {
            KernelSource::BzImage { reason } => reason,
            other => panic!("expected the bzImage path, got {other}"),
        }
    }

    /// That `k` is the bzImage `image` loaded as is.
    fn assert_bzimage_path(mem: &GuestMemoryMmap, k: &LoadedKernel, image: &[u8]) {
        assert_eq!(k.mode, EntryMode::Long64);
        assert_eq!(k.entry, 0x10_0200);
        let code = &image[5 * 512..];
        assert!(testutil::read_bytes(mem, 0x10_0000, code.len()) == code);
    }

    #[test]
    fn gzip_payload_loads_as_elf() {
        let elf = ElfBuilder::new().build();
        let payload = testutil::gzip(&elf);
        let image = bzimage_with_payload(BzImageBuilder::new().cmdline_size(1000), &payload);
        let (mem, layout) = testutil::guest(64 * MIB);
        // Stale bytes where the .bss goes must be cleared.
        mem.write_slice(&[0xaa; 0x1000], GuestAddress(0x100_2000))
            .unwrap();
        let k = load_kernel_image(&mem, &layout, &mut Cursor::new(image)).unwrap();
        assert_eq!(k.mode, EntryMode::Long64);
        assert_eq!(k.entry, 0x100_0000);
        assert_eq!(k.kernel_end, 0x100_3000);
        assert!(matches!(
            k.source(),
            KernelSource::ElfFromBzImage { format: Compression::Gzip, decompressed_size, .. }
                if *decompressed_size == elf.len() as u64
        ));
        assert!(k
            .source()
            .to_string()
            .starts_with("bzImage, gzip payload decompressed on the host to a 12 KiB vmlinux in "));
        assert_eq!(
            testutil::read_bytes(&mem, 0x100_0000, 0x2000),
            elf[0x1000..0x3000]
        );
        assert!(testutil::read_bytes(&mem, 0x100_2000, 0x1000)
            .iter()
            .all(|&b| b == 0));
        // Nothing of the bzImage at 1 MiB.
        assert!(testutil::read_bytes(&mem, 0x10_0000, 0x1000)
            .iter()
            .all(|&b| b == 0));
        // The bzImage's header is kept for the zero page and the limits.
        let hdr = k.setup_header().unwrap();
        assert_eq!({ hdr.cmdline_size }, 1000);
        assert_eq!(k.cmdline_max_len(), 1000);
        assert_eq!(k.initrd_addr_max(), 0x7fff_ffff);
    }

    #[test]
    fn xz_payload_with_pvh_note_enters_at_the_64_bit_entry() {
        let elf = ElfBuilder::new()
            .entry(0x100_0200)
            .pvh_entry(0x100_0123)
            .build();
        let image = bzimage_with_payload(BzImageBuilder::new(), &testutil::xz(&elf));
        let (mem, k) = load_host(image.clone());
        assert_eq!((k.mode, k.entry), (EntryMode::Long64, 0x100_0200));
        assert!(k.setup_header().is_some());

        let (mem_pvh, layout) = testutil::guest(64 * MIB);
        let options = LoadOptions {
            prefer_pvh: true,
            ..LoadOptions::default()
        };
        let k =
            load_kernel_image_with(&mem_pvh, &layout, &mut Cursor::new(image), &options).unwrap();
        assert_eq!((k.mode, k.entry), (EntryMode::Pvh32, 0x100_0123));
        assert!(matches!(
            k.source(),
            KernelSource::ElfFromBzImage {
                format: Compression::Xz,
                ..
            }
        ));
        assert!(k.setup_header().is_some());
        for mem in [mem, mem_pvh] {
            assert_eq!(
                testutil::read_bytes(&mem, 0x100_0000, 0x2000),
                elf[0x1000..0x3000]
            );
        }
    }

    #[test]
    fn every_supported_format_loads_as_elf() {
        let elf = ElfBuilder::new().pvh_entry(0x100_0040).build();
        let with_size = |mut c: Vec<u8>| {
            c.extend_from_slice(&(elf.len() as u32).to_le_bytes());
            c
        };
        for (format, payload) in [
            (Compression::Gzip, with_size(testutil::gzip(&elf))),
            (Compression::Xz, with_size(testutil::xz(&elf))),
            (Compression::Lzma, with_size(testutil::lzma_alone(&elf))),
            (Compression::Zstd, with_size(testutil::zstd_raw_frame(&elf))),
            (
                Compression::Lz4,
                with_size(testutil::lz4_legacy_frame(&elf)),
            ),
            (Compression::None, elf.clone()),
        ] {
            let (mem, k) = load_host(bzimage_with_payload(BzImageBuilder::new(), &payload));
            assert!(
                matches!(k.source(), KernelSource::ElfFromBzImage { format: f, .. } if *f == format),
                "{format}: {}",
                k.source()
            );
            assert_eq!(
                (k.mode, k.entry),
                (EntryMode::Long64, 0x100_0000),
                "{format}"
            );
            assert!(
                testutil::read_bytes(&mem, 0x100_0000, 0x2000) == elf[0x1000..0x3000],
                "{format}"
            );
        }
    }

    #[test]
    fn garbage_behind_a_valid_magic_falls_back_to_the_bzimage() {
        let mut payload = vec![0x1f, 0x8b, 0x08, 0x00];
        payload.extend((0..4000u32).map(|i| (i * 31 + 7) as u8));
        let image = bzimage_with_payload(BzImageBuilder::new(), &payload);
        let (mem, k) = load_host(image.clone());
        assert_bzimage_path(&mem, &k, &image);
        let reason = fallback_reason(&k);
        assert!(
            reason.starts_with("its gzip payload is corrupt: "),
            "{reason}"
        );
        assert!(k
            .source()
            .to_string()
            .starts_with("bzImage, decompressed by the guest (its gzip payload is corrupt"));

        let mut payload = vec![0xfd, b'7', b'z', b'X', b'Z', 0x00];
        payload.extend((0..4000u32).map(|i| (i * 31 + 7) as u8));
        let image = bzimage_with_payload(BzImageBuilder::new(), &payload);
        let (mem, k) = load_host(image.clone());
        assert_bzimage_path(&mem, &k, &image);
        assert!(fallback_reason(&k).starts_with("its xz payload is corrupt: "));
    }

    #[test]
    fn unknown_or_missing_payload_falls_back_to_the_bzimage() {
        // The builder's default: no payload announced.
        let image = BzImageBuilder::new().build();
        let (mem, k) = load_host(image.clone());
        assert_bzimage_path(&mem, &k, &image);
        assert_eq!(
            fallback_reason(&k),
            "its setup header announces no compressed payload"
        );
        let image = bzimage_with_payload(BzImageBuilder::new(), b"BZh91AY&SY and so on");
        let (mem, k) = load_host(image.clone());
        assert_bzimage_path(&mem, &k, &image);
        assert!(fallback_reason(&k).contains("bzip2"));
    }

    #[test]
    fn payload_that_is_not_an_x86_64_elf_falls_back_to_the_bzimage() {
        let not_elf = vec![0x90u8; 10_000];
        let image = bzimage_with_payload(BzImageBuilder::new(), &testutil::gzip(&not_elf));
        let (mem, k) = load_host(image.clone());
        assert_bzimage_path(&mem, &k, &image);
        assert_eq!(
            fallback_reason(&k),
            "its gzip payload is not an ELF vmlinux (it starts with 9090909090909090)"
        );

        let arm = ElfBuilder::new().machine(183).build();
        let image = bzimage_with_payload(BzImageBuilder::new(), &testutil::xz(&arm));
        let (mem, k) = load_host(image.clone());
        assert_bzimage_path(&mem, &k, &image);
        assert!(
            fallback_reason(&k).contains("not an x86_64 image"),
            "{}",
            fallback_reason(&k)
        );
    }

    #[test]
    fn decompression_bomb_is_capped_at_guest_memory() {
        // 40 MiB of zeros in a few KiB of zstd, for a 32 MiB guest.
        let payload = testutil::zstd_raw_frame(&vec![0u8; 40 * MIB as usize]);
        assert!(payload.len() < 4096);
        let image = bzimage_with_payload(BzImageBuilder::new(), &payload);
        let (mem, layout) = testutil::guest(32 * MIB);
        let k = load_kernel_image(&mem, &layout, &mut Cursor::new(image.clone())).unwrap();
        assert_bzimage_path(&mem, &k, &image);
        let reason = fallback_reason(&k);
        assert!(
            reason.starts_with("its zstd payload decompresses to more than 32 MiB"),
            "{reason}"
        );
    }

    #[test]
    fn host_decompression_can_be_turned_off() {
        let elf = ElfBuilder::new().pvh_entry(0x100_0000).build();
        let image = bzimage_with_payload(BzImageBuilder::new(), &testutil::gzip(&elf));
        let (mem, layout) = testutil::guest(64 * MIB);
        let options = LoadOptions {
            decompress_on_host: false,
            ..LoadOptions::default()
        };
        let k = load_kernel_image_with(&mem, &layout, &mut Cursor::new(image.clone()), &options)
            .unwrap();
        assert_bzimage_path(&mem, &k, &image);
        assert_eq!(fallback_reason(&k), "host decompression is off");
        assert!(LoadOptions::default().decompress_on_host);
    }

    #[test]
    fn elf_too_large_for_the_guest_falls_back_to_the_bzimage_checks() {
        // The vmlinux needs 100 MiB; the bzImage path then refuses the kernel on its own terms.
        let elf = ElfBuilder::new().memsz(100 * MIB).build();
        let image = bzimage_with_payload(
            BzImageBuilder::new()
                .pref_address(0x100_0000)
                .init_size(100 * MIB as u32),
            &testutil::gzip(&elf),
        );
        let err = load(image, 64 * MIB).unwrap_err();
        assert!(
            matches!(err, BootError::KernelTooLarge { needed_end, .. } if needed_end == 116 * MIB),
            "{err}"
        );
    }
}
