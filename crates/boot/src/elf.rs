//! ELF `vmlinux` kernels: checking the headers, then loading the segments at their physical
//! addresses with linux-loader's `Elf`, which also finds the PVH entry note.

use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{Elf, KernelLoader};
use vessel_memory::vm_memory::{Bytes, GuestAddress, ReadVolatile};
use vessel_memory::{addr, GuestLayout, GuestMemoryMmap};

use crate::error::BootError;
use crate::loader::{EntryMode, KernelSource, LoadedKernel};

const MAGIC: &[u8; 4] = b"\x7fELF";
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;

/// Whether `head` (the file's first bytes) starts with the ELF magic.
pub(crate) fn has_magic(head: &[u8]) -> bool {
    head.starts_with(MAGIC)
}

/// One `PT_LOAD` program header, the fields that matter here.
struct Segment {
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// Check an ELF kernel of `len` bytes whose first bytes are `head`, and load it. It is
/// entered at its 64-bit entry (`e_entry`) unless `prefer_pvh` and it has a PVH note, or its
/// `e_entry` lies outside the loaded kernel and its PVH entry does not.
pub(crate) fn load<F>(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    image: &mut F,
    len: u64,
    head: &[u8],
    prefer_pvh: bool,
) -> Result<LoadedKernel, BootError>
where
    F: Read + Seek + ReadVolatile,
{
    let entry_64 = check_ident(head)?;
    let segments = read_segments(image, len, head)?;
    let start = segments.iter().map(|s| s.paddr).min().unwrap_or(0);
    let needed_end = segments
        .iter()
        .map(|s| s.paddr + s.memsz)
        .max()
        .unwrap_or(0);
    if needed_end > layout.low_ram_end() {
        return Err(BootError::KernelTooLarge {
            needed_end,
            ram_end: layout.low_ram_end(),
        });
    }

    let result =
        Elf::load(mem, None, image, Some(GuestAddress(addr::HIMEM_START))).map_err(|e| {
            BootError::KernelLoad {
                format: "ELF",
                source: e,
            }
        })?;
    // linux-loader copies the file bytes only; clear the rest of each segment (.bss) so that
    // reused guest memory cannot leak into it.
    for s in &segments {
        zero(mem, s.paddr + s.filesz, s.memsz - s.filesz)?;
    }

    let in_kernel = |a: u64| (start..needed_end).contains(&a);
    let long64 = (entry_64, EntryMode::Long64);
    let (entry, mode) = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(GuestAddress(pvh)) => {
            if prefer_pvh {
                (pvh, EntryMode::Pvh32)
            } else if !in_kernel(entry_64) && in_kernel(pvh) {
                log::info!(
                    "ELF kernel: 64-bit entry {entry_64:#x} lies outside the kernel, using the PVH entry"
                );
                (pvh, EntryMode::Pvh32)
            } else {
                long64
            }
        }
        _ => long64,
    };
    if !in_kernel(entry) {
        return Err(BootError::MalformedElf(format!(
            "its {} entry point {entry:#x} lies outside the loaded kernel ({start:#x}..{needed_end:#x})",
            if mode == EntryMode::Pvh32 { "PVH" } else { "64-bit" }
        )));
    }
    log::debug!("ELF kernel at {start:#x}..{needed_end:#x}, {mode:?} entry at {entry:#x}");
    Ok(LoadedKernel {
        entry,
        mode,
        kernel_end: needed_end.max(result.kernel_end),
        setup_header: None,
        source: KernelSource::Elf,
    })
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap_or_default())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap_or_default())
}

/// Check that the ELF header describes a 64-bit little-endian x86_64 image; return its entry.
fn check_ident(head: &[u8]) -> Result<u64, BootError> {
    if head.len() < EHDR_SIZE {
        return Err(BootError::MalformedElf(format!(
            "the file ends inside the {EHDR_SIZE}-byte ELF header"
        )));
    }
    match head[4] {
        ELFCLASS64 => {}
        1 => return Err(BootError::ElfNotX86_64("it is a 32-bit ELF".into())),
        c => return Err(BootError::ElfNotX86_64(format!("unknown ELF class {c}"))),
    }
    if head[5] != ELFDATA2LSB {
        return Err(BootError::ElfNotX86_64("it is big-endian".into()));
    }
    let machine = u16_at(head, 18);
    if machine != EM_X86_64 {
        let name = match machine {
            3 => "i386",
            40 => "arm",
            183 => "aarch64",
            243 => "riscv",
            _ => "another machine",
        };
        return Err(BootError::ElfNotX86_64(format!(
            "it is built for {name} (e_machine {machine})"
        )));
    }
    Ok(u64_at(head, 24))
}

