//! The FAT reader over volumes `fatfs` makes in memory (FAT12, 16 and 32), and over corrupted
//! ones: every corruption gives an error or garbage, never a panic or a loop.

use std::io::{Cursor, Seek, SeekFrom, Write};

use super::*;

/// A volume in memory.
struct Mem(Vec<u8>);

impl ReadAt for Mem {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| self.0.get(o..o.checked_add(buf.len())?))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl ReadAt for &Mem {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (*self).read_at(offset, buf)
    }
}

/// A kernel-sized file that is not all one byte.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// A volume of `mib` MiB (`fat32`: FAT32 with 512-byte clusters) laid out as an ESP: a stub
/// `grub.cfg`, loader entries with long mixed-case names, a kernel, and a file whose clusters
/// are not contiguous.
fn esp(mib: usize, fat32: bool) -> Vec<u8> {
    let mut img = Cursor::new(vec![0u8; mib << 20]);
    let mut options = fatfs::FormatVolumeOptions::new();
    if fat32 {
        options = options
            .fat_type(fatfs::FatType::Fat32)
            .bytes_per_cluster(512);
    }
    fatfs::format_volume(&mut img, options).unwrap();
    {
        let fs = fatfs::FileSystem::new(&mut img, fatfs::FsOptions::new()).unwrap();
        let root = fs.root_dir();
        let write = |path: &str, data: &[u8]| {
            let mut f = root.create_file(path).unwrap();
            f.write_all(data).unwrap();
        };
        root.create_dir("EFI").unwrap();
        root.create_dir("EFI/debian").unwrap();
        write(
            "EFI/debian/grub.cfg",
            b"search --fs-uuid 1234 --set root\nconfigfile ($root)/boot/grub/grub.cfg\n",
        );
        root.create_dir("loader").unwrap();
        root.create_dir("loader/entries").unwrap();
        write(
            "loader/entries/Fedora-6.11.4.conf",
            b"title Fedora\nlinux /vmlinuz\n",
        );
        write("vmlinuz", &pattern(50_000));
        // `frag` gets a cluster, `other` the next, then `frag` more: its chain jumps.
        write("frag", &pattern(100));
        write("other", b"x");
        let mut f = root.open_file("frag").unwrap();
        f.seek(SeekFrom::End(0)).unwrap();
        f.write_all(&pattern(9_000)[100..]).unwrap();
        drop(f);
        drop(root);
        fs.unmount().unwrap();
    }
    img.into_inner()
}

fn check_esp(img: Vec<u8>, kind: FatKind) {
    let fs = Fat::open(Mem(img)).unwrap();
    assert_eq!(fs.kind(), kind);
    assert_eq!(fs.read("/vmlinuz").unwrap(), pattern(50_000));
    assert_eq!(fs.read("frag").unwrap(), pattern(9_000));
    assert_eq!(fs.read("/other").unwrap(), b"x");
    // Any case, long name or short.
    let cfg = fs.read("/efi/DEBIAN/Grub.Cfg").unwrap();
    assert!(cfg.starts_with(b"search"));
    let entry = fs.read("/LOADER/entries/fedora-6.11.4.CONF").unwrap();
    assert_eq!(entry, b"title Fedora\nlinux /vmlinuz\n");
    let names: Vec<String> = fs
        .read_dir("/loader/entries")
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["Fedora-6.11.4.conf"]);
    let short = &fs.read_dir("/loader/entries").unwrap()[0].short;
    assert_eq!(fs.read(&format!("/loader/entries/{short}")).unwrap(), entry);
    let root: Vec<(String, bool)> = fs
        .read_dir("/")
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.is_dir))
        .collect();
    assert_eq!(
        root,
        [
            ("EFI".to_string(), true),
            ("loader".to_string(), true),
            ("vmlinuz".to_string(), false),
            ("frag".to_string(), false),
            ("other".to_string(), false),
        ]
    );
    assert!(matches!(fs.read("/missing"), Err(FatError::NotFound)));
    assert!(matches!(fs.read("/EFI"), Err(FatError::IsADirectory)));
    assert!(matches!(
        fs.read_dir("/vmlinuz"),
        Err(FatError::NotADirectory)
    ));
    assert!(matches!(
        fs.read("/vmlinuz/x"),
        Err(FatError::NotADirectory)
    ));
}

#[test]
fn fat12_fat16_and_fat32_volumes_read() {
    check_esp(esp(1, false), FatKind::Fat12);
    check_esp(esp(8, false), FatKind::Fat16);
    check_esp(esp(34, true), FatKind::Fat32);
}

#[test]
fn what_is_not_fat_is_refused() {
    for (img, why) in [
        (vec![0u8; 1 << 16], "signature"),
        (vec![0u8; 100], "shorter"),
        (
            {
                // A boot signature alone (an MBR) is not a FAT boot sector.
                let mut mbr = vec![0u8; 1 << 16];
                mbr[510..512].copy_from_slice(&[0x55, 0xAA]);
                mbr
            },
            "sector size",
        ),
    ] {
        match Fat::open(Mem(img)) {
            Err(e @ FatError::NotFat(_)) => assert!(e.to_string().contains(why), "{e}"),
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("taken for FAT"),
        }
    }
}

