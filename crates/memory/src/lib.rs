//! Guest memory and the guest physical map.
//!
//! This crate owns *where things are* in a Vessel guest: the fixed addresses the boot code uses
//! (zero page, page tables, command line, MP and ACPI tables), the 32-bit MMIO gap below 4 GiB,
//! the RAM regions around it, and the e820 map the guest is given. Every other crate asks this
//! one instead of repeating an address or an e820 entry.

use std::fmt;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap as VmGuestMemoryMmap};

/// The guest memory type used throughout Vessel (anonymous private mappings).
pub type GuestMemoryMmap = VmGuestMemoryMmap<AtomicBitmap>;

pub use vm_memory;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Fixed guest-physical addresses of the boot structures. All lie in the first MiB.
pub mod addr {
    /// PVH `hvm_start_info` and its memory map (one page).
    pub const PVH_INFO_START: u64 = 0x6000;
    /// The Linux zero page (`struct boot_params`).
    pub const ZERO_PAGE_START: u64 = 0x7000;
    /// Initial stack pointer for the boot vCPU (grows down from the end of this page).
    pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
    /// Boot page tables: PML4, one PDPT, and four page directories (4 GiB identity map).
    pub const PML4_START: u64 = 0x9000;
    pub const PDPT_START: u64 = 0xa000;
    pub const PD_START: u64 = 0xb000;
    /// Boot GDT and IDT (used by the 64-bit entry and by the demo guest).
    pub const GDT_START: u64 = 0x500;
    pub const IDT_START: u64 = 0x520;
    /// The kernel command line.
    pub const CMDLINE_START: u64 = 0x20000;
    /// The largest command line Vessel writes (the kernel's own limit may be lower).
    pub const CMDLINE_MAX_SIZE: usize = 0x10000;
    /// Start of the EBDA: the MP table is written here (Linux scans the EBDA for `_MP_`).
    pub const EBDA_START: u64 = 0x9fc00;
    /// The ACPI RSDP, in the BIOS area Linux scans (0xe0000..0x100000); tables follow it.
    pub const RSDP_START: u64 = 0xe0000;
    /// The VM generation ID: 16 bytes in the last page of the BIOS area (e820-reserved, after
    /// the ACPI tables), where the DSDT's `VGEN` device says it is.
    pub const VMGENID_START: u64 = 0xf_f000;
    pub const VMGENID_SIZE: u64 = 16;
    /// The first byte after the BIOS area: where "high" memory and the kernel start.
    pub const HIMEM_START: u64 = 0x10_0000;
    /// Start of the 32-bit MMIO gap (3 GiB .. 4 GiB): never RAM.
    pub const MMIO_GAP_START: u64 = 0xc000_0000;
    /// Firecracker's boot timer register (`--boot-timer`), at the start of the gap as in
    /// Firecracker, below the devices.
    pub const BOOT_TIMER_START: u64 = MMIO_GAP_START;
    /// End of the 32-bit MMIO gap.
    pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
    /// The IO-APIC registers.
    pub const IOAPIC_START: u64 = 0xfec0_0000;
    /// The local APIC registers.
    pub const LAPIC_START: u64 = 0xfee0_0000;
    /// Range in the MMIO gap handed out to devices (below the IO-APIC).
    pub const DEVICE_MMIO_START: u64 = 0xd000_0000;
    pub const DEVICE_MMIO_END: u64 = 0xfec0_0000;
    /// virtio-mmio register windows, [`VIRTIO_MMIO_WINDOW`] each, at the start of the device range.
    pub const VIRTIO_MMIO_START: u64 = DEVICE_MMIO_START;
    pub const VIRTIO_MMIO_WINDOW: u64 = 0x1000;
    /// Room for this many virtio-mmio devices.
    pub const VIRTIO_MMIO_MAX_DEVICES: u64 = 256;
    /// The 32-bit window PCI BARs are assigned from (described in the host bridge's `_CRS`).
    pub const PCI_MMIO32_START: u64 =
        VIRTIO_MMIO_START + VIRTIO_MMIO_WINDOW * VIRTIO_MMIO_MAX_DEVICES;
    pub const PCI_MMIO32_END: u64 = PCI_ECAM_START;
    /// PCI configuration space through ECAM (the MCFG table), bus 0 only: 1 MiB.
    pub const PCI_ECAM_START: u64 = 0xe000_0000;
    pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
    /// Where device memory past RAM starts (virtio-pmem regions): 512 GiB, Firecracker's
    /// first address past its 64-bit MMIO window, or the first GiB past RAM for larger
    /// guests (see [`super::GuestLayout::device_memory`]). Never RAM, never in the e820 map.
    pub const DEVICE_MEMORY_START: u64 = 512 << 30;
    /// The end of the device memory area: 64 TiB, what a guest with 4-level paging maps
    /// (`MAX_PHYSMEM_BITS` 46).
    pub const DEVICE_MEMORY_END: u64 = 1 << 46;
    /// virtio-pmem regions start and end on 2 MiB boundaries (the guest maps them with
    /// `memremap_pages`, in 2 MiB sub-sections).
    pub const PMEM_ALIGN: u64 = 2 << 20;
}