/// Read and check the program headers; return the loadable segments.
fn read_segments<F: Read + Seek>(
    image: &mut F,
    len: u64,
    head: &[u8],
) -> Result<Vec<Segment>, BootError> {
    let phoff = u64_at(head, 32);
    let phentsize = u16_at(head, 54);
    let phnum = u16_at(head, 56);
    if usize::from(phentsize) != PHDR_SIZE {
        return Err(BootError::MalformedElf(format!(
            "program header entries are {phentsize} bytes, not {PHDR_SIZE}"
        )));
    }
    if phnum == 0 {
        return Err(BootError::MalformedElf("it has no program headers".into()));
    }
    let table_len = u64::from(phnum) * PHDR_SIZE as u64;
    if phoff < EHDR_SIZE as u64 || phoff.checked_add(table_len).is_none_or(|end| end > len) {
        return Err(BootError::MalformedElf(format!(
            "its program headers ({phnum} at offset {phoff:#x}) are not inside the file ({len} bytes)"
        )));
    }
    let mut table = vec![0u8; table_len as usize];
    image
        .seek(SeekFrom::Start(phoff))
        .and_then(|_| image.read_exact(&mut table))
        .map_err(BootError::KernelIo)?;

    let mut segments = Vec::new();
    for (i, ph) in table.chunks_exact(PHDR_SIZE).enumerate() {
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let s = Segment {
            offset: u64_at(ph, 8),
            paddr: u64_at(ph, 24),
            filesz: u64_at(ph, 32),
            memsz: u64_at(ph, 40),
        };
        if s.offset.checked_add(s.filesz).is_none_or(|end| end > len) {
            return Err(BootError::MalformedElf(format!(
                "truncated: segment {i} needs file bytes {:#x}..{:#x} but the file has {len}",
                s.offset,
                s.offset.saturating_add(s.filesz)
            )));
        }
        if s.filesz > s.memsz {
            return Err(BootError::MalformedElf(format!(
                "segment {i} has more file bytes ({:#x}) than memory bytes ({:#x})",
                s.filesz, s.memsz
            )));
        }
        if s.memsz == 0 {
            continue;
        }
        if s.paddr < addr::HIMEM_START {
            return Err(BootError::MalformedElf(format!(
                "segment {i} loads at {:#x}, below 1 MiB where the boot structures live",
                s.paddr
            )));
        }
        if s.paddr.checked_add(s.memsz).is_none() {
            return Err(BootError::MalformedElf(format!(
                "segment {i} wraps around the address space"
            )));
        }
        segments.push(s);
    }
    if segments.is_empty() {
        return Err(BootError::MalformedElf(
            "it has no loadable segments".into(),
        ));
    }
    Ok(segments)
}

