//! `PUT /vessel/cloud-init` (extension): the seed is checked when it is configured (so a
//! user-data cloud-init would ignore is a 400 at `PUT` time, by name) and, at
//! `InstanceStart`, made into a NoCloud seed image (`vessel_diskboot::cloudinit`) in a memfd
//! that the VM gets as its last disk: read-only, raw, on the other drives' transport, with
//! the serial `cidata`. The backend holds the memfd as long as the VM.

use vessel_api::types::CloudInitSeed;
use vessel_api::ApiError;
use vessel_diskboot::cloudinit::{self, CloudInitError, SeedConfig};
use vessel_vmm::device_config::Transport;
use vessel_vmm::{ErrorChain, VmConfig};

use crate::memfile::MemFile;

fn seed_error(e: &CloudInitError) -> ApiError {
    ApiError::bad(format!("Cloud-init seed error: {}", ErrorChain(e)))
}

/// Checks what `build_seed` would refuse, without building the image.
pub(super) fn check(seed: &CloudInitSeed) -> Result<(), ApiError> {
    cloudinit::check_seed(&seed_config(seed)).map_err(|e| seed_error(&e))
}

fn seed_config(seed: &CloudInitSeed) -> SeedConfig {
    SeedConfig {
        user_data: seed.user_data.clone().into_bytes(),
        meta_data: seed.meta_data.clone().map(String::into_bytes),
        network_config: seed.network_config.clone().map(String::into_bytes),
        ..SeedConfig::default()
    }
}

/// Builds the seed image and adds it to `config` as its last disk, on `transport`. The
/// returned memfd backs the disk: keep it as long as the VM.
pub(super) fn attach(
    seed: &CloudInitSeed,
    config: &mut VmConfig,
    transport: Transport,
) -> Result<MemFile, ApiError> {
    let image = cloudinit::build_seed(&seed_config(seed)).map_err(|e| seed_error(&e))?;
    let (file, disk) = crate::seed::seed_disk(&image, transport)
        .map_err(|e| ApiError::Internal(format!("cloud-init seed: {e}")))?;
    config.devices.disks.push(disk);
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fc::config::resources_to_config_on;
    use crate::fc::config::tests::with_kernel;
    use crate::seed::SEED_SERIAL;
    use serde_json::json;
    use vessel_diskboot::cloudinit::MAX_SEED_FILE;
    use vessel_vmm::device_config::DiskFormat;

    fn seed(v: serde_json::Value) -> CloudInitSeed {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn user_data_cloud_init_would_ignore_is_refused_by_name() {
        assert_eq!(
            check(&seed(json!({"user_data": "#cloud-config\n"}))),
            Ok(())
        );
        let e = check(&seed(json!({"user_data": "users: []\n"}))).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("Cloud-init seed error: the user-data starts with \"users: []\""),
            "{msg}"
        );
        assert!(msg.contains("#cloud-config"), "{msg}");
        let e = check(&seed(json!({"user_data": " \n"}))).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let big = "x".repeat(MAX_SEED_FILE + 1);
        let e = check(&seed(
            json!({"user_data": "#cloud-config\n", "network_config": big}),
        ))
        .unwrap_err();
        assert!(e.to_string().contains("network-config"), "{e}");
        assert!(matches!(e, ApiError::BadRequest(_)));
    }

    #[test]
    fn the_seed_is_the_last_disk_read_only_raw_on_the_drives_transport() {
        let (kernel, mut r) = with_kernel("kernel-cidata");
        r.set_drive(
            serde_json::from_value(json!({
                "drive_id": "rootfs", "path_on_host": kernel, "is_root_device": true, "is_read_only": false
            }))
            .unwrap(),
        )
        .unwrap();
        let s = seed(json!({
            "user_data": "#cloud-config\npassword: hunter2\n",
            "meta_data": "instance-id: i-42\n"
        }));
        for transport in [Transport::Mmio, Transport::Pci] {
            let mut c = resources_to_config_on(&r, &VmConfig::default(), transport).unwrap();
            assert_eq!(c.devices.disks.len(), 1);
            let file = attach(&s, &mut c, transport).unwrap();
            let disks = &c.devices.disks;
            assert_eq!(disks.len(), 2, "one more disk than drives");
            assert_eq!(
                disks[0].serial.as_deref(),
                Some("rootfs"),
                "the root stays first"
            );
            let d = &disks[1];
            assert!(d.read_only);
            assert_eq!(d.format, Some(DiskFormat::Raw));
            assert_eq!(d.serial.as_deref(), Some(SEED_SERIAL));
            assert_eq!(d.transport, transport);
            assert_eq!(d.path, file.path());
            // The disk is a FAT filesystem labelled CIDATA holding the files.
            let image = std::fs::read(&d.path).unwrap();
            assert_eq!(&image[510..512], &[0x55, 0xAA]);
            let hay = String::from_utf8_lossy(&image);
            assert!(hay.contains("CIDATA"));
            assert!(hay.contains("password: hunter2"));
            assert!(hay.contains("instance-id: i-42"));
        }
        let _ = std::fs::remove_file(kernel);
    }
}
