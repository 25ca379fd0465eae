//! Kernel modules: finding them in a `lib/modules/<release>` tree, reading
//! their dependencies, ordering them for loading, and decompressing them.
//!
//! Dependencies come from `modules.dep` when the tree has one. Debian's
//! `linux-image-*` packages do not ship it (`depmod` runs at install time), so
//! otherwise each module's own `depends=` entry in its `.modinfo` ELF section
//! (written by modpost) is read, lazily, only for the modules reached.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::IoContext;
use crate::ImageError;

/// Extensions a module file may have, longest first.
const MODULE_EXTENSIONS: [&str; 4] = [".ko.xz", ".ko.zst", ".ko.gz", ".ko"];

/// The module name of a file name or path: the base name without its
/// `.ko[.xz|.zst|.gz]` extension, `-` written as `_` (as the kernel does).
pub fn module_name(file: &str) -> Option<String> {
    let base = file.rsplit('/').next()?;
    MODULE_EXTENSIONS
        .iter()
        .find_map(|ext| base.strip_suffix(ext))
        .filter(|stem| !stem.is_empty())
        .map(normalize)
}

/// Module names treat `-` and `_` alike; `_` is canonical.
pub fn normalize(name: &str) -> String {
    name.trim().replace('-', "_")
}

/// A module known to an index.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Known {
    /// Path relative to the index root.
    path: PathBuf,
    /// Direct (or, from modules.dep, transitive) dependencies; `None` until
    /// read from the file's `.modinfo`.
    deps: Option<Vec<String>>,
}

/// The modules of one kernel release directory (`lib/modules/<release>`).
#[derive(Debug, Clone)]
pub struct ModuleIndex {
    root: PathBuf,
    modules: BTreeMap<String, Known>,
}

impl ModuleIndex {
    /// Indexes `root` from its `modules.dep` if present, else by scanning it.
    pub fn load(root: &Path) -> Result<Self, ImageError> {
        let dep = root.join("modules.dep");
        if dep.is_file() {
            let text = fs::read_to_string(&dep).ctx("read", &dep)?;
            Ok(Self::from_modules_dep(root, &text))
        } else {
            Self::scan(root)
        }
    }

    /// Indexes from `modules.dep` text: lines `path: dep-path dep-path ...`.
    pub fn from_modules_dep(root: &Path, text: &str) -> Self {
        let mut modules = BTreeMap::new();
        for line in text.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let Some(name) = module_name(path.trim()) else {
                continue;
            };
            let deps = deps.split_whitespace().filter_map(module_name).collect();
            modules.entry(name).or_insert(Known {
                path: PathBuf::from(path.trim()),
                deps: Some(deps),
            });
        }
        ModuleIndex {
            root: root.to_path_buf(),
            modules,
        }
    }

    /// Indexes every module file under `root` (sorted walk; the first file of
    /// a name wins). Dependencies are read later, on demand.
    pub fn scan(root: &Path) -> Result<Self, ImageError> {
        let mut modules = BTreeMap::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let dir = root.join(&rel);
            let mut names: Vec<_> = fs::read_dir(&dir)
                .ctx("read directory", &dir)?
                .filter_map(Result::ok)
                .collect();
            names.sort_by_key(|e| e.file_name());
            for entry in names.into_iter().rev() {
                let file_name = entry.file_name().to_string_lossy().into_owned();
                let rel_path = rel.join(&file_name);
                let Ok(kind) = entry.file_type() else {
                    continue;
                };
                if kind.is_dir() {
                    stack.push(rel_path);
                } else if let Some(name) = module_name(&file_name) {
                    modules.entry(name).or_insert(Known {
                        path: rel_path,
                        deps: None,
                    });
                }
            }
        }
        Ok(ModuleIndex {
            root: root.to_path_buf(),
            modules,
        })
    }

    /// The directory this index describes.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Number of modules known.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// True when no module is known.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// The file of module `name`, relative to the root.
    pub fn path_of(&self, name: &str) -> Option<&Path> {
        self.modules.get(&normalize(name)).map(|k| k.path.as_path())
    }

    /// The dependencies of `name` (`None` if there is no such module).
    fn deps_of(&mut self, name: &str) -> Result<Option<Vec<String>>, ImageError> {
        let root = self.root.clone();
        let Some(known) = self.modules.get_mut(name) else {
            return Ok(None);
        };
        if known.deps.is_none() {
            let data = read_module(&root.join(&known.path))?;
            known.deps = Some(modinfo_depends(&modinfo(&data).map_err(|e| {
                ImageError::Module {
                    module: known.path.display().to_string(),
                    reason: e.to_string(),
                }
            })?));
        }
        Ok(known.deps.clone())
    }
}

