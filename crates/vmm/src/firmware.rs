//! Booting through firmware: Debian's SeaBIOS (`--firmware bios`) or OVMF
//! (`--firmware uefi`), or any image given by path. The firmware image is mapped read-only
//! just below 4 GiB, as flash is on a PC, with its last 128 KiB also in RAM at 0xe0000 (the
//! legacy BIOS area SeaBIOS runs from); the boot vCPU starts at the reset vector in real mode
//! (KVM's power-on state), and the firmware learns about the machine through QEMU's fw_cfg
//! interface ([`vessel_devices::fw_cfg`]): the e820 map, the CPU count, the serial console
//! and Vessel's ACPI tables as a table-loader script. The PCI host bridge becomes an i440FX,
//! the platform both firmwares know, and they place the BARs themselves.

use std::path::{Path, PathBuf};

use std::sync::{Arc, Mutex, PoisonError};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vessel_memory::vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vessel_memory::GuestMemoryMmap;

use vessel_boot::PlatformDevices;
use vessel_devices::fw_cfg::loader::{self, TableLoader, Zone};
use vessel_devices::fw_cfg::{e820_bytes, keys, FwCfg, FwCfgError};
use vessel_devices::{Bus, Pflash, PflashState};
use vessel_memory::{addr, ports, E820Kind, GuestLayout};

use crate::error::{KvmContext, VmmError};

/// Debian's SeaBIOS (package `seabios`).
pub const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";
/// Debian's OVMF code and variable-store template (package `ovmf`).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// The smallest and largest firmware image Vessel maps (SeaBIOS is 256 KiB, OVMF 4 MiB).
const MIN_SIZE: u64 = 64 << 10;
const MAX_SIZE: u64 = 16 << 20;
/// The legacy BIOS area at the top of the first MiB: the image's last 128 KiB go there.
const LOW_BIOS_SIZE: u64 = 128 << 10;
const LOW_BIOS_END: u64 = 1 << 20;
/// KVM memory slots of the firmware images (after the RAM slots, which are 0 and 1).
const FIRST_SLOT: u32 = 16;

/// Which firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FirmwareKind {
    /// A legacy BIOS (SeaBIOS).
    Bios,
    /// UEFI (OVMF).
    Uefi,
}

/// The firmware a VM boots through.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Firmware {
    pub kind: FirmwareKind,
    /// The code image.
    pub code: PathBuf,
    /// UEFI only: the variable-store template (Debian's `OVMF_VARS_4M.fd`), never written.
    pub vars: Option<PathBuf>,
    /// UEFI only: this VM's variable store, writable flash below the code: a copy of `vars`
    /// made on first use and kept, so boot entries survive a restart. Without one (or
    /// without a template) OVMF keeps its variables in RAM for the run.
    #[serde(default)]
    pub vars_store: Option<PathBuf>,
    /// A kernel the firmware boots itself, handed over through fw_cfg (QEMU's `-kernel`,
    /// which OVMF's kernel loader reads), instead of booting from the disks.
    #[serde(default)]
    pub kernel: Option<FirmwareKernel>,
}

/// A Linux kernel (a bzImage), its initramfs and command line, for the firmware to boot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FirmwareKernel {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// Why a firmware cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("'{0}' is not a firmware: use bios, uefi or a path to an image")]
    BadName(String),
    #[error("{} is missing: install Debian's {package} package", path.display())]
    Missing {
        path: PathBuf,
        package: &'static str,
    },
    #[error("cannot read the firmware image {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the firmware image {} is {size} bytes: it must be 64 KiB to 16 MiB, a multiple of 4 KiB", path.display())]
    BadSize { path: PathBuf, size: u64 },
    #[error("cannot make the UEFI variable store {} from {}", to.display(), from.display())]
    VarsCopy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the UEFI variable store {} is {size} bytes, its template {} {expected}: it belongs to another firmware", path.display(), template.display())]
    VarsSize {
        path: PathBuf,
        size: u64,
        template: PathBuf,
        expected: u64,
    },
    #[error("the UEFI variable store {} does not exist, and the firmware {} has no template to make it from (a unified image keeps its variables inside)", store.display(), code.display())]
    NoVarsTemplate { code: PathBuf, store: PathBuf },
    #[error("the UEFI variable store cannot serve as flash")]
    Flash(#[source] vessel_devices::PflashError),
    #[error("the snapshot's UEFI variable store does not match this VM's (one has a store, the other none)")]
    FlashMismatch,
}

