//! `setup_data` nodes for the 64-bit boot protocol: the RNG seed (`SETUP_RNG_SEED`) that
//! lets the kernel initialise its CRNG at boot instead of gathering entropy slowly.
//!
//! `boot_params.hdr.setup_data` heads a singly linked list of nodes, each
//! `struct setup_data { u64 next; u32 type; u32 len; u8 data[len]; }` (boot protocol 2.09+).
//! Linux 6.0+ on x86 mixes the data of a `SETUP_RNG_SEED` node into its entropy pool at boot,
//! credits it in full with `random.trust_bootloader` (the default), and wipes it. Older kernels
//! skip node types they do not know. The kernel reserves the nodes' memory itself, so the
//! e820 map needs no entry for them.
//!
//! PVH's `hvm_start_info` has no such list: a PVH boot cannot be given a seed.

use std::io;

use vessel_memory::vm_memory::{Bytes, GuestAddress};
use vessel_memory::{addr, GuestMemoryMmap};

use crate::error::BootError;

/// Where the RNG seed's `setup_data` node goes: the first page past the command line's area
/// ([`addr::CMDLINE_START`] + [`addr::CMDLINE_MAX_SIZE`], 0x30000). Nothing else Vessel
/// writes lies there: the boot structures below it end with the page directories (0xf000),
/// the MP table starts at [`addr::EBDA_START`], and the kernel goes at 1 MiB. It is RAM in the
/// e820 map (the first entry, 0..EBDA), as `setup_data` must be.
pub const SETUP_DATA_START: u64 = addr::CMDLINE_START + addr::CMDLINE_MAX_SIZE as u64;

/// Bytes of seed handed to the kernel: 256 bits, what its CRNG needs to count as initialised.
pub const RNG_SEED_LEN: usize = 32;

/// `SETUP_RNG_SEED` from Linux's `arch/x86/include/uapi/asm/bootparam.h`.
const SETUP_RNG_SEED: u32 = 9;

/// `next`, `type` and `len`: the bytes before a node's data.
const NODE_HEADER_LEN: usize = 16;

/// The node's full size.
const RNG_NODE_LEN: usize = NODE_HEADER_LEN + RNG_SEED_LEN;

const _: () = assert!(SETUP_DATA_START.is_multiple_of(0x1000));
const _: () = assert!(SETUP_DATA_START + RNG_NODE_LEN as u64 <= addr::EBDA_START);

/// Write a `SETUP_RNG_SEED` node holding `seed` at [`SETUP_DATA_START`], linked to `next` (the
/// list the zero page had so far, 0 for none). Returns the node's address, the new head.
pub(crate) fn write_rng_seed(
    mem: &GuestMemoryMmap,
    seed: &[u8; RNG_SEED_LEN],
    next: u64,
) -> Result<u64, BootError> {
    let mut node = [0u8; RNG_NODE_LEN];
    node[0..8].copy_from_slice(&next.to_le_bytes());
    node[8..12].copy_from_slice(&SETUP_RNG_SEED.to_le_bytes());
    node[12..16].copy_from_slice(&(RNG_SEED_LEN as u32).to_le_bytes());
    node[NODE_HEADER_LEN..].copy_from_slice(seed);
    mem.write_slice(&node, GuestAddress(SETUP_DATA_START))
        .map_err(BootError::write("RNG seed setup_data", SETUP_DATA_START))?;
    Ok(SETUP_DATA_START)
}

/// A fresh seed for the guest's RNG from the host kernel's CSPRNG (`getrandom(2)`, which
/// waits only until the host's own pool is initialised, once after the host boots).
pub fn host_rng_seed() -> Result<[u8; RNG_SEED_LEN], BootError> {
    let mut seed = [0u8; RNG_SEED_LEN];
    host_random(&mut seed)?;
    Ok(seed)
}

/// Fills `buf` from the host kernel's CSPRNG (`getrandom(2)`).
pub fn host_random(buf: &mut [u8]) -> Result<(), BootError> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a live, writable buffer of `rest.len()` bytes, and getrandom writes
        // at most that many bytes into it; flags 0 asks for nothing else.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(0) => {
                return Err(BootError::RngSeed(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "getrandom returned no bytes",
                )))
            }
            Ok(n) => filled += n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(BootError::RngSeed(e));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{self, read_bytes, u32_at, u64_at, MIB};

    #[test]
    fn host_seeds_are_fresh() {
        let a = host_rng_seed().unwrap();
        let b = host_rng_seed().unwrap();
        assert_eq!(a.len(), 32);
        // 2^-256 odds of a false failure.
        assert_ne!(a, b);
        assert_ne!(a, [0; 32]);
    }

    #[test]
    fn node_links_to_the_rest_of_the_list() {
        let (mem, _) = testutil::guest(16 * MIB);
        let seed: [u8; 32] = std::array::from_fn(|i| i as u8 + 1);
        let head = write_rng_seed(&mem, &seed, 0x4_5000).unwrap();
        assert_eq!(head, 0x3_0000);
        let node = read_bytes(&mem, head, 48);
        assert_eq!(u64_at(&node, 0), 0x4_5000);
        assert_eq!(u32_at(&node, 8), 9);
        assert_eq!(u32_at(&node, 12), 32);
        assert_eq!(node[16..], seed);
    }
}
