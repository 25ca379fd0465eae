//! The virtio devices a VM is given, as the CLI (and later the API) describes them, and the
//! parsing of the CLI's `key=value,key=value` device options.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

pub use vessel_ratelimit::{BucketConfig, RateLimiterConfig};
pub use vessel_virtio_devices::block::DiskFormat;

/// How a virtio device is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Transport {
    /// virtio-pci: what stock distribution kernels find on their own (the default).
    #[default]
    Pci,
    /// virtio-mmio, described in the ACPI DSDT (and on the command line).
    Mmio,
}

/// A device option the CLI cannot use: one line naming the option and what to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceOptionError {
    #[error("'{0}' is not a transport: use pci or mmio")]
    Transport(String),
    #[error("{what}: '{part}' is not key=value")]
    NotKeyValue { what: &'static str, part: String },
    #[error("{what}: '{key}' given twice")]
    Twice { what: &'static str, key: String },
    #[error("{what}: {key}=... is required")]
    Required { what: &'static str, key: String },
    #[error("{what}: {key}={value}: use on or off")]
    Flag {
        what: &'static str,
        key: String,
        value: String,
    },
    #[error("{what}: '{value}' is not a transport: use pci or mmio")]
    TransportOf { what: &'static str, value: String },
    #[error("{what}: unknown option '{key}'")]
    Unknown { what: &'static str, key: String },
    #[error("{what}: {key}={value} is not a valid number")]
    Number {
        what: &'static str,
        key: String,
        value: String,
    },
    #[error("'{0}' is not a MAC address (aa:bb:cc:dd:ee:ff)")]
    Mac(String),
    #[error("{0} is a multicast address")]
    MulticastMac(String),
    #[error("--disk: format={0}: use raw or qcow2")]
    Format(String),
    #[error("--disk: serial is at most 20 bytes")]
    SerialTooLong,
    #[error("--net: TAP name '{0}' is longer than 15 bytes")]
    TapName(String),
    #[error("--net: queues must be at least 1")]
    NoQueues,
    #[error("--net: hostfwd={0}: use hostfwd=tcp:HOSTPORT:GUESTPORT")]
    HostFwd(String),
    #[error("--vsock: cid {0} is reserved (use 3..=4294967295)")]
    ReservedCid(u64),
    #[error("--pmem: only one device may be the root device")]
    SecondPmemRoot,
    #[error("--fs: give socket=PATH (a running vhost-user backend) or dir=PATH (Vessel starts virtiofsd), not both")]
    FsBackend,
    #[error("--fs: readonly=on needs dir=PATH (a backend on socket= decides for itself)")]
    FsReadOnlySocket,
    #[error("--memory-hotplug: {0}")]
    MemoryHotplug(crate::hotplug::HotplugConfigError),
}

impl FromStr for Transport {
    type Err = DeviceOptionError;
    fn from_str(s: &str) -> Result<Self, DeviceOptionError> {
        match s {
            "pci" => Ok(Transport::Pci),
            "mmio" => Ok(Transport::Mmio),
            _ => Err(DeviceOptionError::Transport(s.to_string())),
        }
    }
}

/// `--disk path=FILE[,format=raw|qcow2][,readonly=on][,serial=ID][,transport=pci|mmio]`
/// `[,bw=BYTES/S][,iops=N]`
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// The image's format; `None`: detected from its header when it is opened.
    #[serde(default)]
    pub format: Option<DiskFormat>,
    pub read_only: bool,
    pub serial: Option<String>,
    pub transport: Transport,
    /// Limits on the disk's requests (absent: none).
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `--net tap=NAME[,mac=MAC][,queues=N][,transport=pci|mmio]`
/// `[,rx_bw=BYTES/S][,rx_ops=N][,tx_bw=BYTES/S][,tx_ops=N]`, or user-mode networking through
/// passt: `--net user[,hostfwd=tcp:HOSTPORT:GUESTPORT]...` (Vessel starts passt) or
/// `--net passt,socket=PATH` (a passt already running), with the same options but `queues`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// The TAP's name (empty with passt).
    pub tap: String,
    /// User-mode networking through passt instead of a TAP.
    #[serde(default)]
    pub passt: Option<PasstConfig>,
    pub mac: Option<[u8; 6]>,
    pub queue_pairs: u16,
    pub transport: Transport,
    /// Limits on received and sent frames (absent: none).
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    /// The VM's MMDS, when the guest reaches it through this interface (API and
    /// `--config-file` only: `mmds-config`'s `network_interfaces`).
    #[serde(skip)]
    pub mmds: Option<vessel_mmds::Mmds>,
}

/// Where a user-mode interface finds passt.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PasstConfig {
    /// `user`: Vessel starts passt (and stops it with the VM), forwarding these host TCP
    /// ports to the guest.
    Spawn { tcp_forwards: Vec<PortForward> },
    /// `passt,socket=PATH`: connect to a passt started with `passt --socket PATH`.
    Socket(PathBuf),
}

/// A host TCP port forwarded to a guest port (`hostfwd=tcp:HOSTPORT:GUESTPORT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortForward {
    pub host: u16,
    pub guest: u16,
}

impl FromStr for PortForward {
    type Err = DeviceOptionError;
    fn from_str(s: &str) -> Result<Self, DeviceOptionError> {
        let bad = || DeviceOptionError::HostFwd(s.to_string());
        let rest = s.strip_prefix("tcp:").ok_or_else(bad)?;
        let (h, g) = rest.split_once(':').ok_or_else(bad)?;
        let host: u16 = h.parse().map_err(|_| bad())?;
        let guest: u16 = g.parse().map_err(|_| bad())?;
        if host == 0 || guest == 0 {
            return Err(bad());
        }
        Ok(PortForward { host, guest })
    }
}

/// `--vsock cid=N,uds=PATH[,transport=pci|mmio]`
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockConfig {
    pub cid: u64,
    pub uds: PathBuf,
    pub transport: Transport,
}

/// `--balloon [size=MIB][,stats=on][,deflate_on_oom=on][,reporting=off][,hinting=on]`
/// `[,transport=...]`
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonConfig {
    /// Initial balloon size in MiB.
    pub size_mib: u64,
    pub stats: bool,
    pub deflate_on_oom: bool,
    /// The driver reports free memory on its own, which the host drops (on unless
    /// `reporting=off`; Firecracker's `free_page_reporting`).
    #[serde(default = "reporting_default")]
    pub free_page_reporting: bool,
    /// The host can ask the driver for its free memory (`hinting=on`; Firecracker's
    /// `free_page_hinting`, run through `/balloon/hinting/...`).
    #[serde(default)]
    pub free_page_hinting: bool,
    pub transport: Transport,
}

/// Free page reporting is on unless turned off (and in configurations saved before it could
/// be turned off).
fn reporting_default() -> bool {
    true
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig {
            size_mib: 0,
            stats: false,
            deflate_on_oom: false,
            free_page_reporting: reporting_default(),
            free_page_hinting: false,
            transport: Transport::default(),
        }
    }
}

