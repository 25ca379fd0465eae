//! Where images live on disk, how a finished build is recorded (the stamp),
//! and atomic writes so an interrupted build never leaves a file that looks
//! complete.
//!
//! Layout under [`cache_dir`]:
//! - `images/<name>/` the outputs (kernel, `initrd.cpio`, `System.map`, and
//!   for minimal also `bzImage`) and the `stamp` describing them;
//! - `work/<name>/` downloads, extracted packages and the kernel build tree.

use std::collections::BTreeMap;
use std::env;
use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::IoContext;
use crate::ImageError;

/// Bump when the layout of the outputs or the way they are produced changes
/// (cpio writer, initramfs contents, module list...): every image rebuilds.
pub const LAYOUT_VERSION: u32 = 2;

/// The stamp's file name inside an image directory.
pub const STAMP_FILE: &str = "stamp";

/// The root of Vessel's cache: `$VESSEL_CACHE`, else `$XDG_CACHE_HOME/vessel`,
/// else `$HOME/.cache/vessel` (else `<tmp>/vessel-cache`). Never the repo.
pub fn cache_dir() -> PathBuf {
    cache_dir_from(
        env::var_os("VESSEL_CACHE"),
        env::var_os("XDG_CACHE_HOME"),
        env::var_os("HOME"),
    )
}

/// [`cache_dir`] from explicit variable values (empty counts as unset).
///
/// A relative `VESSEL_CACHE` is taken relative to the current directory (the
/// user asked for it); relative `XDG_CACHE_HOME`/`HOME` are ignored, as the
/// XDG base directory spec requires.
pub fn cache_dir_from(
    vessel_cache: Option<OsString>,
    xdg_cache_home: Option<OsString>,
    home: Option<OsString>,
) -> PathBuf {
    let non_empty = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = non_empty(vessel_cache) {
        if dir.is_absolute() {
            return dir;
        }
        return env::current_dir().map(|cwd| cwd.join(&dir)).unwrap_or(dir);
    }
    if let Some(dir) = non_empty(xdg_cache_home).filter(|d| d.is_absolute()) {
        return dir.join("vessel");
    }
    if let Some(dir) = non_empty(home).filter(|d| d.is_absolute()) {
        return dir.join(".cache").join("vessel");
    }
    env::temp_dir().join("vessel-cache")
}

/// 64-bit FNV-1a: a stable content hash for the stamp (change detection only).
pub fn content_hash(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// What an image directory holds: `key=value` lines, sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stamp {
    entries: BTreeMap<String, String>,
}

impl Stamp {
    /// An empty stamp.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` (no `=` or newline) to `value` (no newline).
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        let value: String = value.into();
        self.entries
            .insert(key.replace(['=', '\n'], "_"), value.replace('\n', " "));
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(String::as_str)
    }

    /// True when every `(key, value)` of `expected` is in this stamp.
    pub fn matches(&self, expected: &[(&str, &str)]) -> bool {
        expected.iter().all(|(k, v)| self.get(k) == Some(*v))
    }

    /// Parses the text form; lines without `=` are ignored.
    pub fn parse(text: &str) -> Self {
        let entries = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Stamp { entries }
    }

    /// The text form.
    pub fn render(&self) -> String {
        self.entries
            .iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect()
    }

    /// Reads the stamp at `path`; a missing or unreadable one is empty.
    pub fn load(path: &Path) -> Self {
        fs::read_to_string(path)
            .map(|t| Stamp::parse(&t))
            .unwrap_or_default()
    }
}

/// The initramfs file name in an image directory.
pub const INITRD_FILE: &str = "initrd.cpio";
/// The System.map file name in an image directory.
pub const SYSTEM_MAP_FILE: &str = "System.map";
/// The bzImage file name in an image directory (minimal: the same kernel as
/// `vmlinux`, for boot loaders such as GRUB that need a bzImage).
pub const BZIMAGE_FILE: &str = "bzImage";

/// The directories of one image: its outputs and its work area.
#[derive(Debug, Clone)]
pub(crate) struct ImageDirs {
    /// `images/<name>`: outputs and stamp.
    pub image: PathBuf,
    /// `work/<name>`: downloads, unpacked packages, build trees.
    pub work: PathBuf,
    /// The kernel's file name (`vmlinuz` or `vmlinux`).
    kernel_file: &'static str,
}

impl ImageDirs {
    pub fn new(root: &Path, name: &str, kernel_file: &'static str) -> Self {
        ImageDirs {
            image: root.join("images").join(name),
            work: root.join("work").join(name),
            kernel_file,
        }
    }

    pub fn kernel(&self) -> PathBuf {
        self.image.join(self.kernel_file)
    }

    pub fn initrd(&self) -> PathBuf {
        self.image.join(INITRD_FILE)
    }

    pub fn system_map(&self) -> PathBuf {
        self.image.join(SYSTEM_MAP_FILE)
    }

    pub fn bzimage(&self) -> PathBuf {
        self.image.join(BZIMAGE_FILE)
    }

