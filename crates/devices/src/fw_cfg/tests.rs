use std::time::{Duration, Instant};

use vessel_memory::vm_memory::{Bytes, GuestAddress};

use super::dma::{CTL_ERROR, CTL_READ, CTL_SELECT, CTL_SKIP, CTL_WRITE};
use super::*;

const MEM_SIZE: usize = 0x10000;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn device() -> FwCfg {
    FwCfg::new(mem())
}

fn select(fw: &mut FwCfg, key: u16) {
    fw.write(SELECTOR_OFFSET, &key.to_le_bytes());
}

fn read_bytes(fw: &mut FwCfg, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            let mut b = [0xaa];
            fw.read(DATA_OFFSET, &mut b);
            b[0]
        })
        .collect()
}

fn read_item(fw: &mut FwCfg, key: u16, n: usize) -> Vec<u8> {
    select(fw, key);
    read_bytes(fw, n)
}

/// Write a DMA descriptor at `desc` and start it with the two 32-bit halves.
fn dma(fw: &mut FwCfg, desc: u64, control: u32, length: u32, address: u64) -> u32 {
    let mut d = Vec::new();
    d.extend_from_slice(&control.to_be_bytes());
    d.extend_from_slice(&length.to_be_bytes());
    d.extend_from_slice(&address.to_be_bytes());
    fw.mem.write_slice(&d, GuestAddress(desc)).unwrap();
    fw.write(DMA_OFFSET, &((desc >> 32) as u32).to_be_bytes());
    fw.write(DMA_OFFSET + 4, &(desc as u32).to_be_bytes());
    u32::from_be_bytes(fw.mem.read_obj::<[u8; 4]>(GuestAddress(desc)).unwrap())
}

fn mem_bytes(fw: &FwCfg, at: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    fw.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
    v
}

fn sample_files(fw: &mut FwCfg) {
    fw.add_file("etc/e820", e820_bytes(&[(0, 0x9fc00, 1)]))
        .unwrap();
    fw.add_file("bootorder", b"/pci@i0cf8/disk@1\n".to_vec())
        .unwrap();
    fw.add_file("etc/acpi/tables", (0..200u8).collect())
        .unwrap();
}

#[test]
fn signature_and_id_through_the_data_port() {
    let mut fw = device();
    assert_eq!(read_item(&mut fw, keys::SIGNATURE, 4), b"QEMU");
    assert_eq!(read_item(&mut fw, keys::ID, 4), [3, 0, 0, 0]);
    // Past the end: zeros.
    assert_eq!(read_bytes(&mut fw, 2), [0, 0]);
    // A 1-byte selector write is ignored: the ID stays selected, still at its end.
    fw.write(SELECTOR_OFFSET, &[0]);
    assert_eq!(read_bytes(&mut fw, 1), [0]);
    // A wide read of the data port answers byte by byte.
    select(&mut fw, keys::SIGNATURE);
    let mut w = [0u8; 2];
    fw.read(DATA_OFFSET, &mut w);
    assert_eq!(&w, b"QE");
}

#[test]
fn dma_register_reads_the_signature() {
    let mut fw = device();
    let mut b = [0u8; 8];
    fw.read(DMA_OFFSET, &mut b);
    assert_eq!(u64::from_be_bytes(b), 0x5145_4d55_2043_4647);
    let mut b = [0u8; 4];
    fw.read(DMA_OFFSET + 4, &mut b);
    assert_eq!(&b, b" CFG");
    let mut b = [0xffu8; 2];
    fw.read(DMA_OFFSET + 7, &mut b);
    assert_eq!(b, [b'G', 0]);
    let mut b = [0xffu8; 2];
    fw.read(2, &mut b);
    assert_eq!(b, [0, 0]);
}