/// `--pmem path=FILE[,readonly=on][,root=on][,transport=pci|mmio][,bw=BYTES/S][,iops=N]`: a
/// virtio-pmem device, the file mapped into the guest as persistent memory (`/dev/pmemN`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PmemConfig {
    pub path: PathBuf,
    /// Map the file read-only (the guest's writes are dropped).
    pub read_only: bool,
    /// The guest's root file system: `root=/dev/pmemN` and `ro` or `rw` on the command line.
    pub root: bool,
    pub transport: Transport,
    /// Limits on the guest's flushes (each one operation and the file's size in bytes).
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// Where the region is in the guest, once placed (recorded in snapshots: a hot-plugged
    /// device may sit after the gap an unplugged one left, and a restore puts it back there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_addr: Option<u64>,
}

/// `--fs tag=NAME,socket=PATH|dir=PATH[,readonly=on][,queues=N][,transport=pci|mmio]`: a
/// virtio-fs device on a vhost-user backend the guest mounts with `mount -t virtiofs NAME`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FsConfig {
    pub tag: String,
    pub backend: FsBackend,
    /// Request queues (besides the high-priority one).
    pub request_queues: u16,
    pub transport: Transport,
}

/// Where a virtio-fs device's backend is: a running vhost-user backend's socket
/// (`virtiofsd --socket-path`), or a directory Vessel starts `virtiofsd` on.
pub use vessel_virtio_devices::vhost_user::fs::FsBackend;

/// `--disk vhost_user=PATH[,transport=...]` or `--net vhost_user=PATH[,transport=...]`: a
/// disk or NIC served by an external vhost-user backend listening at PATH.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VhostUserConfig {
    pub kind: VhostUserKind,
    pub socket: PathBuf,
    pub transport: Transport,
}

/// What a vhost-user backend serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VhostUserKind {
    Block,
    Net,
}

/// A `--disk` or `--net` value: a device Vessel runs, or a vhost-user backend's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceOption<T> {
    Own(T),
    VhostUser(VhostUserConfig),
}

