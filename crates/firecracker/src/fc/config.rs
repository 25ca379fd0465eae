//! Firecracker's pre-boot `VmResources` (or a `--config-file`) to the core's [`VmConfig`]:
//! the kernel command line, the devices with their rate limiters and MMDS, what Vessel refuses,
//! and `PUT /snapshot/load`'s host-side overrides.

use std::path::PathBuf;

use vessel_api::types::{
    BootSource as ApiBootSource, Drive, FsDevice, HugePages, MmdsVersion, NetworkInterface,
    RateLimiter as ApiRateLimiter, SnapshotLoadParams, TokenBucket as ApiTokenBucket,
    DEFAULT_MMDS_ADDR,
};
use vessel_api::{ApiError, VmResources};
use vessel_ratelimit::{BucketConfig, BucketUpdate, RateLimiter, RateLimiterConfig};
use vessel_vmm::device_config::{
    BalloonConfig, DeviceConfigs, DiskConfig, DiskFormat, FsBackend, FsConfig, NetConfig,
    Transport, VhostUserConfig, VhostUserKind, VsockConfig,
};
use vessel_vmm::{Payload, VmConfig, DEFAULT_CMDLINE};

/// The virtio-blk serial (device id) is at most 20 bytes.
const BLK_SERIAL_MAX: usize = 20;

/// The kernel command line for `boot`: `boot_args`, or Vessel's default, plus the root
/// device parameters Firecracker adds for a root drive (`root=/dev/vda` or
/// `root=PARTUUID=...`, then `ro` or `rw`).
pub fn kernel_cmdline(resources: &VmResources, boot: &ApiBootSource) -> String {
    let mut s = boot
        .boot_args
        .clone()
        .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
    if let Some(root) = resources.drives.iter().find(|d| d.is_root_device) {
        let dev = match &root.partuuid {
            Some(u) => format!("PARTUUID={u}"),
            // The root drive is placed first, so it is the first virtio-blk disk.
            None => "/dev/vda".to_string(),
        };
        let mode = if root.is_read_only == Some(true) {
            "ro"
        } else {
            "rw"
        };
        s += &format!(" root={dev} {mode}");
    }
    s
}

/// Maps API resources to a VM configuration. `base` supplies what the API does not
/// describe (console, nested mode, profiling, boot timer); every device is placed on
/// virtio-mmio (the tests' shorthand for [`resources_to_config_on`]).
#[cfg(test)]
pub fn resources_to_config(r: &VmResources, base: &VmConfig) -> Result<VmConfig, ApiError> {
    resources_to_config_on(r, base, Transport::Mmio)
}