impl Firmware {
    /// `bios`, `uefi`, or a path (a file ending in `.fd` is taken for UEFI code, anything
    /// else for a BIOS).
    pub fn resolve(spec: &str) -> Result<Firmware, FirmwareError> {
        let fw = match spec {
            "bios" => Firmware {
                kind: FirmwareKind::Bios,
                code: SEABIOS.into(),
                vars: None,
                vars_store: None,
                kernel: None,
            },
            "uefi" => Firmware {
                kind: FirmwareKind::Uefi,
                code: OVMF_CODE.into(),
                vars: Some(OVMF_VARS.into()),
                vars_store: None,
                kernel: None,
            },
            "" => return Err(FirmwareError::BadName(spec.into())),
            path => {
                let code = PathBuf::from(path);
                let uefi = code.extension().is_some_and(|e| e == "fd");
                // OVMF's split images come in pairs: FOO_CODE_4M.fd beside FOO_VARS_4M.fd.
                let vars = uefi
                    .then(|| vars_beside(&code))
                    .flatten()
                    .filter(|v| v.exists());
                Firmware {
                    kind: if uefi {
                        FirmwareKind::Uefi
                    } else {
                        FirmwareKind::Bios
                    },
                    code,
                    vars,
                    vars_store: None,
                    kernel: None,
                }
            }
        };
        for p in std::iter::once(&fw.code).chain(&fw.vars) {
            if !p.exists() {
                let package = match fw.kind {
                    FirmwareKind::Bios => "seabios",
                    FirmwareKind::Uefi => "ovmf",
                };
                return Err(FirmwareError::Missing {
                    path: p.clone(),
                    package,
                });
            }
        }
        Ok(fw)
    }

    /// UEFI: keeps this VM's variables in `store` (made from the template when missing; a
    /// firmware without a template needs an existing store).
    pub fn with_vars_store(mut self, store: PathBuf) -> Result<Firmware, FirmwareError> {
        if self.vars.is_none() && !store.exists() {
            return Err(FirmwareError::NoVarsTemplate {
                code: self.code,
                store,
            });
        }
        self.vars_store = Some(store);
        Ok(self)
    }

    /// The images to map read-only, top down from 4 GiB: the code, then the variable-store
    /// template when the VM has no store of its own.
    fn images(&self) -> Result<Vec<Vec<u8>>, FirmwareError> {
        let template = self.vars.as_ref().filter(|_| self.vars_store.is_none());
        std::iter::once(&self.code)
            .chain(template)
            .map(|p| read_image(p))
            .collect()
    }

    /// This VM's variable store, made from the template when it does not exist yet; `None`
    /// when the VM has none. A store whose size is not the template's is refused (OVMF
    /// finds its variables at a fixed address below its code).
    pub fn prepare_vars_store(&self) -> Result<Option<PathBuf>, FirmwareError> {
        let (template, store) = match (&self.vars, &self.vars_store) {
            (_, None) => return Ok(None),
            (None, Some(store)) => return Ok(Some(store.clone())),
            (Some(t), Some(s)) => (t, s),
        };
        let copy_err = |source| FirmwareError::VarsCopy {
            from: template.clone(),
            to: store.clone(),
            source,
        };
        let expected = std::fs::metadata(template)
            .map_err(|source| FirmwareError::Read {
                path: template.clone(),
                source,
            })?
            .len();
        match std::fs::metadata(store) {
            Ok(m) if m.len() != expected => {
                return Err(FirmwareError::VarsSize {
                    path: store.clone(),
                    size: m.len(),
                    template: template.clone(),
                    expected,
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = store.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(copy_err)?;
                }
                // Copied aside, then renamed: a store is never half made.
                let partial = store.with_extension("partial");
                std::fs::copy(template, &partial).map_err(copy_err)?;
                std::fs::rename(&partial, store).map_err(copy_err)?;
                log::info!(
                    "UEFI variable store {} made from {}",
                    store.display(),
                    template.display()
                );
            }
            Err(source) => {
                return Err(FirmwareError::Read {
                    path: store.clone(),
                    source,
                })
            }
        }
        Ok(Some(store.clone()))
    }
}

/// The variable-store template that comes with a split OVMF code image: the same name with
/// `CODE` replaced by `VARS`.
fn vars_beside(code: &Path) -> Option<PathBuf> {
    let name = code.file_name()?.to_str()?;
    name.contains("CODE")
        .then(|| code.with_file_name(name.replacen("CODE", "VARS", 1)))
}

/// Where a VM booting `disk` through UEFI keeps its variables when not told:
/// `$XDG_STATE_HOME/vessel/uefi-vars` (or `~/.local/state/...`), one store per disk, named
/// after the disk's file name and a hash of its full path, so the same disk finds its boot
/// entries again on the next run. `None` without a disk or a home.
pub fn default_vars_store(disk: &Path) -> Option<PathBuf> {
    let state = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| Path::new(v).is_absolute())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| Path::new(v).is_absolute())
                .map(|h| Path::new(&h).join(".local/state"))
        })?;
    let full = std::fs::canonicalize(disk).unwrap_or_else(|_| disk.to_path_buf());
    let name = full.file_name()?.to_string_lossy().into_owned();
    Some(state.join("vessel/uefi-vars").join(format!(
        "{name}-{:016x}.fd",
        fnv1a(full.as_os_str().as_encoded_bytes())
    )))
}

