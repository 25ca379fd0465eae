//! virtio-fs in the API, a Vessel extension: `PUT /vessel/fs/{id}` before boot ([`FsDevice`],
//! kept in [`VmResources::fs`] in the order they were added) and `vessel-fs` in the config
//! file and in `GET /vm/config`. A device shares a host directory with the guest, which mounts
//! it by its tag (`mount -t virtiofs TAG /mnt`); its backend is either a running vhost-user
//! server (`socket`, e.g. `virtiofsd --socket-path`) or a `virtiofsd` that Vessel starts
//! (`shared_dir`). Firecracker has no such device, so the export leaves the key out when no
//! device is configured.

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::resources::VmResources;
use crate::types::Schema;

/// The longest tag: the size of virtio-fs's `tag` field in the device configuration.
pub const MAX_TAG_LEN: usize = 36;

/// The most request queues a device may have.
pub const MAX_QUEUES: u16 = 16;

/// `PUT /vessel/fs/{id}` (extension, pre-boot): a virtio-fs device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsDevice {
    /// Unique id, equal to the path's `{id}`.
    pub id: String,
    /// What the guest mounts (`mount -t virtiofs TAG /mnt`): 1 to 36 bytes, no NUL, unique
    /// among the devices.
    pub tag: String,
    /// The socket of a running vhost-user backend (`virtiofsd --socket-path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// A host directory: Vessel starts `virtiofsd` sharing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_dir: Option<String>,
    /// Share `shared_dir` read-only (only with `shared_dir`).
    #[serde(default)]
    pub read_only: bool,
    /// Request queues, 1 to 16 (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
}

impl Schema for FsDevice {
    const NAME: &'static str = "FsDevice";
}

fn bad(msg: impl std::fmt::Display) -> ApiError {
    ApiError::bad(format!("Fs config error: {msg}"))
}

impl FsDevice {
    /// Checks the device on its own (not against the others): its fields and its backend on
    /// the host.
    fn check(&self) -> Result<(), ApiError> {
        if self.tag.is_empty() || self.tag.len() > MAX_TAG_LEN {
            return Err(bad(format_args!(
                "the tag must be 1 to {MAX_TAG_LEN} bytes long, not {}.",
                self.tag.len()
            )));
        }
        if self.tag.contains('\0') {
            return Err(bad("the tag must not contain a NUL byte."));
        }
        if let Some(n) = self.num_queues {
            if n == 0 || n > MAX_QUEUES {
                return Err(bad(format_args!(
                    "num_queues must be 1 to {MAX_QUEUES}, not {n}."
                )));
            }
        }
        match (&self.socket, &self.shared_dir) {
            (Some(_), Some(_)) => Err(bad(
                "give either `socket` or `shared_dir`, not both.",
            )),
            (None, None) => Err(bad("either `socket` or `shared_dir` is required.")),
            (Some(_), None) if self.read_only => Err(bad(
                "`read_only` applies to `shared_dir` only (a vhost-user backend sets its own access).",
            )),
            (Some(socket), None) => match crate::resources::socket_problem(socket) {
                Some(why) => Err(bad(why)),
                None => Ok(()),
            },
            (None, Some(dir)) => match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() => Ok(()),
                Ok(_) => Err(bad(format_args!("{dir} is not a directory."))),
                Err(e) => Err(bad(format_args!("{dir}: {e}"))),
            },
        }
    }
}

