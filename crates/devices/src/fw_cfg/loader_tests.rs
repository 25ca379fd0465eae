use std::collections::HashMap;

use super::*;

fn name_at(cmd: &[u8], at: usize) -> String {
    let field = &cmd[at..at + 56];
    let end = field.iter().position(|&b| b == 0).expect("NUL-terminated");
    String::from_utf8(field[..end].to_vec()).unwrap()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

#[test]
fn command_layout() {
    let mut l = TableLoader::new();
    assert!(l.is_empty());
    l.allocate("etc/acpi/rsdp", 16, Zone::FSeg).unwrap();
    l.allocate("etc/acpi/tables", 64, Zone::High).unwrap();
    l.add_pointer("etc/acpi/rsdp", "etc/acpi/tables", 24, 8)
        .unwrap();
    l.add_checksum("etc/acpi/tables", 0x109, 0x100, 0x24)
        .unwrap();
    assert_eq!(l.len(), 4);
    let b = l.to_bytes();
    assert_eq!(b.len(), 4 * COMMAND_LEN);
    let cmds: Vec<&[u8]> = b.chunks(COMMAND_LEN).collect();

    assert_eq!(u32_at(cmds[0], 0), CMD_ALLOCATE);
    assert_eq!(name_at(cmds[0], 4), "etc/acpi/rsdp");
    assert_eq!(u32_at(cmds[0], 60), 16);
    assert_eq!(cmds[0][64], 2);
    assert!(cmds[0][65..].iter().all(|&b| b == 0));
    assert_eq!(u32_at(cmds[1], 0), CMD_ALLOCATE);
    assert_eq!(name_at(cmds[1], 4), "etc/acpi/tables");
    assert_eq!(u32_at(cmds[1], 60), 64);
    assert_eq!(cmds[1][64], 1);

    assert_eq!(u32_at(cmds[2], 0), CMD_ADD_POINTER);
    assert_eq!(name_at(cmds[2], 4), "etc/acpi/rsdp");
    assert_eq!(name_at(cmds[2], 60), "etc/acpi/tables");
    assert_eq!(u32_at(cmds[2], 116), 24);
    assert_eq!(cmds[2][120], 8);
    assert!(cmds[2][121..].iter().all(|&b| b == 0));

    assert_eq!(u32_at(cmds[3], 0), CMD_ADD_CHECKSUM);
    assert_eq!(name_at(cmds[3], 4), "etc/acpi/tables");
    assert_eq!(u32_at(cmds[3], 60), 0x109);
    assert_eq!(u32_at(cmds[3], 64), 0x100);
    assert_eq!(u32_at(cmds[3], 68), 0x24);
    assert!(cmds[3][72..].iter().all(|&b| b == 0));
}

#[test]
fn loader_refusals() {
    let mut l = TableLoader::new();
    let long = "n".repeat(56);
    assert_eq!(
        l.allocate(&long, 16, Zone::High),
        Err(LoaderError::NameTooLong { len: 56 })
    );
    l.allocate(&long[..55], 16, Zone::High).unwrap();
    assert_eq!(l.allocate("", 16, Zone::High), Err(LoaderError::EmptyName));
    assert_eq!(
        l.allocate("a", 24, Zone::High),
        Err(LoaderError::BadAlign(24))
    );
    assert_eq!(
        l.allocate("a", 0, Zone::High),
        Err(LoaderError::BadAlign(0))
    );
    assert!(matches!(
        l.allocate("a\0", 1, Zone::High),
        Err(LoaderError::NameHasNul(_))
    ));
    l.allocate("a", 1, Zone::FSeg).unwrap();
    assert_eq!(
        l.allocate("a", 1, Zone::FSeg),
        Err(LoaderError::AlreadyAllocated("a".into()))
    );
    assert_eq!(
        l.add_pointer("a", "b", 0, 4),
        Err(LoaderError::NotAllocated("b".into()))
    );
    assert_eq!(
        l.add_pointer("a", "a", 0, 3),
        Err(LoaderError::BadPointerSize(3))
    );
    assert_eq!(
        l.add_checksum("c", 0, 0, 1),
        Err(LoaderError::NotAllocated("c".into()))
    );
    assert_eq!(l.len(), 2, "refused commands are not added");
    // A 55-byte name fills the field but for its NUL.
    let b = l.to_bytes();
    assert_eq!(name_at(&b, 4), long[..55]);
}

/// A file as the test firmware allocated it.
struct Allocated {
    addr: u64,
    data: Vec<u8>,
}

/// A tiny firmware: runs the table-loader over `files`, allocating F-segment files from
/// 0xf0000 and high ones from 0x7ff0_0000. `assign` computes checksums as OVMF does
/// (`field = -sum`, the field included), otherwise as SeaBIOS (`field -= sum`).
fn run_loader(
    loader: &[u8],
    files: &HashMap<&str, Vec<u8>>,
    assign: bool,
) -> HashMap<String, Allocated> {
    assert_eq!(loader.len() % COMMAND_LEN, 0);
    let mut out: HashMap<String, Allocated> = HashMap::new();
    let (mut fseg, mut high) = (0xf_0000u64, 0x7ff0_0000u64);
    for cmd in loader.chunks(COMMAND_LEN) {
        match u32_at(cmd, 0) {
            CMD_ALLOCATE => {
                let name = name_at(cmd, 4);
                let align = u64::from(u32_at(cmd, 60));
                let next = if cmd[64] == 2 { &mut fseg } else { &mut high };
                let addr = next.next_multiple_of(align);
                let data = files[name.as_str()].clone();
                *next = addr + data.len() as u64;
                out.insert(name, Allocated { addr, data });
            }
            CMD_ADD_POINTER => {
                let src = out[&name_at(cmd, 60)].addr;
                let dest = out.get_mut(&name_at(cmd, 4)).unwrap();
                let at = u32_at(cmd, 116) as usize;
                let size = usize::from(cmd[120]);
                let mut v = [0u8; 8];
                v[..size].copy_from_slice(&dest.data[at..at + size]);
                let patched = u64::from_le_bytes(v).wrapping_add(src).to_le_bytes();
                dest.data[at..at + size].copy_from_slice(&patched[..size]);
            }
            CMD_ADD_CHECKSUM => {
                let file = out.get_mut(&name_at(cmd, 4)).unwrap();
                let (at, start, len) = (
                    u32_at(cmd, 60) as usize,
                    u32_at(cmd, 64) as usize,
                    u32_at(cmd, 68) as usize,
                );
                let sum = file.data[start..start + len]
                    .iter()
                    .fold(0u8, |s, &b| s.wrapping_add(b));
                file.data[at] = if assign {
                    0u8.wrapping_sub(sum)
                } else {
                    file.data[at].wrapping_sub(sum)
                };
            }
            c => panic!("unknown command {c}"),
        }
    }
    out
}

/// A table with the standard 36-byte header, `body` after it, and garbage in its checksum.
fn sdt(sig: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(sig);
    t.extend_from_slice(&(36 + body.len() as u32).to_le_bytes());
    t.push(1);
    t.push(0x5a);
    t.extend_from_slice(b"VESSELVESSELVM\x01\0\0\0VSSL\x01\0\0\0");
    assert_eq!(t.len(), 36);
    t.extend_from_slice(body);
    t
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |s, &x| s.wrapping_add(x))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// FACS, DSDT, FADT, MADT, XSDT, RSDT; an ACPI 2.0 RSDP. Pointer fields hold garbage.
fn sample() -> (Rsdp, Vec<AcpiTable>) {
    let (facs, dsdt, fadt, madt, xsdt, rsdt) = (0, 1, 2, 3, 4, 5);
    let mut facs_bytes = vec![0u8; 64];
    facs_bytes[..4].copy_from_slice(b"FACS");
    facs_bytes[4] = 64;
    let tables = vec![
        AcpiTable::without_checksum(facs_bytes),
        AcpiTable::new(sdt(b"DSDT", &[0x10, 0x05, 0x5c, 0x5f, 0x53, 0x42])),
        AcpiTable::new(sdt(b"FACP", &[0xab; 276 - 36]))
            .with_pointer(36, 4, facs)
            .with_pointer(40, 4, dsdt)
            .with_pointer(132, 8, facs)
            .with_pointer(140, 8, dsdt),
        AcpiTable::new(sdt(b"APIC", &[1, 2, 3, 4, 5, 6, 7, 8, 9])),
        AcpiTable::new(sdt(b"XSDT", &[0xcd; 16]))
            .with_pointer(36, 8, fadt)
            .with_pointer(44, 8, madt),
        AcpiTable::new(sdt(b"RSDT", &[0xef; 8]))
            .with_pointer(36, 4, fadt)
            .with_pointer(40, 4, madt),
    ];
    let mut r = b"RSD PTR ".to_vec();
    r.push(0x77); // checksum (garbage)
    r.extend_from_slice(b"VESSEL");
    r.push(2); // revision
    r.extend_from_slice(&[0x99; 4]); // RSDT
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&[0x99; 8]); // XSDT
    r.push(0x66); // extended checksum (garbage)
    r.extend_from_slice(&[0; 3]);
    assert_eq!(r.len(), 36);
    let rsdp = Rsdp {
        bytes: r,
        pointers: vec![
            AcpiPointer {
                offset: 16,
                size: 4,
                target: rsdt,
            },
            AcpiPointer {
                offset: 24,
                size: 8,
                target: xsdt,
            },
        ],
    };
    (rsdp, tables)
}

