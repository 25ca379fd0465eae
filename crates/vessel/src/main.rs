//! `vessel`: the command line. Parses what the user asked for into a `VmConfig` (or an image
//! build), runs it, and turns the outcome into one line and an exit status.
//!
//! Without a subcommand, any of Firecracker's process flags (`--api-sock`, `--config-file`,
//! `--no-api`, `--log-path`, ...) selects Firecracker-compatible mode ([`firecracker`]); a
//! bare `vessel` prints help. `vessel api` talks to a running VM's socket ([`apicli`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use vessel_firecracker::cli::{
    invoked_as_firecracker, parse_level, usage_error, version_text, FirecrackerCli, SeccompArgs,
};
use vessel_firecracker::memfile::MemFile;
use vessel_firecracker::{firecracker, logger, seed};
use vessel_image::ImageName;
use vessel_vmm::device_config::{
    check_pmem, parse_rng, split_options, BalloonConfig, DeviceConfigs, DeviceOption, DiskConfig,
    NetConfig, PmemConfig, Transport, VsockConfig,
};
use vessel_vmm::firmware::{Firmware, FirmwareKernel};
use vessel_vmm::{ErrorChain, ExitReason, NestedMode, Payload, SerialTarget, VmConfig};

mod apicli;
mod migratecli;
mod snapshotcli;

#[derive(Parser)]
#[command(
    name = "vessel",
    disable_version_flag = true,
    about = "Vessel: a KVM hypervisor that boots unmodified Linux",
    long_about = "Vessel: a KVM hypervisor that boots unmodified Linux.\n\nWith no subcommand, any of Firecracker's process flags (--api-sock, --config-file, --no-api, --id, --log-path, ...) makes Vessel serve Firecracker's API as Firecracker does; a bare `vessel` prints this help.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Print the version: the Firecracker API version served, then Vessel's own.
    #[arg(short = 'V', long)]
    version: bool,
    /// Log level for Vessel's own messages (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "warn", value_parser = parse_level)]
    log_level: log::LevelFilter,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    firecracker: firecracker::FirecrackerArgs,
    #[command(flatten)]
    seccomp: SeccompArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM. With no kernel or image, boots the built-in demo guest.
    Run(Box<RunArgs>),
    /// The guest kit: images Vessel builds from Debian packages.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Talk to a running VM's API socket: status, pause, resume, ctrl-alt-del, metrics, ...
    Api(apicli::ApiArgs),
    /// Live migration: receive a VM, or have a running VMM send its VM.
    Migrate {
        #[command(subcommand)]
        command: migratecli::MigrateCommand,
    },
    /// Snapshot files: restore a VM from one, rebase a diff, inspect a state file.
    Snapshot {
        #[command(subcommand)]
        command: snapshotcli::SnapshotCommand,
    },
    /// Run Vessel in a jail (own root, namespaces, cgroup limits, unprivileged uid/gid), with
    /// Firecracker's jailer flags: vessel jail --id ID --uid U --gid G [...] -- run ...
    Jail(Box<vessel_jailer::JailArgs>),
    /// The process that starts passt (again) for `--net user`; Vessel starts it itself.
    #[command(name = "passt-keeper", hide = true)]
    PasstKeeper {
        /// The control socket inherited from Vessel.
        #[arg(long)]
        control_fd: i32,
        /// passt `-t` forwards (HOSTPORT:GUESTPORT).
        #[arg(long = "tcp")]
        tcp: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build (or find cached) image NAME (debian or minimal); prints kernel=PATH and initrd=PATH.
    Build { name: ImageName },
    /// Print the kernel parameters this host needs in a Linux guest's command line (on a
    /// nested host whose KVM emulates guest kernel mode; nothing elsewhere). Vessel adds them
    /// when it boots a kernel; an image booted through firmware needs them in its bootloader.
    KernelParams,
}

