//! virtio-pmem in the API, as Firecracker 1.16 has it: `PUT /pmem/{id}` before boot
//! ([`Pmem`], kept in [`VmResources::pmem`] in the order they were added, `/dev/pmem0` first),
//! `PATCH /pmem/{id}` after boot ([`PartialPmem`]: the rate limiter), `pmem` in the config file
//! and in `GET /vm/config`. At most one root device among the pmem devices and the drives,
//! with Firecracker's messages.

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::resources::VmResources;
use crate::types::{RateLimiter, Schema};

/// `PUT /pmem/{id}` (pre-boot): a virtio-pmem device. `GET /vm/config` shows every field,
/// `rate_limiter` as `null` when unset, as Firecracker does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pmem {
    /// Unique id, equal to the path's `{id}`.
    pub id: String,
    /// The backing file.
    pub path_on_host: String,
    /// The guest's root device (`root=/dev/pmemN` on the command line).
    #[serde(default)]
    pub root_device: bool,
    /// Map the file read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Limits on the guest's flushes.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PATCH /pmem/{id}` (post-boot): a new rate limiter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialPmem {
    /// Id of an existing pmem device.
    pub id: String,
    /// New rate limiter: a bucket given replaces the current one (size 0 removes it), one
    /// left out stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

impl PartialPmem {
    /// `p` after this update: a bucket given replaces the current one (size or refill time
    /// 0 removes it), one left out stays.
    pub fn apply_to(&self, p: &mut Pmem) {
        p.rate_limiter = RateLimiter::patched(p.rate_limiter, self.rate_limiter);
    }
}

impl Schema for Pmem {
    const NAME: &'static str = "Pmem";
}

impl Schema for PartialPmem {
    const NAME: &'static str = "PartialPmem";
}

fn bad(msg: impl std::fmt::Display) -> ApiError {
    ApiError::bad(format!("Pmem config error: {msg}"))
}

impl VmResources {
    /// `PUT /pmem/{id}`: inserts a device or replaces the one with the same id (in place). The
    /// backing file must open; its size is checked at start (an empty one fails there, as in
    /// Firecracker).
    pub fn set_pmem(&mut self, p: Pmem) -> Result<(), ApiError> {
        if p.root_device {
            if self.drives.iter().any(|d| d.is_root_device) {
                return Err(bad(
                    "Attempt to add pmem as a root device while the root device defined as a block device",
                ));
            }
            if self.pmem.iter().any(|o| o.root_device && o.id != p.id) {
                return Err(bad("A root pmem device already exist"));
            }
        }
        std::fs::File::open(&p.path_on_host).map_err(|e| {
            bad(format_args!(
                "Error accessing backing file: {}: {e}",
                p.path_on_host
            ))
        })?;
        crate::resources::check_rate_limiter(&p.rate_limiter)?;
        match self.pmem.iter_mut().find(|o| o.id == p.id) {
            Some(slot) => *slot = p,
            None => self.pmem.push(p),
        }
        Ok(())
    }

    /// Whether a pmem device is the root device (a root drive is then refused).
    pub fn has_pmem_root(&self) -> bool {
        self.pmem.iter().any(|p| p.root_device)
    }

    /// Validates a `PATCH /pmem/{id}` against the configured devices.
    pub fn check_pmem_update(&self, u: &PartialPmem) -> Result<(), ApiError> {
        if !self.pmem.iter().any(|p| p.id == u.id) {
            return Err(bad(
                "Unable to patch the pmem device: Failed perform action on device: Device not found Please verify the request arguments.",
            ));
        }
        crate::resources::check_rate_limiter(&u.rate_limiter)
    }