/// [`resources_to_config`] with every device on `transport` (`--enable-pci`: PCI).
pub fn resources_to_config_on(
    r: &VmResources,
    base: &VmConfig,
    transport: Transport,
) -> Result<VmConfig, ApiError> {
    let Some(boot) = &r.boot_source else {
        return Err(ApiError::bad(
            "Start microvm error: Missing kernel configuration.",
        ));
    };
    let mut disks = Vec::with_capacity(r.drives.len());
    let mut vhost_user = Vec::new();
    for d in &r.drives {
        if let Some(socket) = &d.socket {
            // Vessel's vhost-user disks come after its own: a root drive must be first.
            if d.is_root_device && r.drives.iter().any(|o| o.socket.is_none()) {
                return Err(ApiError::bad(
                    "Start microvm error: a vhost-user-block root drive cannot be combined with file-backed drives in Vessel (they are placed first); give the root drive a path_on_host, or use vhost-user for every drive.",
                ));
            }
            vhost_user.push(VhostUserConfig {
                kind: VhostUserKind::Block,
                socket: PathBuf::from(socket),
                transport,
            });
            continue;
        }
        disks.push(disk_config(d, transport)?);
    }
    let mmds = mmds(r);
    let mut nets = Vec::with_capacity(r.network_interfaces.len());
    for n in &r.network_interfaces {
        let mmds = mmds
            .as_ref()
            .filter(|(_, ifaces)| ifaces.contains(&n.iface_id))
            .map(|(m, _)| m.clone());
        nets.push(net_config(n, mmds, transport)?);
    }
    let vsock = r.vsock.as_ref().map(|v| VsockConfig {
        cid: u64::from(v.guest_cid),
        uds: PathBuf::from(&v.uds_path),
        transport,
    });
    let balloon = r.balloon.as_ref().map(|b| BalloonConfig {
        size_mib: u64::from(b.amount_mib),
        stats: b.stats_polling_interval_s > 0,
        deflate_on_oom: b.deflate_on_oom,
        free_page_reporting: b.free_page_reporting,
        free_page_hinting: b.free_page_hinting,
        transport,
    });
    let m = &r.machine_config;
    Ok(VmConfig {
        boot: Payload::Linux {
            kernel: PathBuf::from(&boot.kernel_image_path),
            initrd: boot.initrd_path.as_ref().map(PathBuf::from),
            system_map: None,
        },
        cmdline: Some(kernel_cmdline(r, boot)),
        append: base.append.clone(),
        cpus: u32::from(m.vcpu_count),
        memory: (m.mem_size_mib as u64) << 20,
        serial: base.serial.clone(),
        serial_limit: base.serial_limit,
        nested: base.nested,
        profile_ms: base.profile_ms,
        devices: DeviceConfigs {
            disks,
            nets,
            vsock,
            rng: r.entropy.map(|_| transport),
            rng_rate_limiter: r.entropy.and_then(|e| limiter_config(&e.rate_limiter)),
            balloon,
            pmem: super::pmem::configs(r, transport),
            memory_hotplug: r
                .memory_hotplug
                .as_ref()
                .map(|h| super::memhp::config(h, transport)),
            fs: r.fs.iter().map(|f| fs_config(f, transport)).collect(),
            vhost_user,
            // `--enable-pci`: devices can be hot-plugged, even into a VM that has none.
            pci_bus: transport == Transport::Pci,
        },
        track_dirty_pages: m.track_dirty_pages,
        shared_memory: false,
        boot_timer: base.boot_timer,
        cpu_template: r
            .cpu_config
            .as_ref()
            .map(super::cpu_config::from_api)
            .transpose()?,
    })
}

/// A `PUT /vessel/fs/{id}` device (checked by the API) as the core's virtio-fs device.
fn fs_config(f: &FsDevice, transport: Transport) -> FsConfig {
    let backend = match (&f.socket, &f.shared_dir) {
        (Some(socket), _) => FsBackend::Socket(PathBuf::from(socket)),
        (None, dir) => FsBackend::Dir {
            path: PathBuf::from(dir.as_deref().unwrap_or_default()),
            read_only: f.read_only,
        },
    };
    FsConfig {
        tag: f.tag.clone(),
        backend,
        request_queues: f.num_queues.unwrap_or(1),
        transport,
    }
}

/// The VM's MMDS (reading the API's store, so the guest sees later `PUT`/`PATCH /mmds`) and
/// the interfaces that reach it, when `mmds_config` is set.
/// The disk of a file-backed drive.
pub(super) fn disk_config(d: &Drive, transport: Transport) -> Result<DiskConfig, ApiError> {
    let Some(path) = &d.path_on_host else {
        return Err(ApiError::bad(format!(
            "Drive config error: drive {} has no `path_on_host`.",
            d.drive_id
        )));
    };
    Ok(DiskConfig {
        path: PathBuf::from(path),
        // Firecracker's drives are raw: never probed, so a guest that writes a qcow2
        // header into its disk cannot make the host open files it names.
        format: Some(DiskFormat::Raw),
        read_only: d.is_read_only.unwrap_or(false),
        // Firecracker answers VIRTIO_BLK_T_GET_ID with the drive id.
        serial: (d.drive_id.len() <= BLK_SERIAL_MAX).then(|| d.drive_id.clone()),
        transport,
        rate_limiter: limiter_config(&d.rate_limiter),
    })
}

/// The NIC of a network interface, answering MMDS with `mmds`.
pub(super) fn net_config(
    n: &NetworkInterface,
    mmds: Option<vessel_mmds::Mmds>,
    transport: Transport,
) -> Result<NetConfig, ApiError> {
    let mac = match &n.guest_mac {
        Some(m) => Some(vessel_api::resources::parse_mac(m).ok_or_else(|| {
            ApiError::bad(format!(
                "Network interface config error: invalid MAC address {m}"
            ))
        })?),
        None => None,
    };
    Ok(NetConfig {
        tap: n.host_dev_name.clone(),
        passt: None,
        mac,
        queue_pairs: 1,
        transport,
        rx_rate_limiter: limiter_config(&n.rx_rate_limiter),
        tx_rate_limiter: limiter_config(&n.tx_rate_limiter),
        mmds,
    })
}