#[derive(Args)]
struct RunArgs {
    /// Linux kernel: bzImage or ELF vmlinux.
    #[arg(long, conflicts_with = "image")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Boot through firmware from the disks: bios (Debian's SeaBIOS), uefi (Debian's OVMF)
    /// or the path of a firmware image. Without a kernel, a disk with no Linux Vessel can boot
    /// directly boots through SeaBIOS.
    /// With --kernel, the firmware boots that kernel (handed over through fw_cfg, as QEMU's
    /// -kernel) instead of the disks.
    #[arg(long, value_name = "bios|uefi|PATH", conflicts_with = "image")]
    firmware: Option<String>,
    /// UEFI: this VM's variable store (boot entries and settings), made from OVMF's template
    /// when missing and kept. Default: one per boot disk in
    /// ~/.local/state/vessel/uefi-vars ($XDG_STATE_HOME/vessel/uefi-vars).
    #[arg(long, value_name = "PATH", requires = "firmware")]
    firmware_vars: Option<PathBuf>,
    /// Boot a guest-kit image (built first if needed): debian or minimal.
    #[arg(long)]
    image: Option<ImageName>,
    /// The whole kernel command line (default: a serial console and Vessel's defaults).
    #[arg(long)]
    cmdline: Option<String>,
    /// Words to append to the command line (repeatable).
    #[arg(long)]
    append: Vec<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest memory: MiB, or with a unit (512M, 2G) [default: 256M for Linux, 32M for the demo];
    /// SIZE,shared=on backs it with a memfd other processes can map (a vhost-user device,
    /// --fs, turns that on by itself).
    #[arg(long, value_name = "SIZE[,shared=on]", value_parser = parse_memory)]
    memory: Option<MemoryOption>,
    /// Where COM1 goes: stdio, null or file=PATH.
    #[arg(long, default_value = "stdio")]
    serial: SerialTarget,
    /// Nested-host fallback: auto (probe the host), on or off.
    #[arg(long, default_value = "auto")]
    nested: NestedMode,
    /// Firecracker's boot timer: the guest writing 123 at 0xc000_0000 logs its boot time
    /// (at info level: --log-level info).
    #[arg(long)]
    boot_timer: bool,
    /// Print exit and timing statistics when the VM ends.
    #[arg(long)]
    stats: bool,
    /// Sample the guest's RIP every MS milliseconds and print a profile at exit.
    #[arg(long, value_name = "MS", num_args = 0..=1, default_missing_value = "10")]
    profile: Option<u64>,
    /// The kernel's System.map, to name functions in the profile.
    #[arg(long)]
    system_map: Option<PathBuf>,
    /// A virtio-blk disk (repeatable): path=FILE[,readonly=on][,serial=ID][,transport=pci|mmio]
    /// [,bw=BYTES_PER_S][,iops=N] (rate limits, each with a one-second bucket).
    /// Or vhost_user=PATH[,transport=...]: a disk an external vhost-user backend serves.
    #[arg(long, value_name = "OPTIONS")]
    disk: Vec<DeviceOption<DiskConfig>>,
    /// A cloud-init NoCloud seed disk (`cidata`), added after the disks:
    /// [user-data=FILE][,meta-data=FILE][,network-config=FILE]. With no files: a fresh
    /// console password for the image's default user (printed) and your SSH public keys.
    #[arg(long, value_name = "OPTIONS", num_args = 0..=1, default_missing_value = "", value_parser = seed::parse)]
    cloud_init: Option<seed::SeedOptions>,
    /// A virtio-net device on a TAP (repeatable): tap=NAME[,mac=MAC][,queues=N][,transport=...]
    /// [,rx_bw=BYTES_PER_S][,rx_ops=N][,tx_bw=BYTES_PER_S][,tx_ops=N] (rate limits). Or
    /// user-mode networking through passt, no root needed: user[,hostfwd=tcp:HOSTPORT:GUESTPORT]...
    /// starts passt; passt,socket=PATH uses a running `passt --socket PATH` (same options but
    /// queues).
    /// Or vhost_user=PATH[,transport=...]: a NIC an external vhost-user backend serves.
    #[arg(long, value_name = "OPTIONS")]
    net: Vec<DeviceOption<NetConfig>>,
    /// A virtio-vsock device: cid=N,uds=PATH[,transport=...]. The host connects to PATH and
    /// writes "CONNECT <port>"; guest connections to port P reach PATH_P.
    #[arg(long, value_name = "OPTIONS")]
    vsock: Option<VsockConfig>,
    /// A virtio-rng device fed by the host's getrandom: [transport=pci|mmio].
    #[arg(long, value_name = "OPTIONS", num_args = 0..=1, default_missing_value = "", value_parser = parse_rng)]
    rng: Option<Transport>,
    /// A virtio-balloon device: [size=MIB][,stats=on][,deflate_on_oom=on][,transport=...].
    #[arg(long, value_name = "OPTIONS", num_args = 0..=1, default_missing_value = "")]
    balloon: Option<BalloonConfig>,
    /// A virtio-pmem device (repeatable; /dev/pmem0 first): the file mapped into the guest as
    /// persistent memory (mount it with -o dax): path=FILE[,readonly=on][,root=on]
    /// [,transport=...][,bw=BYTES_PER_S][,iops=N] (flush rate limits). root=on adds
    /// root=/dev/pmemN rw (ro with readonly=on) to the command line.
    #[arg(long, value_name = "OPTIONS")]
    pmem: Vec<PmemConfig>,
    /// Hotpluggable memory (a virtio-mem device, unplugged at boot):
    /// size=MIB[,block=MIB][,slot=MIB][,transport=...] (defaults: 2 MiB blocks, 128 MiB slots).
    /// Placed above RAM, out of the e820 map; the guest plugs what the host requests
    /// (`PATCH /hotplug/memory` on the API).
    #[arg(long, value_name = "OPTIONS")]
    memory_hotplug: Option<vessel_vmm::hotplug::MemoryHotplugConfig>,
    /// A virtio-fs device (repeatable) the guest mounts with `mount -t virtiofs TAG DIR`:
    /// tag=TAG,dir=PATH[,readonly=on] starts virtiofsd sharing PATH; tag=TAG,socket=PATH uses
    /// a running vhost-user backend (`virtiofsd --socket-path PATH`). [,queues=N][,transport=...]
    #[arg(long, value_name = "OPTIONS")]
    fs: Vec<vessel_vmm::device_config::FsConfig>,
}