/// FNV-1a, 64-bit: a hash that stays the same from one Vessel version to the next.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn read_image(path: &Path) -> Result<Vec<u8>, FirmwareError> {
    let data = std::fs::read(path).map_err(|source| FirmwareError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let size = data.len() as u64;
    if !(MIN_SIZE..=MAX_SIZE).contains(&size) || !size.is_multiple_of(4096) {
        return Err(FirmwareError::BadSize {
            path: path.to_path_buf(),
            size,
        });
    }
    Ok(data)
}

/// The firmware images as the guest sees them: read-only memory below 4 GiB. Kept for as
/// long as the VM runs (KVM maps it).
pub struct FirmwareRom {
    regions: GuestMemoryMmap,
    /// The UEFI variable store, as CFI flash right below the code (on the MMIO bus: every
    /// access traps), when the VM has a store of its own.
    flash: Option<Arc<Mutex<Pflash>>>,
}

impl FirmwareRom {
    /// Maps `fw` below 4 GiB (read-only KVM slots), with the VM's variable store as flash
    /// below the code on `mmio_bus`.
    pub(crate) fn map(vm: &VmFd, fw: &Firmware, mmio_bus: &mut Bus) -> Result<Self, VmmError> {
        let mut images = fw.images()?;
        let mut top = 1u64 << 32;
        let mut ranges = Vec::new();
        for img in &images {
            top -= img.len() as u64;
            ranges.push((GuestAddress(top), img.len()));
        }
        // In address order: the variable store, then the code.
        ranges.reverse();
        images.reverse();
        let regions =
            GuestMemoryMmap::from_ranges(&ranges).map_err(vessel_memory::MemoryError::Mmap)?;
        for ((at, _), img) in ranges.iter().zip(&images) {
            regions
                .write_slice(img, *at)
                .map_err(|source| VmmError::GuestMemory {
                    what: "copy the firmware image",
                    addr: at.0,
                    source,
                })?;
        }
        for (i, region) in regions.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: FIRST_SLOT + i as u32,
                flags: kvm_bindings::KVM_MEM_READONLY,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `regions`, which the returned
            // `FirmwareRom` keeps; the machine holds it until every vCPU thread is joined, so
            // the guest never reads unmapped memory. The range (below 4 GiB, above the
            // LAPIC) overlaps no RAM slot.
            unsafe { vm.set_user_memory_region(r) }.kvm("KVM_SET_USER_MEMORY_REGION")?;
        }
        let flash = match fw.prepare_vars_store()? {
            Some(store) => {
                let flash = Pflash::open(&store).map_err(FirmwareError::Flash)?;
                let at = top - flash.len();
                log::info!(
                    "UEFI variable store {} as flash at {at:#x}",
                    store.display()
                );
                let len = flash.len();
                let flash = Arc::new(Mutex::new(flash));
                mmio_bus
                    .insert(flash.clone(), at, len)
                    .map_err(|source| VmmError::Bus {
                        what: "the UEFI variable store".into(),
                        source,
                    })?;
                Some(flash)
            }
            None => None,
        };
        Ok(FirmwareRom { regions, flash })
    }

    /// The variable store's state, for a snapshot.
    pub(crate) fn flash_state(&self) -> Option<PflashState> {
        self.flash.as_ref().map(|f| lock(f).save_state())
    }

    /// Puts back the variable store of a snapshot (written through to this VM's store).
    pub(crate) fn restore_flash(&self, state: Option<&PflashState>) -> Result<(), FirmwareError> {
        match (&self.flash, state) {
            (Some(f), Some(s)) => lock(f).restore_state(s).map_err(FirmwareError::Flash),
            (None, None) => Ok(()),
            (Some(_), None) | (None, Some(_)) => Err(FirmwareError::FlashMismatch),
        }
    }

    /// Flushes the variable store to its file (when the VM stops).
    pub(crate) fn sync(&self) {
        if let Some(f) = &self.flash {
            if let Err(e) = lock(f).sync() {
                log::warn!("cannot flush the UEFI variable store: {e}");
            }
        }
    }

    /// A new guest: copies the code's last 128 KiB into `mem` at 0xe0000, where a PC's BIOS
    /// shadows it (a restored guest has its own copy, changed as the firmware ran).
    pub(crate) fn shadow(&self, mem: &GuestMemoryMmap) -> Result<(), VmmError> {
        // The code is the image at the top, ending at 4 GiB.
        let Some(code) = self.regions.iter().last() else {
            return Ok(());
        };
        let len = LOW_BIOS_SIZE.min(code.len());
        let mut low = vec![0u8; len as usize];
        let from = code.start_addr().0 + code.len() - len;
        self.regions
            .read_slice(&mut low, GuestAddress(from))
            .map_err(|source| VmmError::GuestMemory {
                what: "read the firmware image",
                addr: from,
                source,
            })?;
        let at = LOW_BIOS_END - len;
        mem.write_slice(&low, GuestAddress(at))
            .map_err(|source| VmmError::GuestMemory {
                what: "copy the firmware into the BIOS area",
                addr: at,
                source,
            })
    }

    /// The images as guest memory (for instructions the VMM completes, which read them).
    pub(crate) fn memory(&self) -> &GuestMemoryMmap {
        &self.regions
    }

    /// Where the images are: (start, length), in address order (the code last).
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect()
    }
}