impl<T: FromStr<Err = DeviceOptionError>> DeviceOption<T> {
    fn parse(s: &str, what: &'static str, kind: VhostUserKind) -> Result<Self, DeviceOptionError> {
        if !s.starts_with("vhost_user=") {
            return T::from_str(s).map(DeviceOption::Own);
        }
        let mut o = Options::parse(what, s)?;
        let socket = PathBuf::from(o.required("vhost_user")?);
        let transport = o.transport()?;
        o.finish()?;
        Ok(DeviceOption::VhostUser(VhostUserConfig {
            kind,
            socket,
            transport,
        }))
    }
}

impl FromStr for DeviceOption<DiskConfig> {
    type Err = DeviceOptionError;
    fn from_str(s: &str) -> Result<Self, DeviceOptionError> {
        DeviceOption::parse(s, "--disk", VhostUserKind::Block)
    }
}

impl FromStr for DeviceOption<NetConfig> {
    type Err = DeviceOptionError;
    fn from_str(s: &str) -> Result<Self, DeviceOptionError> {
        DeviceOption::parse(s, "--net", VhostUserKind::Net)
    }
}

/// Splits `--disk` or `--net` values into Vessel's own devices and vhost-user ones.
pub fn split_options<T>(options: Vec<DeviceOption<T>>) -> (Vec<T>, Vec<VhostUserConfig>) {
    let mut own = Vec::new();
    let mut vu = Vec::new();
    for o in options {
        match o {
            DeviceOption::Own(t) => own.push(t),
            DeviceOption::VhostUser(v) => vu.push(v),
        }
    }
    (own, vu)
}

/// Every virtio device of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct DeviceConfigs {
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub vsock: Option<VsockConfig>,
    /// virtio-rng, on this transport.
    pub rng: Option<Transport>,
    /// virtio-rng's rate limiter (bytes and requests handed to the guest).
    #[serde(default)]
    pub rng_rate_limiter: Option<RateLimiterConfig>,
    pub balloon: Option<BalloonConfig>,
    /// virtio-pmem devices, `/dev/pmem0` first.
    #[serde(default)]
    pub pmem: Vec<PmemConfig>,
    /// Hotpluggable memory (a virtio-mem device).
    #[serde(default)]
    pub memory_hotplug: Option<crate::hotplug::MemoryHotplugConfig>,
    /// virtio-fs devices (vhost-user): guest memory is then shared (`memfd`).
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// Disks and NICs served by vhost-user backends (after Vessel's own).
    #[serde(default)]
    pub vhost_user: Vec<VhostUserConfig>,
    /// A PCI bus even with no PCI device (Firecracker's `--enable-pci`), so that devices
    /// can be hot-plugged; set too once a VM has had one.
    #[serde(default)]
    pub pci_bus: bool,
}

impl DeviceConfigs {
    /// The kernel parameters of a root pmem device: `root=/dev/pmemN` and `ro` or `rw`, as
    /// Firecracker adds them.
    pub fn pmem_root_params(&self) -> Option<String> {
        let (i, p) = self.pmem.iter().enumerate().find(|(_, p)| p.root)?;
        let mode = if p.read_only { "ro" } else { "rw" };
        Some(format!("root=/dev/pmem{i} {mode}"))
    }

    pub fn is_empty(&self) -> bool {
        self.pmem.is_empty()
            && self.disks.is_empty()
            && self.nets.is_empty()
            && self.vsock.is_none()
            && self.rng.is_none()
            && self.balloon.is_none()
            && self.memory_hotplug.is_none()
            && self.fs.is_empty()
            && self.vhost_user.is_empty()
    }

    /// Whether a device needs guest memory that another process can map (vhost-user).
    pub fn need_shared_memory(&self) -> bool {
        !self.fs.is_empty() || !self.vhost_user.is_empty()
    }

    /// A vhost-user device's name for messages (the first one), if the VM has any.
    pub fn first_vhost_user(&self) -> Option<String> {
        let fs = self.fs.first().map(|f| format!("virtio-fs '{}'", f.tag));
        fs.or_else(|| {
            self.vhost_user
                .first()
                .map(|v| format!("vhost-user backend {}", v.socket.display()))
        })
    }
}

/// `key=value` pairs of one device option; every key must be consumed.
struct Options {
    what: &'static str,
    map: BTreeMap<String, String>,
}