    pub fn stamp(&self) -> PathBuf {
        self.image.join(STAMP_FILE)
    }

    /// True when the kernel and the initrd exist (System.map is optional:
    /// Debian ships only a placeholder).
    pub fn outputs_exist(&self) -> bool {
        self.kernel().is_file() && self.initrd().is_file()
    }

    /// The finished image's paths; `system_map` and `bzimage` only when
    /// there is one.
    pub fn paths(&self) -> crate::ImagePaths {
        let map = self.system_map();
        let bzimage = self.bzimage();
        crate::ImagePaths {
            kernel: self.kernel(),
            initrd: self.initrd(),
            system_map: map.is_file().then_some(map),
            bzimage: bzimage.is_file().then_some(bzimage),
        }
    }
}

/// Creates `dir` and its parents.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), ImageError> {
    fs::create_dir_all(dir).ctx("create directory", dir)
}

/// Removes `path` (file or tree) if it exists.
pub(crate) fn remove_path(path: &Path) -> Result<(), ImageError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).ctx("remove", path),
        Ok(_) => fs::remove_file(path).ctx("remove", path),
        Err(_) => Ok(()),
    }
}

/// The temporary sibling `path` is written to before the rename.
fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `data` to `path` atomically: a temporary sibling, fsync, rename.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut f = fs::File::create(&tmp).ctx("create", &tmp)?;
        f.write_all(data).ctx("write", &tmp)?;
        f.sync_all().ctx("sync", &tmp)?;
        fs::rename(&tmp, path).ctx("rename into place", path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Copies `src` to `dst` atomically (temporary sibling, fsync, rename).
pub(crate) fn copy_atomic(src: &Path, dst: &Path) -> Result<(), ImageError> {
    let tmp = temp_sibling(dst);
    let result = (|| {
        fs::copy(src, &tmp).ctx("copy", src)?;
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .ctx("sync", &tmp)?;
        fs::rename(&tmp, dst).ctx("rename into place", dst)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Moves a finished file (already complete, in the same filesystem) into place.
pub(crate) fn rename_into_place(src: &Path, dst: &Path) -> Result<(), ImageError> {
    fs::File::open(src)
        .and_then(|f| f.sync_all())
        .ctx("sync", src)?;
    fs::rename(src, dst).ctx("rename into place", dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<OsString> {
        Some(OsString::from(s))
    }

    #[test]
    fn cache_dir_precedence() {
        assert_eq!(
            cache_dir_from(os("/v"), os("/x"), os("/h")),
            PathBuf::from("/v")
        );
        assert_eq!(
            cache_dir_from(None, os("/x"), os("/h")),
            PathBuf::from("/x/vessel")
        );
        assert_eq!(
            cache_dir_from(os(""), os(""), os("/h")),
            PathBuf::from("/h/.cache/vessel"),
            "empty variables count as unset"
        );
        assert_eq!(
            cache_dir_from(None, os("relative"), os("/h")),
            PathBuf::from("/h/.cache/vessel"),
            "relative XDG_CACHE_HOME is ignored"
        );
        assert_eq!(
            cache_dir_from(None, None, None),
            env::temp_dir().join("vessel-cache")
        );
        let rel = cache_dir_from(os("rel/cache"), None, None);
        assert!(rel.is_absolute() && rel.ends_with("rel/cache"), "{rel:?}");
    }

    #[test]
    fn content_hash_is_stable_and_sensitive() {
        // FNV-1a 64 reference values.
        assert_eq!(content_hash(b""), "cbf29ce484222325");
        assert_eq!(content_hash(b"a"), "af63dc4c8601ec8c");
        assert_ne!(content_hash(b"CONFIG_A=y\n"), content_hash(b"CONFIG_A=n\n"));
    }

    #[test]
    fn stamp_round_trips_and_matches() {
        let mut s = Stamp::new();
        s.set("layout", "1");
        s.set("init", "abc");
        s.set("kernel.package", "linux-image-6.1.0-1-amd64 6.1.1-1\nx");
        let parsed = Stamp::parse(&s.render());
        assert_eq!(parsed, s);
        assert_eq!(
            parsed.get("kernel.package"),
            Some("linux-image-6.1.0-1-amd64 6.1.1-1 x")
        );
        assert!(parsed.matches(&[("layout", "1"), ("init", "abc")]));
        assert!(!parsed.matches(&[("layout", "2")]));
        assert!(!parsed.matches(&[("config", "abc")]), "missing key");
        assert!(s.render().starts_with("init=abc\n"), "sorted keys");
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = env::temp_dir().join(format!("vessel-image-atomic-{}", std::process::id()));
        ensure_dir(&dir).unwrap();
        let path = dir.join("out");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let copy = dir.join("copy");
        copy_atomic(&path, &copy).unwrap();
        assert_eq!(fs::read(&copy).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // A write into a missing directory fails cleanly.
        let err = write_atomic(&dir.join("missing/out"), b"x").unwrap_err();
        assert!(err.to_string().contains("create"), "{err}");
        remove_path(&dir).unwrap();
        assert!(!dir.exists());
    }
}