#[test]
fn firmware_installs_linked_tables_with_valid_checksums() {
    let (rsdp, tables) = sample();
    let blobs = acpi_files(&rsdp, &tables).unwrap();
    assert!(blobs.offsets.iter().all(|o| o % TABLE_ALIGN == 0));
    // Pointer fields hold offsets in the tables file before the firmware runs.
    assert_eq!(u64_at(&blobs.rsdp, 24), blobs.offsets[4] as u64);
    let files: HashMap<&str, Vec<u8>> = [
        (ACPI_TABLES_FILE, blobs.tables.clone()),
        (ACPI_RSDP_FILE, blobs.rsdp.clone()),
    ]
    .into();

    for assign in [false, true] {
        let out = run_loader(&blobs.loader, &files, assign);
        let rsdp = &out[ACPI_RSDP_FILE];
        let t = &out[ACPI_TABLES_FILE];
        assert!((0xf_0000..0x10_0000).contains(&rsdp.addr));
        assert_eq!(rsdp.addr % 16, 0);
        assert_eq!(t.addr % 64, 0);
        assert_eq!(sum(&rsdp.data[..20]), 0, "RSDP checksum");
        assert_eq!(sum(&rsdp.data[..36]), 0, "RSDP extended checksum");

        // The table at guest address `addr`, by its signature and length.
        let table_at = |addr: u64| -> &[u8] {
            let off = (addr - t.addr) as usize;
            let len = u32_at(&t.data, off + 4) as usize;
            &t.data[off..off + len]
        };
        for (i, &off) in blobs.offsets.iter().enumerate().skip(1) {
            let table = table_at(t.addr + off as u64);
            assert_eq!(table.len(), tables[i].bytes.len());
            assert_eq!(sum(table), 0, "table {i} checksum");
        }
        let rsdt = table_at(u64::from(u32_at(&rsdp.data, 16)));
        let xsdt = table_at(u64_at(&rsdp.data, 24));
        assert_eq!(&rsdt[..4], b"RSDT");
        assert_eq!(&xsdt[..4], b"XSDT");
        let fadt = table_at(u64_at(xsdt, 36));
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(&table_at(u64_at(xsdt, 44))[..4], b"APIC");
        assert_eq!(u64::from(u32_at(rsdt, 36)), u64_at(xsdt, 36));
        assert_eq!(&table_at(u64::from(u32_at(rsdt, 40)))[..4], b"APIC");
        let facs = u64_at(fadt, 132);
        assert_eq!(facs % 64, 0, "FACS alignment");
        assert_eq!(&table_at(facs)[..4], b"FACS");
        assert_eq!(u64::from(u32_at(fadt, 36)), facs);
        assert_eq!(&table_at(u64_at(fadt, 140))[..4], b"DSDT");
        assert_eq!(u64::from(u32_at(fadt, 40)), u64_at(fadt, 140));
        // The FACS has no checksum: left as given.
        assert_eq!(table_at(facs), tables[0].bytes.as_slice());
    }
}