/// `--memory SIZE[,shared=on]`.
#[derive(Debug, Clone, Copy)]
struct MemoryOption {
    size: u64,
    shared: bool,
}

fn parse_memory(s: &str) -> Result<MemoryOption, String> {
    let (size, rest) = s.split_once(',').unwrap_or((s, ""));
    let size = vessel_memory::parse_size(size).map_err(|e| e.to_string())?;
    let shared = match rest {
        "" | "shared=off" => false,
        "shared=on" => true,
        other => return Err(format!("'{other}': the only option is shared=on")),
    };
    Ok(MemoryOption { size, shared })
}

/// Default guest memory. The demo guest needs almost none, and KVM's cost of registering
/// memory grows with its size, so it starts faster with less.
const LINUX_MEMORY: u64 = 256 << 20;
const DEMO_MEMORY: u64 = 32 << 20;

fn build_image(name: ImageName) -> Result<vessel_image::ImagePaths, String> {
    vessel_image::build(name, &mut |line| eprintln!("vessel: {line}"))
        .map_err(|e| ErrorChain(&e).to_string())
}

/// With no kernel: the Linux the first disk that has one boots, found on the host in its
/// bootloader configuration (see `vessel_diskboot`), held in memory files.
fn linux_from_disks(
    disks: &[vessel_vmm::device_config::DiskConfig],
) -> Result<(vessel_diskboot::BootImage, MemFile, Option<MemFile>), String> {
    let t = std::time::Instant::now();
    let mut first_error = None;
    for d in disks {
        match vessel_diskboot::find_linux(&d.path) {
            Ok(found) => {
                eprintln!(
                    "vessel: booting '{}' from {} ({}) directly, found in {:.1} ms",
                    found.title,
                    d.path.display(),
                    found.found_in,
                    t.elapsed().as_secs_f64() * 1e3
                );
                let kernel = MemFile::new(c"vessel-kernel", &found.kernel)?;
                let initrd = match &found.initrd {
                    Some(data) => Some(MemFile::new(c"vessel-initrd", data)?),
                    None => None,
                };
                return Ok((found, kernel, initrd));
            }
            Err(e) => {
                first_error.get_or_insert(ErrorChain(&e).to_string());
            }
        }
    }
    Err(first_error.unwrap_or_else(|| "no disk to boot".into()))
}

