//! The crate's error type: everything that can go wrong while loading a guest kernel and
//! writing the boot structures.

use std::fmt;

use thiserror::Error;

/// What can go wrong while loading a kernel or initrd, or writing the boot tables.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file has no bytes at all.
    #[error("the kernel file is empty")]
    EmptyKernel,
    /// The kernel file is neither a bzImage nor an ELF.
    #[error("not a Linux kernel: neither a bzImage nor an ELF vmlinux")]
    NotAKernel,
    /// Reading the kernel file failed.
    #[error("cannot read the kernel file")]
    KernelIo(#[source] std::io::Error),
    /// The bzImage ends before the end its setup header announces.
    #[error("truncated bzImage: its setup header describes {expected} bytes but the file has only {actual}")]
    TruncatedBzImage {
        /// Bytes the header says the file holds (at least).
        expected: u64,
        /// Bytes the file holds.
        actual: u64,
    },
    /// The bzImage speaks a boot protocol older than the 64-bit entry needs.
    #[error("bzImage boot protocol {} is too old: Vessel enters bzImages in 64-bit mode, which needs protocol 2.12 or later (Linux 3.8+)", ProtocolVersion(*.0))]
    BzImageTooOld(u16),
    /// The bzImage has no 64-bit entry point.
    #[error("bzImage has no 64-bit entry point (XLF_KERNEL_64 is clear in xloadflags): Vessel boots only 64-bit kernels")]
    BzImageNot64Bit,
    /// The bzImage must be loaded below 1 MiB (an old zImage).
    #[error("bzImage cannot be loaded at 1 MiB (LOADED_HIGH is clear): zImage kernels are not supported")]
    BzImageNotLoadedHigh,
    /// The ELF file is not a 64-bit little-endian x86_64 image.
    #[error("ELF kernel is not an x86_64 image: {0}")]
    ElfNotX86_64(String),
    /// The ELF file's headers are inconsistent or point outside the file.
    #[error("malformed ELF kernel: {0}")]
    MalformedElf(String),
    /// The kernel (with the memory it needs to decompress) is larger than guest RAM.
    #[error("kernel needs guest memory up to {} but the guest has {} of low RAM", Size(*.needed_end), Size(*.ram_end))]
    KernelTooLarge {
        /// First byte past what the kernel needs.
        needed_end: u64,
        /// End of the RAM below the MMIO gap.
        ram_end: u64,
    },
    /// The kernel loader refused the image for a reason not caught by the checks above.
    #[error("cannot load the {format} kernel")]
    KernelLoad {
        /// "bzImage" or "ELF".
        format: &'static str,
        /// What the loader reported.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// Reading the initrd file failed.
    #[error("cannot read the initrd file")]
    InitrdIo(#[source] std::io::Error),
    /// The initrd file has no bytes at all.
    #[error("the initrd file is empty")]
    EmptyInitrd,
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error("initrd of {} does not fit in {} of guest memory (it must lie between the kernel's end at {:#x} and {:#x})", Size(*.size), Size(*.mem_size), .min_start, .max_end)]
    InitrdTooLarge {
        /// Size of the initrd.
        size: u64,
        /// Guest RAM size.
        mem_size: u64,
        /// Lowest address the initrd may start at (end of the kernel).
        min_start: u64,
        /// Highest address the initrd may end at.
        max_end: u64,
    },
    /// The initrd range given to `configure_boot` is not in guest RAM below 4 GiB.
    #[error("initrd at {addr:#x} ({size} bytes) is not in guest RAM below 4 GiB")]
    InitrdOutOfRam {
        /// Start of the range.
        addr: u64,
        /// Its length.
        size: u64,
    },
    /// The command line is longer than the kernel (or Vessel) accepts.
    #[error(
        "kernel command line of {len} bytes is longer than the {max} bytes the kernel accepts"
    )]
    CmdlineTooLong {
        /// Length of the command line given.
        len: usize,
        /// The limit, not counting the terminating NUL.
        max: usize,
    },
    /// The command line cannot be passed to the kernel.
    #[error("invalid kernel command line: {0}")]
    InvalidCmdline(String),
    /// The vCPU count is outside what the ACPI and MP tables can describe.
    #[error("{0} vCPUs requested: the ACPI and MP tables describe 1 to 255 vCPUs")]
    BadCpuCount(u32),
    /// A table does not fit in the guest-physical range reserved for it.
    #[error("the {what} ({size} bytes) does not fit in the {space} reserved for it")]
    TableTooLarge {
        /// Which table.
        what: &'static str,
        /// Its size in bytes.
        size: usize,
        /// The range it must fit in, in words.
        space: &'static str,
    },
    /// The host could not supply random bytes (the guest's RNG seed, its VM generation ID).
    #[error("cannot get random bytes for the guest from the host (getrandom)")]
    RngSeed(#[source] std::io::Error),
    /// Writing a boot structure to guest memory failed.
    #[error("cannot write the {what} to guest memory at {addr:#x}")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// Where it was to go.
        addr: u64,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl BootError {
    /// A closure mapping a write error to [`BootError::GuestWrite`].
    pub(crate) fn write<E: std::error::Error + Send + Sync + 'static>(
        what: &'static str,
        addr: u64,
    ) -> impl FnOnce(E) -> Self {
        move |e| BootError::GuestWrite {
            what,
            addr,
            source: Box::new(e),
        }
    }
}

/// A byte count shown in the unit a person would use ("512 KiB", "64 MiB", "1.5 GiB").
pub(crate) struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
        for (name, unit) in UNITS {
            if self.0 >= unit {
                return if self.0.is_multiple_of(unit) {
                    write!(f, "{} {name}", self.0 / unit)
                } else {
                    write!(f, "{:.1} {name}", self.0 as f64 / unit as f64)
                };
            }
        }
        write!(f, "{} bytes", self.0)
    }
}

/// A boot protocol version as the kernel documentation writes it ("2.12").
struct ProtocolVersion(u16);

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.0 >> 8, self.0 & 0xff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_naturally() {
        assert_eq!(Size(64 << 20).to_string(), "64 MiB");
        assert_eq!(Size(3 << 29).to_string(), "1.5 GiB");
        assert_eq!(Size(512 << 10).to_string(), "512 KiB");
        assert_eq!(Size(100).to_string(), "100 bytes");
        assert_eq!(Size((10 << 20) + (1 << 19)).to_string(), "10.5 MiB");
    }

    #[test]
    fn messages_are_specific() {
        assert_eq!(
            BootError::BzImageTooOld(0x0205).to_string(),
            "bzImage boot protocol 2.05 is too old: Vessel enters bzImages in 64-bit mode, \
             which needs protocol 2.12 or later (Linux 3.8+)"
        );
        let e = BootError::InitrdTooLarge {
            size: 200 << 20,
            mem_size: 128 << 20,
            min_start: 0x20_0000,
            max_end: 0x800_0000,
        };
        assert!(e
            .to_string()
            .starts_with("initrd of 200 MiB does not fit in 128 MiB of guest memory"));
    }
}
