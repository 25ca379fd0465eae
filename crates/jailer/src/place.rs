//! Putting files into the jail without trusting what is already there. The jail's root belongs
//! to the VMM's uid, so a VMM that ran in it before (or anything else running as that uid) may
//! have left a symbolic or hard link where the jailer, as root, is about to write. As
//! Firecracker's jailer does for its exec file, every file the jailer writes in the jail is
//! opened with `O_NOFOLLOW` (a symbolic link fails with `Failed to open <path>: ...`), and a
//! file with more than one link is refused (`Detected hard link at: <path>`) before anything
//! is written to it; directories on the way are walked one component at a time, never through
//! a link.

use std::ffi::{CString, OsStr};
use std::fs::{File, Permissions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::{sys, JailError};

/// How an open failure reads: Firecracker says `Failed to open <path>` for its exec file and
/// `Failed to open file <path>` for the pid file.
#[derive(Debug, Clone, Copy)]
pub enum OpenMsg {
    Open,
    OpenFile,
}

impl OpenMsg {
    fn err(self, path: &Path) -> impl FnOnce(io::Error) -> JailError {
        let what = match self {
            OpenMsg::Open => format!("Failed to open {}", path.display()),
            OpenMsg::OpenFile => format!("Failed to open file {}", path.display()),
        };
        move |source| JailError::Io { what, source }
    }
}

fn name_cstr(name: &OsStr, path: &Path) -> Result<CString, JailError> {
    CString::new(name.as_bytes())
        .map_err(|_| JailError::Invalid(format!("{} holds a NUL byte", path.display())))
}

/// An open directory in the jail and its path (for messages).
#[derive(Debug)]
pub struct JailDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl JailDir {
    /// Opens the directory `path`; a symbolic link as its last component is refused.
    pub fn open(path: &Path) -> Result<JailDir, JailError> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(OpenMsg::Open.err(path))?;
        Ok(JailDir {
            fd: f.into(),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory `rel` (relative; `..` is refused) below this one, each missing level
    /// made with mode 0755; a symbolic link on the way fails with `Failed to open`.
    pub fn subdir(&self, rel: &Path) -> Result<JailDir, JailError> {
        let mut fd = self.fd.try_clone().map_err(OpenMsg::Open.err(&self.path))?;
        let mut path = self.path.clone();
        for c in rel.components() {
            let name = match c {
                Component::Normal(n) => n,
                Component::CurDir | Component::RootDir => continue,
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(JailError::Invalid(format!(
                        "{} leaves the jail",
                        self.path.join(rel).display()
                    )))
                }
            };
            path.push(name);
            let cname = name_cstr(name, &path)?;
            let flags = libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_RDONLY;
            fd = match sys::openat(fd.as_fd(), &cname, flags, 0) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    match sys::mkdirat(fd.as_fd(), &cname, 0o755) {
                        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                            return Err(JailError::Io {
                                what: format!("Failed to create directory {}", path.display()),
                                source: e,
                            })
                        }
                        _ => {}
                    }
                    sys::openat(fd.as_fd(), &cname, flags, 0)
                }
                r => r,
            }
            .map_err(OpenMsg::Open.err(&path))?;
        }
        Ok(JailDir { fd, path })
    }

    /// Sets this directory's permission bits and owner (through its descriptor, so a link
    /// swapped in meanwhile changes nothing).
    pub fn set_mode_owner(&self, mode: u32, uid: u32, gid: u32) -> Result<(), JailError> {
        sys::fchmod(self.fd.as_fd(), mode).map_err(|source| JailError::Io {
            what: format!("Failed to change permissions on {}", self.path.display()),
            source,
        })?;
        std::os::unix::fs::fchown(&self.fd, Some(uid), Some(gid)).map_err(|source| JailError::Io {
            what: format!("Failed to change owner for {}", self.path.display()),
            source,
        })
    }

    /// Opens `name` here for writing, made with `mode` if missing, as Firecracker's jailer
    /// opens its exec file's copy: `O_NOFOLLOW`, then a file with more than one link is
    /// refused. Nothing is written or truncated before those checks.
    pub fn create_file(&self, name: &OsStr, mode: u32, msg: OpenMsg) -> Result<File, JailError> {
        let path = self.path.join(name);
        let cname = name_cstr(name, &path)?;
        // O_NONBLOCK: a FIFO left there fails (ENXIO) instead of blocking the jailer.
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        let f =
            File::from(sys::openat(self.fd.as_fd(), &cname, flags, mode).map_err(msg.err(&path))?);
        let m = f.metadata().map_err(msg.err(&path))?;
        if m.nlink() > 1 {
            return Err(JailError::Invalid(format!(
                "Detected hard link at: {}",
                path.display()
            )));
        }
        if !m.is_file() {
            return Err(JailError::Invalid(format!(
                "{} is not a file",
                path.display()
            )));
        }
        Ok(f)
    }

    /// Opens `name` here as a mount point for a bind mount: a directory or an (empty, new)
    /// file, made where missing, never through a symbolic link. The descriptor is `O_PATH`.
    pub fn mount_point(&self, name: &OsStr, dir: bool) -> Result<OwnedFd, JailError> {
        let path = self.path.join(name);
        if dir {
            return self.subdir(Path::new(name)).map(|d| d.fd);
        }
        let cname = name_cstr(name, &path)?;
        let flags = libc::O_RDONLY | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        drop(sys::openat(self.fd.as_fd(), &cname, flags, 0o600).map_err(OpenMsg::Open.err(&path))?);
        self.reopen(name)
    }

    /// `name` here as an `O_PATH` descriptor (following a mount on it, not a symbolic link).
    pub fn reopen(&self, name: &OsStr) -> Result<OwnedFd, JailError> {
        let path = self.path.join(name);
        let cname = name_cstr(name, &path)?;
        sys::openat(self.fd.as_fd(), &cname, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .map_err(OpenMsg::Open.err(&path))
    }
}

