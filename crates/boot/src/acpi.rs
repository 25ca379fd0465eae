//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), MADT, MCFG (when there is a PCI bus) and
//! a DSDT describing the legacy devices Vessel emulates, the virtio-mmio devices, the PCI
//! host bridge and the VM generation ID (with the generic event device announcing its
//! changes). Built with `acpi_tables`, placed from [`addr::RSDP_START`] up in
//! the BIOS area (0xe0000..1 MiB, e820-reserved), where Linux also scans for the RSDP.

use acpi_tables::aml::{
    self, AddressSpaceCacheable, And, Arg, Device, EISAName, Equal, Field, FieldAccessType,
    FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt, Local, Memory32Fixed, Method,
    MethodCall, Name, NotEqual, Notify, OpRegion, OpRegionSpace, Package, Path, ResourceTemplate,
    Return, Store, Zero, IO,
};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vessel_memory::vm_memory::{Bytes, GuestAddress};
use vessel_memory::{addr, ports, GuestMemoryMmap};

use crate::error::BootError;

/// OEM ID of every table.
pub const OEM_ID: [u8; 6] = *b"VESSEL";
/// OEM table ID of every table.
const OEM_TABLE_ID: [u8; 8] = *b"VESSELVM";
const OEM_REVISION: u32 = 1;
/// FADT hypervisor vendor identity.
const HYPERVISOR_ID: [u8; 8] = *b"VESSEL  ";
/// End (exclusive) of the part of the BIOS area the tables live in (the VM generation ID
/// follows).
const TABLES_END: u64 = addr::VMGENID_START;
/// Alignment of each table.
const TABLE_ALIGN: u64 = 16;
/// Alignment of the FACS.
const FACS_ALIGN: u64 = 64;

/// FADT IAPC_BOOT_ARCH: an 8042 keyboard controller is present.
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
/// FADT IAPC_BOOT_ARCH: no VGA hardware.
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;

/// MADT flags: the platform also has dual 8259 PICs.
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT revision for ACPI 6.2+.
const MADT_REVISION: u8 = 5;
/// The IO-APIC's ID (what KVM's in-kernel IO-APIC reports after reset).
pub const IOAPIC_ID: u8 = 0;
/// MADT structure types written by hand (acpi_tables has the other two).
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// MPS INTI flags: polarity (bits 0-1) and trigger mode (bits 2-3).
const INTI_ACTIVE_HIGH: u16 = 0b01;
const INTI_EDGE: u16 = 0b01 << 2;
const INTI_LEVEL: u16 = 0b11 << 2;
/// ACPI processor UID meaning "all processors".
const ALL_PROCESSORS: u8 = 0xff;

/// DSDT revision 2: integers are 64 bits.
const DSDT_REVISION: u8 = 2;

/// Reject vCPU counts the tables cannot describe (xAPIC IDs 0..=254; 255 is broadcast).
pub(crate) fn check_cpus(num_cpus: u8) -> Result<(), BootError> {
    if num_cpus == 0 {
        return Err(BootError::BadCpuCount(0));
    }
    Ok(())
}

/// AML already encoded, placed as is inside a scope.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        for b in &self.0 {
            sink.byte(*b);
        }
    }
}

/// The AML bytes of `t`.
fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// A virtio-mmio device as the DSDT describes it (`LNRO0005`, the id Linux's virtio_mmio
/// driver matches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    pub base: u64,
    pub len: u64,
    /// IO-APIC pin (edge-triggered, active high).
    pub irq: u32,
}

/// The devices beyond the fixed legacy set that the tables describe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlatformDevices {
    pub virtio_mmio: Vec<MmioDeviceInfo>,
    /// A PCI host bridge on segment 0, bus 0: configuration through ports 0xcf8/0xcfc and ECAM
    /// at [`addr::PCI_ECAM_START`] (MCFG), BARs in [`addr::PCI_MMIO32_START`]..
    pub pci: bool,
    /// The VM generation ID device.
    pub vmgenid: Option<VmGenIdInfo>,
    /// ACPI PCI hotplug on the host bridge's bus (with `pci`): one ejectable slot object
    /// per slot, the hotplug controller's registers at [`ports::PCI_HOTPLUG`], and the
    /// generic event device on this GSI telling the guest to look at them.
    pub pci_hotplug: Option<u32>,
    /// The guest boots through firmware (SeaBIOS, OVMF), as on a PC: full ACPI (the FADT
    /// points at the PM1 blocks and PM timer at [`ports::ACPI_PM1_EVT`], and at a FACS), and
    /// the host bridge's 32-bit window is the whole MMIO gap below the IO-APIC, where the
    /// firmware puts the BARs.
    pub firmware: bool,
    /// With `firmware`: the host bridge's 64-bit window (start, end exclusive), from above
    /// RAM, where OVMF puts 64-bit BARs.
    pub pci_mmio64: Option<(u64, u64)>,
}

/// Where the VM generation ID is and how the guest learns that it changed.
///
/// Microsoft's "Virtual Machine Generation ID" device (what Linux's `vmgenid` driver binds
/// to): `_HID` `VMGENCTR`, `_CID` `VM_Gen_Counter`, and an `ADDR` method returning
/// `Package { low 32 bits, high 32 bits }` of the 16-byte ID's guest-physical address. The
/// platform is hardware-reduced (no SCI, no GPE block), so the change notification comes
/// from an ACPI generic event device (`ACPI0013`): its interrupt runs `_EVT`, which sends
/// `Notify(VGEN, 0x80)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmGenIdInfo {
    /// Guest-physical address of the ID (8-byte aligned, in e820-reserved memory).
    pub addr: u64,
    /// The generic event device's GSI (edge-triggered, active high).
    pub irq: u32,
}

/// The tables laid out from `start` (an address, or 0 for offsets in one blob): each
/// (signature, where, bytes), the XSDT last, and the RSDP pointing at the XSDT.
struct Laid {
    tables: Vec<([u8; 4], u64, Vec<u8>)>,
    rsdp: Vec<u8>,
    end: u64,
}

fn lay_out(num_cpus: u8, devices: &PlatformDevices, start: u64) -> Result<Laid, BootError> {
    check_cpus(num_cpus)?;
    let mut next = start;
    let mut place = |len: usize| {
        let at = next.next_multiple_of(TABLE_ALIGN);
        next = at + len as u64;
        at
    };
    let mut tables = Vec::new();
    let facs_addr = devices.firmware.then(|| {
        // The FACS must be 64-byte aligned.
        let at = place(FACS::len() + FACS_ALIGN as usize).next_multiple_of(FACS_ALIGN);
        tables.push((*b"FACS", at, bytes_of(&FACS::new())));
        at
    });
    let dsdt = dsdt(devices);
    let dsdt_addr = place(dsdt.len());
    tables.push((*b"DSDT", dsdt_addr, dsdt));
    let fadt = fadt(dsdt_addr, facs_addr);
    tables.push((*b"FACP", place(fadt.len()), fadt));
    let madt = madt(num_cpus);
    tables.push((*b"APIC", place(madt.len()), madt));
    if devices.pci {
        let mcfg = mcfg();
        tables.push((*b"MCFG", place(mcfg.len()), mcfg));
    }
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // The DSDT and the FACS are reached through the FADT.
    for (_, at, _) in tables
        .iter()
        .filter(|(s, _, _)| s != b"DSDT" && s != b"FACS")
    {
        xsdt.add_entry(*at);
    }
    let xsdt = bytes_of(&xsdt);
    let xsdt_addr = place(xsdt.len());
    tables.push((*b"XSDT", xsdt_addr, xsdt));
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));
    Ok(Laid {
        tables,
        rsdp,
        end: place(0),
    })
}