fn lock(f: &Mutex<Pflash>) -> std::sync::MutexGuard<'_, Pflash> {
    f.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The fw_cfg device a firmware reads the machine from: CPUs, RAM, the e820 map, a serial
/// console on COM1, no boot menu, and the ACPI tables of `platform` with the table-loader
/// script that installs them.
pub(crate) fn fw_cfg(
    firmware: &Firmware,
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    cpus: u8,
    platform: &PlatformDevices,
) -> Result<FwCfg, VmmError> {
    let mut fw = FwCfg::new(mem.clone());
    if let Some(k) = &firmware.kernel {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| FirmwareError::Read {
                path: path.clone(),
                source,
            })
        };
        let initrd = k.initrd.as_ref().map(read).transpose()?;
        fw.add_kernel_direct_boot(&read(&k.kernel)?, initrd, &k.cmdline)
            .map_err(cannot_add("the kernel for the firmware to boot"))?;
    }
    fw.add_u16(keys::NB_CPUS, u16::from(cpus))
        .map_err(cannot_add("the CPU count"))?;
    fw.add_u16(keys::MAX_CPUS, u16::from(cpus))
        .map_err(cannot_add("the CPU count"))?;
    fw.add_u64(keys::RAM_SIZE, layout.mem_size())
        .map_err(cannot_add("the RAM size"))?;
    // RAM, and the ECAM window the firmware must not hand out (SeaBIOS and OVMF add
    // their own reservations for the BIOS area).
    let e820: Vec<_> = layout
        .ram_regions()
        .iter()
        .map(|(at, len)| (at.0, *len as u64, E820Kind::Ram as u32))
        .chain(platform.pci.then_some((
            addr::PCI_ECAM_START,
            addr::PCI_ECAM_SIZE,
            E820Kind::Reserved as u32,
        )))
        .collect();
    fw.add_file("etc/e820", e820_bytes(&e820))
        .map_err(cannot_add("etc/e820"))?;
    fw.add_file("etc/sercon-port", ports::COM1.to_le_bytes().to_vec())
        .map_err(cannot_add("etc/sercon-port"))?;
    fw.add_file("etc/show-boot-menu", 0u16.to_le_bytes().to_vec())
        .map_err(cannot_add("etc/show-boot-menu"))?;
    // With nothing to boot, SeaBIOS says so and resets after this long (ms) instead of its
    // default minute; the reset ends the VM.
    fw.add_file(
        "etc/boot-fail-wait",
        BOOT_FAIL_WAIT_MS.to_le_bytes().to_vec(),
    )
    .map_err(cannot_add("etc/boot-fail-wait"))?;
    add_acpi(&mut fw, cpus, platform)?;
    Ok(fw)
}