#[test]
fn directory_lists_files_sorted_with_their_selectors() {
    let mut fw = device();
    sample_files(&mut fw);
    let dir = read_item(&mut fw, keys::FILE_DIR, 4 + 3 * 64 + 4);
    assert_eq!(u32::from_be_bytes(dir[..4].try_into().unwrap()), 3);
    let names = ["bootorder", "etc/acpi/tables", "etc/e820"];
    let sizes = [18, 200, 20];
    for (i, (name, size)) in names.iter().zip(sizes).enumerate() {
        let e = &dir[4 + i * 64..4 + (i + 1) * 64];
        assert_eq!(
            u32::from_be_bytes(e[..4].try_into().unwrap()),
            size,
            "{name}"
        );
        let sel = u16::from_be_bytes([e[4], e[5]]);
        assert_eq!(sel, 0x20 + i as u16, "{name}");
        assert_eq!(fw.file_selector(name), Some(sel));
        assert_eq!(&e[6..8], [0, 0]);
        assert_eq!(&e[8..8 + name.len()], name.as_bytes());
        assert!(e[8 + name.len()..].iter().all(|&b| b == 0));
    }
    assert_eq!(&dir[4 + 3 * 64..], [0; 4], "past the directory");
    assert_eq!(fw.file_selector("nope"), None);
    assert_eq!(fw.file_count(), 3);

    // Adding a file renumbers those after it, and the directory follows.
    fw.add_file("a-first", vec![1]).unwrap();
    let dir = read_item(&mut fw, keys::FILE_DIR, 4 + 64);
    assert_eq!(dir[3], 4);
    assert_eq!(&dir[8..10], [0, 0x20]);
    assert_eq!(&dir[12..19], b"a-first");
    assert_eq!(fw.file_selector("etc/e820"), Some(0x23));
    assert_eq!(read_item(&mut fw, 0x23, 8), 0u64.to_le_bytes());
}

#[test]
fn empty_directory() {
    let mut fw = device();
    assert_eq!(read_item(&mut fw, keys::FILE_DIR, 6), [0; 6]);
}

#[test]
fn files_read_byte_by_byte_and_selecting_rewinds() {
    let mut fw = device();
    sample_files(&mut fw);
    let sel = fw.file_selector("etc/acpi/tables").unwrap();
    let all = read_item(&mut fw, sel, 200);
    assert_eq!(all, (0..200u8).collect::<Vec<_>>());
    assert_eq!(read_bytes(&mut fw, 3), [0, 0, 0], "past the end");
    select(&mut fw, sel);
    assert_eq!(read_bytes(&mut fw, 3), [0, 1, 2]);
    // The write bit does not change what is read.
    assert_eq!(read_item(&mut fw, sel | SELECTOR_WRITE, 2), [0, 1]);
    // Data port writes change nothing.
    fw.write(DATA_OFFSET, &[0x55]);
    assert_eq!(read_bytes(&mut fw, 1), [2]);
}

#[test]
fn unknown_selectors_read_zero() {
    let mut fw = device();
    sample_files(&mut fw);
    for key in [
        0x02, 0x05, 0x1f, 0x23, 0x3fff, 0x8000, 0x8003, 0x8019, 0xffff,
    ] {
        assert_eq!(read_item(&mut fw, key, 4), [0; 4], "{key:#x}");
    }
}

#[test]
fn items_and_their_keys() {
    let mut fw = device();
    fw.add_u16(keys::NB_CPUS, 4).unwrap();
    fw.add_u64(keys::RAM_SIZE, 1 << 30).unwrap();
    fw.add_item(keys::E820_TABLE, vec![9, 8]).unwrap();
    assert_eq!(read_item(&mut fw, keys::NB_CPUS, 3), [4, 0, 0]);
    assert_eq!(
        read_item(&mut fw, keys::RAM_SIZE, 8),
        (1u64 << 30).to_le_bytes()
    );
    assert_eq!(read_item(&mut fw, keys::E820_TABLE, 3), [9, 8, 0]);
    assert_eq!(read_item(&mut fw, 0x03 | SELECTOR_WRITE, 1), [0]);
    for key in [
        keys::SIGNATURE,
        keys::ID,
        keys::FILE_DIR,
        0x20,
        0x1234,
        0x4005,
        0x8020,
    ] {
        assert_eq!(
            fw.add_item(key, vec![1]),
            Err(FwCfgError::InvalidKey(key)),
            "{key:#x}"
        );
    }
    assert_eq!(
        fw.add_u32(keys::NB_CPUS, 1),
        Err(FwCfgError::DuplicateItem(keys::NB_CPUS))
    );
}