/// A UEFI firmware with its variable store: `given`, or the boot disk's default one; a
/// firmware with no separate store (a BIOS, a unified OVMF image) keeps none.
fn uefi_vars(
    fw: Firmware,
    given: Option<PathBuf>,
    disk: Option<&DiskConfig>,
) -> Result<Firmware, String> {
    let chain = |e: vessel_vmm::firmware::FirmwareError| ErrorChain(&e).to_string();
    if let Some(path) = given {
        return fw.with_vars_store(path).map_err(chain);
    }
    if fw.vars.is_none() {
        return Ok(fw);
    }
    match disk.and_then(|d| vessel_vmm::firmware::default_vars_store(&d.path)) {
        Some(store) => {
            eprintln!("vessel: UEFI variables in {}", store.display());
            fw.with_vars_store(store).map_err(chain)
        }
        None => {
            eprintln!("vessel: no disk: the UEFI variables last until the VM stops");
            Ok(fw)
        }
    }
}

fn run(mut args: RunArgs) -> Result<ExitCode, String> {
    check_pmem(&args.pmem).map_err(|e| e.to_string())?;
    let (arg_disks, mut vhost_user) = split_options(args.disk);
    let (nets, vhost_user_nets) = split_options(args.net);
    vhost_user.extend(vhost_user_nets);
    // Kept open while the VM is built: the loader reads them by their /proc paths.
    let mut from_disk = None;
    let mut firmware = args
        .firmware
        .as_deref()
        .map(Firmware::resolve)
        .transpose()
        .map_err(|e| ErrorChain(&e).to_string())?;
    if let Some(fw) = firmware.take() {
        firmware = Some(uefi_vars(fw, args.firmware_vars, arg_disks.first())?);
    }
    if args.kernel.is_none() && args.image.is_none() && firmware.is_none() && !arg_disks.is_empty()
    {
        match linux_from_disks(&arg_disks) {
            Ok(found) => from_disk = Some(found),
            Err(why) => {
                eprintln!("vessel: {why}");
                let bios = Firmware::resolve("bios").map_err(|e| ErrorChain(&e).to_string())?;
                eprintln!("vessel: falling back to firmware: {}", bios.code.display());
                firmware = Some(bios);
            }
        }
    }
    // Kept open while the VM runs: the disk is its /proc path.
    let mut seed_file = None;
    let mut disks = arg_disks;
    if let Some(o) = &args.cloud_init {
        let image = seed::build(o, &mut |line| eprintln!("vessel: {line}"))?;
        let (file, disk) = seed::seed_disk(&image, vessel_vmm::device_config::Transport::Pci)?;
        disks.push(disk);
        seed_file = Some(file);
    }
    let cmdline = args.cmdline.or_else(|| {
        from_disk
            .as_ref()
            .map(|(found, _, _)| found.cmdline.clone())
    });
    // A kernel for the firmware to boot: its command line is composed as for a direct boot.
    let mut kernel = args.kernel;
    if let Some(fw) = firmware.as_mut() {
        fw.kernel = kernel.take().map(|k| FirmwareKernel {
            kernel: k,
            initrd: args.initrd.take(),
            cmdline: String::new(),
        });
    }
    let boot = match (kernel, args.image) {
        (Some(kernel), _) => Payload::Linux {
            kernel,
            initrd: args.initrd,
            system_map: args.system_map,
        },
        (None, Some(name)) => {
            let p = build_image(name)?;
            Payload::Linux {
                kernel: p.kernel,
                initrd: Some(p.initrd),
                system_map: args.system_map.or(p.system_map),
            }
        }
        (None, None) => match (&from_disk, firmware) {
            (Some((_, kernel, initrd)), _) => Payload::Linux {
                kernel: kernel.path(),
                initrd: initrd.as_ref().map(MemFile::path),
                system_map: args.system_map,
            },
            (None, Some(fw)) => Payload::Firmware(fw),
            (None, None) => Payload::Demo,
        },
    };
    let mut config = VmConfig {
        boot: boot.clone(),
        cmdline,
        append: args.append,
        cpus: args.cpus,
        memory: args.memory.map(|m| m.size).unwrap_or(match boot {
            Payload::Demo => DEMO_MEMORY,
            Payload::Linux { .. } | Payload::Firmware(_) => LINUX_MEMORY,
        }),
        serial: args.serial,
        serial_limit: None,
        nested: args.nested,
        profile_ms: args.profile,
        devices: DeviceConfigs {
            disks,
            nets,
            vsock: args.vsock,
            rng: args.rng,
            rng_rate_limiter: None,
            balloon: args.balloon,
            pmem: args.pmem,
            memory_hotplug: args.memory_hotplug,
            fs: args.fs,
            vhost_user,
            // No API here to plug devices in with.
            pci_bus: false,
        },
        track_dirty_pages: false,
        shared_memory: args.memory.is_some_and(|m| m.shared),
        boot_timer: args.boot_timer,
        cpu_template: None,
    };
    if let Payload::Firmware(Firmware {
        kernel: Some(_), ..
    }) = &config.boot
    {
        // The nested-host parameters, as a direct boot adds them.
        let params = match config.nested {
            vessel_vmm::NestedMode::Off => None,
            _ => {
                vessel_vmm::payload::host_kernel_params().map_err(|e| ErrorChain(&e).to_string())?
            }
        };
        let line = vessel_vmm::payload::compose_cmdline(&config, params.as_deref());
        if let Payload::Firmware(Firmware {
            kernel: Some(k), ..
        }) = &mut config.boot
        {
            k.cmdline = line;
        }
    }
    let outcome = vessel_vmm::run(&config).map_err(|e| ErrorChain(&e).to_string())?;
    drop(seed_file);
    if args.stats || args.profile.is_some() {
        eprint!("{}", outcome.stats.summary());
        match outcome.reason {
            ExitReason::PowerOff => eprintln!("vessel: the guest powered off"),
            ExitReason::Reset => eprintln!("vessel: the guest reset"),
            _ => {}
        }
    }
    Ok(match outcome.reason {
        ExitReason::PowerOff | ExitReason::Reset | ExitReason::Stopped | ExitReason::Migrated => {
            ExitCode::SUCCESS
        }
        ExitReason::UserQuit => {
            eprintln!("vessel: stopped from the console (Ctrl-A x)");
            ExitCode::from(130)
        }
        ExitReason::Signal => {
            eprintln!("vessel: stopped by a signal");
            ExitCode::from(143)
        }
    })
}

