//! Loading the kernel and the initrd into guest memory.
//!
//! The kernel file is recognised by its first bytes: an ELF magic means a `vmlinux`, the
//! `HdrS` magic of the setup header means a bzImage. Each format is checked by its own module
//! (clear errors for truncated, foreign or too-old images) before linux-loader copies it in.
//!
//! A bzImage whose payload Vessel can decompress (see [`Compression`]) is, by default,
//! decompressed on the host and its `vmlinux` loaded as an ELF: the guest then skips its own
//! decompressor, which is slow where guest kernel code is emulated.

use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use linux_loader::loader::bootparam::setup_header;
use vessel_memory::vm_memory::{Bytes, GuestAddress, ReadVolatile};
use vessel_memory::{addr, GuestLayout, GuestMemoryMmap};

use crate::decompress::Compression;
use crate::error::{BootError, Size};
use crate::{bzimage, elf};

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode with identity paging, `rsi` pointing at the zero page (Linux 64-bit
    /// boot protocol).
    Long64,
    /// 32-bit protected mode without paging, `rbx` pointing at `hvm_start_info` (PVH).
    Pvh32,
}

/// The largest command line (without its NUL) given to an ELF kernel, which carries no
/// setup header to say: x86 Linux's `COMMAND_LINE_SIZE` is 2048 bytes with the NUL.
pub const ELF_CMDLINE_MAX: usize = 2047;

/// A kernel loaded into guest memory.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// Guest-physical entry point.
    pub entry: u64,
    /// How to enter it.
    pub mode: EntryMode,
    /// First byte past the memory the kernel occupies, including (for a bzImage) the room it
    /// needs to decompress itself at its run-time address. The initrd goes above this.
    pub kernel_end: u64,
    /// The bzImage setup header (with `code32_start` set to the load address when the
    /// bzImage itself was loaded); `None` for an ELF file.
    pub(crate) setup_header: Option<setup_header>,
    /// What was loaded.
    pub(crate) source: KernelSource,
}

/// How [`load_kernel_with`] loads a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Decompress a bzImage's payload on the host and load the `vmlinux` inside as an ELF,
    /// rather than loading the bzImage for the guest to decompress itself. A payload that
    /// cannot be decompressed falls back to the latter.
    pub decompress_on_host: bool,
    /// Enter an ELF kernel (a `vmlinux` file, or one decompressed on the host) that has a PVH
    /// note at its PVH entry ([`EntryMode::Pvh32`]) rather than at its 64-bit entry, the
    /// ELF's `e_entry` ([`EntryMode::Long64`]; `startup_64` in every x86-64 vmlinux).
    ///
    /// Off by default: the 64-bit boot protocol's zero page can carry `setup_data` (the RNG
    /// seed of [`crate::BootConfig::rng_seed`]); PVH's start info cannot. Turn it on for a
    /// non-Linux PVH kernel whose `e_entry` is not a 64-bit entry. Without the option, a
    /// kernel whose `e_entry` lies outside its loaded segments is entered at its PVH entry.
    pub prefer_pvh: bool,
}

impl Default for LoadOptions {
    /// Decompress on the host; enter ELF kernels at their 64-bit entry.
    fn default() -> Self {
        LoadOptions {
            decompress_on_host: true,
            prefer_pvh: false,
        }
    }
}

/// What [`load_kernel_with`] loaded, for the VMM to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    /// An ELF `vmlinux` file.
    Elf,
    /// A bzImage, loaded as is: the guest decompresses itself.
    BzImage {
        /// Why it was not decompressed on the host ("host decompression is off", or what went
        /// wrong).
        reason: String,
    },
    /// The `vmlinux` inside a bzImage, decompressed on the host and loaded as an ELF.
    ElfFromBzImage {
        /// How the payload was compressed.
        format: Compression,
        /// Bytes it decompressed to.
        decompressed_size: u64,
        /// Time spent decompressing.
        elapsed: Duration,
    },
}