#[test]
fn acpi_loader_allocates_first_and_checksums_after_pointers() {
    let (rsdp, tables) = sample();
    let blobs = acpi_files(&rsdp, &tables).unwrap();
    let cmds: Vec<u32> = blobs
        .loader
        .chunks(COMMAND_LEN)
        .map(|c| u32_at(c, 0))
        .collect();
    let pointers = 4 + 2 + 2 + 2;
    let checksums = 5 + 2;
    assert_eq!(cmds.len(), 2 + pointers + checksums);
    assert_eq!(&cmds[..2], [CMD_ALLOCATE; 2]);
    assert_eq!(name_at(&blobs.loader, 4), ACPI_RSDP_FILE);
    assert_eq!(blobs.loader[64], Zone::FSeg as u8);
    assert_eq!(name_at(&blobs.loader[COMMAND_LEN..], 4), ACPI_TABLES_FILE);
    assert_eq!(blobs.loader[COMMAND_LEN + 64], Zone::High as u8);
    // The RSDP's two checksums come last, the 20-byte one first.
    let last = &blobs.loader[blobs.loader.len() - 2 * COMMAND_LEN..];
    assert_eq!((u32_at(last, 60), u32_at(last, 68)), (8, 20));
    let last = &last[COMMAND_LEN..];
    assert_eq!((u32_at(last, 60), u32_at(last, 68)), (32, 36));
    // Each table's checksum follows its pointers.
    let fadt_cksum = cmds
        .iter()
        .enumerate()
        .position(|(i, &c)| {
            c == CMD_ADD_CHECKSUM
                && u32_at(&blobs.loader[i * COMMAND_LEN..], 64) == blobs.offsets[2] as u32
        })
        .unwrap();
    assert_eq!(&cmds[fadt_cksum - 4..fadt_cksum], [CMD_ADD_POINTER; 4]);
}