/// The platform's I/O ports and legacy interrupt lines (the port-space half of the map).
pub mod ports {
    /// First 16550 UART (COM1): 8 ports from here, IRQ 4.
    pub const COM1: u16 = 0x3f8;
    pub const COM1_IRQ: u32 = 4;
    /// i8042 keyboard controller: data port and command/status port.
    pub const I8042_DATA: u16 = 0x60;
    pub const I8042_COMMAND: u16 = 0x64;
    /// The i8042's keyboard interrupt line.
    pub const I8042_KBD_IRQ: u32 = 1;
    /// POST code / I/O delay port.
    pub const DEBUG_PORT: u16 = 0x80;
    /// CMOS RTC: index port and data port, IRQ 8.
    pub const RTC_INDEX: u16 = 0x70;
    pub const RTC_DATA: u16 = 0x71;
    pub const RTC_IRQ: u32 = 8;
    /// ACPI hardware-reduced sleep control and status registers (FADT `X_SLEEP_*_REG`), and
    /// the reset register (FADT `RESET_REG`). One byte each.
    pub const ACPI_SLEEP_CONTROL: u16 = 0x600;
    pub const ACPI_SLEEP_STATUS: u16 = 0x601;
    pub const ACPI_RESET: u16 = 0x602;
    /// The value the guest writes to `ACPI_RESET` to reset (FADT `RESET_VALUE`).
    pub const ACPI_RESET_VALUE: u8 = 0x01;
    /// The `SLP_TYP` of S5 (soft off) in the DSDT's `_S5` package. A sleep control write of
    /// `(SLP_TYP << 2) | SLP_EN` (SLP_EN = bit 5) with this type powers the guest off.
    pub const SLEEP_TYPE_S5: u8 = 5;
    /// The fixed ACPI registers of a guest booted through firmware (full ACPI, not
    /// hardware-reduced; see `vessel_devices::acpi_pm1`): PM1a event block (status and
    /// enable, 4 bytes), PM1a control block (2 bytes) and the PM timer (4 bytes).
    pub const ACPI_PM1_EVT: u16 = 0xb000;
    pub const ACPI_PM1_CNT: u16 = 0xb004;
    pub const ACPI_PM_TMR: u16 = 0xb008;
    /// Ports from `ACPI_PM1_EVT` the three blocks cover.
    pub const ACPI_PM1_LEN: u64 = 12;
    /// ACPI SCI interrupt line (FADT `SCI_INT`).
    pub const ACPI_SCI_IRQ: u32 = 9;
    /// PCI configuration mechanism #1: address register 0xcf8, data 0xcfc..0xcff.
    pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
    pub const PCI_CONFIG_LEN: u64 = 8;
    /// IO-APIC pins free for virtio-mmio devices, in the order they are handed out (the
    /// legacy devices keep 1, 4 and 8; 9 is the SCI; 0 and 2 belong to the timer and cascade;
    /// 3 is the generic event device's).
    pub const VIRTIO_MMIO_IRQS: [u32; 17] = [
        5, 6, 7, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
    ];
    /// The ACPI generic event device's interrupt (edge-triggered, active high): its `_EVT`
    /// tells the guest that the VM generation ID changed.
    pub const GED_IRQ: u32 = 3;
    /// The PCI hotplug controller's registers (`vmm::pci_hotplug`, described in the DSDT):
    /// slots with a new device (32 bits), slots whose device the guest is asked to eject
    /// (32 bits), and the eject register the guest's `_EJ0` writes (32 bits). QEMU's PIIX4
    /// puts its own at this port.
    pub const PCI_HOTPLUG: u16 = 0xae00;
    pub const PCI_HOTPLUG_LEN: u64 = 12;
    /// GSIs from here on are MSI routes (above the 24 IO-APIC pins).
    pub const MSI_GSI_START: u32 = 24;
}

