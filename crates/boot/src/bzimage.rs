//! bzImage kernels: checking the setup header, then loading the protected-mode code at 1 MiB
//! with linux-loader's `BzImage`.
//!
//! Vessel skips the real-mode setup code and enters the kernel at its 64-bit entry point
//! (`startup_64`, 0x200 bytes into the protected-mode code), so it needs boot protocol 2.12+
//! with `XLF_KERNEL_64` set.

use std::io::{Read, Seek};

use linux_loader::loader::bootparam::{setup_header, LOADED_HIGH, XLF_KERNEL_64};
use linux_loader::loader::{BzImage, KernelLoader};
use vessel_memory::vm_memory::{ByteValued, GuestAddress, ReadVolatile};
use vessel_memory::{addr, GuestLayout, GuestMemoryMmap};

use crate::error::BootError;
use crate::loader::{EntryMode, LoadedKernel};

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

/// Check the header of a bzImage of `len` bytes whose first bytes are `head`, and load it.
pub(crate) fn load<F>(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    image: &mut F,
    len: u64,
    head: &[u8],
) -> Result<LoadedKernel, BootError>
where
    F: Read + Seek + ReadVolatile,
{
    let hdr = parse_header(head, len)?;
    let load_addr = addr::HIMEM_START;
    let needed_end = check_header(&hdr, len, load_addr)?;
    if needed_end > layout.low_ram_end() {
        return Err(BootError::KernelTooLarge {
            needed_end,
            ram_end: layout.low_ram_end(),
        });
    }

    let result = BzImage::load(mem, Some(GuestAddress(load_addr)), image, None).map_err(|e| {
        BootError::KernelLoad {
            format: "bzImage",
            reason: e.to_string(),
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
    })
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

    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let setup_size = (setup_sects + 1) * 512;
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
    use crate::loader::load_kernel_image;
    use crate::testutil::{self, BzImageBuilder, MIB};
    use std::io::Cursor;
    use vessel_memory::vm_memory::Bytes;

    fn load(image: Vec<u8>, mem_size: u64) -> Result<LoadedKernel, BootError> {
        let (mem, layout) = testutil::guest(mem_size);
        load_kernel_image(&mem, &layout, &mut Cursor::new(image))
    }

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
        if let Some(p) = std::env::var_os("VESSEL_TEST_BZIMAGE") {
            return Some(p.into());
        }
        if let Some(home) = std::env::var_os("HOME") {
            let p = std::path::Path::new(&home).join(".cache/vessel/images/debian/kernel");
            if p.is_file() {
                return Some(p);
            }
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
        let k = crate::load_kernel(&mem, &layout, &mut file)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(k.mode, EntryMode::Long64);
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

        // The same kernel in a guest too small for its decompression room.
        if runtime_end > 32 * MIB {
            let (mem, layout) = testutil::guest(32 * MIB);
            let err = crate::load_kernel(&mem, &layout, &mut file).unwrap_err();
            assert!(matches!(err, BootError::KernelTooLarge { .. }), "{err}");
        }
    }
}