/// A module placed in load order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModule {
    /// Canonical module name.
    pub name: String,
    /// File relative to the index root.
    pub path: PathBuf,
}

/// The outcome of [`resolve`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    /// Every requested module and its dependencies, dependencies first.
    pub order: Vec<ResolvedModule>,
    /// Requested modules this kernel does not have.
    pub missing: Vec<String>,
    /// Dependencies named by a module that this kernel does not have:
    /// `(module, dependency)`.
    pub missing_deps: Vec<(String, String)>,
    /// Dependency edges dropped to break a cycle: `(module, dependency)`.
    pub cycles: Vec<(String, String)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    Visiting,
    Done,
}

/// Orders `wanted` and everything they depend on (transitively) so that every
/// module comes after its dependencies, each once. Requested names the kernel
/// does not have are reported in `missing`; a dependency cycle is broken (and
/// reported) instead of looping.
pub fn resolve(index: &mut ModuleIndex, wanted: &[&str]) -> Result<Resolution, ImageError> {
    let mut res = Resolution::default();
    let mut marks: HashMap<String, Mark> = HashMap::new();
    for want in wanted {
        let name = normalize(want);
        if index.deps_of(&name)?.is_none() {
            if !res.missing.contains(&name) {
                res.missing.push(name);
            }
            continue;
        }
        visit(index, &name, &mut marks, &mut res)?;
    }
    Ok(res)
}

fn visit(
    index: &mut ModuleIndex,
    name: &str,
    marks: &mut HashMap<String, Mark>,
    res: &mut Resolution,
) -> Result<(), ImageError> {
    if marks.contains_key(name) {
        return Ok(());
    }
    marks.insert(name.to_string(), Mark::Visiting);
    let deps = index.deps_of(name)?.unwrap_or_default();
    for dep in deps {
        match marks.get(&dep) {
            Some(Mark::Done) => {}
            Some(Mark::Visiting) => res.cycles.push((name.to_string(), dep)),
            None if index.path_of(&dep).is_none() => {
                res.missing_deps.push((name.to_string(), dep));
            }
            None => visit(index, &dep, marks, res)?,
        }
    }
    marks.insert(name.to_string(), Mark::Done);
    let path = index
        .path_of(name)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    res.order.push(ResolvedModule {
        name: name.to_string(),
        path,
    });
    Ok(())
}

/// Reads a module file, decompressing `.ko.xz` and `.ko.zst`.
pub fn read_module(path: &Path) -> Result<Vec<u8>, ImageError> {
    let raw = fs::read(path).ctx("read", path)?;
    let name = path.to_string_lossy();
    let fail = |reason: String| ImageError::Module {
        module: path.display().to_string(),
        reason,
    };
    if name.ends_with(".ko.xz") {
        let mut out = Vec::new();
        lzma_rs::xz_decompress(&mut BufReader::new(raw.as_slice()), &mut out)
            .map_err(|e| fail(format!("xz decompression failed: {e}")))?;
        Ok(out)
    } else if name.ends_with(".ko.zst") {
        let mut out = Vec::new();
        ruzstd::StreamingDecoder::new(raw.as_slice())
            .map_err(|e| fail(format!("zstd decompression failed: {e}")))?
            .read_to_end(&mut out)
            .map_err(|e| fail(format!("zstd decompression failed: {e}")))?;
        Ok(out)
    } else if name.ends_with(".ko.gz") {
        Err(fail("gzip-compressed modules are not supported".into()))
    } else {
        Ok(raw)
    }
}