/// Whether the command line names a flag other than Vessel's own `--log-level` (all the
/// others at the top level are Firecracker's), so that any Firecracker flag on its own starts
/// Firecracker mode. A bare `vessel` prints help instead of serving the default socket.
fn names_a_firecracker_flag(m: &clap::ArgMatches) -> bool {
    m.ids().any(|id| {
        id.as_str() != "log_level"
            && m.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
    })
}

/// The subcommands' names (and clap's `help`): an argument that is one of them sends the
/// command line to the whole parser.
const SUBCOMMANDS: [&str; 8] = [
    "run",
    "image",
    "api",
    "migrate",
    "snapshot",
    "jail",
    "passt-keeper",
    "help",
];

/// Parses `args` (the program name first): with [`FirecrackerCli`] when no argument names a
/// subcommand and it takes them, else with the whole [`Cli`].
fn parse(args: Vec<std::ffi::OsString>) -> Result<(Cli, clap::ArgMatches), clap::Error> {
    use clap::FromArgMatches;
    let names_a_subcommand = args
        .iter()
        .skip(1)
        .any(|a| SUBCOMMANDS.iter().any(|s| a == *s));
    if !names_a_subcommand {
        // Anything the short parser does not take (`--help`, a mistake) goes to the whole
        // one, whose answer the user sees.
        let fast = FirecrackerCli::command()
            .name("vessel")
            .disable_help_flag(true)
            .try_get_matches_from(&args)
            .and_then(|m| FirecrackerCli::from_arg_matches(&m).map(|c| (c, m)));
        if let Ok((f, m)) = fast {
            let cli = Cli {
                version: f.version,
                log_level: f.log_level,
                command: None,
                firecracker: f.firecracker,
                seccomp: f.seccomp,
            };
            return Ok((cli, m));
        }
    }
    let m = Cli::command().try_get_matches_from(&args)?;
    Ok((Cli::from_arg_matches(&m)?, m))
}

