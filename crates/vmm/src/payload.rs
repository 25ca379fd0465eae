//! What a new VM boots (its payload): the checks a configuration must pass before KVM is
//! touched, the kernel command line, and loading the demo guest or a Linux kernel with its
//! initrd, ACPI tables and MP table into guest memory.

use std::fs::File;

use vessel_boot::{BootConfig, BootRegs, EntryMode};
use vessel_memory::vm_memory::{Bytes, GuestAddress};
use vessel_memory::{addr, GuestLayout, GuestMemoryMmap};

use crate::config::{Payload, VmConfig, DEFAULT_CMDLINE};
use crate::error::VmmError;

/// The most vCPUs a VM can have: APIC ids 0..=254 (255 is the xAPIC broadcast id).
pub const MAX_CPUS: usize = 255;

fn open_file(path: &std::path::Path) -> Result<File, VmmError> {
    File::open(path).map_err(|source| VmmError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// Host RAM in bytes, from /proc/meminfo.
fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Check what can be checked before touching KVM.
pub fn validate(config: &VmConfig, max_vcpus: usize) -> Result<GuestLayout, VmmError> {
    if config.cpus == 0 {
        return Err(VmmError::NoCpus(0));
    }
    // APIC id 255 is the broadcast id: xAPIC guests can have at most 255 CPUs (0..=254).
    let max = max_vcpus.min(MAX_CPUS);
    if config.cpus as usize > max {
        return Err(VmmError::TooManyCpus {
            requested: config.cpus,
            max,
        });
    }
    let layout = GuestLayout::new(config.memory)?;
    if let Some(host) = host_memory() {
        if config.memory > host {
            return Err(VmmError::MemoryExceedsHost {
                requested: config.memory >> 20,
                host: host >> 20,
            });
        }
    }
    Ok(layout)
}

/// The command line the guest gets.
pub fn compose_cmdline(config: &VmConfig, nested_params: Option<&str>) -> String {
    let mut s = config
        .cmdline
        .clone()
        .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
    // Where Firecracker puts them: after the configured line.
    if let Some(root) = config.devices.pmem_root_params() {
        s.push(' ');
        s.push_str(&root);
    }
    if let Some(p) = nested_params {
        s.push(' ');
        s.push_str(p);
    }
    for a in &config.append {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// Load what boots: returns the boot CPU's registers and, for Linux, how the kernel was
/// loaded; `None` for a firmware, which the vCPU runs from its reset vector (its image is
/// part of the machine, see [`crate::firmware`]).
pub(crate) fn load_guest(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    nested_params: Option<&str>,
    platform: &vessel_boot::PlatformDevices,
) -> Result<Option<(BootRegs, Option<String>)>, VmmError> {
    match &config.boot {
        Payload::Firmware(_) => Ok(None),
        Payload::Demo => {
            let code = crate::demo::code();
            mem.write_slice(&code, GuestAddress(addr::HIMEM_START))
                .map_err(|source| VmmError::GuestMemory {
                    what: "write the demo guest",
                    addr: addr::HIMEM_START,
                    source,
                })?;
            let regs = BootRegs {
                rip: addr::HIMEM_START,
                rsp: addr::BOOT_STACK_POINTER,
                rsi: 0,
                rbx: 0,
                rflags: 2,
                mode: EntryMode::Long64,
            };
            Ok(Some((regs, None)))
        }
        Payload::Linux { kernel, initrd, .. } => {
            let num_cpus = config.cpus as u8;
            let mut kf = open_file(kernel)?;
            let loaded = vessel_boot::load_kernel(mem, layout, &mut kf)?;
            let initrd = match initrd {
                Some(p) => Some(vessel_boot::load_initrd(
                    mem,
                    layout,
                    &loaded,
                    &mut open_file(p)?,
                )?),
                None => None,
            };
            let rsdp = vessel_boot::create_acpi_tables(mem, num_cpus, platform)?;
            vessel_boot::create_mptable(mem, num_cpus)?;
            let mut cmdline = compose_cmdline(config, nested_params);
            // Without ACPI the kernel cannot see the DSDT's virtio-mmio devices: name them on
            // the command line instead (kernels with VIRTIO_MMIO_CMDLINE_DEVICES).
            if cmdline.split_whitespace().any(|w| w == "acpi=off") {
                for d in &platform.virtio_mmio {
                    cmdline.push(' ');
                    cmdline += &vessel_virtio::mmio::cmdline_entry(d.base, d.irq);
                }
            }
            log::info!("kernel command line: {cmdline}");
            let cfg = BootConfig {
                cmdline: &cmdline,
                initrd,
                num_cpus,
                rsdp_addr: Some(rsdp),
                // Entropy for the guest's CRNG from the first instruction: without it, a guest
                // whose kernel code is emulated spends a large share of its boot mixing
                // entropy it never gets enough of.
                rng_seed: Some(vessel_boot::host_rng_seed()?),
            };
            let regs = vessel_boot::configure_boot(mem, layout, &loaded, &cfg)?;
            Ok(Some((regs, Some(loaded.source().to_string()))))
        }
    }
}

/// The kernel parameters this host needs in a Linux guest's command line: those of
/// [`nested_params`] on a nested host whose KVM emulates guest kernel mode, `None` elsewhere.
/// Vessel adds them itself when it boots a kernel; a guest booted through firmware takes its
/// command line from its own bootloader, which must carry them (`vessel image kernel-params`).
pub fn host_kernel_params() -> Result<Option<String>, VmmError> {
    let kvm = vessel_kvm::system::open()?;
    if !vessel_kvm::nested::probe_nested_host_cached(&kvm)? {
        return Ok(None);
    }
    let vm = crate::kvm_vm::create_vm(&kvm)?;
    let vcpu = crate::error::KvmContext::kvm(vm.create_vcpu(0), "KVM_CREATE_VCPU")?;
    Ok(Some(nested_params(&vcpu)))
}

/// The kernel parameters for a nested host: the fixed set from `vessel_kvm::nested`, plus the
/// TSC frequency, which such a guest cannot calibrate (no PIT behind a hardware-reduced ACPI
/// platform, no kvmclock with `nopv`).
pub(crate) fn nested_params(vcpu: &kvm_ioctls::VcpuFd) -> String {
    let mut p = vessel_kvm::nested::nested_kernel_params();
    if let Ok(khz) = vcpu.get_tsc_khz() {
        p += &format!(" tsc_early_khz={khz}");
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_gets_nested_params_then_appended_words() {
        let mut c = VmConfig {
            append: vec!["vessel.poweroff".into()],
            ..Default::default()
        };
        assert_eq!(
            compose_cmdline(&c, Some("nopv")),
            format!("{DEFAULT_CMDLINE} nopv vessel.poweroff")
        );
        c.cmdline = Some("console=ttyS0".into());
        c.append.clear();
        assert_eq!(compose_cmdline(&c, None), "console=ttyS0");
        // A root pmem device: Firecracker's parameters right after the configured line.
        c.devices.pmem.push(crate::device_config::PmemConfig {
            path: "/rootfs.ext4".into(),
            read_only: false,
            root: true,
            guest_addr: None,
            transport: Default::default(),
            rate_limiter: None,
        });
        c.append.push("rootflags=dax".into());
        assert_eq!(
            compose_cmdline(&c, Some("nopv")),
            "console=ttyS0 root=/dev/pmem0 rw nopv rootflags=dax"
        );
    }

    #[test]
    fn impossible_configs_are_refused_before_kvm() {
        let c = VmConfig {
            cpus: 0,
            ..Default::default()
        };
        assert!(matches!(validate(&c, 8), Err(VmmError::NoCpus(0))));
        let c = VmConfig {
            cpus: 9,
            ..Default::default()
        };
        assert!(matches!(
            validate(&c, 8),
            Err(VmmError::TooManyCpus {
                requested: 9,
                max: 8
            })
        ));
        let c = VmConfig {
            cpus: 256,
            ..Default::default()
        };
        assert!(matches!(
            validate(&c, 4096),
            Err(VmmError::TooManyCpus { max: 255, .. })
        ));
        let c = VmConfig {
            memory: 1 << 20,
            ..Default::default()
        };
        assert!(matches!(validate(&c, 8), Err(VmmError::Memory(_))));
        let c = VmConfig {
            memory: 1 << 45,
            ..Default::default()
        };
        assert!(matches!(
            validate(&c, 8),
            Err(VmmError::MemoryExceedsHost { .. })
        ));
        assert!(validate(&VmConfig::default(), 8).is_ok());
    }
}