impl VmResources {
    /// `PUT /vessel/fs/{id}`: inserts a device or replaces the one with the same id (in
    /// place), after checking its fields, that its backend exists on the host, and that no
    /// other device has its tag.
    pub fn set_fs(&mut self, f: FsDevice) -> Result<(), ApiError> {
        f.check()?;
        if let Some(other) = self.fs.iter().find(|o| o.tag == f.tag && o.id != f.id) {
            return Err(bad(format_args!(
                "the tag {} is already used by the device {}.",
                f.tag, other.id
            )));
        }
        match self.fs.iter_mut().find(|o| o.id == f.id) {
            Some(slot) => *slot = f,
            None => self.fs.push(f),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;

    /// A fresh scratch directory for a test.
    fn scratch(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vessel-api-fs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn dir_dev(id: &str, tag: &str, dir: &str) -> FsDevice {
        serde_json::from_value(json!({"id": id, "tag": tag, "shared_dir": dir})).unwrap()
    }

    fn err(r: &mut VmResources, f: FsDevice) -> String {
        r.set_fs(f).unwrap_err().to_string()
    }

    #[test]
    fn a_shared_directory_or_a_socket_is_accepted() {
        let d = scratch("ok");
        let sock = d.join("fs.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let mut r = VmResources::default();
        let mut shared = dir_dev("share", "share", &d.display().to_string());
        shared.read_only = true;
        shared.num_queues = Some(MAX_QUEUES);
        r.set_fs(shared.clone()).unwrap();
        let vu: FsDevice = serde_json::from_value(
            json!({"id": "vu", "tag": "x".repeat(MAX_TAG_LEN), "socket": sock, "num_queues": 1}),
        )
        .unwrap();
        r.set_fs(vu.clone()).unwrap();
        assert_eq!(r.fs, [shared, vu]);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn exactly_one_backend_and_read_only_only_with_a_directory() {
        let d = scratch("backend");
        let dir = d.display().to_string();
        let sock = d.join("fs.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let mut r = VmResources::default();
        let mut both = dir_dev("a", "a", &dir);
        both.socket = Some(sock.display().to_string());
        assert_eq!(
            err(&mut r, both),
            "Fs config error: give either `socket` or `shared_dir`, not both."
        );
        let mut neither = dir_dev("a", "a", &dir);
        neither.shared_dir = None;
        assert_eq!(
            err(&mut r, neither.clone()),
            "Fs config error: either `socket` or `shared_dir` is required."
        );
        let mut ro_socket = neither;
        ro_socket.socket = Some(sock.display().to_string());
        ro_socket.read_only = true;
        assert!(err(&mut r, ro_socket)
            .starts_with("Fs config error: `read_only` applies to `shared_dir` only"),);
        assert!(r.fs.is_empty(), "refused devices are not added");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn the_tag_has_virtio_fs_limits() {
        let d = scratch("tag");
        let dir = d.display().to_string();
        let mut r = VmResources::default();
        assert_eq!(
            err(&mut r, dir_dev("a", "", &dir)),
            "Fs config error: the tag must be 1 to 36 bytes long, not 0."
        );
        assert_eq!(
            err(&mut r, dir_dev("a", &"x".repeat(MAX_TAG_LEN + 1), &dir)),
            "Fs config error: the tag must be 1 to 36 bytes long, not 37."
        );
        // Bytes, not characters: 13 three-byte characters are 39 bytes.
        assert!(r.set_fs(dir_dev("a", &"€".repeat(13), &dir)).is_err());
        assert_eq!(
            err(&mut r, dir_dev("a", "a\0b", &dir)),
            "Fs config error: the tag must not contain a NUL byte."
        );
        assert!(r.fs.is_empty());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn num_queues_is_1_to_16() {
        let d = scratch("queues");
        let dir = d.display().to_string();
        let mut r = VmResources::default();
        for (n, ok) in [(0, false), (1, true), (16, true), (17, false)] {
            let mut f = dir_dev("a", "a", &dir);
            f.num_queues = Some(n);
            match r.set_fs(f) {
                Ok(()) => assert!(ok, "{n} accepted"),
                Err(e) => {
                    assert!(!ok, "{n} refused: {e}");
                    assert_eq!(
                        e.to_string(),
                        format!("Fs config error: num_queues must be 1 to 16, not {n}.")
                    );
                }
            }
        }
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn the_backend_must_exist_and_be_of_its_kind() {
        let d = scratch("host");
        let file = d.join("file");
        std::fs::write(&file, b"x").unwrap();
        let file = file.display().to_string();
        let missing = d.join("missing").display().to_string();
        let mut r = VmResources::default();
        let e = err(&mut r, dir_dev("a", "a", &missing));
        assert!(
            e.starts_with(&format!("Fs config error: {missing}: No such file")),
            "{e}"
        );
        assert_eq!(
            err(&mut r, dir_dev("a", "a", &file)),
            format!("Fs config error: {file} is not a directory.")
        );
        let sock = |s: &str| -> FsDevice {
            serde_json::from_value(json!({"id": "a", "tag": "a", "socket": s})).unwrap()
        };
        let e = err(&mut r, sock(&missing));
        assert!(
            e.starts_with(&format!("Fs config error: {missing}: No such file")),
            "{e}"
        );
        assert_eq!(
            err(&mut r, sock(&file)),
            format!("Fs config error: {file} is not a socket.")
        );
        let dir = d.display().to_string();
        assert_eq!(
            err(&mut r, sock(&dir)),
            format!("Fs config error: {dir} is not a socket.")
        );
        assert!(r.fs.is_empty());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn ids_are_replaced_in_place_and_tags_are_unique() {
        let d = scratch("ids");
        let dir = d.display().to_string();
        let mut r = VmResources::default();
        r.set_fs(dir_dev("a", "one", &dir)).unwrap();
        r.set_fs(dir_dev("b", "two", &dir)).unwrap();
        assert_eq!(
            err(&mut r, dir_dev("c", "one", &dir)),
            "Fs config error: the tag one is already used by the device a."
        );
        // The same id may keep its tag, or take a free one; it stays where it was.
        r.set_fs(dir_dev("a", "one", &dir)).unwrap();
        r.set_fs(dir_dev("a", "three", &dir)).unwrap();
        r.set_fs(dir_dev("c", "one", &dir)).unwrap();
        let got: Vec<_> = r.fs.iter().map(|f| (&*f.id, &*f.tag)).collect();
        assert_eq!(got, [("a", "three"), ("b", "two"), ("c", "one")]);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn devices_round_trip_through_the_config() {
        let d = scratch("cfg");
        let dir = d.display().to_string();
        let mut r = VmResources::default();
        assert!(serde_json::to_value(r.to_full_vm_config())
            .unwrap()
            .get("vessel-fs")
            .is_none());
        r.set_fs(dir_dev("a", "share", &dir)).unwrap();
        assert!(!r.is_pristine());
        let v = serde_json::to_value(r.to_full_vm_config()).unwrap();
        assert_eq!(
            v["vessel-fs"],
            json!([{"id": "a", "tag": "share", "shared_dir": dir, "read_only": false}])
        );
        let back: crate::FullVmConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back.fs, r.fs);
        assert_eq!(VmResources::recorded(back).fs, r.fs);
        // Unknown fields are refused.
        assert!(serde_json::from_value::<FsDevice>(
            json!({"id": "a", "tag": "a", "shared_dir": dir, "cache": "never"})
        )
        .is_err());
        let _ = std::fs::remove_dir_all(d);
    }
}
