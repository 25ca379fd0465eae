//! The DMA interface: the guest writes the address of a descriptor
//! `{ be32 control; be32 length; be64 address }`, the device selects, reads or skips as
//! `control` says, and writes the outcome back to `control` (0, or [`CTL_ERROR`]).
//!
//! The descriptor and the data buffer are guest-controlled: the whole buffer is checked
//! against guest memory before anything is written to it, so a transfer either completes or
//! fails with [`CTL_ERROR`] and no write; the work done is bounded by the item's size and the
//! guest memory the buffer covers, never by an allocation of `length` bytes.

use vessel_memory::vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::FwCfg;

/// Control bits.
pub(super) const CTL_ERROR: u32 = 0x01;
pub(super) const CTL_READ: u32 = 0x02;
pub(super) const CTL_SKIP: u32 = 0x04;
pub(super) const CTL_SELECT: u32 = 0x08;
pub(super) const CTL_WRITE: u32 = 0x10;

/// Size of the descriptor.
const DESCRIPTOR_LEN: usize = 16;

/// Zeros written past the end of an item, a chunk at a time.
static ZEROS: [u8; 4096] = [0; 4096];

impl FwCfg {
    /// Run the transfer described at `desc` and write its outcome to the descriptor's
    /// `control`. A descriptor outside guest memory is refused (with an attempt to report the
    /// error, which lands if its first 4 bytes are in memory).
    pub(super) fn dma_transfer(&mut self, desc: u64) {
        let mut raw = [0u8; DESCRIPTOR_LEN];
        let status = match self.mem.read_slice(&mut raw, GuestAddress(desc)) {
            Ok(()) => {
                let be32 = |at: usize| {
                    u32::from_be_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]])
                };
                let control = be32(0);
                let length = be32(4);
                let mut address = [0u8; 8];
                address.copy_from_slice(&raw[8..16]);
                self.dma_run(control, length, u64::from_be_bytes(address))
            }
            Err(_) => CTL_ERROR,
        };
        // Nothing more to do if even this is out of guest memory.
        let _ = self
            .mem
            .write_slice(&status.to_be_bytes(), GuestAddress(desc));
    }

    /// The transfer itself: the new value of `control`.
    fn dma_run(&mut self, control: u32, length: u32, address: u64) -> u32 {
        if control & CTL_SELECT != 0 {
            // The selector is the upper 16 bits.
            self.select((control >> 16) as u16);
        }
        // As QEMU: read wins over write, write over skip.
        if control & CTL_READ != 0 {
            self.dma_read(length, address)
        } else if control & CTL_WRITE != 0 {
            // No item is writable.
            if length == 0 {
                0
            } else {
                CTL_ERROR
            }
        } else if control & CTL_SKIP != 0 {
            let n = self.remaining().len().min(length as usize);
            self.offset += n;
            0
        } else {
            0
        }
    }

    /// Copy up to `length` bytes of the selected item to `address` and zero the rest of the
    /// buffer; the item's offset advances by what was copied.
    fn dma_read(&mut self, length: u32, address: u64) -> u32 {
        let len = length as usize;
        let in_memory = address.checked_add(u64::from(length)).is_some()
            && self.mem.check_range(GuestAddress(address), len);
        if !in_memory {
            return CTL_ERROR;
        }
        let rest = self.remaining();
        let n = rest.len().min(len);
        if self
            .mem
            .write_slice(&rest[..n], GuestAddress(address))
            .is_err()
        {
            return CTL_ERROR;
        }
        self.offset += n;
        // Past the end of the item: zeros, as QEMU. The range was checked above, so this is
        // bounded by the guest memory the buffer covers.
        let mut at = address + n as u64;
        let mut left = len - n;
        while left > 0 {
            let chunk = left.min(ZEROS.len());
            if self
                .mem
                .write_slice(&ZEROS[..chunk], GuestAddress(at))
                .is_err()
            {
                return CTL_ERROR;
            }
            at += chunk as u64;
            left -= chunk;
        }
        0
    }
}
