//! What a VM is made of, as the CLI (and later the API) describes it.

use std::path::PathBuf;
use std::str::FromStr;

pub use crate::device_config::DeviceConfigs;

/// What the VM boots: its payload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Payload {
    /// The built-in demo guest: prints a greeting and powers off.
    Demo,
    /// A Linux kernel (bzImage or ELF vmlinux) with an optional initrd.
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        /// The kernel's `System.map`, used to symbolize profiles.
        system_map: Option<PathBuf>,
    },
    /// Firmware (SeaBIOS or OVMF), which boots from the disks.
    Firmware(crate::firmware::Firmware),
}

/// Where the guest's COM1 goes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SerialTarget {
    /// The terminal (raw mode when stdin is a tty); stdin feeds the guest.
    Stdio,
    /// Nowhere.
    Null,
    /// Appended to a file.
    File(PathBuf),
}

/// Not a serial target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a serial target: use stdio, null or file=PATH")]
pub struct BadSerialTarget(pub String);

impl FromStr for SerialTarget {
    type Err = BadSerialTarget;
    fn from_str(s: &str) -> Result<Self, BadSerialTarget> {
        match s {
            "stdio" => Ok(SerialTarget::Stdio),
            "null" => Ok(SerialTarget::Null),
            _ => match s.strip_prefix("file=") {
                Some(p) if !p.is_empty() => Ok(SerialTarget::File(PathBuf::from(p))),
                _ => Err(BadSerialTarget(s.to_string())),
            },
        }
    }
}

/// Whether to apply the nested-host fallback (kernel parameters and user-space completion of
/// what the host cannot run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum NestedMode {
    /// Probe the host at start.
    #[default]
    Auto,
    On,
    Off,
}

/// Not a nested mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a nested mode: use auto, on or off")]
pub struct BadNestedMode(pub String);

impl FromStr for NestedMode {
    type Err = BadNestedMode;
    fn from_str(s: &str) -> Result<Self, BadNestedMode> {
        match s {
            "auto" => Ok(NestedMode::Auto),
            "on" => Ok(NestedMode::On),
            "off" => Ok(NestedMode::Off),
            _ => Err(BadNestedMode(s.to_string())),
        }
    }
}

/// A whole VM.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    pub boot: Payload,
    /// The full kernel command line; `None` for Vessel's default.
    pub cmdline: Option<String>,
    /// Words appended to the command line (default or given).
    pub append: Vec<String>,
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub serial: SerialTarget,
    /// Bytes per second of serial output to a file (Firecracker's `PUT /serial`
    /// `rate_limiter`); the excess is dropped.
    #[serde(default)]
    pub serial_limit: Option<vessel_ratelimit::BucketConfig>,
    pub nested: NestedMode,
    /// Sample guest RIP this often (ms) and print a symbolized profile at exit.
    pub profile_ms: Option<u64>,
    /// Virtio devices.
    pub devices: DeviceConfigs,
    /// Log the pages the guest dirties (KVM's dirty log), for diff snapshots and live
    /// migration. Costs a write fault per page between two reads of the log.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Back guest memory with a `memfd` mapped shared (`--memory SIZE,shared=on`), which
    /// another process may map; a vhost-user device turns it on by itself.
    #[serde(default)]
    pub shared_memory: bool,
    /// Firecracker's boot timer device (`--boot-timer`): the guest writing 123 at
    /// [`vessel_devices::boot_timer::BOOT_TIMER_ADDR`] logs the time since the VM was built.
    #[serde(default)]
    pub boot_timer: bool,
    /// A custom CPU template (`PUT /cpu-config`) applied on top of Vessel's CPUID and MSRs.
    #[serde(default)]
    pub cpu_template: Option<vessel_kvm::template::CpuTemplate>,
}

impl VmConfig {
    /// How guest memory is backed: shared when asked or when a device needs it.
    pub fn memory_backing(&self) -> vessel_memory::Backing {
        if self.shared_memory || self.devices.need_shared_memory() {
            vessel_memory::Backing::Shared
        } else {
            vessel_memory::Backing::Private
        }
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            boot: Payload::Demo,
            cmdline: None,
            append: Vec::new(),
            cpus: 1,
            memory: 256 << 20,
            serial: SerialTarget::Stdio,
            serial_limit: None,
            nested: NestedMode::Auto,
            profile_ms: None,
            devices: DeviceConfigs::default(),
            track_dirty_pages: false,
            shared_memory: false,
            boot_timer: false,
            cpu_template: None,
        }
    }
}

/// The command line Vessel gives a Linux guest when none is given. Vessel hands every 64-bit
/// boot an RNG seed (`SETUP_RNG_SEED`); `random.trust_bootloader` lets kernels built without
/// `RANDOM_TRUST_BOOTLOADER` (tinyconfig-based ones) credit it.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 i8042.noaux 8250.nr_uarts=1 random.trust_bootloader=on";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_targets_parse() {
        assert_eq!(
            "stdio".parse::<SerialTarget>().unwrap(),
            SerialTarget::Stdio
        );
        assert_eq!("null".parse::<SerialTarget>().unwrap(), SerialTarget::Null);
        assert_eq!(
            "file=/tmp/x".parse::<SerialTarget>().unwrap(),
            SerialTarget::File("/tmp/x".into())
        );
        assert!("file=".parse::<SerialTarget>().is_err());
        assert!("tty".parse::<SerialTarget>().is_err());
    }

    #[test]
    fn nested_modes_parse() {
        assert_eq!("auto".parse::<NestedMode>().unwrap(), NestedMode::Auto);
        assert_eq!("off".parse::<NestedMode>().unwrap(), NestedMode::Off);
        assert!("maybe".parse::<NestedMode>().is_err());
    }
}
