//! Building a VM up to its first `KVM_RUN`: [`build_for_boot`] for a new guest and
//! [`build_from_snapshot`] for a restored or migrated one, two short functions over the same
//! steps:
//!
//! 1. [`open_host`]: KVM opened, its capabilities and the configuration checked;
//! 2. [`create_machine`]: the KVM VM with its TSS and identity-map pages, guest memory
//!    registered, the in-kernel irqchip and PIT, the vCPUs created, the legacy and virtio
//!    devices on their buses: one [`Machine`] (see [`crate::kvm_vm`] for why memory comes
//!    before the irqchip);
//! 3. a new guest gets its payload loaded ([`crate::payload`]) and power-on vCPUs; a restored
//!    one gets its saved vCPU, KVM and device state instead, and never runs boot code.

use std::io::Write as _;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::{Kvm, VcpuFd};
use vessel_boot::BootRegs;
use vessel_devices::{Bus, ExitSignal};
use vessel_memory::{create_guest_memory_backed, GuestLayout, GuestMemoryMmap};

use crate::config::{NestedMode, Payload, VmConfig};
use crate::cpu;
use crate::device_factory::DeviceHandles;
use crate::error::{KvmContext, VcpuError, VmmError};
use crate::firmware::{FirmwareKind, FirmwareRom};
use crate::kvm_vm::Irqchip;
use crate::legacy::LegacyDevices;
use crate::machine::Machine;
use crate::payload;
use crate::pci_host::Bridge;
use crate::restore::RestoreError;
use crate::snapshot::VmSnapshot;
use crate::vcpu::{PauseGate, Vcpu};
use crate::vmgenid::{self, VmGenIdState};
use vessel_devices::fw_cfg::{FW_CFG_PORT_BASE, FW_CFG_PORT_LEN};

/// A VM built and ready to run: memory, devices, the boot image and the vCPUs are set up;
/// no vCPU has run yet. [`Vm::start`] runs it.
pub struct Vm {
    pub(crate) machine: Arc<Machine>,
    pub(crate) vcpus: Vec<Vcpu>,
    /// When building started.
    pub(crate) t0: Instant,
    /// How the kernel was loaded (a new Linux guest).
    pub(crate) kernel_source: Option<String>,
    pub(crate) start_paused: bool,
    /// Run once the vCPU threads exist (e.g. recording a restored guest's working set).
    pub(crate) after_start: Vec<Box<dyn FnOnce() + Send>>,
}

impl Vm {
    /// Builds the VM described by `config`, up to the first `KVM_RUN`.
    pub fn build(config: &VmConfig) -> Result<Vm, VmmError> {
        build_for_boot(config)
    }

    /// Starts the vCPUs parked: the VM is paused until [`crate::VmHandle::resume`].
    pub fn paused(mut self) -> Self {
        self.start_paused = true;
        self
    }

    /// Runs `f` once [`Vm::start`] has started the vCPUs.
    pub(crate) fn on_start(&mut self, f: Box<dyn FnOnce() + Send>) {
        self.after_start.push(f);
    }

    /// The handles on the devices a management API drives after start (balloon, disks,
    /// network interfaces); they stay valid while the VM runs.
    pub fn device_handles(&self) -> DeviceHandles {
        self.machine.device_handles()
    }

    /// A restored clone's new VM generation ID, announced to the guest; run after the
    /// irqchips are restored and before any vCPU runs.
    pub(crate) fn new_generation(&self) -> Result<(), VmmError> {
        let m = &self.machine;
        if let Some(s) = &m.vmgenid {
            vmgenid::regenerate(&m.vm, &m.mem, s)?;
        }
        Ok(())
    }
}

/// What every build starts from.
struct Host {
    kvm: Kvm,
    layout: GuestLayout,
    /// Started first: it measures from the start of the build.
    boot_timer: Option<vessel_devices::BootTimer>,
}