/// Smallest guest Vessel accepts: room for the boot structures and a small kernel.
pub const MIN_MEMORY: u64 = 16 * MIB;
/// Largest guest address space this layout supports (the identity-mapped boot tables only
/// need the kernel in low memory; this bound keeps the arithmetic far from overflow).
pub const MAX_MEMORY: u64 = 1 << 46;

/// Errors building the guest layout or its memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "guest memory of {0} bytes is too small: at least {MIN_MEMORY} bytes (16 MiB) are needed"
    )]
    TooSmall(u64),
    #[error("guest memory of {0} bytes is larger than Vessel supports")]
    TooLarge(u64),
    #[error("guest memory of {0} bytes is not a multiple of 4 KiB")]
    Unaligned(u64),
    #[error("cannot map guest memory")]
    Mmap(#[from] vm_memory::mmap::FromRangesError),
    #[error("cannot create shared guest memory (memfd)")]
    Memfd(#[source] std::io::Error),
    #[error("{size:#x} bytes of device memory aligned to {align:#x} do not fit below {max:#x}", max = MAX_DEVICE_MEMORY_END)]
    NoRoomForDeviceMemory { size: u64, align: u64 },
    #[error("device memory of {size:#x} bytes at {addr:#x} is empty, unaligned or overlaps RAM")]
    BadDeviceMemory { addr: u64, size: u64 },
}

/// The kind of an e820 entry, with the values the boot protocol uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
    Acpi = 3,
}

/// One entry of the guest's e820 memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

impl E820Entry {
    pub fn end(&self) -> u64 {
        self.addr + self.size
    }
}

/// The guest physical map for a guest of a given RAM size.
///
/// RAM fills the address space from 0 up to the MMIO gap; what does not fit below 3 GiB goes
/// above 4 GiB. The first MiB is backed by RAM but the e820 map reports 0x9fc00..1 MiB as
/// reserved, as on a PC (EBDA, VGA hole, BIOS area holding our MP and ACPI tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestLayout {
    mem_size: u64,
}

impl GuestLayout {
    /// A layout for `mem_size` bytes of guest RAM.
    pub fn new(mem_size: u64) -> Result<Self, MemoryError> {
        if mem_size < MIN_MEMORY {
            return Err(MemoryError::TooSmall(mem_size));
        }
        if mem_size > MAX_MEMORY {
            return Err(MemoryError::TooLarge(mem_size));
        }
        if !mem_size.is_multiple_of(4 * KIB) {
            return Err(MemoryError::Unaligned(mem_size));
        }
        Ok(GuestLayout { mem_size })
    }

    /// Total guest RAM in bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// End (exclusive) of the RAM below the MMIO gap.
    pub fn low_ram_end(&self) -> u64 {
        self.mem_size.min(addr::MMIO_GAP_START)
    }

    /// Bytes of RAM placed above 4 GiB (0 for guests of 3 GiB or less).
    pub fn high_ram_size(&self) -> u64 {
        self.mem_size.saturating_sub(addr::MMIO_GAP_START)
    }

    /// The RAM regions, as (start, length) pairs, in address order.
    pub fn ram_regions(&self) -> Vec<(GuestAddress, usize)> {
        let mut regions = vec![(GuestAddress(0), self.low_ram_end() as usize)];
        if self.high_ram_size() > 0 {
            regions.push((
                GuestAddress(addr::MMIO_GAP_END),
                self.high_ram_size() as usize,
            ));
        }
        regions
    }