/// Empties a module's `.BTF` section (its size becomes 0), returning whether it had one.
///
/// Loading a module with BTF makes the kernel parse the whole vmlinux BTF first (once, over
/// four minutes where guest kernel code is emulated); a module whose `.BTF` is empty is loaded
/// without it (the module's types are then not visible to BPF). The bytes stay in the file;
/// only the section header changes. Anything that is not a well-formed little-endian ELF64 is
/// left alone.
pub fn drop_btf(module: &mut [u8]) -> bool {
    let Some(at) = section_header(module, b".BTF") else {
        return false;
    };
    empty_section(module, at);
    true
}

/// Empties a module's table of ftrace call sites (`__mcount_loc`) and its relocations,
/// returning whether it had either.
///
/// For each call site a module lists, a kernel built with `FTRACE_MCOUNT_MAX_OFFSET` (Debian's
/// 6.1) looks up the symbol it lies in while loading the module, a scan of the module's whole
/// symbol table each time: 851 sites for ext4, over a minute where guest kernel code is
/// emulated. Without the table the module's functions cannot be traced with ftrace's function
/// tracer (their entries keep calling `__fentry__`, which returns at once); kprobes and trace
/// events still work. The relocations of the table go with it: the kernel applies a module's
/// relocations without checking them against their section's size. Files that are not
/// well-formed little-endian ELF64 are left alone.
pub fn drop_ftrace_callsites(module: &mut [u8]) -> bool {
    let table = section_header(module, b"__mcount_loc");
    let relocations = section_header(module, b".rela__mcount_loc");
    for at in [table, relocations].into_iter().flatten() {
        empty_section(module, at);
    }
    table.is_some() || relocations.is_some()
}

/// Sets the size of the section whose header is at `at` to 0.
fn empty_section(elf: &mut [u8], at: usize) {
    // sh_size is at offset 0x20 of an Elf64_Shdr.
    elf[at + 0x20..at + 0x28].fill(0);
}

/// Offset of the header of the section called `wanted`, if it has a non-zero size.
fn section_header(elf: &[u8], wanted: &[u8]) -> Option<usize> {
    headers_named(elf, wanted).find(|&at| le_u64(elf, at + 0x20) != Some(0))
}

/// Offsets of the headers of the sections called `wanted`, in order; none when `elf` is not a
/// well-formed little-endian ELF64.
fn headers_named<'a>(elf: &'a [u8], wanted: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    let table = || -> Option<(usize, usize, usize, &'a [u8])> {
        if elf.get(0..4)? != b"\x7fELF" || *elf.get(4)? != 2 || *elf.get(5)? != 1 {
            return None;
        }
        let shoff = usize::try_from(le_u64(elf, 0x28)?).ok()?;
        let shentsize = usize::from(le_u16(elf, 0x3a)?);
        let shnum = usize::from(le_u16(elf, 0x3c)?);
        let shstrndx = usize::from(le_u16(elf, 0x3e)?);
        if shentsize < 0x40 {
            return None;
        }
        let strtab = section_at(elf, shoff, shentsize, shstrndx)?;
        let str_off = usize::try_from(le_u64(elf, strtab + 0x18)?).ok()?;
        let str_size = usize::try_from(le_u64(elf, strtab + 0x20)?).ok()?;
        let names = elf.get(str_off..str_off.checked_add(str_size)?)?;
        Some((shoff, shentsize, shnum, names))
    };
    table()
        .into_iter()
        .flat_map(move |(shoff, shentsize, shnum, names)| {
            (0..shnum).filter_map(move |i| {
                let at = section_at(elf, shoff, shentsize, i)?;
                let name = names.get(le_u32(elf, at)? as usize..)?;
                let rest = name.strip_prefix(wanted)?;
                (rest.first() == Some(&0)).then_some(at)
            })
        })
}

