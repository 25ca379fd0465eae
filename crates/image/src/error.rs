//! The crate's single error type. Every variant renders as one line.

use std::io;
use std::path::{Path, PathBuf};

/// Why building or reading a guest image failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image name is not one Vessel knows.
    #[error("unknown image {0:?}: expected one of: debian, minimal")]
    UnknownImage(String),

    /// A filesystem operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "read" or "create directory".
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },

    /// An external command could not be started or exited with an error.
    #[error("{command} failed: {detail}")]
    Command {
        /// The command line, shortened to what identifies it.
        command: String,
        /// Exit status and the tail of its error output, on one line.
        detail: String,
    },

    /// Host tools the build needs are not installed.
    #[error(
        "missing host tools: {tools} (install them with: apt-get install -y {packages}; \
         or run scripts/install-deps.sh)"
    )]
    MissingTools {
        /// The missing programs or headers.
        tools: String,
        /// The Debian packages providing them.
        packages: String,
    },

    /// An apt package did not have the expected shape (dependency, files...).
    #[error("package {package}: {reason}")]
    Package {
        /// The package name.
        package: String,
        /// What was wrong with it.
        reason: String,
    },

    /// Options of guest/minimal.config that Kconfig dropped from .config.
    #[error(
        "kernel config: options of guest/minimal.config missing from {}: {options}",
        config.display()
    )]
    ConfigNotApplied {
        /// The resulting .config.
        config: PathBuf,
        /// The options that did not survive, as `CONFIG_X=want (got ...)`.
        options: String,
    },

    /// A kernel module could not be read, decompressed or resolved.
    #[error("kernel module {module}: {reason}")]
    Module {
        /// The module (name or file).
        module: String,
        /// What went wrong.
        reason: String,
    },

    /// A cpio archive could not be written or parsed.
    #[error("cpio: {0}")]
    Cpio(String),
}

impl ImageError {
    /// An [`ImageError::Io`] for `path`.
    pub(crate) fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        ImageError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Adds path context to `std::io` results.
pub(crate) trait IoContext<T> {
    /// Maps an I/O error to [`ImageError::Io`] for `path`.
    fn ctx(self, action: &'static str, path: &Path) -> Result<T, ImageError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, action: &'static str, path: &Path) -> Result<T, ImageError> {
        self.map_err(|e| ImageError::io(action, path, e))
    }
}
