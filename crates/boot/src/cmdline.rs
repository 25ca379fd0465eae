//! The kernel command line: checked against the kernel's limit, written at
//! [`addr::CMDLINE_START`] with linux-loader's `Cmdline` and `load_cmdline`.

use linux_loader::loader::{load_cmdline, Cmdline};
use vessel_memory::vm_memory::GuestAddress;
use vessel_memory::{addr, GuestMemoryMmap};

use crate::error::BootError;

/// Write `cmdline` (at most `max_len` bytes, not counting the NUL Vessel adds) at
/// [`addr::CMDLINE_START`]. Returns the number of bytes written, NUL included.
pub(crate) fn write_cmdline(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    max_len: usize,
) -> Result<usize, BootError> {
    let max_len = max_len.min(addr::CMDLINE_MAX_SIZE - 1);
    if cmdline.len() > max_len {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: max_len,
        });
    }
    if cmdline.contains('\0') {
        return Err(BootError::InvalidCmdline("it contains a NUL byte".into()));
    }
    let cl = Cmdline::try_from(cmdline, max_len + 1)
        .map_err(|e| BootError::InvalidCmdline(e.to_string()))?;
    let bytes = cl
        .as_cstring()
        .map_err(|e| BootError::InvalidCmdline(e.to_string()))?
        .as_bytes_with_nul()
        .len();
    load_cmdline(mem, GuestAddress(addr::CMDLINE_START), &cl)
        .map_err(BootError::write("command line", addr::CMDLINE_START))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{self, read_bytes, MIB};

    #[test]
    fn cmdline_is_written_nul_terminated() {
        let (mem, _) = testutil::guest(16 * MIB);
        let line = "console=ttyS0 reboot=k panic=1 -- init-arg";
        let n = write_cmdline(&mem, line, 255).unwrap();
        assert_eq!(n, line.len() + 1);
        let back = read_bytes(&mem, addr::CMDLINE_START, n);
        assert_eq!(&back[..line.len()], line.as_bytes());
        assert_eq!(back[line.len()], 0);
    }

    #[test]
    fn empty_cmdline_is_a_single_nul() {
        let (mem, _) = testutil::guest(16 * MIB);
        mem_fill(&mem);
        assert_eq!(write_cmdline(&mem, "", 255).unwrap(), 1);
        assert_eq!(read_bytes(&mem, addr::CMDLINE_START, 1), [0]);
    }

    fn mem_fill(mem: &GuestMemoryMmap) {
        use vessel_memory::vm_memory::Bytes;
        mem.write_slice(&[b'x'; 16], GuestAddress(addr::CMDLINE_START))
            .unwrap();
    }

    #[test]
    fn too_long_cmdline_is_refused() {
        let (mem, _) = testutil::guest(16 * MIB);
        let line = "a".repeat(256);
        let err = write_cmdline(&mem, &line, 255).unwrap_err();
        assert!(
            matches!(err, BootError::CmdlineTooLong { len: 256, max: 255 }),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "kernel command line of 256 bytes is longer than the 255 bytes the kernel accepts"
        );
        // Exactly at the limit is fine.
        assert_eq!(write_cmdline(&mem, &line[..255], 255).unwrap(), 256);
    }

    #[test]
    fn vessel_caps_the_kernel_limit() {
        let (mem, _) = testutil::guest(16 * MIB);
        let line = "b".repeat(addr::CMDLINE_MAX_SIZE);
        let err = write_cmdline(&mem, &line, 1 << 20).unwrap_err();
        assert!(
            matches!(err, BootError::CmdlineTooLong { max, .. } if max == addr::CMDLINE_MAX_SIZE - 1),
            "{err}"
        );
    }

    #[test]
    fn nul_in_cmdline_is_refused() {
        let (mem, _) = testutil::guest(16 * MIB);
        let err = write_cmdline(&mem, "root=/dev/vda\0evil", 255).unwrap_err();
        assert!(matches!(err, BootError::InvalidCmdline(_)), "{err}");
    }
}