/// Write the ACPI tables for `num_cpus` vCPUs and `devices`; returns the RSDP's address
/// ([`addr::RSDP_START`]) for the zero page or PVH start info.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    devices: &PlatformDevices,
) -> Result<u64, BootError> {
    let laid = lay_out(num_cpus, devices, addr::RSDP_START + Rsdp::len() as u64)?;
    if laid.end > TABLES_END {
        return Err(BootError::TableTooLarge {
            what: "ACPI tables",
            size: (laid.end - addr::RSDP_START) as usize,
            space: "BIOS area (0xe0000..0xff000)",
        });
    }
    mem.write_slice(&laid.rsdp, GuestAddress(addr::RSDP_START))
        .map_err(BootError::write("RSDP", addr::RSDP_START))?;
    for (sig, at, bytes) in &laid.tables {
        let what = match sig {
            b"DSDT" => "DSDT",
            b"FACP" => "FADT",
            b"APIC" => "MADT",
            b"MCFG" => "MCFG",
            _ => "XSDT",
        };
        mem.write_slice(bytes, GuestAddress(*at))
            .map_err(BootError::write(what, *at))?;
    }
    log::debug!(
        "ACPI tables for {num_cpus} vCPUs at {:#x}..{:#x}",
        addr::RSDP_START,
        laid.end
    );
    Ok(addr::RSDP_START)
}

/// The ACPI tables for a firmware to install (QEMU's fw_cfg table-loader convention): every
/// table in one blob, with its pointers holding offsets in that blob, and the RSDP apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareAcpi {
    /// The RSDP (36 bytes); its XSDT address is an offset in `tables`.
    pub rsdp: Vec<u8>,
    /// DSDT, FADT, MADT, MCFG (with PCI) and XSDT, 16-byte aligned.
    pub tables: Vec<u8>,
    /// Each table: (signature, offset in `tables`, length). All but the FACS have a checksum.
    pub layout: Vec<([u8; 4], usize, usize)>,
    /// The 8-byte pointer fields in `tables` (offsets) that the firmware must relocate by
    /// where it puts `tables`.
    pub pointers: Vec<usize>,
    /// The RSDP's one pointer (to the XSDT), at this offset in `rsdp`.
    pub rsdp_pointer: usize,
}

/// FADT field offsets (ACPI 6): `X_FIRMWARE_CTRL` (the FACS), `X_DSDT`.
const FADT_X_FIRMWARE_CTRL: usize = 132;
const FADT_X_DSDT: usize = 140;
/// RSDP field offset: `XsdtAddress`.
const RSDP_XSDT: usize = 24;
/// Size of a table header (the XSDT's entries follow it).
const SDT_HEADER: usize = 36;

/// The tables of [`create_acpi_tables`], for a firmware.
pub fn firmware_acpi_tables(
    num_cpus: u8,
    devices: &PlatformDevices,
) -> Result<FirmwareAcpi, BootError> {
    let laid = lay_out(num_cpus, devices, 0)?;
    let mut tables = vec![0u8; laid.end as usize];
    let mut layout = Vec::new();
    let mut pointers = Vec::new();
    for (sig, at, bytes) in &laid.tables {
        let at = *at as usize;
        tables[at..at + bytes.len()].copy_from_slice(bytes);
        layout.push((*sig, at, bytes.len()));
        match sig {
            b"FACP" => {
                pointers.push(at + FADT_X_DSDT);
                if devices.firmware {
                    pointers.push(at + FADT_X_FIRMWARE_CTRL);
                }
            }
            b"XSDT" => {
                pointers.extend((SDT_HEADER..bytes.len()).step_by(8).map(|o| at + o));
            }
            _ => {}
        }
    }
    Ok(FirmwareAcpi {
        rsdp: laid.rsdp,
        tables,
        layout,
        pointers,
        rsdp_pointer: RSDP_XSDT,
    })
}

/// An 8-bit register in the system I/O space.
fn io_port_byte(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// The FADT, pointing at the DSDT by its 64-bit address: hardware-reduced ACPI with sleep
/// control/status and reset registers in I/O space; or, with a FACS (a firmware boot), a PC's
/// full ACPI with the PM1 blocks and PM timer instead of the sleep registers.
fn fadt(dsdt_addr: u64, facs_addr: Option<u64>) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::ResetRegSup);
    match facs_addr {
        None => f = f.flag(Flags::HwReducedAcpi),
        Some(facs) => {
            f = f.firmware_ctrl_64(facs);
            let block = |port: u16, len: u8| {
                GAS::new(
                    AddressSpace::SystemIo,
                    len * 8,
                    0,
                    AccessSize::ByteAccess,
                    u64::from(port),
                )
            };
            f.pm1a_evt_blk = u32::from(ports::ACPI_PM1_EVT).into();
            f.pm1_evt_len = 4;
            f.x_pm1a_evt_blk = block(ports::ACPI_PM1_EVT, 4);
            f.pm1a_cnt_blk = u32::from(ports::ACPI_PM1_CNT).into();
            f.pm1_cnt_len = 2;
            f.x_pm1a_cnt_blk = block(ports::ACPI_PM1_CNT, 2);
            f.pm_tmr_blk = u32::from(ports::ACPI_PM_TMR).into();
            f.pm_tmr_len = 4;
            f.x_pm_tmr_blk = block(ports::ACPI_PM_TMR, 4);
        }
    }
    // Ignored when hardware-reduced, but what a PC would say.
    f.sci_int = (ports::ACPI_SCI_IRQ as u16).into();
    // An i8042 is emulated; there is no VGA; MSI works (MSI_NOT_SUPPORTED clear); CMOS RTC
    // present (NO_CMOS_RTC clear).
    f.iapc_boot_arch = (IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_NO_VGA).into();
    f.reset_reg = io_port_byte(ports::ACPI_RESET);
    f.reset_value = ports::ACPI_RESET_VALUE;
    if facs_addr.is_none() {
        f.sleep_control_reg = io_port_byte(ports::ACPI_SLEEP_CONTROL);
        f.sleep_status_reg = io_port_byte(ports::ACPI_SLEEP_STATUS);
    }
    f.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_ID).into();
    bytes_of(&f.finalize())
}