impl fmt::Display for KernelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelSource::Elf => f.write_str("ELF vmlinux"),
            KernelSource::BzImage { reason } => {
                write!(f, "bzImage, decompressed by the guest ({reason})")
            }
            KernelSource::ElfFromBzImage {
                format,
                decompressed_size,
                elapsed,
            } => write!(
                f,
                "bzImage, {format} payload decompressed on the host to a {} vmlinux in {} ms",
                Size(*decompressed_size),
                elapsed.as_millis()
            ),
        }
    }
}

impl LoadedKernel {
    /// The bzImage setup header, as loaded; `None` for an ELF file. A bzImage decompressed on
    /// the host keeps its header: the zero page and the command line and initrd limits come
    /// from it.
    pub fn setup_header(&self) -> Option<&setup_header> {
        self.setup_header.as_ref()
    }

    /// What was loaded: an ELF, a bzImage, or the ELF inside a bzImage.
    pub fn source(&self) -> &KernelSource {
        &self.source
    }

    /// The longest command line the kernel accepts, not counting the terminating NUL, capped
    /// at what Vessel reserves for it ([`addr::CMDLINE_MAX_SIZE`] with the NUL).
    pub fn cmdline_max_len(&self) -> usize {
        let kernel_max = match &self.setup_header {
            // A zero cmdline_size means the pre-2.06 default of 255 (never seen on the 2.12+
            // kernels Vessel accepts, but harmless).
            Some(h) => match h.cmdline_size {
                0 => 255,
                n => n as usize,
            },
            None => ELF_CMDLINE_MAX,
        };
        kernel_max.min(addr::CMDLINE_MAX_SIZE - 1)
    }

    /// The highest address the initrd may occupy (inclusive), as the kernel declares it.
    pub fn initrd_addr_max(&self) -> u64 {
        match &self.setup_header {
            // Zero means the pre-2.03 default.
            Some(h) => match h.initrd_addr_max {
                0 => 0x37ff_ffff,
                n => u64::from(n),
            },
            // A 64-bit or PVH entry takes the initrd anywhere below 4 GiB.
            None => u64::from(u32::MAX),
        }
    }
}

/// Load a kernel from a file: a bzImage (recognised by its setup header) or an ELF vmlinux.
///
/// An ELF kernel is entered at its 64-bit entry, `e_entry` ([`EntryMode::Long64`]), with a
/// zero page; at its PVH entry (`XEN_ELFNOTE_PHYS32_ENTRY`, [`EntryMode::Pvh32`]) only when
/// [`LoadOptions::prefer_pvh`] asks for it or `e_entry` is unusable. A bzImage's payload is
/// decompressed on the host and loaded as such an ELF when Vessel can decompress it;
/// otherwise the bzImage is loaded at 1 MiB and entered at its 64-bit entry, load address +
/// 0x200. This is [`load_kernel_with`] with the default [`LoadOptions`].
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    kernel: &mut std::fs::File,
) -> Result<LoadedKernel, BootError> {
    load_kernel_with(mem, layout, kernel, &LoadOptions::default())
}

/// [`load_kernel`], with the choice of how to load a bzImage and which entry to use.
pub fn load_kernel_with(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    kernel: &mut std::fs::File,
    options: &LoadOptions,
) -> Result<LoadedKernel, BootError> {
    load_kernel_image_with(mem, layout, kernel, options)
}

/// [`load_kernel`] for any seekable byte source.
#[cfg(test)]
pub(crate) fn load_kernel_image<F>(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    image: &mut F,
) -> Result<LoadedKernel, BootError>
where
    F: Read + Seek + ReadVolatile,
{
    load_kernel_image_with(mem, layout, image, &LoadOptions::default())
}

