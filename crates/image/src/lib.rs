//! vessel-image: the guest kit. It owns everything Vessel boots inside a VM:
//! fetching Debian packages with apt, building the guest images
//! (`debian`: Debian's stock kernel plus its virtio/ext4 modules; `minimal`:
//! upstream Linux built from `linux-source-6.1` with guest/minimal.config;
//! `kata`: the same plus guest/kata.config, for Kata Containers' agent),
//! writing the shared initramfs (busybox + guest/init.sh) as an uncompressed
//! newc cpio, and caching the results under [`cache_dir`] (never in the repo).
//!
//! The entry point is [`build`], which `vessel image build NAME` and
//! `vessel run --image NAME` call; it returns at once when the cached image
//! is up to date.

pub mod cache;
pub mod cpio;
mod deb;
mod debian;
mod error;
pub mod init;
pub mod kconfig;
mod minimal;
pub mod modules;
mod name;
mod tools;

use std::path::PathBuf;

pub use cache::cache_dir;
pub use debian::WANTED_MODULES;
pub use error::ImageError;
pub use init::READY_LINE;
pub use name::ImageName;

/// Where a built image's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePaths {
    /// The kernel: a bzImage (`vmlinuz`, debian) or a stripped ELF
    /// (`vmlinux`, minimal) with a PVH entry note.
    pub kernel: PathBuf,
    /// The initramfs: an uncompressed newc cpio archive.
    pub initrd: PathBuf,
    /// The kernel's System.map, when there is one: always for minimal; for
    /// debian only if the package ships a real one (Debian's
    /// linux-image-*-amd64 has just a placeholder, the real map is in the
    /// 850 MB -dbg package, so today this is `None`).
    pub system_map: Option<PathBuf>,
    /// The same kernel as a bzImage, when the image has one besides `kernel`
    /// (minimal: `bzImage`, LZ4-compressed, for boot loaders such as GRUB;
    /// debian: `None`, its `kernel` is already a bzImage).
    pub bzimage: Option<PathBuf>,
}

/// Builds image `name` under [`cache_dir`] (or returns the cached one when it
/// is up to date) and returns its paths. `log` receives progress lines.
pub fn build(name: ImageName, log: &mut dyn FnMut(&str)) -> Result<ImagePaths, ImageError> {
    build_in(&cache_dir(), name, log)
}

/// [`build`] with an explicit cache root.
pub fn build_in(
    root: &std::path::Path,
    name: ImageName,
    log: &mut dyn FnMut(&str),
) -> Result<ImagePaths, ImageError> {
    match name {
        ImageName::Debian => debian::build(root, log),
        ImageName::Minimal => minimal::build(minimal::MINIMAL, root, log),
        ImageName::Kata => minimal::build(minimal::KATA, root, log),
    }
}