fn mmds(r: &VmResources) -> Option<(vessel_mmds::Mmds, &[String])> {
    let c = r.mmds_config.as_ref()?;
    let options = vessel_mmds::MmdsOptions {
        version: match c.version {
            MmdsVersion::V1 => vessel_mmds::Version::V1,
            MmdsVersion::V2 => vessel_mmds::Version::V2,
        },
        imds_compat: c.imds_compat,
        ipv4: c.ipv4_address.unwrap_or(DEFAULT_MMDS_ADDR),
    };
    Some((
        vessel_mmds::Mmds::new(r.mmds.shared(), options),
        &c.network_interfaces,
    ))
}

/// What Vessel cannot do yet among what the API accepts: refused when configured, with the
/// spec's 400, rather than at `InstanceStart`.
pub(super) fn unsupported(r: &VmResources) -> Result<(), ApiError> {
    let m = &r.machine_config;
    if m.huge_pages != HugePages::None {
        return Err(ApiError::Unsupported("huge page backed memory".into()));
    }
    Ok(())
}

pub(super) fn bucket_config(b: &ApiTokenBucket) -> BucketConfig {
    BucketConfig {
        size: b.size,
        one_time_burst: b.one_time_burst.unwrap_or(0),
        refill_time_ms: b.refill_time,
    }
}

/// An API rate limiter as the device configuration stores it (`None` when it limits
/// nothing).
pub(super) fn limiter_config(r: &Option<ApiRateLimiter>) -> Option<RateLimiterConfig> {
    let c = r.map(|r| RateLimiterConfig {
        bandwidth: r.bandwidth.as_ref().map(bucket_config),
        ops: r.ops.as_ref().map(bucket_config),
    })?;
    (!c.is_unlimited()).then_some(c)
}

/// Applies a `PATCH`'s rate limiter to a running device's: a bucket that is given replaces
/// the current one (a new, full bucket; size or refill time 0 removes the limit), one that
/// is not stays as it is.
pub(super) fn update_limiter(l: &RateLimiter, u: &Option<ApiRateLimiter>) {
    if let Some(u) = u {
        l.update(
            BucketUpdate::from_patch(u.bandwidth.as_ref().map(bucket_config)),
            BucketUpdate::from_patch(u.ops.as_ref().map(bucket_config)),
        );
    }
}