/// [`load_kernel_with`] for any seekable byte source.
pub(crate) fn load_kernel_image_with<F>(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    image: &mut F,
    options: &LoadOptions,
) -> Result<LoadedKernel, BootError>
where
    F: Read + Seek + ReadVolatile,
{
    let len = image.seek(SeekFrom::End(0)).map_err(BootError::KernelIo)?;
    if len == 0 {
        return Err(BootError::EmptyKernel);
    }
    // Enough for the ELF header and the whole bzImage setup header.
    let mut head = vec![0u8; len.min(4096) as usize];
    image.rewind().map_err(BootError::KernelIo)?;
    image.read_exact(&mut head).map_err(BootError::KernelIo)?;

    if elf::has_magic(&head) {
        elf::load(mem, layout, image, len, &head, options.prefer_pvh)
    } else if bzimage::has_magic(&head) {
        bzimage::load(mem, layout, image, len, &head, options)
    } else {
        Err(BootError::NotAKernel)
    }
}

/// Load the initrd as high as it may go in low RAM, above the kernel and below the kernel's
/// `initrd_addr_max`. Returns its guest-physical address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    kernel: &LoadedKernel,
    initrd: &mut std::fs::File,
) -> Result<(u64, u64), BootError> {
    load_initrd_image(mem, layout, kernel, initrd)
}

