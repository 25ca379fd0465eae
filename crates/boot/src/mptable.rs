//! The Intel MultiProcessor Specification 1.4 table: the floating pointer at
//! [`addr::EBDA_START`] (the first KiB of the EBDA, where Linux scans for `_MP_`) followed by
//! the configuration table: processors, the ISA bus, the IO-APIC, the ISA interrupts and the
//! local interrupts. Linux uses it when booted without ACPI (`acpi=off`).

use vessel_memory::vm_memory::{Bytes, GuestAddress};
use vessel_memory::{addr, GuestMemoryMmap};

use crate::acpi::{check_cpus, IOAPIC_ID};
use crate::error::BootError;

const SPEC_REVISION: u8 = 4;
const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
/// Local APIC version of an integrated (xAPIC) local APIC, as KVM emulates.
const LAPIC_VERSION: u8 = 0x14;
/// CPU signature: family 6.
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID feature flags: FPU and APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
/// IO-APIC version of KVM's IO-APIC (24 pins).
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_ENABLED: u8 = 1;

const ISA_BUS_ID: u8 = 0;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Interrupt flags "conforms to the bus" (ISA: edge-triggered, active-high).
const INT_FLAGS_CONFORM: u16 = 0;
/// Destination "all local APICs".
const ALL_LAPICS: u8 = 0xff;

/// The checksum byte that makes `b` sum to 0.
fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)))
}

/// The (source ISA IRQ, IO-APIC pin) routing: IRQ0 (the PIT) arrives at pin 2 as the MADT's
/// override says; IRQ2 (the PIC cascade) does not exist; the others are identity.
fn isa_routes() -> impl Iterator<Item = (u8, u8)> {
    (0..16u8)
        .filter(|&irq| irq != 2)
        .map(|irq| (irq, if irq == 0 { 2 } else { irq }))
}

/// The configuration table (header and entries) for `num_cpus` processors.
fn config_table(num_cpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    let mut push = |entry: &[u8]| {
        entries.extend_from_slice(entry);
        count += 1;
    };

    for id in 0..num_cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        let mut e = vec![ENTRY_PROCESSOR, id, LAPIC_VERSION, flags];
        e.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        e.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        e.extend_from_slice(&[0; 8]);
        push(&e);
    }
    let mut bus = vec![ENTRY_BUS, ISA_BUS_ID];
    bus.extend_from_slice(b"ISA   ");
    push(&bus);
    let mut ioapic = vec![ENTRY_IOAPIC, IOAPIC_ID, IOAPIC_VERSION, IOAPIC_ENABLED];
    ioapic.extend_from_slice(&(addr::IOAPIC_START as u32).to_le_bytes());
    push(&ioapic);
    for (irq, pin) in isa_routes() {
        let mut e = vec![ENTRY_IO_INTERRUPT, INT_TYPE_INT];
        e.extend_from_slice(&INT_FLAGS_CONFORM.to_le_bytes());
        e.extend_from_slice(&[ISA_BUS_ID, irq, IOAPIC_ID, pin]);
        push(&e);
    }
    // LINT0 of the BSP: ExtINT (the 8259s); LINT1 of every CPU: NMI.
    for (kind, dest, lint) in [(INT_TYPE_EXTINT, 0, 0), (INT_TYPE_NMI, ALL_LAPICS, 1)] {
        let mut e = vec![ENTRY_LOCAL_INTERRUPT, kind];
        e.extend_from_slice(&INT_FLAGS_CONFORM.to_le_bytes());
        e.extend_from_slice(&[ISA_BUS_ID, 0, dest, lint]);
        push(&e);
    }

    let len = (HEADER_LEN + entries.len()) as u16;
    let mut t = Vec::with_capacity(len as usize);
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&len.to_le_bytes());
    t.push(SPEC_REVISION);
    t.push(0); // checksum, below
    t.extend_from_slice(b"VESSEL  "); // OEM ID
    t.extend_from_slice(b"VESSEL VM   "); // product ID
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    t.extend_from_slice(&count.to_le_bytes());
    t.extend_from_slice(&(addr::LAPIC_START as u32).to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    t.push(0); // extended table checksum
    t.push(0); // reserved
    debug_assert_eq!(t.len(), HEADER_LEN);
    t.extend_from_slice(&entries);
    t[7] = checksum(&t);
    t
}

/// The MP floating pointer structure pointing at the configuration table at `table_addr`.
fn floating_pointer(table_addr: u32) -> [u8; FLOATING_POINTER_LEN] {
    let mut p = [0u8; FLOATING_POINTER_LEN];
    p[0..4].copy_from_slice(b"_MP_");
    p[4..8].copy_from_slice(&table_addr.to_le_bytes());
    p[8] = 1; // length in 16-byte units
    p[9] = SPEC_REVISION;
    // p[11]: feature byte 1 = 0: a configuration table is present.
    p[10] = checksum(&p);
    p
}