impl Options {
    fn parse(what: &'static str, s: &str) -> Result<Self, DeviceOptionError> {
        let mut map = BTreeMap::new();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| DeviceOptionError::NotKeyValue {
                    what,
                    part: part.to_string(),
                })?;
            if map.insert(k.to_string(), v.to_string()).is_some() {
                return Err(DeviceOptionError::Twice {
                    what,
                    key: k.to_string(),
                });
            }
        }
        Ok(Options { what, map })
    }

    fn take(&mut self, key: &str) -> Option<String> {
        self.map.remove(key)
    }

    fn required(&mut self, key: &str) -> Result<String, DeviceOptionError> {
        match self.take(key) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(DeviceOptionError::Required {
                what: self.what,
                key: key.to_string(),
            }),
        }
    }

    fn flag(&mut self, key: &str) -> Result<bool, DeviceOptionError> {
        self.flag_or(key, false)
    }

    /// An on/off option that is `default` when absent.
    fn flag_or(&mut self, key: &str, default: bool) -> Result<bool, DeviceOptionError> {
        match self.take(key).as_deref() {
            None => Ok(default),
            Some("off") | Some("false") => Ok(false),
            Some("on") | Some("true") => Ok(true),
            Some(v) => Err(DeviceOptionError::Flag {
                what: self.what,
                key: key.to_string(),
                value: v.to_string(),
            }),
        }
    }

    fn transport(&mut self) -> Result<Transport, DeviceOptionError> {
        let what = self.what;
        self.take("transport")
            .map(|t| {
                t.parse()
                    .map_err(|_| DeviceOptionError::TransportOf { what, value: t })
            })
            .transpose()
            .map(Option::unwrap_or_default)
    }

    /// A rate limiter from `BW_KEY=bytes per second` and `OPS_KEY=operations per second`
    /// (each with a bucket of one second's worth); `None` when neither is given.
    fn rate_limiter(
        &mut self,
        bw_key: &str,
        ops_key: &str,
    ) -> Result<Option<RateLimiterConfig>, DeviceOptionError> {
        let mut rate = |key: &str| -> Result<Option<BucketConfig>, DeviceOptionError> {
            self.take(key)
                .map(|v| parse_number::<u64>(self.what, key, &v).map(BucketConfig::per_second))
                .transpose()
        };
        let (bandwidth, ops) = (rate(bw_key)?, rate(ops_key)?);
        Ok((bandwidth.is_some() || ops.is_some()).then_some(RateLimiterConfig { bandwidth, ops }))
    }

    fn finish(self) -> Result<(), DeviceOptionError> {
        match self.map.into_keys().next() {
            Some(key) => Err(DeviceOptionError::Unknown {
                what: self.what,
                key,
            }),
            None => Ok(()),
        }
    }
}

fn parse_number<T: FromStr>(
    what: &'static str,
    key: &str,
    v: &str,
) -> Result<T, DeviceOptionError> {
    v.parse().map_err(|_| DeviceOptionError::Number {
        what,
        key: key.to_string(),
        value: v.to_string(),
    })
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], DeviceOptionError> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || DeviceOptionError::Mac(s.to_string());
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(DeviceOptionError::MulticastMac(s.to_string()));
    }
    Ok(mac)
}

impl FromStr for DiskConfig {
    type Err = DeviceOptionError;
    fn from_str(s: &str) -> Result<Self, DeviceOptionError> {
        let mut o = Options::parse("--disk", s)?;
        let path = PathBuf::from(o.required("path")?);
        let format = match o.take("format").as_deref() {
            None => None,
            Some("raw") => Some(DiskFormat::Raw),
            Some("qcow2") => Some(DiskFormat::Qcow2),
            Some(other) => return Err(DeviceOptionError::Format(other.to_string())),
        };
        let read_only = o.flag("readonly")?;
        let serial = o.take("serial");
        if serial.as_ref().is_some_and(|s| s.len() > 20) {
            return Err(DeviceOptionError::SerialTooLong);
        }
        let transport = o.transport()?;
        let rate_limiter = o.rate_limiter("bw", "iops")?;
        o.finish()?;
        Ok(DiskConfig {
            path,
            format,
            read_only,
            serial,
            transport,
            rate_limiter,
        })
    }
}