    /// The e820 map given to the guest, sorted and non-overlapping.
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut map = vec![
            E820Entry {
                addr: 0,
                size: addr::EBDA_START,
                kind: E820Kind::Ram,
            },
            E820Entry {
                addr: addr::EBDA_START,
                size: addr::HIMEM_START - addr::EBDA_START,
                kind: E820Kind::Reserved,
            },
            E820Entry {
                addr: addr::HIMEM_START,
                size: self.low_ram_end() - addr::HIMEM_START,
                kind: E820Kind::Ram,
            },
            // Linux only uses an MCFG (ECAM) region that the firmware reserved.
            E820Entry {
                addr: addr::PCI_ECAM_START,
                size: addr::PCI_ECAM_SIZE,
                kind: E820Kind::Reserved,
            },
        ];
        if self.high_ram_size() > 0 {
            map.push(E820Entry {
                addr: addr::MMIO_GAP_END,
                size: self.high_ram_size(),
                kind: E820Kind::Ram,
            });
        }
        map
    }

    /// The 64-bit PCI window of a firmware-booted guest (start, end exclusive): from the
    /// first GiB boundary above 4 GiB and RAM up to device memory. OVMF puts its 64-bit BARs
    /// in an aperture above RAM (32 GiB-aligned by default), which this covers.
    pub fn firmware_pci_mmio64(&self) -> (u64, u64) {
        let start = self.ram_end().max(addr::MMIO_GAP_END).next_multiple_of(GIB);
        (start, self.device_memory().0.max(start))
    }

    /// End (exclusive) of the highest RAM region.
    pub fn ram_end(&self) -> u64 {
        match self.high_ram_size() {
            0 => self.low_ram_end(),
            high => addr::MMIO_GAP_END + high,
        }
    }

    /// The guest-physical range `[start, end)` for device memory (virtio-pmem regions):
    /// from [`addr::DEVICE_MEMORY_START`], or the first GiB boundary past RAM when RAM
    /// reaches that far, to [`addr::DEVICE_MEMORY_END`]. It overlaps neither RAM, the MMIO
    /// gap nor anything in the e820 map.
    pub fn device_memory(&self) -> (u64, u64) {
        let past_ram = self.ram_end().next_multiple_of(GIB);
        (
            past_ram.max(addr::DEVICE_MEMORY_START),
            addr::DEVICE_MEMORY_END,
        )
    }

    /// Where to put an initrd of `size` bytes: the highest page-aligned address that keeps it
    /// in low RAM, below `max_end` (the kernel's `initrd_addr_max` + 1) and above `min_start`
    /// (the end of the loaded kernel). `None` when it does not fit.
    pub fn initrd_addr(&self, size: u64, min_start: u64, max_end: u64) -> Option<u64> {
        let end = self.low_ram_end().min(max_end);
        let start = end.checked_sub(size)? & !(4 * KIB - 1);
        (start >= min_start.max(addr::HIMEM_START)).then_some(start)
    }

    /// Whether `[start, start + len)` lies entirely in guest RAM.
    pub fn is_ram(&self, start: u64, len: u64) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        self.ram_regions()
            .iter()
            .any(|(base, size)| start >= base.0 && end <= base.0 + *size as u64)
    }
}

impl fmt::Display for GuestLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MiB", self.mem_size / MIB)
    }
}

/// Map anonymous memory for every RAM region of `layout`.
pub fn create_guest_memory(layout: &GuestLayout) -> Result<GuestMemoryMmap, MemoryError> {
    Ok(GuestMemoryMmap::from_ranges(&layout.ram_regions())?)
}

/// Alignment of the device-managed memory above RAM: 1 GiB, a multiple of Linux's x86_64
/// memory block size (128 MiB, what virtio-mem's memory must be aligned to) and of its
/// sparsemem section size.
pub const DEVICE_MEMORY_ALIGN: u64 = GIB;
/// Device-managed memory ends below this guest physical address (64 TiB: within the 46
/// physical address bits of Linux's x86_64 sparsemem, and far from overflow).
pub const MAX_DEVICE_MEMORY_END: u64 = 1 << 46;

impl GuestLayout {
    /// Where device-managed memory (virtio-mem's hotpluggable region, virtio-pmem's
    /// windows) starts: the first [`DEVICE_MEMORY_ALIGN`]-aligned address past RAM and past
    /// the 32-bit MMIO gap. Nothing there is in the e820 map: the drivers add it themselves.
    pub fn device_memory_start(&self) -> u64 {
        let ram_end = addr::MMIO_GAP_END + self.high_ram_size();
        ram_end.next_multiple_of(DEVICE_MEMORY_ALIGN)
    }
}