/// Write `len` zero bytes at `start`.
fn zero(mem: &GuestMemoryMmap, start: u64, len: u64) -> Result<(), BootError> {
    const CHUNK: u64 = 64 * 1024;
    let zeros = [0u8; CHUNK as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        mem.write_slice(&zeros[..n as usize], GuestAddress(start + done))
            .map_err(BootError::write("kernel .bss", start + done))?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::{load_kernel_image, load_kernel_image_with, LoadOptions};
    use crate::testutil::{self, ElfBuilder, MIB};
    use std::io::Cursor;

    use crate::testutil::load;

    #[test]
    fn elf_without_pvh_note_uses_the_64_bit_entry() {
        let (mem, layout) = testutil::guest(64 * MIB);
        // Stale bytes where the .bss goes must be cleared.
        mem.write_slice(&[0xaa; 0x1000], GuestAddress(0x100_2000))
            .unwrap();
        let b = ElfBuilder::new();
        let image = b.build();
        let k = load_kernel_image(&mem, &layout, &mut Cursor::new(image.clone())).unwrap();
        assert_eq!(k.mode, EntryMode::Long64);
        assert_eq!(k.entry, 0x100_0000);
        assert_eq!(k.kernel_end, 0x100_0000 + 0x3000);
        let mut text = vec![0u8; 0x2000];
        mem.read_slice(&mut text, GuestAddress(0x100_0000)).unwrap();
        assert_eq!(text, image[0x1000..0x3000]);
        let mut bss = vec![0xffu8; 0x1000];
        mem.read_slice(&mut bss, GuestAddress(0x100_2000)).unwrap();
        assert!(bss.iter().all(|&b| b == 0));
    }

    /// Load `image` in a 64 MiB guest, preferring the PVH entry.
    fn load_pvh(image: Vec<u8>) -> Result<LoadedKernel, BootError> {
        let (mem, layout) = testutil::guest(64 * MIB);
        let options = LoadOptions {
            prefer_pvh: true,
            ..LoadOptions::default()
        };
        load_kernel_image_with(&mem, &layout, &mut Cursor::new(image), &options)
    }

    #[test]
    fn elf_with_pvh_note_uses_the_64_bit_entry_by_default() {
        let image = ElfBuilder::new()
            .entry(0x100_0200)
            .pvh_entry(0x100_0123)
            .build();
        let k = load(image, 64 * MIB).unwrap();
        assert_eq!((k.mode, k.entry), (EntryMode::Long64, 0x100_0200));
    }

    #[test]
    fn elf_with_pvh_note_uses_the_pvh_entry_when_preferred() {
        let image = ElfBuilder::new()
            .entry(0x100_0200)
            .pvh_entry(0x100_0123)
            .build();
        let k = load_pvh(image).unwrap();
        assert_eq!((k.mode, k.entry), (EntryMode::Pvh32, 0x100_0123));
        // Without a PVH note, preferring PVH still finds the 64-bit entry.
        let k = load_pvh(ElfBuilder::new().build()).unwrap();
        assert_eq!((k.mode, k.entry), (EntryMode::Long64, 0x100_0000));
    }

    #[test]
    fn unusable_64_bit_entry_falls_back_to_pvh() {
        let image = ElfBuilder::new()
            .entry(0x300_0000)
            .pvh_entry(0x100_0123)
            .build();
        let k = load(image, 64 * MIB).unwrap();
        assert_eq!((k.mode, k.entry), (EntryMode::Pvh32, 0x100_0123));
        // Neither entry usable: the 64-bit one is named.
        let image = ElfBuilder::new()
            .entry(0x300_0000)
            .pvh_entry(0x4000_0000)
            .build();
        let err = load(image, 64 * MIB).unwrap_err();
        assert!(matches!(err, BootError::MalformedElf(_)), "{err}");
        assert!(
            err.to_string()
                .contains("its 64-bit entry point 0x3000000 "),
            "{err}"
        );
    }

    #[test]
    fn pvh_entry_outside_the_kernel_is_refused_when_preferred() {
        let image = ElfBuilder::new().pvh_entry(0x4000_0000).build();
        let err = load_pvh(image.clone()).unwrap_err();
        assert!(matches!(err, BootError::MalformedElf(_)), "{err}");
        assert!(err.to_string().contains("PVH entry point"), "{err}");
        // By default the note is not used.
        let k = load(image, 64 * MIB).unwrap();
        assert_eq!((k.mode, k.entry), (EntryMode::Long64, 0x100_0000));
    }

    #[test]
    fn non_x86_64_elf_is_refused() {
        let err = load(ElfBuilder::new().machine(183).build(), 64 * MIB).unwrap_err();
        assert!(matches!(err, BootError::ElfNotX86_64(_)), "{err}");
        assert_eq!(
            err.to_string(),
            "ELF kernel is not an x86_64 image: it is built for aarch64 (e_machine 183)"
        );
        let mut image = ElfBuilder::new().build();
        image[4] = 1;
        let err = load(image, 64 * MIB).unwrap_err();
        assert!(err.to_string().contains("32-bit ELF"), "{err}");
        let mut image = ElfBuilder::new().build();
        image[5] = 2;
        let err = load(image, 64 * MIB).unwrap_err();
        assert!(err.to_string().contains("big-endian"), "{err}");
    }

    #[test]
    fn truncated_elf_is_refused() {
        let mut image = ElfBuilder::new().build();
        image.truncate(0x2800);
        let err = load(image, 64 * MIB).unwrap_err();
        assert!(matches!(err, BootError::MalformedElf(_)), "{err}");
        assert!(err.to_string().contains("truncated"), "{err}");
        // Cut inside the ELF header.
        let image = ElfBuilder::new().build();
        let err = load(image[..40].to_vec(), 64 * MIB).unwrap_err();
        assert!(matches!(err, BootError::MalformedElf(_)), "{err}");
    }

    #[test]
    fn elf_below_one_mib_is_refused() {
        let err = load(ElfBuilder::new().paddr(0x8000).build(), 64 * MIB).unwrap_err();
        assert!(err.to_string().contains("below 1 MiB"), "{err}");
    }

    #[test]
    fn elf_larger_than_memory_is_refused() {
        let err = load(ElfBuilder::new().memsz(100 * MIB).build(), 64 * MIB).unwrap_err();
        assert!(
            matches!(err, BootError::KernelTooLarge { ram_end, .. } if ram_end == 64 * MIB),
            "{err}"
        );
    }

    #[test]
    fn elf_without_program_headers_is_refused() {
        let mut image = ElfBuilder::new().build();
        image[56..58].copy_from_slice(&0u16.to_le_bytes());
        let err = load(image, 64 * MIB).unwrap_err();
        assert!(err.to_string().contains("no program headers"), "{err}");
    }
}