/// Offset of section header `i`, if the whole header lies in `elf`.
fn section_at(elf: &[u8], shoff: usize, shentsize: usize, i: usize) -> Option<usize> {
    let at = shoff.checked_add(i.checked_mul(shentsize)?)?;
    (at.checked_add(0x40)? <= elf.len()).then_some(at)
}

/// The marker the kernel's `sign-file` appends after a module signature.
const SIG_MARKER: &[u8] = b"~Module signature appended~\n";
/// `struct module_signature`: algo, hash, id_type, signer_len, key_id_len,
/// 3 bytes of padding, then the signature length (big-endian u32).
const SIG_INFO_LEN: usize = 12;

/// Removes the appended signature from a module image, returning the bytes
/// of the unsigned module and whether a signature was removed.
///
/// Debian signs its modules, and a kernel with `CONFIG_MODULE_SIG` hashes
/// and RSA-verifies every signed module it loads, even when it does not
/// enforce signatures: millions of instructions per module, which on hosts
/// whose KVM emulates guest kernel code (~1 µs an instruction) adds minutes
/// to a boot. An unsigned module loads the same; the kernel only marks
/// itself tainted ("module verification failed"). A malformed trailer is
/// left alone so the kernel reports it as it would.
pub fn strip_signature(module: &mut Vec<u8>) -> bool {
    let Some(body_end) = module.len().checked_sub(SIG_MARKER.len()) else {
        return false;
    };
    if &module[body_end..] != SIG_MARKER || body_end < SIG_INFO_LEN {
        return false;
    }
    let info = &module[body_end - SIG_INFO_LEN..body_end];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    let signed_end = body_end - SIG_INFO_LEN;
    // The signer and key-id fields are zero for PKCS#7 signatures (id_type 2);
    // only that layout is understood here.
    if info[2] != 2 || info[3] != 0 || info[4] != 0 || sig_len > signed_end {
        return false;
    }
    module.truncate(signed_end - sig_len);
    true
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The `key=value` strings of a module's `.modinfo` section (ELF64 LE).
pub fn modinfo(elf: &[u8]) -> Result<Vec<(String, String)>, ModinfoError> {
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err(ModinfoError::NotElf);
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err(ModinfoError::Not64BitLittleEndian);
    }
    let bad = || ModinfoError::Malformed;
    let shoff = usize::try_from(le_u64(elf, 0x28).ok_or_else(bad)?).map_err(|_| bad())?;
    let shentsize = usize::from(le_u16(elf, 0x3a).ok_or_else(bad)?);
    let shnum = usize::from(le_u16(elf, 0x3c).ok_or_else(bad)?);
    let shstrndx = usize::from(le_u16(elf, 0x3e).ok_or_else(bad)?);
    if shentsize < 0x28 {
        return Err(bad());
    }
    let section = |i: usize| -> Option<(u32, &[u8])> {
        let at = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = le_u32(elf, at)?;
        let off = usize::try_from(le_u64(elf, at + 0x18)?).ok()?;
        let size = usize::try_from(le_u64(elf, at + 0x20)?).ok()?;
        Some((name, elf.get(off..off.checked_add(size)?)?))
    };
    let (_, shstrtab) = section(shstrndx).ok_or_else(bad)?;
    for i in 0..shnum {
        let (name_off, data) = section(i).ok_or_else(bad)?;
        let name = shstrtab
            .get(name_off as usize..)
            .and_then(|s| s.split(|&b| b == 0).next())
            .unwrap_or_default();
        if name == b".modinfo" {
            return Ok(data
                .split(|&b| b == 0)
                .filter_map(|s| std::str::from_utf8(s).ok())
                .filter_map(|s| s.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect());
        }
    }
    Err(ModinfoError::NoModinfo)
}

/// Why a module's `.modinfo` could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ModinfoError {
    #[error("not an ELF file")]
    NotElf,
    #[error("not a 64-bit little-endian ELF file")]
    Not64BitLittleEndian,
    #[error("malformed ELF section table")]
    Malformed,
    #[error("no .modinfo section")]
    NoModinfo,
}