/// A MADT interrupt source override (ISA `irq` arrives at `gsi`).
fn interrupt_source_override(irq: u8, gsi: u32, flags: u16) -> Vec<u8> {
    let mut v = vec![MADT_INTERRUPT_SOURCE_OVERRIDE, 10, 0 /* ISA */, irq];
    v.extend_from_slice(&gsi.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v
}

/// A MADT local APIC NMI structure: NMI on `lint` of every processor.
fn local_apic_nmi(lint: u8) -> Vec<u8> {
    let mut v = vec![MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS];
    v.extend_from_slice(&0u16.to_le_bytes()); // flags: conforms to the bus
    v.push(lint);
    v
}

/// The MADT: one enabled local APIC per vCPU (APIC ID = index), the IO-APIC, the ISA
/// overrides of a PC (IRQ0 at GSI 2; IRQ9, the SCI, level-triggered active-high), and NMI
/// on LINT1.
fn madt(num_cpus: u8) -> Vec<u8> {
    let mut t = Sdt::new(
        *b"APIC",
        44,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    t.write_u32(36, addr::LAPIC_START as u32);
    t.write_u32(40, MADT_PCAT_COMPAT);
    for id in 0..num_cpus {
        t.append_slice(&bytes_of(&ProcessorLocalApic::new(
            id,
            id,
            EnabledStatus::Enabled,
        )));
    }
    t.append_slice(&bytes_of(&IoApic::new(
        IOAPIC_ID,
        addr::IOAPIC_START as u32,
        0,
    )));
    t.append_slice(&interrupt_source_override(
        0,
        2,
        INTI_ACTIVE_HIGH | INTI_EDGE,
    ));
    t.append_slice(&interrupt_source_override(
        ports::ACPI_SCI_IRQ as u8,
        ports::ACPI_SCI_IRQ,
        INTI_ACTIVE_HIGH | INTI_LEVEL,
    ));
    t.append_slice(&local_apic_nmi(1));
    t.as_slice().to_vec()
}

/// MCFG: ECAM for segment 0, bus 0.
fn mcfg() -> Vec<u8> {
    let mut t = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.add_ecam(addr::PCI_ECAM_START, 0, 0, 0);
    bytes_of(&t)
}

/// The PCI host bridge (`PNP0A08`, compatible with `PNP0A03`) on bus 0 with its windows, and a
/// motherboard-resource device reserving the ECAM range (Linux checks it before using MCFG).
fn pci_devices(devices: &PlatformDevices, hotplug: bool, out: &mut Vec<u8>) {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0A08"));
    let cid = Name::new("_CID".into(), &EISAName::new("PNP0A03"));
    let adr = Name::new("_ADR".into(), &0u8);
    let seg = Name::new("_SEG".into(), &0u8);
    let uid = Name::new("_UID".into(), &0u8);
    let bbn = Name::new("_BBN".into(), &0u8);
    let buses = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cfg_io = IO::new(
        ports::PCI_CONFIG_ADDRESS,
        ports::PCI_CONFIG_ADDRESS,
        1,
        ports::PCI_CONFIG_LEN as u8,
    );
    let io_low = aml::AddressSpace::new_io(0u16, ports::PCI_CONFIG_ADDRESS - 1, None);
    let io_high = aml::AddressSpace::new_io(0x0d00u16, 0xffffu16, None);
    let (start, end) = match devices.firmware {
        true => (addr::MMIO_GAP_START, addr::IOAPIC_START),
        false => (addr::PCI_MMIO32_START, addr::PCI_MMIO32_END),
    };
    let mem32 = aml::AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        start as u32,
        (end - 1) as u32,
        None,
    );
    let mem64 = devices
        .pci_mmio64
        .filter(|(start, end)| devices.firmware && start < end)
        .map(|(start, end)| {
            aml::AddressSpace::new_memory(
                AddressSpaceCacheable::NotCacheable,
                true,
                start,
                end - 1,
                None,
            )
        });
    let mut windows: Vec<&dyn Aml> = vec![&buses, &cfg_io, &io_low, &io_high, &mem32];
    if let Some(w) = &mem64 {
        windows.push(w);
    }
    let crs = ResourceTemplate::new(windows);
    let crs = Name::new("_CRS".into(), &crs);
    let slots = RawAml(if hotplug {
        pci_hotplug_slots()
    } else {
        Vec::new()
    });
    Device::new(
        "PCI0".into(),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs, &slots],
    )
    .to_aml_bytes(out);

    let hid = Name::new("_HID".into(), &EISAName::new("PNP0C02"));
    let uid = Name::new("_UID".into(), &1u8);
    let ecam = Memory32Fixed::new(
        false,
        addr::PCI_ECAM_START as u32,
        addr::PCI_ECAM_SIZE as u32,
    );
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&ecam]));
    Device::new("MRES".into(), vec![&hid, &uid, &crs]).to_aml_bytes(out);
}

/// Slot `n`'s device object in `\_SB_.PCI0`.
fn slot_name(slot: u8) -> String {
    format!("S{slot:02X}_")
}

/// What ACPI PCI hotplug adds inside `\_SB_.PCI0` (what Linux's `acpiphp` drives):
/// - the controller's registers: `PCIU` (slots with a new device) and `PCID` (slots whose
///   device the guest is asked to eject), each cleared by the VMM when read, and `B0EJ`;
/// - `S01_`..`S1F_`, one per slot, with `_ADR`, `_SUN` and `_EJ0`, which writes the slot's bit
///   to `B0EJ` once the guest has let go of the device (the VMM then removes it);
/// - `PCNT`, run by the generic event device: a bus check (`Notify 1`) on each slot in
///   `PCIU`, and an eject request (`Notify 3`) on each slot in `PCID`.
fn pci_hotplug_slots() -> Vec<u8> {
    let mut out = Vec::new();
    let port = usize::from(ports::PCI_HOTPLUG);
    let len = ports::PCI_HOTPLUG_LEN as usize;
    OpRegion::new("PCST".into(), OpRegionSpace::SystemIO, &port, &len).to_aml_bytes(&mut out);
    Field::new(
        "PCST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Named(*b"PCIU", 32),
            FieldEntry::Named(*b"PCID", 32),
            FieldEntry::Named(*b"B0EJ", 32),
        ],
    )
    .to_aml_bytes(&mut out);
    let b0ej = Path::new("B0EJ");
    for slot in 1..PCI_SLOTS {
        let adr = Name::new("_ADR".into(), &(u32::from(slot) << 16));
        let sun = Name::new("_SUN".into(), &u32::from(slot));
        let bit = 1u32 << slot;
        let eject = Store::new(&b0ej, &bit);
        let ej0 = Method::new("_EJ0".into(), 1, false, vec![&eject]);
        Device::new(slot_name(slot).as_str().into(), vec![&adr, &sun, &ej0]).to_aml_bytes(&mut out);
    }
    let (up, down) = (Local(0), Local(1));
    let (pciu, pcid) = (Path::new("PCIU"), Path::new("PCID"));
    let read_up = Store::new(&up, &pciu);
    let read_down = Store::new(&down, &pcid);
    let mut body: Vec<Vec<u8>> = Vec::new();
    for slot in 1..PCI_SLOTS {
        let bit = 1u32 << slot;
        let target = Path::new(slot_name(slot).as_str());
        for (set, kind) in [(&up, 1u8), (&down, 3u8)] {
            let hit = And::new(&Zero {}, set, &bit);
            let hit = NotEqual::new(&hit, &Zero {});
            let notify = Notify::new(&target, &kind);
            body.push(bytes_of(&If::new(&hit, vec![&notify])));
        }
    }
    let body: Vec<RawAml> = body.into_iter().map(RawAml).collect();
    let mut children: Vec<&dyn Aml> = vec![&read_up, &read_down];
    children.extend(body.iter().map(|b| b as &dyn Aml));
    Method::new("PCNT".into(), 0, true, children).to_aml_bytes(&mut out);
    out
}