/// Opens KVM and checks what can be checked before touching it further.
fn open_host(config: &VmConfig) -> Result<Host, VmmError> {
    let boot_timer = config.boot_timer.then(vessel_devices::BootTimer::start);
    let kvm = vessel_kvm::system::open()?;
    vessel_kvm::system::check_capabilities(&kvm)?;
    let layout = payload::validate(config, vessel_kvm::system::max_vcpus(&kvm))?;
    Ok(Host {
        kvm,
        layout,
        boot_timer,
    })
}

/// The demo guest with no device takes no interrupt and is never snapshotted (`vessel run`
/// has no API): its VM has the LAPICs alone, which KVM tears down at once (see
/// [`Irqchip::LapicOnly`]). Every other VM has the PC's controllers and PIT.
fn irqchip_for(config: &VmConfig) -> Irqchip {
    match config.boot {
        Payload::Demo if config.devices.is_empty() => Irqchip::LapicOnly,
        _ => Irqchip::Pc,
    }
}

/// The KVM VM, its memory, irqchip, vCPUs and devices, as one [`Machine`]; and the vCPUs'
/// file descriptors, not yet configured.
fn create_machine(
    host: Host,
    config: &VmConfig,
    mem: GuestMemoryMmap,
    nested: bool,
    vmgenid: Option<VmGenIdState>,
    slot_plan: &[Option<u8>],
) -> Result<(Arc<Machine>, Vec<VcpuFd>), VmmError> {
    let vm = Arc::new(crate::kvm_vm::create_vm(&host.kvm)?);
    // Device-managed memory (after RAM in `mem`) is mapped by its device.
    let hotplug = crate::hotplug::device_memory(&host.layout, config)?.hotplug;
    let ram_regions = host.layout.ram_regions().len();
    crate::kvm_vm::register_ram(&vm, &mem, ram_regions, config.track_dirty_pages)?;
    let irqchip = irqchip_for(config);
    crate::kvm_vm::create_irqchip(&vm, irqchip)?;
    let fds = (0..config.cpus)
        .map(|id| vm.create_vcpu(u64::from(id)).kvm("KVM_CREATE_VCPU"))
        .collect::<Result<Vec<_>, _>>()?;

    let exit = ExitSignal::new().map_err(|source| VmmError::EventFd {
        what: "the exit signal".into(),
        source,
    })?;
    let mut io_bus = Bus::new();
    let mut mmio_bus = Bus::new();
    if let Some(t) = host.boot_timer {
        let at = vessel_memory::addr::BOOT_TIMER_START;
        mmio_bus
            .insert(
                Arc::new(Mutex::new(t)),
                at,
                vessel_devices::boot_timer::BOOT_TIMER_LEN,
            )
            .map_err(|source| VmmError::Bus {
                what: "the boot timer".into(),
                source,
            })?;
    }
    let legacy = LegacyDevices::new(&vm, &mut io_bus, &config.serial, config.serial_limit, &exit)?;
    let firmware = match &config.boot {
        Payload::Firmware(fw) => Some(fw),
        _ => None,
    };
    let bridge = match firmware {
        Some(fw) if fw.kind == FirmwareKind::Uefi => Bridge::I440fxPiix,
        Some(_) => Bridge::I440fx,
        None => Bridge::Vessel,
    };
    let mut virtio = crate::device_manager::create(
        &vm,
        &mem,
        &mut io_bus,
        &mut mmio_bus,
        &config.devices,
        bridge,
        host.layout.device_memory(),
        slot_plan,
    )?;
    if let (Some(cfg), Some((addr, _))) = (&config.devices.memory_hotplug, hotplug) {
        let (dev, handle) = crate::hotplug::create_device(&vm, &mem, cfg, addr)?;
        virtio.add(
            &mut io_bus,
            &mut mmio_bus,
            Box::new(dev),
            crate::device_factory::Role::Memory,
            cfg.transport,
        )?;
        virtio.handles.memory_hotplug = Some(handle);
        log::info!(
            "hotpluggable memory: {} MiB at {addr:#x}",
            cfg.total_size_mib
        );
    }
    let firmware = match firmware {
        Some(fw) => {
            virtio.booted_by_firmware(host.layout.firmware_pci_mmio64());
            let rom = FirmwareRom::map(&vm, fw, &mut mmio_bus)?;
            let fw_cfg = crate::firmware::fw_cfg(
                fw,
                &mem,
                &host.layout,
                config.cpus as u8,
                virtio.platform(),
            )?;
            io_bus
                .insert(
                    Arc::new(Mutex::new(fw_cfg)),
                    u64::from(FW_CFG_PORT_BASE),
                    FW_CFG_PORT_LEN,
                )
                .map_err(|source| VmmError::Bus {
                    what: "fw_cfg".into(),
                    source,
                })?;
            io_bus
                .insert(
                    Arc::new(Mutex::new(vessel_devices::AcpiPm1::new(exit.clone()))),
                    u64::from(vessel_memory::ports::ACPI_PM1_EVT),
                    vessel_devices::AcpiPm1::PORT_LEN,
                )
                .map_err(|source| VmmError::Bus {
                    what: "the ACPI PM1 registers".into(),
                    source,
                })?;
            io_bus
                .insert(
                    Arc::new(Mutex::new(vessel_devices::FirmwareLog::new())),
                    u64::from(vessel_devices::debug_port::FIRMWARE_LOG_PORT),
                    1,
                )
                .map_err(|source| VmmError::Bus {
                    what: "the firmware log port".into(),
                    source,
                })?;
            Some(rom)
        }
        None => None,
    };
    let machine = Machine {
        vm,
        mem,
        io_bus,
        mmio_bus,
        exit,
        legacy,
        virtio: Mutex::new(virtio),
        config: config.clone(),
        nested,
        irqchip,
        firmware,
        vmgenid,
        stop: AtomicBool::new(false),
        pause: Arc::new(PauseGate::default()),
        snapshot_lock: Mutex::new(()),
        devices_quiesced: AtomicBool::new(false),
    };
    Ok((Arc::new(machine), fds))
}