    /// Records a successful update (after the backend applied it).
    pub fn apply_pmem_update(&mut self, u: &PartialPmem) {
        if let Some(p) = self.pmem.iter_mut().find(|p| p.id == u.id) {
            u.apply_to(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pmem(id: &str, path: &str, root: bool) -> Pmem {
        serde_json::from_value(json!({"id": id, "path_on_host": path, "root_device": root}))
            .unwrap()
    }

    #[test]
    fn one_root_device_with_firecrackers_messages() {
        let f = scratch_file("root");
        let mut r = VmResources::default();
        r.set_drive(
            serde_json::from_value(json!({
                "drive_id": "d", "path_on_host": f, "is_root_device": true, "is_read_only": false
            }))
            .unwrap(),
        )
        .unwrap();
        let e = r.set_pmem(pmem("p", &f, true)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Pmem config error: Attempt to add pmem as a root device while the root device defined as a block device"
        );
        r.drives.clear();
        r.set_pmem(pmem("p", &f, true)).unwrap();
        // The same device again, still root: a replacement.
        r.set_pmem(pmem("p", &f, true)).unwrap();
        let e = r.set_pmem(pmem("q", &f, true)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Pmem config error: A root pmem device already exist"
        );
        let e = r
            .set_drive(
                serde_json::from_value(json!({
                    "drive_id": "d", "path_on_host": f, "is_root_device": true, "is_read_only": false
                }))
                .unwrap(),
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Drive config error: Attempt to add block as a root device while the root device defined as a pmem device"
        );
        r.set_pmem(pmem("p", &f, false)).unwrap();
        r.set_pmem(pmem("q", &f, true)).unwrap();
        assert_eq!(
            r.pmem.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["p", "q"],
            "replaced in place, added at the end"
        );
        let e = r
            .set_pmem(pmem("x", "/nonexistent/pmem", false))
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Pmem config error: Error accessing backing file: /nonexistent/pmem:"),
            "{e}"
        );
        let mut bad_rl = pmem("x", &f, false);
        bad_rl.rate_limiter =
            serde_json::from_value(json!({"ops": {"size": 1, "refill_time": 0}})).unwrap();
        assert!(r.set_pmem(bad_rl).is_err());
        assert_eq!(r.pmem.len(), 2, "refused devices are not added");
        let _ = std::fs::remove_file(f);
    }

    #[test]
    fn patches_need_a_device_and_keep_buckets_left_out() {
        let f = scratch_file("patch");
        let mut r = VmResources::default();
        let mut p = pmem("p", &f, false);
        p.rate_limiter = serde_json::from_value(json!({
            "bandwidth": {"size": 1000, "refill_time": 100}, "ops": {"size": 5, "refill_time": 10}
        }))
        .unwrap();
        r.set_pmem(p).unwrap();
        let u = |v: serde_json::Value| -> PartialPmem { serde_json::from_value(v).unwrap() };
        let e = r.check_pmem_update(&u(json!({"id": "nope"}))).unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
        let ops_only =
            u(json!({"id": "p", "rate_limiter": {"ops": {"size": 9, "refill_time": 99}}}));
        r.check_pmem_update(&ops_only).unwrap();
        r.apply_pmem_update(&ops_only);
        let rl = r.pmem[0].rate_limiter.unwrap();
        assert_eq!(rl.bandwidth.map(|b| b.size), Some(1000));
        assert_eq!(rl.ops.map(|b| (b.size, b.refill_time)), Some((9, 99)));
        let off = u(json!({"id": "p", "rate_limiter": {
            "bandwidth": {"size": 0, "refill_time": 0}, "ops": {"size": 0, "refill_time": 0}
        }}));
        r.apply_pmem_update(&off);
        assert_eq!(r.pmem[0].rate_limiter, None);
        // Unknown fields are refused, as Firecracker's serde does.
        assert!(
            serde_json::from_value::<PartialPmem>(json!({"id": "p", "path_on_host": "x"})).is_err()
        );
        let _ = std::fs::remove_file(f);
    }

    #[test]
    fn vm_config_shows_pmem_with_a_null_rate_limiter() {
        let f = scratch_file("cfg");
        let mut r = VmResources::default();
        r.set_pmem(pmem("p", &f, true)).unwrap();
        let v = serde_json::to_value(r.to_full_vm_config()).unwrap();
        assert_eq!(
            v["pmem"],
            json!([{"id": "p", "path_on_host": f, "root_device": true, "read_only": false, "rate_limiter": null}])
        );
        // And back, as a config file.
        let back: crate::FullVmConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back.pmem, r.pmem);
        let _ = std::fs::remove_file(f);
    }

    /// A one-byte file for a test.
    fn scratch_file(name: &str) -> String {
        let p = std::env::temp_dir().join(format!("vessel-api-pmem-{}-{name}", std::process::id()));
        std::fs::write(&p, b"x").unwrap();
        p.display().to_string()
    }
}