/// The module names in the `depends=` entries of a modinfo list.
pub fn modinfo_depends(info: &[(String, String)]) -> Vec<String> {
    info.iter()
        .filter(|(k, _)| k == "depends")
        .flat_map(|(_, v)| v.split(','))
        .filter(|d| !d.trim().is_empty())
        .map(normalize)
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 LE relocatable with `.shstrtab` and `.modinfo`.
    pub(crate) fn fake_module(modinfo_entries: &[&str]) -> Vec<u8> {
        let mut modinfo = Vec::new();
        for e in modinfo_entries {
            modinfo.extend_from_slice(e.as_bytes());
            modinfo.push(0);
        }
        let shstrtab = b"\0.shstrtab\0.modinfo\0".to_vec();
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // 64-bit
        elf[5] = 1; // little endian
        elf[6] = 1;
        let shstr_off = elf.len();
        elf.extend_from_slice(&shstrtab);
        let modinfo_off = elf.len();
        elf.extend_from_slice(&modinfo);
        while elf.len() & 7 != 0 {
            elf.push(0);
        }
        let shoff = elf.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        sh(0, 0, 0);
        sh(1, shstr_off, shstrtab.len());
        sh(11, modinfo_off, modinfo.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        elf
    }

    /// A zstd frame holding `data` in one raw (stored) block.
    fn zstd_raw_frame(data: &[u8]) -> Vec<u8> {
        let mut f = vec![0x28, 0xb5, 0x2f, 0xfd]; // magic 0xFD2FB528
        if data.len() < 256 {
            f.push(0x20); // single segment, 1-byte content size
            f.push(data.len() as u8);
        } else {
            f.push(0x60); // single segment, 2-byte content size (minus 256)
            let size = u16::try_from(data.len() - 256).unwrap();
            f.extend_from_slice(&size.to_le_bytes());
        }
        let block = 1u32 | ((data.len() as u32) << 3); // last block, raw
        f.extend_from_slice(&block.to_le_bytes()[..3]);
        f.extend_from_slice(data);
        f
    }

    fn names(res: &Resolution) -> Vec<&str> {
        res.order.iter().map(|m| m.name.as_str()).collect()
    }

    fn pos(res: &Resolution, name: &str) -> usize {
        names(res).iter().position(|n| *n == name).unwrap()
    }

    const DEP: &str = "\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/a.ko: kernel/b.ko
kernel/b.ko: kernel/a.ko
kernel/needs_ghost.ko: kernel/ghost.ko
";

    fn signed(body: &[u8], sig: &[u8]) -> Vec<u8> {
        let mut m = body.to_vec();
        m.extend_from_slice(sig);
        m.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        m.extend_from_slice(&(sig.len() as u32).to_be_bytes());
        m.extend_from_slice(SIG_MARKER);
        m
    }

    /// A little-endian ELF64 with a null section, `sections` (name, size) and `.shstrtab`.
    fn elf_with(sections: &[(&str, u64)]) -> Vec<u8> {
        let mut names = vec![0u8];
        let mut name_at = Vec::new();
        for n in sections.iter().map(|s| s.0).chain([".shstrtab"]) {
            name_at.push(names.len() as u32);
            names.extend_from_slice(n.as_bytes());
            names.push(0);
        }
        let mut e = vec![0u8; 0x40];
        e[0..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        let str_off = e.len() as u64;
        e.extend_from_slice(&names);
        while !e.len().is_multiple_of(8) {
            e.push(0);
        }
        let shoff = e.len() as u64;
        let sh = |name: u32, off: u64, size: u64| {
            let mut h = vec![0u8; 0x40];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&off.to_le_bytes());
            h[0x20..0x28].copy_from_slice(&size.to_le_bytes());
            h
        };
        e.extend_from_slice(&sh(0, 0, 0));
        for (i, (_, size)) in sections.iter().enumerate() {
            e.extend_from_slice(&sh(name_at[i], 0, *size));
        }
        e.extend_from_slice(&sh(name_at[sections.len()], str_off, names.len() as u64));
        let count = sections.len() as u16 + 2;
        e[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        e[0x3a..0x3c].copy_from_slice(&0x40u16.to_le_bytes());
        e[0x3c..0x3e].copy_from_slice(&count.to_le_bytes());
        e[0x3e..0x40].copy_from_slice(&(count - 1).to_le_bytes());
        e
    }

    /// Sections: null, .text, .BTF, .shstrtab.
    fn elf_with_btf() -> Vec<u8> {
        elf_with(&[(".text", 16), (".BTF", 1234)])
    }

    /// The size of section `name` (the first so called, empty or not).
    fn size_of(elf: &[u8], name: &str) -> u64 {
        let at = headers_named(elf, name.as_bytes())
            .next()
            .expect("section exists");
        le_u64(elf, at + 0x20).unwrap()
    }

    #[test]
    fn ftrace_callsites_and_their_relocations_are_emptied() {
        let mut m = elf_with(&[
            (".text", 64),
            ("__mcount_loc", 80),
            (".rela__mcount_loc", 240),
            (".rela.text", 48),
            ("__mcount_loc_not", 8),
        ]);
        let before = m.clone();
        assert!(drop_ftrace_callsites(&mut m));
        assert_eq!(size_of(&m, "__mcount_loc"), 0);
        assert_eq!(size_of(&m, ".rela__mcount_loc"), 0);
        // Nothing else: not the text's relocations, not a section whose name only starts so.
        assert_eq!(size_of(&m, ".rela.text"), 48);
        assert_eq!(size_of(&m, "__mcount_loc_not"), 8);
        assert_eq!(size_of(&m, ".text"), 64);
        assert_eq!(m.iter().zip(&before).filter(|(a, b)| a != b).count(), 2);
        assert!(!drop_ftrace_callsites(&mut m));
        // Relocations left without their table (an odd file) still go.
        let mut odd = elf_with(&[("__mcount_loc", 0), (".rela__mcount_loc", 24)]);
        assert!(drop_ftrace_callsites(&mut odd));
        assert_eq!(size_of(&odd, ".rela__mcount_loc"), 0);
        // A module without call sites, and what is not an ELF, are left alone.
        let mut plain = elf_with_btf();
        let kept = plain.clone();
        assert!(!drop_ftrace_callsites(&mut plain));
        assert_eq!(plain, kept);
        assert!(!drop_ftrace_callsites(&mut b"not an elf".to_vec()));
    }

    #[test]
    fn btf_section_is_emptied() {
        let mut m = elf_with_btf();
        let at = section_header(&m, b".BTF").expect(".BTF found");
        assert_eq!(le_u64(&m, at + 0x20), Some(1234));
        let before = m.clone();
        assert!(drop_btf(&mut m));
        assert_eq!(le_u64(&m, at + 0x20), Some(0));
        // Only the size changed; a second pass finds nothing to do.
        assert_eq!(m.iter().zip(&before).filter(|(a, b)| a != b).count(), 2);
        assert!(!drop_btf(&mut m));
    }

    #[test]
    fn btf_drop_leaves_other_files_alone() {
        for mut bad in [
            Vec::new(),
            b"not an elf at all".to_vec(),
            {
                let mut e = elf_with_btf();
                e[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
                e
            },
            {
                let mut e = elf_with_btf();
                e.truncate(e.len() - 10);
                e
            },
        ] {
            let before = bad.clone();
            assert!(!drop_btf(&mut bad));
            assert_eq!(bad, before);
        }
    }

    #[test]
    fn strips_pkcs7_signature() {
        let body = b"\x7fELF module body";
        let mut m = signed(body, &[0x30; 700]);
        assert!(strip_signature(&mut m));
        assert_eq!(m, body);
        // Already unsigned: unchanged.
        assert!(!strip_signature(&mut m));
        assert_eq!(m, body);
    }

    #[test]
    fn leaves_malformed_signature_trailers_alone() {
        // Signature length larger than the file.
        let mut m = signed(b"tiny", &[1; 4]);
        let len_at = m.len() - SIG_MARKER.len() - 4;
        m[len_at..len_at + 4].copy_from_slice(&1_000_000u32.to_be_bytes());
        let before = m.clone();
        assert!(!strip_signature(&mut m));
        assert_eq!(m, before);
        // Not a PKCS#7 id type.
        let mut m = signed(b"body", &[1; 4]);
        let id_at = m.len() - SIG_MARKER.len() - SIG_INFO_LEN + 2;
        m[id_at] = 1;
        let before = m.clone();
        assert!(!strip_signature(&mut m));
        assert_eq!(m, before);
        // Just the marker, no room for the header.
        let mut m = SIG_MARKER.to_vec();
        assert!(!strip_signature(&mut m));
    }

    #[test]
    fn module_names() {
        assert_eq!(
            module_name("kernel/x/virtio-rng.ko").as_deref(),
            Some("virtio_rng")
        );
        assert_eq!(module_name("ext4.ko.xz").as_deref(), Some("ext4"));
        assert_eq!(module_name("a/b/jbd2.ko.zst").as_deref(), Some("jbd2"));
        assert_eq!(module_name("modules.dep"), None);
        assert_eq!(module_name(".ko"), None);
    }

    #[test]
    fn resolves_transitively_in_load_order() {
        let mut idx = ModuleIndex::from_modules_dep(Path::new("/m"), DEP);
        let res = resolve(
            &mut idx,
            &["virtio_pci", "virtio_blk", "virtio-rng", "ext4"],
        )
        .unwrap();
        let n = names(&res);
        assert_eq!(n.len(), 11, "{n:?}");
        // Each module exactly once.
        let mut sorted = n.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), n.len());
        assert!(pos(&res, "virtio_ring") < pos(&res, "virtio"));
        assert!(pos(&res, "virtio") < pos(&res, "virtio_pci"));
        assert!(pos(&res, "virtio_pci_modern_dev") < pos(&res, "virtio_pci"));
        assert!(pos(&res, "virtio_pci_legacy_dev") < pos(&res, "virtio_pci"));
        assert!(pos(&res, "virtio") < pos(&res, "virtio_blk"));
        for dep in ["crc16", "mbcache", "jbd2"] {
            assert!(pos(&res, dep) < pos(&res, "ext4"));
        }
        assert_eq!(*n.last().unwrap(), "ext4", "requested order is kept");
        assert_eq!(
            res.order[pos(&res, "virtio_blk")].path,
            PathBuf::from("kernel/drivers/block/virtio_blk.ko.xz")
        );
        assert_eq!(
            res.order[pos(&res, "virtio_rng")].path,
            PathBuf::from("kernel/drivers/char/hw_random/virtio-rng.ko")
        );
        assert!(res.missing.is_empty() && res.cycles.is_empty());
    }

    #[test]
    fn missing_modules_and_deps_are_reported() {
        let mut idx = ModuleIndex::from_modules_dep(Path::new("/m"), DEP);
        let res = resolve(
            &mut idx,
            &[
                "virtio_balloon",
                "virtio_ring",
                "needs_ghost",
                "nope",
                "nope",
            ],
        )
        .unwrap();
        assert_eq!(res.missing, ["virtio_balloon", "nope"]);
        assert_eq!(names(&res), ["virtio_ring", "needs_ghost"]);
        assert_eq!(
            res.missing_deps,
            [("needs_ghost".to_string(), "ghost".to_string())]
        );
    }

    #[test]
    fn cycles_terminate_and_are_reported() {
        let mut idx = ModuleIndex::from_modules_dep(Path::new("/m"), DEP);
        let res = resolve(&mut idx, &["a"]).unwrap();
        assert_eq!(names(&res), ["b", "a"]);
        assert_eq!(res.cycles, [("b".to_string(), "a".to_string())]);
    }

    #[test]
    fn reads_modinfo_from_elf() {
        let elf = fake_module(&[
            "license=GPL",
            "depends=virtio,virtio_ring,net-failover",
            "softdep=pre: crc32c",
        ]);
        let info = modinfo(&elf).unwrap();
        assert_eq!(info[0], ("license".to_string(), "GPL".to_string()));
        assert_eq!(
            modinfo_depends(&info),
            ["virtio", "virtio_ring", "net_failover"]
        );
        assert!(modinfo_depends(&modinfo(&fake_module(&["depends="])).unwrap()).is_empty());
        assert!(modinfo(b"not elf")
            .unwrap_err()
            .to_string()
            .contains("not an ELF"));
        let mut truncated = elf.clone();
        truncated.truncate(100);
        assert!(modinfo(&truncated).is_err());
    }

    fn temp_tree(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vessel-modules-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("kernel/drivers/virtio")).unwrap();
        fs::create_dir_all(dir.join("kernel/fs")).unwrap();
        dir
    }

    #[test]
    fn scans_tree_reads_compressed_modules_and_resolves() {
        let dir = temp_tree("scan");
        let ring = fake_module(&["depends="]);
        let virtio = fake_module(&["depends=virtio_ring"]);
        let blk = fake_module(&["depends=virtio,virtio_ring"]);
        fs::write(dir.join("kernel/drivers/virtio/virtio_ring.ko"), &ring).unwrap();
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut BufReader::new(virtio.as_slice()), &mut xz).unwrap();
        fs::write(dir.join("kernel/drivers/virtio/virtio.ko.xz"), &xz).unwrap();
        fs::write(
            dir.join("kernel/fs/virtio-blk.ko.zst"),
            zstd_raw_frame(&blk),
        )
        .unwrap();
        fs::write(dir.join("modules.order"), "not a module").unwrap();

        let mut idx = ModuleIndex::load(&dir).unwrap();
        assert_eq!(idx.len(), 3);
        let res = resolve(&mut idx, &["virtio_blk", "ext4"]).unwrap();
        assert_eq!(names(&res), ["virtio_ring", "virtio", "virtio_blk"]);
        assert_eq!(res.missing, ["ext4"]);
        assert_eq!(
            read_module(&dir.join("kernel/drivers/virtio/virtio.ko.xz")).unwrap(),
            virtio
        );
        assert_eq!(
            read_module(&dir.join("kernel/fs/virtio-blk.ko.zst")).unwrap(),
            blk
        );

        // A corrupt compressed module is a clear error naming the file.
        fs::write(dir.join("kernel/fs/broken.ko.xz"), b"garbage").unwrap();
        let err = read_module(&dir.join("kernel/fs/broken.ko.xz"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("broken.ko.xz") && err.contains("xz"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn modules_dep_file_wins_over_scanning() {
        let dir = temp_tree("dep");
        fs::write(
            dir.join("modules.dep"),
            "kernel/fs/x.ko: kernel/fs/y.ko\nkernel/fs/y.ko:\n",
        )
        .unwrap();
        let mut idx = ModuleIndex::load(&dir).unwrap();
        assert_eq!(idx.len(), 2);
        // Files are not even read: deps come from modules.dep.
        let res = resolve(&mut idx, &["x"]).unwrap();
        assert_eq!(names(&res), ["y", "x"]);
        assert_eq!(idx.path_of("y"), Some(Path::new("kernel/fs/y.ko")));
        fs::remove_dir_all(&dir).unwrap();
    }
}