/// The vCPUs of `machine`, ready to run.
fn vcpus(machine: &Arc<Machine>, fds: Vec<VcpuFd>) -> Vec<Vcpu> {
    let profile = machine.config.profile_ms.is_some();
    fds.into_iter()
        .enumerate()
        .map(|(id, fd)| Vcpu::new(id as u8, fd, machine.clone(), machine.nested, profile))
        .collect()
}

/// Builds a new VM described by `config`, up to the first `KVM_RUN`.
pub fn build_for_boot(config: &VmConfig) -> Result<Vm, VmmError> {
    let t0 = Instant::now();
    let host = open_host(config)?;
    let nested = match config.nested {
        NestedMode::On => true,
        NestedMode::Off => false,
        // The demo guest never leaves ring 0 and makes no system calls: no need to probe.
        NestedMode::Auto if matches!(config.boot, Payload::Demo) => false,
        NestedMode::Auto => vessel_kvm::nested::probe_nested_host_cached(&host.kvm)?,
    };
    let layout = host.layout;
    let supported = host
        .kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .kvm("KVM_GET_SUPPORTED_CPUID")?;
    let device_memory = crate::hotplug::device_memory(&layout, config)?;
    let mem = create_guest_memory_backed(&layout, &device_memory.ranges, config.memory_backing())?;
    let vmgenid = vmgenid::install(&config.boot, &mem)?;
    let (machine, fds) = create_machine(host, config, mem, nested, vmgenid, &[])?;

    let image = load_payload(&machine, &layout, &fds[0])?;
    if let (Payload::Firmware(fw), Some(rom)) = (&config.boot, &machine.firmware) {
        let at = rom.ranges().last().map_or(0, |r| r.0);
        let _ = writeln!(
            std::io::stderr(),
            "vessel: booting through {} firmware {} (at {at:#x})",
            match fw.kind {
                FirmwareKind::Bios => "BIOS",
                FirmwareKind::Uefi => "UEFI",
            },
            fw.code.display()
        );
    }
    for (id, fd) in fds.iter().enumerate() {
        let id = id as u8;
        cpu::configure_vcpu(
            fd,
            id,
            config.cpus as u8,
            &supported,
            nested,
            config.cpu_template.as_ref(),
        )?;
        // A firmware starts from the reset vector: KVM's power-on state.
        if let (0, Some(image)) = (id, &image) {
            cpu::set_boot_registers(fd, &image.regs, &image.gdt, image.cr3)?;
        }
    }
    Ok(Vm {
        vcpus: vcpus(&machine, fds),
        machine,
        t0,
        kernel_source: image.and_then(|i| i.kernel_source),
        start_paused: false,
        after_start: Vec::new(),
    })
}