/// `PUT /snapshot/load`'s host-side changes (the TAPs, the vsock socket and the guest's CID)
/// applied to the snapshot's configuration and API resources.
pub(super) fn apply_overrides(
    p: &SnapshotLoadParams,
    config: &mut VmConfig,
    resources: &mut VmResources,
) -> Result<(), ApiError> {
    let load_err = |e: String| ApiError::bad(format!("Load snapshot error: {e}"));
    for o in &p.network_overrides {
        let at = resources
            .network_interfaces
            .iter()
            .position(|n| n.iface_id == o.iface_id)
            .ok_or_else(|| {
                load_err(format!(
                    "the snapshot has no network interface {}",
                    o.iface_id
                ))
            })?;
        if let Some(n) = config.devices.nets.get_mut(at) {
            n.tap = o.host_dev_name.clone();
        }
        resources.network_interfaces[at].host_dev_name = o.host_dev_name.clone();
    }
    if let Some(o) = &p.vsock_override {
        match (&mut config.devices.vsock, &mut resources.vsock) {
            (Some(v), r) => {
                v.uds = PathBuf::from(&o.uds_path);
                if let Some(cid) = o.guest_cid {
                    // The controller checked the range; the device checks it again.
                    v.cid = u64::from(cid);
                }
                if let Some(r) = r {
                    r.uds_path = o.uds_path.clone();
                    if let Some(cid) = o.guest_cid {
                        r.guest_cid = cid;
                    }
                }
            }
            (None, _) => {
                return Err(load_err(
                    "Unknown Vsock Device: the snapshot has no vsock device".into(),
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::fc::backend::ApiBackend;
    use serde_json::{json, Value};
    use vessel_api::types::{
        Balloon, BootSource as ApiBoot, Drive, EntropyDevice, MachineConfig, NetworkInterface,
        Vsock,
    };
    use vessel_api::VmmBackend;

    fn file(name: &str) -> String {
        let p = std::env::temp_dir().join(format!("vessel-api-map-{}-{name}", std::process::id()));
        std::fs::write(&p, b"x").unwrap();
        p.display().to_string()
    }

    fn drive(id: &str, path: &str, root: bool, ro: bool) -> Drive {
        serde_json::from_value(json!({
            "drive_id": id, "path_on_host": path, "is_root_device": root, "is_read_only": ro
        }))
        .unwrap()
    }

    #[test]
    fn vhost_user_drives_go_to_their_backends_after_the_file_drives() {
        let (_, mut r) = with_kernel("vu-kernel");
        let sock_path =
            std::env::temp_dir().join(format!("vessel-api-map-{}-vu.sock", std::process::id()));
        let _ = std::fs::remove_file(&sock_path);
        let _listener = std::os::unix::net::UnixListener::bind(&sock_path).unwrap();
        let sock = sock_path.display().to_string();
        let vu = |root: bool| -> Drive {
            serde_json::from_value(
                json!({"drive_id": "vu", "socket": sock, "is_root_device": root}),
            )
            .unwrap()
        };
        r.set_drive(vu(false)).unwrap();
        r.set_drive(drive("data", &file("vu-data"), false, false))
            .unwrap();
        let c = resources_to_config(&r, &VmConfig::default()).unwrap();
        assert_eq!(c.devices.disks.len(), 1);
        assert_eq!(c.devices.disks[0].serial.as_deref(), Some("data"));
        assert_eq!(
            c.devices.vhost_user,
            [VhostUserConfig {
                kind: VhostUserKind::Block,
                socket: sock_path.clone(),
                transport: Transport::Mmio,
            }]
        );
        // A vhost-user root drive would not be /dev/vda behind a file drive: refused.
        r.set_drive(vu(true)).unwrap();
        let e = resources_to_config(&r, &VmConfig::default()).unwrap_err();
        assert!(e.to_string().contains("vhost-user-block root drive"), "{e}");
        r.drives.retain(|d| d.socket.is_some());
        let c = resources_to_config(&r, &VmConfig::default()).unwrap();
        assert!(c.devices.disks.is_empty() && c.devices.vhost_user.len() == 1);
        assert!(c.cmdline.unwrap().contains("root=/dev/vda rw"));
        let _ = std::fs::remove_file(&sock_path);
    }

    #[test]
    fn fs_devices_map_to_virtio_fs_with_their_backends() {
        let (_, mut r) = with_kernel("fs-kernel");
        let dir = std::env::temp_dir().join(format!("vessel-api-map-{}-fs", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock_path = dir.join("fs.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock_path).unwrap();
        let fs = |v: Value| -> FsDevice { serde_json::from_value(v).unwrap() };
        r.set_fs(fs(json!({"id": "vu", "tag": "vutag", "socket": sock_path})))
            .unwrap();
        r.set_fs(fs(json!({
            "id": "share", "tag": "share", "shared_dir": dir, "read_only": true, "num_queues": 4
        })))
        .unwrap();
        let want = |transport| {
            vec![
                FsConfig {
                    tag: "vutag".into(),
                    backend: FsBackend::Socket(sock_path.clone()),
                    request_queues: 1,
                    transport,
                },
                FsConfig {
                    tag: "share".into(),
                    backend: FsBackend::Dir {
                        path: dir.clone(),
                        read_only: true,
                    },
                    request_queues: 4,
                    transport,
                },
            ]
        };
        let c = resources_to_config(&r, &VmConfig::default()).unwrap();
        assert_eq!(c.devices.fs, want(Transport::Mmio));
        let c = resources_to_config_on(&r, &VmConfig::default(), Transport::Pci).unwrap();
        assert_eq!(c.devices.fs, want(Transport::Pci));
        // The backend needs the guest's memory shared.
        assert!(c.devices.need_shared_memory());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Resources booting a kernel file `name` (made here) with the default command line.
    pub(crate) fn with_kernel(name: &str) -> (String, VmResources) {
        let kernel = file(name);
        let mut r = VmResources::default();
        r.set_boot_source(ApiBoot {
            kernel_image_path: kernel.clone(),
            initrd_path: None,
            boot_args: None,
        })
        .unwrap();
        (kernel, r)
    }

    #[test]
    fn resources_map_to_an_mmio_vm() {
        let kernel = file("kernel");
        let disk = file("disk");
        let mut r = VmResources::default();
        r.set_boot_source(ApiBoot {
            kernel_image_path: kernel.clone(),
            initrd_path: None,
            boot_args: Some("console=ttyS0 quiet".into()),
        })
        .unwrap();
        r.set_machine_config(MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 256,
            ..Default::default()
        })
        .unwrap();
        r.set_drive(drive("scratch", &disk, false, false)).unwrap();
        r.set_drive(drive("rootfs", &disk, true, true)).unwrap();
        r.set_network_interface(NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: Some("06:00:ac:10:00:02".into()),
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        })
        .unwrap();
        r.set_vsock(Vsock {
            guest_cid: 3,
            uds_path: "/tmp/v.sock".into(),
            vsock_id: None,
        })
        .unwrap();
        r.set_entropy(EntropyDevice::default()).unwrap();
        r.set_balloon(Balloon {
            amount_mib: 64,
            deflate_on_oom: true,
            stats_polling_interval_s: 1,
            free_page_hinting: false,
            free_page_reporting: false,
        })
        .unwrap();
        let base = VmConfig {
            append: vec!["vessel.poweroff".into()],
            ..Default::default()
        };
        let c = resources_to_config(&r, &base).unwrap();
        assert_eq!(
            c.boot,
            Payload::Linux {
                kernel: kernel.clone().into(),
                initrd: None,
                system_map: None
            }
        );
        // The root drive comes first, read-only, and names the root device.
        assert_eq!(
            c.cmdline.as_deref(),
            Some("console=ttyS0 quiet root=/dev/vda ro")
        );
        assert_eq!(c.append, ["vessel.poweroff"]);
        assert_eq!((c.cpus, c.memory), (2, 256 << 20));
        let d = &c.devices;
        assert_eq!(d.disks.len(), 2);
        assert_eq!(d.disks[0].serial.as_deref(), Some("rootfs"));
        assert!(d.disks[0].read_only);
        assert!(!d.disks[1].read_only);
        assert_eq!(d.nets[0].tap, "tap0");
        assert_eq!(d.nets[0].mac, Some([6, 0, 0xac, 0x10, 0, 2]));
        assert_eq!(d.vsock.as_ref().map(|v| v.cid), Some(3));
        assert_eq!(d.rng, Some(Transport::Mmio));
        let b = d.balloon.as_ref().unwrap();
        assert_eq!((b.size_mib, b.stats, b.deflate_on_oom), (64, true, true));
        assert!(d.disks.iter().all(|d| d.transport == Transport::Mmio));
        assert!(d.nets.iter().all(|d| d.transport == Transport::Mmio));
        let _ = std::fs::remove_file(kernel);
        let _ = std::fs::remove_file(disk);
    }

    #[test]
    fn default_cmdline_and_partuuid_root() {
        let (kernel, mut r) = with_kernel("kernel2");
        let c = resources_to_config(&r, &VmConfig::default()).unwrap();
        assert_eq!(c.cmdline.as_deref(), Some(DEFAULT_CMDLINE));
        let mut d = drive("root", &kernel, true, false);
        d.partuuid = Some("1234-01".into());
        r.set_drive(d).unwrap();
        let c = resources_to_config(&r, &VmConfig::default()).unwrap();
        assert_eq!(
            c.cmdline.unwrap(),
            format!("{DEFAULT_CMDLINE} root=PARTUUID=1234-01 rw")
        );
        let _ = std::fs::remove_file(kernel);
    }

    #[test]
    fn mmds_config_reaches_the_named_interfaces_and_shares_the_store() {
        let (kernel, mut r) = with_kernel("kernel-mmds");
        for (id, tap) in [("eth0", "tap0"), ("eth1", "tap1")] {
            r.set_network_interface(NetworkInterface {
                iface_id: id.into(),
                host_dev_name: tap.into(),
                guest_mac: None,
                mtu: None,
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            })
            .unwrap();
        }
        r.set_mmds_config(
            serde_json::from_value(json!({
                "version": "V2", "network_interfaces": ["eth1"],
                "ipv4_address": "169.254.170.2", "imds_compat": true
            }))
            .unwrap(),
        )
        .unwrap();
        let mut b = ApiBackend::new(VmConfig::default()).unwrap();
        assert_eq!(b.validate(&r), Ok(()), "MMDS is supported");
        let c = resources_to_config(&r, &VmConfig::default()).unwrap();
        let nets = &c.devices.nets;
        assert!(nets[0].mmds.is_none());
        let m = nets[1].mmds.as_ref().expect("eth1 has MMDS");
        let o = m.options();
        assert_eq!(o.version, vessel_mmds::Version::V2);
        assert!(o.imds_compat);
        assert_eq!(o.ipv4, std::net::Ipv4Addr::new(169, 254, 170, 2));
        // The guest reads what the API writes after the VM was built.
        r.mmds.put(json!({"k": "v"})).unwrap();
        let req = b"GET /k HTTP/1.1\r\n\r\n";
        let vessel_mmds::Served::Response { response, .. } =
            m.serve(req, std::time::Instant::now())
        else {
            panic!("no response");
        };
        assert!(
            String::from_utf8_lossy(&response).starts_with("HTTP/1.1 401"),
            "V2"
        );
        let put = b"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n";
        let vessel_mmds::Served::Response { response, .. } =
            m.serve(put, std::time::Instant::now())
        else {
            panic!("no response");
        };
        let text = String::from_utf8_lossy(&response).into_owned();
        let token = text.rsplit("\r\n\r\n").next().unwrap();
        let get = format!("GET /k HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n");
        let vessel_mmds::Served::Response { response, .. } =
            m.serve(get.as_bytes(), std::time::Instant::now())
        else {
            panic!("no response");
        };
        let text = String::from_utf8_lossy(&response).into_owned();
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("\r\n\r\nv"),
            "{text}"
        );
        let _ = std::fs::remove_file(kernel);
    }

    #[test]
    fn snapshot_load_overrides_give_a_clone_its_own_vsock_socket_and_cid() {
        let (kernel, mut r) = with_kernel("kernel-clone");
        let uds =
            std::env::temp_dir().join(format!("vessel-api-clone-{}.sock", std::process::id()));
        r.set_vsock(Vsock {
            guest_cid: 3,
            uds_path: "/tmp/original.sock".into(),
            vsock_id: None,
        })
        .unwrap();
        let load = |o: Value| -> SnapshotLoadParams {
            serde_json::from_value(json!({
                "snapshot_path": "/s", "mem_file_path": "/m", "vsock_override": o
            }))
            .unwrap()
        };
        let snap_config = resources_to_config(&r, &VmConfig::default()).unwrap();

        let (mut c, mut res) = (snap_config.clone(), r.clone());
        apply_overrides(
            &load(json!({"uds_path": uds.display().to_string(), "guest_cid": 42})),
            &mut c,
            &mut res,
        )
        .unwrap();
        let v = c.devices.vsock.as_ref().unwrap();
        assert_eq!((v.cid, v.uds.as_path()), (42, uds.as_path()));
        let rv = res.vsock.as_ref().unwrap();
        assert_eq!(
            (rv.guest_cid, rv.uds_path.as_str()),
            (42, uds.to_str().unwrap())
        );
        // The device built from it reports the new CID in its configuration space.
        let (devices, _) = vessel_vmm::device_factory::build(
            &c.devices,
            &mut vessel_vmm::pmem::Placer::new((512 << 30, 1 << 46)),
        )
        .unwrap();
        let mut cid = [0u8; 8];
        devices[0].device.read_config(0, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 42);
        drop(devices);

        // Without guest_cid, only the socket changes.
        let (mut c, mut res) = (snap_config.clone(), r.clone());
        apply_overrides(
            &load(json!({"uds_path": "/tmp/other.sock"})),
            &mut c,
            &mut res,
        )
        .unwrap();
        assert_eq!(c.devices.vsock.as_ref().unwrap().cid, 3);
        assert_eq!(res.vsock.as_ref().unwrap().guest_cid, 3);

        // A snapshot without vsock has nothing to override.
        let (plain_kernel, plain) = with_kernel("kernel-clone-plain");
        let mut c = resources_to_config(&plain, &VmConfig::default()).unwrap();
        let mut res = plain.clone();
        let e = apply_overrides(
            &load(json!({"uds_path": "/tmp/x", "guest_cid": 5})),
            &mut c,
            &mut res,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("Unknown Vsock Device: the snapshot has no vsock device"),
            "{e}"
        );
        let _ = std::fs::remove_file(kernel);
        let _ = std::fs::remove_file(plain_kernel);
    }
}