fn main() -> ExitCode {
    let started_us = firecracker::clock_us(libc::CLOCK_MONOTONIC);
    let parsed = parse(std::env::args_os().collect());
    let (cli, matches) = match parsed {
        Ok(c) => c,
        Err(e) => return usage_error(e, "vessel"),
    };
    let as_firecracker = invoked_as_firecracker();
    if cli.version {
        print!("{}", version_text(as_firecracker));
        return ExitCode::SUCCESS;
    }
    logger::init(cli.log_level);
    if cli.command.is_none() {
        if let Some(code) = firecracker::print_and_exit(&cli.firecracker) {
            return finish(code);
        }
    }
    let seccomp = cli.seccomp.configure();
    let command = match cli.command {
        Some(c) => c,
        // As `firecracker`, no flag at all serves /run/firecracker.socket, as Firecracker.
        // A filter file that does not load is reported in its log, as Firecracker's.
        None if as_firecracker || names_a_firecracker_flag(&matches) => {
            return firecracker::main(cli.firecracker, started_us, seccomp.err());
        }
        None => {
            // No subcommand and no Firecracker flag: help, as for any incomplete command.
            let _ = Cli::command().print_help();
            return ExitCode::SUCCESS;
        }
    };
    if let Err(e) = seccomp {
        eprintln!("vessel: {e}");
        return ExitCode::from(2);
    }
    let result: Result<ExitCode, Box<dyn std::error::Error>> = match command {
        Command::Run(args) => run(*args).map_err(Into::into),
        Command::Api(args) => apicli::run(args).map_err(Into::into),
        Command::Snapshot { command } => snapshotcli::run(command).map_err(Into::into),
        Command::Migrate { command } => migratecli::run(command).map_err(Into::into),
        Command::PasstKeeper { control_fd, tcp } => {
            let code = vessel_virtio_devices::net::passt::keeper::keeper_main(
                control_fd,
                std::path::Path::new("passt"),
                &tcp,
            );
            return ExitCode::from(u8::try_from(code).unwrap_or(1));
        }
        Command::Jail(mut args) => {
            // The jailed VMM is this vessel binary unless --exec-file names another.
            if args.exec_file.is_none() {
                args.exec_file = std::env::current_exe().ok();
            }
            return vessel_jailer::main_with(&args);
        }
        Command::Image {
            command: ImageCommand::KernelParams,
        } => vessel_vmm::payload::host_kernel_params()
            .map_err(Into::into)
            .map(|p| {
                println!("{}", p.unwrap_or_default());
                ExitCode::SUCCESS
            }),
        Command::Image {
            command: ImageCommand::Build { name },
        } => build_image(name).map_err(Into::into).map(|p| {
            println!("kernel={}", p.kernel.display());
            println!("initrd={}", p.initrd.display());
            if let Some(m) = p.system_map {
                println!("system_map={}", m.display());
            }
            if let Some(b) = p.bzimage {
                println!("bzimage={}", b.display());
            }
            ExitCode::SUCCESS
        }),
    };
    finish(result)
}