/// What a new guest boots from: the boot CPU's registers and tables.
struct BootImage {
    regs: BootRegs,
    gdt: vessel_boot::Gdt,
    cr3: u64,
    /// How the kernel was loaded, for Linux guests.
    kernel_source: Option<String>,
}

/// Writes the payload, its tables and the boot page tables into guest memory; `None` for a
/// firmware, which needs none of it.
fn load_payload(
    m: &Machine,
    layout: &GuestLayout,
    boot_cpu: &VcpuFd,
) -> Result<Option<BootImage>, VmmError> {
    if let Some(rom) = &m.firmware {
        rom.shadow(&m.mem)?;
        return Ok(None);
    }
    let nested_params = m.nested.then(|| payload::nested_params(boot_cpu));
    let platform = vessel_boot::PlatformDevices {
        vmgenid: m.vmgenid.map(|v| v.info()),
        ..m.virtio().platform().clone()
    };
    let Some((regs, kernel_source)) = payload::load_guest(
        &m.config,
        &m.mem,
        layout,
        nested_params.as_deref(),
        &platform,
    )?
    else {
        return Ok(None);
    };
    if let (Some(p), NestedMode::Auto) = (&nested_params, m.config.nested) {
        let _ = writeln!(
            std::io::stderr(),
            "vessel: this host's KVM is nested and emulates guest kernel mode: adding kernel parameters: {p}"
        );
    }
    let gdt = vessel_boot::write_gdt(&m.mem, regs.mode)?;
    let cr3 = vessel_boot::write_identity_page_tables(&m.mem)?;
    Ok(Some(BootImage {
        regs,
        gdt,
        cr3,
        kernel_source,
    }))
}

/// Builds a VM from a snapshot's (or a migration's) state: `config` is the snapshot's (with
/// host-side changes), `mem` its guest memory, filled. Nothing of the boot path runs: the
/// vCPUs, KVM's devices and clock, and every device get their saved state.
pub(crate) fn build_from_snapshot<A>(
    config: &VmConfig,
    mem: GuestMemoryMmap,
    snap: &VmSnapshot<A>,
) -> Result<Vm, VmmError> {
    let t0 = Instant::now();
    let host = open_host(config)?;
    // Only state files older than the saved CPUID need this host's.
    let supported = match snap.vcpus.iter().all(|v| v.cpuid.is_some()) {
        true => None,
        false => Some(
            host.kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .kvm("KVM_GET_SUPPORTED_CPUID")?,
        ),
    };
    let slots: Vec<Option<u8>> = snap.virtio.iter().map(|d| d.slot).collect();
    let (machine, fds) = create_machine(host, config, mem, snap.nested, snap.vmgenid, &slots)?;
    for (id, fd) in fds.iter().enumerate() {
        restore_vcpu(fd, id as u8, snap, supported.as_ref())?;
    }
    restore_devices(&machine, snap)?;
    Ok(Vm {
        vcpus: vcpus(&machine, fds),
        machine,
        t0,
        kernel_source: None,
        start_paused: false,
        after_start: Vec::new(),
    })
}