/// Slots of bus 0 (slot 0 is the host bridge).
const PCI_SLOTS: u8 = 32;

/// One `LNRO0005` device per virtio-mmio window.
fn virtio_mmio_devices(devices: &[MmioDeviceInfo], out: &mut Vec<u8>) {
    for (i, d) in devices.iter().enumerate() {
        let hid = Name::new("_HID".into(), &"LNRO0005");
        let uid = Name::new("_UID".into(), &(i as u32));
        let regs = Memory32Fixed::new(true, d.base as u32, d.len as u32);
        let irq = Interrupt::new(true, true, false, false, d.irq);
        let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&regs, &irq]));
        Device::new(format!("VR{i:02X}").as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(out);
    }
}

/// The VM generation ID device `\_SB_.VGEN` (see [`VmGenIdInfo`]).
fn vmgenid_device(v: &VmGenIdInfo, out: &mut Vec<u8>) {
    let hid = Name::new("_HID".into(), &"VMGENCTR");
    let cid = Name::new("_CID".into(), &"VM_Gen_Counter");
    let ddn = Name::new("_DDN".into(), &"VM_Gen_Counter");
    let (low, high) = (v.addr as u32, (v.addr >> 32) as u32);
    let pkg = Package::new(vec![&low, &high]);
    let ret = Return::new(&pkg);
    let addr = Method::new("ADDR".into(), 0, false, vec![&ret]);
    Device::new("VGEN".into(), vec![&hid, &cid, &ddn, &addr]).to_aml_bytes(out);
}

/// The generic event device `\_SB_.GED_` (`ACPI0013`; the platform is hardware-reduced:
/// no SCI, no GPE block): each edge on `gsi` runs `_EVT`, which sends `Notify(VGEN, 0x80)`
/// (the VM generation ID may have changed) and runs `\_SB_.PCI0.PCNT` (the PCI slots may
/// have changed), for the devices the VM has. Both are harmless when nothing changed: the
/// `vmgenid` driver compares the ID, and `PCNT` finds no bits set.
fn generic_event_device(gsi: u32, vmgenid: bool, pci_hotplug: bool, out: &mut Vec<u8>) {
    let hid = Name::new("_HID".into(), &"ACPI0013");
    let uid = Name::new("_UID".into(), &0u8);
    let irq = Interrupt::new(true, true, false, false, gsi);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&irq]));
    // Linux's evged runs `_EVT(GSI)` for each interrupt of `_CRS`.
    let vgen = Path::new("\\_SB_.VGEN");
    let notify = Notify::new(&vgen, &0x80u8);
    let pcnt = MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![]);
    let mut actions: Vec<&dyn Aml> = Vec::new();
    if vmgenid {
        actions.push(&notify);
    }
    if pci_hotplug {
        actions.push(&pcnt);
    }
    let ours = Equal::new(&Arg(0), &gsi);
    let when = If::new(&ours, actions);
    let evt = Method::new("_EVT".into(), 1, false, vec![&when]);
    Device::new("GED_".into(), vec![&hid, &uid, &crs, &evt]).to_aml_bytes(out);
}

