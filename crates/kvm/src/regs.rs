//! x86 control-register, EFER and RFLAGS bits (Intel SDM vol. 3A, 2.5 and 2.2.1), defined once
//! for the whole of Vessel: the boot path sets them, the state readers and the nested-host
//! fallback test them.

/// CR0.PE: protected mode enabled.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.ET: extension type (always 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.PG: paging enabled.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension (required for long mode).
pub const CR4_PAE: u64 = 1 << 5;
/// EFER.LME: long mode enabled.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1, which always reads as 1.
pub const RFLAGS_FIXED: u64 = 1 << 1;
/// RFLAGS.RF: resume flag.
pub const RFLAGS_RF: u64 = 1 << 16;
/// RFLAGS.VM: virtual-8086 mode.
pub const RFLAGS_VM: u64 = 1 << 17;