/// Loads vCPU `id`'s state into a new vCPU, its saved CPUID first: it overwrites the
/// power-on MSRs, FPU and LAPIC setup a new vCPU gets. A state from before the CPUID was
/// saved gets it computed from `supported` (this host's), as a boot does.
fn restore_vcpu<A>(
    fd: &VcpuFd,
    id: u8,
    snap: &VmSnapshot<A>,
    supported: Option<&kvm_bindings::CpuId>,
) -> Result<(), VmmError> {
    let fail = |source| VmmError::Vcpu { cpu: id, source };
    let state = snap
        .vcpus
        .get(id as usize)
        .ok_or_else(|| fail(VcpuError::NoSavedState))?;
    if state.cpuid.is_none() {
        let supported = supported.ok_or_else(|| fail(VcpuError::NoCpuid))?;
        cpu::set_cpuid(
            fd,
            id,
            snap.config.cpus as u8,
            supported,
            snap.nested,
            snap.config.cpu_template.as_ref(),
        )?;
    }
    state.restore(fd).map_err(|e| fail(VcpuError::Restore(e)))
}

/// Loads KVM's devices and clock, the legacy devices and the virtio devices.
fn restore_devices<A>(m: &Machine, snap: &VmSnapshot<A>) -> Result<(), RestoreError> {
    snap.kvm.restore(&m.vm).map_err(RestoreError::Kvm)?;
    if let Some(fw) = &m.firmware {
        fw.restore_flash(snap.firmware_flash.as_ref())
            .map_err(RestoreError::Firmware)?;
    }
    m.legacy
        .restore_state(&snap.legacy)
        .map_err(RestoreError::Legacy)?;
    m.virtio()
        .restore_all(&snap.virtio)
        .map_err(RestoreError::Devices)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SerialTarget;
    use crate::device_config::{DiskConfig, Transport};
    use crate::snapshot::{NoApi, SnapshotFailure, SnapshotKind, SnapshotRequest};

    fn demo() -> VmConfig {
        VmConfig {
            boot: Payload::Demo,
            memory: 32 << 20,
            serial: SerialTarget::Null,
            ..Default::default()
        }
    }

    #[test]
    fn the_demo_guest_alone_gets_the_lapics_alone() {
        assert_eq!(irqchip_for(&demo()), Irqchip::LapicOnly);
        // A device may interrupt: the PC's controllers.
        let mut with_disk = demo();
        with_disk.devices.disks.push(DiskConfig {
            path: "/dev/null".into(),
            format: None,
            read_only: true,
            serial: None,
            transport: Transport::Mmio,
            rate_limiter: None,
        });
        assert_eq!(irqchip_for(&with_disk), Irqchip::Pc);
        let linux = VmConfig {
            boot: Payload::Linux {
                kernel: "/k".into(),
                initrd: None,
                system_map: None,
            },
            ..demo()
        };
        assert_eq!(irqchip_for(&linux), Irqchip::Pc);
    }

    #[test]
    fn the_demo_vm_runs_and_refuses_snapshots() {
        if kvm_ioctls::Kvm::new().is_err() {
            eprintln!("skipping: no /dev/kvm");
            return;
        }
        // It runs to its power-off.
        let out = crate::run(&demo()).unwrap();
        assert_eq!(out.reason, crate::ExitReason::PowerOff);
        // Paused before its first instruction, a snapshot is refused in words.
        let vm = Vm::build(&demo()).unwrap();
        assert_eq!(vm.machine.irqchip, Irqchip::LapicOnly);
        let running = vm.paused().start().unwrap();
        let dir = std::env::temp_dir();
        let req = SnapshotRequest::<NoApi> {
            state: dir.join("vessel-demo-never.state"),
            memory: dir.join("vessel-demo-never.mem"),
            kind: SnapshotKind::Full,
            api: None,
        };
        let e = running.handle().snapshot(&req).unwrap_err();
        assert!(matches!(e, SnapshotFailure::NoPcIrqchip), "{e}");
        assert!(!req.state.exists());
        running.handle().stop();
        running.wait().unwrap();
    }
}