fn finish<E: Into<Box<dyn std::error::Error>>>(result: Result<ExitCode, E>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vessel: {}", ErrorChain(&*e.into()));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<std::ffi::OsString> {
        std::iter::once("vessel")
            .chain(a.iter().copied())
            .map(Into::into)
            .collect()
    }

    #[test]
    fn the_subcommand_list_is_the_parser_s() {
        let mut names: Vec<String> = Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .collect();
        names.push("help".into());
        names.sort();
        let mut listed: Vec<String> = SUBCOMMANDS.iter().map(|s| s.to_string()).collect();
        listed.sort();
        assert_eq!(names, listed);
    }

    /// Firecracker's flags parse to the same thing through the short parser and the whole
    /// one; what the short one does not take reaches the whole one.
    #[test]
    fn firecracker_flags_parse_alike_either_way() {
        use clap::FromArgMatches;
        let a = [
            "--api-sock",
            "/tmp/x.sock",
            "--id",
            "vm-1",
            "--level",
            "Debug",
            "--no-seccomp",
            "--log-level",
            "info",
        ];
        let (fast, m) = parse(argv(&a)).unwrap();
        assert!(m.get_one::<String>("id").is_some());
        let whole =
            Cli::from_arg_matches(&Cli::command().try_get_matches_from(argv(&a)).unwrap()).unwrap();
        assert_eq!(
            format!("{:?}", fast.firecracker),
            format!("{:?}", whole.firecracker)
        );
        assert_eq!(
            format!("{:?}", fast.seccomp),
            format!("{:?}", whole.seccomp)
        );
        assert_eq!(fast.log_level, log::LevelFilter::Info);
        assert!(fast.command.is_none() && names_a_firecracker_flag(&m));
        // A subcommand, --help and a mistake go to the whole parser.
        let (run, _) = parse(argv(&["run", "--cpus", "2"])).unwrap();
        assert!(matches!(run.command, Some(Command::Run(_))));
        let help = parse(argv(&["--help"])).err().unwrap();
        assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
        assert!(help.to_string().contains("Commands:"), "{help}");
        let wrong = parse(argv(&["--api-sok", "x"])).err().unwrap();
        assert!(wrong.to_string().contains("--api-sok"), "{wrong}");
        // No flag: help from the whole parser's caller.
        let (bare, m) = parse(argv(&[])).unwrap();
        assert!(bare.command.is_none() && !names_a_firecracker_flag(&m));
    }

    #[test]
    fn errors_print_with_their_sources_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = firecracker::FirecrackerError::LogFile {
            path: "/l".into(),
            source: io(),
        };
        assert_eq!(
            ErrorChain(&e).to_string(),
            "cannot open the log file /l: gone"
        );
        let e = firecracker::FirecrackerError::Thread(io());
        assert_eq!(ErrorChain(&e).to_string(), "cannot start a thread: gone");
        let s: Box<dyn std::error::Error> = "plain".into();
        assert_eq!(ErrorChain(&*s).to_string(), "plain");
        // A source the message already repeats is printed once.
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Repeats(#[source] std::io::Error);
        assert_eq!(ErrorChain(&Repeats(io())).to_string(), "outer: gone");
    }
}
