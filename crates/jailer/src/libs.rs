//! Putting the VMM binary into the jail: the exec file, and, when it is dynamically linked, its
//! program interpreter and shared libraries at the paths the loader will look for them
//! (a static build needs nothing else). [`crate::place`] copies them in.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::JailError;

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> JailError {
    move |source| JailError::Io { what, source }
}

/// The program interpreter (`PT_INTERP`) of a 64-bit little-endian ELF file, or `None` for a
/// static executable (or something that is not such an ELF file).
pub fn interpreter(elf: &[u8]) -> Option<PathBuf> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    if elf.get(0..4)? != b"\x7fELF" || *elf.get(4)? != 2 || *elf.get(5)? != 1 {
        return None;
    }
    let phoff = usize::try_from(u64_at(32)?).ok()?;
    let phentsize = usize::from(u16_at(54)?);
    let phnum = usize::from(u16_at(56)?);
    if phentsize < 56 {
        return None;
    }
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let p_type = u32::from_le_bytes(elf.get(ph..ph + 4)?.try_into().ok()?);
        if p_type == 3 {
            // PT_INTERP: a NUL-terminated path at p_offset, p_filesz bytes.
            let off = usize::try_from(u64_at(ph + 8)?).ok()?;
            let len = usize::try_from(u64_at(ph + 32)?).ok()?;
            let bytes = elf.get(off..off.checked_add(len)?)?;
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            let s = std::str::from_utf8(&bytes[..end]).ok()?;
            return Some(PathBuf::from(s));
        }
    }
    None
}

/// The files named in the dynamic loader's `--list` output (`ldd`'s format): the libraries
/// after `=>` and lines that are a path themselves (the loader). Libraries without a file
/// (the vDSO) are skipped; a library that was `not found` is an error.
pub fn parse_list(text: &str) -> Result<Vec<PathBuf>, JailError> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path_part = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(JailError::Invalid(format!(
                        "the exec file needs {} and the loader cannot find it",
                        name.trim()
                    )));
                }
                rest
            }
            None => line,
        };
        let path = path_part.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            let p = PathBuf::from(path);
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

/// The files a dynamically linked `exe` needs at run time (empty for a static one), as the
/// loader itself resolves them.
pub fn runtime_files(exe: &Path) -> Result<Vec<PathBuf>, JailError> {
    let mut head = Vec::new();
    fs::File::open(exe)
        .and_then(|f| f.take(64 * 1024).read_to_end(&mut head))
        .map_err(io_err(format!("read {}", exe.display())))?;
    let Some(interp) = interpreter(&head) else {
        return Ok(Vec::new());
    };
    let out = Command::new(&interp)
        .arg("--list")
        .arg(exe)
        .env_clear()
        .output()
        .map_err(io_err(format!(
            "run the loader {} --list {}",
            interp.display(),
            exe.display()
        )))?;
    if !out.status.success() {
        return Err(JailError::Invalid(format!(
            "{} --list {} failed: {}",
            interp.display(),
            exe.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let mut files = parse_list(&String::from_utf8_lossy(&out.stdout))?;
    if !files.contains(&interp) {
        files.push(interp);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_list_is_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_list(text).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        let e = parse_list("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(e.to_string().contains("libfoo.so.1"), "{e}");
    }

    #[test]
    fn interpreter_of_this_test_binary_matches_the_loader() {
        let me = std::env::current_exe().unwrap();
        let bytes = fs::read(&me).unwrap();
        // Test binaries are built like the VMM: dynamically linked unless crt-static is on.
        match interpreter(&bytes) {
            Some(p) => {
                assert!(p.is_absolute(), "{p:?}");
                assert!(p.exists(), "{p:?}");
                let files = runtime_files(&me).unwrap();
                assert!(files.contains(&p), "{files:?}");
                assert!(files.iter().any(|f| f.to_string_lossy().contains("libc")));
            }
            None => assert!(runtime_files(&me).unwrap().is_empty()),
        }
        assert_eq!(interpreter(b"not an elf"), None);
        assert_eq!(interpreter(&bytes[..40]), None);
    }

    #[test]
    fn interpreter_in_a_handmade_elf() {
        let mut f = vec![0u8; 0x200];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&2u16.to_le_bytes());
        // A PT_LOAD, then a PT_INTERP at 0x100.
        f[64..68].copy_from_slice(&1u32.to_le_bytes());
        let ph = 64 + 56;
        f[ph..ph + 4].copy_from_slice(&3u32.to_le_bytes());
        f[ph + 8..ph + 16].copy_from_slice(&0x100u64.to_le_bytes());
        f[ph + 32..ph + 40].copy_from_slice(&11u64.to_le_bytes());
        f[0x100..0x10b].copy_from_slice(b"/lib/ld.so\0");
        assert_eq!(interpreter(&f), Some(PathBuf::from("/lib/ld.so")));
        // A PT_INTERP pointing outside the file.
        f[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes());
        assert_eq!(interpreter(&f), None);
        // No PT_INTERP, and program headers that run past the end of the file.
        f[ph..ph + 4].copy_from_slice(&0u32.to_le_bytes());
        f[56..58].copy_from_slice(&0xffffu16.to_le_bytes());
        assert_eq!(interpreter(&f), None);
    }
}