/// Write the MP table for `num_cpus` vCPUs (APIC ID = index, vCPU 0 the bootstrap
/// processor) at [`addr::EBDA_START`].
pub fn create_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), BootError> {
    check_cpus(num_cpus)?;
    let table_addr = addr::EBDA_START + FLOATING_POINTER_LEN as u64;
    let table = config_table(num_cpus);
    // Past the EBDA's KiB the table runs into the (reserved, RAM-backed) legacy video
    // area; it must stay clear of the ACPI tables.
    if table_addr + table.len() as u64 > addr::RSDP_START {
        return Err(BootError::TableTooLarge {
            what: "MP table",
            size: table.len(),
            space: "range from the EBDA to the ACPI tables",
        });
    }
    let pointer = floating_pointer(table_addr as u32);
    mem.write_slice(&pointer, GuestAddress(addr::EBDA_START))
        .map_err(BootError::write("MP floating pointer", addr::EBDA_START))?;
    mem.write_slice(&table, GuestAddress(table_addr))
        .map_err(BootError::write("MP configuration table", table_addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{self, read_bytes, sum, u16_at, u32_at, MIB};

    /// Parse the table back: (processor entries (id, flags), IO interrupts (irq, pin),
    /// local interrupts (type, dest, lint), IO-APIC ids, bus types).
    #[allow(clippy::type_complexity)]
    fn parse(
        mem: &GuestMemoryMmap,
    ) -> (
        Vec<(u8, u8)>,
        Vec<(u8, u8, u8)>,
        Vec<(u8, u8, u8)>,
        Vec<(u8, u32)>,
        Vec<Vec<u8>>,
    ) {
        let fp = read_bytes(mem, addr::EBDA_START, 16);
        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(sum(&fp), 0, "floating pointer checksum");
        assert_eq!(fp[8], 1);
        assert_eq!(fp[9], 4);
        assert_eq!(fp[11], 0, "configuration table present");
        let at = u32_at(&fp, 4) as u64;
        let len = u16_at(&read_bytes(mem, at, 8), 4) as usize;
        let t = read_bytes(mem, at, len);
        assert_eq!(&t[0..4], b"PCMP");
        assert_eq!(sum(&t), 0, "configuration table checksum");
        assert_eq!(u32_at(&t, 36) as u64, addr::LAPIC_START);
        let count = u16_at(&t, 34) as usize;

        let (mut cpus, mut ints, mut lints, mut ioapics, mut buses) =
            (vec![], vec![], vec![], vec![], vec![]);
        let mut off = HEADER_LEN;
        for _ in 0..count {
            let e = &t[off..];
            off += match e[0] {
                0 => {
                    cpus.push((e[1], e[3]));
                    20
                }
                1 => {
                    buses.push(e[2..8].to_vec());
                    8
                }
                2 => {
                    ioapics.push((e[1], u32_at(e, 4)));
                    8
                }
                3 => {
                    assert_eq!((e[1], e[4], e[6]), (0, 0, 0), "INT from ISA to IO-APIC 0");
                    ints.push((e[5], e[7], e[1]));
                    8
                }
                4 => {
                    lints.push((e[1], e[6], e[7]));
                    8
                }
                k => panic!("unexpected MP entry type {k}"),
            };
        }
        assert_eq!(off, len, "entry count matches the table length");
        (cpus, ints, lints, ioapics, buses)
    }

    #[test]
    fn mptable_reads_back() {
        for n in [1u8, 2, 16, 255] {
            let (mem, _) = testutil::guest(64 * MIB);
            create_mptable(&mem, n).unwrap();
            let (cpus, ints, lints, ioapics, buses) = parse(&mem);
            assert_eq!(cpus.len(), n as usize);
            for (i, (id, flags)) in cpus.iter().enumerate() {
                assert_eq!(*id as usize, i);
                assert_ne!(flags & CPU_ENABLED, 0);
                assert_eq!(flags & CPU_BOOTSTRAP != 0, i == 0, "BSP flag on cpu {i}");
            }
            assert_eq!(buses, [b"ISA   ".to_vec()]);
            assert_eq!(ioapics, [(0, addr::IOAPIC_START as u32)]);
            // Every ISA IRQ but the cascade, IRQ0 on pin 2.
            let irqs: Vec<u8> = ints.iter().map(|i| i.0).collect();
            assert_eq!(irqs, [0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
            for (irq, pin, _) in &ints {
                assert_eq!(*pin, if *irq == 0 { 2 } else { *irq });
            }
            assert_eq!(lints, [(3, 0, 0), (1, 0xff, 1)]);
        }
    }

    #[test]
    fn mptable_stays_below_the_acpi_tables() {
        let (mem, _) = testutil::guest(64 * MIB);
        create_mptable(&mem, 255).unwrap();
        let table = config_table(255);
        assert!(addr::EBDA_START + 16 + table.len() as u64 <= addr::RSDP_START);
        // ACPI after MP: both intact.
        create_acpi_tables_and_check(&mem);
        parse(&mem);
    }

    fn create_acpi_tables_and_check(mem: &GuestMemoryMmap) {
        let rsdp = crate::create_acpi_tables(mem, 255, &Default::default()).unwrap();
        assert_eq!(sum(&read_bytes(mem, rsdp, 36)), 0);
    }

    #[test]
    fn zero_cpus_is_refused() {
        let (mem, _) = testutil::guest(64 * MIB);
        let err = create_mptable(&mem, 0).unwrap_err();
        assert!(matches!(err, BootError::BadCpuCount(0)), "{err}");
    }
}