impl FromStr for NetConfig {
    type Err = DeviceOptionError;
    fn from_str(s: &str) -> Result<Self, DeviceOptionError> {
        let (head, rest) = s.split_once(',').unwrap_or((s, ""));
        let (mut o, tap, passt) = match head {
            "user" => {
                // hostfwd may be given several times.
                let mut tcp_forwards = Vec::new();
                let mut others = Vec::new();
                for part in rest.split(',') {
                    match part.strip_prefix("hostfwd=") {
                        Some(f) => tcp_forwards.push(f.parse()?),
                        None => others.push(part),
                    }
                }
                let o = Options::parse("--net", &others.join(","))?;
                (o, String::new(), Some(PasstConfig::Spawn { tcp_forwards }))
            }
            "passt" => {
                let mut o = Options::parse("--net", rest)?;
                let socket = PathBuf::from(o.required("socket")?);
                (o, String::new(), Some(PasstConfig::Socket(socket)))
            }
            _ => {
                let mut o = Options::parse("--net", s)?;
                let tap = o.required("tap")?;
                if tap.len() >= 16 {
                    return Err(DeviceOptionError::TapName(tap));
                }
                (o, tap, None)
            }
        };
        let mac = o.take("mac").map(|m| parse_mac(&m)).transpose()?;
        // passt has one queue pair: `queues` is left over (unknown) with it.
        let queues = if passt.is_none() {
            o.take("queues")
        } else {
            None
        };
        let queue_pairs = match queues {
            Some(v) => parse_number("--net", "queues", &v)?,
            None => 1,
        };
        if queue_pairs == 0 {
            return Err(DeviceOptionError::NoQueues);
        }
        let transport = o.transport()?;
        let rx_rate_limiter = o.rate_limiter("rx_bw", "rx_ops")?;
        let tx_rate_limiter = o.rate_limiter("tx_bw", "tx_ops")?;
        o.finish()?;
        Ok(NetConfig {
            tap,
            passt,
            mac,
            queue_pairs,
            transport,
            rx_rate_limiter,
            tx_rate_limiter,
            mmds: None,
        })
    }
}

impl FromStr for VsockConfig {
    type Err = DeviceOptionError;
    fn from_str(s: &str) -> Result<Self, DeviceOptionError> {
        let mut o = Options::parse("--vsock", s)?;
        let cid: u64 = parse_number("--vsock", "cid", &o.required("cid")?)?;
        if cid < 3 || cid > u64::from(u32::MAX) {
            return Err(DeviceOptionError::ReservedCid(cid));
        }
        let uds = PathBuf::from(o.required("uds")?);
        let transport = o.transport()?;
        o.finish()?;
        Ok(VsockConfig {
            cid,
            uds,
            transport,
        })
    }
}

impl FromStr for BalloonConfig {
    type Err = DeviceOptionError;
    fn from_str(s: &str) -> Result<Self, DeviceOptionError> {
        let mut o = Options::parse("--balloon", s)?;
        let size_mib = match o.take("size") {
            Some(v) => parse_number("--balloon", "size", &v)?,
            None => 0,
        };
        let stats = o.flag("stats")?;
        let deflate_on_oom = o.flag("deflate_on_oom")?;
        let free_page_reporting = o.flag_or("reporting", reporting_default())?;
        let free_page_hinting = o.flag("hinting")?;
        let transport = o.transport()?;
        o.finish()?;
        Ok(BalloonConfig {
            size_mib,
            stats,
            deflate_on_oom,
            free_page_reporting,
            free_page_hinting,
            transport,
        })
    }
}

impl FromStr for PmemConfig {
    type Err = DeviceOptionError;
    fn from_str(s: &str) -> Result<Self, DeviceOptionError> {
        let mut o = Options::parse("--pmem", s)?;
        let path = PathBuf::from(o.required("path")?);
        let read_only = o.flag("readonly")?;
        let root = o.flag("root")?;
        let transport = o.transport()?;
        let rate_limiter = o.rate_limiter("bw", "iops")?;
        o.finish()?;
        Ok(PmemConfig {
            path,
            read_only,
            root,
            transport,
            rate_limiter,
            guest_addr: None,
        })
    }
}

impl FromStr for FsConfig {
    type Err = DeviceOptionError;
    fn from_str(s: &str) -> Result<Self, DeviceOptionError> {
        let mut o = Options::parse("--fs", s)?;
        let tag = o.required("tag")?;
        let socket = o.take("socket").filter(|v| !v.is_empty());
        let dir = o.take("dir").filter(|v| !v.is_empty());
        let read_only = o.flag("readonly")?;
        let request_queues = match o.take("queues") {
            Some(v) => parse_number::<u16>("--fs", "queues", &v)?,
            None => 1,
        };
        let transport = o.transport()?;
        o.finish()?;
        let backend = match (socket, dir) {
            (Some(_), None) if read_only => return Err(DeviceOptionError::FsReadOnlySocket),
            (Some(p), None) => FsBackend::Socket(p.into()),
            (None, Some(p)) => FsBackend::Dir {
                path: p.into(),
                read_only,
            },
            _ => return Err(DeviceOptionError::FsBackend),
        };
        Ok(FsConfig {
            tag,
            backend,
            request_queues,
            transport,
        })
    }
}

/// Checks a list of `--pmem` devices: at most one root device.
pub fn check_pmem(pmem: &[PmemConfig]) -> Result<(), DeviceOptionError> {
    if pmem.iter().filter(|p| p.root).count() > 1 {
        return Err(DeviceOptionError::SecondPmemRoot);
    }
    Ok(())
}