/// The DSDT: `\_S5_` (soft off) and, in `\_SB_`, COM1, the i8042 and the CMOS RTC with
/// their I/O ports and IRQs, the virtio-mmio devices, the PCI host bridge and the VM
/// generation ID.
fn dsdt(devices: &PlatformDevices) -> Vec<u8> {
    let mut body = bytes_of(&Name::new(
        "_S5_".into(),
        &Package::new(vec![&ports::SLEEP_TYPE_S5, &0u8, &0u8, &0u8]),
    ));

    // Edge-triggered, active-high, exclusive ISA interrupts.
    let isa_irq = |irq: u32| Interrupt::new(true, true, false, false, irq);
    let fixed_io = |port: u16, len: u8| IO::new(port, port, 1, len);

    let com1_io = fixed_io(ports::COM1, 8);
    let com1_irq = isa_irq(ports::COM1_IRQ);
    let com1_crs = ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let com1_uid = Name::new("_UID".into(), &0u8);
    let com1_crs = Name::new("_CRS".into(), &com1_crs);
    let com1 = Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);

    let kbd_data = fixed_io(ports::I8042_DATA, 1);
    let kbd_cmd = fixed_io(ports::I8042_COMMAND, 1);
    let kbd_irq = isa_irq(1);
    let kbd_crs = ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]);
    let kbd_hid = Name::new("_HID".into(), &EISAName::new("PNP0303"));
    let kbd_crs = Name::new("_CRS".into(), &kbd_crs);
    let kbd = Device::new("PS2K".into(), vec![&kbd_hid, &kbd_crs]);

    let rtc_io = fixed_io(ports::RTC_INDEX, 2);
    let rtc_irq = isa_irq(ports::RTC_IRQ);
    let rtc_crs = ResourceTemplate::new(vec![&rtc_io, &rtc_irq]);
    let rtc_hid = Name::new("_HID".into(), &EISAName::new("PNP0B00"));
    let rtc_crs = Name::new("_CRS".into(), &rtc_crs);
    let rtc = Device::new("RTC_".into(), vec![&rtc_hid, &rtc_crs]);

    let mut extra = Vec::new();
    virtio_mmio_devices(&devices.virtio_mmio, &mut extra);
    let hotplug = devices.pci_hotplug.filter(|_| devices.pci);
    if devices.pci {
        pci_devices(devices, hotplug.is_some(), &mut extra);
    }
    if let Some(v) = &devices.vmgenid {
        vmgenid_device(v, &mut extra);
    }
    // One generic event device, on the VM generation ID's interrupt when there is one.
    if let Some(gsi) = devices.vmgenid.map(|v| v.irq).or(hotplug) {
        generic_event_device(
            gsi,
            devices.vmgenid.is_some(),
            hotplug.is_some(),
            &mut extra,
        );
    }
    let extra = RawAml(extra);
    aml::Scope::new("\\_SB_".into(), vec![&com1, &kbd, &rtc, &extra]).to_aml_bytes(&mut body);

    let mut t = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    t.append_slice(&body);
    t.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{self, read_bytes, sum, u16_at, u32_at, u64_at, MIB};

    /// A table read back from guest memory by its header's length.
    fn table_at(mem: &GuestMemoryMmap, at: u64) -> Vec<u8> {
        let len = u32_at(&read_bytes(mem, at, 8), 4) as usize;
        assert!((36..=0x2_0000).contains(&len), "table length {len}");
        read_bytes(mem, at, len)
    }

    /// Follow RSDP -> XSDT -> tables; return (signature, address, bytes) of each, checking
    /// every checksum on the way.
    fn tables(mem: &GuestMemoryMmap, rsdp_addr: u64) -> Vec<([u8; 4], u64, Vec<u8>)> {
        let rsdp = read_bytes(mem, rsdp_addr, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "revision");
        assert_eq!(&rsdp[9..15], b"VESSEL");
        assert_eq!(u32_at(&rsdp, 20), 36, "length");
        let xsdt_addr = u64_at(&rsdp, 24);
        assert!((addr::RSDP_START..0x10_0000).contains(&xsdt_addr));

        let xsdt = table_at(mem, xsdt_addr);
        assert_eq!(&xsdt[0..4], b"XSDT");
        assert_eq!(sum(&xsdt), 0, "XSDT checksum");
        let mut out = vec![(*b"XSDT", xsdt_addr, xsdt.clone())];
        for entry in xsdt[36..].chunks_exact(8) {
            let at = u64::from_le_bytes(entry.try_into().unwrap());
            let t = table_at(mem, at);
            let sig: [u8; 4] = t[0..4].try_into().unwrap();
            assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(&sig));
            assert_eq!(&t[10..16], b"VESSEL", "OEM id");
            assert!(at + t.len() as u64 <= 0x10_0000);
            if &sig == b"FACP" {
                let dsdt_addr = u64_at(&t, 140);
                let d = table_at(mem, dsdt_addr);
                assert_eq!(&d[0..4], b"DSDT");
                assert_eq!(sum(&d), 0, "DSDT checksum");
                out.push((*b"DSDT", dsdt_addr, d));
            }
            out.push((sig, at, t));
        }
        out
    }

    fn find<'a>(all: &'a [([u8; 4], u64, Vec<u8>)], sig: &[u8; 4]) -> &'a [u8] {
        &all.iter()
            .find(|(s, _, _)| s == sig)
            .unwrap_or_else(|| panic!("no {}", String::from_utf8_lossy(sig)))
            .2
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    /// The compressed EISA ID of a PNP ID such as "PNP0501", as the bytes AML stores.
    fn eisa(id: &str) -> [u8; 4] {
        let b = id.as_bytes();
        let c = |i: usize| u16::from(b[i] - b'@');
        let vendor = (c(0) << 10) | (c(1) << 5) | c(2);
        let product = u16::from_str_radix(&id[3..], 16).unwrap();
        let [v0, v1] = vendor.to_be_bytes();
        let [p0, p1] = product.to_be_bytes();
        [v0, v1, p0, p1]
    }

    #[test]
    fn tables_chain_and_checksum() {
        let (mem, _) = testutil::guest(64 * MIB);
        let rsdp = create_acpi_tables(&mem, 4, &PlatformDevices::default()).unwrap();
        assert_eq!(rsdp, addr::RSDP_START);
        let all = tables(&mem, rsdp);
        let sigs: Vec<&[u8; 4]> = all.iter().map(|(s, _, _)| s).collect();
        for want in [b"XSDT", b"FACP", b"APIC", b"DSDT"] {
            assert!(sigs.contains(&want), "{sigs:?}");
        }
        // No two tables overlap, all after the RSDP.
        let mut ranges: Vec<(u64, u64)> = all
            .iter()
            .map(|(_, a, t)| (*a, a + t.len() as u64))
            .collect();
        ranges.sort();
        assert!(ranges[0].0 >= addr::RSDP_START + 36);
        for w in ranges.windows(2) {
            assert!(w[0].1 <= w[1].0, "{ranges:x?}");
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
        let (mem, _) = testutil::guest(64 * MIB);
        let all = tables(
            &mem,
            create_acpi_tables(&mem, 1, &PlatformDevices::default()).unwrap(),
        );
        let f = find(&all, b"FACP");
        assert_eq!(f.len(), 276);
        assert_eq!(f[8], 6, "major revision");
        assert_eq!(f[131], 5, "minor revision");
        let flags = u32_at(f, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        let iapc = u16_at(f, 109);
        assert_ne!(iapc & (1 << 1), 0, "8042");
        assert_ne!(iapc & (1 << 2), 0, "no VGA");
        assert_eq!(iapc & (1 << 3), 0, "MSI supported");
        assert_eq!(iapc & (1 << 5), 0, "CMOS RTC present");
        // GAS: space 1 (system I/O), 8 bits, offset 0, byte access, address.
        let gas = |off: usize| {
            (
                f[off],
                f[off + 1],
                f[off + 2],
                f[off + 3],
                u64_at(f, off + 4),
            )
        };
        assert_eq!(gas(116), (1, 8, 0, 1, u64::from(ports::ACPI_RESET)));
        assert_eq!(f[128], ports::ACPI_RESET_VALUE);
        assert_eq!(gas(244), (1, 8, 0, 1, u64::from(ports::ACPI_SLEEP_CONTROL)));
        assert_eq!(gas(256), (1, 8, 0, 1, u64::from(ports::ACPI_SLEEP_STATUS)));
        assert_eq!(&f[268..276], b"VESSEL  ");
        assert_eq!(u32_at(f, 40), 0, "32-bit DSDT pointer unused");
        assert_ne!(u64_at(f, 140), 0, "X_DSDT");
    }

    #[test]
    fn madt_lists_every_vcpu_and_the_pc_overrides() {
        for n in [1u8, 2, 7, 255] {
            let (mem, _) = testutil::guest(64 * MIB);
            let all = tables(
                &mem,
                create_acpi_tables(&mem, n, &PlatformDevices::default()).unwrap(),
            );
            let m = find(&all, b"APIC");
            assert_eq!(u32_at(m, 36) as u64, addr::LAPIC_START);
            assert_eq!(u32_at(m, 40) & 1, 1, "PCAT_COMPAT");
            let mut lapic_ids = Vec::new();
            let mut ioapics = Vec::new();
            let mut overrides = Vec::new();
            let mut nmis = Vec::new();
            let mut off = 44;
            while off < m.len() {
                let (kind, len) = (m[off], m[off + 1] as usize);
                let s = &m[off..off + len];
                match kind {
                    0 => {
                        assert_eq!(len, 8);
                        assert_eq!(s[2], s[3], "UID = APIC ID");
                        assert_eq!(u32_at(s, 4) & 1, 1, "enabled");
                        lapic_ids.push(s[3]);
                    }
                    1 => ioapics.push((s[2], u32_at(s, 4), u32_at(s, 8))),
                    2 => overrides.push((s[2], s[3], u32_at(s, 4), u16_at(s, 8))),
                    4 => nmis.push((s[2], u16_at(s, 3), s[5])),
                    k => panic!("unexpected MADT structure {k}"),
                }
                off += len;
            }
            assert_eq!(off, m.len());
            assert_eq!(lapic_ids, (0..n).collect::<Vec<u8>>());
            assert_eq!(ioapics, [(0, addr::IOAPIC_START as u32, 0)]);
            assert_eq!(overrides, [(0, 0, 2, 0x5), (0, 9, 9, 0xd)]);
            assert_eq!(nmis, [(0xff, 0, 1)]);
        }
    }

    #[test]
    fn dsdt_describes_s5_and_the_legacy_devices() {
        let (mem, _) = testutil::guest(64 * MIB);
        let all = tables(
            &mem,
            create_acpi_tables(&mem, 1, &PlatformDevices::default()).unwrap(),
        );
        let d = find(&all, b"DSDT");
        assert_eq!(d[8], 2, "revision 2 (64-bit integers)");
        // Name(_S5_, Package(4) {5, 0, 0, 0})
        let pkg = [b'_', b'S', b'5', b'_', 0x12];
        let at = d
            .windows(pkg.len())
            .position(|w| w == pkg)
            .expect("_S5_ package");
        let elements = &d[at + pkg.len() + 1..at + pkg.len() + 7];
        assert_eq!(elements, [4, 0x0a, ports::SLEEP_TYPE_S5, 0, 0, 0]);
        assert_eq!(d[at - 1], 0x08, "NameOp");
        for (id, io) in [
            ("PNP0501", vec![0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 1, 8]),
            (
                "PNP0303",
                vec![
                    0x47, 1, 0x60, 0, 0x60, 0, 1, 1, 0x47, 1, 0x64, 0, 0x64, 0, 1, 1,
                ],
            ),
            ("PNP0B00", vec![0x47, 1, 0x70, 0, 0x70, 0, 1, 2]),
        ] {
            let mut hid = b"_HID\x0c".to_vec();
            hid.extend_from_slice(&eisa(id));
            assert!(contains(d, &hid), "{id} _HID");
            assert!(contains(d, &io), "{id} I/O ports");
        }
        assert_eq!(eisa("PNP0501"), [0x41, 0xd0, 0x05, 0x01]);
        // Extended IRQ descriptors: consumer, edge, active-high, exclusive, one IRQ.
        for irq in [4u32, 1, 8] {
            let mut desc = vec![0x89, 6, 0, 0b0011, 1];
            desc.extend_from_slice(&irq.to_le_bytes());
            assert!(contains(d, &desc), "IRQ {irq}");
        }
        assert!(contains(d, b"_SB_"));
    }

    #[test]
    fn virtio_mmio_devices_and_the_pci_host_bridge() {
        let (mem, _) = testutil::guest(64 * MIB);
        let devices = PlatformDevices {
            virtio_mmio: vec![
                MmioDeviceInfo {
                    base: 0xd000_0000,
                    len: 0x1000,
                    irq: 5,
                },
                MmioDeviceInfo {
                    base: 0xd000_1000,
                    len: 0x1000,
                    irq: 6,
                },
            ],
            pci: true,
            vmgenid: None,
            pci_hotplug: None,
            firmware: false,
            pci_mmio64: None,
        };
        let all = tables(&mem, create_acpi_tables(&mem, 2, &devices).unwrap());
        let d = find(&all, b"DSDT");
        assert_eq!(d.windows(8).filter(|w| w == b"LNRO0005").count(), 2);
        for (i, dev) in devices.virtio_mmio.iter().enumerate() {
            // Memory32Fixed: read-write, base, length.
            let mut m = vec![0x86, 9, 0, 1];
            m.extend_from_slice(&(dev.base as u32).to_le_bytes());
            m.extend_from_slice(&(dev.len as u32).to_le_bytes());
            assert!(contains(d, &m), "window of device {i}");
            let mut irq = vec![0x89, 6, 0, 0b0011, 1];
            irq.extend_from_slice(&dev.irq.to_le_bytes());
            assert!(contains(d, &irq), "IRQ of device {i}");
        }
        let mut hid = b"_HID\x0c".to_vec();
        hid.extend_from_slice(&eisa("PNP0A08"));
        assert!(contains(d, &hid), "PCI host bridge");
        // The ECAM range is reserved as a motherboard resource.
        let mut ecam = vec![0x86, 9, 0, 0];
        ecam.extend_from_slice(&(addr::PCI_ECAM_START as u32).to_le_bytes());
        ecam.extend_from_slice(&(addr::PCI_ECAM_SIZE as u32).to_le_bytes());
        assert!(contains(d, &ecam));

        let m = find(&all, b"MCFG");
        assert_eq!(sum(m), 0, "MCFG checksum");
        // One allocation: base (u64), segment (u16), start bus, end bus.
        assert_eq!(m.len(), 44 + 16);
        assert_eq!(u64_at(m, 44), addr::PCI_ECAM_START);
        assert_eq!(&m[52..56], &[0, 0, 0, 0]);

        // Without PCI: no MCFG, no host bridge.
        let (mem, _) = testutil::guest(64 * MIB);
        let all = tables(
            &mem,
            create_acpi_tables(&mem, 1, &PlatformDevices::default()).unwrap(),
        );
        assert!(!all.iter().any(|(s, _, _)| s == b"MCFG"));
        assert!(!contains(find(&all, b"DSDT"), &hid));
    }

    /// An AML PkgLength at `at`: (the length it gives, counting itself; its own size).
    fn pkg_length(aml: &[u8], at: usize) -> (usize, usize) {
        let lead = aml[at];
        let extra = usize::from(lead >> 6);
        if extra == 0 {
            return (usize::from(lead & 0x3f), 1);
        }
        let mut len = usize::from(lead & 0x0f);
        for i in 0..extra {
            len |= usize::from(aml[at + 1 + i]) << (4 + 8 * i);
        }
        (len, 1 + extra)
    }

    /// The body (what follows the name) of `Device(name)` in `aml`.
    fn device_body<'a>(aml: &'a [u8], name: &[u8; 4]) -> &'a [u8] {
        (0..aml.len() - 6)
            .find_map(|i| {
                if aml[i..i + 2] != [0x5b, 0x82] {
                    return None;
                }
                let (len, size) = pkg_length(aml, i + 2);
                let name_at = i + 2 + size;
                (aml.get(name_at..name_at + 4) == Some(name))
                    .then(|| &aml[name_at + 4..i + 2 + len])
            })
            .unwrap_or_else(|| panic!("no device {}", String::from_utf8_lossy(name)))
    }

    /// An AML integer term at the start of `aml`: (value, bytes used).
    fn integer(aml: &[u8]) -> (u64, usize) {
        let le = |n: usize| {
            let mut v = [0u8; 8];
            v[..n].copy_from_slice(&aml[1..1 + n]);
            u64::from_le_bytes(v)
        };
        match aml[0] {
            0x00 => (0, 1),
            0x01 => (1, 1),
            0x0a => (le(1), 2),
            0x0b => (le(2), 3),
            0x0c => (le(4), 5),
            0x0e => (le(8), 9),
            op => panic!("not an integer: opcode {op:#x}"),
        }
    }

    /// `Name(name, "string")`.
    fn string_name(name: &str, value: &str) -> Vec<u8> {
        let mut v = vec![0x08];
        v.extend_from_slice(name.as_bytes());
        v.push(0x0d);
        v.extend_from_slice(value.as_bytes());
        v.push(0);
        v
    }

    /// What `ADDR` in `Device(VGEN)` returns: `Package(2) { low, high }` as one address.
    fn vmgenid_addr(dsdt: &[u8]) -> u64 {
        let dev = device_body(dsdt, b"VGEN");
        // Method(ADDR, 0) { Return (Package(2) {low, high}) }
        let at = dev
            .windows(6)
            .position(|w| w[..4] == *b"ADDR" && w[4] == 0 && w[5] == 0xa4)
            .expect("ADDR method returning a value")
            + 6;
        assert_eq!(dev[at], 0x12, "PackageOp");
        let (_, size) = pkg_length(dev, at + 1);
        let body = &dev[at + 1 + size..];
        assert_eq!(body[0], 2, "two elements");
        let (low, n) = integer(&body[1..]);
        let (high, _) = integer(&body[1 + n..]);
        assert!(low <= u64::from(u32::MAX) && high <= u64::from(u32::MAX));
        low | (high << 32)
    }

    #[test]
    fn vmgenid_device_and_the_generic_event_device_that_notifies_it() {
        let (mem, _) = testutil::guest(64 * MIB);
        let v = VmGenIdInfo {
            addr: addr::VMGENID_START,
            irq: ports::GED_IRQ,
        };
        let devices = PlatformDevices {
            vmgenid: Some(v),
            ..Default::default()
        };
        let all = tables(&mem, create_acpi_tables(&mem, 1, &devices).unwrap());
        let d = find(&all, b"DSDT");
        let vgen = device_body(d, b"VGEN");
        assert!(contains(vgen, &string_name("_HID", "VMGENCTR")));
        assert!(contains(vgen, &string_name("_CID", "VM_Gen_Counter")));
        assert!(contains(vgen, &string_name("_DDN", "VM_Gen_Counter")));
        assert_eq!(vmgenid_addr(d), addr::VMGENID_START);
        // The ID lies after every table.
        for (sig, at, t) in &all {
            assert!(
                at + t.len() as u64 <= addr::VMGENID_START,
                "{} overlaps the VM generation ID",
                String::from_utf8_lossy(sig)
            );
        }

        let ged = device_body(d, b"GED_");
        assert!(contains(ged, &string_name("_HID", "ACPI0013")));
        // Extended IRQ descriptor: consumer, edge, active-high, exclusive, the GED's GSI.
        let mut irq = vec![0x89, 6, 0, 0b0011, 1];
        irq.extend_from_slice(&ports::GED_IRQ.to_le_bytes());
        assert!(contains(ged, &irq));
        // Method(_EVT, 1) { If (Arg0 == GSI) { Notify(\_SB_.VGEN, 0x80) } }
        let evt = ged
            .windows(5)
            .position(|w| w[..4] == *b"_EVT" && w[4] == 1)
            .expect("_EVT with one argument");
        let body = &ged[evt + 5..];
        assert_eq!(body[0], 0xa0, "IfOp");
        let (_, size) = pkg_length(body, 1);
        let pred = &body[1 + size..];
        assert_eq!(&pred[..2], &[0x93, 0x68], "LEqual(Arg0, ...)");
        let (gsi, n) = integer(&pred[2..]);
        assert_eq!(gsi, u64::from(ports::GED_IRQ));
        let mut notify = vec![0x86, b'\\', 0x2e];
        notify.extend_from_slice(b"_SB_VGEN");
        notify.extend_from_slice(&[0x0a, 0x80]);
        assert_eq!(&pred[2 + n..2 + n + notify.len()], &notify[..]);

        // Both are in \_SB_; without a VM generation ID neither is there.
        assert!(contains(d, b"_SB_"));
        let plain = dsdt(&PlatformDevices::default());
        assert!(!contains(&plain, b"VMGENCTR"));
        assert!(!contains(&plain, b"ACPI0013"));
    }

    #[test]
    fn pci_hotplug_slots_controller_and_the_event_that_scans_them() {
        let devices = PlatformDevices {
            pci: true,
            pci_hotplug: Some(ports::GED_IRQ),
            ..Default::default()
        };
        let d = dsdt(&devices);
        if let Ok(path) = std::env::var("VESSEL_DUMP_DSDT") {
            std::fs::write(path, &d).unwrap();
        }
        let pci0 = device_body(&d, b"PCI0");
        // OperationRegion(PCST, SystemIO, PCI_HOTPLUG, 12).
        let mut region = vec![0x5b, 0x80];
        region.extend_from_slice(b"PCST");
        region.extend_from_slice(&[0x01, 0x0b]);
        region.extend_from_slice(&ports::PCI_HOTPLUG.to_le_bytes());
        region.extend_from_slice(&[0x0a, ports::PCI_HOTPLUG_LEN as u8]);
        assert!(contains(pci0, &region));
        for name in [b"PCIU", b"PCID", b"B0EJ"] {
            assert!(contains(pci0, name), "{}", String::from_utf8_lossy(name));
        }
        // S01..S1F: _ADR slot << 16, _SUN slot, and _EJ0 writing the slot's bit to B0EJ.
        for slot in 1u8..32 {
            let name = slot_name(slot);
            let body = device_body(pci0, name.as_bytes().try_into().unwrap());
            let adr = body.windows(4).position(|w| w == b"_ADR").expect("_ADR");
            assert_eq!(integer(&body[adr + 4..]).0, u64::from(slot) << 16, "{name}");
            let sun = body.windows(4).position(|w| w == b"_SUN").expect("_SUN");
            assert_eq!(integer(&body[sun + 4..]).0, u64::from(slot), "{name}");
            let ej0 = body.windows(4).position(|w| w == b"_EJ0").expect("_EJ0");
            // Method flags (1 argument), StoreOp, the bit, B0EJ.
            assert_eq!(&body[ej0 + 4..ej0 + 6], &[0x01, 0x70], "{name}");
            let (bit, n) = integer(&body[ej0 + 6..]);
            assert_eq!(bit, 1 << slot, "{name}");
            assert_eq!(&body[ej0 + 6 + n..ej0 + 10 + n], b"B0EJ", "{name}");
        }
        // PCNT notifies each slot: a bus check (1) from PCIU, an eject request (3) from PCID.
        let pcnt = pci0.windows(4).position(|w| w == b"PCNT").expect("PCNT");
        let pcnt = &pci0[pcnt..];
        for slot in 1u8..32 {
            for kind in [1u8, 3] {
                let mut notify = vec![0x86];
                notify.extend_from_slice(slot_name(slot).as_bytes());
                // OneOp, or BytePrefix 3.
                notify.extend_from_slice(if kind == 1 { &[0x01][..] } else { &[0x0a, 3] });
                assert!(contains(pcnt, &notify), "Notify(S{slot:02X}, {kind})");
            }
        }
        // The generic event device runs it; there is no VM generation ID to notify.
        let ged = device_body(&d, b"GED_");
        // MethodCall: RootChar, MultiNamePrefix, 3 segments.
        assert!(contains(ged, b"\\/\x03_SB_PCI0PCNT"));
        assert!(!contains(ged, b"VGEN"));
        // Without hotplug (or without a PCI bus) none of it is there.
        for devices in [
            PlatformDevices {
                pci: true,
                ..Default::default()
            },
            PlatformDevices {
                pci_hotplug: Some(ports::GED_IRQ),
                ..Default::default()
            },
        ] {
            let d = dsdt(&devices);
            assert!(!contains(&d, b"PCNT") && !contains(&d, b"ACPI0013"));
        }
    }

    #[test]
    fn vmgenid_addresses_above_4_gib_are_split_in_two_halves() {
        let d = dsdt(&PlatformDevices {
            vmgenid: Some(VmGenIdInfo {
                addr: 0x12_3456_7ff8,
                irq: 5,
            }),
            ..Default::default()
        });
        assert_eq!(vmgenid_addr(&d), 0x12_3456_7ff8);
    }

    #[test]
    fn zero_cpus_is_refused() {
        let (mem, _) = testutil::guest(64 * MIB);
        let err = create_acpi_tables(&mem, 0, &PlatformDevices::default()).unwrap_err();
        assert!(matches!(err, BootError::BadCpuCount(0)), "{err}");
    }

    /// Booted through firmware, the host bridge's windows are the MMIO gap below the
    /// IO-APIC and, with a 64-bit window, a QWord memory range (descriptor 0x8a) for the
    /// BARs OVMF puts above RAM; without firmware there is no 64-bit window.
    #[test]
    fn a_firmware_host_bridge_has_a_64_bit_window() {
        let window = (4u64 << 30, 512u64 << 30);
        let dsdt = |firmware: bool| {
            let devices = PlatformDevices {
                pci: true,
                firmware,
                pci_mmio64: Some(window),
                ..Default::default()
            };
            let fw = firmware_acpi_tables(1, &devices).unwrap();
            let (_, at, len) = *fw.layout.iter().find(|(s, _, _)| s == b"DSDT").unwrap();
            fw.tables[at..at + len].to_vec()
        };
        let qword = |d: &[u8]| {
            let mut min_max = window.0.to_le_bytes().to_vec();
            min_max.extend_from_slice(&(window.1 - 1).to_le_bytes());
            d.windows(16).any(|w| w == min_max.as_slice())
        };
        assert!(qword(&dsdt(true)));
        assert!(!qword(&dsdt(false)));
        let gap = (addr::MMIO_GAP_START as u32).to_le_bytes();
        assert!(dsdt(true).windows(4).any(|w| w == gap));
    }

    #[test]
    fn firmware_tables_point_at_each_other_by_offset_in_one_blob() {
        let devices = PlatformDevices {
            pci: true,
            firmware: true,
            ..Default::default()
        };
        let fw = firmware_acpi_tables(2, &devices).unwrap();
        let sig_at = |off: u64| {
            fw.layout
                .iter()
                .find(|(_, at, _)| *at as u64 == off)
                .map(|(sig, _, _)| *sig)
        };
        let mut seen = Vec::new();
        for p in &fw.pointers {
            let v = u64_at(&fw.tables, *p);
            seen.push(sig_at(v).expect("every pointer is a table's offset"));
        }
        assert_eq!(
            seen,
            vec![*b"DSDT", *b"FACS", *b"FACP", *b"APIC", *b"MCFG"],
            "FADT.X_DSDT and X_FIRMWARE_CTRL, then the XSDT's entries"
        );
        assert_eq!(sig_at(u64_at(&fw.rsdp, fw.rsdp_pointer)), Some(*b"XSDT"));
        assert_eq!(sum(&fw.rsdp[..20]), 0);
        for (sig, at, len) in &fw.layout {
            assert_eq!(&fw.tables[*at..*at + 4], sig);
            assert_eq!(u32_at(&fw.tables[*at..], 4) as usize, *len);
            if sig == b"FACS" {
                assert_eq!(at % 64, 0, "the FACS is 64-byte aligned");
            } else {
                assert_eq!(sum(&fw.tables[*at..*at + len]), 0, "checksum");
            }
        }
        // Full ACPI: not hardware-reduced, with the PM1 blocks and the PM timer.
        let (_, fadt, _) = *fw.layout.iter().find(|(s, _, _)| s == b"FACP").unwrap();
        let fadt = &fw.tables[fadt..];
        assert_eq!(u32_at(fadt, 112) & (1 << 20), 0, "HW_REDUCED_ACPI is clear");
        assert_eq!(u32_at(fadt, 56), u32::from(ports::ACPI_PM1_EVT));
        assert_eq!(u32_at(fadt, 64), u32::from(ports::ACPI_PM1_CNT));
        assert_eq!(u32_at(fadt, 76), u32::from(ports::ACPI_PM_TMR));
        assert_eq!(
            &fadt[88..92],
            &[4, 2, 0, 4],
            "PM1_EVT_LEN, PM1_CNT_LEN, PM2, PM_TMR_LEN"
        );
        // The host bridge's window is the whole MMIO gap below the IO-APIC.
        let (_, at, len) = *fw.layout.iter().find(|(s, _, _)| s == b"DSDT").unwrap();
        let dsdt = &fw.tables[at..at + len];
        let window = [
            (addr::MMIO_GAP_START as u32).to_le_bytes(),
            ((addr::IOAPIC_START - 1) as u32).to_le_bytes(),
        ]
        .concat();
        assert!(
            contains(dsdt, &window),
            "the window is the gap below the IO-APIC"
        );
        let direct = firmware_acpi_tables(
            2,
            &PlatformDevices {
                pci: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(!contains(&direct.tables, &window));
    }
}
