//! Direct kernel boot through the firmware (QEMU's `-kernel`, `-initrd`, `-append` on x86):
//! the bzImage split into its real-mode setup and its protected-mode part, the initrd and the
//! command line, each as a size item and a data item.
//!
//! These are the items OVMF's kernel loader reads (it puts setup and kernel back together and
//! boots through the EFI stub or the setup header itself). SeaBIOS needs QEMU's
//! `linuxboot_dma.bin` option ROM and the `*_ADDR` items with a patched setup header, which
//! this does not provide.

use super::{check_size, keys, FwCfg, FwCfgError};

/// Offsets in the bzImage setup header (Documentation/arch/x86/boot.rst).
const SETUP_SECTS: usize = 0x1f1;
const HEADER_MAGIC: usize = 0x202;
/// Setup sectors when the header says 0 (very old kernels).
const DEFAULT_SETUP_SECTS: usize = 4;
const SECTOR: usize = 512;

impl FwCfg {
    /// Add the direct boot items for `kernel` (a bzImage), `initrd` and `cmdline`:
    /// [`keys::SETUP_SIZE`]/[`keys::SETUP_DATA`] (the first `(setup_sects + 1) * 512` bytes),
    /// [`keys::KERNEL_SIZE`]/[`keys::KERNEL_DATA`] (the rest),
    /// [`keys::INITRD_SIZE`]/[`keys::INITRD_DATA`] when there is an initrd, and
    /// [`keys::CMDLINE_SIZE`]/[`keys::CMDLINE_DATA`] (NUL-terminated). Sizes are u32
    /// little-endian.
    ///
    /// Nothing is added if the kernel is not a bzImage, the command line holds a NUL, a part
    /// is 4 GiB or larger, or one of the items is already set.
    pub fn add_kernel_direct_boot(
        &mut self,
        kernel: &[u8],
        initrd: Option<Vec<u8>>,
        cmdline: &str,
    ) -> Result<(), FwCfgError> {
        if kernel.get(HEADER_MAGIC..HEADER_MAGIC + 4) != Some(b"HdrS") {
            return Err(FwCfgError::BadKernel("no bzImage setup header"));
        }
        let sects = match kernel[SETUP_SECTS] {
            0 => DEFAULT_SETUP_SECTS,
            n => usize::from(n),
        };
        let setup_len = (sects + 1) * SECTOR;
        if setup_len > kernel.len() {
            return Err(FwCfgError::BadKernel("shorter than its setup sectors"));
        }
        if cmdline.as_bytes().contains(&0) {
            return Err(FwCfgError::CmdlineHasNul);
        }
        let (setup, rest) = kernel.split_at(setup_len);
        let mut cmd = Vec::with_capacity(cmdline.len() + 1);
        cmd.extend_from_slice(cmdline.as_bytes());
        cmd.push(0);

        let mut parts = vec![
            (keys::SETUP_SIZE, keys::SETUP_DATA, setup.to_vec()),
            (keys::KERNEL_SIZE, keys::KERNEL_DATA, rest.to_vec()),
            (keys::CMDLINE_SIZE, keys::CMDLINE_DATA, cmd),
        ];
        if let Some(initrd) = initrd {
            parts.push((keys::INITRD_SIZE, keys::INITRD_DATA, initrd));
        }
        for (size_key, data_key, data) in &parts {
            check_size(data)?;
            for key in [*size_key, *data_key] {
                if self.items.contains_key(&key) {
                    return Err(FwCfgError::DuplicateItem(key));
                }
            }
        }
        for (size_key, data_key, data) in parts {
            // Checked above: the sizes fit, the keys are free and valid.
            self.add_u32(size_key, data.len() as u32)?;
            self.add_item(data_key, data)?;
        }
        Ok(())
    }
}