/// Hands out guest physical ranges above RAM for memory a device manages (virtio-mem,
/// virtio-pmem), in request order from [`GuestLayout::device_memory_start`]. The same
/// requests in the same order give the same addresses, so a VM built again from its
/// configuration (a restore, a migration) gets the same map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMemoryAllocator {
    next: u64,
}

impl DeviceMemoryAllocator {
    /// An allocator for the space above `layout`'s RAM.
    pub fn new(layout: &GuestLayout) -> Self {
        DeviceMemoryAllocator {
            next: layout.device_memory_start(),
        }
    }

    /// A range of `size` bytes (a non-zero multiple of 4 KiB) at an `align`-aligned address
    /// (a power of two, or 0; at least 4 KiB is used). Returns its start.
    pub fn allocate(&mut self, size: u64, align: u64) -> Result<u64, MemoryError> {
        let pow2 = align == 0 || align.is_power_of_two();
        let align = align.max(4 * KIB);
        let room = || MemoryError::NoRoomForDeviceMemory { size, align };
        if size == 0 || !size.is_multiple_of(4 * KIB) || !pow2 {
            return Err(MemoryError::BadDeviceMemory {
                addr: self.next,
                size,
            });
        }
        let start = self.next.checked_next_multiple_of(align).ok_or_else(room)?;
        let end = start.checked_add(size).ok_or_else(room)?;
        if end > MAX_DEVICE_MEMORY_END {
            return Err(room());
        }
        self.next = end;
        Ok(start)
    }
}

/// [`create_guest_memory`] plus anonymous memory for device-managed ranges `(start, size)`
/// (from a [`DeviceMemoryAllocator`] of the same layout). Every region is in the returned
/// memory, so devices reach the guest's buffers wherever they lie; only RAM is in the e820
/// map, and which ranges KVM maps is up to the caller (the RAM regions come first, in
/// [`GuestLayout::ram_regions`] order).
pub fn create_guest_memory_with(
    layout: &GuestLayout,
    device_ranges: &[(u64, u64)],
) -> Result<GuestMemoryMmap, MemoryError> {
    create_guest_memory_backed(layout, device_ranges, Backing::Private)
}

/// How guest memory is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backing {
    /// Anonymous private mappings: nothing outside the VMM can map them.
    #[default]
    Private,
    /// One `memfd` mapped shared, each region at its own offset: a vhost-user backend
    /// (`virtiofsd`) maps the same pages from the descriptor the VMM sends it.
    Shared,
}

/// [`create_guest_memory_with`], backed as `backing` says.
pub fn create_guest_memory_backed(
    layout: &GuestLayout,
    device_ranges: &[(u64, u64)],
    backing: Backing,
) -> Result<GuestMemoryMmap, MemoryError> {
    let mut ranges = layout.ram_regions();
    for &(addr, size) in device_ranges {
        if size == 0
            || addr < layout.device_memory_start()
            || !addr.is_multiple_of(4 * KIB)
            || !size.is_multiple_of(4 * KIB)
            || addr
                .checked_add(size)
                .is_none_or(|e| e > MAX_DEVICE_MEMORY_END)
        {
            return Err(MemoryError::BadDeviceMemory { addr, size });
        }
        let len = usize::try_from(size).map_err(|_| MemoryError::BadDeviceMemory { addr, size })?;
        ranges.push((GuestAddress(addr), len));
    }
    match backing {
        Backing::Private => Ok(GuestMemoryMmap::from_ranges(&ranges)?),
        Backing::Shared => shared_memory(&ranges),
    }
}