/// The error of adding `what` to fw_cfg.
fn cannot_add(what: &str) -> impl FnOnce(FwCfgError) -> VmmError {
    let what = what.to_string();
    move |source| VmmError::FwCfg { what, source }
}

/// Vessel's ACPI tables as `etc/acpi/tables` and `etc/acpi/rsdp`, and the `etc/table-loader`
/// script with which the firmware places them, links them and sums them.
fn add_acpi(fw: &mut FwCfg, cpus: u8, platform: &PlatformDevices) -> Result<(), VmmError> {
    const TABLES: &str = loader::ACPI_TABLES_FILE;
    const RSDP: &str = loader::ACPI_RSDP_FILE;
    let acpi = vessel_boot::firmware_acpi_tables(cpus, platform)?;
    let mut script = TableLoader::new();
    let mut build = || -> Result<(), loader::LoaderError> {
        script.allocate(RSDP, 16, Zone::FSeg)?;
        script.allocate(TABLES, 64, Zone::High)?;
        for p in &acpi.pointers {
            script.add_pointer(TABLES, TABLES, *p as u32, 8)?;
        }
        script.add_pointer(RSDP, TABLES, acpi.rsdp_pointer as u32, 8)?;
        for (_, at, len) in acpi.layout.iter().filter(|(s, _, _)| s != b"FACS") {
            script.add_checksum(TABLES, (*at + SDT_CHECKSUM) as u32, *at as u32, *len as u32)?;
        }
        script.add_checksum(RSDP, RSDP_CHECKSUM, 0, RSDP_V1_LEN)?;
        script.add_checksum(RSDP, RSDP_EXT_CHECKSUM, 0, acpi.rsdp.len() as u32)
    };
    build().map_err(VmmError::TableLoader)?;
    let zeroed = |mut bytes: Vec<u8>, sums: &[usize]| {
        for s in sums {
            bytes[*s] = 0;
        }
        bytes
    };
    let table_sums: Vec<_> = acpi
        .layout
        .iter()
        .map(|(_, at, _)| at + SDT_CHECKSUM)
        .collect();
    let rsdp_sums = [RSDP_CHECKSUM as usize, RSDP_EXT_CHECKSUM as usize];
    fw.add_file(TABLES, zeroed(acpi.tables, &table_sums))
        .map_err(cannot_add(TABLES))?;
    fw.add_file(RSDP, zeroed(acpi.rsdp, &rsdp_sums))
        .map_err(cannot_add(RSDP))?;
    fw.add_file(loader::LOADER_FILE, script.to_bytes())
        .map_err(cannot_add(loader::LOADER_FILE))
}

/// How long SeaBIOS waits before it resets when no disk boots.
const BOOT_FAIL_WAIT_MS: u32 = 3000;