/// [`load_initrd`] for any seekable byte source.
pub(crate) fn load_initrd_image<F>(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    kernel: &LoadedKernel,
    initrd: &mut F,
) -> Result<(u64, u64), BootError>
where
    F: Read + Seek + ReadVolatile,
{
    let size = initrd.seek(SeekFrom::End(0)).map_err(BootError::InitrdIo)?;
    if size == 0 {
        return Err(BootError::EmptyInitrd);
    }
    let max_end = kernel.initrd_addr_max().saturating_add(1);
    let too_large = || BootError::InitrdTooLarge {
        size,
        mem_size: layout.mem_size(),
        min_start: kernel.kernel_end.max(addr::HIMEM_START),
        max_end: max_end.min(layout.low_ram_end()),
    };
    let count = usize::try_from(size).map_err(|_| too_large())?;
    let start = layout
        .initrd_addr(size, kernel.kernel_end, max_end)
        .ok_or_else(too_large)?;
    initrd.rewind().map_err(BootError::InitrdIo)?;
    mem.read_exact_volatile_from(GuestAddress(start), initrd, count)
        .map_err(BootError::write("initrd", start))?;
    log::debug!("initrd: {size} bytes at {start:#x}");
    Ok((start, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{self, BzImageBuilder, TempFile, MIB};
    use std::io::Cursor;

    #[test]
    fn empty_file_is_refused() {
        let (mem, layout) = testutil::guest(64 * MIB);
        let err = load_kernel_image(&mem, &layout, &mut Cursor::new(Vec::new())).unwrap_err();
        assert!(matches!(err, BootError::EmptyKernel), "{err}");
        assert_eq!(err.to_string(), "the kernel file is empty");
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let (mem, layout) = testutil::guest(64 * MIB);
        for garbage in [
            b"#!/bin/sh\necho hello\n".to_vec(),
            vec![0u8; 8192],
            (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect(),
            b"\x7fEL".to_vec(),
        ] {
            let err = load_kernel_image(&mem, &layout, &mut Cursor::new(garbage)).unwrap_err();
            assert!(matches!(err, BootError::NotAKernel), "{err}");
            assert_eq!(
                err.to_string(),
                "not a Linux kernel: neither a bzImage nor an ELF vmlinux"
            );
        }
    }

    #[test]
    fn load_kernel_reads_a_real_file() {
        let (mem, layout) = testutil::guest(64 * MIB);
        let image = BzImageBuilder::new().payload_len(10_000).build();
        let file = TempFile::with_contents("kernel", &image);
        let k = load_kernel(&mem, &layout, &mut file.open()).unwrap();
        assert_eq!(k.entry, addr::HIMEM_START + 0x200);
        assert_eq!(k.mode, EntryMode::Long64);
        let mut loaded = vec![0u8; 10_000];
        mem.read_slice(&mut loaded, GuestAddress(addr::HIMEM_START))
            .unwrap();
        assert_eq!(loaded, image[image.len() - 10_000..]);
    }

    #[test]
    fn initrd_goes_high_above_the_kernel() {
        let (mem, layout) = testutil::guest(64 * MIB);
        let k = load_kernel_image(
            &mem,
            &layout,
            &mut Cursor::new(BzImageBuilder::new().build()),
        )
        .unwrap();
        let data: Vec<u8> = (0..3 * MIB as usize + 123)
            .map(|i| (i % 251) as u8)
            .collect();
        let file = TempFile::with_contents("initrd", &data);
        let (a, s) = load_initrd(&mem, &layout, &k, &mut file.open()).unwrap();
        assert_eq!(s, data.len() as u64);
        assert_eq!(a % 4096, 0);
        assert!(a >= k.kernel_end);
        assert!(a + s <= 64 * MIB);
        // As high as it goes: less than a page of slack at the top.
        assert!(64 * MIB - (a + s) < 4096);
        let mut back = vec![0u8; data.len()];
        mem.read_slice(&mut back, GuestAddress(a)).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn initrd_respects_initrd_addr_max() {
        let (mem, layout) = testutil::guest(256 * MIB);
        let k = load_kernel_image(
            &mem,
            &layout,
            &mut Cursor::new(BzImageBuilder::new().initrd_addr_max(0x3ff_ffff).build()),
        )
        .unwrap();
        let (a, s) =
            load_initrd_image(&mem, &layout, &k, &mut Cursor::new(vec![7u8; 5000])).unwrap();
        assert!(a + s <= 0x400_0000, "{a:#x}+{s:#x}");
        assert!(0x400_0000 - (a + s) < 4096);
    }

    #[test]
    fn initrd_larger_than_memory_is_refused() {
        let (mem, layout) = testutil::guest(16 * MIB);
        let k = load_kernel_image(
            &mem,
            &layout,
            &mut Cursor::new(BzImageBuilder::new().build()),
        )
        .unwrap();
        let err = load_initrd_image(
            &mem,
            &layout,
            &k,
            &mut Cursor::new(vec![0u8; 20 * MIB as usize]),
        )
        .unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("initrd of 20 MiB does not fit in 16 MiB of guest memory"),
            "{err}"
        );
    }

    #[test]
    fn empty_initrd_is_refused() {
        let (mem, layout) = testutil::guest(64 * MIB);
        let k = load_kernel_image(
            &mem,
            &layout,
            &mut Cursor::new(BzImageBuilder::new().build()),
        )
        .unwrap();
        let err = load_initrd_image(&mem, &layout, &k, &mut Cursor::new(Vec::new())).unwrap_err();
        assert!(matches!(err, BootError::EmptyInitrd), "{err}");
    }

    #[test]
    fn cmdline_limit_follows_the_kernel() {
        let (mem, layout) = testutil::guest(64 * MIB);
        let small = load_kernel_image(
            &mem,
            &layout,
            &mut Cursor::new(BzImageBuilder::new().cmdline_size(255).build()),
        )
        .unwrap();
        assert_eq!(small.cmdline_max_len(), 255);
        let huge = load_kernel_image(
            &mem,
            &layout,
            &mut Cursor::new(BzImageBuilder::new().cmdline_size(0x10_0000).build()),
        )
        .unwrap();
        assert_eq!(huge.cmdline_max_len(), addr::CMDLINE_MAX_SIZE - 1);
        let elf = load_kernel_image(
            &mem,
            &layout,
            &mut Cursor::new(testutil::ElfBuilder::new().build()),
        )
        .unwrap();
        assert_eq!(elf.cmdline_max_len(), ELF_CMDLINE_MAX);
        assert!(elf.setup_header().is_none());
    }
}