/// `ranges` as shared mappings of one `memfd` (close-on-exec; sealed against shrinking so
/// that no one holding the descriptor can make the VMM's mappings fault).
fn shared_memory(ranges: &[(GuestAddress, usize)]) -> Result<GuestMemoryMmap, MemoryError> {
    use std::os::fd::FromRawFd;
    use std::sync::Arc;
    let total: u64 = ranges.iter().map(|r| r.1 as u64).sum();
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new descriptor or -1.
    let fd = unsafe {
        libc::memfd_create(
            c"vessel-guest-memory".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(total).map_err(MemoryError::Memfd)?;
    // SAFETY: F_ADD_SEALS on a memfd we own, with a valid seal mask.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    let file = Arc::new(file);
    let mut offset = 0u64;
    let mut with_files = Vec::with_capacity(ranges.len());
    for &(addr, len) in ranges {
        with_files.push((
            addr,
            len,
            Some(vm_memory::FileOffset::from_arc(file.clone(), offset)),
        ));
        offset += len as u64;
    }
    Ok(GuestMemoryMmap::from_ranges_with_files(&with_files)?)
}

/// A memory size the CLI cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("'{0}' is not a size (try 512M or 2G)")]
    NotASize(String),
    #[error("'{0}' has an unknown unit (use K, M, G or T)")]
    Unit(String),
    #[error("'{0}' is too large")]
    TooLarge(String),
}

/// Parse a memory size as the CLI takes it: a number of MiB (`512`), or a number with a
/// `K`, `M`, `G` or `T` suffix (`512M`, `2G`, `1536MiB`), binary units.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let n: u64 = num
        .parse()
        .map_err(|_| SizeError::NotASize(s.to_string()))?;
    let mult = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => MIB,
        "K" | "KB" | "KIB" => KIB,
        "G" | "GB" | "GIB" => GIB,
        "T" | "TB" | "TIB" => 1 << 40,
        "B" => 1,
        _ => return Err(SizeError::Unit(s.to_string())),
    };
    n.checked_mul(mult)
        .ok_or_else(|| SizeError::TooLarge(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_no_high_ram() {
        let l = GuestLayout::new(128 * MIB).unwrap();
        assert_eq!(
            l.ram_regions(),
            vec![(GuestAddress(0), (128 * MIB) as usize)]
        );
        let e = l.e820();
        assert_eq!(e.len(), 4, "RAM, EBDA hole, RAM, ECAM");
        assert_eq!(
            e[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820Kind::Ram
            }
        );
        assert_eq!(e[1].kind, E820Kind::Reserved);
        assert_eq!(e[1].end(), 0x10_0000);
        assert_eq!(e[2].addr, 0x10_0000);
        assert_eq!(e[2].end(), 128 * MIB);
        let ram: u64 = e
            .iter()
            .filter(|x| x.kind == E820Kind::Ram)
            .map(|x| x.size)
            .sum();
        assert_eq!(ram, 128 * MIB - (0x10_0000 - 0x9fc00));
    }

    #[test]
    fn large_guest_splits_around_the_mmio_gap() {
        let l = GuestLayout::new(5 * GIB).unwrap();
        assert_eq!(l.low_ram_end(), 3 * GIB);
        assert_eq!(l.high_ram_size(), 2 * GIB);
        let r = l.ram_regions();
        assert_eq!(r[1], (GuestAddress(4 * GIB), (2 * GIB) as usize));
        let e = l.e820();
        assert_eq!(e.last().unwrap().addr, 4 * GIB);
        assert_eq!(e.last().unwrap().end(), 6 * GIB);
        // Sorted and non-overlapping; no RAM in the gap, the ECAM window reserved.
        for w in e.windows(2) {
            assert!(w[0].end() <= w[1].addr);
        }
        assert!(!e.iter().any(|x| x.kind == E820Kind::Ram
            && x.addr < addr::MMIO_GAP_END
            && x.end() > addr::MMIO_GAP_START));
        assert!(e.iter().any(|x| x.kind == E820Kind::Reserved
            && x.addr == addr::PCI_ECAM_START
            && x.size == addr::PCI_ECAM_SIZE));
        assert!(!l.is_ram(addr::MMIO_GAP_START, 1));
        assert!(l.is_ram(4 * GIB, 2 * GIB));
        assert!(!l.is_ram(4 * GIB, 2 * GIB + 1));
    }

    #[test]
    fn exactly_three_gib_has_no_high_region() {
        let l = GuestLayout::new(3 * GIB).unwrap();
        assert_eq!(l.ram_regions().len(), 1);
        assert_eq!(l.e820().len(), 4);
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(
            GuestLayout::new(MIB),
            Err(MemoryError::TooSmall(_))
        ));
        assert!(matches!(
            GuestLayout::new(MIN_MEMORY + 1),
            Err(MemoryError::Unaligned(_))
        ));
        assert!(matches!(
            GuestLayout::new(u64::MAX),
            Err(MemoryError::TooLarge(_))
        ));
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let l = GuestLayout::new(128 * MIB).unwrap();
        let a = l.initrd_addr(10 * MIB + 5, 20 * MIB, u64::MAX).unwrap();
        assert_eq!(a % 4096, 0);
        assert!(a + 10 * MIB + 5 <= 128 * MIB);
        assert!(a >= 20 * MIB);
        // Kernel limit respected.
        let a = l.initrd_addr(MIB, 20 * MIB, 64 * MIB).unwrap();
        assert!(a + MIB <= 64 * MIB);
        // Does not fit.
        assert_eq!(l.initrd_addr(200 * MIB, 0, u64::MAX), None);
        assert_eq!(l.initrd_addr(100 * MIB, 60 * MIB, u64::MAX), None);
    }

    #[test]
    fn device_memory_lies_past_ram_and_outside_the_e820_map() {
        for size in [128 * MIB, 3 * GIB, 4 * GIB, 600 * GIB + 4 * KIB] {
            let l = GuestLayout::new(size).unwrap();
            let (start, end) = l.device_memory();
            assert!(start >= l.ram_end(), "{size:#x}");
            assert!(start >= addr::DEVICE_MEMORY_START);
            assert_eq!(start % GIB, 0);
            assert!(start < end);
            assert!(!l.is_ram(start, 1));
            for e in l.e820() {
                assert!(
                    e.end() <= start,
                    "{e:?} reaches device memory at {start:#x}"
                );
            }
        }
        assert_eq!(
            GuestLayout::new(256 * MIB).unwrap().device_memory().0,
            512 * GIB
        );
        // 600 GiB of RAM: 3 GiB low, the rest from 4 GiB to 601 GiB + 4 KiB; next GiB: 602.
        let big = GuestLayout::new(600 * GIB + 4 * KIB).unwrap();
        assert_eq!(big.ram_end(), 601 * GIB + 4 * KIB);
        assert_eq!(big.device_memory().0, 602 * GIB);
    }

    #[test]
    fn memory_is_mapped_per_region() {
        let l = GuestLayout::new(64 * MIB).unwrap();
        let m = create_guest_memory(&l).unwrap();
        use vm_memory::GuestMemoryBackend;
        assert_eq!(m.num_regions(), 1);
        assert!(m.address_in_range(GuestAddress(64 * MIB - 1)));
        assert!(!m.address_in_range(GuestAddress(64 * MIB)));
    }

    #[test]
    fn vmgenid_is_reserved_and_its_interrupt_is_nobody_elses() {
        let l = GuestLayout::new(64 * MIB).unwrap();
        let (at, len) = (addr::VMGENID_START, addr::VMGENID_SIZE);
        assert_eq!(at % 8, 0, "8-byte aligned");
        assert!(l
            .e820()
            .iter()
            .any(|e| e.kind == E820Kind::Reserved && e.addr <= at && at + len <= e.end()));
        assert!(l.is_ram(at, len), "backed by guest memory");
        assert!(at >= addr::RSDP_START && at + len <= addr::HIMEM_START);
        let taken = [
            0,
            2,
            ports::COM1_IRQ,
            ports::I8042_KBD_IRQ,
            ports::RTC_IRQ,
            ports::ACPI_SCI_IRQ,
        ];
        assert!(!taken.contains(&ports::GED_IRQ));
        assert!(!ports::VIRTIO_MMIO_IRQS.contains(&ports::GED_IRQ));
        const { assert!(ports::GED_IRQ < ports::MSI_GSI_START) };
    }

    #[test]
    fn device_memory_goes_above_ram_aligned_and_in_order() {
        let small = GuestLayout::new(512 * MIB).unwrap();
        assert_eq!(small.device_memory_start(), 4 * GIB);
        let big = GuestLayout::new(5 * GIB + 4 * KIB).unwrap();
        // RAM ends at 6 GiB + 4 KiB: the next GiB boundary.
        assert_eq!(big.device_memory_start(), 7 * GIB);
        let mut a = DeviceMemoryAllocator::new(&small);
        assert_eq!(a.allocate(128 * MIB, 128 * MIB).unwrap(), 4 * GIB);
        // The next range starts past the first, at its own alignment.
        assert_eq!(a.allocate(2 * MIB, GIB).unwrap(), 5 * GIB);
        assert_eq!(a.allocate(4 * KIB, 0).unwrap(), 5 * GIB + 2 * MIB);
        assert!(matches!(
            a.allocate(MAX_DEVICE_MEMORY_END, 4 * KIB),
            Err(MemoryError::NoRoomForDeviceMemory { .. })
        ));
        assert!(matches!(
            a.allocate(u64::MAX - 4095, 4 * KIB),
            Err(MemoryError::NoRoomForDeviceMemory { .. })
        ));
        assert!(a.allocate(0, 4 * KIB).is_err());
        assert!(a.allocate(100, 4 * KIB).is_err());
        assert!(a.allocate(4 * KIB, 3 * KIB).is_err());
        // Failures take nothing.
        assert_eq!(
            a.allocate(4 * KIB, 4 * KIB).unwrap(),
            5 * GIB + 2 * MIB + 4 * KIB
        );
        // No device memory is RAM, in the e820 map or otherwise.
        assert!(!small.is_ram(4 * GIB, 1));
        assert!(!small.e820().iter().any(|e| e.end() > 4 * GIB));
    }

    #[test]
    fn guest_memory_with_device_ranges() {
        use vm_memory::GuestMemoryBackend;
        let l = GuestLayout::new(64 * MIB).unwrap();
        let m = create_guest_memory_with(&l, &[(4 * GIB, 256 * MIB)]).unwrap();
        assert_eq!(m.num_regions(), 2);
        assert!(m.address_in_range(GuestAddress(4 * GIB + 256 * MIB - 1)));
        assert!(!m.address_in_range(GuestAddress(4 * GIB + 256 * MIB)));
        // Below the device memory start (overlapping RAM or the gap), unaligned or empty.
        for bad in [(32 * MIB, 4 * KIB), (4 * GIB + 1, 4 * KIB), (4 * GIB, 0)] {
            assert!(matches!(
                create_guest_memory_with(&l, &[bad]),
                Err(MemoryError::BadDeviceMemory { .. })
            ));
        }
    }

    #[test]
    fn shared_memory_is_one_memfd_at_increasing_offsets() {
        use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
        let l = GuestLayout::new(64 * MIB).unwrap();
        let m = create_guest_memory_backed(&l, &[(4 * GIB, 2 * MIB)], Backing::Shared).unwrap();
        let regions: Vec<_> = m.iter().collect();
        assert_eq!(regions.len(), 2);
        let f0 = regions[0].file_offset().expect("RAM is file-backed");
        let f1 = regions[1]
            .file_offset()
            .expect("device memory is file-backed");
        assert_eq!(f0.start(), 0);
        assert_eq!(f1.start(), 64 * MIB);
        assert!(std::sync::Arc::ptr_eq(f0.arc(), f1.arc()));
        assert_eq!(f0.file().metadata().unwrap().len(), 66 * MIB);
        // A write through the guest mapping is in the file at the region's offset.
        m.write_obj(0xabcdu32, GuestAddress(4 * GIB + 8)).unwrap();
        let mut word = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(f1.file(), &mut word, 64 * MIB + 8).unwrap();
        assert_eq!(u32::from_le_bytes(word), 0xabcd);
        // The file cannot shrink under the mappings.
        assert!(f0.file().set_len(MIB).is_err());
        // Private memory has no file.
        let p = create_guest_memory(&l).unwrap();
        assert!(p.iter().all(|r| r.file_offset().is_none()));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512").unwrap(), 512 * MIB);
        assert_eq!(parse_size("512M").unwrap(), 512 * MIB);
        assert_eq!(parse_size("2G").unwrap(), 2 * GIB);
        assert_eq!(parse_size("1536MiB").unwrap(), 1536 * MIB);
        assert_eq!(parse_size("64k").unwrap(), 64 * KIB);
        assert!(parse_size("").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }
}