/// `--rng [transport=pci|mmio]`
pub fn parse_rng(s: &str) -> Result<Transport, DeviceOptionError> {
    let mut o = Options::parse("--rng", s)?;
    let t = o.transport()?;
    o.finish()?;
    Ok(t)
}

/// `--memory-hotplug size=MIB[,block=MIB][,slot=MIB][,transport=pci|mmio]` (sizes in MiB,
/// Firecracker's defaults: 2 MiB blocks, 128 MiB slots), checked as Firecracker checks
/// `PUT /hotplug/memory`.
pub fn parse_memory_hotplug(
    s: &str,
) -> Result<crate::hotplug::MemoryHotplugConfig, DeviceOptionError> {
    const WHAT: &str = "--memory-hotplug";
    let mut o = Options::parse(WHAT, s)?;
    let total_size_mib = parse_number(WHAT, "size", &o.required("size")?)?;
    let mut c = crate::hotplug::MemoryHotplugConfig::new(total_size_mib);
    if let Some(v) = o.take("block") {
        c.block_size_mib = parse_number(WHAT, "block", &v)?;
    }
    if let Some(v) = o.take("slot") {
        c.slot_size_mib = parse_number(WHAT, "slot", &v)?;
    }
    c.transport = o.transport()?;
    o.finish()?;
    c.validate().map_err(DeviceOptionError::MemoryHotplug)?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_parse() {
        let d: DiskConfig = "path=/tmp/a.img,readonly=on,serial=abc,transport=mmio"
            .parse()
            .unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/tmp/a.img".into(),
                format: None,
                read_only: true,
                serial: Some("abc".into()),
                transport: Transport::Mmio,
                rate_limiter: None,
            }
        );
        let d: DiskConfig = "path=x,format=qcow2".parse().unwrap();
        assert_eq!(d.format, Some(DiskFormat::Qcow2));
        let d: DiskConfig = "path=x,format=raw".parse().unwrap();
        assert_eq!(d.format, Some(DiskFormat::Raw));
        let e = "path=x,format=vmdk".parse::<DiskConfig>().unwrap_err();
        assert_eq!(e.to_string(), "--disk: format=vmdk: use raw or qcow2");
        let d: DiskConfig = "path=x,bw=1000000,iops=500".parse().unwrap();
        assert_eq!(
            d.rate_limiter,
            Some(RateLimiterConfig {
                bandwidth: Some(BucketConfig::per_second(1_000_000)),
                ops: Some(BucketConfig::per_second(500)),
            })
        );
        let d: DiskConfig = "path=x,iops=5".parse().unwrap();
        assert_eq!(d.rate_limiter.and_then(|r| r.bandwidth), None);
        let d: DiskConfig = "path=x".parse().unwrap();
        assert!(!d.read_only);
        assert_eq!(d.transport, Transport::Pci);
        for bad in [
            "",
            "readonly=on",
            "path=",
            "path=x,readonly=maybe",
            "path=x,color=red",
            "path=x,path=y",
            "path=x,transport=usb",
            "path=x,serial=123456789012345678901",
            "path=x,bw=fast",
            "path=x,iops=-1",
            "nonsense",
        ] {
            let e = bad.parse::<DiskConfig>().unwrap_err();
            assert!(e.to_string().starts_with("--disk"), "{bad}: {e}");
        }
    }

    #[test]
    fn user_nets_parse() {
        let n: NetConfig = "user".parse().unwrap();
        assert_eq!(n.tap, "");
        assert_eq!(
            n.passt,
            Some(PasstConfig::Spawn {
                tcp_forwards: vec![]
            })
        );
        assert_eq!(n.queue_pairs, 1);
        let n: NetConfig =
            "user,mac=02:00:00:00:00:07,hostfwd=tcp:8080:80,transport=mmio,hostfwd=tcp:2222:22"
                .parse()
                .unwrap();
        assert_eq!(n.mac, Some([2, 0, 0, 0, 0, 7]));
        assert_eq!(n.transport, Transport::Mmio);
        let fwd = |host, guest| PortForward { host, guest };
        assert_eq!(
            n.passt,
            Some(PasstConfig::Spawn {
                tcp_forwards: vec![fwd(8080, 80), fwd(2222, 22)]
            })
        );
        let n: NetConfig = "passt,socket=/tmp/passt.sock,tx_bw=1000".parse().unwrap();
        assert_eq!(
            n.passt,
            Some(PasstConfig::Socket(PathBuf::from("/tmp/passt.sock")))
        );
        assert!(n.tx_rate_limiter.is_some());
        for bad in [
            "user,queues=2",
            "user,tap=x",
            "user,hostfwd=udp:53:53",
            "user,hostfwd=tcp:80",
            "user,hostfwd=tcp:0:80",
            "user,hostfwd=tcp:70000:80",
            "user,socket=/x",
            "passt",
            "passt,hostfwd=tcp:1:2",
            "user,mac=01:00:00:00:00:01",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn nets_parse() {
        let n: NetConfig = "tap=vtap0,mac=02:00:00:00:00:01,queues=2".parse().unwrap();
        assert_eq!(n.tap, "vtap0");
        assert_eq!(n.mac, Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(n.queue_pairs, 2);
        assert_eq!((n.rx_rate_limiter, n.tx_rate_limiter), (None, None));
        let n: NetConfig = "tap=t,rx_bw=100,tx_ops=7".parse().unwrap();
        assert_eq!(
            n.rx_rate_limiter.and_then(|r| r.bandwidth),
            Some(BucketConfig::per_second(100))
        );
        assert_eq!(
            n.tx_rate_limiter.and_then(|r| r.ops),
            Some(BucketConfig::per_second(7))
        );
        assert!(n.rx_rate_limiter.is_some_and(|r| r.ops.is_none()));
        for bad in [
            "mac=02:00:00:00:00:01",
            "tap=x,mac=zz:00:00:00:00:01",
            "tap=x,mac=01:00:00:00:00:01",
            "tap=x,mac=02:00:00:00:00",
            "tap=averyveryverylongname",
            "tap=x,queues=0",
            "tap=x,queues=-1",
            "tap=x,rx_bw=x",
            "tap=x,bw=5",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn fs_parses_either_backend() {
        let f: FsConfig = "tag=share,dir=/srv/share,readonly=on,queues=2,transport=mmio"
            .parse()
            .unwrap();
        assert_eq!(
            f,
            FsConfig {
                tag: "share".into(),
                backend: FsBackend::Dir {
                    path: "/srv/share".into(),
                    read_only: true
                },
                request_queues: 2,
                transport: Transport::Mmio,
            }
        );
        let g: FsConfig = "tag=x,socket=/run/fs.sock".parse().unwrap();
        assert_eq!(g.backend, FsBackend::Socket("/run/fs.sock".into()));
        assert_eq!((g.request_queues, g.transport), (1, Transport::Pci));
        for (bad, says) in [
            ("dir=/a", "tag=... is required"),
            ("tag=x", "socket=PATH"),
            ("tag=x,socket=/s,dir=/d", "not both"),
            ("tag=x,socket=/s,readonly=on", "needs dir=PATH"),
            ("tag=x,dir=/d,queues=many", "queues=many"),
            ("tag=x,dir=/d,cache=always", "unknown option 'cache'"),
        ] {
            let e = bad.parse::<FsConfig>().unwrap_err().to_string();
            assert!(e.starts_with("--fs") && e.contains(says), "{bad}: {e}");
        }
        let d = DeviceConfigs {
            fs: vec![g],
            ..Default::default()
        };
        assert!(d.need_shared_memory() && !d.is_empty());
        assert!(!DeviceConfigs::default().need_shared_memory());
    }

    #[test]
    fn disks_and_nets_may_be_vhost_user_backends() {
        let d: DeviceOption<DiskConfig> =
            "vhost_user=/run/blk.sock,transport=mmio".parse().unwrap();
        let n: DeviceOption<NetConfig> = "vhost_user=/run/net.sock".parse().unwrap();
        let own: DeviceOption<DiskConfig> = "path=/img".parse().unwrap();
        assert!(matches!(own, DeviceOption::Own(ref c) if c.path == std::path::Path::new("/img")));
        let (disks, vu) = split_options(vec![d, own]);
        assert_eq!(disks.len(), 1);
        assert_eq!(
            vu,
            [VhostUserConfig {
                kind: VhostUserKind::Block,
                socket: "/run/blk.sock".into(),
                transport: Transport::Mmio
            }]
        );
        let (nets, vu) = split_options(vec![n]);
        assert!(nets.is_empty());
        assert_eq!(vu[0].kind, VhostUserKind::Net);
        let e = "vhost_user=/s,readonly=on"
            .parse::<DeviceOption<DiskConfig>>()
            .unwrap_err();
        assert_eq!(e.to_string(), "--disk: unknown option 'readonly'");
        let e = "vhost_user="
            .parse::<DeviceOption<NetConfig>>()
            .unwrap_err();
        assert_eq!(e.to_string(), "--net: vhost_user=... is required");
        let c = DeviceConfigs {
            vhost_user: vu,
            ..Default::default()
        };
        assert!(c.need_shared_memory());
        assert_eq!(
            c.first_vhost_user().as_deref(),
            Some("vhost-user backend /run/net.sock")
        );
    }

    #[test]
    fn pmem_parses_and_names_its_root() {
        let p: PmemConfig = "path=/img,readonly=on,root=on,transport=mmio,iops=10"
            .parse()
            .unwrap();
        assert_eq!(
            p,
            PmemConfig {
                path: "/img".into(),
                read_only: true,
                root: true,
                transport: Transport::Mmio,
                guest_addr: None,
                rate_limiter: Some(RateLimiterConfig {
                    bandwidth: None,
                    ops: Some(BucketConfig::per_second(10)),
                }),
            }
        );
        let q: PmemConfig = "path=/data".parse().unwrap();
        assert!(!q.read_only && !q.root && q.rate_limiter.is_none());
        assert_eq!(q.transport, Transport::Pci);
        for bad in ["", "readonly=on", "path=x,root=maybe", "path=x,dax=on"] {
            let e = bad.parse::<PmemConfig>().unwrap_err();
            assert!(e.to_string().starts_with("--pmem"), "{bad}: {e}");
        }
        let mut d = DeviceConfigs {
            pmem: vec![q.clone(), p.clone()],
            ..DeviceConfigs::default()
        };
        assert!(!d.is_empty());
        assert_eq!(d.pmem_root_params().as_deref(), Some("root=/dev/pmem1 ro"));
        d.pmem[1].read_only = false;
        assert_eq!(d.pmem_root_params().as_deref(), Some("root=/dev/pmem1 rw"));
        check_pmem(&d.pmem).unwrap();
        d.pmem[0].root = true;
        assert_eq!(
            check_pmem(&d.pmem).unwrap_err().to_string(),
            "--pmem: only one device may be the root device"
        );
        d.pmem.clear();
        assert_eq!(d.pmem_root_params(), None);
    }

    #[test]
    fn vsock_and_balloon_and_rng_parse() {
        let v: VsockConfig = "cid=3,uds=/tmp/v.sock".parse().unwrap();
        assert_eq!(v.cid, 3);
        assert!("cid=2,uds=/tmp/v".parse::<VsockConfig>().is_err());
        assert!("cid=x,uds=/tmp/v".parse::<VsockConfig>().is_err());
        assert!("cid=5".parse::<VsockConfig>().is_err());
        let b: BalloonConfig = "size=64,stats=on".parse().unwrap();
        assert_eq!(b.size_mib, 64);
        assert!(b.stats);
        assert_eq!(
            "".parse::<BalloonConfig>().unwrap(),
            BalloonConfig::default()
        );
        // Free page reporting is on unless turned off; hinting only when asked for.
        assert!(b.free_page_reporting && !b.free_page_hinting);
        let b: BalloonConfig = "reporting=off,hinting=on".parse().unwrap();
        assert!(!b.free_page_reporting && b.free_page_hinting);
        assert!("hinting=maybe".parse::<BalloonConfig>().is_err());
        // A configuration saved before these options existed (a snapshot's) reports.
        let old: BalloonConfig = serde_json::from_value(serde_json::json!({
            "size_mib": 1, "stats": false, "deflate_on_oom": false, "transport": "Pci"
        }))
        .unwrap();
        assert!(old.free_page_reporting && !old.free_page_hinting);
        assert_eq!(parse_rng("").unwrap(), Transport::Pci);
        assert_eq!(parse_rng("transport=mmio").unwrap(), Transport::Mmio);
        assert!(parse_rng("speed=fast").is_err());
    }

    #[test]
    fn memory_hotplug_parses_and_is_checked() {
        let c = parse_memory_hotplug("size=1024").unwrap();
        assert_eq!(c, crate::hotplug::MemoryHotplugConfig::new(1024));
        let c = parse_memory_hotplug("size=512,block=4,slot=256,transport=mmio").unwrap();
        assert_eq!(
            (c.total_size_mib, c.block_size_mib, c.slot_size_mib),
            (512, 4, 256)
        );
        assert_eq!(c.transport, Transport::Mmio);
        assert_eq!(
            parse_memory_hotplug("size=200").unwrap_err().to_string(),
            "--memory-hotplug: Total size must be a multiple of slot size (128 MiB)"
        );
        for bad in [
            "",
            "block=2",
            "size=x",
            "size=1024,color=red",
            "size=1024,block=3",
        ] {
            let e = parse_memory_hotplug(bad).unwrap_err();
            assert!(e.to_string().starts_with("--memory-hotplug"), "{bad}: {e}");
        }
    }
}