#[test]
fn add_file_errors() {
    let mut fw = device();
    fw.add_file("etc/e820", vec![]).unwrap();
    assert_eq!(
        fw.add_file("etc/e820", vec![1]),
        Err(FwCfgError::DuplicateFile("etc/e820".into()))
    );
    assert_eq!(fw.add_file("", vec![]), Err(FwCfgError::EmptyName));
    let long = "x".repeat(56);
    assert_eq!(
        fw.add_file(&long, vec![]),
        Err(FwCfgError::NameTooLong { len: 56 })
    );
    fw.add_file(&long[..55], vec![]).unwrap();
    assert!(matches!(
        fw.add_file("a\0b", vec![]),
        Err(FwCfgError::NameHasNul(_))
    ));
    for i in fw.file_count()..MAX_FILES {
        fw.add_file(&format!("f{i}"), vec![]).unwrap();
    }
    assert_eq!(
        fw.add_file("one-more", vec![]),
        Err(FwCfgError::TooManyFiles)
    );
    // "xxx..." sorts last.
    assert_eq!(fw.file_selector(&long[..55]), Some(0x0fff));
    assert_eq!(fw.file_count(), MAX_FILES);
    // The last file's selector stays below the flag bits.
    let last = read_item(&mut fw, keys::FILE_DIR, 4 + MAX_FILES * 64);
    let e = &last[4 + (MAX_FILES - 1) * 64..];
    assert_eq!(u16::from_be_bytes([e[4], e[5]]), 0x0fff);
}

#[test]
fn e820_file_format() {
    let b = e820_bytes(&[(0, 0x9fc00, 1), (0x1_0000_0000, 0x4000_0000, 2)]);
    assert_eq!(b.len(), 40);
    assert_eq!(&b[0..8], 0u64.to_le_bytes());
    assert_eq!(&b[8..16], 0x9fc00u64.to_le_bytes());
    assert_eq!(&b[16..20], 1u32.to_le_bytes());
    assert_eq!(&b[20..28], 0x1_0000_0000u64.to_le_bytes());
    assert_eq!(&b[28..36], 0x4000_0000u64.to_le_bytes());
    assert_eq!(&b[36..40], 2u32.to_le_bytes());
}

#[test]
fn dma_select_and_read_a_file() {
    let mut fw = device();
    sample_files(&mut fw);
    let sel = fw.file_selector("etc/acpi/tables").unwrap();
    fw.mem
        .write_slice(&[0xee; 0x400], GuestAddress(0x2000))
        .unwrap();
    let control = u32::from(sel) << 16 | CTL_SELECT | CTL_READ;
    assert_eq!(dma(&mut fw, 0x1000, control, 100, 0x2000), 0);
    assert_eq!(mem_bytes(&fw, 0x2000, 100), (0..100u8).collect::<Vec<_>>());
    assert_eq!(mem_bytes(&fw, 0x2064, 1), [0xee], "nothing past length");
    // The next read continues; past the end of the item the buffer is zero-filled.
    assert_eq!(dma(&mut fw, 0x1000, CTL_READ, 150, 0x2100), 0);
    let got = mem_bytes(&fw, 0x2100, 151);
    assert_eq!(&got[..100], (100..200u8).collect::<Vec<_>>());
    assert_eq!(&got[100..150], [0; 50]);
    assert_eq!(got[150], 0xee);
    // The port interface sees the same offset (at the end).
    assert_eq!(read_bytes(&mut fw, 1), [0]);
    // The rest of the descriptor is left as it was.
    assert_eq!(mem_bytes(&fw, 0x1004, 4), 150u32.to_be_bytes());
}