/// The path through which a mount call reaches what `fd` is open on.
pub fn fd_path(fd: &OwnedFd) -> CString {
    // A decimal number never holds a NUL byte.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// Copies `src` to `name` in `dir` as Firecracker's jailer copies its exec file (a copy, not a
/// link: two VMMs share no pages of it): opened as [`JailDir::create_file`] does, with the
/// source's permission bits, owned by `owner` when given, its old content replaced.
pub fn copy_into(
    src: &Path,
    dir: &JailDir,
    name: &OsStr,
    owner: Option<(u32, u32)>,
) -> Result<(), JailError> {
    let dest = dir.path().join(name);
    let mut from = File::open(src).map_err(OpenMsg::Open.err(src))?;
    let mode = from
        .metadata()
        .map_err(|source| JailError::Io {
            what: format!("Cannot get metadata for a file: {}", src.display()),
            source,
        })?
        .mode()
        & 0o777;
    let mut to = dir.create_file(name, mode, OpenMsg::Open)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&to, Some(uid), Some(gid)).map_err(|source| JailError::Io {
            what: format!("Failed to change owner for {}", dest.display()),
            source,
        })?;
    }
    let copy_err = |source| JailError::Io {
        what: format!("Failed to copy {} to {}", src.display(), dest.display()),
        source,
    };
    to.set_permissions(Permissions::from_mode(mode))
        .map_err(copy_err)?;
    to.set_len(0).map_err(copy_err)?;
    io::copy(&mut from, &mut to).map_err(copy_err)?;
    Ok(())
}

/// Writes `pid` (no newline, as Firecracker's jailer) to `name` in `dir`.
pub fn write_pid_file(dir: &JailDir, name: &OsStr, pid: libc::pid_t) -> Result<(), JailError> {
    use std::io::Write;
    let mut f = dir.create_file(name, 0o644, OpenMsg::OpenFile)?;
    let path = dir.path().join(name);
    let write_err = |source| JailError::Io {
        what: format!("Failed to write to {}", path.display()),
        source,
    };
    f.set_len(0).map_err(write_err)?;
    f.write_all(pid.to_string().as_bytes()).map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vessel-place-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn copies_replace_content_and_keep_the_mode() {
        let d = scratch("copy");
        fs::write(d.join("src"), b"new").unwrap();
        fs::set_permissions(d.join("src"), Permissions::from_mode(0o750)).unwrap();
        let jail = JailDir::open(&d).unwrap();
        fs::write(d.join("dst"), b"older and longer").unwrap();
        copy_into(&d.join("src"), &jail, OsStr::new("dst"), None).unwrap();
        assert_eq!(fs::read(d.join("dst")).unwrap(), b"new");
        assert_eq!(fs::metadata(d.join("dst")).unwrap().mode() & 0o777, 0o750);
        let sub = jail.subdir(Path::new("lib/x86_64")).unwrap();
        copy_into(&d.join("src"), &sub, OsStr::new("libc.so"), None).unwrap();
        assert_eq!(fs::read(d.join("lib/x86_64/libc.so")).unwrap(), b"new");
        assert!(jail.subdir(Path::new("../up")).is_err());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn links_at_the_destination_are_refused_and_left_alone() {
        let d = scratch("links");
        let outside = d.join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("target"), b"precious").unwrap();
        fs::write(d.join("src"), b"vmm").unwrap();
        let root = d.join("root");
        fs::create_dir_all(&root).unwrap();
        let jail = JailDir::open(&root).unwrap();

        std::os::unix::fs::symlink(outside.join("target"), root.join("vmm")).unwrap();
        let e = copy_into(&d.join("src"), &jail, OsStr::new("vmm"), None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("Failed to open {}:", root.join("vmm").display())),
            "{e}"
        );
        let e = write_pid_file(&jail, OsStr::new("vmm"), 7).unwrap_err();
        assert!(
            e.to_string().starts_with(&format!(
                "Failed to open file {}:",
                root.join("vmm").display()
            )),
            "{e}"
        );

        fs::hard_link(outside.join("target"), root.join("hard")).unwrap();
        let e = copy_into(&d.join("src"), &jail, OsStr::new("hard"), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("Detected hard link at: {}", root.join("hard").display())
        );
        let e = write_pid_file(&jail, OsStr::new("hard"), 7).unwrap_err();
        assert!(e.to_string().starts_with("Detected hard link at:"), "{e}");

        // A linked directory on the way is not followed either.
        std::os::unix::fs::symlink(&outside, root.join("lib")).unwrap();
        let e = jail.subdir(Path::new("lib/sub")).unwrap_err();
        assert!(e.to_string().starts_with("Failed to open"), "{e}");
        assert!(jail.mount_point(OsStr::new("vmm"), false).is_err());

        assert_eq!(fs::read(outside.join("target")).unwrap(), b"precious");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
        // A fresh pid file is written whole.
        write_pid_file(&jail, OsStr::new("vmm.pid"), 1234).unwrap();
        write_pid_file(&jail, OsStr::new("vmm.pid"), 56).unwrap();
        assert_eq!(fs::read_to_string(root.join("vmm.pid")).unwrap(), "56");
        fs::remove_dir_all(&d).unwrap();
    }
}