#[test]
fn acpi_v1_rsdp_has_one_checksum() {
    let (mut rsdp, tables) = sample();
    rsdp.bytes.truncate(20);
    rsdp.pointers.truncate(1);
    let blobs = acpi_files(&rsdp, &tables).unwrap();
    let files: HashMap<&str, Vec<u8>> = [
        (ACPI_TABLES_FILE, blobs.tables.clone()),
        (ACPI_RSDP_FILE, blobs.rsdp.clone()),
    ]
    .into();
    let out = run_loader(&blobs.loader, &files, true);
    assert_eq!(sum(&out[ACPI_RSDP_FILE].data), 0);
    assert_eq!(blobs.loader.len(), (2 + 10 - 1 + 5 + 1) * COMMAND_LEN);
}

#[test]
fn acpi_files_refusals() {
    let (rsdp, tables) = sample();
    let mut bad = rsdp.clone();
    bad.bytes.push(0);
    assert_eq!(
        acpi_files(&bad, &tables),
        Err(AcpiFilesError::RsdpLength(37))
    );
    let mut bad = rsdp.clone();
    bad.pointers[1].offset = 30;
    assert!(matches!(
        acpi_files(&bad, &tables),
        Err(AcpiFilesError::PointerOutside {
            table: TableId::Rsdp,
            offset: 30,
            size: 8
        })
    ));
    let mut bad = rsdp.clone();
    bad.pointers[0].offset = usize::MAX - 1;
    assert!(matches!(
        acpi_files(&bad, &tables),
        Err(AcpiFilesError::PointerOutside { .. })
    ));
    let mut bad = rsdp.clone();
    bad.pointers[0].target = 6;
    assert!(matches!(
        acpi_files(&bad, &tables),
        Err(AcpiFilesError::NoSuchTarget { target: 6, .. })
    ));
    let mut bad = rsdp.clone();
    bad.pointers[0].size = 3;
    assert!(matches!(
        acpi_files(&bad, &tables),
        Err(AcpiFilesError::PointerSize { size: 3, .. })
    ));

    // A 1-byte pointer to the XSDT (at an offset past 255).
    let mut t = tables.clone();
    t[3] = t[3].clone().with_pointer(40, 1, 4);
    assert!(matches!(
        acpi_files(&rsdp, &t),
        Err(AcpiFilesError::PointerTooNarrow {
            table: TableId::Table(3),
            size: 1,
            ..
        })
    ));
    let mut t = tables.clone();
    t[1].checksum_offset = Some(500);
    assert_eq!(
        acpi_files(&rsdp, &t),
        Err(AcpiFilesError::ChecksumOutside {
            table: TableId::Table(1),
            offset: 500
        })
    );
    let mut t = tables.clone();
    t[3].bytes.clear();
    assert_eq!(
        acpi_files(&rsdp, &t),
        Err(AcpiFilesError::Empty(TableId::Table(3)))
    );
}

#[test]
fn blobs_become_fw_cfg_files() {
    use vessel_memory::vm_memory::GuestAddress;
    let (rsdp, tables) = sample();
    let blobs = acpi_files(&rsdp, &tables).unwrap();
    let loader_len = blobs.loader.len();
    let mem = vessel_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let mut fw = FwCfg::new(mem);
    blobs.add_to(&mut fw).unwrap();
    assert_eq!(fw.file_count(), 3);
    // Sorted: rsdp, tables, table-loader.
    assert_eq!(fw.file_selector(ACPI_RSDP_FILE), Some(0x20));
    assert_eq!(fw.file_selector(ACPI_TABLES_FILE), Some(0x21));
    assert_eq!(fw.file_selector(LOADER_FILE), Some(0x22));
    assert_eq!(fw.files[2].1.len(), loader_len);
}