#[test]
fn dma_with_one_64_bit_write_and_high_half() {
    let mut fw = device();
    let desc = 0x3000u64;
    let d = [
        (u32::from(keys::SIGNATURE) << 16 | CTL_SELECT | CTL_READ).to_be_bytes(),
        4u32.to_be_bytes(),
    ]
    .concat();
    fw.mem.write_slice(&d, GuestAddress(desc)).unwrap();
    fw.mem
        .write_slice(&0x4000u64.to_be_bytes(), GuestAddress(desc + 8))
        .unwrap();
    fw.write(DMA_OFFSET, &desc.to_be_bytes());
    assert_eq!(mem_bytes(&fw, 0x4000, 4), b"QEMU");
    assert_eq!(mem_bytes(&fw, desc, 4), [0; 4]);

    // A high half puts the descriptor above guest memory: nothing happens, no panic; the
    // address register is cleared after each transfer.
    fw.write(DMA_OFFSET, &1u32.to_be_bytes());
    fw.write(DMA_OFFSET + 4, &(desc as u32).to_be_bytes());
    fw.mem
        .write_slice(&(CTL_SELECT | CTL_READ).to_be_bytes(), GuestAddress(desc))
        .unwrap();
    assert_eq!(
        mem_bytes(&fw, desc, 4),
        (CTL_SELECT | CTL_READ).to_be_bytes()
    );
    fw.write(DMA_OFFSET + 4, &(desc as u32).to_be_bytes());
    assert_eq!(
        mem_bytes(&fw, desc, 4),
        [0; 4],
        "low half alone: below 4 GiB"
    );
}

#[test]
fn dma_skip_then_read() {
    let mut fw = device();
    sample_files(&mut fw);
    let sel = fw.file_selector("etc/acpi/tables").unwrap();
    let control = u32::from(sel) << 16 | CTL_SELECT | CTL_SKIP;
    assert_eq!(dma(&mut fw, 0x1000, control, 10, 0xdead_0000_0000), 0);
    assert_eq!(dma(&mut fw, 0x1000, CTL_READ, 2, 0x2000), 0);
    assert_eq!(mem_bytes(&fw, 0x2000, 2), [10, 11]);
    // Skipping past the end stops at the end.
    assert_eq!(dma(&mut fw, 0x1000, CTL_SKIP, 10_000, 0), 0);
    assert_eq!(read_bytes(&mut fw, 1), [0]);
    // A control without an operation only selects.
    assert_eq!(
        dma(&mut fw, 0x1000, u32::from(sel) << 16 | CTL_SELECT, 5, 0),
        0
    );
    assert_eq!(read_bytes(&mut fw, 1), [0]);
}

#[test]
fn dma_write_is_refused() {
    let mut fw = device();
    sample_files(&mut fw);
    let sel = fw.file_selector("bootorder").unwrap();
    fw.mem.write_slice(&[7; 8], GuestAddress(0x2000)).unwrap();
    let control = u32::from(sel) << 16 | CTL_SELECT | CTL_WRITE;
    assert_eq!(dma(&mut fw, 0x1000, control, 8, 0x2000), CTL_ERROR);
    assert_eq!(dma(&mut fw, 0x1000, CTL_WRITE, 0, 0x2000), 0);
    // The item is unchanged.
    assert_eq!(read_item(&mut fw, sel, 4), b"/pci");
}

#[test]
fn dma_buffer_out_of_memory_sets_error_and_writes_nothing() {
    let mut fw = device();
    sample_files(&mut fw);
    let sel = fw.file_selector("etc/acpi/tables").unwrap();
    let control = u32::from(sel) << 16 | CTL_SELECT | CTL_READ;
    // Straddles the end of guest memory: the part inside is not written.
    let at = MEM_SIZE as u64 - 50;
    fw.mem.write_slice(&[0xee; 50], GuestAddress(at)).unwrap();
    assert_eq!(dma(&mut fw, 0x1000, control, 100, at), CTL_ERROR);
    assert_eq!(mem_bytes(&fw, at, 50), [0xee; 50]);
    // Wholly outside, and wrapping around the address space.
    assert_eq!(dma(&mut fw, 0x1000, control, 100, 0x10_0000), CTL_ERROR);
    assert_eq!(dma(&mut fw, 0x1000, control, 100, u64::MAX - 10), CTL_ERROR);
    // The item was not consumed.
    assert_eq!(dma(&mut fw, 0x1000, CTL_READ, 1, 0x2000), 0);
    assert_eq!(mem_bytes(&fw, 0x2000, 1), [0]);
}