/// Where the directory entry with the 8.3 name `short` is.
fn entry_at(img: &[u8], short: &[u8; 11]) -> usize {
    img.windows(11).position(|w| w == short).unwrap()
}

#[test]
fn broken_cluster_numbers_and_sizes_are_errors() {
    let img = esp(8, false);
    let at = entry_at(&img, b"VMLINUZ    ");
    // A first cluster below 2 (fatfs panics on it), and one past the volume.
    for cluster in [1u16, 0xFFF0] {
        let mut bad = img.clone();
        bad[at + 26..at + 28].copy_from_slice(&cluster.to_le_bytes());
        let fs = Fat::open(Mem(bad)).unwrap();
        assert!(matches!(fs.read("/vmlinuz"), Err(FatError::BadChain(_))));
    }
    // A size larger than the volume.
    let mut bad = img.clone();
    bad[at + 28..at + 32].copy_from_slice(&u32::MAX.to_le_bytes());
    let fs = Fat::open(Mem(bad)).unwrap();
    let e = fs.read("/vmlinuz").unwrap_err();
    assert!(matches!(e, FatError::BadSize(0xFFFF_FFFF)), "{e:?}");
    // A size larger than the chain.
    let mut bad = img;
    bad[at + 28..at + 32].copy_from_slice(&200_000u32.to_le_bytes());
    let fs = Fat::open(Mem(bad)).unwrap();
    assert!(matches!(fs.read("/vmlinuz"), Err(FatError::BadChain(_))));
}

#[test]
fn a_directory_chain_that_loops_ends() {
    let mut img = esp(8, false);
    let fs = Fat::open(Mem(img.clone())).unwrap();
    let (fat_offset, data_offset, cs) = (
        fs.fat_offset as usize,
        fs.data_offset as usize,
        fs.cluster_size as usize,
    );
    let at = entry_at(&img, b"LOADER     ");
    let cluster = usize::from(u16::from_le_bytes([img[at + 26], img[at + 27]]));
    // The directory's one cluster: deleted entries throughout (no end mark), and its chain
    // pointing back at itself.
    let start = data_offset + (cluster - 2) * cs;
    for e in img[start..start + cs].chunks_exact_mut(32) {
        e[0] = 0xE5;
        e[11] = 0x20;
    }
    img[fat_offset + cluster * 2..fat_offset + cluster * 2 + 2]
        .copy_from_slice(&(cluster as u16).to_le_bytes());
    let fs = Fat::open(Mem(img)).unwrap();
    assert!(matches!(
        fs.read("/loader/entries/x.conf"),
        Err(FatError::NotFound)
    ));
    assert!(fs.read_dir("/loader").unwrap().is_empty());
}

/// xorshift64: reproducible corruption.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Looks at everything a scan would, ignoring the results.
fn exercise(fs: &Fat<&Mem>) {
    for path in ["/", "/EFI", "/EFI/debian", "/loader/entries", "/vmlinuz"] {
        if let Ok(entries) = fs.read_dir(path) {
            for e in entries.iter().take(64) {
                let _ = fs.read(&format!("{path}/{}", e.name));
            }
        }
    }
    for file in ["/vmlinuz", "/frag", "/EFI/debian/grub.cfg"] {
        let _ = fs.read(file);
    }
}

#[test]
fn corrupted_volumes_never_panic() {
    for (mib, fat32, seed) in [(1, false, 1), (8, false, 2), (34, true, 3)] {
        let mut img = Mem(esp(mib, fat32));
        // The boot sector, the used start of the table, the root directory and the first
        // clusters (directories, the small files).
        let regions = {
            let fs = Fat::open(&img).unwrap();
            let root = match fs.root {
                Dir::Region { offset, .. } => offset,
                Dir::Chain(_) => fs.data_offset,
            };
            [
                (0, 512),
                (fs.fat_offset, 512),
                (root, fs.data_offset - root + 64 * fs.cluster_size),
            ]
        };
        let mut next = rng(seed);
        let mut opened = 0;
        for round in 0..1500 {
            let flips: Vec<(usize, u8)> = (0..1 + round % 8)
                .map(|_| {
                    let (start, len) = regions[(next() % 3) as usize];
                    let at = (start + next() % len) as usize;
                    (at, img.0[at])
                })
                .collect();
            for &(at, _) in &flips {
                img.0[at] = next() as u8;
            }
            if let Ok(fs) = Fat::open(&img) {
                exercise(&fs);
                opened += 1;
            }
            for &(at, old) in flips.iter().rev() {
                img.0[at] = old;
            }
        }
        // Most corruptions leave a volume to read: the reading code is what is tried.
        assert!(opened > 1000, "{opened}");
    }
}