/// Checksum fields: a table header's, and the RSDP's two (the first 20 bytes, all 36).
const SDT_CHECKSUM: usize = 9;
const RSDP_CHECKSUM: u32 = 8;
const RSDP_EXT_CHECKSUM: u32 = 32;
const RSDP_V1_LEN: u32 = 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths_resolve_and_bad_ones_say_why() {
        assert!(matches!(
            Firmware::resolve(""),
            Err(FirmwareError::BadName(_))
        ));
        let e = Firmware::resolve("/nonexistent/bios.bin").unwrap_err();
        assert!(e.to_string().contains("seabios"), "{e}");
        let e = Firmware::resolve("/nonexistent/CODE.fd").unwrap_err();
        assert!(e.to_string().contains("ovmf"), "{e}");
        if Path::new(SEABIOS).exists() {
            let fw = Firmware::resolve("bios").unwrap();
            assert_eq!(fw.kind, FirmwareKind::Bios);
            assert_eq!(fw.images().unwrap()[0].len(), 256 << 10);
        }
    }

    /// A store is made from the template once and then kept as the guest left it; one of
    /// another size is refused; a BIOS or a unified image takes none.
    #[test]
    fn the_variable_store_is_made_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("vessel-vars-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (code, template) = (dir.join("CODE.fd"), dir.join("VARS.fd"));
        std::fs::write(&code, vec![0u8; 64 << 10]).unwrap();
        std::fs::write(&template, vec![0xa5u8; 64 << 10]).unwrap();
        let fw = Firmware {
            kind: FirmwareKind::Uefi,
            code: code.clone(),
            vars: Some(template.clone()),
            vars_store: None,
            kernel: None,
        };
        assert_eq!(fw.prepare_vars_store().unwrap(), None, "no store asked for");
        assert_eq!(
            fw.images().unwrap().len(),
            2,
            "the template is mapped read-only"
        );
        let store = dir.join("nvram/vm.fd");
        let fw = fw.with_vars_store(store.clone()).unwrap();
        assert_eq!(fw.images().unwrap().len(), 1, "the store is flash, not ROM");
        assert_eq!(fw.prepare_vars_store().unwrap(), Some(store.clone()));
        assert_eq!(std::fs::read(&store).unwrap(), vec![0xa5u8; 64 << 10]);
        // What the guest wrote stays.
        std::fs::write(&store, vec![0x11u8; 64 << 10]).unwrap();
        fw.prepare_vars_store().unwrap();
        assert_eq!(std::fs::read(&store).unwrap(), vec![0x11u8; 64 << 10]);
        std::fs::write(&store, vec![0u8; 4 << 10]).unwrap();
        let e = fw.prepare_vars_store().unwrap_err();
        assert!(
            matches!(
                e,
                FirmwareError::VarsSize {
                    size: 4096,
                    expected: 65536,
                    ..
                }
            ),
            "{e}"
        );
        // A split image given by path finds its template beside it; a unified one has
        // none, and then needs a store that exists.
        let paired = Firmware::resolve(code.to_str().unwrap()).unwrap();
        assert_eq!(paired.vars, Some(template.clone()));
        let unified = dir.join("OVMF.fd");
        std::fs::write(&unified, vec![0u8; 64 << 10]).unwrap();
        let unified = Firmware::resolve(unified.to_str().unwrap()).unwrap();
        assert_eq!(unified.vars, None);
        assert!(matches!(
            unified.clone().with_vars_store(dir.join("missing.fd")),
            Err(FirmwareError::NoVarsTemplate { .. })
        ));
        let own = unified.with_vars_store(store.clone()).unwrap();
        assert_eq!(own.prepare_vars_store().unwrap(), Some(store));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_default_store_is_per_disk_and_stable() {
        let a = default_vars_store(Path::new("/images/a.qcow2"));
        let b = default_vars_store(Path::new("/images/b.qcow2"));
        if std::env::var_os("HOME").is_none() && std::env::var_os("XDG_STATE_HOME").is_none() {
            return;
        }
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_ne!(a, b);
        assert!(
            a.ends_with(format!("a.qcow2-{:016x}.fd", fnv1a(b"/images/a.qcow2"))),
            "{}",
            a.display()
        );
        assert!(a.parent().unwrap().ends_with("vessel/uefi-vars"));
        assert_eq!(Some(a), default_vars_store(Path::new("/images/a.qcow2")));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(
            fnv1a(b"a"),
            0xaf63_dc4c_8601_ec8c,
            "the published FNV-1a value"
        );
    }

    #[test]
    fn images_of_odd_sizes_are_refused() {
        let dir = std::env::temp_dir().join(format!("vessel-fw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, size) in [("small", 4096usize), ("odd", (64 << 10) + 1)] {
            let p = dir.join(name);
            std::fs::write(&p, vec![0u8; size]).unwrap();
            let fw = Firmware::resolve(p.to_str().unwrap()).unwrap();
            assert!(matches!(
                fw.images(),
                Err(FirmwareError::BadSize { size: s, .. }) if s == size as u64
            ));
        }
        let p = dir.join("ok.bin");
        std::fs::write(&p, vec![0u8; 64 << 10]).unwrap();
        assert_eq!(
            Firmware::resolve(p.to_str().unwrap())
                .unwrap()
                .images()
                .unwrap()
                .len(),
            1
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