#[test]
fn dma_descriptor_out_of_memory_does_not_panic() {
    let mut fw = device();
    for desc in [
        MEM_SIZE as u64,
        MEM_SIZE as u64 - 8,
        0xffff_ffff,
        u64::MAX,
        u64::MAX - 3,
    ] {
        fw.write(DMA_OFFSET, &desc.to_be_bytes());
    }
    // A descriptor whose control word is in memory but whose end is not gets the error.
    let desc = MEM_SIZE as u64 - 8;
    fw.mem.write_slice(&[0; 8], GuestAddress(desc)).unwrap();
    fw.write(DMA_OFFSET, &desc.to_be_bytes());
    assert_eq!(mem_bytes(&fw, desc, 4), CTL_ERROR.to_be_bytes());
}

#[test]
fn huge_dma_lengths_finish_promptly() {
    let mut fw = device();
    sample_files(&mut fw);
    let sel = fw.file_selector("etc/e820").unwrap();
    let control = u32::from(sel) << 16 | CTL_SELECT | CTL_READ;
    let start = Instant::now();
    assert_eq!(dma(&mut fw, 0x1000, control, u32::MAX, 0x2000), CTL_ERROR);
    assert_eq!(dma(&mut fw, 0x1000, control, u32::MAX, 0), CTL_ERROR);
    assert_eq!(dma(&mut fw, 0x1000, CTL_SKIP, u32::MAX, 0), 0);
    // Zero-filling all of guest memory but the descriptor is fine, and bounded by it.
    assert_eq!(
        dma(&mut fw, 0x0, control, (MEM_SIZE - 0x10) as u32, 0x10),
        0
    );
    assert_eq!(mem_bytes(&fw, 0x10, 20), e820_bytes(&[(0, 0x9fc00, 1)]));
    assert!(mem_bytes(&fw, 0x24, MEM_SIZE - 0x24)
        .iter()
        .all(|&b| b == 0));
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn dma_of_an_unknown_item_zero_fills() {
    let mut fw = device();
    fw.mem
        .write_slice(&[0xee; 16], GuestAddress(0x2000))
        .unwrap();
    let control = 0x7777u32 << 16 | CTL_SELECT | CTL_READ;
    assert_eq!(dma(&mut fw, 0x1000, control, 8, 0x2000), 0);
    assert_eq!(mem_bytes(&fw, 0x2000, 9), [0, 0, 0, 0, 0, 0, 0, 0, 0xee]);
}

#[test]
fn dma_reads_the_directory() {
    let mut fw = device();
    sample_files(&mut fw);
    let control = u32::from(keys::FILE_DIR) << 16 | CTL_SELECT | CTL_READ;
    assert_eq!(dma(&mut fw, 0x1000, control, 4 + 3 * 64, 0x2000), 0);
    let mut fw2 = device();
    sample_files(&mut fw2);
    assert_eq!(
        mem_bytes(&fw, 0x2000, 4 + 3 * 64),
        read_item(&mut fw2, keys::FILE_DIR, 4 + 3 * 64)
    );
}

#[test]
fn garbage_at_every_offset_and_width_does_not_panic() {
    let mut fw = device();
    sample_files(&mut fw);
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..20_000 {
        let offset = next() % FW_CFG_PORT_LEN;
        let width = [1usize, 2, 4, 8][(next() % 4) as usize];
        let width = width.min((FW_CFG_PORT_LEN - offset) as usize);
        let mut v = next().to_le_bytes();
        // Keep some DMA addresses inside memory so transfers run.
        if next() % 2 == 0 && offset == DMA_OFFSET + 4 {
            v[..4].copy_from_slice(&((next() % MEM_SIZE as u64) as u32).to_be_bytes());
        }
        if next() % 2 == 0 {
            fw.write(offset, &v[..width]);
        } else {
            fw.read(offset, &mut v[..width]);
        }
        if next() % 64 == 0 {
            // Scribble descriptors into memory for the next transfers.
            let at = next() % MEM_SIZE as u64;
            let _ = fw.mem.write_slice(&next().to_be_bytes(), GuestAddress(at));
        }
    }
    // Still answers.
    assert_eq!(read_item(&mut fw, keys::SIGNATURE, 4), b"QEMU");
}

#[test]
fn on_the_port_bus() {
    use crate::bus::Bus;
    use std::sync::{Arc, Mutex};
    let mut fw = device();
    sample_files(&mut fw);
    let mut bus = Bus::new();
    bus.insert(
        Arc::new(Mutex::new(fw)),
        FW_CFG_PORT_BASE.into(),
        FW_CFG_PORT_LEN,
    )
    .unwrap();
    assert!(bus.write(FW_CFG_SELECTOR.into(), &keys::SIGNATURE.to_le_bytes()));
    let mut sig = [0u8; 4];
    for b in &mut sig {
        let mut one = [0];
        assert!(bus.read(FW_CFG_DATA.into(), &mut one));
        *b = one[0];
    }
    assert_eq!(&sig, b"QEMU");
    let mut dma_sig = [0u8; 4];
    assert!(bus.read(FW_CFG_DMA.into(), &mut dma_sig));
    assert_eq!(&dma_sig, b"QEMU");
}

/// A bzImage-shaped kernel: `setup_sects` sectors of setup after the boot sector.
fn bzimage(setup_sects: u8, len: usize) -> Vec<u8> {
    let mut k: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    k[0x1f1] = setup_sects;
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k
}

#[test]
fn kernel_direct_boot_items() {
    let mut fw = device();
    let kernel = bzimage(3, 5000);
    fw.add_kernel_direct_boot(&kernel, Some(vec![5; 300]), "console=ttyS0")
        .unwrap();
    let u32_item =
        |fw: &mut FwCfg, key| u32::from_le_bytes(read_item(fw, key, 4).try_into().unwrap());
    assert_eq!(u32_item(&mut fw, keys::SETUP_SIZE), 4 * 512);
    assert_eq!(read_item(&mut fw, keys::SETUP_DATA, 2048), &kernel[..2048]);
    assert_eq!(u32_item(&mut fw, keys::KERNEL_SIZE), 5000 - 2048);
    assert_eq!(read_item(&mut fw, keys::KERNEL_DATA, 2952), &kernel[2048..]);
    assert_eq!(u32_item(&mut fw, keys::INITRD_SIZE), 300);
    assert_eq!(read_item(&mut fw, keys::INITRD_DATA, 301)[299..], [5, 0]);
    assert_eq!(u32_item(&mut fw, keys::CMDLINE_SIZE), 14);
    assert_eq!(
        read_item(&mut fw, keys::CMDLINE_DATA, 15),
        b"console=ttyS0\0\0"
    );

    // setup_sects 0 means 4; no initrd, no initrd items.
    let mut fw = device();
    fw.add_kernel_direct_boot(&bzimage(0, 4096), None, "")
        .unwrap();
    assert_eq!(u32_item(&mut fw, keys::SETUP_SIZE), 5 * 512);
    assert_eq!(u32_item(&mut fw, keys::INITRD_SIZE), 0);
    assert_eq!(read_item(&mut fw, keys::CMDLINE_DATA, 2), [0, 0]);
    // Twice: refused, nothing changed.
    assert_eq!(
        fw.add_kernel_direct_boot(&bzimage(0, 4096), None, ""),
        Err(FwCfgError::DuplicateItem(keys::SETUP_SIZE))
    );
}

#[test]
fn kernel_direct_boot_refusals() {
    let mut fw = device();
    assert!(matches!(
        fw.add_kernel_direct_boot(&[0; 100], None, ""),
        Err(FwCfgError::BadKernel(_))
    ));
    assert!(matches!(
        fw.add_kernel_direct_boot(&bzimage(60, 4096), None, ""),
        Err(FwCfgError::BadKernel(_))
    ));
    assert_eq!(
        fw.add_kernel_direct_boot(&bzimage(1, 4096), None, "a\0b"),
        Err(FwCfgError::CmdlineHasNul)
    );
    assert!(fw.items.len() == 2, "nothing added");
}
