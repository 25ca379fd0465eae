//! Limits on what is read from an image.

use super::*;

#[test]
fn the_initrds_count_together_against_the_limit() {
    let dir = std::env::temp_dir().join(format!("vessel-diskboot-{}-limit", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let esp = dir.join("esp");
    std::fs::create_dir_all(esp.join("loader/entries")).unwrap();
    std::fs::write(esp.join("vmlinuz"), vec![1u8; 30_000]).unwrap();
    std::fs::write(esp.join("initrd"), vec![2u8; 40_000]).unwrap();
    std::fs::write(
        esp.join("loader/entries/a.conf"),
        "title A\nlinux /vmlinuz\ninitrd /initrd\ninitrd /initrd\ninitrd /initrd\n",
    )
    .unwrap();
    let disk = make::gpt_esp_disk(&dir, &esp, 4, None).unwrap();
    assert_eq!(find(&disk, 120_000).unwrap().initrd.unwrap().len(), 120_000);
    let e = find(&disk, 100_000).unwrap_err();
    assert!(
        matches!(&e, DiskBootError::TooLarge { what, size: 120_000, .. }
            if what == "the initrds up to /initrd"),
        "{e:?}"
    );
    let e = find(&disk, 20_000).unwrap_err();
    assert!(
        matches!(&e, DiskBootError::TooLarge { what, size: 30_000, .. }
            if what == "the kernel /vmlinuz"),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .starts_with("the kernel /vmlinuz of \"A\": 30000 bytes, more than"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An MBR table: its sector, and its entries (type, first sector, sectors).
type Table<'a> = (u64, &'a [(u8, u32, u32)]);

/// A disk image of `sectors` sectors with MBR `tables` and filesystems at the given sectors.
fn mbr_disk(path: &Path, sectors: u64, tables: &[Table], fs: &[(u64, &[u8])]) {
    let mut img = vec![0u8; sectors as usize * 512];
    for &(lba, entries) in tables {
        let s = &mut img[lba as usize * 512..][..512];
        for (i, &(kind, start, len)) in entries.iter().enumerate() {
            let e = &mut s[446 + 16 * i..][..16];
            e[4] = kind;
            e[8..12].copy_from_slice(&start.to_le_bytes());
            e[12..16].copy_from_slice(&len.to_le_bytes());
        }
        s[510..512].copy_from_slice(&[0x55, 0xAA]);
    }
    for &(lba, bytes) in fs {
        img[lba as usize * 512..][..bytes.len()].copy_from_slice(bytes);
    }
    std::fs::write(path, img).unwrap();
}

fn open(path: &Path) -> Arc<Disk> {
    Arc::new(Disk::open(path, true, None, None).unwrap())
}

#[test]
fn mbr_primary_and_logical_partitions_are_found() {
    let dir = std::env::temp_dir().join(format!("vessel-diskboot-{}-mbr", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let esp = dir.join("esp");
    std::fs::create_dir_all(esp.join("loader/entries")).unwrap();
    std::fs::write(esp.join("vmlinuz"), b"KERNEL").unwrap();
    std::fs::write(esp.join("loader/entries/a.conf"), "linux /vmlinuz\n").unwrap();
    let fat = make::vfat(&esp, 1, None).unwrap();
    let disk = dir.join("mbr.img");
    // Primary 1 (FAT, empty), an extended partition at 4096 whose chain holds logical 5 (at
    // 4097, nothing) and 6 (at 6200, the ESP), then a last table pointing back (ignored).
    mbr_disk(
        &disk,
        8400,
        &[
            (0, &[(0x0C, 2048, 2048), (0x0F, 4096, 4200)]),
            (4096, &[(0xEF, 1, 2048), (0x05, 2100, 2100)]),
            (6196, &[(0x83, 4, 2048), (0x05, 2100, 100)]),
        ],
        &[(6200, &fat)],
    );
    assert_eq!(
        partitions(&open(&disk)),
        [
            (1, 2048 * 512, 2048 * 512),
            (5, 4097 * 512, 2048 * 512),
            (6, 6200 * 512, 2048 * 512),
        ]
    );
    let b = find_linux(&disk).unwrap();
    assert_eq!(
        (&b.kernel[..], b.found_in.as_str()),
        (&b"KERNEL"[..], "partition 6 (vfat): /loader/entries/a.conf")
    );

    // The table `mbrman` panicked on (fuzzing): a used entry at sector 0, nothing else.
    mbr_disk(&disk, 2, &[(0, &[(0x01, 0, 0)])], &[]);
    assert_eq!(partitions(&open(&disk)), [(1, 0, 0)]);
    let text = find_linux(&disk).unwrap_err().to_string();
    assert!(text.contains("partition 1: not ext2/3/4 or vfat"), "{text}");
    // A chain of extended tables that points at itself ends.
    mbr_disk(
        &disk,
        16,
        &[(0, &[(0x05, 1, 10)]), (1, &[(0x83, 1, 1), (0x05, 0, 1)])],
        &[],
    );
    assert_eq!(partitions(&open(&disk)), [(5, 2 * 512, 512)]);
    let _ = std::fs::remove_dir_all(&dir);
}
